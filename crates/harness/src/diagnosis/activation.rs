//! A ReLU too few or too many: the candidate is the reference before its
//! ReLU, or the reference after one it should not have.

use super::{has_negatives, relu, Evidence, Hint, Hypothesis, Observed};

pub(super) fn hints(evidence: &Evidence, observed: &Observed) -> Vec<Hint> {
    let mut hints = Vec::new();
    if has_negatives(observed.candidate) {
        if let Some(error) = evidence.reproduces(&relu(observed.candidate), observed.reference) {
            hints.push(Hint {
                hypothesis: Hypothesis::MissingRelu,
                message: "a ReLU is missing: relu(candidate) equals the reference".into(),
                relative_error: error,
            });
        }
    }
    if has_negatives(observed.reference) {
        if let Some(error) = evidence.reproduces(&relu(observed.reference), observed.candidate) {
            hints.push(Hint {
                hypothesis: Hypothesis::ExtraRelu,
                message: "an extra ReLU: the candidate equals relu(reference)".into(),
                relative_error: error,
            });
        }
    }
    hints
}

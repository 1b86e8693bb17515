//! A ReLU too few or too many: the candidate is the reference before its
//! ReLU, or the reference after one it should not have.

use super::{has_negatives, relu, Evidence, Hint, Hypothesis, Observed};

pub(super) fn hints(evidence: &Evidence, observed: &Observed) -> Vec<Hint> {
    // (the side with negatives, the side that equals its relu, the mistake)
    let cases = [
        (
            observed.candidate,
            observed.reference,
            Hypothesis::MissingRelu,
            "a ReLU is missing: relu(candidate) equals the reference",
        ),
        (
            observed.reference,
            observed.candidate,
            Hypothesis::ExtraRelu,
            "an extra ReLU: the candidate equals relu(reference)",
        ),
    ];
    cases
        .into_iter()
        .filter(|(before, ..)| has_negatives(before))
        .filter_map(|(before, after, hypothesis, message)| {
            let error = evidence.reproduces(&relu(before), after)?;
            Some(Hint {
                hypothesis,
                message: message.into(),
                relative_error: Some(error),
            })
        })
        .collect()
}

//! A ReLU too few or too many: the candidate is the reference before its
//! ReLU, or the reference after one it should not have. Where the ReLU's
//! input is known (a ReLU stage of one input), negatives kept are told
//! apart: the input itself (no ReLU), a LeakyReLU's slope, or neither.

use ndarray::ArrayD;

use super::{has_negatives, relu, Evidence, Hint, Hypothesis, Observed, Side};

/// `input`: the reference's input to this stage where the stage is a ReLU
/// of one input (what the candidate's negatives are to be held to).
pub(super) fn hints(
    evidence: &Evidence,
    observed: &Observed,
    input: Option<&ArrayD<f32>>,
) -> Vec<Hint> {
    let input = input.filter(|input| input.shape() == observed.candidate.shape());
    let mut hints = Vec::new();
    if has_negatives(observed.candidate) {
        if let Some(error) = evidence.reproduces(&relu(observed.candidate), observed.reference) {
            let (hypothesis, message, error) = match input {
                Some(input) => negatives_kept(evidence, observed, input, error),
                None => (
                    Hypothesis::MissingRelu,
                    "a ReLU is missing: relu(candidate) equals the reference".into(),
                    error,
                ),
            };
            hints.push(Hint {
                hypothesis,
                message,
                relative_error: Some(error),
            });
        }
    }
    // Clipped above as well (MobileNet's ReLU6), where torch's ReLU is not.
    if let Some(input) = input {
        // NaN kept (f32::min would make it 6), as torch's relu6 keeps it.
        let relu6 = input.mapv(|x| match resnet_core::ops::relu_value(x) {
            above if above > 6.0 => 6.0,
            value => value,
        });
        // Told from a ReLU only where some input is above 6.
        let distinct = evidence.distinct(&relu6, &relu(input));
        if let Some((Side::Candidate, error)) =
            evidence.explains(&relu6, observed).filter(|_| distinct)
        {
            hints.push(Hint {
                hypothesis: Hypothesis::OtherActivation,
                message: "the candidate matches a ReLU6 (clipped at 6) where torch has a ReLU"
                    .into(),
                relative_error: Some(error),
            });
        }
    }
    if has_negatives(observed.reference) {
        if let Some(error) = evidence.reproduces(&relu(observed.reference), observed.candidate) {
            hints.push(Hint {
                hypothesis: Hypothesis::ExtraRelu,
                message: "an extra ReLU: the candidate equals relu(reference)".into(),
                relative_error: Some(error),
            });
        }
    }
    hints
}

/// With the ReLU's input known, what the candidate's negatives are (where
/// relu(candidate) reproduces the reference to `relu_error`): the input's
/// own (the ReLU left out), a LeakyReLU's (a slope times the input's), or
/// something else keeping negatives.
fn negatives_kept(
    evidence: &Evidence,
    observed: &Observed,
    input: &ArrayD<f32>,
    relu_error: f64,
) -> (Hypothesis, String, f64) {
    if let Some(error) = evidence.reproduces(input, observed.candidate) {
        return (
            Hypothesis::MissingRelu,
            "a ReLU is missing: the candidate equals the ReLU's input".into(),
            error,
        );
    }
    // The slope, from the most negative input (the best-conditioned ratio);
    // an input with no negatives has none.
    let most_negative = input
        .iter()
        .zip(observed.candidate.iter())
        .filter(|(x, _)| **x < 0.0)
        .min_by(|a, b| a.0.total_cmp(b.0));
    if let Some((most_negative, kept)) = most_negative {
        let slope = kept / most_negative;
        let leaky = ndarray::Zip::from(input).map_collect(|&x| if x < 0.0 { slope * x } else { x });
        if slope > 0.0 {
            if let Some(error) = evidence.reproduces(&leaky, observed.candidate) {
                return (
                    Hypothesis::OtherActivation,
                    format!("a LeakyReLU (negative slope {slope:.3e}) where torch has a ReLU: relu(candidate) equals the reference"),
                    error,
                );
            }
        }
    }
    (
        Hypothesis::OtherActivation,
        "negatives kept where torch's ReLU gives 0 (relu(candidate) equals the reference), but not the ReLU's input: another activation?".into(),
        relu_error,
    )
}

//! The classifier, `x @ weight.T + bias`, with its weight used untransposed
//! (a square one, `in_features == out_features`, runs either way), its
//! bias left out, or a softmax after it.

use ndarray::{ArrayD, IxDyn};

use super::{Evidence, Hint, Hypothesis, Observed};

pub(super) fn hints(evidence: &Evidence, index: usize, observed: &Observed) -> Vec<Hint> {
    let Some((stage, input)) = evidence.stage_with_input(index) else {
        return Vec::new();
    };
    let Some(weight) = evidence.weight(&format!("{}.weight", stage.module)) else {
        return Vec::new();
    };
    let &[outputs, features] = weight.shape() else {
        return Vec::new();
    };
    let batch = input.shape().first().copied().unwrap_or(0);
    if batch == 0
        || outputs == 0
        || input.len() != batch * features
        || observed.reference.len() != batch * outputs
    {
        return Vec::new();
    }
    // Probabilities where torch gives logits: softmax over each row (the
    // reference holds `batch` rows of `outputs`, checked above).
    let logits: Vec<f64> = observed.reference.iter().map(|&v| v as f64).collect();
    let softmax: Vec<f32> = logits
        .chunks(outputs)
        .flat_map(|row| {
            let top = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = row.iter().map(|v| (v - top).exp()).sum();
            row.iter().map(move |v| ((v - top).exp() / total) as f32)
        })
        .collect();
    let softmax = ArrayD::from_shape_vec(IxDyn(observed.reference.shape()), softmax)
        .expect("the reference's shape");
    if let Some((super::Side::Candidate, error)) = evidence.explains(&softmax, observed) {
        return vec![Hint {
            hypothesis: Hypothesis::LinearLayout,
            message: "the candidate is softmax(logits): torch's ResNet returns the logits, the softmax is the caller's"
                .into(),
            relative_error: Some(error),
        }];
    }
    let bias = evidence.weight(&format!("{}.bias", stage.module));
    let x: Vec<f64> = input.iter().map(|&v| v as f64).collect();
    let w: Vec<f64> = weight.iter().map(|&v| v as f64).collect();
    // `weight[o, i]`, or with `transposed` the value at `[i, o]`.
    let product = |transposed: bool, with_bias: bool| -> ArrayD<f32> {
        let values = (0..batch * outputs).map(|flat| {
            let (n, o) = (flat / outputs, flat % outputs);
            let sum: f64 = (0..features)
                .map(|i| {
                    let at = if transposed {
                        i * outputs + o
                    } else {
                        o * features + i
                    };
                    x[n * features + i] * w[at]
                })
                .sum();
            let shift = bias
                .as_ref()
                .filter(|_| with_bias)
                .map_or(0.0, |b| b.as_slice().map_or(0.0, |b| b[o] as f64));
            (sum + shift) as f32
        });
        ArrayD::from_shape_vec(IxDyn(observed.reference.shape()), values.collect())
            .expect("batch x outputs values")
    };
    let mut cases = vec![];
    if bias.is_some() {
        cases.push((product(false, false), "its bias left out"));
    }
    if outputs == features {
        cases.push((
            product(true, true),
            "its weight untransposed (x @ weight + bias, where torch computes x @ weight.T + bias)",
        ));
    }
    let correct = product(false, true);
    cases
        .into_iter()
        .filter(|(recomputed, _)| evidence.distinct(recomputed, &correct))
        .filter_map(|(recomputed, what)| {
            let (side, error) = evidence.explains(&recomputed, observed)?;
            Some(Hint {
                hypothesis: Hypothesis::LinearLayout,
                message: format!("{} matches this Linear with {what}", side.subject()),
                relative_error: Some(error),
            })
        })
        .take(1)
        .collect()
}

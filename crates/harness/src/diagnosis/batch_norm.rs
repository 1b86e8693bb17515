//! BatchNorm's mistakes: batch statistics instead of running ones (train
//! mode), another eps (solved for), weight and bias swapped or missing,
//! running_mean and running_var swapped. Each is the stage recomputed in
//! f64 from the reference's input with the mistake made.

use ndarray::{ArrayD, Axis};

use super::{Evidence, Hint, Hypothesis, Observed, Side};

/// The four per-channel parameters of a BatchNorm, in f64.
#[derive(Clone, Debug)]
pub(crate) struct Parameters {
    pub weight: Vec<f64>,
    pub bias: Vec<f64>,
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

impl Parameters {
    /// `module`'s parameters from a weight lookup, failing as it fails.
    pub fn load<E>(
        module: &str,
        lookup: impl Fn(&str) -> Result<ArrayD<f32>, E>,
    ) -> Result<Self, E> {
        let part = |name: &str| -> Result<Vec<f64>, E> {
            Ok(lookup(&format!("{module}.{name}"))?
                .iter()
                .map(|&v| v as f64)
                .collect())
        };
        Ok(Parameters {
            weight: part("weight")?,
            bias: part("bias")?,
            mean: part("running_mean")?,
            var: part("running_var")?,
        })
    }
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` per channel of an NCHW
/// tensor, in f64, rounded once.
pub(crate) fn normalise(
    input: &ArrayD<f32>,
    mean: &[f64],
    var: &[f64],
    weight: &[f64],
    bias: &[f64],
    eps: f64,
) -> ArrayD<f32> {
    let mut output = input.clone();
    for (channel, mut values) in output.axis_iter_mut(Axis(1)).enumerate() {
        let factor = weight[channel] / (var[channel] + eps).sqrt();
        values.mapv_inplace(|x| ((x as f64 - mean[channel]) * factor + bias[channel]) as f32);
    }
    output
}

/// Per-channel mean and biased variance over N, H and W (what torch's
/// BatchNorm uses to normalise in train mode).
pub(crate) fn channel_statistics(nchw: &ArrayD<f32>) -> (Vec<f64>, Vec<f64>) {
    nchw.axis_iter(Axis(1))
        .map(|values| {
            let count = values.len() as f64;
            let mean = values.iter().map(|&v| v as f64).sum::<f64>() / count;
            let variance = values
                .iter()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / count;
            (mean, variance)
        })
        .unzip()
}

pub(super) fn hints(evidence: &Evidence, index: usize, observed: &Observed) -> Vec<Hint> {
    let (Some(network), Some((stage, input))) =
        (evidence.network, evidence.stage_with_input(index))
    else {
        return Vec::new();
    };
    let Some(p) = Parameters::load(&stage.module, |name| evidence.weight(name).ok_or(())).ok()
    else {
        return Vec::new();
    };
    let channels = input.shape().get(1).copied().unwrap_or(0);
    if input.ndim() != 4
        || p.weight.len() != channels
        || input.shape() != observed.reference.shape()
    {
        return Vec::new();
    }
    let eps = network.architecture().batch_norm_eps_of(&stage.module);
    let ones = vec![1.0; channels];
    let zeros = vec![0.0; channels];
    let (batch_mean, batch_var) = channel_statistics(&input);

    let correct = normalise(&input, &p.mean, &p.var, &p.weight, &p.bias, eps);
    let mut hints = Vec::new();
    let mut test = |hypothesis, recomputed: ArrayD<f32>, says: &dyn Fn(Side) -> String| {
        if !evidence.distinct(&recomputed, &correct) {
            return;
        }
        if let Some((side, error)) = evidence.explains(&recomputed, observed) {
            hints.push(Hint {
                hypothesis,
                message: says(side),
                relative_error: Some(error),
            });
        }
    };
    test(
        Hypothesis::BatchStatistics,
        normalise(&input, &batch_mean, &batch_var, &p.weight, &p.bias, eps),
        &|side| {
            match side {
            Side::Candidate => "the candidate matches BatchNorm with batch statistics; was the implementation in train mode? Use running_mean and running_var".into(),
            Side::Reference => "the reference matches BatchNorm with batch statistics: it was dumped in train mode; call model.eval() before dumping".into(),
        }
        },
    );
    let affine_mistakes: [(&[f64], &[f64], &str); 4] = [
        (&p.bias, &p.weight, "weight and bias swapped"),
        (&ones, &p.bias, "weight missing (taken as 1)"),
        (&p.weight, &zeros, "bias missing (taken as 0)"),
        (&ones, &zeros, "weight and bias both missing"),
    ];
    for (weight, bias, what) in affine_mistakes {
        test(
            Hypothesis::BatchNormAffine,
            normalise(&input, &p.mean, &p.var, weight, bias, eps),
            &|side| format!("{} matches BatchNorm with {what}", side.subject()),
        );
    }
    // running_var taken for the standard deviation: x / var, not
    // x / sqrt(var + eps) (normalise divides by sqrt(var^2 + 0)).
    let var_squared: Vec<f64> = p.var.iter().map(|v| v * v).collect();
    test(
        Hypothesis::BatchNormAffine,
        normalise(&input, &p.mean, &var_squared, &p.weight, &p.bias, 0.0),
        &|side| {
            format!(
                "{} matches BatchNorm divided by running_var, not by sqrt(running_var + eps): the variance used as the standard deviation",
                side.subject()
            )
        },
    );
    test(
        Hypothesis::BatchNormStatisticsSwapped,
        normalise(&input, &p.var, &p.mean, &p.weight, &p.bias, eps),
        &|side| {
            format!(
                "{} matches BatchNorm with running_mean and running_var swapped",
                side.subject()
            )
        },
    );
    // eps added outside the square root: x / (sqrt(var) + eps), which
    // normalise computes as sqrt((sqrt(var) + eps)^2 + 0); or another eps,
    // solved from the data, 0 for eps left out. Outside the root differs
    // from torch's only where var is small, and there a tiny eps would be
    // solved for, a wrong value for the right parameter; where var is small
    // but not tiny it is within tolerance of eps left out, and only eps left
    // out (the simpler mistake) is named.
    let without_eps = normalise(&input, &p.mean, &p.var, &p.weight, &p.bias, 0.0);
    let std_plus_eps: Vec<f64> = p.var.iter().map(|v| (v.sqrt() + eps).powi(2)).collect();
    let outside = normalise(&input, &p.mean, &std_plus_eps, &p.weight, &p.bias, 0.0);
    if evidence.distinct(&outside, &without_eps) && evidence.distinct(&outside, &correct) {
        if let Some((side, error)) = evidence.explains(&outside, observed) {
            hints.push(Hint {
                hypothesis: Hypothesis::BatchNormEps,
                message: format!(
                    "{} matches BatchNorm divided by sqrt(running_var) + eps, not by sqrt(running_var + eps): eps added outside the square root",
                    side.subject()
                ),
                relative_error: Some(error),
            });
            return hints;
        }
    }
    // eps left out, and the eps solved for each side (none where the
    // estimate is not above 0): the one that fits the side better is named,
    // eps left out on a tie (the simpler mistake, and a solved eps of 4e-8
    // is one).
    let left_out = evidence.distinct(&without_eps, &correct).then(|| {
        let found = format!(
            "eps left out (0): divided by sqrt(running_var), not by sqrt(running_var + {eps:e})"
        );
        (found, &without_eps)
    });
    for (side, observed_output) in [
        (Side::Candidate, observed.candidate),
        (Side::Reference, observed.reference),
    ] {
        let solved = solve_eps(&input, observed_output, &p)
            .filter(|solved| (solved - eps).abs() > 0.25 * eps)
            .map(|solved| {
                let found =
                    format!("eps = {solved:.1e} (solved from the data), not the model's {eps:e}");
                (
                    found,
                    normalise(&input, &p.mean, &p.var, &p.weight, &p.bias, solved),
                )
            })
            .filter(|(_, recomputed)| evidence.distinct(recomputed, &correct));
        let best = [
            left_out
                .as_ref()
                .map(|(found, recomputed)| (found, *recomputed)),
            solved
                .as_ref()
                .map(|(found, recomputed)| (found, recomputed)),
        ]
        .into_iter()
        .flatten()
        .filter_map(|(found, recomputed)| {
            Some((
                found,
                evidence.explains_side(recomputed, observed_output, observed)?,
            ))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((found, error)) = best {
            hints.push(Hint {
                hypothesis: Hypothesis::BatchNormEps,
                message: format!("{} matches BatchNorm with {found}", side.subject()),
                relative_error: Some(error),
            });
            break;
        }
    }
    hints
}

/// The eps under which `output` is this BatchNorm of `input`: per channel,
/// the least-squares slope `k` of `output - bias` against `input - mean`
/// is `weight / sqrt(var + eps)`, so `eps = (weight / k)^2 - var`. The
/// median over channels stands against a channel that says little.
fn solve_eps(input: &ArrayD<f32>, output: &ArrayD<f32>, p: &Parameters) -> Option<f64> {
    let mut estimates: Vec<f64> = input
        .axis_iter(Axis(1))
        .zip(output.axis_iter(Axis(1)))
        .enumerate()
        .filter_map(|(c, (x, y))| {
            let (mut xy, mut xx) = (0f64, 0f64);
            for (&x, &y) in x.iter().zip(y.iter()) {
                let centred = x as f64 - p.mean[c];
                xy += centred * (y as f64 - p.bias[c]);
                xx += centred * centred;
            }
            let slope = xy / xx;
            (xx > 0.0 && slope.is_finite() && slope != 0.0 && p.weight[c] != 0.0)
                .then(|| (p.weight[c] / slope).powi(2) - p.var[c])
        })
        .collect();
    if estimates.is_empty() {
        return None;
    }
    estimates.sort_by(f64::total_cmp);
    let median = estimates[estimates.len() / 2];
    (median.is_finite() && median > 0.0).then_some(median)
}

//! The input stage: the candidate preprocessed the image another way. The
//! reference's input is undone back to the 0-1 image with the manifest's
//! mean and std, then preprocessed again with each mistake: BGR instead of
//! RGB (before or after normalising), 0-255 instead of 0-1, or another mean
//! and std (solved for, per channel, by least squares).

use ndarray::{ArrayD, Axis};

use super::{Evidence, Hint, Hypothesis, Observed, Side};

pub(super) fn hints(evidence: &Evidence, observed: &Observed) -> Vec<Hint> {
    let Some(info) = evidence.dump.manifest().input.as_ref() else {
        return Vec::new();
    };
    let (Some(mean), Some(std)) = (info.mean.as_deref(), info.std.as_deref()) else {
        return Vec::new();
    };
    let reference = observed.reference;
    let channels = mean.len();
    if reference.ndim() != 4 || reference.shape()[1] != channels || std.len() != channels {
        return Vec::new();
    }
    let image = per_channel(reference, |c, v| v * std[c] + mean[c]);
    let normalise = |image: &ArrayD<f32>, scale: f64, mean: &[f64], std: &[f64]| {
        per_channel(image, |c, v| (v * scale - mean[c]) / std[c])
    };
    let mut reversed = image.clone();
    reversed.invert_axis(Axis(1));

    let mut hints = Vec::new();
    let mut test = |recomputed: ArrayD<f32>, what: &str| {
        if let Some((Side::Candidate, error)) = evidence.explains(&recomputed, observed) {
            hints.push(Hint {
                hypothesis: Hypothesis::Preprocessing,
                message: format!("the candidate's input {what}"),
                relative_error: Some(error),
            });
            return true;
        }
        false
    };
    let color = info.color.as_deref().unwrap_or("RGB");
    let other = if color == "BGR" { "RGB" } else { "BGR" };
    if test(
        normalise(&reversed, 1.0, mean, std),
        &format!(
            "is the image in {other} order, not {color}, normalised with the same mean and std"
        ),
    ) || test(
        normalise(&image, 255.0, mean, std),
        "is the image scaled 0-255, not 0-1, before the mean and std",
    ) || test(
        {
            let mut flipped = reference.clone();
            flipped.invert_axis(Axis(1));
            flipped
        },
        &format!(
            "is the normalised input with its channels reversed ({other} order after the {color} mean and std)"
        ),
    ) {
        return hints;
    }
    if let Some((solved_mean, solved_std)) = solve_normalisation(&image, observed.candidate) {
        let differs = solved_mean
            .iter()
            .zip(mean)
            .chain(solved_std.iter().zip(std))
            .any(|(a, b)| (a - b).abs() > 1e-3);
        if differs {
            test(
                normalise(&image, 1.0, &solved_mean, &solved_std),
                &format!(
                    "is normalised with mean {} and std {} (solved from the data), not mean {} and std {}",
                    rounded(&solved_mean),
                    rounded(&solved_std),
                    rounded(mean),
                    rounded(std)
                ),
            );
        }
    }
    hints
}

fn per_channel(nchw: &ArrayD<f32>, f: impl Fn(usize, f64) -> f64) -> ArrayD<f32> {
    let mut output = nchw.clone();
    for (channel, mut values) in output.axis_iter_mut(Axis(1)).enumerate() {
        values.mapv_inplace(|v| f(channel, v as f64) as f32);
    }
    output
}

/// Per channel, the `mean` and `std` with `candidate = (image - mean) / std`
/// in the least-squares sense.
fn solve_normalisation(
    image: &ArrayD<f32>,
    candidate: &ArrayD<f32>,
) -> Option<(Vec<f64>, Vec<f64>)> {
    if image.shape() != candidate.shape() {
        return None;
    }
    let mut means = Vec::new();
    let mut stds = Vec::new();
    for (x, y) in image.axis_iter(Axis(1)).zip(candidate.axis_iter(Axis(1))) {
        let count = x.len() as f64;
        let x_mean = x.iter().map(|&v| v as f64).sum::<f64>() / count;
        let y_mean = y.iter().map(|&v| v as f64).sum::<f64>() / count;
        let (mut xy, mut xx) = (0f64, 0f64);
        for (&x, &y) in x.iter().zip(y.iter()) {
            xy += (x as f64 - x_mean) * (y as f64 - y_mean);
            xx += (x as f64 - x_mean).powi(2);
        }
        let slope = xy / xx;
        if !(xx > 0.0 && slope.is_finite() && slope != 0.0) {
            return None;
        }
        // y = x / std - mean / std
        let std = 1.0 / slope;
        let intercept = y_mean - slope * x_mean;
        means.push(-intercept * std);
        stds.push(std);
    }
    Some((means, stds))
}

fn rounded(values: &[f64]) -> String {
    let parts: Vec<String> = values.iter().map(|v| format!("{v:.3}")).collect();
    format!("[{}]", parts.join(", "))
}

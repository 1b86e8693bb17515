//! A pool of another kind than torch's: an average where the stem takes the
//! max, a max, a sum or a fixed 7x7 window where the head averages the
//! whole map (`AvgPool2d(7)`, right at 224x224 only), and a downsample
//! average-pooled before a stride-1 conv (ResNet-D, as in timm's
//! `resnet50d`) where torchvision's strided 1x1 conv samples every other
//! pixel. Each is recomputed in f64 from the reference's input.

use ndarray::{ArrayD, Axis};
use resnet_core::StageKind;

use super::{Evidence, Hint, Hypothesis, Observed};

/// An average pool's window along both axes, as torch's `AvgPool2d` takes
/// it; the output's size is given (the stage's), which fixes `ceil_mode`.
#[derive(Clone, Copy, Debug)]
struct AverageWindow {
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    /// Whether padded positions count in the divisor (torch's default).
    count_include_pad: bool,
}

impl AverageWindow {
    /// `AvgPool2d(kernel, stride, padding)` of an NCHW input, summed in f64
    /// and rounded once, with `output` rows and columns. A window that
    /// reaches past the input and its padding (the last one under
    /// `ceil_mode`) is cut there, as torch cuts it.
    fn apply(self, input: &ArrayD<f32>, output: [usize; 2]) -> Option<ArrayD<f32>> {
        let &[batch, channels, height, width] = input.shape() else {
            return None;
        };
        // Per axis and output position: the input range, and its divisor's
        // share (the range before padding is cut off, with count_include_pad).
        let ranges = |axis: usize, size: usize| -> Vec<(usize, usize, usize)> {
            (0..output[axis])
                .map(|o| {
                    let start = (o * self.stride[axis]) as isize - self.padding[axis] as isize;
                    let end = (start + self.kernel[axis] as isize)
                        .min((size + self.padding[axis]) as isize);
                    let share = (end - start) as usize;
                    let (start, end) = (start.max(0) as usize, (end.max(0) as usize).min(size));
                    let count = end.saturating_sub(start);
                    (
                        start,
                        end,
                        if self.count_include_pad { share } else { count },
                    )
                })
                .collect()
        };
        let (rows, columns) = (ranges(0, height), ranges(1, width));
        if rows
            .iter()
            .chain(&columns)
            .any(|&(_, _, divisor)| divisor == 0)
        {
            return None;
        }
        let shape = [batch, channels, output[0], output[1]];
        Some(ArrayD::from_shape_fn(&shape[..], |index| {
            let (top, bottom, rows_counted) = rows[index[2]];
            let (left, right, columns_counted) = columns[index[3]];
            let mut sum = 0f64;
            for y in top..bottom {
                for x in left..right {
                    sum += input[[index[0], index[1], y, x]] as f64;
                }
            }
            (sum / (rows_counted * columns_counted) as f64) as f32
        }))
    }
}

/// Another pool's output (where it could be computed), and what it is.
type Alternative = (Option<ArrayD<f32>>, String);

/// For a max pool, or the head's average pool: another kind of pool.
pub(super) fn hints(evidence: &Evidence, index: usize, observed: &Observed) -> Vec<Hint> {
    let Some((stage, input)) = evidence.stage_with_input(index) else {
        return Vec::new();
    };
    let (&[_, _, height, width], &[_, _, out_h, out_w]) =
        (input.shape(), observed.reference.shape())
    else {
        return Vec::new();
    };
    let output = [out_h, out_w];
    // (the correct pool, then each other pool with what it is).
    let (correct, others): (Option<ArrayD<f32>>, Vec<Alternative>) = match (
        stage.kind,
        stage.max_pool(),
    ) {
        (StageKind::MaxPool2d, Some(pool)) => {
            let average = |count_include_pad| AverageWindow {
                kernel: [pool.kernel; 2],
                stride: [pool.stride; 2],
                padding: [pool.padding; 2],
                count_include_pad,
            };
            let described = |note: &str| {
                format!(
                        "an average pool (kernel {}, stride {}, padding {}{note}) where torch takes the max",
                        pool.kernel, pool.stride, pool.padding
                    )
            };
            (
                evidence.run_max_pool(pool, &input, observed.reference.shape()),
                [(true, ""), (false, ", count_include_pad=False")]
                    .into_iter()
                    .map(|(count_include_pad, note)| {
                        (
                            average(count_include_pad).apply(&input, output),
                            described(note),
                        )
                    })
                    .collect(),
            )
        }
        (StageKind::AdaptiveAvgPool2d, _) if output == [1, 1] => {
            let whole = |kernel: [usize; 2]| AverageWindow {
                kernel,
                stride: kernel,
                padding: [0, 0],
                count_include_pad: true,
            };
            let mean = whole([height, width]).apply(&input, output);
            let sum = mean
                .as_ref()
                .map(|mean| mean.mapv(|v| (v as f64 * (height * width) as f64) as f32));
            let maximum = input
                .map_axis(Axis(3), |row| row.fold(f32::NEG_INFINITY, |a, &b| a.max(b)))
                .map_axis(Axis(2), |column| {
                    column.fold(f32::NEG_INFINITY, |a, &b| a.max(b))
                })
                .insert_axis(Axis(2))
                .insert_axis(Axis(3));
            let mut others = vec![
                (
                    Some(maximum),
                    "a max over the map where torch averages it (AdaptiveAvgPool2d)".into(),
                ),
                (
                    sum,
                    format!(
                        "a sum over the {height}x{width} map where torch averages it: divide by {}",
                        height * width
                    ),
                ),
            ];
            // A hard-coded AvgPool2d(7), which torchvision's ResNets had
            // before AdaptiveAvgPool2d: right for 224x224 inputs only.
            if (8..14).contains(&height) && (8..14).contains(&width) {
                others.push((
                        whole([7, 7]).apply(&input, output),
                        format!(
                            "AvgPool2d(7): the mean of the map's top-left 7x7 only, where torch averages all of its {height}x{width}"
                        ),
                    ));
            }
            (mean, others)
        }
        _ => return Vec::new(),
    };
    first_explained(evidence, observed, correct, others)
}

/// For a downsample's 1x1 stride-2 conv: ResNet-D's average pool 2x2
/// (ceil_mode, count_include_pad=False) then the conv at stride 1.
pub(super) fn downsample_hints(
    evidence: &Evidence,
    index: usize,
    observed: &Observed,
) -> Vec<Hint> {
    let &[_, _, out_h, out_w] = observed.reference.shape() else {
        return Vec::new();
    };
    let Some((stage, input)) = evidence.stage_with_input(index) else {
        return Vec::new();
    };
    let Some(conv) = stage.conv() else {
        return Vec::new();
    };
    let geometry = conv.geometry();
    if !stage.module.ends_with(".downsample.0")
        || geometry.kernel != [1, 1]
        || geometry.stride != [2, 2]
    {
        return Vec::new();
    }
    let pooled = AverageWindow {
        kernel: [2, 2],
        stride: [2, 2],
        padding: [0, 0],
        count_include_pad: false,
    }
    .apply(&input, [out_h, out_w]);
    let shape = observed.reference.shape();
    let recomputed =
        pooled.and_then(|pooled| evidence.run_conv(&conv.with_stride([1, 1]), &pooled, shape));
    first_explained(
        evidence,
        observed,
        evidence.run_conv(conv, &input, shape),
        vec![(
            recomputed,
            "this 1x1 conv at stride 1 on its input average-pooled 2x2 (ResNet-D's downsample, as in timm's resnet50d), where torchvision's strided conv takes every other pixel".into(),
        )],
    )
}

/// The first of `others` (a recomputation, and what it is) that differs
/// from the `correct` stage on this data and explains a side.
fn first_explained(
    evidence: &Evidence,
    observed: &Observed,
    correct: Option<ArrayD<f32>>,
    others: Vec<Alternative>,
) -> Vec<Hint> {
    let Some(correct) = correct else {
        return Vec::new();
    };
    others
        .into_iter()
        .filter_map(|(recomputed, what)| Some((recomputed?, what)))
        .filter(|(recomputed, _)| evidence.distinct(recomputed, &correct))
        .find_map(|(recomputed, what)| {
            let (side, error) = evidence.explains(&recomputed, observed)?;
            Some(Hint {
                hypothesis: Hypothesis::OtherPooling,
                message: format!("{} matches {what}", side.subject()),
                relative_error: Some(error),
            })
        })
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use ndarray::{ArrayD, IxDyn};

    use super::AverageWindow;

    #[test]
    fn average_windows_count_and_cut_as_torch_does() {
        // One 3x3 plane, 1..=9.
        let input =
            ArrayD::from_shape_vec(IxDyn(&[1, 1, 3, 3]), (1..=9).map(|v| v as f32).collect())
                .unwrap();
        let window = |count_include_pad| AverageWindow {
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1, 1],
            count_include_pad,
        };
        // torch.nn.functional.avg_pool2d(x, 3, 2, 1): the corner window
        // holds 1, 2, 4, 5 of 9 places; without the padding, of 4.
        let with_pad = window(true).apply(&input, [2, 2]).unwrap();
        assert_eq!(with_pad[[0, 0, 0, 0]], 12.0 / 9.0);
        assert_eq!(with_pad[[0, 0, 1, 1]], 28.0 / 9.0);
        let without = window(false).apply(&input, [2, 2]).unwrap();
        assert_eq!(without[[0, 0, 0, 0]], 3.0);
        assert_eq!(without[[0, 0, 1, 1]], 7.0);
        // AvgPool2d(2, ceil_mode=True) over 3 rows: the last window holds
        // one row, and divides by what it holds.
        let ceil = AverageWindow {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0, 0],
            count_include_pad: true,
        }
        .apply(&input, [2, 2])
        .unwrap();
        assert_eq!(ceil[[0, 0, 0, 0]], 3.0);
        assert_eq!(ceil[[0, 0, 1, 1]], 9.0);
        assert_eq!(ceil[[0, 0, 0, 1]], 4.5);
    }
}

//! Padding and output-size conventions other than torch's, which only some
//! input sizes show. TensorFlow's "SAME" pads `max((ceil(in / s) - 1) * s +
//! span - in, 0)` in total with the smaller half on top and left: where
//! torch pads symmetrically, a stride-2 window then starts one pixel later
//! at even sizes (same output size, other values). Max pooling with
//! `ceil_mode=True` adds an output row where the last window only partly
//! covers the input (a size that differs). A candidate whose output size
//! differs gets the conventions that would give it, by name.

use std::rc::Rc;

use ndarray::{ArrayD, Slice};

use super::{Evidence, Hint, Hypothesis, Observed, Side};

/// One spatial axis of a conv or max pool window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    kernel: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
}

impl Window {
    fn span(self) -> usize {
        self.dilation * (self.kernel - 1) + 1
    }

    /// torch's output size: floor, or ceil with `ceil_mode` (where the last
    /// window must still start inside the input or its left padding).
    fn torch(self, input: usize, ceil_mode: bool) -> Option<usize> {
        let extent = (input + 2 * self.padding).checked_sub(self.span())?;
        let mut size = match ceil_mode {
            false => extent / self.stride,
            true => extent.div_ceil(self.stride),
        } + 1;
        if ceil_mode && (size - 1) * self.stride >= input + self.padding {
            size -= 1;
        }
        Some(size)
    }

    /// TensorFlow's SAME: the output size, and the padding before the
    /// first row and after the last.
    fn same(self, input: usize) -> (usize, (usize, usize)) {
        let size = input.div_ceil(self.stride);
        let total = ((size - 1) * self.stride + self.span()).saturating_sub(input);
        (size, (total / 2, total - total / 2))
    }

    /// TensorFlow's VALID (no padding).
    fn valid(self, input: usize) -> Option<usize> {
        Some(input.checked_sub(self.span())? / self.stride + 1)
    }

    /// Every convention's output size for `input`, by name.
    fn conventions(self, input: usize, pool: bool) -> Vec<(&'static str, Option<usize>)> {
        let mut sizes = vec![("torch's", self.torch(input, false))];
        if pool {
            sizes.push(("max pooling with ceil_mode=True", self.torch(input, true)));
        }
        sizes.push(("TensorFlow-style SAME padding", Some(self.same(input).0)));
        sizes.push(("no padding (VALID)", self.valid(input)));
        sizes
    }
}

/// A conv or max pool stage, the reference's input to it, its windows
/// (along the height, then the width) and whether it pools.
type Windowed<'a> = (&'a resnet_core::Stage, Rc<ArrayD<f32>>, [Window; 2], bool);

/// Stage `index` with its windows; `None` for stages without windows.
fn windowed<'a>(evidence: &Evidence<'a>, index: usize) -> Option<Windowed<'a>> {
    let (stage, input) = evidence.stage_with_input(index)?;
    if let Some(conv) = stage.conv() {
        let g = conv.geometry();
        let axis = |a: usize| Window {
            kernel: g.kernel[a],
            stride: g.stride[a],
            padding: g.padding[a],
            dilation: g.dilation[a],
        };
        return Some((stage, input, [axis(0), axis(1)], false));
    }
    let pool = stage.max_pool()?;
    let window = Window {
        kernel: pool.kernel,
        stride: pool.stride,
        padding: pool.padding,
        dilation: 1,
    };
    Some((stage, input, [window; 2], true))
}

/// For a stage whose candidate output has another height or width than the
/// reference's: which convention (max pooling's ceil_mode, SAME, no
/// padding), or which other padding or stride, gives the candidate's size;
/// and where the values can be recomputed that way (all but another
/// stride), whether they are the candidate's. A size alone says little: a
/// pool of kernel 2 has ceil_mode's size, a stride of 2 halves it.
pub(super) fn size_hints(
    evidence: &Evidence,
    index: usize,
    reference_shape: &[usize],
    candidate: &ArrayD<f32>,
) -> Vec<Hint> {
    let Some((stage, input, windows, pool)) = windowed(evidence, index) else {
        return Vec::new();
    };
    let (&[_, _, input_h, input_w], &[_, _, want_h, want_w], &[_, _, got_h, got_w]) =
        (input.shape(), reference_shape, candidate.shape())
    else {
        return Vec::new();
    };
    if (got_h, got_w) == (want_h, want_w) {
        return Vec::new();
    }
    let [along_h, along_w] = [(windows[0], input_h), (windows[1], input_w)]
        .map(|(window, input)| window.conventions(input, pool));
    let named: Vec<String> = along_h
        .iter()
        .zip(&along_w)
        .filter_map(|((name, h), (_, w))| Some((*name, (*h)?, (*w)?)))
        .map(|(name, h, w)| format!("{name} {h}x{w}"))
        .collect();
    // Per axis: its window and input size.
    let axes = [(windows[0], input_h), (windows[1], input_w)];
    let gives = |size: &dyn Fn(Window, usize) -> Option<usize>| {
        axes.map(|(window, input)| size(window, input)) == [Some(got_h), Some(got_w)]
    };
    let pads = |pad: &dyn Fn(Window, usize) -> (usize, usize)| {
        axes.map(|(window, input)| pad(window, input))
    };

    // Each way to the candidate's size: its name, and how to recompute the
    // values that way, where the stage's own weights allow it.
    let mut ways: Vec<(String, Recompute)> = Vec::new();
    let window = windows[0];
    if pool && gives(&|window, input| window.torch(input, true)) {
        ways.push((
            "max pooling with ceil_mode=True".into(),
            Recompute::Padded(pads(&|window, _| {
                (window.padding, window.padding + window.stride - 1)
            })),
        ));
    }
    if gives(&|window, input| Some(window.same(input).0)) {
        ways.push((
            "TensorFlow-style SAME padding".into(),
            Recompute::Padded(pads(&|window, input| window.same(input).1)),
        ));
    }
    if gives(&|window, input| window.valid(input)) {
        ways.push(("no padding (VALID)".into(), Recompute::Padded([(0, 0); 2])));
    }
    for padding in (1..=window.kernel).filter(|&padding| padding != window.padding) {
        if gives(&|window, input| Window { padding, ..window }.torch(input, false)) {
            ways.push((
                format!("padding {padding} (torch's: {})", window.padding),
                Recompute::Padded([(padding, padding); 2]),
            ));
        }
    }
    for stride in (1..=4).filter(|&stride| stride != window.stride) {
        if gives(&|window, input| Window { stride, ..window }.torch(input, false)) {
            ways.push((
                format!("a stride of {stride} (torch's: {})", window.stride),
                Recompute::Not,
            ));
        }
    }
    // A pool's window needs no weights: another kernel is recomputed too.
    let kernels = (1..=window.kernel + 2).filter(|_| pool);
    for kernel in kernels.filter(|&kernel| kernel != window.kernel && 2 * window.padding <= kernel)
    {
        if gives(&|window, input| Window { kernel, ..window }.torch(input, false)) {
            ways.push((
                format!("a kernel of {kernel} (torch's: {})", window.kernel),
                Recompute::PoolKernel(kernel),
            ));
        }
    }

    let what = if pool { "max pool" } else { "conv" };
    let sizes = format!(
        "the candidate's output is {got_h}x{got_w} where torch's is {want_h}x{want_w}, from a {input_h}x{input_w} input"
    );
    let geometry = format!(
        "this {what}: kernel {}, stride {}, padding {}",
        window.kernel, window.stride, window.padding
    );
    // The values, where a way recomputes them: padded so, or a pool with
    // another kernel.
    let recomputed = |how: &Recompute| -> Option<ArrayD<f32>> {
        match (how, stage.max_pool()) {
            (Recompute::Padded(pads), _) => {
                padded_windows(evidence, stage, &input, *pads, candidate.shape())
            }
            (Recompute::PoolKernel(kernel), Some(pool)) => {
                let other = resnet_core::ops::MaxPool2d {
                    kernel: *kernel,
                    ..*pool
                };
                evidence.run_max_pool(&other, &input, candidate.shape())
            }
            _ => None,
        }
    };
    for (name, how) in &ways {
        let Some(error) =
            recomputed(how).and_then(|values| evidence.reproduces(&values, candidate))
        else {
            continue;
        };
        return vec![Hint {
            hypothesis: Hypothesis::OutputSize,
            message: format!(
                "{sizes}: {name} gives that size and the candidate's values ({geometry})"
            ),
            relative_error: Some(error),
        }];
    }
    // A bottleneck strided in its 1x1 conv: the original ResNet's (v1).
    let v1 = !pool
        && window.kernel == 1
        && stage.name.ends_with(".conv1")
        && ways
            .iter()
            .any(|(name, _)| name.starts_with("a stride of 2"));
    let message = match ways.first() {
        Some(_) => format!(
            "{sizes}: {} gives that size ({geometry}){}{}",
            ways.iter()
                .map(|(name, _)| name.as_str())
                .collect::<Vec<_>>()
                .join(", or "),
            if ways.iter().any(|(_, how)| !matches!(how, Recompute::Not)) {
                "; recomputed so, the values are not the candidate's: more than that differs"
            } else {
                ""
            },
            if v1 {
                "; the original ResNet (v1) strides a bottleneck's 1x1 conv1, torchvision's (v1.5) its 3x3 conv2"
            } else {
                ""
            }
        ),
        None => format!(
            "{sizes}, which no usual convention, padding or stride gives ({}){}",
            named.join(", "),
            if got_h.abs_diff(want_h) <= 1 && got_w.abs_diff(want_w) <= 1 {
                ": an off-by-one in the output size"
            } else {
                ""
            }
        ),
    };
    vec![Hint {
        hypothesis: Hypothesis::OutputSize,
        message,
        relative_error: None,
    }]
}

/// The stage's windows run without padding of their own over `input`
/// padded `pads` (before, after; per axis) with zeros, or -inf for a max
/// pool (which never wins), shaped like `output_shape`.
fn padded_windows(
    evidence: &Evidence,
    stage: &resnet_core::Stage,
    input: &ArrayD<f32>,
    pads: [(usize, usize); 2],
    output_shape: &[usize],
) -> Option<ArrayD<f32>> {
    match (stage.conv(), stage.max_pool()) {
        (Some(conv), _) => {
            let padded = pad(input, pads, 0.0);
            evidence.run_conv(&conv.with_padding([0, 0]), &padded, output_shape)
        }
        (None, Some(pool)) => {
            let padded = pad(input, pads, f32::NEG_INFINITY);
            let unpadded = resnet_core::ops::MaxPool2d {
                padding: 0,
                ..*pool
            };
            evidence.run_max_pool(&unpadded, &padded, output_shape)
        }
        _ => None,
    }
}

/// How a way to another output size recomputes the stage's values.
enum Recompute {
    /// The input padded (before, after; per axis), the windows unpadded.
    Padded([(usize, usize); 2]),
    /// A max pool of another kernel.
    PoolKernel(usize),
    /// Not: another stride of a conv (its weights fix the rest).
    Not,
}

/// For a conv or max pool whose output has torch's size but other values:
/// whether TensorFlow-style SAME padding (the same windows started where
/// SAME's asymmetric padding starts them) reproduces it.
pub(super) fn same_padding_hints(
    evidence: &Evidence,
    index: usize,
    observed: &Observed,
) -> Vec<Hint> {
    let Some((stage, input, windows, pool)) = windowed(evidence, index) else {
        return Vec::new();
    };
    let &[_, _, input_h, input_w] = input.shape() else {
        return Vec::new();
    };
    // Per axis, SAME's padding before and after, where its size is torch's
    // and its padding is not torch's symmetric one.
    let mut pads = [(0usize, 0usize); 2];
    for (axis, (window, size)) in windows.iter().zip([input_h, input_w]).enumerate() {
        let (same_size, padding) = window.same(size);
        if Some(same_size) != window.torch(size, false) {
            return Vec::new();
        }
        pads[axis] = padding;
    }
    if pads
        .iter()
        .zip(&windows)
        .all(|(&(before, after), window)| before == window.padding && after == window.padding)
    {
        return Vec::new();
    }
    let Some(recomputed) =
        padded_windows(evidence, stage, &input, pads, observed.reference.shape())
    else {
        return Vec::new();
    };
    match evidence.explains(&recomputed, observed) {
        Some((Side::Candidate, error)) => vec![Hint {
            hypothesis: Hypothesis::SamePadding,
            message: format!(
                "the candidate matches this {} with TensorFlow-style SAME padding ({} row(s) on top and {} at the bottom, {} column(s) left and {} right) instead of torch's symmetric {}: pad symmetrically, as torch does",
                if pool { "max pool" } else { "conv" },
                pads[0].0,
                pads[0].1,
                pads[1].0,
                pads[1].1,
                windows[0].padding
            ),
            relative_error: Some(error),
        }],
        _ => Vec::new(),
    }
}

/// Where a padded row or column `i` (from `-padding` to `size + padding`)
/// reads from, for a `padding_mode`.
type PaddedSource = fn(isize, isize) -> isize;

/// For a conv whose output has torch's size but other values: whether its
/// border was padded another way than torch's zeros (`padding_mode`
/// 'reflect', 'replicate' or 'circular').
pub(super) fn padding_mode_hints(
    evidence: &Evidence,
    index: usize,
    observed: &Observed,
) -> Vec<Hint> {
    let Some((stage, input)) = evidence.stage_with_input(index) else {
        return Vec::new();
    };
    let Some(conv) = stage.conv() else {
        return Vec::new();
    };
    let [pad_h, pad_w] = conv.geometry().padding;
    let &[_, _, height, width] = input.shape() else {
        return Vec::new();
    };
    if (pad_h, pad_w) == (0, 0) || pad_h >= height || pad_w >= width {
        return Vec::new();
    }
    let modes: [(&str, &str, PaddedSource); 3] = [
        ("reflect", "mirrored", |i, size| {
            let period = 2 * (size - 1);
            let i = i.rem_euclid(period.max(1));
            if i < size {
                i
            } else {
                period - i
            }
        }),
        ("replicate", "repeated", |i, size| i.clamp(0, size - 1)),
        ("circular", "wrapped around", |i, size| i.rem_euclid(size)),
    ];
    let correct = evidence.run_conv(conv, &input, observed.reference.shape());
    for (mode, border, source) in modes {
        let shape = [
            input.shape()[0],
            input.shape()[1],
            height + 2 * pad_h,
            width + 2 * pad_w,
        ];
        let padded = ArrayD::from_shape_fn(&shape[..], |index| {
            let y = source(index[2] as isize - pad_h as isize, height as isize) as usize;
            let x = source(index[3] as isize - pad_w as isize, width as isize) as usize;
            input[[index[0], index[1], y, x]]
        });
        let Some(recomputed) = evidence.run_conv(
            &conv.with_padding([0, 0]),
            &padded,
            observed.reference.shape(),
        ) else {
            continue;
        };
        if correct
            .as_ref()
            .is_some_and(|correct| !evidence.distinct(&recomputed, correct))
        {
            continue;
        }
        if let Some((side, error)) = evidence.explains(&recomputed, observed) {
            return vec![Hint {
                hypothesis: Hypothesis::PaddingMode,
                message: format!(
                    "{} matches this conv with padding_mode='{mode}' (its border {border}), where torch pads zeros",
                    side.subject(),
                ),
                relative_error: Some(error),
            }];
        }
    }
    Vec::new()
}

/// `input` (NCHW) with `pads[0]` rows added above and below and `pads[1]`
/// columns left and right, set to `fill`.
fn pad(input: &ArrayD<f32>, pads: [(usize, usize); 2], fill: f32) -> ArrayD<f32> {
    let (height, width) = (input.shape()[2], input.shape()[3]);
    let shape = [
        input.shape()[0],
        input.shape()[1],
        height + pads[0].0 + pads[0].1,
        width + pads[1].0 + pads[1].1,
    ];
    let mut padded = ArrayD::from_elem(&shape[..], fill);
    padded
        .slice_each_axis_mut(|axis| match axis.axis.index() {
            2 => Slice::from(pads[0].0..pads[0].0 + height),
            3 => Slice::from(pads[1].0..pads[1].0 + width),
            _ => Slice::from(..),
        })
        .assign(input);
    padded
}

#[cfg(test)]
mod tests {
    use super::Window;

    fn window(kernel: usize, stride: usize, padding: usize) -> Window {
        Window {
            kernel,
            stride,
            padding,
            dilation: 1,
        }
    }

    #[test]
    fn the_conventions_give_the_sizes_torch_and_tensorflow_give() {
        let max_pool = window(3, 2, 1);
        // torch: floor((112 + 2 - 3) / 2) + 1 = 56; ceil_mode: 57.
        assert_eq!(max_pool.torch(112, false), Some(56));
        assert_eq!(max_pool.torch(112, true), Some(57));
        // At an odd size the two agree.
        assert_eq!(max_pool.torch(113, false), Some(57));
        assert_eq!(max_pool.torch(113, true), Some(57));
        // ceil_mode never starts a window in the right padding: 5 + 2 - 3 = 4,
        // ceil(4 / 2) + 1 = 3, and the third window starts at 4 < 5 + 1.
        assert_eq!(window(3, 2, 1).torch(5, true), Some(3));
        assert_eq!(window(2, 2, 0).torch(5, true), Some(3));
        assert_eq!(window(2, 2, 1).torch(4, true), Some(3));
        // SAME: ceil(in / stride), the smaller half of the padding first.
        let stem = window(7, 2, 3);
        assert_eq!(stem.same(224), (112, (2, 3)));
        assert_eq!(stem.same(225), (113, (3, 3)));
        assert_eq!(window(3, 2, 1).same(56), (28, (0, 1)));
        assert_eq!(window(1, 2, 0).same(56), (28, (0, 0)));
        assert_eq!(stem.valid(224), Some(109));
        assert_eq!(window(3, 1, 1).valid(2), None);
    }
}

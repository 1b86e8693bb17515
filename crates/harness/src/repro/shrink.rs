//! `verify repro --shrink`: the case cut down to what the worst output
//! element depends on: its input window (with the padding written out as
//! values, so that the cut op has none), the input channels of its group,
//! the one output channel's weights. A ResNet50 layer3 3x3 conv goes from
//! megabytes to kilobytes. What the element depends on as a whole (a
//! BatchNorm's batch statistics) is not cut.

use ndarray::{ArrayD, IxDyn, Slice};
use resnet_core::ops::{ConvGeometry, MaxPool2d};
use serde_json::json;

use super::{Case, CaseArrays, CoreOp};

/// The arrays cut to the worst element, and `case` updated to the cut op;
/// `Err` says why the stage is kept whole.
pub(super) fn shrink(
    case: &mut Case,
    arrays: &CaseArrays,
    worst: Option<&[usize]>,
    needs_whole_stage: Option<&str>,
) -> Result<CaseArrays, String> {
    if let Some(why) = needs_whole_stage {
        return Err(why.to_string());
    }
    let worst = worst.ok_or("no element is out of tolerance")?.to_vec();
    let element = |array: &ArrayD<f32>| -> Result<ArrayD<f32>, String> { at(array, &worst) };
    let (reference, candidate) = (element(&arrays.reference)?, element(&arrays.candidate)?);
    let input = arrays.inputs.first().ok_or("the stage has no input")?;
    let weight = |name: &str| {
        arrays
            .weights
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
    };
    let channel_of = |array: &ArrayD<f32>, channel: usize| {
        array
            .slice_axis(ndarray::Axis(0), Slice::from(channel..channel + 1))
            .to_owned()
    };
    let [n, c, h, w] = match worst[..] {
        [n, c, h, w] => [n, c, h, w],
        [n, c] => [n, c, 0, 0],
        _ => return Err("an output that is neither NCHW nor [N, C]".into()),
    };
    let mut weights = Vec::new();
    let inputs = match case.core.clone() {
        CoreOp::Conv2d { geometry } => {
            let ConvGeometry {
                kernel,
                stride,
                padding,
                dilation,
                groups,
            } = geometry;
            let conv_weight = weight("weight").ok_or("no conv weight")?;
            let (out_channels, in_per_group) = (conv_weight.shape()[0], conv_weight.shape()[1]);
            let group = c / (out_channels / groups);
            let channels = group * in_per_group..(group + 1) * in_per_group;
            let spans = [0, 1].map(|axis| dilation[axis] * (kernel[axis] - 1) + 1);
            let window = window(input, n, channels, [h, w], stride, padding, spans, 0.0);
            weights.push(("weight".to_string(), channel_of(conv_weight, c)));
            if let Some(bias) = weight("bias") {
                weights.push(("bias".to_string(), channel_of(bias, c)));
            }
            case.core = CoreOp::Conv2d {
                geometry: ConvGeometry {
                    padding: [0, 0],
                    groups: 1,
                    ..geometry
                },
            };
            let params = case.params.as_object_mut().ok_or("no torch parameters")?;
            params.insert("in_channels".into(), json!(in_per_group));
            params.insert("out_channels".into(), json!(1));
            params.insert("padding".into(), json!([0, 0]));
            params.insert("groups".into(), json!(1));
            vec![window]
        }
        CoreOp::MaxPool { pool } => {
            let MaxPool2d {
                kernel,
                stride,
                padding,
            } = pool;
            let window = window(
                input,
                n,
                c..c + 1,
                [h, w],
                [stride; 2],
                [padding; 2],
                [kernel; 2],
                f32::NEG_INFINITY,
            );
            case.core = CoreOp::MaxPool {
                pool: MaxPool2d { padding: 0, ..pool },
            };
            let params = case.params.as_object_mut().ok_or("no torch parameters")?;
            params.insert("padding".into(), json!(0));
            params.insert("ceil_mode".into(), json!(false));
            vec![window]
        }
        CoreOp::BatchNorm { .. } => {
            for name in ["weight", "bias", "running_mean", "running_var"] {
                let values = weight(name).ok_or_else(|| format!("no BatchNorm {name}"))?;
                weights.push((name.to_string(), channel_of(values, c)));
            }
            if let Some(params) = case.params.as_object_mut() {
                params.insert("num_features".into(), json!(1));
            }
            vec![at(input, &worst)?]
        }
        CoreOp::Relu | CoreOp::AddRelu | CoreOp::Identity => arrays
            .inputs
            .iter()
            .map(|input| at(input, &worst))
            .collect::<Result<_, _>>()?,
        CoreOp::AveragePool => {
            let map = input
                .slice_each_axis(|axis| match axis.axis.index() {
                    0 => Slice::from(n..n + 1),
                    1 => Slice::from(c..c + 1),
                    _ => Slice::from(..),
                })
                .to_owned();
            vec![map]
        }
        CoreOp::Linear => {
            let row = input
                .slice_axis(ndarray::Axis(0), Slice::from(n..n + 1))
                .to_owned();
            weights.push((
                "weight".to_string(),
                channel_of(weight("weight").ok_or("no weight")?, c),
            ));
            if let Some(bias) = weight("bias") {
                weights.push(("bias".to_string(), channel_of(bias, c)));
            }
            if let Some(params) = case.params.as_object_mut() {
                params.insert("out_features".into(), json!(1));
            }
            vec![row]
        }
    };
    let cut = CaseArrays {
        inputs,
        weights,
        reference,
        candidate,
    };
    // Still failing: the element kept is outside the rule.
    let (r, c) = (
        cut.reference.iter().next().copied().unwrap_or(0.0) as f64,
        cut.candidate.iter().next().copied().unwrap_or(0.0) as f64,
    );
    let error = (c - r).abs();
    if error.is_finite() && error <= case.tolerance.atol + case.tolerance.rtol * r.abs() {
        return Err("the element kept passes".into());
    }
    Ok(cut)
}

/// Element `index` of `array`, as an array of the same rank with every
/// axis of size 1.
fn at(array: &ArrayD<f32>, index: &[usize]) -> Result<ArrayD<f32>, String> {
    let value = *array
        .get(IxDyn(index))
        .ok_or("an input of another shape than the output")?;
    Ok(ArrayD::from_elem(IxDyn(&vec![1; array.ndim()]), value))
}

/// The input window under output element (`n`, `h`, `w`) of a strided
/// window op, over `channels`: `[1, channels, span_h, span_w]`, positions
/// outside the input set to `fill` (the op's padding, written out).
#[allow(clippy::too_many_arguments)]
fn window(
    input: &ArrayD<f32>,
    n: usize,
    channels: std::ops::Range<usize>,
    [h, w]: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    spans: [usize; 2],
    fill: f32,
) -> ArrayD<f32> {
    let (height, width) = (input.shape()[2], input.shape()[3]);
    let start = [h * stride[0], w * stride[1]];
    let mut window = ArrayD::from_elem(IxDyn(&[1, channels.len(), spans[0], spans[1]]), fill);
    for (to, channel) in channels.enumerate() {
        for y in 0..spans[0] {
            for x in 0..spans[1] {
                // Padded coordinates, back to the input's.
                let (row, column) = (start[0] + y, start[1] + x);
                if row >= padding[0] && column >= padding[1] {
                    let (row, column) = (row - padding[0], column - padding[1]);
                    if row < height && column < width {
                        window[[0, to, y, x]] = input[[n, channel, row, column]];
                    }
                }
            }
        }
    }
    window
}

//! A conv whose weights were read in the wrong order: torch stores them
//! OIHW; an implementation that flattens them and reads the numbers back as
//! OHWI (or HWIO, ...) without a transpose runs the right values in the
//! wrong places. The test recomputes the conv on the reference's input with
//! the weight data read in each other order, and with each kernel flipped.

use ndarray::{ArrayD, Ix4};

use super::axis_order::{order_name, other_orders, read_in_order, written_in_order, AxisOrder};
use super::batch_norm::{normalise, Parameters};
use super::{Evidence, Hint, Hypothesis, Observed, Side};

const OIHW: AxisOrder = [0, 1, 2, 3];

pub(super) fn hints(evidence: &Evidence, index: usize, observed: &Observed) -> Vec<Hint> {
    conv_hints(evidence, index, observed, None)
}

/// The same for a BatchNorm stage (`index`) whose conv the candidate folded
/// into it, as exporters and optimised engines do: it has no conv stage of
/// its own, so the conv's mistake shows here, through the BatchNorm.
pub(super) fn folded_hints(evidence: &Evidence, index: usize, observed: &Observed) -> Vec<Hint> {
    let Some(network) = evidence.network else {
        return Vec::new();
    };
    let module = &network.stages()[index].module;
    let (Some(&conv), Ok(p)) = (
        network.stage_input_indices(index).first(),
        Parameters::load(module, |name| evidence.weight(name).ok_or(())),
    ) else {
        return Vec::new();
    };
    let eps = network.architecture().batch_norm_eps_of(module);
    let batch_norm = |x: &ArrayD<f32>| normalise(x, &p.mean, &p.var, &p.weight, &p.bias, eps);
    conv_hints(evidence, conv, observed, Some(&batch_norm))
}

/// A BatchNorm a conv was folded into, applied to the conv's output.
type FoldedInto<'a> = &'a dyn Fn(&ArrayD<f32>) -> ArrayD<f32>;

/// The conv at `index` recomputed with its weights in every other order,
/// then through `folded_into`, if any.
fn conv_hints(
    evidence: &Evidence,
    index: usize,
    observed: &Observed,
    folded_into: Option<FoldedInto>,
) -> Vec<Hint> {
    let Some((stage, input)) = evidence.stage_with_input(index) else {
        return Vec::new();
    };
    let (Some(conv), Some(weight)) = (
        stage.conv(),
        evidence.weight(&format!("{}.weight", stage.module)),
    ) else {
        return Vec::new();
    };
    if weight.ndim() != 4 {
        return Vec::new();
    }
    let this_conv = match folded_into {
        Some(_) => format!("conv `{}` (folded into this BatchNorm)", stage.name),
        None => "this conv".to_string(),
    };
    // The conv with the given weights (OIHW) on the reference's input, then
    // through the BatchNorm it was folded into, if any.
    let computed = |conv: &resnet_core::ops::Conv2d| {
        let output = evidence.run_conv(conv, &input, observed.reference.shape())?;
        Some(match folded_into {
            Some(batch_norm) => batch_norm(&output),
            None => output,
        })
    };
    // What the conv computes with its weights as they are: a reordering
    // that changes nothing here (a symmetric kernel, a 1x1 conv's HW)
    // explains nothing.
    let Some(correct) = computed(conv) else {
        return Vec::new();
    };
    let buffer: Vec<f32> = weight.iter().copied().collect();
    for order in other_orders(weight.shape(), OIHW) {
        let name = order_name(order, "OIHW");
        // The weights read in `order` (the mistake made), or written in
        // `order` and read as OIHW (the mistake undone).
        let attempts = [
            (read_in_order(&buffer, weight.shape(), order), true),
            (written_in_order(&weight, order), false),
        ];
        for (reordered, misread) in attempts {
            let Some(reordered) = reordered.and_then(|w| w.into_dimensionality::<Ix4>().ok())
            else {
                continue;
            };
            let Some(output) = computed(&conv.with_oihw_weight(reordered.view())) else {
                continue;
            };
            if !evidence.distinct(&output, &correct) {
                continue;
            }
            let Some((side, error)) = evidence.explains(&output, observed) else {
                continue;
            };
            let message = match (side, misread) {
                (Side::Candidate, true) => format!(
                    "the candidate matches {this_conv} with its OIHW weights read as {name}: the weight data was reshaped without a transpose"
                ),
                (Side::Candidate, false) => format!(
                    "the candidate matches {this_conv} with its weights transposed to {name} and the data read as OIHW: a transpose without a reshape"
                ),
                (Side::Reference, true) => format!(
                    "the reference matches {this_conv} with the dump's weights read as {name}: the dump's weights are the reference's in another axis order"
                ),
                (Side::Reference, false) => format!(
                    "the reference matches {this_conv} with the dump's weights transposed to {name} and read as OIHW: the dump holds the reference's OIHW weights read as {name}"
                ),
            };
            return vec![Hint {
                hypothesis: Hypothesis::WeightOrder,
                message,
                relative_error: Some(error),
            }];
        }
    }
    // Each kernel rotated 180 degrees: a true convolution, where torch (as
    // every deep-learning framework) computes a cross-correlation.
    let Ok(weight) = weight.into_dimensionality::<Ix4>() else {
        return Vec::new();
    };
    if weight.shape()[2] * weight.shape()[3] > 1 {
        let flipped = weight.slice(ndarray::s![.., .., ..;-1, ..;-1]).to_owned();
        let output = computed(&conv.with_oihw_weight(flipped.view()))
            .filter(|output| evidence.distinct(output, &correct));
        if let Some((side, error)) = output.and_then(|output| evidence.explains(&output, observed))
        {
            return vec![Hint {
                hypothesis: Hypothesis::FlippedKernel,
                message: format!(
                    "{} matches {this_conv} with each kernel rotated 180 degrees: a convolution, where torch computes a cross-correlation (no flip)",
                    side.subject()
                ),
                relative_error: Some(error),
            }];
        }
    }
    Vec::new()
}

//! `verify case DIR`: the core on a bundle's stage alone, from the bundle's
//! own inputs and weights, judged with the bundle's rule; and the stored
//! candidate judged again, so that the bundle is a regression test for the
//! core as well as a report for the engine's author.

use std::path::Path;

use ndarray::{ArrayD, Ix2, Ix4};
use resnet_core::ops::{self, BatchNorm, Conv2d, ConvGeometry, Linear};
use resnet_core::weights::{conv_weight_from_oihw, linear_weight_from_torch};
use resnet_core::Tensor;
use resnet_dump::npy;

use super::{Case, CoreOp};
use crate::layout::{candidate_nchw, reference_tensor};
use crate::metrics::{compare_for_report, Comparison, Verdict};
use crate::tolerance::StageTolerance;
use crate::{AbsoluteTolerance, Tolerance, VerifyError};

/// What `verify case` found.
#[derive(Debug)]
pub struct CaseOutcome {
    pub case: Case,
    /// The core against the bundle's reference output.
    pub core: Comparison,
    /// The bundle's candidate output against it.
    pub candidate: Comparison,
}

impl CaseOutcome {
    pub fn message(&self) -> String {
        let line = |who: &str, c: &Comparison| {
            format!(
                "{who}: {} ({} of {} elements out of tolerance, max abs error {:.3e}, relative {:.3e})",
                if c.verdict == Verdict::Succ { "succ" } else { "fail" },
                c.mismatched,
                c.elements,
                c.max_abs_error,
                c.relative_error
            )
        };
        let v = &self.case.verdict;
        format!(
            "case {} ({}), |cand - ref| <= {:e} + {:e} * |ref|\n{}\n{}\nverify said: {} ({} of {}, max abs error {:.3e})\n",
            self.case.stage,
            self.case.module_type,
            self.case.tolerance.atol,
            self.case.tolerance.rtol,
            line("the core", &self.core),
            line("the stored candidate", &self.candidate),
            v.verdict,
            v.mismatched,
            v.elements,
            v.max_abs_error
        )
    }
}

pub fn run_case(dir: &Path) -> Result<CaseOutcome, VerifyError> {
    let bad = |reason: String| VerifyError::Mismatch {
        dump: dir.join("case.json"),
        reason,
    };
    let text = std::fs::read_to_string(dir.join("case.json")).map_err(|error| {
        bad(format!(
            "{error} (a directory written by `verify repro` has one)"
        ))
    })?;
    let case: Case = serde_json::from_str(&text).map_err(|error| bad(error.to_string()))?;
    let load = |file: &str| -> Result<ArrayD<f32>, VerifyError> {
        Ok(npy::read_f32(&dir.join(file))?.data)
    };
    let inputs: Vec<ArrayD<f32>> = case
        .inputs
        .iter()
        .map(|file| load(file))
        .collect::<Result<_, _>>()?;
    let weight = |name: &str| -> Result<ArrayD<f32>, VerifyError> {
        let file = case
            .weights
            .get(name)
            .ok_or_else(|| bad(format!("no weight `{name}` for {}", case.stage)))?;
        load(file)
    };
    let reference = load(&case.reference)?;
    let candidate = load(&case.candidate)?;
    let tensors: Vec<Tensor> = inputs
        .iter()
        .map(|input| reference_tensor(input.view()))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("an input that is not NCHW".into()))?;
    let shape_error = |error: ops::ShapeError| bad(error.to_string());
    let first = tensors.first().ok_or_else(|| bad("no input".into()))?;
    let output = match &case.core {
        CoreOp::Conv2d { geometry } => {
            let ConvGeometry {
                kernel,
                stride,
                dilation,
                groups,
                ..
            } = geometry;
            let w = weight("weight")?
                .into_dimensionality::<Ix4>()
                .map_err(|_| bad("the conv weight is not 4-D (OIHW)".into()))?;
            let bias = match case.weights.contains_key("bias") {
                true => Some(weight("bias")?.iter().copied().collect()),
                false => None,
            };
            let (out_channels, in_per_group) = (w.shape()[0], w.shape()[1]);
            if w.shape()[2..] != kernel[..] || *groups == 0 || out_channels % groups != 0 {
                return Err(bad(
                    "the conv weight does not fit the case's kernel and groups".into(),
                ));
            }
            if stride.contains(&0) || dilation.contains(&0) || kernel.contains(&0) {
                return Err(bad("a conv stride, dilation or kernel of 0".into()));
            }
            if bias
                .as_ref()
                .is_some_and(|bias: &Vec<f32>| bias.len() != out_channels)
            {
                return Err(bad(
                    "a conv bias of another length than the output channels".into(),
                ));
            }
            let weights = conv_weight_from_oihw(w.view(), *groups);
            Conv2d::new(
                in_per_group * groups,
                out_channels,
                *geometry,
                weights,
                bias,
            )
            .forward(first)
            .map_err(shape_error)?
        }
        CoreOp::BatchNorm { eps } => {
            let values = |name: &str| -> Result<Vec<f32>, VerifyError> {
                Ok(weight(name)?.iter().copied().collect())
            };
            let (w, b, mean, var) = (
                values("weight")?,
                values("bias")?,
                values("running_mean")?,
                values("running_var")?,
            );
            if [b.len(), mean.len(), var.len()]
                .iter()
                .any(|&len| len != w.len())
            {
                return Err(bad("BatchNorm parameters of different lengths".into()));
            }
            BatchNorm::from_running_statistics(&w, &b, &mean, &var, *eps)
                .forward(first)
                .map_err(shape_error)?
        }
        CoreOp::Relu => ops::relu(first),
        CoreOp::AddRelu => {
            let identity = tensors
                .get(1)
                .ok_or_else(|| bad("a residual add needs two inputs".into()))?;
            ops::add_relu(first, identity).map_err(shape_error)?
        }
        CoreOp::MaxPool { pool } => pool.forward(first).map_err(shape_error)?,
        CoreOp::AveragePool => ops::adaptive_average_pool_1x1(first),
        CoreOp::Linear => {
            let w = weight("weight")?
                .into_dimensionality::<Ix2>()
                .map_err(|_| bad("the linear weight is not 2-D".into()))?;
            let bias = match case.weights.contains_key("bias") {
                true => weight("bias")?.iter().copied().collect(),
                false => vec![0.0; w.shape()[0]],
            };
            let (out_features, in_features) = (w.shape()[0], w.shape()[1]);
            if bias.len() != out_features {
                return Err(bad(
                    "a linear bias of another length than the output features".into(),
                ));
            }
            if first.nchw_shape()[1] * first.height() * first.width() != in_features {
                return Err(bad("the linear weight does not fit the input".into()));
            }
            Linear::new(
                in_features,
                out_features,
                linear_weight_from_torch(w.view()),
                bias,
            )
            .forward(first)
            .map_err(shape_error)?
        }
        CoreOp::Identity => first.clone(),
    };
    let core = candidate_nchw(&output, reference.shape()).ok_or_else(|| {
        bad(format!(
            "the core's output {:?} is not the reference's {:?}",
            output.nchw_shape(),
            reference.shape()
        ))
    })?;
    let rule = StageTolerance {
        tolerance: Tolerance {
            rtol: case.tolerance.rtol,
            atol: AbsoluteTolerance::Fixed(case.tolerance.atol),
            equal_nan: case.tolerance.equal_nan,
        },
        auto_unit: None,
        auto_ceiling: None,
    };
    let judge = |array: &ArrayD<f32>| -> Result<Comparison, VerifyError> {
        if array.shape() != reference.shape() {
            return Err(bad(format!(
                "{:?} is not the reference's shape {:?}",
                array.shape(),
                reference.shape()
            )));
        }
        let (array, reference) = (array.as_standard_layout(), reference.as_standard_layout());
        Ok(compare_for_report(
            reference.as_slice().expect("standard layout"),
            array.as_slice().expect("standard layout"),
            reference.shape(),
            &rule,
        ))
    };
    Ok(CaseOutcome {
        core: judge(&core)?,
        candidate: judge(&candidate)?,
        case,
    })
}

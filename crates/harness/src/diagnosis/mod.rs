//! Why a stage failed. A wall of `fail` lines says that something is wrong,
//! not what; but the classic mistakes of a hand-written network each leave a
//! signature in the data. For a failing stage, every hypothesis below is
//! tested on what the run already has (the stage's reference inputs and
//! output, the candidate's output, the weights and the manifest) by
//! recomputing the stage with the mistake made, and comparing under the
//! run's own tolerance. Each hypothesis that reproduces the data becomes a
//! [`Hint`], with the error it reproduces it to as evidence.
//! docs/diagnosis.md lists them.

mod activation;
pub(crate) mod axis_order;
pub(crate) mod batch_norm;
mod linear;
mod origin;
mod padding;
mod pooling;
mod preprocessing;
mod residual;
mod weight_order;

use std::rc::Rc;

use ndarray::ArrayD;
use resnet_core::{Network, Stage, StageKind};
use resnet_dump::{Dump, StageEntry};
use serde::Serialize;

use crate::layout::{candidate_nchw, reference_tensor};
use crate::metrics::{compare, Comparison, Verdict};
use crate::reference_stages::ReferenceStages;
use crate::tolerance::AbsoluteTolerance;
use crate::{Tolerance, ToleranceRule};

pub use origin::{origin, Origin};

/// The hypotheses, as the JSON report names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hypothesis {
    /// The candidate's values are the reference's with the axes in another order.
    Layout,
    /// A conv computed with its weight data read in another axis order.
    WeightOrder,
    /// BatchNorm normalised with the batch's own mean and variance.
    BatchStatistics,
    /// BatchNorm with another eps.
    BatchNormEps,
    /// BatchNorm's weight and bias swapped, or one of them missing.
    BatchNormAffine,
    /// BatchNorm's running_mean and running_var swapped.
    BatchNormStatisticsSwapped,
    MissingRelu,
    ExtraRelu,
    /// Another activation where torch has a ReLU (LeakyReLU, ReLU6, ...).
    OtherActivation,
    /// A block's `+ identity` left out.
    MissingResidual,
    /// A stage computed as the identity: its input passed on.
    SkippedStage,
    /// A conv's border padded another way than zeros (reflect, replicate,
    /// circular).
    PaddingMode,
    /// A Linear's weight untransposed, or its bias left out.
    LinearLayout,
    /// A conv's kernels rotated 180 degrees (convolution, not correlation).
    FlippedKernel,
    /// `relu(branch) + identity`: the block's ReLU before its add.
    ReluBeforeAdd,
    /// A block's downsample path (or its BatchNorm) left out.
    SkippedDownsample,
    /// The input image normalised or scaled differently.
    Preprocessing,
    /// A conv or max pool padded TensorFlow's way ("SAME": more at the
    /// bottom and right) instead of torch's symmetric padding.
    SamePadding,
    /// A pool of another kind: an average where torch takes the max; a
    /// max, a sum or a fixed 7x7 window where it averages the map; a
    /// downsample average-pooled before its conv (ResNet-D).
    OtherPooling,
    /// An output of another height or width: the convention that gives it
    /// (max pooling's ceil_mode, SAME, no padding), or none.
    OutputSize,
}

/// One hypothesis that holds, with its evidence.
#[derive(Clone, Debug, Serialize)]
pub struct Hint {
    pub hypothesis: Hypothesis,
    /// What holds and what to look at, in one sentence.
    pub message: String,
    /// How closely the hypothesis reproduces the data: max|err|/max|x| of
    /// the recomputation against the side it explains; `None` (JSON null)
    /// for a hint read off the output's size alone, with no values
    /// recomputed.
    pub relative_error: Option<f64>,
}

/// Which side of the comparison a hypothesis explains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Candidate,
    Reference,
}

impl Side {
    pub fn subject(self) -> &'static str {
        match self {
            Side::Candidate => "the candidate",
            Side::Reference => "the reference",
        }
    }
}

/// A failing stage's two outputs, NCHW, of the same shape.
pub(crate) struct Observed<'a> {
    pub reference: &'a ArrayD<f32>,
    pub candidate: &'a ArrayD<f32>,
    /// The candidate's largest error against the reference, computed once.
    unexplained: std::cell::OnceCell<Option<f64>>,
}

impl<'a> Observed<'a> {
    pub fn new(reference: &'a ArrayD<f32>, candidate: &'a ArrayD<f32>) -> Self {
        Observed {
            reference,
            candidate,
            unexplained: std::cell::OnceCell::new(),
        }
    }
}

/// What the hypotheses may consult: the reference dump (stage outputs,
/// weights, manifest), the network's stage graph, and the run's tolerance.
pub(crate) struct Evidence<'a> {
    /// The reference's stages, shared with the rest of the run.
    pub stages: &'a ReferenceStages<'a>,
    pub dump: &'a Dump,
    pub network: Option<&'a Network>,
    /// The run's tolerance for the stage diagnosed, with NaN matching NaN:
    /// a recomputation that makes NaN where the data has NaN reproduces it.
    tolerance: Tolerance,
    /// The run's rule, for a hypothesis that checks another stage.
    rule: ToleranceRule,
}

impl<'a> Evidence<'a> {
    /// Evidence judged by `rule`'s tolerance for stage `entry`.
    pub fn new(stages: &'a ReferenceStages<'a>, rule: &ToleranceRule, entry: &StageEntry) -> Self {
        Evidence {
            stages,
            dump: stages.dump(),
            network: stages.network(),
            tolerance: tolerance_at(rule, entry),
            rule: *rule,
        }
    }

    /// The same evidence, judged by the tolerance of another stage (under
    /// `--tol auto` each stage's floor is its own).
    pub fn at(&self, entry: &StageEntry) -> Evidence<'a> {
        Evidence {
            tolerance: tolerance_at(&self.rule, entry),
            ..*self
        }
    }

    /// Every hypothesis that explains why stage `name` failed. Best effort:
    /// a hypothesis that lacks what it needs (a weight, a stage the
    /// reference did not store) is skipped, never an error. `absent`: the
    /// stages the candidate does not have (a conv folded into its BatchNorm).
    pub fn diagnose(&self, name: &str, observed: &Observed, absent: &[String]) -> Vec<Hint> {
        if self.unexplained(observed).is_none() {
            return Vec::new();
        }
        let Some((network, index)) = self
            .network
            .and_then(|network| Some((network, network.stage_index(name).ok()?)))
        else {
            return activation::hints(self, observed, None);
        };
        let stage = &network.stages()[index];
        // A ReLU's input is what a ReLU left out leaves: a block's last
        // ReLU's, `branch + identity` (added in float32, as torch adds).
        let relu_input: Option<Rc<ArrayD<f32>>> = match *network.stage_input_indices(index) {
            _ if stage.kind != StageKind::ReLU => None,
            [producer] => self.reference_output(producer),
            [branch, identity] => {
                let (branch, identity) = (
                    self.reference_output(branch),
                    self.reference_output(identity),
                );
                match (branch, identity) {
                    (Some(branch), Some(identity)) if branch.shape() == identity.shape() => {
                        Some(Rc::new(&*branch + &*identity))
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let mut hints = activation::hints(self, observed, relu_input.as_deref());
        match stage.kind {
            StageKind::Input => hints.extend(preprocessing::hints(self, observed)),
            StageKind::Conv2d => {
                hints.extend(weight_order::hints(self, index, observed));
                hints.extend(padding::same_padding_hints(self, index, observed));
                hints.extend(padding::padding_mode_hints(self, index, observed));
                hints.extend(pooling::downsample_hints(self, index, observed));
            }
            StageKind::MaxPool2d => {
                hints.extend(padding::same_padding_hints(self, index, observed));
                hints.extend(pooling::hints(self, index, observed));
            }
            StageKind::AdaptiveAvgPool2d => hints.extend(pooling::hints(self, index, observed)),
            StageKind::Linear => hints.extend(linear::hints(self, index, observed)),
            StageKind::BatchNorm2d => {
                hints.extend(batch_norm::hints(self, index, observed));
                let conv = network.stage_inputs(index).next();
                if conv.is_some_and(|conv| {
                    conv.kind == StageKind::Conv2d && absent.contains(&conv.name)
                }) {
                    hints.extend(weight_order::folded_hints(self, index, observed));
                }
            }
            _ => {}
        }
        if network.stage_input_indices(index).len() == 2 {
            hints.extend(residual::hints(self, index, observed));
        }
        // Nothing more particular: the stage left out (its input passed on).
        let single_input = network.stage_input_indices(index).len() == 1;
        if hints.is_empty() && single_input && stage.kind != StageKind::ReLU {
            // Not where the stage is the identity on this data (a pool over
            // a 1x1 map, a Dropout in eval mode).
            let input = self
                .reference_input(index)
                .filter(|input| self.distinct(input, observed.reference));
            if let Some(input) = input {
                if let Some((Side::Candidate, error)) = self.explains(&input, observed) {
                    let producer = network.stage_inputs(index).next().map(|s| s.name.as_str());
                    hints.push(Hint {
                        hypothesis: Hypothesis::SkippedStage,
                        message: format!(
                            "the candidate equals this stage's input ({}): the stage was skipped",
                            producer.unwrap_or("its producer")
                        ),
                        relative_error: Some(error),
                    });
                }
            }
        }
        hints
    }

    /// Why stage `name`'s candidate output has another shape than the
    /// reference's, where a size convention explains it.
    pub fn diagnose_size(
        &self,
        name: &str,
        reference_shape: &[usize],
        candidate: &ArrayD<f32>,
    ) -> Vec<Hint> {
        match self
            .network
            .and_then(|network| network.stage_index(name).ok())
        {
            Some(index) => padding::size_hints(self, index, reference_shape, candidate),
            None => Vec::new(),
        }
    }

    /// The relative error to which `recomputed` reproduces `observed`, if
    /// it does within the tolerance.
    pub fn reproduces(&self, recomputed: &ArrayD<f32>, observed: &ArrayD<f32>) -> Option<f64> {
        let comparison = self.fit(recomputed, observed)?;
        (comparison.verdict == Verdict::Succ).then_some(comparison.relative_error)
    }

    /// `recomputed` held against `observed` under the tolerance (`None`
    /// for another shape).
    fn fit(&self, recomputed: &ArrayD<f32>, observed: &ArrayD<f32>) -> Option<Comparison> {
        if recomputed.shape() != observed.shape() {
            return None;
        }
        let observed = observed.as_standard_layout();
        let recomputed = recomputed.as_standard_layout();
        Some(compare(
            observed.as_slice()?,
            recomputed.as_slice()?,
            observed.shape(),
            &self.tolerance,
        ))
    }

    /// Which side `recomputed` reproduces: the candidate first (the usual
    /// suspect), else the reference.
    pub fn explains(&self, recomputed: &ArrayD<f32>, observed: &Observed) -> Option<(Side, f64)> {
        [
            (Side::Candidate, observed.candidate),
            (Side::Reference, observed.reference),
        ]
        .into_iter()
        .find_map(|(side, data)| Some((side, self.explains_side(recomputed, data, observed)?)))
    }

    /// The relative error to which `recomputed` reproduces `data` (one side
    /// of `observed`), if it does within the tolerance and clearly better
    /// than nothing wrong at all: its largest error at most half the
    /// candidate's against the reference. A stage failing by a hair (an
    /// error grown from a bug upstream) is within tolerance of many a
    /// hypothesis with a free parameter, none of them the cause: an eps
    /// solved from the data named a BatchNorm two layers past the one
    /// that left eps out.
    pub fn explains_side(
        &self,
        recomputed: &ArrayD<f32>,
        data: &ArrayD<f32>,
        observed: &Observed,
    ) -> Option<f64> {
        let unexplained = self.unexplained(observed)?;
        let fit = self.fit(recomputed, data)?;
        (fit.verdict == Verdict::Succ && fit.max_abs_error <= unexplained / 2.0)
            .then_some(fit.relative_error)
    }

    /// The candidate's largest error against the reference as the
    /// hypotheses see it (NaN matching NaN), if there is one to explain:
    /// outputs that differ only where both are NaN (a run without
    /// `--equal-nan`) leave nothing for a hypothesis, and every exact one
    /// would 'explain' them.
    fn unexplained(&self, observed: &Observed) -> Option<f64> {
        let error = *observed
            .unexplained
            .get_or_init(|| {
                self.fit(observed.reference, observed.candidate)
                    .map(|comparison| comparison.max_abs_error)
            })
            .as_ref()?;
        (error > 0.0).then_some(error)
    }

    /// Whether a hypothesis's recomputation can be told from the correct
    /// one on this data: with weight 1, bias 0 or var 1, say, "weight
    /// missing" or "var used as std" computes the same thing, and would
    /// 'explain' a correct reference.
    pub fn distinct(&self, recomputed: &ArrayD<f32>, correct: &ArrayD<f32>) -> bool {
        self.reproduces(recomputed, correct).is_none()
    }

    /// The reference's output of stage `index` of the network, NCHW.
    pub fn reference_output(&self, index: usize) -> Option<Rc<ArrayD<f32>>> {
        let name = &self.network?.stages()[index].name;
        self.reference_named(name)
    }

    pub fn reference_named(&self, name: &str) -> Option<Rc<ArrayD<f32>>> {
        Some(self.stages.named(name)?.ok()?.data)
    }

    /// Stage `index` of the network, with the reference's (single) input
    /// to it: what most hypotheses recompute from.
    pub fn stage_with_input(&self, index: usize) -> Option<(&'a Stage, Rc<ArrayD<f32>>)> {
        Some((&self.network?.stages()[index], self.reference_input(index)?))
    }

    /// The reference's (single) input to stage `index`.
    pub fn reference_input(&self, index: usize) -> Option<Rc<ArrayD<f32>>> {
        let &producer = self.network?.stage_input_indices(index).first()?;
        self.reference_output(producer)
    }

    pub fn weight(&self, name: &str) -> Option<ArrayD<f32>> {
        self.dump.load_weight(name).ok().flatten()
    }

    /// Runs `conv` (a stage's conv with other weights, say) on an NCHW
    /// input, and returns its output NCHW, shaped like `output_shape`.
    pub fn run_conv(
        &self,
        conv: &resnet_core::ops::Conv2d,
        input: &ArrayD<f32>,
        output_shape: &[usize],
    ) -> Option<ArrayD<f32>> {
        let tensor = reference_tensor(input.view())?;
        let output = conv.forward(&tensor).ok()?;
        candidate_nchw(&output, output_shape)
    }
}

impl Evidence<'_> {
    /// Runs a max pool on an NCHW input, as [`Evidence::run_conv`] a conv.
    pub fn run_max_pool(
        &self,
        pool: &resnet_core::ops::MaxPool2d,
        input: &ArrayD<f32>,
        output_shape: &[usize],
    ) -> Option<ArrayD<f32>> {
        let tensor = reference_tensor(input.view())?;
        let output = pool.forward(&tensor).ok()?;
        candidate_nchw(&output, output_shape)
    }
}

/// The hypotheses' tolerance at stage `entry`: the run's own for that
/// stage, with NaN matching NaN. (Under auto it was once the default rtol
/// 1e-4: looser than a float32 stage's floor, so that a stage failing by a
/// hair, an error grown from a bug upstream, was 'reproduced' by an eps
/// solved from the data; and tighter than a bfloat16 candidate's roundoff,
/// so that no hint ever fired for one.)
///
/// Under auto the floor's atol is relative to the stage's own scale, as a
/// fraction of it: a hypothesis that explains the candidate is held to the
/// candidate's magnitude (an input scaled 0-255 is 400 times the
/// reference's, and its rounding too; held to the reference's atol, the
/// 0-255 hint never fired under auto).
fn tolerance_at(rule: &ToleranceRule, entry: &StageEntry) -> Tolerance {
    let tolerance = match rule.for_stage(&entry.name, entry.floor.as_ref()) {
        Ok(stage) => match (stage.auto_unit, entry.floor.as_ref()) {
            (Some(_), Some(floor)) if floor.scale > 0.0 => Tolerance {
                atol: AbsoluteTolerance::ScaleRelative(
                    stage.tolerance.atol_for(floor.scale) / floor.scale,
                ),
                ..stage.tolerance
            },
            _ => stage.tolerance,
        },
        // A stage without a floor under auto: the default.
        Err(_) => Tolerance::default(),
    };
    Tolerance {
        equal_nan: true,
        ..tolerance
    }
}

/// torch's ReLU element by element (NaN kept), as the core computes it.
pub(crate) fn relu(values: &ArrayD<f32>) -> ArrayD<f32> {
    values.mapv(resnet_core::ops::relu_value)
}

/// Whether any element is below zero (a ReLU would change it).
pub(crate) fn has_negatives(values: &ArrayD<f32>) -> bool {
    values.iter().any(|&v| v < 0.0)
}

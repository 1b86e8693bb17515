//! Was the reference dumped in eval mode? A reference captured without
//! `model.eval()` normalises with each batch's own statistics; an
//! implementation with the same mistake then matches it perfectly and the
//! comparison says succ for a wrong network. So this is checked before any
//! comparison, in two ways: what the manifest says, and what the data
//! says. For the first BatchNorm stages, the reference's output is
//! recomputed from the reference's input both ways, with the running
//! statistics and with the batch's own; whichever reproduces the stored
//! output tells the mode the reference really ran in.

use ndarray::ArrayD;
use resnet_core::{Network, StageKind, WeightSource};
use resnet_dump::{Dump, Mode};
use serde::Serialize;

use crate::diagnosis::batch_norm::{channel_statistics, normalise, Parameters};
use crate::layout::load_nchw;
use crate::VerifyError;

/// BatchNorm stages examined; the first few are enough and are the cheapest
/// to tell apart (large maps, many samples per channel).
const STAGES_EXAMINED: usize = 3;
/// A recomputation within this relative error reproduces the reference.
const REPRODUCES: f64 = 1e-3;

#[derive(Clone, Debug, Serialize)]
pub struct BatchNormEvidence {
    pub stage: String,
    /// max|recomputed - ref| / max|ref| with the running statistics (eval).
    pub running_statistics_error: f64,
    /// The same with the batch's own statistics (train).
    pub batch_statistics_error: f64,
}

impl BatchNormEvidence {
    pub fn shows_train_mode(&self) -> bool {
        self.batch_statistics_error < REPRODUCES
            && self.batch_statistics_error * 10.0 < self.running_statistics_error
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ReferenceCheck {
    pub manifest_mode: Mode,
    pub evidence: Vec<BatchNormEvidence>,
    /// True when the manifest says train, or the data shows batch statistics.
    pub train_mode: bool,
}

impl ReferenceCheck {
    pub fn message(&self) -> Option<String> {
        if !self.train_mode {
            return None;
        }
        let mut reasons = Vec::new();
        if self.manifest_mode == Mode::Train {
            reasons.push("its manifest records mode \"train\"".to_string());
        }
        let shown: Vec<_> = self
            .evidence
            .iter()
            .filter(|e| e.shows_train_mode())
            .collect();
        if !shown.is_empty() {
            let stages: Vec<String> = shown
                .iter()
                .map(|e| {
                    format!(
                        "{} (batch stats reproduce it to {:.1e}, running stats only to {:.1e})",
                        e.stage, e.batch_statistics_error, e.running_statistics_error
                    )
                })
                .collect();
            reasons.push(format!(
                "its BatchNorm outputs were computed with batch statistics: {}",
                stages.join("; ")
            ));
        }
        Some(format!(
            "THE REFERENCE WAS DUMPED IN TRAIN MODE: {}. Its BatchNorms used the statistics of the batch, not running_mean/running_var, so it is not what the model computes at inference, and an implementation with the same mistake would match it. Dump it again after model.eval(), or pass --allow-train-reference to compare anyway.",
            reasons.join(", and ")
        ))
    }
}

pub fn check_reference(dump: &Dump, network: &Network) -> Result<ReferenceCheck, VerifyError> {
    let manifest = dump.manifest();
    let weights = dump.weights();
    let mut evidence = Vec::new();
    for (index, stage) in network.stages().iter().enumerate() {
        if evidence.len() == STAGES_EXAMINED {
            break;
        }
        if stage.kind != StageKind::BatchNorm2d {
            continue;
        }
        let Some(producer) = network.stage_inputs(index).next() else {
            continue;
        };
        let (Some(input_entry), Some(output_entry)) =
            (dump.stage(&producer.name), dump.stage(&stage.name))
        else {
            continue;
        };
        let input = load_nchw(dump, input_entry)?;
        let output = load_nchw(dump, output_entry)?;
        if input.ndim() != 4 || input.shape() != output.shape() {
            continue;
        }
        let parameters =
            Parameters::load(&stage.module, |name| weights.weight(name)).map_err(|source| {
                VerifyError::Core {
                    dump: dump.root().to_path_buf(),
                    source,
                }
            })?;
        let Parameters {
            weight,
            bias,
            mean,
            var,
        } = &parameters;
        let eps = network.architecture().batch_norm_eps;
        let (batch_mean, batch_var) = channel_statistics(&input);
        evidence.push(BatchNormEvidence {
            stage: stage.name.clone(),
            running_statistics_error: relative_error(
                &normalise(&input, mean, var, weight, bias, eps),
                &output,
            ),
            batch_statistics_error: relative_error(
                &normalise(&input, &batch_mean, &batch_var, weight, bias, eps),
                &output,
            ),
        });
    }
    let shown = evidence.iter().filter(|e| e.shows_train_mode()).count();
    let train_mode = manifest.mode == Mode::Train || (shown > 0 && shown * 2 >= evidence.len());
    Ok(ReferenceCheck {
        manifest_mode: manifest.mode,
        evidence,
        train_mode,
    })
}

/// max|recomputed - output| / max|output|.
fn relative_error(recomputed: &ArrayD<f32>, output: &ArrayD<f32>) -> f64 {
    let (mut max_error, mut scale) = (0f64, 0f64);
    for (&r, &y) in recomputed.iter().zip(output.iter()) {
        max_error = max_error.max((r as f64 - y as f64).abs());
        scale = scale.max((y as f64).abs());
    }
    max_error / scale.max(f32::MIN_POSITIVE as f64)
}

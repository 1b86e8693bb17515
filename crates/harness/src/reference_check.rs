//! Was the reference dumped in eval mode? A reference captured without
//! `model.eval()` normalises with each batch's own statistics; an
//! implementation with the same mistake then matches it perfectly and the
//! comparison says succ for a wrong network. So this is checked before any
//! comparison, in two ways: what the manifest says, and what the data
//! says. For every BatchNorm stage, the reference's output is
//! recomputed from the reference's input both ways, with the running
//! statistics and with the batch's own; whichever reproduces the stored
//! output tells the mode the reference really ran in.

use ndarray::ArrayD;
use rayon::prelude::*;
use resnet_core::{Network, StageKind, WeightSource};
use resnet_dump::Mode;
use serde::Serialize;

use crate::adapter::DumpWeights;
use crate::diagnosis::batch_norm::Parameters;
use crate::recomputation::{Normalisation, PlaneErrors};
use crate::reference_stages::ReferenceStages;
use crate::report::abbreviate;
use crate::vectors::Vectors;
use crate::VerifyError;

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
            const DETAILED: usize = 3;
            let mut stages: Vec<String> = shown
                .iter()
                .take(DETAILED)
                .map(|e| {
                    format!(
                        "{} (batch stats reproduce it to {:.1e}, running stats only to {:.1e})",
                        e.stage, e.batch_statistics_error, e.running_statistics_error
                    )
                })
                .collect();
            if shown.len() > DETAILED {
                let rest: Vec<String> = shown[DETAILED..].iter().map(|e| e.stage.clone()).collect();
                stages.push(format!("and {}", abbreviate(&rest, 8)));
            }
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

/// Every BatchNorm is examined: a model put in eval mode with one module
/// left in train mode is in train mode there. The stages are read through
/// `stages`, and not held: the check holds a BatchNorm's pair at a time.
/// Those after stage `through` (the last a run compares) are not read: a
/// pass built to its block's end still stops where `--upto` says.
pub fn check_reference(
    stages: &ReferenceStages,
    network: &Network,
    through: usize,
) -> Result<ReferenceCheck, VerifyError> {
    let dump = stages.dump();
    let manifest = dump.manifest();
    let weights = DumpWeights(dump);
    let mut evidence = Vec::new();
    for (index, stage) in network.stages().iter().enumerate().take(through + 1) {
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
        let [input, output] = stages
            .peek_each([input_entry, output_entry])?
            .map(|stage| stage.data);
        if input.ndim() != 4 || input.shape() != output.shape() {
            continue;
        }
        let parameters =
            Parameters::load(&stage.module, |name| weights.weight(name)).map_err(|cause| {
                VerifyError::Core {
                    dump: dump.root().to_path_buf(),
                    cause,
                }
            })?;
        // Parameters that do not fit the reference's channels: the stage
        // comparison reports the shapes; this check has nothing to say.
        let channels = input.shape()[1];
        if [
            &parameters.weight,
            &parameters.bias,
            &parameters.mean,
            &parameters.var,
        ]
        .iter()
        .any(|values| values.len() != channels)
        {
            continue;
        }
        let eps = network.architecture().batch_norm_eps_of(&stage.module);
        let [running, batch] = recomputation_errors(&input, &output, &parameters, eps).relative();
        evidence.push(BatchNormEvidence {
            stage: stage.name.clone(),
            running_statistics_error: running,
            batch_statistics_error: batch,
        });
    }
    let train_mode = manifest.mode == Mode::Train || data_shows_train_mode(&evidence);
    Ok(ReferenceCheck {
        manifest_mode: manifest.mode,
        evidence,
        train_mode,
    })
}

/// Any BatchNorm was computed with batch statistics: one module left in
/// train mode makes the whole reference something the model does not
/// compute at inference.
fn data_shows_train_mode(evidence: &[BatchNormEvidence]) -> bool {
    evidence.iter().any(BatchNormEvidence::shows_train_mode)
}

/// What an eval-mode verdict rests on, in words: how many of the
/// BatchNorms examined the running statistics reproduce, or that none was
/// (a run that stops before the first): then only the manifest says so.
pub fn eval_mode_evidence(evidence: &[BatchNormEvidence]) -> String {
    if evidence.is_empty() {
        return "no BatchNorm in the stages compared to check it by".into();
    }
    format!(
        "{} of {} BatchNorms reproduced with running statistics",
        reproduced_with_running_statistics(evidence),
        evidence.len()
    )
}

/// How many of the BatchNorms examined the running statistics reproduce.
pub fn reproduced_with_running_statistics(evidence: &[BatchNormEvidence]) -> usize {
    evidence
        .iter()
        .filter(|e| e.running_statistics_error < REPRODUCES)
        .count()
}

/// A BatchNorm's output (NCHW) recomputed from its input with the running
/// statistics and with the batch's own, each held against the output.
/// Neither recomputation is built: two passes over each channel's planes
/// for its statistics and one for both errors, groups of channels in
/// parallel (the reference check reads every BatchNorm of the dump, some 11
/// million values in ResNet50). The figures are those of
/// `diagnosis::batch_norm`'s `normalise` and `channel_statistics`: the same
/// sums in the same order.
fn recomputation_errors(
    input: &ArrayD<f32>,
    output: &ArrayD<f32>,
    parameters: &Parameters,
    eps: f64,
) -> PlaneErrors {
    let &[batch, channels, height, width] = input.shape() else {
        unreachable!("the caller passes NCHW arrays of one shape")
    };
    let (input, output) = (input.as_standard_layout(), output.as_standard_layout());
    let (Some(input), Some(output)) = (input.as_slice(), output.as_slice()) else {
        unreachable!("a standard layout is contiguous")
    };
    let planes = Planes {
        batch,
        channels,
        plane: height * width,
    };
    let groups: Vec<usize> = (0..channels).step_by(CHANNELS_AT_ONCE).collect();
    groups
        .into_par_iter()
        .map(|first| {
            let mut errors = PlaneErrors::default();
            if first + CHANNELS_AT_ONCE <= channels {
                planes.group_errors::<CHANNELS_AT_ONCE>(
                    input,
                    output,
                    first,
                    parameters,
                    eps,
                    &mut errors,
                );
            } else {
                for channel in first..channels {
                    planes.group_errors::<1>(input, output, channel, parameters, eps, &mut errors);
                }
            }
            errors
        })
        .reduce(PlaneErrors::default, PlaneErrors::merge)
}

/// Channels whose statistics are summed side by side: one channel's sum is
/// a chain of additions, each waiting for the one before; eight chains at
/// once keep the adder busy (the check's sums took 4x as long one channel
/// at a time), each channel still summed in its own order.
const CHANNELS_AT_ONCE: usize = 8;

/// The shape of an NCHW array's channel planes.
#[derive(Clone, Copy)]
struct Planes {
    batch: usize,
    channels: usize,
    plane: usize,
}

impl Planes {
    /// Channel `channel`'s plane of image `image` in `values`.
    fn of<'a>(&self, values: &'a [f32], image: usize, channel: usize) -> &'a [f32] {
        let start = (image * self.channels + channel) * self.plane;
        &values[start..start + self.plane]
    }

    /// For each of the `N` channels from `first`, the sum of `term(k, x)`
    /// over its values `x` in order (image by image, each plane in order),
    /// from -0.0 as `Iterator::sum` starts.
    fn sums<const N: usize>(
        &self,
        values: &[f32],
        first: usize,
        term: impl Fn(usize, f64) -> f64,
    ) -> [f64; N] {
        let mut sums = [-0.0f64; N];
        for image in 0..self.batch {
            let planes: [&[f32]; N] = std::array::from_fn(|k| self.of(values, image, first + k));
            // `index` walks the N planes in step.
            #[allow(clippy::needless_range_loop)]
            for index in 0..self.plane {
                for k in 0..N {
                    sums[k] += term(k, planes[k][index] as f64);
                }
            }
        }
        sums
    }

    /// The `N` channels from `first` recomputed both ways, their errors
    /// folded into `errors`.
    fn group_errors<const N: usize>(
        &self,
        input: &[f32],
        output: &[f32],
        first: usize,
        parameters: &Parameters,
        eps: f64,
        errors: &mut PlaneErrors,
    ) {
        let vectors = Vectors::best();
        let Parameters {
            weight,
            bias,
            mean,
            var,
        } = parameters;
        let count = (self.batch * self.plane) as f64;
        let batch_mean = self
            .sums::<N>(input, first, |_, x| x)
            .map(|sum| sum / count);
        let batch_var = self
            .sums::<N>(input, first, |k, x| (x - batch_mean[k]).powi(2))
            .map(|sum| sum / count);
        for k in 0..N {
            let channel = first + k;
            let running_factor = weight[channel] / (var[channel] + eps).sqrt();
            let batch_factor = weight[channel] / (batch_var[k] + eps).sqrt();
            let running = Normalisation {
                mean: mean[channel],
                factor: running_factor,
                bias: bias[channel],
            };
            let batch = Normalisation {
                mean: batch_mean[k],
                factor: batch_factor,
                bias: bias[channel],
            };
            for image in 0..self.batch {
                let (x, y) = (
                    self.of(input, image, channel),
                    self.of(output, image, channel),
                );
                *errors = errors.merge(PlaneErrors::of(vectors, x, y, running, batch));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn evidence(stage: &str, running: f64, batch: f64) -> BatchNormEvidence {
        BatchNormEvidence {
            stage: stage.into(),
            running_statistics_error: running,
            batch_statistics_error: batch,
        }
    }

    #[test]
    fn batch_statistics_must_reproduce_the_output_and_beat_running_ones_tenfold() {
        assert!(evidence("bn1", 0.5, 1e-7).shows_train_mode());
        // Not reproduced: batch statistics miss as well.
        assert!(!evidence("bn1", 0.5, 1e-3).shows_train_mode());
        assert!(evidence("bn1", 0.5, 0.99e-3).shows_train_mode());
        // Reproduced, but running statistics reproduce it about as well
        // (a map with one value per channel makes both the same).
        assert!(!evidence("bn1", 1e-6, 1e-7).shows_train_mode());
        assert!(evidence("bn1", 1.01e-6, 1e-7).shows_train_mode());
        assert!(!evidence("bn1", 1e-7, 1e-7).shows_train_mode());
    }

    #[test]
    fn one_batch_norm_with_batch_statistics_decides() {
        let train = || evidence("a", 0.5, 1e-7);
        let eval = || evidence("b", 1e-7, 0.5);
        assert!(!data_shows_train_mode(&[]));
        assert!(!data_shows_train_mode(&[eval(), eval(), eval()]));
        assert!(data_shows_train_mode(&[eval(), eval(), train()]));
        assert!(data_shows_train_mode(&[train()]));
        assert_eq!(
            reproduced_with_running_statistics(&[eval(), train(), eval()]),
            2
        );
        // Reproducing means below the threshold, as for batch statistics.
        assert_eq!(
            reproduced_with_running_statistics(&[evidence("c", 1e-3, 0.5)]),
            0
        );
    }

    #[test]
    fn a_long_list_of_train_mode_batch_norms_is_cut_short() {
        let check = ReferenceCheck {
            manifest_mode: Mode::Eval,
            evidence: (0..14)
                .map(|i| evidence(&format!("bn{i}"), 0.5, 1e-7))
                .collect(),
            train_mode: true,
        };
        // Three are all given with their figures, and nothing follows.
        let three = ReferenceCheck {
            evidence: check.evidence[..3].to_vec(),
            ..check.clone()
        };
        let message = three.message().unwrap();
        assert!(
            message.contains(
                "bn2 (batch stats reproduce it to 1.0e-7, running stats only to 5.0e-1). Its"
            ),
            "{message}"
        );
        let message = check.message().unwrap();
        assert!(message.contains("bn2 (batch stats reproduce it to 1.0e-7, running stats only to 5.0e-1); and bn3, bn4, bn5, bn6, bn7, bn8, bn9, bn10, ... (3 more). Its"), "{message}");
    }

    #[test]
    fn the_message_gives_every_reason_and_only_for_train_mode() {
        let eval = ReferenceCheck {
            manifest_mode: Mode::Eval,
            evidence: vec![evidence("bn1", 1e-7, 0.5)],
            train_mode: false,
        };
        assert_eq!(eval.message(), None);
        let both = ReferenceCheck {
            manifest_mode: Mode::Train,
            evidence: vec![
                evidence("bn1", 0.5, 1.1e-7),
                evidence("layer1.0.bn1", 1e-7, 0.5),
            ],
            train_mode: true,
        };
        let message = both.message().unwrap();
        assert!(message.starts_with("THE REFERENCE WAS DUMPED IN TRAIN MODE: its manifest records mode \"train\", and its BatchNorm outputs were computed with batch statistics: bn1 (batch stats reproduce it to 1.1e-7, running stats only to 5.0e-1). Its BatchNorms used"), "{message}");
        assert!(!message.contains("layer1.0.bn1"), "{message}");
        let manifest_only = ReferenceCheck {
            manifest_mode: Mode::Train,
            evidence: vec![],
            train_mode: true,
        };
        assert!(manifest_only.message().unwrap().starts_with(
            "THE REFERENCE WAS DUMPED IN TRAIN MODE: its manifest records mode \"train\". Its"
        ));
    }

    /// `recomputed` against `output` as the check folds a plane (through
    /// a normalisation that changes nothing).
    fn relative_error(recomputed: &ArrayD<f32>, output: &ArrayD<f32>) -> f64 {
        let unchanged = Normalisation {
            mean: 0.0,
            factor: 1.0,
            bias: 0.0,
        };
        let plane = PlaneErrors::of(
            Vectors::best(),
            recomputed.as_slice().unwrap(),
            output.as_slice().unwrap(),
            unchanged,
            unchanged,
        );
        plane.relative()[0]
    }

    #[test]
    fn relative_error_is_the_largest_error_over_the_largest_output() {
        let output = ArrayD::from_shape_vec(IxDyn(&[4]), vec![1.0f32, -4.0, 2.0, 0.0]).unwrap();
        let recomputed = ArrayD::from_shape_vec(IxDyn(&[4]), vec![1.5f32, -4.0, 1.0, 0.0]).unwrap();
        assert_eq!(relative_error(&recomputed, &output), 1.0 / 4.0);
        // An all-zero output keeps the figure finite.
        let zeros = ArrayD::zeros(IxDyn(&[4]));
        assert_eq!(relative_error(&zeros, &zeros), 0.0);
        assert!(relative_error(&output, &zeros).is_finite());
        // A NaN reproduces nothing (batch statistics of a 1x1 map in a
        // batch of one, with eps 0, are 0/0).
        let nan = ArrayD::from_elem(IxDyn(&[4]), f32::NAN);
        assert_eq!(relative_error(&nan, &output), f64::INFINITY);
    }

    #[test]
    fn the_recomputation_errors_are_those_of_the_diagnosis_recomputations() {
        use crate::diagnosis::batch_norm::{channel_statistics, normalise};
        let values = |count: usize, seed: u64| -> Vec<f32> {
            (0..count as u64)
                .map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 97.0 - 5.0)
                .collect()
        };
        let shape = [2, 3, 5, 4];
        let input = ArrayD::from_shape_vec(IxDyn(&shape), values(120, 1)).unwrap();
        let output = ArrayD::from_shape_vec(IxDyn(&shape), values(120, 2)).unwrap();
        let parameters = Parameters {
            weight: vec![0.5, 1.5, -2.0],
            bias: vec![0.1, -0.2, 0.3],
            mean: vec![0.01, 0.2, -0.3],
            var: vec![1.0, 0.25, 4.0],
        };
        let Parameters {
            weight,
            bias,
            mean,
            var,
        } = &parameters;
        let (batch_mean, batch_var) = channel_statistics(&input);
        let [running, batch] = recomputation_errors(&input, &output, &parameters, 1e-5).relative();
        assert_eq!(
            running.to_bits(),
            relative_error(&normalise(&input, mean, var, weight, bias, 1e-5), &output).to_bits()
        );
        assert_eq!(
            batch.to_bits(),
            relative_error(
                &normalise(&input, &batch_mean, &batch_var, weight, bias, 1e-5),
                &output
            )
            .to_bits()
        );
        // Each element recomputed as `normalise` does: its own output is
        // reproduced exactly.
        for (which, (mean, var)) in [(mean, var), (&batch_mean, &batch_var)]
            .into_iter()
            .enumerate()
        {
            let exact = normalise(&input, mean, var, weight, bias, 1e-5);
            let errors = recomputation_errors(&input, &exact, &parameters, 1e-5).relative();
            assert_eq!(errors[which], 0.0);
            assert!(errors[1 - which] > 0.0);
        }
    }
}

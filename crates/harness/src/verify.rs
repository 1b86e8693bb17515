//! `verify DUMP`: run the core on a dump's weights and input, and compare
//! every stage with the reference as it is produced.

use std::collections::HashMap;
use std::path::PathBuf;

use globset::GlobMatcher;
use ndarray::ArrayD;
use resnet_core::{Network, Stage, StageKind, Tensor};
use resnet_dump::{Dump, Manifest};

use crate::diagnosis::{Evidence, Observed};
use crate::layout::{candidate_nchw, reference_tensor, to_nchw};
use crate::metrics::{compare, Comparison, Verdict};
use crate::reference_check::check_reference;
use crate::report::{ClassScore, Event, Report, ReportBuilder, RunMode, StageReport, TopClasses};
use crate::{Tolerance, VerifyError};

#[derive(Clone, Debug)]
pub struct VerifyOptions {
    pub dump: PathBuf,
    /// Stop after this stage (a stage, block or layer name).
    pub upto: Option<String>,
    /// Report only the stages whose names match.
    pub only: Option<GlobMatcher>,
    pub fail_fast: bool,
    pub tolerance: Tolerance,
    pub mode: RunMode,
    pub allow_train_reference: bool,
}

/// Runs the comparison, telling `listener` each result as it is known.
/// `Err` is bad input (exit 2); a report that did not pass is exit 1.
pub fn verify(
    options: &VerifyOptions,
    listener: &mut dyn FnMut(Event),
) -> Result<Report, VerifyError> {
    verify_dump(&Dump::open(&options.dump)?, options, listener)
}

/// [`verify`] on a dump already opened (or held in memory); `options.dump`
/// only names it.
pub fn verify_dump(
    dump: &Dump,
    options: &VerifyOptions,
    listener: &mut dyn FnMut(Event),
) -> Result<Report, VerifyError> {
    let core_error = |source| VerifyError::Core {
        dump: options.dump.clone(),
        source,
    };
    let network =
        Network::from_weights(dump.architecture()?, &dump.weights()).map_err(core_error)?;
    let entries = match_stages(dump, &network, options)?;
    let last = match &options.upto {
        Some(name) => network
            .stage_index(name)
            .map_err(|_| unknown_stage(name, &network))?,
        None => network.stages().len() - 1,
    };

    let reference_check = check_reference(dump, &network)?;
    let mut report = Report::new(
        options.dump.display().to_string(),
        "resnet-core".into(),
        dump.manifest().model_name().to_string(),
        options.mode,
        options.tolerance,
        reference_check,
    );
    if !report.start(last + 1, options.allow_train_reference, listener) {
        return Ok(report);
    }

    let mut run = Run {
        dump,
        network: &network,
        options,
        entries,
        references: ReferenceCache::new(&network),
        builder: ReportBuilder::new(report),
    };
    let input = run.load_reference(0)?;
    let input = reference_tensor(input.view())
        .ok_or_else(|| run.mismatch(0, "the input is not a 4-D NCHW tensor".into()))?;

    let mut outputs = options
        .mode
        .cumulative()
        .then(|| network.steps(input, Some(last)));
    let mut stopped = None;
    for (index, stage) in network.stages()[..=last].iter().enumerate() {
        let output = outputs
            .as_mut()
            .map(|steps| {
                steps
                    .next()
                    .expect("a pass yields every stage up to the last")
            })
            .transpose()
            .map_err(core_error)?;
        let Some(report) = run.compare_stage(index, stage, output.as_ref().map(|(_, o)| &**o))?
        else {
            continue;
        };
        let failed = report.verdict == Verdict::Fail;
        run.builder.push(report, listener);
        if failed && options.fail_fast {
            stopped = Some(format!("--fail-fast: stopped after {}", stage.name));
            break;
        }
    }
    Ok(run.builder.finish(stopped))
}

/// The reference entry for every core stage, checked to cover each other.
fn match_stages(
    dump: &Dump,
    network: &Network,
    options: &VerifyOptions,
) -> Result<Vec<usize>, VerifyError> {
    let manifest: &Manifest = dump.manifest();
    let position: HashMap<&str, usize> = manifest
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let mut entries = Vec::with_capacity(network.stages().len());
    for stage in network.stages() {
        let Some(&entry) = position.get(stage.name.as_str()) else {
            return Err(VerifyError::Mismatch {
                dump: options.dump.clone(),
                reason: format!(
                    "the core produces stage `{}` ({}), but the reference has no stage of that name; was the dump made for this architecture?",
                    stage.name, stage.kind
                ),
            });
        };
        entries.push(entry);
    }
    if let Some(extra) = manifest
        .stages
        .iter()
        .find(|s| network.stage_index(&s.name).is_err())
    {
        return Err(VerifyError::Mismatch {
            dump: options.dump.clone(),
            reason: format!(
                "the reference has stage `{}` ({}), which the core does not produce",
                extra.name, extra.module_type
            ),
        });
    }
    Ok(entries)
}

fn unknown_stage(name: &str, network: &Network) -> VerifyError {
    let near: Vec<&str> = network
        .stages()
        .iter()
        .map(|stage| stage.name.as_str())
        .filter(|candidate| candidate.starts_with(name.split('.').next().unwrap_or(name)))
        .take(8)
        .collect();
    let hint = if near.is_empty() {
        "layer names (layer1 .. layer4), blocks (layer2.1) and stages (layer2.1.conv2) are accepted"
            .to_string()
    } else {
        format!("stages with a similar name: {}", near.join(", "))
    };
    VerifyError::Usage(format!("--upto {name}: no such stage; {hint}"))
}

struct Run<'a> {
    dump: &'a Dump,
    network: &'a Network,
    options: &'a VerifyOptions,
    /// Manifest position of each core stage.
    entries: Vec<usize>,
    references: ReferenceCache,
    builder: ReportBuilder,
}

impl Run<'_> {
    fn compare_stage(
        &mut self,
        index: usize,
        stage: &Stage,
        output: Option<&Tensor>,
    ) -> Result<Option<StageReport>, VerifyError> {
        let (reference, converted_from) = self.load_reference_noting(index)?;
        if self.options.mode.isolated() {
            self.references.offer(index, &reference);
        }
        let shown = self
            .options
            .only
            .as_ref()
            .is_none_or(|glob| glob.is_match(&stage.name));
        if index == 0 || !shown {
            self.references.release_after(index);
            return Ok(None);
        }
        if stage.kind == StageKind::Linear {
            self.record_top5(&reference, output);
        }
        let cumulative = match output {
            Some(output) => Some(self.compare_output(index, output, &reference)?),
            None => None,
        };
        let isolated = if self.options.mode.isolated() {
            let mut tensors = Vec::new();
            for &producer in self.network.stage_input_indices(index) {
                tensors.push(self.reference_input(producer)?);
            }
            let borrowed: Vec<&Tensor> = tensors.iter().collect();
            let output =
                self.network
                    .run_stage(index, &borrowed)
                    .map_err(|source| VerifyError::Core {
                        dump: self.options.dump.clone(),
                        source,
                    })?;
            Some(self.compare_output(index, &output, &reference)?)
        } else {
            None
        };
        self.references.release_after(index);

        let failed_in = |compared: &Option<(Comparison, ArrayD<f32>)>| {
            compared
                .as_ref()
                .is_some_and(|(c, _)| c.verdict == Verdict::Fail)
        };
        let (cumulative_failed, isolated_failed) = (failed_in(&cumulative), failed_in(&isolated));
        let origin = self
            .builder
            .origin(cumulative_failed, isolated_failed, stage.is_container());
        let mut hints = Vec::new();
        if self.builder.should_diagnose(&origin) {
            // The stage's own error shows best with the reference's inputs.
            let candidate = if isolated_failed {
                &isolated
            } else {
                &cumulative
            };
            if let Some((_, candidate)) = candidate {
                let evidence =
                    Evidence::new(self.dump, Some(self.network), &self.options.tolerance);
                hints = evidence.diagnose(
                    &stage.name,
                    &Observed {
                        reference: &reference,
                        candidate,
                    },
                );
            }
        }
        let (cumulative, isolated) = (cumulative.map(|(c, _)| c), isolated.map(|(c, _)| c));

        let entry = &self.dump.manifest().stages[self.entries[index]];
        let failed = cumulative_failed || isolated_failed;
        Ok(Some(StageReport {
            index,
            name: stage.name.clone(),
            module_type: entry.module_type.clone(),
            shape: reference.shape().to_vec(),
            block: stage.block.clone(),
            layer: stage.layer.clone(),
            verdict: if failed { Verdict::Fail } else { Verdict::Succ },
            cumulative,
            isolated,
            notes: converted_from
                .map(|dtype| format!("reference stored as {dtype}, converted to float32"))
                .into_iter()
                .collect(),
            origin,
            hints,
        }))
    }

    fn compare_output(
        &self,
        index: usize,
        output: &Tensor,
        reference: &ArrayD<f32>,
    ) -> Result<(Comparison, ArrayD<f32>), VerifyError> {
        let candidate = candidate_nchw(output, reference.shape()).ok_or_else(|| {
            self.mismatch(
                index,
                format!(
                    "the core's output {:?} (NCHW) does not match the reference shape {:?}",
                    output.nchw_shape(),
                    reference.shape()
                ),
            )
        })?;
        let comparison = compare(
            reference.as_slice().expect("standard layout"),
            candidate.as_slice().expect("standard layout"),
            reference.shape(),
            &self.options.tolerance,
        );
        Ok((comparison, candidate))
    }

    /// The reference's stage `index`, in NCHW order.
    fn load_reference(&self, index: usize) -> Result<ArrayD<f32>, VerifyError> {
        Ok(self.load_reference_noting(index)?.0)
    }

    /// [`Run::load_reference`], and the dtype it was converted from, if any.
    fn load_reference_noting(
        &self,
        index: usize,
    ) -> Result<(ArrayD<f32>, Option<String>), VerifyError> {
        let entry = &self.dump.manifest().stages[self.entries[index]];
        let loaded = self.dump.load_stage(entry)?;
        let layout = self.dump.manifest().layout;
        Ok((to_nchw(loaded.data, layout), loaded.converted_from))
    }

    fn reference_input(&mut self, producer: usize) -> Result<Tensor, VerifyError> {
        if let Some(tensor) = self.references.get(producer) {
            return Ok(tensor.clone());
        }
        let reference = self.load_reference(producer)?;
        reference_tensor(reference.view())
            .ok_or_else(|| self.mismatch(producer, "cannot be fed to the core".into()))
    }

    /// The first batch item's top-5 classes, from the logits already loaded
    /// and computed for the comparison.
    fn record_top5(&mut self, reference: &ArrayD<f32>, output: Option<&Tensor>) {
        let classes = self.dump.manifest().classes.as_deref();
        let features = reference.shape().last().copied().unwrap_or(0);
        let reference_row = &reference.as_slice().expect("standard layout")[..features];
        self.builder.report.top5 = Some(TopClasses {
            reference: top5(reference_row, classes),
            candidate: output
                .map(|tensor| top5(&tensor.as_slice()[..features], classes))
                .unwrap_or_default(),
        });
    }

    fn mismatch(&self, index: usize, reason: String) -> VerifyError {
        let name = &self.network.stages()[index].name;
        VerifyError::Mismatch {
            dump: self.options.dump.clone(),
            reason: format!("stage `{name}`: {reason}"),
        }
    }
}

pub(crate) fn top5(logits: &[f32], classes: Option<&[String]>) -> Vec<ClassScore> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order
        .into_iter()
        .take(5)
        .map(|index| ClassScore {
            index,
            name: classes.and_then(|names| names.get(index).cloned()),
            logit: logits[index],
        })
        .collect()
}

/// Reference activations kept (as NHWC tensors) while a later stage still
/// needs them as isolated inputs, and no longer.
struct ReferenceCache {
    last_reader: Vec<Option<usize>>,
    kept: HashMap<usize, Tensor>,
}

impl ReferenceCache {
    fn new(network: &Network) -> Self {
        let mut last_reader = vec![None; network.stages().len()];
        for index in 0..network.stages().len() {
            for &producer in network.stage_input_indices(index) {
                last_reader[producer] = Some(index);
            }
        }
        ReferenceCache {
            last_reader,
            kept: HashMap::new(),
        }
    }

    fn offer(&mut self, index: usize, reference: &ArrayD<f32>) {
        if self.last_reader[index].is_some() {
            if let Some(tensor) = reference_tensor(reference.view()) {
                self.kept.insert(index, tensor);
            }
        }
    }

    fn get(&self, index: usize) -> Option<&Tensor> {
        self.kept.get(&index)
    }

    fn release_after(&mut self, index: usize) {
        let last_reader = &self.last_reader;
        self.kept
            .retain(|&kept, _| last_reader[kept].is_some_and(|reader| reader > index));
    }
}

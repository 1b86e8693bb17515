//! `verify compare REF CAND`: another engine (C++, CUDA, ...) writes its
//! stage outputs in the dump format, and each is compared with the
//! reference's stage of the same name. The core does not run.

use std::path::PathBuf;

use ndarray::ArrayD;
use resnet_dump::{similar_stage_names, Dump, Layout, Precision};

use crate::adapter;
use crate::diagnosis::{axis_order, Evidence, Observed};
use crate::layout::{candidate_nchw, reference_tensor};
use crate::pipeline::{run, shown, Candidate, Explained, Feed, Output, Row, RunOptions};
use crate::reference_check::{check_reference, ReferenceCheck};
use crate::reference_stages::ReferenceStages;
use crate::report::{abbreviate, Event, Report, RunMode};
use crate::{ToleranceRule, VerifyError};

#[derive(Clone, Debug)]
pub struct CompareOptions {
    pub reference: PathBuf,
    pub candidate: PathBuf,
    /// How the candidate's stage files are laid out; `None`: as its
    /// manifest says.
    pub layout: Option<Layout>,
    /// What the candidate computes in, for `--tol auto`; `None`: as its
    /// manifest says (float32 when it says nothing).
    pub candidate_dtype: Option<Precision>,
    pub run: RunOptions,
}

pub fn compare_dumps(
    options: &CompareOptions,
    listener: &mut dyn FnMut(Event),
) -> Result<Report, VerifyError> {
    let reference = Dump::open(&options.reference)?;
    let candidate = Dump::open(&options.candidate)?;
    // The reference against itself passes whatever any engine computes.
    let resolved =
        [reference.manifest_path(), candidate.manifest_path()].map(std::fs::canonicalize);
    if let [Ok(reference), Ok(candidate)] = &resolved {
        if reference == candidate {
            return Err(VerifyError::Usage(format!(
                "{} and {} are the same dump: the reference compared with itself passes whatever an engine computes; give your engine's dump as the candidate",
                options.reference.display(),
                options.candidate.display()
            )));
        }
    }
    refuse_unknown_stages(&reference, &candidate)?;
    let layout = options.layout.unwrap_or(candidate.manifest().layout);
    let mut run_options = options.run.clone();
    if let ToleranceRule::Auto(auto) = &mut run_options.tolerance {
        if let Some(dtype) = options.candidate_dtype.or(candidate.manifest().dtype) {
            auto.candidate_dtype = dtype;
        }
    }
    let network = match reference.manifest().architecture.as_ref() {
        Some(architecture) => Some(
            adapter::network(&reference, &adapter::architecture(architecture)).map_err(
                |cause| VerifyError::Core {
                    dump: options.reference.clone(),
                    cause,
                },
            )?,
        ),
        None => None,
    };
    let stages = ReferenceStages::new(&reference, network.as_ref());
    let reference_check = match &network {
        Some(network) => check_reference(&stages, network, network.stages().len() - 1)?,
        None => ReferenceCheck {
            manifest_mode: reference.manifest().mode,
            evidence: Vec::new(),
            train_mode: reference.manifest().mode == resnet_dump::Mode::Train,
        },
    };
    let report = Report::new(
        options.reference.display().to_string(),
        options.candidate.display().to_string(),
        reference.manifest().model_name().to_string(),
        RunMode::Dumps,
        run_options.tolerance,
        reference_check,
    );
    let rows: Vec<Row> = reference
        .manifest()
        .stages
        .iter()
        .enumerate()
        .map(|(index, entry)| Row {
            index,
            entry,
            block: &entry.block,
            layer: &entry.layer,
            container: false,
            shown: shown(index, &entry.name, run_options.only.as_ref(), false),
        })
        .collect();
    let mut source = OtherEngine {
        candidate: &candidate,
        path: &options.candidate,
        layout,
    };
    run(
        report,
        &rows,
        &mut [&mut source],
        &stages,
        &run_options,
        listener,
    )
}

/// A candidate stage under a name the reference does not have (a typo,
/// `relu#2` for `relu#1`) would be compared with nothing, and the run
/// could say succ for an engine whose stage was never judged.
fn refuse_unknown_stages(reference: &Dump, candidate: &Dump) -> Result<(), VerifyError> {
    let unknown: Vec<String> = (candidate.manifest().stages.iter())
        .filter(|stage| reference.stage(&stage.name).is_none())
        .map(|stage| stage.name.clone())
        .collect();
    let Some(first) = unknown.first() else {
        return Ok(());
    };
    let names = reference.manifest().stages.iter();
    let near = similar_stage_names(first, names.map(|stage| stage.name.as_str()), 3);
    Err(VerifyError::Mismatch {
        dump: candidate.manifest_path().to_path_buf(),
        reason: format!(
            "{} stage(s) the reference does not have: {}{}. A candidate stage is judged against the reference's stage of its name, so one under another name would never be compared: name it as the reference does",
            unknown.len(),
            abbreviate(&unknown, 5),
            match near.is_empty() {
                true => String::new(),
                false => format!(" (for {first}, did you mean {}?)", near.join(", ")),
            }
        ),
    })
}

/// Another engine's dump: its stage of the reference's stage's name.
struct OtherEngine<'a> {
    candidate: &'a Dump,
    path: &'a PathBuf,
    /// How its stage files are laid out.
    layout: Layout,
}

impl Candidate for OtherEngine<'_> {
    fn feed(&self) -> Feed {
        Feed::EndToEnd
    }

    fn advance(&mut self, row: &Row) -> Result<bool, VerifyError> {
        Ok(!row.shown || self.candidate.stage(&row.entry.name).is_some())
    }

    fn output(&mut self, row: &Row, reference: &ArrayD<f32>) -> Result<Output, VerifyError> {
        let entry = self.candidate.stage(&row.entry.name).expect("advanced");
        let loaded = self.candidate.load_stage(entry)?;
        let mut notes = Vec::new();
        if let Some(dtype) = &loaded.converted_from {
            notes.push(format!("candidate stored as {dtype}, converted to float32"));
        }
        // The C++ writer takes the type from the engine, and does not know
        // the reference's: another type is another stage's output, or a slip.
        if entry.module_type != row.entry.module_type {
            notes.push(format!(
                "the candidate's manifest calls it {}, where the reference's module is {}: written under another stage's name?",
                entry.module_type, row.entry.module_type
            ));
        }
        let data = self.layout.to_nchw(loaded.data);
        let stored = data.shape().to_vec();
        let data = match in_shape(data, reference.shape()) {
            Ok(data) => {
                if stored != reference.shape() {
                    notes.push(format!(
                        "shape {stored:?} compared as the reference's {:?} (they differ only by axes of size 1)",
                        reference.shape()
                    ));
                }
                data
            }
            Err(data) => {
                notes.push(format!(
                    "shape {stored:?} (read as {:?}) is not the reference's {:?}",
                    self.layout,
                    reference.shape()
                ));
                data
            }
        };
        Ok(Output { data, notes })
    }

    fn computed_from_own_inputs(
        &self,
        row: &Row,
        output: &ArrayD<f32>,
        evidence: &Evidence,
    ) -> Result<Option<bool>, VerifyError> {
        let Some(network) = evidence.network else {
            return Ok(None);
        };
        let Ok(index) = network.stage_index(&row.entry.name) else {
            return Ok(None);
        };
        if network.stages()[index].is_container() {
            return Ok(None);
        }
        // The candidate's own stored inputs, in the reference's shapes (the
        // manifest's: the reference's data need not be read for them).
        let mut inputs = Vec::new();
        for producer in network.stage_inputs(index) {
            let (Some(entry), Some(reference)) = (
                self.candidate.stage(&producer.name),
                evidence.dump.stage(&producer.name),
            ) else {
                return Ok(None);
            };
            let data = self.layout.to_nchw(self.candidate.load_stage(entry)?.data);
            let Ok(data) = in_shape(data, &reference.shape) else {
                return Ok(None);
            };
            match reference_tensor(data.view()) {
                Some(tensor) => inputs.push(tensor),
                None => return Ok(None),
            }
        }
        let inputs: Vec<&resnet_core::Tensor> = inputs.iter().collect();
        let recomputed = network
            .run_stage(index, &inputs)
            .ok()
            .and_then(|computed| candidate_nchw(&computed, output.shape()));
        Ok(recomputed.map(|recomputed| evidence.reproduces(&recomputed, output).is_some()))
    }

    fn finish(&self, report: &Report) -> Result<(), VerifyError> {
        if report.summary.compared == 0 {
            return Err(VerifyError::Mismatch {
                dump: self.path.clone(),
                reason:
                    "no stage of the candidate has a name that the reference has; nothing was compared"
                        .into(),
            });
        }
        Ok(())
    }

    fn explain(
        &self,
        row: &Row,
        observed: &Observed,
        evidence: &Evidence,
    ) -> Result<Option<Explained>, VerifyError> {
        let (reference, stored) = (
            observed.reference,
            self.layout.as_stored(observed.candidate),
        );
        let Some(found) = axis_order::find(evidence, stored, self.layout, reference) else {
            return Ok(None);
        };
        Ok(Some(
            match confirm_layout(evidence, self.candidate, row.index, &found)? {
                Some(confirmed) => Explained::Run {
                    stopped: format!(
                        "every stage checked ({}) is the reference in {} order, so the rest would fail the same way; {}",
                        confirmed.join(", "),
                        axis_order::order_name(found.order, "NCHW"),
                        layout_advice(&found, self.layout),
                    ),
                    hint: found.hint,
                },
                None => Explained::Stage(found.hint),
            },
        ))
    }
}

/// Whether two shapes are the same once their axes of size 1 are dropped
/// (`[N, C]` and `[N, C, 1, 1]`): the same elements in the same order.
fn differ_by_unit_axes(a: &[usize], b: &[usize]) -> bool {
    let sizes =
        |shape: &[usize]| -> Vec<usize> { shape.iter().copied().filter(|&n| n != 1).collect() };
    sizes(a) == sizes(b)
}

/// A candidate's stored data (NCHW) in the reference's `shape`, where the
/// two differ at most by axes of size 1 (an engine that fuses the flatten
/// stores avgpool `[N, C]`: the same values in the same order); else the
/// data as it is.
fn in_shape(data: ArrayD<f32>, shape: &[usize]) -> Result<ArrayD<f32>, ArrayD<f32>> {
    match data.shape() == shape {
        true => Ok(data),
        false if differ_by_unit_axes(data.shape(), shape) => Ok(data
            .into_shape_with_order(shape)
            .expect("the same elements in the same order")),
        false => Err(data),
    }
}

/// What to do about a candidate found in another axis order throughout.
fn layout_advice(found: &axis_order::LayoutMatch, assumed: Layout) -> String {
    let order = axis_order::order_name(found.order, "NCHW");
    if found.reshaped {
        // Its shapes are right and its values are not: no flag reads that.
        format!("transpose each stage from {order} to {assumed:?} before saving it (a reshape leaves the values in {order} order)")
    } else if [axis_order::NCHW, axis_order::NHWC].contains(&found.order) {
        format!("rerun with --cand-layout {}", order.to_lowercase())
    } else {
        format!("write the stages {assumed:?}")
    }
}

/// Stages checked after the first, to tell a candidate stored in another
/// layout throughout from one stage written wrong.
const LAYOUT_CONFIRMATIONS: usize = 3;

/// The stages (this one and up to [`LAYOUT_CONFIRMATIONS`] more 4-D ones)
/// that `found` explains, if it explains every one checked.
fn confirm_layout(
    evidence: &Evidence,
    candidate: &Dump,
    index: usize,
    found: &axis_order::LayoutMatch,
) -> Result<Option<Vec<String>>, VerifyError> {
    let stages = &evidence.dump.manifest().stages;
    let mut confirmed = vec![stages[index].name.clone()];
    for entry in stages[index + 1..]
        .iter()
        .filter(|entry| entry.shape.len() == 4)
        .take(LAYOUT_CONFIRMATIONS)
    {
        let Some(candidate_entry) = candidate.stage(&entry.name) else {
            continue;
        };
        let expected = evidence.stages.load(entry)?.data;
        let stored = candidate.load_stage(candidate_entry)?.data;
        // Judged by that stage's own tolerance (under auto, its floor).
        if !axis_order::holds(&evidence.at(entry), stored.view(), found.order, &expected) {
            return Ok(None);
        }
        confirmed.push(entry.name.clone());
    }
    Ok(Some(confirmed))
}

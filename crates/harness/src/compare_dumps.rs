//! `verify compare REF CAND`: another engine (C++, CUDA, ...) writes its
//! stage outputs in the dump format, and each is compared with the
//! reference's stage of the same name. The core does not run.

use std::path::PathBuf;

use globset::GlobMatcher;
use resnet_core::Network;
use resnet_dump::{Dump, Layout};

use crate::diagnosis::{layout, Evidence, Observed};
use crate::layout::{as_stored, load_nchw, to_nchw};
use crate::metrics::{compare, Verdict};
use crate::reference_check::{check_reference, ReferenceCheck};
use crate::report::{abbreviate, Event, Report, ReportBuilder, RunMode, StageReport, TopClasses};
use crate::verify::top5;
use crate::{Tolerance, VerifyError};

/// How the candidate's stage files are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CandidateLayout {
    Nchw,
    Nhwc,
    /// As the candidate's manifest says.
    Auto,
}

#[derive(Clone, Debug)]
pub struct CompareOptions {
    pub reference: PathBuf,
    pub candidate: PathBuf,
    pub layout: CandidateLayout,
    pub only: Option<GlobMatcher>,
    pub fail_fast: bool,
    pub tolerance: Tolerance,
    pub allow_train_reference: bool,
}

pub fn compare_dumps(
    options: &CompareOptions,
    listener: &mut dyn FnMut(Event),
) -> Result<Report, VerifyError> {
    let reference = Dump::open(&options.reference)?;
    let candidate = Dump::open(&options.candidate)?;
    let layout = match options.layout {
        CandidateLayout::Nchw => Layout::NCHW,
        CandidateLayout::Nhwc => Layout::NHWC,
        CandidateLayout::Auto => candidate.manifest().layout,
    };
    let network = match reference.manifest().architecture.as_ref() {
        Some(architecture) => Some(
            Network::from_weights(architecture, &reference.weights()).map_err(|source| {
                VerifyError::Core {
                    dump: options.reference.clone(),
                    source,
                }
            })?,
        ),
        None => None,
    };
    let reference_check = match &network {
        Some(network) => check_reference(&reference, network)?,
        None => ReferenceCheck {
            manifest_mode: reference.manifest().mode,
            evidence: Vec::new(),
            train_mode: reference.manifest().mode == resnet_dump::Mode::Train,
        },
    };
    let stages = &reference.manifest().stages;
    let mut report = Report::new(
        options.reference.display().to_string(),
        options.candidate.display().to_string(),
        reference.manifest().model_name().to_string(),
        RunMode::Dumps,
        options.tolerance,
        reference_check,
    );
    if !report.start(stages.len(), options.allow_train_reference, listener) {
        return Ok(report);
    }

    let evidence = Evidence::new(&reference, network.as_ref(), &options.tolerance);
    let mut builder = ReportBuilder::new(report);
    let mut missing = Vec::new();
    let mut stopped = None;
    for (index, entry) in stages.iter().enumerate() {
        if !options
            .only
            .as_ref()
            .is_none_or(|glob| glob.is_match(&entry.name))
        {
            continue;
        }
        let Some(candidate_entry) = candidate.stage(&entry.name) else {
            missing.push(entry.name.clone());
            continue;
        };
        let expected = load_nchw(&reference, entry)?;
        let loaded = candidate.load_stage(candidate_entry)?;
        let mut notes = Vec::new();
        if let Some(dtype) = &loaded.converted_from {
            notes.push(format!("candidate stored as {dtype}, converted to float32"));
        }
        let actual = to_nchw(loaded.data, layout);
        let comparison = if actual.shape() == expected.shape() {
            Some(compare(
                expected.as_slice().expect("standard"),
                actual.as_slice().expect("standard"),
                expected.shape(),
                &options.tolerance,
            ))
        } else {
            notes.push(format!(
                "shape {:?} (read as {layout:?}) is not the reference's {:?}",
                actual.shape(),
                expected.shape()
            ));
            None
        };
        if entry.name == "fc" {
            if let (Some(reference_row), Some(candidate_row)) = (
                expected.rows().into_iter().next(),
                actual.rows().into_iter().next(),
            ) {
                let classes = reference.manifest().classes.as_deref();
                builder.report.top5 = Some(TopClasses {
                    reference: top5(&reference_row.to_vec(), classes),
                    candidate: top5(&candidate_row.to_vec(), classes),
                });
            }
        }
        let verdict = comparison.as_ref().map_or(Verdict::Fail, |c| c.verdict);
        let origin = builder.origin(verdict == Verdict::Fail, false, false);
        let mut hints = Vec::new();
        if builder.should_diagnose(&origin) {
            let stored = as_stored(&actual, layout);
            if let Some(found) = layout::find(&evidence, stored, layout, &expected) {
                if let Some(confirmed) =
                    confirm_layout(&evidence, &reference, &candidate, index, &found)?
                {
                    // Said once for the run, not again on the stage.
                    builder.report.summary.hint = Some(found.hint);
                    stopped = Some(format!(
                        "every stage checked ({}) is the reference in {} order, so the rest would fail the same way; rerun with --cand-layout {}",
                        confirmed.join(", "),
                        layout::order_name(found.order, "NCHW"),
                        layout::order_name(found.order, "NCHW").to_lowercase(),
                    ));
                } else {
                    hints.push(found.hint);
                }
            } else if actual.shape() == expected.shape() {
                hints = evidence.diagnose(
                    &entry.name,
                    &Observed {
                        reference: &expected,
                        candidate: &actual,
                    },
                );
            }
        }
        builder.push(
            StageReport {
                index,
                name: entry.name.clone(),
                module_type: entry.module_type.clone(),
                shape: expected.shape().to_vec(),
                block: entry.block.clone(),
                layer: entry.layer.clone(),
                verdict,
                cumulative: comparison,
                isolated: None,
                notes,
                origin,
                hints,
            },
            listener,
        );
        if stopped.is_some() {
            break;
        }
        if verdict == Verdict::Fail && options.fail_fast {
            stopped = Some(format!("--fail-fast: stopped after {}", entry.name));
            break;
        }
    }
    if builder.report.summary.compared == 0 {
        return Err(VerifyError::Mismatch {
            dump: options.candidate.clone(),
            reason:
                "no stage of the candidate has a name that the reference has; nothing was compared"
                    .into(),
        });
    }
    if !missing.is_empty() && stopped.is_none() {
        stopped = Some(format!(
            "{} reference stage(s) not in the candidate, not compared: {}",
            missing.len(),
            abbreviate(&missing, 5)
        ));
    }
    Ok(builder.finish(stopped))
}

/// Stages checked after the first, to tell a candidate stored in another
/// layout throughout from one stage written wrong.
const LAYOUT_CONFIRMATIONS: usize = 3;

/// The stages (this one and up to [`LAYOUT_CONFIRMATIONS`] more 4-D ones)
/// that `found` explains, if it explains every one checked.
fn confirm_layout(
    evidence: &Evidence,
    reference: &Dump,
    candidate: &Dump,
    index: usize,
    found: &layout::LayoutMatch,
) -> Result<Option<Vec<String>>, VerifyError> {
    let stages = &reference.manifest().stages;
    let mut confirmed = vec![stages[index].name.clone()];
    for entry in stages[index + 1..]
        .iter()
        .filter(|entry| entry.shape.len() == 4)
        .take(LAYOUT_CONFIRMATIONS)
    {
        let Some(candidate_entry) = candidate.stage(&entry.name) else {
            continue;
        };
        let expected = load_nchw(reference, entry)?;
        let stored = candidate.load_stage(candidate_entry)?.data;
        if !layout::holds(evidence, stored.view(), found.order, &expected) {
            return Ok(None);
        }
        confirmed.push(entry.name.clone());
    }
    Ok(Some(confirmed))
}

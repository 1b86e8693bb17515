//! `verify repro`: the failing stage, cut out of a dump for whoever acts on
//! it (the engine's, the kernel's or the exporter's author), as files they
//! can run: the stage's reference inputs, its weights in torch's layout,
//! its torch parameters, the reference's and the candidate's outputs,
//! `case.json`, a `test_repro.py` that recomputes the stage with
//! `torch.nn.functional` and judges the candidate as verify did, and a
//! README. `verify case DIR` reruns the core on the bundle alone.

mod case;
mod shrink;

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, Dimension};
use resnet_core::ops::{ConvGeometry, MaxPool2d};
use resnet_core::{Network, StageKind};
use resnet_dump::{npy, Dump};
use serde::{Deserialize, Serialize};

use crate::adapter;
use crate::compare_dumps::{compare_dumps, CompareOptions};
use crate::layout::{candidate_nchw, reference_tensor};
use crate::report::{Report, RunMode, StageReport};
use crate::verify::{verify, VerifyOptions};
use crate::{Comparison, VerifyError};

pub use case::{run_case, CaseOutcome};

const TEST_REPRO: &str = include_str!("test_repro.py");

/// Where the failure comes from.
pub enum ReproSource {
    /// The core, fed the reference's inputs (`verify repro DUMP`).
    Core(VerifyOptions),
    /// Another engine's dump (`verify repro compare REF CAND`).
    Dumps(CompareOptions),
}

#[derive(Clone, Debug)]
pub struct ReproOptions {
    pub out: PathBuf,
    /// The stage to hand over; default: the root failure.
    pub stage: Option<String>,
    /// Cut the case down to the worst element's receptive field.
    pub shrink: bool,
    /// Write a bundle for a stage that passes.
    pub force: bool,
}

/// What `verify repro` did.
#[derive(Debug)]
pub struct ReproOutcome {
    pub stage: String,
    /// False when the stage passes and --force was not given.
    pub written: bool,
    /// The lines to print.
    pub message: String,
}

/// How the core computes the stage: what `verify case` rebuilds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum CoreOp {
    /// The geometry's fields (kernel, stride, padding, dilation, groups)
    /// beside `op` in case.json.
    Conv2d {
        #[serde(flatten)]
        geometry: ConvGeometry,
    },
    BatchNorm {
        eps: f64,
    },
    Relu,
    /// A block's last ReLU: `relu(branch + identity)`.
    AddRelu,
    /// kernel, stride and padding beside `op` in case.json.
    MaxPool {
        #[serde(flatten)]
        pool: MaxPool2d,
    },
    AveragePool,
    Linear,
    Identity,
}

/// `case.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Case {
    pub stage: String,
    pub module_type: String,
    /// The manifest's torch parameters for the module (adjusted when shrunk).
    pub params: serde_json::Value,
    pub core: CoreOp,
    /// Files, relative to the bundle.
    pub inputs: Vec<String>,
    /// Parameter name (`weight`, `running_mean`, ...) -> file.
    pub weights: std::collections::BTreeMap<String, String>,
    pub reference: String,
    pub candidate: String,
    /// The rule as verify applied it at this stage: `|cand - ref| <= atol + rtol * |ref|`.
    pub tolerance: CaseTolerance,
    /// The run's rule in words (`--tol auto`: the multiple of the floor).
    #[serde(default)]
    pub rule: String,
    /// What verify found.
    pub verdict: CaseVerdict,
    pub hints: Vec<String>,
    /// Where the case came from, and how it was cut.
    pub source: String,
    pub shrunk: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct CaseTolerance {
    pub rtol: f64,
    pub atol: f64,
    /// NaN in both at the same place counts as a match.
    #[serde(default)]
    pub equal_nan: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CaseVerdict {
    pub verdict: String,
    pub mismatched: usize,
    pub elements: usize,
    /// Infinite for a NaN or infinity that does not match, which JSON
    /// writes `null` (as every non-finite figure of the reports).
    #[serde(deserialize_with = "null_as_infinity")]
    pub max_abs_error: f64,
    #[serde(deserialize_with = "null_as_infinity")]
    pub relative_error: f64,
    /// NCHW, in the full stage.
    pub worst_index: Option<Vec<usize>>,
}

/// A figure serde_json wrote `null` because it was not finite: an error
/// figure is never NaN (a NaN mismatch counts as infinite), so it was
/// infinite.
fn null_as_infinity<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::INFINITY))
}

/// The arrays of a case, before they are written.
pub(crate) struct CaseArrays {
    pub inputs: Vec<ArrayD<f32>>,
    pub weights: Vec<(String, ArrayD<f32>)>,
    pub reference: ArrayD<f32>,
    pub candidate: ArrayD<f32>,
}

pub fn repro(source: &ReproSource, options: &ReproOptions) -> Result<ReproOutcome, VerifyError> {
    let run = match source {
        ReproSource::Core(options) => &options.run,
        ReproSource::Dumps(options) => &options.run,
    };
    if run.item.is_some() {
        return Err(VerifyError::Usage(
            "repro hands over the whole batch (--shrink cuts it to the worst element); --item does not apply"
                .into(),
        ));
    }
    refuse_occupied(&options.out)?;
    let (report, reference_dir) = match source {
        ReproSource::Core(verify_options) => {
            // The op alone: the core fed the reference's inputs.
            let isolated = VerifyOptions {
                mode: RunMode::Isolated,
                upto: None,
                ..verify_options.clone()
            };
            (verify(&isolated, &mut |_| {})?, verify_options.dump.clone())
        }
        ReproSource::Dumps(compare) => (
            compare_dumps(compare, &mut |_| {})?,
            compare.reference.clone(),
        ),
    };
    if report.reference_check.train_mode && report.summary.compared == 0 {
        return Err(VerifyError::Usage(
            "the reference is in train mode: verify refuses it, so there is no failure to hand over".into(),
        ));
    }
    let name = match (&options.stage, &report.summary.root, &report.summary.first_failure) {
        (Some(stage), _, _) => stage.clone(),
        (None, Some(root), _) => root.clone(),
        (None, None, Some(first)) => first.clone(),
        (None, None, None) => {
            return Ok(ReproOutcome {
                stage: String::new(),
                written: false,
                message: format!(
                    "every stage compared passes ({}): nothing to hand over; --stage NAME --force writes one anyway",
                    report.summary.compared
                ),
            })
        }
    };
    let reference = Dump::open(&reference_dir)?;
    let Some(stage_report) = report.stages.iter().find(|stage| stage.name == name) else {
        if reference.stage(&name).is_some() {
            return Err(VerifyError::Usage(format!(
                "--stage {name}: not compared in this run (--only or --fail-fast left it out)"
            )));
        }
        let names = report.stages.iter().map(|stage| stage.name.as_str());
        let similar = resnet_dump::similar_stage_names(&name, names, 3);
        return Err(VerifyError::Usage(format!(
            "--stage {name}: no such stage in the run{}",
            if similar.is_empty() {
                String::new()
            } else {
                format!("; did you mean {}?", similar.join(", "))
            }
        )));
    };
    let comparison = stage_report.primary().cloned();
    let passes = stage_report.verdict == crate::Verdict::Succ;
    if passes && !options.force {
        return Ok(ReproOutcome {
            stage: name.clone(),
            written: false,
            message: format!(
                "stage {name} passes: nothing written (--force writes its bundle anyway)"
            ),
        });
    }

    let network = adapter::network(
        &reference,
        &adapter::architecture(reference.architecture()?),
    )
    .map_err(|cause| VerifyError::Core {
        dump: reference_dir.clone(),
        cause,
    })?;
    let index = network.stage_index(&name).map_err(|_| {
        VerifyError::Usage(format!("--stage {name}: not a stage the core computes"))
    })?;
    let stage = &network.stages()[index];
    if stage.is_container() {
        return Err(VerifyError::Usage(format!(
            "stage {name} is a {}: its output is its last child's; hand over that stage (--stage)",
            if stage.kind == StageKind::Sequential {
                "layer"
            } else {
                "block"
            }
        )));
    }
    let load = |stage_name: &str| -> Result<ArrayD<f32>, VerifyError> {
        let entry = reference
            .stage(stage_name)
            .ok_or_else(|| VerifyError::Mismatch {
                dump: reference_dir.clone(),
                reason: format!("no stage {stage_name}, which {name} takes as input"),
            })?;
        Ok(reference.load_stage(entry)?.data)
    };
    let inputs: Vec<ArrayD<f32>> = network
        .stage_input_indices(index)
        .iter()
        .map(|&producer| load(&network.stages()[producer].name))
        .collect::<Result<_, _>>()?;
    let reference_output = load(&name)?;
    let candidate = match source {
        ReproSource::Core(_) => {
            let tensors: Vec<_> = inputs
                .iter()
                .map(|input| reference_tensor(input.view()))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    VerifyError::Usage(format!("stage {name}: inputs the core cannot take"))
                })?;
            let borrowed: Vec<_> = tensors.iter().collect();
            let output =
                network
                    .run_stage(index, &borrowed)
                    .map_err(|cause| VerifyError::Core {
                        dump: reference_dir.clone(),
                        cause,
                    })?;
            candidate_nchw(&output, reference_output.shape()).ok_or_else(|| {
                VerifyError::Usage(format!("stage {name}: the core's output has another shape"))
            })?
        }
        ReproSource::Dumps(compare) => {
            let other = Dump::open(&compare.candidate)?;
            let entry = other.stage(&name).ok_or_else(|| VerifyError::Mismatch {
                dump: compare.candidate.clone(),
                reason: format!("no stage {name}"),
            })?;
            let layout = compare.layout.unwrap_or(other.manifest().layout);
            layout
                .to_nchw(other.load_stage(entry)?.data)
                .as_standard_layout()
                .to_owned()
        }
    };
    let module = stage.module.clone();
    let mut weights = Vec::new();
    for entry in &reference.manifest().weights {
        if let Some(parameter) = entry.name.strip_prefix(&format!("{module}.")) {
            if let Some(array) = reference.load_weight(&entry.name)? {
                weights.push((parameter.to_string(), array));
            }
        }
    }
    let entry = reference.stage(&name).expect("loaded above");
    let core = core_op(&network, index)
        .ok_or_else(|| VerifyError::Usage(format!("stage {name}: no op to hand over")))?;
    let tolerance = stage_tolerance(&report, stage_report, comparison.as_ref());
    let mut case = Case {
        stage: name.clone(),
        module_type: entry.module_type.to_string(),
        params: entry.params.clone(),
        core,
        inputs: Vec::new(),
        weights: Default::default(),
        reference: "reference.npy".into(),
        candidate: "candidate.npy".into(),
        tolerance,
        rule: report.tolerance.describe(),
        verdict: verdict_of(stage_report, comparison.as_ref()),
        hints: stage_report
            .hints
            .iter()
            .map(|hint| hint.message.clone())
            .collect(),
        source: match source {
            ReproSource::Core(options) => format!(
                "verify repro {}: the core fed the reference's inputs (as verify --isolate)",
                options.dump.display()
            ),
            ReproSource::Dumps(options) => format!(
                "verify repro compare {} {}",
                options.reference.display(),
                options.candidate.display()
            ),
        },
        shrunk: None,
    };
    let mut arrays = CaseArrays {
        inputs,
        weights,
        reference: reference_output,
        candidate,
    };
    let full_size = arrays.bytes();
    if options.shrink {
        let worst = most_failing(&arrays, &case.tolerance);
        let batch_statistics = (stage_report.hints.iter())
            .any(|hint| hint.hypothesis == crate::diagnosis::Hypothesis::BatchStatistics);
        let needs_whole = batch_statistics
            .then_some("a BatchNorm with batch statistics depends on the whole batch and map");
        // Cut a copy: a cut that fails leaves the case whole.
        let mut cut_case = case.clone();
        case.shrunk = Some(
            match shrink::shrink(&mut cut_case, &arrays, worst.as_deref(), needs_whole) {
                Ok(smaller) => {
                    arrays = smaller;
                    case = cut_case;
                    format!(
                        "shrunk to the worst element's receptive field: arrays {} -> {}",
                        human(full_size),
                        human(arrays.bytes())
                    )
                }
                Err(why) => format!("not shrunk ({why}): the whole stage, {}", human(full_size)),
            },
        );
    }
    write_bundle(&options.out, &mut case, &arrays)?;
    let mut message = format!(
        "wrote {}: stage {name} ({}), {} inputs, {} weights, {}",
        options.out.display(),
        case.module_type,
        arrays.inputs.len(),
        arrays.weights.len(),
        human(arrays.bytes())
    );
    if let Some(shrunk) = &case.shrunk {
        message.push_str(&format!("; {shrunk}"));
    }
    message.push_str(&format!(
        "\nrun it: cd {} && pytest test_repro.py    (and: verify case {})",
        options.out.display(),
        options.out.display()
    ));
    Ok(ReproOutcome {
        stage: name,
        written: true,
        message,
    })
}

impl CaseArrays {
    fn bytes(&self) -> u64 {
        let count = |array: &ArrayD<f32>| array.len() as u64 * 4;
        self.inputs.iter().map(count).sum::<u64>()
            + self
                .weights
                .iter()
                .map(|(_, array)| count(array))
                .sum::<u64>()
            + count(&self.reference)
            + count(&self.candidate)
    }
}

/// The element furthest outside the rule, `|c - r| / (atol + rtol * |r|)`
/// (a NaN or Inf mismatch first): the one a cut case keeps. `None` when the
/// shapes differ or every element passes.
fn most_failing(arrays: &CaseArrays, rule: &CaseTolerance) -> Option<Vec<usize>> {
    let (reference, candidate) = (&arrays.reference, &arrays.candidate);
    if reference.shape() != candidate.shape() {
        return None;
    }
    let mut worst: Option<(f64, Vec<usize>)> = None;
    for ((index, &r), &c) in reference.indexed_iter().zip(candidate.iter()) {
        let (r, c) = (r as f64, c as f64);
        let error = (c - r).abs();
        let bound = rule.atol + rule.rtol * r.abs();
        let badness = if !error.is_finite() {
            let matches =
                r.to_bits() == c.to_bits() || (rule.equal_nan && r.is_nan() && c.is_nan());
            if matches {
                continue;
            }
            f64::INFINITY
        } else if error <= bound {
            continue;
        } else {
            error / bound.max(f64::MIN_POSITIVE)
        };
        if worst.as_ref().is_none_or(|(most, _)| badness > *most) {
            worst = Some((badness, index.as_array_view().to_vec()));
        }
    }
    worst.map(|(_, index)| index)
}

fn human(bytes: u64) -> String {
    match bytes {
        0..1_000 => format!("{bytes} B"),
        1_000..1_000_000 => format!("{:.1} KB", bytes as f64 / 1e3),
        _ => format!("{:.1} MB", bytes as f64 / 1e6),
    }
}

/// An output directory that holds anything is refused: nothing is overwritten.
fn refuse_occupied(out: &Path) -> Result<(), VerifyError> {
    match std::fs::read_dir(out) {
        Ok(entries) => match entries.count() {
            0 => Ok(()),
            _ => Err(VerifyError::Usage(format!(
                "--out {}: exists and is not empty; refusing to overwrite anything there",
                out.display()
            ))),
        },
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(VerifyError::Usage(format!(
            "--out {}: {error}",
            out.display()
        ))),
    }
}

fn core_op(network: &Network, index: usize) -> Option<CoreOp> {
    let stage = &network.stages()[index];
    Some(match stage.kind {
        StageKind::Conv2d => CoreOp::Conv2d {
            geometry: *stage.conv()?.geometry(),
        },
        StageKind::BatchNorm2d => CoreOp::BatchNorm {
            eps: network.architecture().batch_norm_eps_of(&stage.module),
        },
        StageKind::ReLU if network.stage_input_indices(index).len() == 2 => CoreOp::AddRelu,
        StageKind::ReLU => CoreOp::Relu,
        StageKind::MaxPool2d => CoreOp::MaxPool {
            pool: *stage.max_pool()?,
        },
        StageKind::AdaptiveAvgPool2d => CoreOp::AveragePool,
        StageKind::Linear => CoreOp::Linear,
        StageKind::Identity | StageKind::Dropout => CoreOp::Identity,
        _ => return None,
    })
}

/// The stage's rule as numbers: rtol and the absolute atol it had.
fn stage_tolerance(
    report: &Report,
    stage: &StageReport,
    comparison: Option<&Comparison>,
) -> CaseTolerance {
    let resolved = report
        .tolerance
        .for_stage(&stage.name, stage.floor.as_ref())
        .map(|stage| stage.tolerance)
        .unwrap_or_default();
    let scale = comparison.map_or(0.0, |c| c.scale);
    CaseTolerance {
        rtol: resolved.rtol,
        atol: resolved.atol_for(scale),
        equal_nan: resolved.equal_nan,
    }
}

fn verdict_of(stage: &StageReport, comparison: Option<&Comparison>) -> CaseVerdict {
    CaseVerdict {
        verdict: if stage.verdict == crate::Verdict::Succ {
            "succ"
        } else {
            "fail"
        }
        .into(),
        mismatched: comparison.map_or(0, |c| c.mismatched),
        elements: comparison.map_or(0, |c| c.elements),
        max_abs_error: comparison.map_or(0.0, |c| c.max_abs_error),
        relative_error: comparison.map_or(0.0, |c| c.relative_error),
        worst_index: comparison
            .and_then(|c| c.worst.as_ref())
            .map(|w| w.index.clone()),
    }
}

fn write_bundle(out: &Path, case: &mut Case, arrays: &CaseArrays) -> Result<(), VerifyError> {
    let io = |path: &Path, error: std::io::Error| {
        VerifyError::Usage(format!("cannot write {}: {error}", path.display()))
    };
    std::fs::create_dir_all(out.join("weights")).map_err(|e| io(out, e))?;
    let write = |file: &str, array: &ArrayD<f32>| -> Result<(), VerifyError> {
        let path = out.join(file);
        std::fs::write(&path, npy::encode_f32(array.view())).map_err(|e| io(&path, e))
    };
    case.inputs.clear();
    for (position, input) in arrays.inputs.iter().enumerate() {
        let file = format!("input_{position}.npy");
        write(&file, input)?;
        case.inputs.push(file);
    }
    case.weights.clear();
    for (name, array) in &arrays.weights {
        let file = format!("weights/{name}.npy");
        write(&file, array)?;
        case.weights.insert(name.clone(), file);
    }
    write(&case.reference, &arrays.reference)?;
    write(&case.candidate, &arrays.candidate)?;
    let text = serde_json::to_string_pretty(case).expect("a case serialises") + "\n";
    let path = out.join("case.json");
    std::fs::write(&path, text).map_err(|e| io(&path, e))?;
    let path = out.join("test_repro.py");
    std::fs::write(&path, TEST_REPRO).map_err(|e| io(&path, e))?;
    let path = out.join("README.md");
    std::fs::write(&path, readme(case)).map_err(|e| io(&path, e))?;
    Ok(())
}

fn readme(case: &Case) -> String {
    let v = &case.verdict;
    let mut text = format!(
        "# {}: {} ({})\n\n{} of {} elements out of tolerance (`|cand - ref| <= {:e} + {:e} * |ref|`), max abs error {:.3e}, relative {:.3e}",
        case.stage,
        v.verdict,
        case.module_type,
        v.mismatched,
        v.elements,
        case.tolerance.atol,
        case.tolerance.rtol,
        v.max_abs_error,
        v.relative_error
    );
    if let Some(index) = &v.worst_index {
        text.push_str(&format!(", worst at {index:?} (NCHW)"));
    }
    text.push_str(&format!(
        ".\n\nThe run's rule: {}.\n\nFrom: {}.\n",
        case.rule, case.source
    ));
    if let Some(shrunk) = &case.shrunk {
        text.push_str(&format!("Cut: {shrunk}.\n"));
    }
    if !case.hints.is_empty() {
        text.push_str("\nHints:\n\n");
        for hint in &case.hints {
            text.push_str(&format!("- {hint}\n"));
        }
    }
    text.push_str(
        "\nRun it:\n\n    pytest test_repro.py     # the torch check passes, the candidate check fails as verify did\n    verify case .            # the core on this stage alone\n\nFiles: `case.json` (the stage, its torch parameters, the rule), `input_*.npy` (the reference's inputs, NCHW; a residual add has two), `weights/*.npy` (torch layout), `reference.npy`, `candidate.npy`.\n",
    );
    text
}

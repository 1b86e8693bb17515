//! `resnet_verify._native`: the core and the harness, called in-process from
//! Python. The Python package `resnet_verify` wraps these functions; the
//! reports are the CLI's own (JSON text plus the text report), and errors
//! carry the CLI's messages.

use std::collections::HashMap;
use std::path::PathBuf;

use ndarray::ArrayD;
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use resnet_core::Network;
use resnet_dump::Dump;
use resnet_verify::adapter;
use resnet_verify::layout::{candidate_nchw, reference_tensor};
use resnet_verify::module_check;
use resnet_verify::report::text::Text;
use resnet_verify::report::{drive, json};
use resnet_verify::{
    verify_dump, AbsoluteTolerance, AutoTolerance, Report, RunMode, RunOptions, Tolerance,
    ToleranceRule, VerifyOptions,
};

create_exception!(
    _native,
    VerifyError,
    PyValueError,
    "Bad input: the message names the file or field, as the CLI's does."
);
create_exception!(
    _native,
    TrainModeError,
    VerifyError,
    "The reference (or the torch model) is in train mode."
);

fn error(message: impl std::fmt::Display) -> PyErr {
    VerifyError::new_err(message.to_string())
}

/// Runs verify on an opened dump; returns (JSON report, text report), or
/// raises TrainModeError with the CLI's message.
fn run_verify(py: Python<'_>, dump: &Dump, options: VerifyOptions) -> PyResult<(String, String)> {
    let (report, text): (Report, String) = py
        .detach(|| {
            let mut text = Text::new(options.mode, Vec::new());
            let report = drive(&mut [&mut text], |listener| {
                verify_dump(dump, &options, listener)
            })?;
            Ok::<_, resnet_verify::VerifyError>((report, text.plain()))
        })
        .map_err(error)?;
    if let Some(message) = report.reference_check.message() {
        if !options.run.allow_train_reference {
            return Err(TrainModeError::new_err(message));
        }
    }
    Ok((json::render(&report), text))
}

/// The bindings' `tol` and `cand_dtype`: `tol="auto"` (each stage's
/// tolerance from its noise floor), `tol=None` for atol/rtol.
#[derive(Clone, Debug, Default)]
struct Rule {
    tol: Option<String>,
    tol_multiple: Option<f64>,
    cand_dtype: Option<String>,
}

impl Rule {
    fn tolerance(
        &self,
        atol: Option<f64>,
        rtol: Option<f64>,
        equal_nan: bool,
    ) -> PyResult<ToleranceRule> {
        match self.tol.as_deref() {
            None => {
                if self.tol_multiple.is_some() || self.cand_dtype.is_some() {
                    return Err(error("tol_multiple and cand_dtype need tol=\"auto\""));
                }
                Tolerance::with_overrides(atol.map(AbsoluteTolerance::Fixed), rtol, equal_nan)
                    .map(ToleranceRule::Fixed)
                    .map_err(error)
            }
            Some("auto") => {
                if atol.is_some() || rtol.is_some() {
                    return Err(error(
                        "tol=\"auto\" sets each stage's atol and rtol; give neither",
                    ));
                }
                let mut rule =
                    AutoTolerance::with_multiple(self.tol_multiple, equal_nan).map_err(error)?;
                if let (ToleranceRule::Auto(auto), Some(dtype)) = (&mut rule, &self.cand_dtype) {
                    auto.candidate_dtype = serde_json::from_value(serde_json::Value::String(
                        dtype.clone(),
                    ))
                    .map_err(|_| {
                        error(format!(
                            "cand_dtype {dtype:?}: expected float32, float16 or bfloat16"
                        ))
                    })?;
                }
                Ok(rule)
            }
            Some(other) => Err(error(format!(
                "tol {other:?}: the only rule by name is \"auto\" (or give atol/rtol)"
            ))),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn options(
    label: PathBuf,
    upto: Option<String>,
    isolate: bool,
    atol: Option<f64>,
    rtol: Option<f64>,
    rule: &Rule,
    allow_train_reference: bool,
) -> PyResult<VerifyOptions> {
    if rule.cand_dtype.is_some() {
        return Err(error(
            "cand_dtype is for compare(): here the candidate is the core, which computes in float32",
        ));
    }
    Ok(VerifyOptions {
        dump: label,
        upto,
        mode: if isolate {
            RunMode::Isolated
        } else {
            RunMode::Cumulative
        },
        run: RunOptions {
            tolerance: rule.tolerance(atol, rtol, false)?,
            allow_train_reference,
            ..RunOptions::default()
        },
    })
}

/// verify(dump_dir, upto=None, isolate=False, atol=None, rtol=None, allow_train_reference=False, tol=None, tol_multiple=None, cand_dtype=None) -> (json, text)
#[pyfunction]
#[pyo3(signature = (dump_dir, upto=None, isolate=false, atol=None, rtol=None, allow_train_reference=false, tol=None, tol_multiple=None, cand_dtype=None))]
#[allow(clippy::too_many_arguments)]
fn verify(
    py: Python<'_>,
    dump_dir: PathBuf,
    upto: Option<String>,
    isolate: bool,
    atol: Option<f64>,
    rtol: Option<f64>,
    allow_train_reference: bool,
    tol: Option<String>,
    tol_multiple: Option<f64>,
    cand_dtype: Option<String>,
) -> PyResult<(String, String)> {
    let dump = Dump::open(&dump_dir).map_err(error)?;
    let rule = Rule {
        tol,
        tol_multiple,
        cand_dtype,
    };
    run_verify(
        py,
        &dump,
        options(
            dump_dir,
            upto,
            isolate,
            atol,
            rtol,
            &rule,
            allow_train_reference,
        )?,
    )
}

/// The arrays of a dict, read as f32 (one copy: the core keeps its own).
fn arrays(dict: &Bound<'_, PyDict>) -> PyResult<HashMap<String, ArrayD<f32>>> {
    let mut arrays = HashMap::with_capacity(dict.len());
    for (name, array) in dict.iter() {
        let name: String = name.extract()?;
        let array: PyReadonlyArrayDyn<'_, f32> = array
            .extract()
            .map_err(|_| error(format!("`{name}`: expected a float32 numpy array")))?;
        arrays.insert(name, array.as_array().to_owned());
    }
    Ok(arrays)
}

/// verify_arrays(label, manifest_json, arrays, upto=None, isolate=False, atol=None, rtol=None, tol=None, tol_multiple=None, cand_dtype=None) -> (json, text)
///
/// A dump held in memory: `arrays` maps each manifest `file` to its array.
#[pyfunction]
#[pyo3(signature = (label, manifest_json, arrays_by_file, upto=None, isolate=false, atol=None, rtol=None, tol=None, tol_multiple=None, cand_dtype=None))]
#[allow(clippy::too_many_arguments)]
fn verify_arrays(
    py: Python<'_>,
    label: &str,
    manifest_json: &str,
    arrays_by_file: &Bound<'_, PyDict>,
    upto: Option<String>,
    isolate: bool,
    atol: Option<f64>,
    rtol: Option<f64>,
    tol: Option<String>,
    tol_multiple: Option<f64>,
    cand_dtype: Option<String>,
) -> PyResult<(String, String)> {
    let dump = Dump::from_memory(label, manifest_json, arrays(arrays_by_file)?).map_err(error)?;
    let rule = Rule {
        tol,
        tol_multiple,
        cand_dtype,
    };
    run_verify(
        py,
        &dump,
        options(
            PathBuf::from(label),
            upto,
            isolate,
            atol,
            rtol,
            &rule,
            false,
        )?,
    )
}

/// Every stage's output, NCHW (the logits `[N, classes]`), by stage name.
fn forward_outputs<'py>(
    py: Python<'py>,
    network: &Network,
    x: PyReadonlyArrayDyn<'_, f32>,
    upto: Option<String>,
) -> PyResult<Bound<'py, PyDict>> {
    if x.ndim() != 4 {
        return Err(error(format!(
            "x must be NCHW (4-D), got shape {:?}",
            x.shape()
        )));
    }
    // Said in the caller's NCHW terms: the core's own error speaks of the
    // NHWC tensor it was given, a permutation of what the caller wrote.
    let channels = network.architecture().in_channels;
    let [batch, given_channels, height, width] = [0, 1, 2, 3].map(|axis| x.shape()[axis]);
    if given_channels != channels || batch == 0 || height == 0 || width == 0 {
        let nhwc = if width == channels && given_channels != channels {
            " (NHWC? numpy: x.transpose(0, 3, 1, 2); torch: x.permute(0, 3, 1, 2))"
        } else {
            ""
        };
        return Err(error(format!(
            "x has shape {:?}: the network takes NCHW [N, {channels}, H, W], N, H and W at least 1{nhwc}",
            x.shape()
        )));
    }
    let input = reference_tensor(x.as_array()).ok_or_else(|| error("x must be NCHW"))?;
    let last = upto
        .map(|name| network.stage_index(&name))
        .transpose()
        .map_err(error)?;
    let mut outputs: Vec<(String, ArrayD<f32>)> = Vec::new();
    py.detach(|| {
        for step in network.steps(input, last) {
            let (stage, output) = step?;
            // torch's shapes: NCHW, and `[N, C]` after flatten for fc.
            let [n, c, h, w] = output.nchw_shape();
            let shape = if stage.is_flattened() {
                vec![n, c]
            } else {
                vec![n, c, h, w]
            };
            let nchw = candidate_nchw(&output, &shape).expect("the shape is the tensor's own");
            outputs.push((stage.name.clone(), nchw));
        }
        Ok::<_, resnet_core::CoreError>(())
    })
    .map_err(error)?;
    let result = PyDict::new(py);
    for (name, array) in outputs {
        let array: Bound<'py, PyArrayDyn<f32>> = array.into_pyarray(py);
        result.set_item(name, array)?;
    }
    Ok(result)
}

/// forward_dump(dump_dir, x, upto=None) -> dict[str, ndarray]
#[pyfunction]
#[pyo3(signature = (dump_dir, x, upto=None))]
fn forward_dump<'py>(
    py: Python<'py>,
    dump_dir: PathBuf,
    x: PyReadonlyArrayDyn<'_, f32>,
    upto: Option<String>,
) -> PyResult<Bound<'py, PyDict>> {
    let dump = Dump::open(&dump_dir).map_err(error)?;
    let network = adapter::network(
        &dump,
        &adapter::architecture(dump.architecture().map_err(error)?),
    )
    .map_err(|source| error(format!("{}: {source}", dump_dir.display())))?;
    if let Some(reason) = module_check::refusal(&network, &dump) {
        return Err(error(format!("{}: {reason}", dump_dir.display())));
    }
    forward_outputs(py, &network, x, upto)
}

/// forward_arrays(architecture_json, weights, x, upto=None) -> dict[str, ndarray]
#[pyfunction]
#[pyo3(signature = (architecture_json, weights, x, upto=None))]
fn forward_arrays<'py>(
    py: Python<'py>,
    architecture_json: &str,
    weights: &Bound<'_, PyDict>,
    x: PyReadonlyArrayDyn<'_, f32>,
    upto: Option<String>,
) -> PyResult<Bound<'py, PyDict>> {
    let architecture: resnet_dump::Architecture =
        serde_json::from_str(architecture_json).map_err(|e| error(format!("architecture: {e}")))?;
    let weights = arrays(weights)?;
    let network =
        Network::from_weights(&adapter::architecture(&architecture), &weights).map_err(error)?;
    network
        .check_all_weights_read(weights.keys().map(String::as_str))
        .map_err(error)?;
    forward_outputs(py, &network, x, upto)
}

/// compare(reference, candidate, atol=None, rtol=None, equal_nan=False, tol=None, tol_multiple=None, cand_dtype=None, floor_json=None) -> json
#[pyfunction]
#[pyo3(signature = (reference, candidate, atol=None, rtol=None, equal_nan=false, tol=None, tol_multiple=None, cand_dtype=None, floor_json=None))]
#[allow(clippy::too_many_arguments)]
fn compare(
    reference: PyReadonlyArrayDyn<'_, f32>,
    candidate: PyReadonlyArrayDyn<'_, f32>,
    atol: Option<f64>,
    rtol: Option<f64>,
    equal_nan: bool,
    tol: Option<String>,
    tol_multiple: Option<f64>,
    cand_dtype: Option<String>,
    floor_json: Option<String>,
) -> PyResult<String> {
    if reference.shape() != candidate.shape() {
        return Err(error(format!(
            "shapes differ: reference {:?}, candidate {:?}",
            reference.shape(),
            candidate.shape()
        )));
    }
    // Views when both are C-contiguous; a copy only for strided arrays.
    let (reference_view, candidate_view) = (reference.as_array(), candidate.as_array());
    let reference_data = reference_view.as_standard_layout();
    let candidate_data = candidate_view.as_standard_layout();
    let rule = Rule {
        tol,
        tol_multiple,
        cand_dtype,
    }
    .tolerance(atol, rtol, equal_nan)?;
    let floor: Option<resnet_dump::NoiseFloor> = floor_json
        .map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|e| {
            error(format!(
                "floor: {e}; give the float64 result as an array, or a manifest stage's floor \
                 (max_abs, scale, relative, rms)"
            ))
        })?;
    let tolerance = rule
        .for_stage("the reference", floor.as_ref())
        .map_err(|_| error("tol=\"auto\" needs the reference's noise floor: floor= (a float64 array of the exact result, or a manifest stage's `floor`)"))?;
    let comparison = resnet_verify::compare_for_report(
        reference_data.as_slice().expect("standard layout"),
        candidate_data.as_slice().expect("standard layout"),
        reference.shape(),
        &tolerance,
    );
    serde_json::to_string(&comparison).map_err(error)
}

/// repro(out, dump_dir=None, reference=None, candidate=None, stage=None, shrink=False, force=False, atol=None, rtol=None, tol=None, tol_multiple=None, cand_dtype=None) -> (stage, written, message)
#[pyfunction]
#[pyo3(signature = (out, dump_dir=None, reference=None, candidate=None, stage=None, shrink=false, force=false, atol=None, rtol=None, tol=None, tol_multiple=None, cand_dtype=None))]
#[allow(clippy::too_many_arguments)]
fn repro(
    py: Python<'_>,
    out: PathBuf,
    dump_dir: Option<PathBuf>,
    reference: Option<PathBuf>,
    candidate: Option<PathBuf>,
    stage: Option<String>,
    shrink: bool,
    force: bool,
    atol: Option<f64>,
    rtol: Option<f64>,
    tol: Option<String>,
    tol_multiple: Option<f64>,
    cand_dtype: Option<String>,
) -> PyResult<(String, bool, String)> {
    if cand_dtype.is_some() && dump_dir.is_some() {
        return Err(error(
            "cand_dtype is for another engine's dump: with dump_dir the candidate is the core, which computes in float32",
        ));
    }
    let run = RunOptions {
        tolerance: Rule {
            tol,
            tol_multiple,
            cand_dtype,
        }
        .tolerance(atol, rtol, false)?,
        ..RunOptions::default()
    };
    let source = match (dump_dir, reference, candidate) {
        (Some(dump), None, None) => resnet_verify::ReproSource::Core(VerifyOptions {
            dump,
            upto: None,
            mode: RunMode::Isolated,
            run,
        }),
        (None, Some(reference), Some(candidate)) => {
            resnet_verify::ReproSource::Dumps(resnet_verify::CompareOptions {
                reference,
                candidate,
                layout: None,
                candidate_dtype: None,
                run,
            })
        }
        _ => {
            return Err(error(
                "repro: give dump_dir (the core's failure) or reference and candidate (another engine's)",
            ))
        }
    };
    let options = resnet_verify::ReproOptions {
        out,
        stage,
        shrink,
        force,
    };
    let outcome = py
        .detach(|| resnet_verify::repro(&source, &options))
        .map_err(error)?;
    Ok((outcome.stage, outcome.written, outcome.message))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("VerifyError", m.py().get_type::<VerifyError>())?;
    m.add("TrainModeError", m.py().get_type::<TrainModeError>())?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(verify_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(forward_dump, m)?)?;
    m.add_function(wrap_pyfunction!(forward_arrays, m)?)?;
    m.add_function(wrap_pyfunction!(compare, m)?)?;
    m.add_function(wrap_pyfunction!(repro, m)?)?;
    Ok(())
}

//! Writing an engine's stage outputs as a candidate dump, for `verify
//! compare REF_DIR CAND_DIR`, with nothing but this crate:
//!
//! ```no_run
//! # fn main() -> Result<(), resnet_dump::WriteError> {
//! use resnet_dump::{CandidateWriter, Layout};
//! # let conv1 = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 64, 112, 112]));
//! let mut writer = CandidateWriter::create("out/my-engine", Layout::NCHW)?;
//! writer.stage("conv1", "Conv2d", conv1.view())?;
//! writer.close()?;
//! # Ok(())
//! # }
//! ```
//!
//! Only float32 arrays can be written, and nothing after `close`: both are
//! compile errors.
//!
//! ```compile_fail
//! # use resnet_dump::{CandidateWriter, Layout};
//! let mut writer = CandidateWriter::create("out", Layout::NCHW).unwrap();
//! let wide = ndarray::ArrayD::<f64>::zeros(ndarray::IxDyn(&[1, 2]));
//! writer.stage("fc", "Linear", wide.view()).unwrap();
//! ```
//!
//! ```compile_fail
//! # use resnet_dump::{CandidateWriter, Layout};
//! let mut writer = CandidateWriter::create("out", Layout::NCHW).unwrap();
//! writer.close().unwrap();
//! let logits = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 2]));
//! writer.stage("fc", "Linear", logits.view()).unwrap();
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::ArrayViewD;
use serde_json::json;
use thiserror::Error;

use crate::npy::encode_f32;
use crate::{similar_stage_names, Layout, Manifest, FORMAT_NAME, SCHEMA_VERSION};

/// A stage the writer refuses, or a file it cannot write.
#[derive(Debug, Error)]
pub enum WriteError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error(
        "{path}: holds {holds}, so it is not a candidate written before; refusing to overwrite it"
    )]
    NotACandidate { path: PathBuf, holds: String },

    #[error("stage `{name}`: the reference has no stage of that name{near}")]
    UnknownStage { name: String, near: String },

    #[error("stage `{name}`: written already")]
    Duplicate { name: String },

    #[error("stage `{name}`: shape {found:?}, where the reference's is {expected:?}{stored}")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
        stored: String,
    },

    #[error("stage `{name}`: module type {found}, where the reference's is {expected}")]
    ModuleType {
        name: String,
        found: String,
        expected: String,
    },
}

/// Writes a candidate dump into a directory: [`CandidateWriter::stage`] for
/// each stage an engine computes, then [`CandidateWriter::close`], which
/// writes the manifest. Stage names are the reference's (`layer1.0.relu#2`
/// for a module's third call); [`CandidateWriter::checked_against`] checks
/// each name, module type and shape against the reference as it is written.
pub struct CandidateWriter {
    dir: PathBuf,
    layout: Layout,
    /// The reference's module type and NCHW shape of each stage, by name.
    expected: Option<HashMap<String, (String, Vec<usize>)>>,
    /// The reference's stage names, in its order.
    order: Vec<String>,
    stages: Vec<serde_json::Value>,
}

impl CandidateWriter {
    /// A writer into `dir`, which is created, or replaced if it holds a
    /// candidate written before (a directory with anything else in it, a
    /// reference dump among them, is refused). `layout`: how 4-D stages are
    /// stored.
    pub fn create(dir: impl AsRef<Path>, layout: Layout) -> Result<Self, WriteError> {
        let dir = dir.as_ref().to_path_buf();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |cause| WriteError::Io { path, cause }
        };
        // Only a candidate written before (a manifest and its stages) is
        // replaced: never a reference (it has weights/), never anything else.
        if dir.exists() {
            let mut held = Vec::new();
            for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
                held.push(
                    entry
                        .map_err(io(&dir))?
                        .file_name()
                        .to_string_lossy()
                        .into_owned(),
                );
            }
            held.sort();
            let other: Vec<&String> = held
                .iter()
                .filter(|name| *name != "manifest.json" && *name != "stages")
                .collect();
            let has_manifest = held.iter().any(|name| name == "manifest.json");
            if !other.is_empty() || (!held.is_empty() && !has_manifest) {
                let shown: Vec<&String> = if other.is_empty() {
                    held.iter().collect()
                } else {
                    other
                };
                return Err(WriteError::NotACandidate {
                    path: dir,
                    holds: shown
                        .iter()
                        .take(3)
                        .map(|name| name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            // A manifest left behind would name files that are gone.
            let (stages, manifest) = (dir.join("stages"), dir.join("manifest.json"));
            if stages.exists() {
                std::fs::remove_dir_all(&stages).map_err(io(&stages))?;
            }
            if manifest.exists() {
                std::fs::remove_file(&manifest).map_err(io(&manifest))?;
            }
        }
        let stages = dir.join("stages");
        std::fs::create_dir_all(&stages).map_err(io(&stages))?;
        Ok(CandidateWriter {
            dir,
            layout,
            expected: None,
            order: Vec::new(),
            stages: Vec::new(),
        })
    }

    /// Checks every stage written against `reference` (its manifest): the
    /// name must be one of its stages', and the module type and shape that
    /// stage's (the shape in this writer's layout).
    pub fn checked_against(mut self, reference: &Manifest) -> Self {
        let expected = reference
            .stages
            .iter()
            .map(|stage| {
                let shape = reference.layout.to_nchw_shape(&stage.shape);
                (
                    stage.name.clone(),
                    (stage.module_type.as_str().to_string(), shape),
                )
            })
            .collect();
        self.expected = Some(expected);
        self.order = reference
            .stages
            .iter()
            .map(|stage| stage.name.clone())
            .collect();
        self
    }

    /// Writes `array` (float32) as the output of stage `name`, a
    /// `module_type` (torch's class name: Conv2d, BatchNorm2d, ReLU, ...).
    pub fn stage(
        &mut self,
        name: &str,
        module_type: &str,
        array: ArrayViewD<'_, f32>,
    ) -> Result<(), WriteError> {
        if self.stages.iter().any(|stage| stage["name"] == name) {
            return Err(WriteError::Duplicate { name: name.into() });
        }
        if let Some(expected) = &self.expected {
            let Some((expected_type, nchw)) = expected.get(name) else {
                let near = similar_stage_names(name, self.order.iter().map(String::as_str), 8);
                let near = if near.is_empty() {
                    String::new()
                } else {
                    format!("; did you mean {}?", near.join(", "))
                };
                return Err(WriteError::UnknownStage {
                    name: name.into(),
                    near,
                });
            };
            if expected_type != module_type {
                return Err(WriteError::ModuleType {
                    name: name.into(),
                    found: module_type.into(),
                    expected: expected_type.clone(),
                });
            }
            let stored = self.layout.stored_shape(nchw);
            if array.shape() != stored.as_slice() {
                return Err(WriteError::Shape {
                    name: name.into(),
                    found: array.shape().to_vec(),
                    expected: nchw.clone(),
                    stored: if &stored == nchw {
                        " (NCHW)".into()
                    } else {
                        format!(" (NCHW), {stored:?} stored {:?}", self.layout)
                    },
                });
            }
        }
        let file = format!(
            "stages/{:03}_{}.npy",
            self.stages.len(),
            name.replace('#', "@")
        );
        let path = self.dir.join(&file);
        std::fs::write(&path, encode_f32(array.view()))
            .map_err(|cause| WriteError::Io { path, cause })?;
        self.stages.push(json!({
            "name": name,
            "module_type": module_type,
            "shape": array.shape(),
            "file": file,
        }));
        Ok(())
    }

    /// Writes manifest.json; returns the candidate's directory.
    pub fn close(self) -> Result<PathBuf, WriteError> {
        let manifest = json!({
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "producer": {"tool": "resnet_dump::CandidateWriter (Rust)"},
            "mode": "eval",
            "layout": self.layout,
            "stages": self.stages,
        });
        let path = self.dir.join("manifest.json");
        let text = serde_json::to_string_pretty(&manifest).expect("a JSON value") + "\n";
        std::fs::write(&path, text).map_err(|cause| WriteError::Io { path, cause })?;
        Ok(self.dir)
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{ArrayD, IxDyn};

    use super::*;
    use crate::Dump;

    fn reference() -> Manifest {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/resnet18-w8");
        Dump::open(&fixture).unwrap().manifest().clone()
    }

    fn zeros(shape: &[usize]) -> ArrayD<f32> {
        ArrayD::zeros(IxDyn(shape))
    }

    #[test]
    fn stages_are_checked_against_the_reference_as_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = CandidateWriter::create(dir.path().join("candidate"), Layout::NCHW)
            .unwrap()
            .checked_against(&reference());
        let conv1 = zeros(&[1, 8, 16, 16]);
        writer.stage("conv1", "Conv2d", conv1.view()).unwrap();
        let refusal = |result: Result<(), WriteError>| result.unwrap_err().to_string();
        assert_eq!(
            refusal(writer.stage("conv1", "Conv2d", conv1.view())),
            "stage `conv1`: written already"
        );
        assert_eq!(
            refusal(writer.stage("layer1.0.relu#3", "ReLU", conv1.view())),
            "stage `layer1.0.relu#3`: the reference has no stage of that name; did you mean layer1.0.relu#0, layer1.0.relu#1?"
        );
        assert_eq!(
            refusal(writer.stage("bn1", "BatchNorm2d", zeros(&[1, 16, 16, 8]).view())),
            "stage `bn1`: shape [1, 16, 16, 8], where the reference's is [1, 8, 16, 16] (NCHW)"
        );
        assert_eq!(
            refusal(writer.stage("bn1", "Conv2d", conv1.view())),
            "stage `bn1`: module type Conv2d, where the reference's is BatchNorm2d"
        );
        let written = writer.close().unwrap();
        let candidate = Dump::open(&written).unwrap();
        assert_eq!(candidate.manifest().stages.len(), 1);
        let loaded = candidate
            .load_stage(&candidate.manifest().stages[0])
            .unwrap();
        assert_eq!(loaded.data, conv1);
    }

    #[test]
    fn an_nhwc_candidate_stores_the_permuted_shape() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = CandidateWriter::create(dir.path(), Layout::NHWC)
            .unwrap()
            .checked_against(&reference());
        let refused = writer.stage("conv1", "Conv2d", zeros(&[1, 8, 16, 16]).view());
        assert_eq!(
            refused.unwrap_err().to_string(),
            "stage `conv1`: shape [1, 8, 16, 16], where the reference's is [1, 8, 16, 16] (NCHW), [1, 16, 16, 8] stored NHWC"
        );
        let nhwc = ArrayD::from_shape_fn(IxDyn(&[1, 16, 16, 8]), |i| {
            (i[1] * 100 + i[2] * 10 + i[3]) as f32
        });
        writer.stage("conv1", "Conv2d", nhwc.view()).unwrap();
        writer
            .stage("fc", "Linear", zeros(&[1, 10]).view())
            .unwrap();
        let candidate = Dump::open(&writer.close().unwrap()).unwrap();
        assert_eq!(candidate.manifest().layout, Layout::NHWC);
        let stored = candidate
            .load_stage(candidate.stage("conv1").unwrap())
            .unwrap();
        assert_eq!(stored.data, nhwc);
    }

    #[test]
    fn a_directory_that_is_not_a_candidate_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        let refused = CandidateWriter::create(dir.path(), Layout::NCHW)
            .err()
            .unwrap();
        assert_eq!(
            refused.to_string(),
            format!(
                "{}: holds notes.txt, so it is not a candidate written before; refusing to overwrite it",
                dir.path().display()
            )
        );
        let reference = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/resnet18-w8");
        assert!(CandidateWriter::create(&reference, Layout::NCHW).is_err());
        // A stages/ of someone else's, without a manifest, is not a candidate.
        let stages_only = dir.path().join("stages-only");
        std::fs::create_dir_all(stages_only.join("stages")).unwrap();
        std::fs::write(stages_only.join("stages/precious.txt"), "mine").unwrap();
        assert!(CandidateWriter::create(&stages_only, Layout::NCHW).is_err());
        assert!(stages_only.join("stages/precious.txt").exists());
        assert!(dir.path().join("notes.txt").exists());
        // A dump written before is replaced, old stages and all.
        let candidate = dir.path().join("candidate");
        let mut writer = CandidateWriter::create(&candidate, Layout::NCHW).unwrap();
        writer.stage("relu", "ReLU", zeros(&[1, 2]).view()).unwrap();
        writer.close().unwrap();
        let mut writer = CandidateWriter::create(&candidate, Layout::NCHW).unwrap();
        assert!(!candidate.join("stages/000_relu.npy").exists());
        assert!(!candidate.join("manifest.json").exists());
        writer.stage("fc", "Linear", zeros(&[1, 2]).view()).unwrap();
        writer.close().unwrap();
        let reopened = Dump::open(&candidate).unwrap();
        let stages = &reopened.manifest().stages;
        assert_eq!((stages.len(), stages[0].name.as_str()), (1, "fc"));
    }

    #[test]
    fn npy_files_are_aligned_and_read_back() {
        for shape in [&[][..], &[7], &[1, 10], &[2, 3, 4, 5], &[12_345_678, 0]] {
            let count = shape.iter().product::<usize>();
            let values = (0..count).map(|k| k as f32 - 0.5).collect();
            let array = ArrayD::from_shape_vec(IxDyn(shape), values).unwrap();
            let bytes = encode_f32(array.view());
            let header_end = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
            assert_eq!(header_end % 64, 0, "{shape:?}");
            assert_eq!(bytes.len(), header_end + array.len() * 4);
            assert_eq!(
                crate::npy::decode_f32(&bytes).unwrap().data,
                array,
                "{shape:?}"
            );
        }
    }
}

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::ArrayD;

use crate::manifest::{check_relative, Architecture, Manifest, ManifestProblem, StageEntry};
use crate::npy;
use crate::DumpError;

/// An opened dump whose manifest has been checked: a directory, or arrays
/// held in memory (a live torch model, through the Python bindings).
#[derive(Debug)]
pub struct Dump {
    root: PathBuf,
    manifest_path: PathBuf,
    manifest: Manifest,
    storage: Storage,
}

#[derive(Debug)]
enum Storage {
    Directory,
    /// Arrays under the names the manifest gives as their `file`.
    Memory(HashMap<String, ArrayD<f32>>),
}

/// A stage's data as stored (in the manifest's layout), and a note if it had
/// to be converted to f32.
#[derive(Debug)]
pub struct LoadedStage {
    pub data: ArrayD<f32>,
    pub converted_from: Option<String>,
}

impl Dump {
    /// Reads `DIR/manifest.json` and checks it: format, schema version,
    /// unique stage names, and file names that stay inside the directory.
    pub fn open(dir: &Path) -> Result<Dump, DumpError> {
        if !dir.exists() {
            return Err(DumpError::NoDirectory {
                path: dir.to_path_buf(),
            });
        }
        if !dir.is_dir() {
            return Err(DumpError::NotADirectory {
                path: dir.to_path_buf(),
            });
        }
        let manifest_path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&manifest_path).map_err(|cause| DumpError::Io {
            path: manifest_path.clone(),
            cause,
        })?;
        let manifest = parse_manifest(&text, &manifest_path)?;

        let root = dir.canonicalize().map_err(|cause| DumpError::Io {
            path: dir.to_path_buf(),
            cause,
        })?;
        Ok(Dump {
            root,
            manifest_path,
            manifest,
            storage: Storage::Directory,
        })
    }

    /// A dump whose arrays are already in memory: `arrays` maps each stage's
    /// and weight's `file` to its array. `label` names it in messages.
    pub fn from_memory(
        label: &str,
        manifest_text: &str,
        arrays: HashMap<String, ArrayD<f32>>,
    ) -> Result<Dump, DumpError> {
        let manifest_path = PathBuf::from(label);
        let manifest = parse_manifest(manifest_text, &manifest_path)?;
        Ok(Dump {
            root: manifest_path.clone(),
            manifest_path,
            manifest,
            storage: Storage::Memory(arrays),
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn manifest_path(&self) -> &Path {
        &self.manifest_path
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The architecture, required to run the core on this dump.
    pub fn architecture(&self) -> Result<&Architecture, DumpError> {
        self.manifest
            .architecture
            .as_ref()
            .ok_or_else(|| DumpError::Field {
                path: self.manifest_path.clone(),
                field: "architecture".into(),
                reason: "missing; the core needs it to build the network".into(),
            })
    }

    pub fn stage(&self, name: &str) -> Option<&StageEntry> {
        self.manifest.stages.iter().find(|stage| stage.name == name)
    }

    /// Reads a stage's file and checks it against the manifest's shape.
    pub fn load_stage(&self, stage: &StageEntry) -> Result<LoadedStage, DumpError> {
        let (path, array) =
            self.read_array(&stage.file, &format!("stages[{}].file", stage.name))?;
        if array.data.shape() != stage.shape.as_slice() {
            return Err(DumpError::StageShape {
                path,
                stage: stage.name.clone(),
                expected: stage.shape.clone(),
                found: array.data.shape().to_vec(),
            });
        }
        Ok(LoadedStage {
            data: array.data,
            converted_from: array.converted_from,
        })
    }

    /// Reads the weight the manifest lists as `name` and checks it against
    /// the manifest's shape; `None` if the manifest lists no such weight.
    pub fn load_weight(&self, name: &str) -> Result<Option<ArrayD<f32>>, DumpError> {
        let Some(index) = self
            .manifest
            .weights
            .iter()
            .position(|weight| weight.name == name)
        else {
            return Ok(None);
        };
        let entry = &self.manifest.weights[index];
        let (path, array) = self.read_array(&entry.file, &format!("weights[{index}].file"))?;
        if array.data.shape() != entry.shape.as_slice() {
            return Err(DumpError::Field {
                path,
                field: format!("weights[{index}].shape"),
                reason: format!(
                    "weight `{}` has shape {:?} in its file, but the manifest says {:?}",
                    entry.name,
                    array.data.shape(),
                    entry.shape
                ),
            });
        }
        Ok(Some(array.data))
    }

    /// The array a manifest's `file` names, and the path to name in errors.
    fn read_array(&self, file: &str, field: &str) -> Result<(PathBuf, npy::NpyArray), DumpError> {
        match &self.storage {
            Storage::Directory => {
                let path = self.resolve(file, field)?;
                let array = npy::read_f32(&path)?;
                Ok((path, array))
            }
            Storage::Memory(arrays) => {
                let path = self.root.join(file);
                let data = arrays.get(file).cloned().ok_or_else(|| DumpError::Field {
                    path: self.manifest_path.clone(),
                    field: field.into(),
                    reason: format!("no array was given for `{file}`"),
                })?;
                Ok((
                    path,
                    npy::NpyArray {
                        data,
                        converted_from: None,
                    },
                ))
            }
        }
    }

    /// Joins a manifest file name to the dump directory, refusing anything
    /// that leads out of it, symbolic links included.
    fn resolve(&self, file: &str, field: &str) -> Result<PathBuf, DumpError> {
        check_relative(file).map_err(|reason| DumpError::Field {
            path: self.manifest_path.clone(),
            field: field.into(),
            reason,
        })?;
        let joined = self.root.join(file);
        let real = joined.canonicalize().map_err(|cause| DumpError::Io {
            path: joined.clone(),
            cause,
        })?;
        if !real.starts_with(&self.root) {
            return Err(DumpError::Field {
                path: self.manifest_path.clone(),
                field: field.into(),
                reason: format!(
                    "`{file}` leads out of the dump directory (to {})",
                    real.display()
                ),
            });
        }
        Ok(real)
    }
}

/// Parses a manifest's text, naming `path` in any error.
fn parse_manifest(text: &str, path: &Path) -> Result<Manifest, DumpError> {
    Manifest::parse(text).map_err(|problem| match problem {
        ManifestProblem::Invalid(reason) => DumpError::Manifest {
            path: path.to_path_buf(),
            reason,
        },
        ManifestProblem::Field { field, reason } => DumpError::Field {
            path: path.to_path_buf(),
            field,
            reason,
        },
    })
}

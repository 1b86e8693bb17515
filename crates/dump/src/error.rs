use std::path::PathBuf;

use thiserror::Error;

/// A dump that cannot be used, and why. Every variant names the file.
#[derive(Debug, Error)]
pub enum DumpError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: not a valid .npy file: {reason}")]
    Npy { path: PathBuf, reason: String },

    #[error("{path}: invalid manifest: {reason}")]
    Manifest { path: PathBuf, reason: String },

    #[error("{path}: field `{field}`: {reason}")]
    Field {
        path: PathBuf,
        field: String,
        reason: String,
    },

    #[error("{path}: stage `{stage}` has shape {found:?}, but the manifest says {expected:?}")]
    StageShape {
        path: PathBuf,
        stage: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
}

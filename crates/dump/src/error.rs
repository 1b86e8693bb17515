use std::path::PathBuf;

use thiserror::Error;

/// A dump that cannot be used, and why. Every variant names the file.
#[derive(Debug, Error)]
pub enum DumpError {
    /// The cause is said in the message, once: it is not also the error's
    /// `source`, which a report of the whole chain would repeat.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{path}: no such directory")]
    NoDirectory { path: PathBuf },

    #[error("{path}: not a directory (a dump is a directory holding manifest.json)")]
    NotADirectory { path: PathBuf },

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

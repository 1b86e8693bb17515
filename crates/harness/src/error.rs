use std::path::PathBuf;

use resnet_core::CoreError;
use resnet_dump::DumpError;
use thiserror::Error;

/// Bad input or usage: `verify` exits with code 2 on any of these.
#[derive(Debug, Error)]
pub enum VerifyError {
    #[error(transparent)]
    Dump(#[from] DumpError),

    /// The cause is said in the message, once: it is not also the error's
    /// `source`, which a report of the whole chain would repeat.
    #[error("{dump}: {cause}")]
    Core { dump: PathBuf, cause: CoreError },

    #[error("{dump}: {reason}")]
    Mismatch { dump: PathBuf, reason: String },

    #[error("{0}")]
    Usage(String),
}

use std::path::PathBuf;

use resnet_core::CoreError;
use resnet_dump::DumpError;
use thiserror::Error;

/// Bad input or usage: `verify` exits with code 2 on any of these.
#[derive(Debug, Error)]
pub enum VerifyError {
    #[error(transparent)]
    Dump(#[from] DumpError),

    #[error("{dump}: {source}")]
    Core {
        dump: PathBuf,
        #[source]
        source: CoreError,
    },

    #[error("{dump}: {reason}")]
    Mismatch { dump: PathBuf, reason: String },

    #[error("{0}")]
    Usage(String),
}

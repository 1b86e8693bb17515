use thiserror::Error;

use crate::ops::ShapeError;

/// What can go wrong while building or running the network.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    #[error("weight `{name}` is missing")]
    MissingWeight { name: String },

    #[error("weight `{name}` has shape {found:?}, but the architecture needs {expected:?}")]
    WeightShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("weight `{name}` cannot be read: {reason}")]
    WeightSource { name: String, reason: String },

    #[error("unsupported architecture: {0}")]
    UnsupportedArchitecture(String),

    #[error("no stage is named `{0}`")]
    UnknownStage(String),

    #[error("input has shape {found:?} (NHWC), but the network needs {expected_channels} channels and a non-empty batch and image")]
    InputShape {
        found: Vec<usize>,
        expected_channels: usize,
    },

    #[error("stage `{stage}` takes {expected} input(s), {found} were given")]
    StageArity {
        stage: String,
        expected: usize,
        found: usize,
    },

    #[error("stage `{stage}` cannot take an input of shape {found:?} (NHWC): {reason}")]
    StageInputShape {
        stage: String,
        found: Vec<usize>,
        /// Boxed: a shape error holds shapes, and errors travel by value.
        reason: Box<ShapeError>,
    },
}

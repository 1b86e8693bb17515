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

    #[error(
        "{} weight(s) that the architecture does not use: {}. The model they come from has parts the core does not build (a conv with a bias, a module of its own?); built without them, the network would compute another model",
        .names.len(),
        listed(.names)
    )]
    UnusedWeights { names: Vec<String> },

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

/// The first eight of `names`, and how many more.
fn listed(names: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut text = names[..names.len().min(SHOWN)].join(", ");
    if names.len() > SHOWN {
        text += &format!(" and {} more", names.len() - SHOWN);
    }
    text
}

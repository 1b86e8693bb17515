//! Reference dumps on disk: the manifest, the stage activations and the
//! weights, read defensively. Dumps come from other people's scripts and
//! other engines, so nothing in them is trusted: file names must stay inside
//! the dump, `.npy` headers must agree with the file's size before anything
//! is allocated, and every error names the file and what is wrong.

mod dump;
mod error;
mod manifest;
pub mod npy;
mod writer;

pub use dump::{Dump, LoadedStage};
pub use error::DumpError;
pub use manifest::{
    similar_stage_names, Architecture, BlockKind, Head, InputInfo, Layout, Manifest,
    ManifestProblem, Mode, ModuleKind, NoiseFloor, NormLayer, Precision, StageEntry, TopClass,
    WeightEntry, FORMAT_NAME, SCHEMA_VERSION,
};
pub use writer::{CandidateWriter, WriteError};

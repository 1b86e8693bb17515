//! `manifest.json`, as docs/dump-format.md describes it.

use resnet_core::Architecture;
use serde::{Deserialize, Serialize};

pub const FORMAT_NAME: &str = "resnet-verify-dump";
pub const SCHEMA_VERSION: u32 = 1;

/// Whether the model ran with running statistics (`eval`) or with the
/// statistics of the batch (`train`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Eval,
    Train,
}

/// The memory order of the stage files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    NCHW,
    NHWC,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageEntry {
    pub name: String,
    pub module_type: String,
    #[serde(default)]
    pub module_path: String,
    #[serde(default)]
    pub call_index: usize,
    #[serde(default)]
    pub block: Option<String>,
    #[serde(default)]
    pub layer: Option<String>,
    pub shape: Vec<usize>,
    pub file: String,
    #[serde(default)]
    pub params: serde_json::Value,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WeightEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub file: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TopClass {
    pub index: usize,
    pub name: Option<String>,
    pub logit: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub schema_version: u32,
    /// A reference dump has one; a candidate written by another engine may not.
    #[serde(default)]
    pub model: Option<ModelInfo>,
    #[serde(default)]
    pub architecture: Option<Architecture>,
    pub mode: Mode,
    pub layout: Layout,
    pub stages: Vec<StageEntry>,
    #[serde(default)]
    pub weights: Vec<WeightEntry>,
    /// For each batch item, the five largest logits.
    #[serde(default)]
    pub top5: Vec<Vec<TopClass>>,
    /// The class names, for 1000-class models.
    #[serde(default)]
    pub classes: Option<Vec<String>>,
}

impl Manifest {
    pub fn model_name(&self) -> &str {
        self.model
            .as_ref()
            .map_or("unnamed model", |model| model.name.as_str())
    }
}

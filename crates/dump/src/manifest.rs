//! `manifest.json`, as docs/dump-format.md describes it.

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path};

use ndarray::{ArrayD, ArrayViewD, IxDyn};
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

/// The memory order of the stage files: every question about their axes
/// is answered here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Layout {
    NCHW,
    NHWC,
}

impl Layout {
    /// The order of a 4-D array's axes in memory: `order[k]` is the NCHW
    /// axis stored at position `k` (NHWC is `[0, 2, 3, 1]`).
    pub const fn axis_order(self) -> [usize; 4] {
        match self {
            Layout::NCHW => [0, 1, 2, 3],
            Layout::NHWC => [0, 2, 3, 1],
        }
    }

    /// A stored activation in NCHW order (4-D); other ranks (the logits
    /// `[N, features]`) are the same in every layout.
    pub fn to_nchw(self, array: ArrayD<f32>) -> ArrayD<f32> {
        match (self, array.ndim()) {
            (Layout::NHWC, 4) => array
                .permuted_axes(IxDyn(&[0, 3, 1, 2]))
                .as_standard_layout()
                .into_owned(),
            _ => array,
        }
    }

    /// The shape a stage of NCHW shape `nchw` is stored with (4-D; other
    /// ranks are the same in every layout).
    pub fn stored_shape(self, nchw: &[usize]) -> Vec<usize> {
        match nchw.len() {
            4 => self.axis_order().iter().map(|&axis| nchw[axis]).collect(),
            _ => nchw.to_vec(),
        }
    }

    /// The inverse of [`Layout::stored_shape`].
    pub fn to_nchw_shape(self, stored: &[usize]) -> Vec<usize> {
        let mut nchw = stored.to_vec();
        if stored.len() == 4 {
            for (position, &axis) in self.axis_order().iter().enumerate() {
                nchw[axis] = stored[position];
            }
        }
        nchw
    }

    /// The inverse of [`Layout::to_nchw`], without a copy: an NCHW array
    /// seen in the axis order of a file stored in this layout, so that
    /// iterating it walks the file's memory order.
    pub fn as_stored(self, nchw: &ArrayD<f32>) -> ArrayViewD<'_, f32> {
        match (self, nchw.ndim()) {
            (Layout::NHWC, 4) => nchw.view().permuted_axes(IxDyn(&self.axis_order()[..])),
            _ => nchw.view(),
        }
    }
}

impl std::str::FromStr for Layout {
    type Err = String;

    /// `nchw` or `nhwc`, in either case.
    fn from_str(name: &str) -> Result<Self, String> {
        match name.to_ascii_uppercase().as_str() {
            "NCHW" => Ok(Layout::NCHW),
            "NHWC" => Ok(Layout::NHWC),
            _ => Err(format!("{name}: not a layout (nchw, nhwc)")),
        }
    }
}

/// The residual block a network is built from, as torchvision names the
/// classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockKind {
    BasicBlock,
    Bottleneck,
}

/// The manifest's `architecture`: everything that distinguishes one
/// torchvision ResNet from another (docs/dump-format.md). The format only
/// records it; an engine decides whether it can run it.
/// A field it does not know is refused, not ignored: it may describe a
/// network other than the one built (the schema's `additionalProperties:
/// false`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Architecture {
    pub block: BlockKind,
    /// Blocks per stage (`layer1`, `layer2`, ...).
    pub layers: Vec<usize>,
    pub groups: usize,
    pub width_per_group: usize,
    /// Channels out of the stem (`conv1`); torchvision's `inplanes`.
    pub stem_channels: usize,
    /// torchvision's `planes` for each stage.
    pub planes: Vec<usize>,
    /// 0 where there is no classifier (`head` identity or none).
    pub num_classes: usize,
    pub in_channels: usize,
    /// The eps of every BatchNorm but those in `batch_norm_eps_overrides`.
    pub batch_norm_eps: f64,
    /// torchvision's `replace_stride_with_dilation`: one flag per layer
    /// after the first; absent: no layer is dilated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replace_stride_with_dilation: Vec<bool>,
    /// The BatchNorm class (torchvision's `norm_layer`); absent: BatchNorm2d.
    #[serde(default)]
    pub norm_layer: NormLayer,
    /// BatchNorms with an eps of their own, by module path.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub batch_norm_eps_overrides: BTreeMap<String, f64>,
    /// What follows the last layer; absent: `linear`.
    #[serde(default)]
    pub head: Head,
}

/// The BatchNorm class a model was built with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormLayer {
    #[default]
    BatchNorm2d,
    FrozenBatchNorm2d,
}

/// What follows the last layer: `linear` (`avgpool`, `fc` a Linear),
/// `dropout_linear` (`fc = Sequential(Dropout, Linear)`), `identity`
/// (`fc = Identity`), `none` (a backbone, ending at its last layer).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Head {
    #[default]
    Linear,
    DropoutLinear,
    Identity,
    None,
}

/// A stage's `module_type`: torch's `type(module).__name__`, `Input` for the
/// input. Any other name is kept as it is written.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum ModuleKind {
    Input,
    Conv2d,
    BatchNorm2d,
    /// torchvision.ops.misc's: eval-mode BatchNorm2d with fixed statistics.
    FrozenBatchNorm2d,
    /// The identity in eval mode.
    Dropout,
    Identity,
    ReLU,
    MaxPool2d,
    AdaptiveAvgPool2d,
    Linear,
    BasicBlock,
    Bottleneck,
    Sequential,
    Other(String),
}

impl ModuleKind {
    const NAMED: [ModuleKind; 13] = [
        ModuleKind::Input,
        ModuleKind::Conv2d,
        ModuleKind::BatchNorm2d,
        ModuleKind::FrozenBatchNorm2d,
        ModuleKind::Dropout,
        ModuleKind::Identity,
        ModuleKind::ReLU,
        ModuleKind::MaxPool2d,
        ModuleKind::AdaptiveAvgPool2d,
        ModuleKind::Linear,
        ModuleKind::BasicBlock,
        ModuleKind::Bottleneck,
        ModuleKind::Sequential,
    ];

    /// The name as the manifest writes it.
    pub fn as_str(&self) -> &str {
        match self {
            ModuleKind::Input => "Input",
            ModuleKind::Conv2d => "Conv2d",
            ModuleKind::BatchNorm2d => "BatchNorm2d",
            ModuleKind::FrozenBatchNorm2d => "FrozenBatchNorm2d",
            ModuleKind::Dropout => "Dropout",
            ModuleKind::Identity => "Identity",
            ModuleKind::ReLU => "ReLU",
            ModuleKind::MaxPool2d => "MaxPool2d",
            ModuleKind::AdaptiveAvgPool2d => "AdaptiveAvgPool2d",
            ModuleKind::Linear => "Linear",
            ModuleKind::BasicBlock => "BasicBlock",
            ModuleKind::Bottleneck => "Bottleneck",
            ModuleKind::Sequential => "Sequential",
            ModuleKind::Other(name) => name,
        }
    }

    /// A residual block (`BasicBlock` or `Bottleneck`).
    pub fn is_block(&self) -> bool {
        matches!(self, ModuleKind::BasicBlock | ModuleKind::Bottleneck)
    }
}

/// No name yet: a group whose closing stage has not been seen.
impl Default for ModuleKind {
    fn default() -> Self {
        ModuleKind::Other(String::new())
    }
}

impl From<String> for ModuleKind {
    fn from(name: String) -> Self {
        ModuleKind::NAMED
            .into_iter()
            .find(|kind| kind.as_str() == name)
            .unwrap_or(ModuleKind::Other(name))
    }
}

impl From<ModuleKind> for String {
    fn from(kind: ModuleKind) -> Self {
        match kind {
            ModuleKind::Other(name) => name,
            named => named.as_str().to_string(),
        }
    }
}

/// Pads like a string, so that `{:<18}` lines up.
impl std::fmt::Display for ModuleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageEntry {
    pub name: String,
    pub module_type: ModuleKind,
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
    /// How far the reference's own float32 result is from the same
    /// computation in float64 (`python -m reference.dump --floor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<NoiseFloor>,
}

/// A stage's float32 noise floor: the reference's float32 output against
/// the same weights and input computed in float64. What a correct float32
/// implementation can be expected to differ by, at this stage.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoiseFloor {
    /// `max|float32 - float64|` over the stage.
    pub max_abs: f64,
    /// `max|float64|` over the stage.
    pub scale: f64,
    /// `max_abs / scale` (0 when the stage is all zeros).
    pub relative: f64,
    /// The root mean square of `float32 - float64`.
    pub rms: f64,
}

/// A floor's figures as one measurement gives them: `relative` is
/// `max_abs / scale` (0 for an all-zero stage) and the root mean square of
/// the differences is no more than their largest. (A little slack: the
/// figures went through JSON, and the mean through rounding.)
fn floor_is_consistent(floor: &NoiseFloor) -> Result<(), (&'static str, String)> {
    const SLACK: f64 = 1e-9;
    if floor.rms > floor.max_abs * (1.0 + SLACK) {
        return Err((
            "rms",
            format!(
                "{:e} is more than max_abs ({:e}): a root mean square of differences is never \
                 more than the largest",
                floor.rms, floor.max_abs
            ),
        ));
    }
    let relative = if floor.scale > 0.0 {
        floor.max_abs / floor.scale
    } else {
        0.0
    };
    if (floor.relative - relative).abs() > SLACK * relative {
        return Err((
            "relative",
            format!(
                "{:e} is not max_abs / scale ({:e} / {:e} = {relative:e}): the figures are not \
                 of one measurement",
                floor.relative, floor.max_abs, floor.scale
            ),
        ));
    }
    Ok(())
}

/// The floating-point type a dump's values were computed in. Stage files
/// hold float32 (or float64) whatever it is: an engine computing in
/// float16 or bfloat16 stores its outputs widened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Float64,
    Float32,
    Float16,
    Bfloat16,
}

impl Precision {
    /// The unit roundoff: half the distance from 1 to the next number.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            Precision::Float64 => 2f64.powi(-53),
            Precision::Float32 => 2f64.powi(-24),
            Precision::Float16 => 2f64.powi(-11),
            Precision::Bfloat16 => 2f64.powi(-8),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Float64 => "float64",
            Precision::Float32 => "float32",
            Precision::Float16 => "float16",
            Precision::Bfloat16 => "bfloat16",
        }
    }
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

/// How the input image was preprocessed, as far as the harness needs it to
/// recognise another preprocessing in a candidate's input.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InputInfo {
    /// Per-channel mean subtracted after scaling to 0-1.
    #[serde(default)]
    pub mean: Option<Vec<f64>>,
    /// Per-channel std divided by after subtracting the mean.
    #[serde(default)]
    pub std: Option<Vec<f64>>,
    /// Channel order, `RGB` for torchvision's models.
    #[serde(default)]
    pub color: Option<String>,
    /// The image of each batch item, for a batch of real images (`--images`).
    #[serde(default)]
    pub images: Option<Vec<String>>,
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
    /// The preprocessing of the input stage; a candidate's may be absent.
    #[serde(default)]
    pub input: Option<InputInfo>,
    pub layout: Layout,
    /// What the values were computed in; absent (or a name this format
    /// does not know) means float32.
    #[serde(default, deserialize_with = "known_precision")]
    pub dtype: Option<Precision>,
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

/// A `dtype` the format names, else none: a candidate's own word for its
/// precision ("fp16") must not make its dump unreadable.
fn known_precision<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Precision>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(deserializer)?;
    Ok(value.and_then(|value| serde_json::from_value(value).ok()))
}

/// The stage names among `names` (in their order, at most `most`) that a
/// name not among them most likely meant: the calls of the same module
/// (`layer1.0.relu#0` for `layer1.0.relu#3`), else the stages under the
/// same top-level module (`layer1.0.conv1` for `layer1.9`); case and
/// underscores aside (`maxpool` for `max_pool`, `conv1` for `Conv1`).
pub fn similar_stage_names<'a>(
    name: &str,
    names: impl IntoIterator<Item = &'a str>,
    most: usize,
) -> Vec<&'a str> {
    let plain = |part: &str| part.to_lowercase().replace(['_', '-'], "");
    let module = |stage: &str| plain(stage.split('#').next().unwrap_or(stage));
    let top = |stage: &str| plain(stage.split(['.', '#']).next().unwrap_or(stage));
    let names: Vec<&str> = names.into_iter().collect();
    let calls: Vec<&str> = names
        .iter()
        .copied()
        .filter(|candidate| module(candidate) == module(name))
        .collect();
    let similar = if calls.is_empty() {
        names
            .iter()
            .copied()
            .filter(|candidate| top(candidate) == top(name))
            .collect()
    } else {
        calls
    };
    similar.into_iter().take(most).collect()
}

/// What is wrong with a manifest's text, found before any file is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestProblem {
    /// The document as a whole: not JSON, not ours, another version.
    Invalid(String),
    /// One field.
    Field { field: String, reason: String },
}

impl Manifest {
    /// Parses and checks a manifest: format, schema version, fields, unique
    /// stage and weight names, and file names that stay inside the dump.
    pub fn parse(text: &str) -> Result<Manifest, ManifestProblem> {
        let invalid = |reason: String| ManifestProblem::Invalid(reason);
        let raw: serde_json::Value = serde_json::from_str(text)
            .map_err(|error| invalid(format!("malformed JSON: {error}")))?;
        match raw.get("format").and_then(|format| format.as_str()) {
            Some(FORMAT_NAME) => {}
            Some(other) => {
                return Err(invalid(format!(
                    "format is `{other}`, expected `{FORMAT_NAME}`"
                )))
            }
            None => {
                return Err(invalid(format!(
                    "no `format` field; is this a {FORMAT_NAME} manifest?"
                )))
            }
        }
        match raw.get("schema_version").and_then(|version| version.as_u64()) {
            Some(version) if version == SCHEMA_VERSION as u64 => {}
            Some(version) => {
                return Err(invalid(format!("schema version {version} is not supported (this build reads version {SCHEMA_VERSION})")))
            }
            None => {
                return Err(invalid(match raw.get("schema_version") {
                    None => "no `schema_version` field".into(),
                    Some(other) => format!(
                        "`schema_version` is {other}, where a whole number ({SCHEMA_VERSION}) is expected"
                    ),
                }))
            }
        }
        let manifest: Manifest =
            serde_json::from_value(raw).map_err(|error| invalid(error.to_string()))?;
        manifest.check_entries()?;
        Ok(manifest)
    }

    fn check_entries(&self) -> Result<(), ManifestProblem> {
        let problem = |field: String, reason: String| ManifestProblem::Field { field, reason };
        if self.stages.is_empty() {
            return Err(problem("stages".into(), "no stages listed".into()));
        }
        let stages = self
            .stages
            .iter()
            .map(|s| (s.name.as_str(), s.file.as_str()));
        check_named_files("stages", "stage name", stages)?;
        // A floor sets the stage's tolerance under --tol auto: one that is
        // negative or not finite is a broken dump, said where it is.
        for (index, stage) in self.stages.iter().enumerate() {
            let Some(floor) = &stage.floor else { continue };
            let figures = [
                ("max_abs", floor.max_abs),
                ("scale", floor.scale),
                ("relative", floor.relative),
                ("rms", floor.rms),
            ];
            if let Some((name, value)) = figures
                .into_iter()
                .find(|(_, value)| !(value.is_finite() && *value >= 0.0))
            {
                return Err(problem(
                    format!("stages[{index}].floor.{name}"),
                    format!("must be a finite number >= 0, not {value}"),
                ));
            }
            if let Err((name, reason)) = floor_is_consistent(floor) {
                return Err(problem(format!("stages[{index}].floor.{name}"), reason));
            }
        }
        let weights = self
            .weights
            .iter()
            .map(|w| (w.name.as_str(), w.file.as_str()));
        check_named_files("weights", "weight", weights)
    }

    pub fn model_name(&self) -> &str {
        self.model
            .as_ref()
            .map_or("unnamed model", |model| model.name.as_str())
    }
}

/// The entries of the list `field` (name, file): unique names, and files
/// inside the dump.
fn check_named_files<'a>(
    field: &str,
    what: &str,
    entries: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<(), ManifestProblem> {
    let problem = |field: String, reason: String| ManifestProblem::Field { field, reason };
    let mut names = HashSet::new();
    for (index, (name, file)) in entries.enumerate() {
        if !names.insert(name) {
            let reason = format!("duplicate {what} `{name}`");
            return Err(problem(format!("{field}[{index}].name"), reason));
        }
        check_relative(file).map_err(|reason| problem(format!("{field}[{index}].file"), reason))?;
    }
    Ok(())
}

/// A manifest's file name must be relative and stay below the dump directory.
pub(crate) fn check_relative(file: &str) -> Result<(), String> {
    let path = Path::new(file);
    if file.is_empty() {
        return Err("empty file name".into());
    }
    if path.is_absolute() || path.has_root() {
        return Err(format!(
            "`{file}` is an absolute path; files must be relative to the dump directory"
        ));
    }
    if path
        .components()
        .any(|component| !matches!(component, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!("`{file}` leads out of the dump directory"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mistyped_stage_name_finds_the_names_it_meant() {
        let names = [
            "conv1",
            "layer1.0.conv1",
            "layer1.0.relu#0",
            "layer1.0.relu#1",
            "layer1.0",
            "layer2.0.conv1",
        ];
        let similar = |name| similar_stage_names(name, names, 8);
        assert_eq!(
            similar("layer1.0.relu#3"),
            ["layer1.0.relu#0", "layer1.0.relu#1"]
        );
        assert_eq!(
            similar("layer1.0.relu"),
            ["layer1.0.relu#0", "layer1.0.relu#1"]
        );
        assert_eq!(
            similar("layer1.9"),
            [
                "layer1.0.conv1",
                "layer1.0.relu#0",
                "layer1.0.relu#1",
                "layer1.0"
            ]
        );
        assert_eq!(similar_stage_names("layer1.9", names, 2).len(), 2);
        assert!(similar("layer9").is_empty());
        assert!(similar("").is_empty());
    }

    #[test]
    fn a_floor_whose_figures_are_not_of_one_measurement_is_refused() {
        let measured = NoiseFloor {
            max_abs: 3e-6,
            scale: 1.5,
            relative: 3e-6 / 1.5,
            rms: 1e-6,
        };
        assert_eq!(floor_is_consistent(&measured), Ok(()));
        let all_zero = NoiseFloor {
            max_abs: 0.0,
            scale: 0.0,
            relative: 0.0,
            rms: 0.0,
        };
        assert_eq!(floor_is_consistent(&all_zero), Ok(()));
        let loosened = NoiseFloor {
            max_abs: 1e30,
            ..measured
        };
        let (field, reason) = floor_is_consistent(&loosened).unwrap_err();
        assert_eq!(field, "relative");
        assert!(
            reason.starts_with("2e-6 is not max_abs / scale (1e30 / 1.5e0 = 6.666666666666666e29)"),
            "{reason}"
        );
        let (field, reason) = floor_is_consistent(&NoiseFloor {
            rms: 1e-5,
            ..measured
        })
        .unwrap_err();
        assert_eq!(field, "rms");
        assert!(
            reason.starts_with("1e-5 is more than max_abs (3e-6)"),
            "{reason}"
        );
    }

    #[test]
    fn module_kinds_keep_their_names() {
        for name in ["Conv2d", "Sequential", "ReLU", "Identity", "ReLU6", ""] {
            let kind = ModuleKind::from(name.to_string());
            assert_eq!(kind.as_str(), name);
            assert_eq!(String::from(kind.clone()), name);
            assert_eq!(format!("{kind:<4}|"), format!("{name:<4}|"));
        }
        assert_eq!(ModuleKind::from("Conv2d".to_string()), ModuleKind::Conv2d);
        assert_eq!(
            ModuleKind::from("ReLU6".to_string()),
            ModuleKind::Other("ReLU6".into())
        );
    }

    #[test]
    fn as_stored_walks_the_file_order_back() {
        let nhwc = ArrayD::from_shape_fn(IxDyn(&[2, 3, 4, 5]), |i| {
            (i[0] * 1000 + i[1] * 100 + i[2] * 10 + i[3]) as f32
        });
        let file_order: Vec<f32> = nhwc.iter().copied().collect();
        for layout in [Layout::NHWC, Layout::NCHW] {
            let nchw = layout.to_nchw(nhwc.clone());
            let stored = layout.as_stored(&nchw);
            assert_eq!(stored.shape(), nhwc.shape());
            assert_eq!(stored.iter().copied().collect::<Vec<_>>(), file_order);
        }
    }
}

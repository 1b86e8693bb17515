use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::CoreError;

/// The residual block a network is built from, named as torchvision names
/// the classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockKind {
    BasicBlock,
    Bottleneck,
}

impl BlockKind {
    /// How many times wider a block's output is than its `planes`.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::BasicBlock => 1,
            BlockKind::Bottleneck => 4,
        }
    }

    /// How many times the block's single `relu` module is called per forward.
    pub fn relu_calls(self) -> usize {
        match self {
            BlockKind::BasicBlock => 2,
            BlockKind::Bottleneck => 3,
        }
    }
}

/// The class torchvision's `norm_layer` built. Both normalise with fixed
/// statistics in eval mode, the only mode the core computes;
/// FrozenBatchNorm2d (torchvision.ops.misc, every detection backbone) has
/// no other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormLayer {
    #[default]
    BatchNorm2d,
    FrozenBatchNorm2d,
}

impl NormLayer {
    pub fn torch_name(self) -> &'static str {
        match self {
            NormLayer::BatchNorm2d => "BatchNorm2d",
            NormLayer::FrozenBatchNorm2d => "FrozenBatchNorm2d",
        }
    }
}

/// What follows the last layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Head {
    /// `avgpool`, then `fc`, a Linear: torchvision's classifier.
    #[default]
    Linear,
    /// `avgpool`, then `fc = Sequential(Dropout, Linear)`, the usual
    /// fine-tuning head (Dropout is the identity in eval mode).
    DropoutLinear,
    /// `avgpool`, then `fc = Identity`: the pooled features.
    Identity,
    /// Nothing after the last layer: a backbone (torchvision's
    /// IntermediateLayerGetter).
    None,
}

impl Head {
    /// Whether the head ends in a Linear with `num_classes` outputs.
    pub fn has_classifier(self) -> bool {
        matches!(self, Head::Linear | Head::DropoutLinear)
    }
}

/// Everything that distinguishes one torchvision ResNet from another, as the
/// dump manifest records it. torchvision's constructors map onto it like
/// this: resnet50 is `Bottleneck`, `[3, 4, 6, 3]`, groups 1, width per group
/// 64; resnext50_32x4d has groups 32, width per group 4; wide_resnet50_2 has
/// width per group 128. The width-reduced test models change
/// `stem_channels` and `planes`.
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
    /// Channels out of the stem (`conv1`); torchvision's `inplanes`, 64.
    pub stem_channels: usize,
    /// torchvision's `planes` for each stage: 64, 128, 256, 512.
    pub planes: Vec<usize>,
    pub num_classes: usize,
    pub in_channels: usize,
    /// The eps of every BatchNorm but those in `batch_norm_eps_overrides`.
    pub batch_norm_eps: f64,
    /// torchvision's `replace_stride_with_dilation`: for each layer after
    /// the first, whether its stride is replaced by dilation (the
    /// segmentation backbones: DeepLabV3, FCN). Empty: none is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replace_stride_with_dilation: Vec<bool>,
    #[serde(default)]
    pub norm_layer: NormLayer,
    /// BatchNorms with an eps of their own, by module path (`layer1.0.bn2`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub batch_norm_eps_overrides: BTreeMap<String, f64>,
    #[serde(default)]
    pub head: Head,
}

impl Architecture {
    /// The inner width of a Bottleneck with `planes`, exactly as torchvision
    /// computes it: `int(planes * (width_per_group / 64.)) * groups`.
    pub fn bottleneck_width(&self, planes: usize) -> usize {
        (planes * self.width_per_group / 64) * self.groups
    }

    /// The eps of the BatchNorm at module path `module`.
    pub fn batch_norm_eps_of(&self, module: &str) -> f64 {
        self.batch_norm_eps_overrides
            .get(module)
            .copied()
            .unwrap_or(self.batch_norm_eps)
    }

    /// Whether layer `index` (from 0) trades its stride for dilation.
    pub fn is_dilated(&self, index: usize) -> bool {
        index > 0
            && self
                .replace_stride_with_dilation
                .get(index - 1)
                .copied()
                .unwrap_or(false)
    }

    /// The smallest architecture whose network has stage `stage` under the
    /// same name and computes everything up to it as this one does: the
    /// layers up to its block, and no head. `None` where that is the whole
    /// network (the head's stages) or the name is not a stage's. A pass
    /// that stops at `stage` needs no more (`verify --upto`).
    pub fn up_to(&self, stage: &str) -> Option<Architecture> {
        // Digits only: `usize::from_str` also takes `+1`.
        let number = |text: &str| -> Option<usize> {
            text.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| text.parse().ok())?
        };
        let mut parts = stage.split(['.', '#']);
        let (layers, last_blocks) = match parts.next()? {
            "input" | "conv1" | "bn1" | "relu" | "maxpool" => (1, 1),
            first => {
                let layer = number(first.strip_prefix("layer")?)?;
                let blocks = match parts.next() {
                    Some(block) => number(block)?.checked_add(1)?,
                    None => *self.layers.get(layer.checked_sub(1)?)?,
                };
                (layer, blocks)
            }
        };
        if layers == 0 || layers > self.layers.len() || last_blocks > self.layers[layers - 1] {
            return None;
        }
        let mut truncated = self.clone();
        truncated.layers.truncate(layers);
        truncated.layers[layers - 1] = last_blocks;
        truncated.planes.truncate(layers);
        truncated.replace_stride_with_dilation.truncate(layers - 1);
        truncated.head = Head::None;
        // The BatchNorms cut off take their eps with them: the network
        // built has none of them (and refuses an eps for one it lacks).
        let cut_off = |module: &str| {
            let mut parts = module.split('.');
            let Some(layer) = parts
                .next()
                .and_then(|first| first.strip_prefix("layer"))
                .and_then(number)
            else {
                return false;
            };
            let block = parts.next().and_then(number);
            layer > layers || (layer == layers && block.is_some_and(|block| block >= last_blocks))
        };
        truncated
            .batch_norm_eps_overrides
            .retain(|module, _| !cut_off(module));
        Some(truncated)
    }

    /// Channels that leave the last stage and enter `fc`.
    pub fn feature_channels(&self) -> usize {
        self.planes.last().copied().unwrap_or(self.stem_channels) * self.block.expansion()
    }

    /// Refuses what torchvision itself refuses, and what the core cannot run.
    pub fn validate(&self) -> Result<(), CoreError> {
        let fail = |why: String| Err(CoreError::UnsupportedArchitecture(why));
        if self.layers.is_empty() || self.layers.len() != self.planes.len() {
            return fail(format!(
                "`layers` ({:?}) and `planes` ({:?}) must be non-empty and of equal length",
                self.layers, self.planes
            ));
        }
        if self.layers.contains(&0) {
            return fail(format!(
                "every stage needs at least one block, got {:?}",
                self.layers
            ));
        }
        let mut sizes = vec![
            ("groups", self.groups),
            ("width_per_group", self.width_per_group),
            ("stem_channels", self.stem_channels),
            ("in_channels", self.in_channels),
        ];
        if self.head.has_classifier() {
            sizes.push(("num_classes", self.num_classes));
        }
        if let Some((field, _)) = sizes.iter().find(|(_, value)| *value == 0) {
            return fail(format!("`{field}` must be at least 1"));
        }
        if self.planes.contains(&0) {
            return fail(format!(
                "`planes` must all be at least 1, got {:?}",
                self.planes
            ));
        }
        let all_eps = std::iter::once(("", self.batch_norm_eps)).chain(
            self.batch_norm_eps_overrides
                .iter()
                .map(|(module, &eps)| (module.as_str(), eps)),
        );
        for (module, eps) in all_eps {
            if !(eps.is_finite() && eps >= 0.0) {
                let which = match module {
                    "" => String::new(),
                    module => format!(" of {module}"),
                };
                return fail(format!(
                    "`batch_norm_eps`{which} must be finite and >= 0, got {eps}"
                ));
            }
        }
        let dilation = &self.replace_stride_with_dilation;
        if !dilation.is_empty() && dilation.len() + 1 != self.layers.len() {
            return fail(format!(
                "`replace_stride_with_dilation` ({dilation:?}) needs one flag per layer after the first ({})",
                self.layers.len() - 1
            ));
        }
        if self.block == BlockKind::BasicBlock && dilation.contains(&true) {
            return fail("BasicBlock does not support dilation (torchvision: \"Dilation > 1 not supported in BasicBlock\")".into());
        }
        match self.block {
            BlockKind::BasicBlock if self.groups != 1 || self.width_per_group != 64 => fail(
                "BasicBlock only supports groups=1 and width_per_group=64 (as in torchvision)"
                    .into(),
            ),
            BlockKind::Bottleneck => {
                for &planes in &self.planes {
                    if self.bottleneck_width(planes) == 0 {
                        return fail(format!(
                            "a Bottleneck with planes {planes}, width_per_group {} and groups {} has no channels",
                            self.width_per_group, self.groups
                        ));
                    }
                }
                Ok(())
            }
            BlockKind::BasicBlock => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn resnet50() -> Architecture {
        Architecture {
            block: BlockKind::Bottleneck,
            layers: vec![3, 4, 6, 3],
            groups: 1,
            width_per_group: 64,
            stem_channels: 64,
            planes: vec![64, 128, 256, 512],
            num_classes: 1000,
            in_channels: 3,
            batch_norm_eps: 1e-5,
            replace_stride_with_dilation: Vec::new(),
            norm_layer: NormLayer::BatchNorm2d,
            batch_norm_eps_overrides: BTreeMap::new(),
            head: Head::Linear,
        }
    }

    #[test]
    fn bottleneck_widths_follow_torchvision() {
        let resnet50 = resnet50();
        assert_eq!(resnet50.bottleneck_width(64), 64);
        let resnext = Architecture {
            groups: 32,
            width_per_group: 4,
            ..resnet50.clone()
        };
        assert_eq!(resnext.bottleneck_width(64), 128);
        assert_eq!(resnext.bottleneck_width(512), 1024);
        let wide = Architecture {
            width_per_group: 128,
            ..resnet50.clone()
        };
        assert_eq!(wide.bottleneck_width(64), 128);
        assert_eq!(resnet50.feature_channels(), 2048);
    }

    /// The reason `architecture` is refused for.
    fn refusal(architecture: &Architecture) -> String {
        match architecture.validate() {
            Err(CoreError::UnsupportedArchitecture(why)) => why,
            other => panic!("expected an unsupported architecture, got {other:?}"),
        }
    }

    #[test]
    fn up_to_keeps_what_a_pass_to_the_stage_needs() {
        let resnet50 = resnet50();
        let up_to = |stage: &str| resnet50.up_to(stage).map(|a| (a.layers, a.planes, a.head));
        assert_eq!(up_to("maxpool"), Some((vec![1], vec![64], Head::None)));
        assert_eq!(up_to("layer1"), Some((vec![3], vec![64], Head::None)));
        assert_eq!(
            up_to("layer3.1.relu#2"),
            Some((vec![3, 4, 2], vec![64, 128, 256], Head::None))
        );
        assert_eq!(
            up_to("layer4").map(|(layers, ..)| layers),
            Some(vec![3, 4, 6, 3])
        );
        let dilated = Architecture {
            replace_stride_with_dilation: vec![false, true, true],
            ..resnet50.clone()
        };
        assert_eq!(
            dilated
                .up_to("layer3.0")
                .unwrap()
                .replace_stride_with_dilation,
            [false, true]
        );
        for whole_or_unknown in [
            "avgpool",
            "fc",
            "layer5",
            "layer5.0",
            "layer1.3",
            "layer0",
            "layer0.0",
            "layer+1",
            "layer1.18446744073709551615",
            "nothing",
            "",
        ] {
            assert_eq!(resnet50.up_to(whole_or_unknown), None, "{whole_or_unknown}");
        }
    }

    #[test]
    fn a_head_without_a_classifier_needs_no_classes() {
        for head in [Head::Identity, Head::None] {
            let features = Architecture {
                head,
                num_classes: 0,
                ..resnet50()
            };
            assert_eq!(features.validate(), Ok(()), "{head:?}");
        }
        for head in [Head::Linear, Head::DropoutLinear] {
            let no_classes = Architecture {
                head,
                num_classes: 0,
                ..resnet50()
            };
            assert_eq!(
                refusal(&no_classes),
                "`num_classes` must be at least 1",
                "{head:?}"
            );
        }
    }

    #[test]
    fn every_eps_must_be_finite_and_not_negative() {
        for eps in [-1e-5, f64::NAN, f64::INFINITY] {
            let everywhere = Architecture {
                batch_norm_eps: eps,
                ..resnet50()
            };
            assert!(refusal(&everywhere).starts_with("`batch_norm_eps` must be finite and >= 0"));
            let one = Architecture {
                batch_norm_eps_overrides: [("layer1.0.bn2".to_string(), eps)].into(),
                ..resnet50()
            };
            assert!(refusal(&one)
                .starts_with("`batch_norm_eps` of layer1.0.bn2 must be finite and >= 0"));
        }
    }

    #[test]
    fn validation_refuses_what_torchvision_refuses() {
        assert_eq!(resnet50().validate(), Ok(()));
        let grouped_basic = Architecture {
            block: BlockKind::BasicBlock,
            groups: 2,
            ..resnet50()
        };
        assert_eq!(
            refusal(&grouped_basic),
            "BasicBlock only supports groups=1 and width_per_group=64 (as in torchvision)"
        );
        // int(8 * 1 / 64) * 1 = 0 channels inside the first Bottleneck.
        let empty = Architecture {
            width_per_group: 1,
            planes: vec![8, 16, 32, 64],
            ..resnet50()
        };
        assert_eq!(
            refusal(&empty),
            "a Bottleneck with planes 8, width_per_group 1 and groups 1 has no channels"
        );
        let mismatched = Architecture {
            layers: vec![1, 1],
            ..resnet50()
        };
        assert_eq!(
            refusal(&mismatched),
            "`layers` ([1, 1]) and `planes` ([64, 128, 256, 512]) must be non-empty and of equal length"
        );
    }
}

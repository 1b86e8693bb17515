//! The one place where the dump format meets the core under test: a dump's
//! weights as the core's [`WeightSource`], and the manifest's architecture
//! as the core's. The format crate knows nothing of the core.

use resnet_core::{BlockKind, CoreError, Head, NormLayer, WeightSource, WeightTensor};
use resnet_dump::Dump;

/// A dump's weights, read on demand as the core asks for them.
pub struct DumpWeights<'a>(pub &'a Dump);

impl WeightSource for DumpWeights<'_> {
    fn weight(&self, name: &str) -> Result<WeightTensor, CoreError> {
        match self.0.load_weight(name) {
            Ok(Some(weight)) => Ok(weight),
            Ok(None) => Err(CoreError::MissingWeight {
                name: name.to_string(),
            }),
            Err(error) => Err(CoreError::WeightSource {
                name: name.to_string(),
                reason: error.to_string(),
            }),
        }
    }
}

/// The manifest's architecture, for the core. (A field the manifest gains
/// must be added here: the core's struct literal lists all of its own.)
pub fn architecture(architecture: &resnet_dump::Architecture) -> resnet_core::Architecture {
    let a = architecture;
    resnet_core::Architecture {
        block: match a.block {
            resnet_dump::BlockKind::BasicBlock => BlockKind::BasicBlock,
            resnet_dump::BlockKind::Bottleneck => BlockKind::Bottleneck,
        },
        layers: a.layers.clone(),
        groups: a.groups,
        width_per_group: a.width_per_group,
        stem_channels: a.stem_channels,
        planes: a.planes.clone(),
        num_classes: a.num_classes,
        in_channels: a.in_channels,
        batch_norm_eps: a.batch_norm_eps,
        replace_stride_with_dilation: a.replace_stride_with_dilation.clone(),
        norm_layer: match a.norm_layer {
            resnet_dump::NormLayer::BatchNorm2d => NormLayer::BatchNorm2d,
            resnet_dump::NormLayer::FrozenBatchNorm2d => NormLayer::FrozenBatchNorm2d,
        },
        batch_norm_eps_overrides: a.batch_norm_eps_overrides.clone(),
        head: match a.head {
            resnet_dump::Head::Linear => Head::Linear,
            resnet_dump::Head::DropoutLinear => Head::DropoutLinear,
            resnet_dump::Head::Identity => Head::Identity,
            resnet_dump::Head::None => Head::None,
        },
    }
}

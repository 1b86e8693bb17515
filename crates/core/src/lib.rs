//! The implementation under test: the torchvision ResNet family (ResNet,
//! ResNeXt, Wide ResNet) in NHWC, f32, with BatchNorm in its inference form.
//!
//! The network is a flat list of [`Stage`]s in torch's execution order, named
//! exactly as the reference dumps name them (`layer2.0.downsample.0`,
//! `layer1.0.relu#2`). A forward pass yields every stage's output in turn
//! ([`Network::steps`]) and can stop after any stage, and any single stage can be run
//! from inputs supplied by the caller: the three things a layer-by-layer
//! comparison needs.

pub mod architecture;
pub mod error;
pub mod network;
pub mod ops;
mod parallel;
pub mod tensor;
pub mod weights;
mod written;

#[cfg(test)]
mod test_util;

pub use architecture::{Architecture, BlockKind, Head, NormLayer};
pub use error::CoreError;
pub use network::{Network, Stage, StageKind, Steps};
pub use tensor::Tensor;
pub use weights::{WeightSource, WeightTensor};

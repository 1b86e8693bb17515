//! The operators of a torchvision ResNet, on NHWC tensors. Each checks its
//! input's shape and says what is wrong rather than panicking, because in
//! isolated checking the inputs come from someone else's dump.

mod activation;
mod batch_norm;
mod conv;
mod linear;
mod matmul;
mod packed_gemm;
mod pool;
mod winograd;

pub use activation::{add_relu, add_relu_in_place, relu, relu_in_place, relu_value};
pub use batch_norm::BatchNorm;
pub use conv::{Conv2d, ConvGeometry};
pub use linear::Linear;
pub use pool::{adaptive_average_pool_1x1, MaxPool2d};

use thiserror::Error;

/// Why an operator cannot take the input it was given. Shapes are NHWC.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ShapeError {
    #[error("expected {expected} channels, got {found}")]
    Channels { expected: usize, found: usize },

    #[error("a {height}x{width} input is smaller than the {kernel:?} kernel")]
    SmallerThanKernel {
        height: usize,
        width: usize,
        kernel: [usize; 2],
    },

    #[error("a {height}x{width} input is smaller than the {window} window")]
    SmallerThanWindow {
        height: usize,
        width: usize,
        window: usize,
    },

    #[error("padding {padding} is more than half the kernel {kernel}")]
    Padding { padding: usize, kernel: usize },

    #[error("the residual {residual:?} and the identity {identity:?} must have the same shape")]
    ResidualIdentity {
        residual: [usize; 4],
        identity: [usize; 4],
    },

    #[error("the residual {residual:?} does not match the conv's output {output:?}")]
    ResidualOutput {
        residual: [usize; 4],
        output: [usize; 4],
    },

    #[error("expected [N, 1, 1, {in_features}] (flattened features)")]
    Features { in_features: usize },
}

/// An error equals the message it displays, so that a test can state it.
impl PartialEq<&str> for ShapeError {
    fn eq(&self, message: &&str) -> bool {
        self.to_string().as_str() == *message
    }
}

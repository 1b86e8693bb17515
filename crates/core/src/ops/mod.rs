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

pub use activation::{add_relu, add_relu_in_place, relu, relu_in_place};
pub use batch_norm::BatchNorm;
pub use conv::{Conv2d, ConvGeometry};
pub use linear::Linear;
pub use pool::{adaptive_average_pool_1x1, MaxPool2d};

/// Why an operator cannot take the input it was given.
pub type ShapeError = String;

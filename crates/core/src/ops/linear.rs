use super::{Conv2d, ConvGeometry, ShapeError};
use crate::Tensor;

/// A fully connected layer over the channels of a 1x1 map: `[N, 1, 1, in]`
/// to `[N, 1, 1, out]` (torch's `[N, in]` to `[N, out]`).
///
/// Computed as the 1x1 conv it is, so that it runs the convs' kernels and
/// sums as they do, in chunks (`packed_gemm::sum_in_chunks`): through the
/// `gemm` crate, in its own order, fc was the core's least accurate stage
/// against float64 in every ResNet (`scripts/measure-tolerance`).
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    in_features: usize,
    conv: Conv2d,
}

impl Linear {
    /// `weight_in_out` is `[in, out]`, row-major: see
    /// `weights::linear_weight_from_torch`.
    pub fn new(
        in_features: usize,
        out_features: usize,
        weight_in_out: Vec<f32>,
        bias: Vec<f32>,
    ) -> Self {
        assert_eq!(weight_in_out.len(), in_features * out_features);
        assert_eq!(bias.len(), out_features);
        Linear {
            in_features,
            conv: Conv2d::new(
                in_features,
                out_features,
                ConvGeometry::square(1, 1, 0, 1),
                weight_in_out,
                Some(bias),
            ),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ShapeError> {
        let [_, height, width, channels] = x.nhwc_shape();
        if height != 1 || width != 1 || channels != self.in_features {
            return Err(ShapeError::Features {
                in_features: self.in_features,
            });
        }
        self.conv.forward_fused(x, None, false)
    }
}

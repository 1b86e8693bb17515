use super::matmul::{multiply, MatrixView, OutputBlock};
use super::ShapeError;
use crate::Tensor;

/// A fully connected layer over the channels of a 1x1 map: `[N, 1, 1, in]`
/// to `[N, 1, 1, out]` (torch's `[N, in]` to `[N, out]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Linear {
    in_features: usize,
    out_features: usize,
    /// `[in, out]`, row-major: see `weights::linear_weight_from_torch`.
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl Linear {
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
            out_features,
            weight: weight_in_out,
            bias,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ShapeError> {
        let [batch, height, width, channels] = x.nhwc_shape();
        if height != 1 || width != 1 || channels != self.in_features {
            return Err(ShapeError::Features {
                in_features: self.in_features,
            });
        }
        let mut out = Tensor::zeros(batch, 1, 1, self.out_features);
        let output = OutputBlock {
            data: out.as_slice_mut().as_mut_ptr(),
            row_stride: self.out_features,
        };
        // SAFETY: `out` holds batch rows of out_features elements and is ours alone.
        unsafe {
            multiply(
                batch,
                self.out_features,
                self.in_features,
                MatrixView::row_major(x.as_slice(), 0, self.in_features),
                MatrixView::row_major(&self.weight, 0, self.out_features),
                output,
                crate::parallel::threads(),
            );
        }
        for row in out.as_slice_mut().chunks_exact_mut(self.out_features) {
            row.iter_mut().zip(&self.bias).for_each(|(v, b)| *v += b);
        }
        Ok(out)
    }
}

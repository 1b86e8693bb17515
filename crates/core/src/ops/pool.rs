use std::mem::MaybeUninit;

use super::ShapeError;
use crate::written::{filled, tensor_written_by};
use crate::Tensor;

/// MaxPool2d with a square window; padding counts as -inf, as in torch, so a
/// padded position never wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool2d {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl MaxPool2d {
    pub fn output_size(&self, input: usize) -> Option<usize> {
        let padded = input + 2 * self.padding;
        (padded >= self.kernel && self.stride > 0).then(|| (padded - self.kernel) / self.stride + 1)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ShapeError> {
        if self.padding * 2 > self.kernel {
            return Err(ShapeError::Padding {
                padding: self.padding,
                kernel: self.kernel,
            });
        }
        let too_small = || ShapeError::SmallerThanWindow {
            height: x.height(),
            width: x.width(),
            window: self.kernel,
        };
        let out_h = self.output_size(x.height()).ok_or_else(too_small)?;
        let out_w = self.output_size(x.width()).ok_or_else(too_small)?;
        let [batch, height, width, channels] = x.nhwc_shape();
        let input = x.as_slice();
        let write = |out: &mut [MaybeUninit<f32>]| {
            crate::parallel::for_each_chunk(
                crate::parallel::threads(),
                out,
                out_w * channels,
                |row, out_row| {
                    let (n, oy) = (row / out_h, row % out_h);
                    for ox in 0..out_w {
                        let best = filled(
                            &mut out_row[ox * channels..(ox + 1) * channels],
                            f32::NEG_INFINITY,
                        );
                        for ky in 0..self.kernel {
                            let Some(iy) = (oy * self.stride + ky).checked_sub(self.padding) else {
                                continue;
                            };
                            if iy >= height {
                                continue;
                            }
                            for kx in 0..self.kernel {
                                let Some(ix) = (ox * self.stride + kx).checked_sub(self.padding)
                                else {
                                    continue;
                                };
                                if ix >= width {
                                    continue;
                                }
                                let start = ((n * height + iy) * width + ix) * channels;
                                for (b, &v) in best.iter_mut().zip(&input[start..start + channels])
                                {
                                    // NaN propagates, as in torch's max pool.
                                    // A select, not a branch, so that the
                                    // loop runs 16 channels at a time.
                                    *b = if v > *b || v.is_nan() { v } else { *b };
                                }
                            }
                        }
                    }
                },
            )
        };
        // SAFETY: each output row is a task, and each of its pixels is
        // filled before the window's maximum is taken.
        Ok(unsafe { tensor_written_by([batch, out_h, out_w, channels], write) })
    }
}

/// AdaptiveAvgPool2d((1, 1)): the mean of each channel over the image,
/// accumulated in f64 so that the mean of a large map loses nothing.
pub fn adaptive_average_pool_1x1(x: &Tensor) -> Tensor {
    let [batch, height, width, channels] = x.nhwc_shape();
    let pixels = height * width;
    let mut out = Tensor::zeros(batch, 1, 1, channels);
    let input = x.as_slice();
    for n in 0..batch {
        let mut sums = vec![0f64; channels];
        for pixel in
            input[n * pixels * channels..(n + 1) * pixels * channels].chunks_exact(channels)
        {
            for (s, &v) in sums.iter_mut().zip(pixel) {
                *s += v as f64;
            }
        }
        let target = &mut out.as_slice_mut()[n * channels..(n + 1) * channels];
        for (t, s) in target.iter_mut().zip(sums) {
            *t = (s / pixels as f64) as f32;
        }
    }
    out
}

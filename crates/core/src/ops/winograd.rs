//! Winograd's F(2x2, 3x3) for the inference path's 3x3 stride-1 convs: each
//! 2x2 block of output pixels from a 4x4 block of input, through sixteen
//! GEMMs of depth C instead of one of depth 9C: 2.25x fewer multiplies.
//!
//! Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks"
//! (2015). The transforms' coefficients are 0, +-1 and 1/2, so the only
//! new roundings are those of the transforms' additions; the tile is kept
//! to F(2x2, 3x3) because longer ones (F(4x4, 3x3)) lose several bits.
//! `scripts/measure-accuracy` gates it: no stage over 2x PyTorch float32's
//! own error against float64.
//!
//! Used by the fused path only (`network::fused`), on maps of at least
//! 14x14: the observed path that `verify` runs keeps the direct conv, so
//! that what is verified stage by stage is the plainest form of the
//! network. Infinities differ: the input transform's differences turn two
//! infinite inputs into a NaN where the direct conv keeps an infinity.

use std::mem::MaybeUninit;

use super::activation::relu_value;
use super::packed_gemm::{self, Epilogue, PackedWeights, Rows};
use crate::written::{tensor_written_by, vec_written_by, Store};
use crate::{parallel, Tensor};

/// Transformed weights: one `channels x outputs` matrix per point of the
/// 4x4 transformed tile, packed for the GEMM kernel.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct WinogradWeights {
    channels: usize,
    outputs: usize,
    transformed: Vec<PackedWeights>,
}

impl WinogradWeights {
    /// `plain` is the conv's `(3 * 3 * channels) x outputs` matrix, its rows
    /// in (kernel y, kernel x, channel) order. Each kernel becomes
    /// `G g G^T`, in f64, rounded once.
    pub fn new(plain: &[f32], channels: usize, outputs: usize) -> Self {
        assert_eq!(plain.len(), 9 * channels * outputs);
        let mut matrices = vec![vec![0f32; channels * outputs]; 16];
        // G's rows applied to three values: (a, (a+b+c)/2, (a-b+c)/2, c).
        let g_rows = |a: f64, b: f64, c: f64| [a, (a + b + c) / 2.0, (a - b + c) / 2.0, c];
        for channel in 0..channels {
            for output in 0..outputs {
                let g = |ky: usize, kx: usize| {
                    plain[((ky * 3 + kx) * channels + channel) * outputs + output] as f64
                };
                // G g: 4 rows of 3.
                let columns: [[f64; 4]; 3] =
                    std::array::from_fn(|kx| g_rows(g(0, kx), g(1, kx), g(2, kx)));
                for row in 0..4 {
                    let u = g_rows(columns[0][row], columns[1][row], columns[2][row]);
                    for (column, &value) in u.iter().enumerate() {
                        matrices[row * 4 + column][channel * outputs + output] = value as f32;
                    }
                }
            }
        }
        WinogradWeights {
            channels,
            outputs,
            transformed: matrices
                .iter()
                .map(|matrix| PackedWeights::pack(matrix, channels, outputs))
                .collect(),
        }
    }

    /// The conv (padding 1, stride 1) of `x`, then `+ bias`, `+ residual`
    /// (if given) and ReLU (if `relu`), as the direct conv's epilogue.
    pub fn forward(
        &self,
        x: &Tensor,
        bias: Option<&[f32]>,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Tensor {
        let [batch, height, width, channels] = x.nhwc_shape();
        assert_eq!(channels, self.channels);
        let outputs = self.outputs;
        let (tiles_y, tiles_x) = (height.div_ceil(2), width.div_ceil(2));
        let tiles = batch * tiles_y * tiles_x;
        if tiles == 0 || outputs == 0 {
            return Tensor::zeros(batch, height, width, outputs);
        }
        let threads = parallel::threads();

        // The input's 4x4 blocks, transformed: per tile, 16 runs of the
        // channels (`B^T d B`), tile after tile.
        let input = x.as_slice();
        let zeros = vec![0f32; channels];
        let transform = |transformed: &mut [MaybeUninit<f32>]| {
            parallel::for_each_chunk(
                threads,
                transformed,
                tiles_x * 16 * channels,
                |tile_row, out| {
                    let (image, ty) = (tile_row / tiles_y, tile_row % tiles_y);
                    let mut rows = vec![0f32; 16 * channels];
                    for (tx, out) in out.chunks_exact_mut(16 * channels).enumerate() {
                        let pixel = |i: usize, j: usize| -> &[f32] {
                            let (y, x) =
                                ((2 * ty + i).wrapping_sub(1), (2 * tx + j).wrapping_sub(1));
                            if y < height && x < width {
                                let start = ((image * height + y) * width + x) * channels;
                                &input[start..start + channels]
                            } else {
                                &zeros
                            }
                        };
                        // B^T d, a whole run of channels at a time: row i,
                        // column j in `rows[(i * 4 + j) * channels..]`.
                        for j in 0..4 {
                            let d: [&[f32]; 4] = std::array::from_fn(|i| pixel(i, j));
                            let at = |i: usize| (i * 4 + j) * channels..(i * 4 + j + 1) * channels;
                            difference(&mut rows[at(0)], d[0], d[2]);
                            sum(&mut rows[at(1)], d[1], d[2]);
                            difference(&mut rows[at(2)], d[2], d[1]);
                            difference(&mut rows[at(3)], d[1], d[3]);
                        }
                        // (B^T d) B: the same over each row's columns, which
                        // writes all 16 runs of the tile.
                        for i in 0..4 {
                            let at = |j: usize| (i * 4 + j) * channels..(i * 4 + j + 1) * channels;
                            let t = |j: usize| &rows[at(j)];
                            difference(&mut out[at(0)], t(0), t(2));
                            sum(&mut out[at(1)], t(1), t(2));
                            difference(&mut out[at(2)], t(2), t(1));
                            difference(&mut out[at(3)], t(1), t(3));
                        }
                    }
                },
            )
        };
        // SAFETY: the chunks cover the buffer in whole tiles, and each tile
        // is written whole (see above).
        let transformed = unsafe { vec_written_by(tiles * 16 * channels, transform) };

        // Sixteen GEMMs: tiles x channels by channels x outputs, each on
        // one thread, the sixteen spread over the threads: one region, not
        // sixteen small ones (a 14x14 map is 49 tiles; split sixteen times
        // over the threads, layer3's convs scaled 1.4-1.8x from one thread
        // to two).
        let multiply = |products: &mut [MaybeUninit<f32>]| {
            parallel::for_each_chunk(threads, products, tiles * outputs, |point, product| {
                let locate = |row: usize, starts: &mut [*const f32]| {
                    starts[0] = transformed[(row * 16 + point) * channels..].as_ptr();
                };
                let rows = Rows {
                    taps: 1,
                    segment: channels,
                    own_per_row: channels,
                    locate: &locate,
                };
                packed_gemm::multiply(
                    tiles,
                    &rows,
                    &self.transformed[point],
                    product,
                    Epilogue::default(),
                    1,
                );
            })
        };
        // SAFETY: each of the sixteen GEMMs writes its whole chunk.
        let products = unsafe { vec_written_by(16 * tiles * outputs, multiply) };

        // A^T m A for each tile and output channel, then the epilogue.
        let residual = residual.map(Tensor::as_slice);
        let line = width * outputs;
        let inverse = |out: &mut [MaybeUninit<f32>]| {
            for (image, out_image) in out.chunks_mut((height * line).max(1)).enumerate() {
                parallel::for_each_chunk(threads, out_image, 2 * line, |ty, rows| {
                    // A^T m, row i, column j, in `columns[(i * 4 + j) * outputs..]`.
                    let mut columns = vec![0f32; 8 * outputs];
                    let mut pixel = vec![0f32; outputs];
                    for tx in 0..tiles_x {
                        let tile = (image * tiles_y + ty) * tiles_x + tx;
                        let m = |point: usize| {
                            let start = (point * tiles + tile) * outputs;
                            &products[start..start + outputs]
                        };
                        for j in 0..4 {
                            let (top, bottom) = columns.split_at_mut(4 * outputs);
                            let at = j * outputs..(j + 1) * outputs;
                            sum_of_three(&mut top[at.clone()], m(j), m(4 + j), m(8 + j));
                            difference_of_three(&mut bottom[at], m(4 + j), m(8 + j), m(12 + j));
                        }
                        for i in 0..2 {
                            if 2 * ty + i >= height {
                                continue;
                            }
                            let s = |j: usize| {
                                &columns[(i * 4 + j) * outputs..(i * 4 + j + 1) * outputs]
                            };
                            for j in 0..2 {
                                let x = 2 * tx + j;
                                if x >= width {
                                    continue;
                                }
                                if j == 0 {
                                    sum_of_three(&mut pixel, s(0), s(1), s(2));
                                } else {
                                    difference_of_three(&mut pixel, s(1), s(2), s(3));
                                }
                                let at = i * line + x * outputs;
                                let skip = residual.map(|residual| {
                                    let start = image * height * line + 2 * ty * line + at;
                                    &residual[start..start + outputs]
                                });
                                let out = &mut rows[at..at + outputs];
                                for (k, (out, &value)) in out.iter_mut().zip(&pixel).enumerate() {
                                    let mut sum = value;
                                    if let Some(bias) = bias {
                                        sum += bias[k];
                                    }
                                    if let Some(skip) = skip {
                                        sum += skip[k];
                                    }
                                    out.write(if relu { relu_value(sum) } else { sum });
                                }
                            }
                        }
                    }
                });
            }
        };
        // SAFETY: every output pixel is in one tile (the tiles cover the
        // map, those on an odd edge half outside it), and each tile writes
        // its pixels inside the map, every channel.
        unsafe { tensor_written_by([batch, height, width, outputs], inverse) }
    }
}

/// `out = a + b`, element by element (one loop, so that it vectorises).
fn sum(out: &mut [impl Store], a: &[f32], b: &[f32]) {
    for ((out, &a), &b) in out.iter_mut().zip(a).zip(b) {
        out.store(a + b);
    }
}

/// `out = (a + b) + c`, element by element.
fn sum_of_three(out: &mut [f32], a: &[f32], b: &[f32], c: &[f32]) {
    for (((out, &a), &b), &c) in out.iter_mut().zip(a).zip(b).zip(c) {
        *out = a + b + c;
    }
}

/// `out = (a - b) - c`, element by element.
fn difference_of_three(out: &mut [f32], a: &[f32], b: &[f32], c: &[f32]) {
    for (((out, &a), &b), &c) in out.iter_mut().zip(a).zip(b).zip(c) {
        *out = a - b - c;
    }
}

/// `out = a - b`, element by element.
fn difference(out: &mut [impl Store], a: &[f32], b: &[f32]) {
    for ((out, &a), &b) in out.iter_mut().zip(a).zip(b) {
        out.store(a - b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{Conv2d, ConvGeometry};
    use crate::test_util::{tensor, values};

    #[test]
    fn agrees_with_the_direct_conv_on_odd_and_even_maps_with_every_epilogue() {
        if !packed_gemm::available() {
            return;
        }
        for (batch, height, width, channels, outputs) in [
            (1, 8, 8, 5, 7),
            (2, 7, 9, 16, 33),
            (1, 14, 14, 64, 64),
            (1, 1, 3, 3, 2),
            // Over one chunk of the GEMM's sums.
            (1, 6, 5, 300, 20),
        ] {
            let plain = values(9 * channels * outputs, 1);
            let bias = values(outputs, 2);
            let direct = |bias: Option<&Vec<f32>>| {
                Conv2d::new(
                    channels,
                    outputs,
                    ConvGeometry::square(3, 1, 1, 1),
                    plain.clone(),
                    bias.cloned(),
                )
            };
            let winograd = WinogradWeights::new(&plain, channels, outputs);
            let x = tensor([batch, height, width, channels], 3);
            let residual = tensor([batch, height, width, outputs], 4);
            for (bias, residual, relu) in [
                (Some(&bias), None, false),
                (Some(&bias), Some(&residual), true),
                (None, None, true),
                (None, Some(&residual), false),
            ] {
                let want = direct(bias).forward_fused(&x, residual, relu).unwrap();
                let got = winograd.forward(&x, bias.map(Vec::as_slice), residual, relu);
                assert_eq!(got.nhwc_shape(), want.nhwc_shape());
                let scale = want.as_slice().iter().fold(0f32, |m, v| m.max(v.abs()));
                for (index, (g, w)) in got.as_slice().iter().zip(want.as_slice()).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * scale.max(1.0),
                        "{batch}x{height}x{width}x{channels}->{outputs}, element {index}: {g} vs {w}"
                    );
                }
            }
        }
    }
}

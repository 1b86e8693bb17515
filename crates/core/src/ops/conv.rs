use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

use ndarray::ArrayView4;

use super::activation::relu_value;
use super::matmul::{multiply, MatrixView, OutputBlock};
use super::packed_gemm::{self, Epilogue, PackedWeights, Rows};
use super::winograd::WinogradWeights;
use super::BatchNorm;
use super::ShapeError;
use crate::weights::conv_weight_from_oihw;
use crate::written::{tensor_written_by, vec_written_by};
use crate::{parallel, Tensor};

/// Kernel, stride, padding, dilation and groups, as `(height, width)` pairs
/// where torch has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConvGeometry {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl ConvGeometry {
    /// A square kernel with the same stride and padding on both axes, no
    /// dilation: every conv in torchvision's ResNets.
    pub fn square(kernel: usize, stride: usize, padding: usize, groups: usize) -> Self {
        ConvGeometry {
            kernel: [kernel; 2],
            stride: [stride; 2],
            padding: [padding; 2],
            dilation: [1; 2],
            groups,
        }
    }

    /// torch's `(size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1`.
    pub fn output_size(&self, axis: usize, input: usize) -> Option<usize> {
        let span = self.dilation[axis] * (self.kernel[axis] - 1) + 1;
        let padded = input + 2 * self.padding[axis];
        (padded >= span).then(|| (padded - span) / self.stride[axis] + 1)
    }

    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
    }
}

/// Conv2d as GEMM. An NHWC patch (kernel y, kernel x, channel) is contiguous
/// channel runs: the packed kernel (`packed_gemm`) reads them straight from
/// the input, and where it does not run (grouped convs, CPUs without AVX2),
/// im2col is a sequence of memcpys for the `gemm` crate; a 1x1 stride-1 conv
/// needs neither: the activation already is the GEMM's left matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv2d {
    in_channels: usize,
    out_channels: usize,
    geometry: ConvGeometry,
    weights: ConvWeights,
    bias: Option<Vec<f32>>,
}

/// A conv's weights, in one form only: as the product reads them.
#[derive(Clone, Debug, PartialEq)]
enum ConvWeights {
    /// One `(kernel_y * kernel_x * in_per_group) x out_per_group` matrix per
    /// group (see `weights::conv_weight_from_oihw`), for the `gemm` crate:
    /// grouped convs (many narrow products, run in parallel over the
    /// groups) and CPUs without the packed kernel.
    Plain(Vec<f32>),
    /// The same matrix packed once for the packed kernel, where it runs and
    /// the conv is not grouped. The plain matrix is not kept beside it (94
    /// MB in ResNet50); folding a BatchNorm unpacks it.
    Packed(PackedWeights),
    /// A 3x3 stride-1 conv of the inference path: the packed weights, and
    /// Winograd's, made the first time a map of [`WINOGRAD_FROM`] pixels a
    /// side or more comes (ResNet50's layer4 at 224x224 never needs them:
    /// 48 MB).
    Winograd {
        packed: PackedWeights,
        winograd: OnceLock<WinogradWeights>,
    },
}

/// The smallest map (a side) the Winograd form runs on. A 7x7 map is 16
/// tiles, which the GEMM's 14-row tile covers with 28 rows (43% wasted):
/// the direct conv's 49 pixels in 56 rows do about as well.
const WINOGRAD_FROM: usize = 14;
/// The convs the Winograd form computes: 3x3, stride 1, padding 1, one
/// group, no dilation.
const WINOGRAD_GEOMETRY: ConvGeometry = ConvGeometry {
    kernel: [3, 3],
    stride: [1, 1],
    padding: [1, 1],
    dilation: [1, 1],
    groups: 1,
};
/// The fewest input channels the Winograd form is used for: at 64
/// (ResNet50's layer1, 56x56) its transforms' traffic through memory cost
/// more than the multiplies saved (1.2 ms a conv against 0.95 direct, one
/// thread, with the first, element-by-element transforms); at 128 and 256
/// it took 0.72 and 0.66 ms against 0.9. With the transforms vectorised,
/// layer1 in Winograd's form measured the same as direct within this
/// machine's noise (ResNet50 passes of 33.9-35.3 ms against 34.4-35.7).
const WINOGRAD_DEPTH: usize = 128;

/// What every conv must be: groups that divide the channels, a kernel,
/// stride and dilation of at least 1, a weight and bias that fit.
fn check_shapes(
    in_channels: usize,
    out_channels: usize,
    geometry: &ConvGeometry,
    weight_count: usize,
    bias: &Option<Vec<f32>>,
) {
    let [kh, kw] = geometry.kernel;
    assert!(
        geometry.groups > 0
            && in_channels.is_multiple_of(geometry.groups)
            && out_channels.is_multiple_of(geometry.groups)
    );
    assert!(geometry
        .stride
        .iter()
        .chain(&geometry.dilation)
        .chain(&geometry.kernel)
        .all(|&v| v > 0));
    assert_eq!(
        weight_count,
        out_channels * (in_channels / geometry.groups) * kh * kw
    );
    if let Some(bias) = bias {
        assert_eq!(bias.len(), out_channels);
    }
}

/// Whether a conv's weights are packed for the packed kernel: where it
/// runs, and the conv is not grouped.
fn packs(geometry: &ConvGeometry) -> bool {
    geometry.groups == 1 && packed_gemm::available()
}

impl Conv2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        geometry: ConvGeometry,
        weight_panels: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Self {
        check_shapes(
            in_channels,
            out_channels,
            &geometry,
            weight_panels.len(),
            &bias,
        );
        let [kh, kw] = geometry.kernel;
        let weights = if packs(&geometry) {
            ConvWeights::Packed(PackedWeights::pack(
                &weight_panels,
                kh * kw * in_channels,
                out_channels,
            ))
        } else {
            ConvWeights::Plain(weight_panels)
        };
        Conv2d {
            in_channels,
            out_channels,
            geometry,
            weights,
            bias,
        }
    }

    /// A conv of torch's weight (OIHW), put straight into the form the
    /// product reads: [`Conv2d::new`] of `conv_weight_from_oihw(weight)`,
    /// without the reordered copy where the weights are packed.
    pub fn from_oihw(
        weight: ArrayView4<'_, f32>,
        geometry: ConvGeometry,
        bias: Option<Vec<f32>>,
    ) -> Self {
        let (out_channels, in_per_group, kernel_y, kernel_x) = weight.dim();
        let in_channels = in_per_group * geometry.groups;
        if !packs(&geometry) {
            let panels = conv_weight_from_oihw(weight, geometry.groups);
            return Conv2d::new(in_channels, out_channels, geometry, panels, bias);
        }
        assert_eq!(geometry.kernel, [kernel_y, kernel_x]);
        check_shapes(in_channels, out_channels, &geometry, weight.len(), &bias);
        // The GEMM's row `tap * in_channels + i` is each filter's value
        // `i * taps + tap` (see `conv_weight_from_oihw`).
        let taps = kernel_y * kernel_x;
        let source_rows: Vec<usize> = (0..taps)
            .flat_map(|tap| (0..in_channels).map(move |i| i * taps + tap))
            .collect();
        let weight = weight.as_standard_layout();
        let filters = weight.as_slice().expect("standard layout");
        Conv2d {
            in_channels,
            out_channels,
            geometry,
            weights: ConvWeights::Packed(PackedWeights::pack_columns(
                filters,
                &source_rows,
                out_channels,
            )),
            bias,
        }
    }

    pub fn geometry(&self) -> &ConvGeometry {
        &self.geometry
    }

    /// The same conv with another padding: what the harness recomputes
    /// when it asks whether an implementation padded its input another way.
    pub fn with_padding(&self, padding: [usize; 2]) -> Conv2d {
        Conv2d {
            geometry: ConvGeometry {
                padding,
                ..self.geometry
            },
            ..self.clone()
        }
    }

    /// The same conv with another stride: what the harness recomputes when
    /// it asks whether a downsample pooled before a stride-1 conv.
    pub fn with_stride(&self, stride: [usize; 2]) -> Conv2d {
        Conv2d {
            geometry: ConvGeometry {
                stride,
                ..self.geometry
            },
            ..self.clone()
        }
    }

    pub fn has_bias(&self) -> bool {
        self.bias.is_some()
    }

    /// The same conv (geometry, bias) with another torch (OIHW) weight of
    /// the same shape: what the harness recomputes when it asks whether an
    /// implementation read its weights in another order.
    pub fn with_oihw_weight(&self, weight: ArrayView4<'_, f32>) -> Conv2d {
        Conv2d::from_oihw(weight, self.geometry, self.bias.clone())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ShapeError> {
        self.forward_fused(x, None, false)
    }

    /// The conv, then in the same pass over its output: `+ residual` (if
    /// given) and ReLU (if `relu`). With BatchNorm folded in
    /// ([`Conv2d::fold_batch_norm`]) this is a whole `conv-bn-relu` or
    /// `conv-bn-add-relu` in one step.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor, ShapeError> {
        let [batch, height, width, channels] = x.nhwc_shape();
        if channels != self.in_channels {
            return Err(ShapeError::Channels {
                expected: self.in_channels,
                found: channels,
            });
        }
        let too_small = || ShapeError::SmallerThanKernel {
            height,
            width,
            kernel: self.geometry.kernel,
        };
        let out_h = self.geometry.output_size(0, height).ok_or_else(too_small)?;
        let out_w = self.geometry.output_size(1, width).ok_or_else(too_small)?;

        let groups = self.geometry.groups;
        let [kh, kw] = self.geometry.kernel;
        let in_per_group = self.in_channels / groups;
        let out_per_group = self.out_channels / groups;
        let depth = kh * kw * in_per_group; // rows of one group's weight matrix
        let pixels = batch * out_h * out_w;

        if let Some(residual) = residual {
            if residual.nhwc_shape() != [batch, out_h, out_w, self.out_channels] {
                return Err(ShapeError::ResidualOutput {
                    residual: residual.nhwc_shape(),
                    output: [batch, out_h, out_w, self.out_channels],
                });
            }
        }
        let threads = parallel::threads();
        let weight = match &self.weights {
            ConvWeights::Plain(weight) => weight,
            // The geometry again: `with_padding` keeps the weights.
            ConvWeights::Winograd { packed, winograd }
                if height >= WINOGRAD_FROM
                    && width >= WINOGRAD_FROM
                    && self.geometry == WINOGRAD_GEOMETRY =>
            {
                let winograd = winograd.get_or_init(|| {
                    WinogradWeights::new(&packed.unpack(), self.in_channels, self.out_channels)
                });
                return Ok(winograd.forward(x, self.bias.as_deref(), residual, relu));
            }
            ConvWeights::Packed(packed) | ConvWeights::Winograd { packed, .. } => {
                let epilogue = Epilogue {
                    bias: self.bias.as_deref(),
                    residual: residual.map(Tensor::as_slice),
                    relu,
                };
                let multiply = |out: &mut [MaybeUninit<f32>]| {
                    self.multiply_packed(x, out_h, out_w, packed, out, epilogue, threads)
                };
                // SAFETY: `packed_gemm::multiply` writes every element.
                return Ok(unsafe {
                    tensor_written_by([batch, out_h, out_w, self.out_channels], multiply)
                });
            }
        };
        let mut out = Tensor::zeros(batch, out_h, out_w, self.out_channels);

        let patches;
        let lhs_data = if self.geometry.is_pointwise() {
            x.as_slice()
        } else {
            patches = self.im2col(x, out_h, out_w);
            &patches[..]
        };
        let output = OutputBlock {
            data: out.as_slice_mut().as_mut_ptr(),
            row_stride: self.out_channels,
        };
        let run_group = |group: usize, threads: usize| {
            let lhs = MatrixView::row_major(lhs_data, group * depth, groups * depth);
            let rhs = MatrixView::row_major(weight, group * depth * out_per_group, out_per_group);
            // SAFETY: the column block of one group stays inside `out`.
            let block = unsafe { output.shifted(group * out_per_group) };
            // SAFETY: each group writes only its own `out_per_group` columns.
            unsafe { multiply(pixels, out_per_group, depth, lhs, rhs, block, threads) };
        };
        if groups == 1 {
            run_group(0, threads);
        } else {
            // Many narrow products: parallel over groups, each single-threaded.
            parallel::run(threads, groups, &|group| run_group(group, 1));
        }

        if self.bias.is_some() || residual.is_some() || relu {
            let channels = self.out_channels;
            let rows = (out_w * channels).max(1);
            let zeros = vec![0f32; channels];
            let bias = self.bias.as_deref().unwrap_or(&zeros);
            parallel::for_each_chunk(threads, out.as_slice_mut(), rows, |row, values| {
                let skip = residual.map(|r| &r.as_slice()[row * rows..row * rows + values.len()]);
                for (pixel, start) in values
                    .chunks_exact_mut(channels)
                    .zip((0..).step_by(channels))
                {
                    for (c, v) in pixel.iter_mut().enumerate() {
                        let mut sum = *v + bias[c];
                        if let Some(skip) = skip {
                            sum += skip[start + c];
                        }
                        *v = if relu { relu_value(sum) } else { sum };
                    }
                }
            });
        }
        Ok(out)
    }

    /// The packed kernel's product, its patches read straight from the
    /// input (no im2col copy).
    #[allow(clippy::too_many_arguments)]
    fn multiply_packed(
        &self,
        x: &Tensor,
        out_h: usize,
        out_w: usize,
        packed: &PackedWeights,
        output: &mut [MaybeUninit<f32>],
        epilogue: Epilogue<'_>,
        threads: usize,
    ) {
        let [batch, height, width, channels] = x.nhwc_shape();
        let pixels = batch * out_h * out_w;
        let g = self.geometry;
        let [kh, kw] = g.kernel;
        // Padded once, so that every patch is inside the input: then a
        // patch's row of taps (kernel x, channel) is one run of kw * C
        // contiguous values (the stem's 7 x 3 = 21, not seven runs of 3).
        let padded;
        let (input, height, width) = if g.padding == [0, 0] {
            (x.as_slice(), height, width)
        } else {
            padded = pad(x, g.padding, threads);
            (
                &padded[..],
                height + 2 * g.padding[0],
                width + 2 * g.padding[1],
            )
        };
        let row_runs = g.dilation[1] == 1;
        let locate = |row: usize, starts: &mut [*const f32]| {
            let (n, pixel) = (row / (out_h * out_w), row % (out_h * out_w));
            let (oy, ox) = (pixel / out_w, pixel % out_w);
            for ky in 0..kh {
                let iy = oy * g.stride[0] + ky * g.dilation[0];
                let line = (n * height + iy) * width;
                if row_runs {
                    starts[ky] = input[(line + ox * g.stride[1]) * channels..].as_ptr();
                    continue;
                }
                for kx in 0..kw {
                    let ix = ox * g.stride[1] + kx * g.dilation[1];
                    starts[ky * kw + kx] = input[(line + ix) * channels..].as_ptr();
                }
            }
        };
        let (taps, segment) = if row_runs {
            (kh, kw * channels)
        } else {
            (kh * kw, channels)
        };
        let rows = Rows {
            taps,
            segment,
            // Neighbouring output pixels share most of a patch; what each
            // brings of its own is about stride_y * stride_x pixels.
            own_per_row: g.stride[0] * g.stride[1] * channels,
            locate: &locate,
        };
        packed_gemm::multiply(pixels, &rows, packed, output, epilogue, threads);
    }

    /// This conv followed by `norm`, as one conv: each output channel's
    /// weights scaled by the BatchNorm's scale, its shift as the bias.
    /// Computed in f64 and rounded once.
    pub fn fold_batch_norm(&self, norm: &BatchNorm) -> Conv2d {
        let (scale, shift) = norm.scale_and_shift();
        let out_per_group = self.out_channels / self.geometry.groups;
        let plain = match &self.weights {
            ConvWeights::Plain(weight) => Cow::Borrowed(weight),
            ConvWeights::Packed(packed) | ConvWeights::Winograd { packed, .. } => {
                Cow::Owned(packed.unpack())
            }
        };
        let weight = plain
            .iter()
            .enumerate()
            .map(|(index, &w)| {
                let group = index / (plain.len() / self.geometry.groups);
                let channel = group * out_per_group + index % out_per_group;
                (w as f64 * scale[channel] as f64) as f32
            })
            .collect();
        let bias = (0..self.out_channels)
            .map(|c| {
                let conv_bias = self.bias.as_ref().map_or(0.0, |b| b[c] as f64);
                (conv_bias * scale[c] as f64 + shift[c] as f64) as f32
            })
            .collect();
        Conv2d::new(
            self.in_channels,
            self.out_channels,
            self.geometry,
            weight,
            Some(bias),
        )
    }

    /// This conv as the inference path runs it: a 3x3 stride-1 conv of one
    /// group, padded by 1, of [`WINOGRAD_DEPTH`] input channels or more, in
    /// Winograd's form as well (see `winograd.rs`); any other as it is.
    pub(crate) fn for_inference(self) -> Conv2d {
        if self.geometry != WINOGRAD_GEOMETRY || self.in_channels < WINOGRAD_DEPTH {
            return self;
        }
        let ConvWeights::Packed(packed) = self.weights else {
            return self;
        };
        Conv2d {
            weights: ConvWeights::Winograd {
                packed,
                winograd: OnceLock::new(),
            },
            ..self
        }
    }

    /// One row per output pixel; within a row, for each group, the patch in
    /// (kernel y, kernel x, channel of the group) order. Padding stays zero.
    fn im2col(&self, x: &Tensor, out_h: usize, out_w: usize) -> Vec<f32> {
        let [batch, height, width, channels] = x.nhwc_shape();
        let g = &self.geometry;
        let [kh, kw] = g.kernel;
        let in_per_group = channels / g.groups;
        let depth = kh * kw * in_per_group;
        let row_len = g.groups * depth;
        let mut patches = vec![0f32; batch * out_h * out_w * row_len];
        let input = x.as_slice();
        parallel::for_each_chunk(
            parallel::threads(),
            &mut patches,
            out_w * row_len,
            |output_row, rows| {
                let (n, oy) = (output_row / out_h, output_row % out_h);
                for ox in 0..out_w {
                    let patch = &mut rows[ox * row_len..(ox + 1) * row_len];
                    for ky in 0..kh {
                        let Some(iy) =
                            (oy * g.stride[0] + ky * g.dilation[0]).checked_sub(g.padding[0])
                        else {
                            continue;
                        };
                        if iy >= height {
                            continue;
                        }
                        for kx in 0..kw {
                            let Some(ix) =
                                (ox * g.stride[1] + kx * g.dilation[1]).checked_sub(g.padding[1])
                            else {
                                continue;
                            };
                            if ix >= width {
                                continue;
                            }
                            let pixel = ((n * height + iy) * width + ix) * channels;
                            for group in 0..g.groups {
                                let source = &input[pixel + group * in_per_group..][..in_per_group];
                                let target = group * depth + (ky * kw + kx) * in_per_group;
                                patch[target..target + in_per_group].copy_from_slice(source);
                            }
                        }
                    }
                }
            },
        );
        patches
    }
}

/// `x` with `padding` zeros around each image (NHWC), a padded line per
/// task.
fn pad(x: &Tensor, padding: [usize; 2], threads: usize) -> Vec<f32> {
    let [batch, height, width, channels] = x.nhwc_shape();
    let [py, px] = padding;
    let padded_height = height + 2 * py;
    let line = (width + 2 * px) * channels;
    let input = x.as_slice();
    let write = |padded: &mut [MaybeUninit<f32>]| {
        parallel::for_each_chunk(threads, padded, line, |row, out| {
            let (n, y) = (row / padded_height, row % padded_height);
            let zero = MaybeUninit::new(0.0);
            match y.checked_sub(py).filter(|&y| y < height) {
                None => out.fill(zero),
                Some(y) => {
                    let start = (n * height + y) * width * channels;
                    let source = &input[start..start + width * channels];
                    let (left, rest) = out.split_at_mut(px * channels);
                    let (middle, right) = rest.split_at_mut(source.len());
                    left.fill(zero);
                    right.fill(zero);
                    for (out, &value) in middle.iter_mut().zip(source) {
                        out.write(value);
                    }
                }
            }
        })
    };
    // SAFETY: the tasks' lines cover the buffer, and each line is written
    // whole: zeros, or zeros, the input's line and zeros.
    unsafe { vec_written_by(batch * padded_height * line, write) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{close, tensor, values};
    use ndarray::Array4;

    /// Packed straight from torch's layout, the weights are those packed
    /// from the reordered matrix: 1x1, 3x3 and 7x7 kernels, output channels
    /// that end a panel early, one input channel, no output or no input
    /// channels, and the grouped conv that keeps the plain matrix.
    #[test]
    fn a_conv_built_from_torch_weights_is_the_one_built_from_the_reordered_matrix() {
        let cases = [
            (130, 3, ConvGeometry::square(7, 2, 3, 1)),
            (16, 64, ConvGeometry::square(1, 1, 0, 1)),
            (20, 5, ConvGeometry::square(3, 1, 1, 1)),
            (33, 1, ConvGeometry::square(3, 2, 1, 1)),
            (8, 6, ConvGeometry::square(3, 1, 1, 2)),
            (0, 4, ConvGeometry::square(1, 1, 0, 1)),
            (8, 0, ConvGeometry::square(1, 1, 0, 1)),
        ];
        for (seed, (out_channels, in_channels, geometry)) in cases.into_iter().enumerate() {
            let [kh, kw] = geometry.kernel;
            let in_per_group = in_channels / geometry.groups;
            let count = out_channels * in_per_group * kh * kw;
            let weight = Array4::from_shape_vec(
                (out_channels, in_per_group, kh, kw),
                values(count, seed as u32),
            )
            .unwrap();
            let bias = Some(values(out_channels, 9));
            let reordered = Conv2d::new(
                in_channels,
                out_channels,
                geometry,
                conv_weight_from_oihw(weight.view(), geometry.groups),
                bias.clone(),
            );
            assert_eq!(
                Conv2d::from_oihw(weight.view(), geometry, bias),
                reordered,
                "{out_channels}x{in_channels} {geometry:?}"
            );
        }
    }

    #[test]
    fn the_inference_path_takes_winograd_only_where_it_computes_the_same_conv() {
        if !packed_gemm::available() {
            return;
        }
        let conv = |geometry: ConvGeometry, channels: usize| {
            let [kh, kw] = geometry.kernel;
            let weights = values(channels / geometry.groups * 130 * kh * kw, 1);
            Conv2d::new(channels, 130, geometry, weights, Some(values(130, 2)))
        };
        let winograd = |conv: &Conv2d| matches!(conv.weights, ConvWeights::Winograd { .. });
        // Not 3x3 stride-1 padding-1 of one group, or too few channels.
        let others = [
            (ConvGeometry::square(3, 2, 1, 1), 128),
            (ConvGeometry::square(3, 1, 0, 1), 128),
            (ConvGeometry::square(3, 1, 1, 2), 128),
            (ConvGeometry::square(1, 1, 0, 1), 128),
            (
                ConvGeometry {
                    dilation: [2, 2],
                    ..WINOGRAD_GEOMETRY
                },
                128,
            ),
            (WINOGRAD_GEOMETRY, WINOGRAD_DEPTH - 1),
        ];
        for (geometry, channels) in others {
            assert!(
                !winograd(&conv(geometry, channels).for_inference()),
                "{geometry:?}"
            );
        }
        let direct = conv(WINOGRAD_GEOMETRY, 128);
        let inference = direct.clone().for_inference();
        assert!(winograd(&inference));
        // Winograd's form from 14x14; the packed weights under it, and for
        // another padding.
        for (height, width) in [(14, 15), (13, 14)] {
            let x = tensor([1, height, width, 128], 3);
            let want = direct.forward_fused(&x, None, true).unwrap();
            let got = inference.forward_fused(&x, None, true).unwrap();
            for (g, w) in got.as_slice().iter().zip(want.as_slice()) {
                assert!(close(*g, *w, 10.0), "{height}x{width}: {g} vs {w}");
            }
            let bits = |t: Tensor| t.as_slice().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let same_bits = bits(got) == bits(want);
            assert_eq!(same_bits, height < WINOGRAD_FROM, "{height}x{width}");
            let padded = |conv: &Conv2d| conv.with_padding([0, 0]).forward_fused(&x, None, true);
            assert_eq!(padded(&inference), padded(&direct));
        }
    }

    /// The packed kernel and the `gemm` crate path (what a CPU without
    /// AVX2 runs, untested otherwise on one that has it) give the same
    /// conv, bias, residual and ReLU.
    #[test]
    fn the_packed_kernel_and_the_gemm_crate_path_agree() {
        if !packed_gemm::available() {
            return;
        }
        let geometries = [
            ConvGeometry::square(1, 1, 0, 1),
            ConvGeometry::square(1, 2, 0, 1),
            ConvGeometry::square(3, 1, 1, 1),
            ConvGeometry::square(3, 2, 1, 1),
            ConvGeometry::square(7, 2, 3, 1),
            ConvGeometry {
                kernel: [3, 2],
                stride: [1, 2],
                padding: [2, 1],
                dilation: [2, 3],
                groups: 1,
            },
        ];
        for (case, geometry) in geometries.into_iter().enumerate() {
            let (in_channels, out_channels) = (if case == 4 { 3 } else { 20 }, 37);
            let [kh, kw] = geometry.kernel;
            let weight = values(out_channels * in_channels * kh * kw, 1);
            let packed = Conv2d::new(
                in_channels,
                out_channels,
                geometry,
                weight,
                Some(values(out_channels, 2)),
            );
            let ConvWeights::Packed(packed_weights) = &packed.weights else {
                panic!("a conv of one group is packed where the kernel runs");
            };
            let plain = Conv2d {
                weights: ConvWeights::Plain(packed_weights.unpack()),
                ..packed.clone()
            };
            let x = tensor([2, 11, 13, in_channels], 3);
            let residual = tensor(plain.forward(&x).unwrap().nhwc_shape(), 4);
            for (residual, relu) in [(None, false), (Some(&residual), true)] {
                let a = packed.forward_fused(&x, residual, relu).unwrap();
                let b = plain.forward_fused(&x, residual, relu).unwrap();
                for (index, (a, b)) in a.as_slice().iter().zip(b.as_slice()).enumerate() {
                    assert!(
                        close(*a, *b, 1.0),
                        "case {case}, element {index}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

use ndarray::{Array4, ArrayView4, ArrayViewMut4};

/// Activations in NHWC order (batch, height, width, channels), f32, always in
/// standard (row-major) layout, so that a pixel's channels are contiguous.
///
/// torch stores activations NCHW; [`Tensor::from_nchw`] and
/// [`Tensor::to_nchw`] are the only crossings between the two orders.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor(Array4<f32>);

impl Tensor {
    /// Wraps an NHWC array, copying only if it is not already row-major.
    pub fn from_nhwc(array: Array4<f32>) -> Self {
        if array.is_standard_layout() {
            Tensor(array)
        } else {
            Tensor(array.as_standard_layout().into_owned())
        }
    }

    /// Converts an NCHW array (torch's order) into NHWC.
    pub fn from_nchw(array: ArrayView4<'_, f32>) -> Self {
        Tensor(
            array
                .permuted_axes([0, 2, 3, 1])
                .as_standard_layout()
                .into_owned(),
        )
    }

    pub fn zeros(batch: usize, height: usize, width: usize, channels: usize) -> Self {
        Tensor(Array4::zeros((batch, height, width, channels)))
    }

    /// A copy in torch's NCHW order.
    pub fn to_nchw(&self) -> Array4<f32> {
        // A transpose of each image's (pixels x channels) matrix, 16 pixels
        // at a time: their channels stay in L1 while each channel's run of
        // 16 is written; blocks of channels in parallel. ndarray's generic
        // strided copy is several times slower, and verify does this for
        // every stage.
        const TILE: usize = 16;
        const CHANNEL_BLOCK: usize = 32;
        let [batch, height, width, channels] = self.nhwc_shape();
        let pixels = height * width;
        let input = self.as_slice();
        let mut output = vec![0f32; input.len()];
        let image_len = (pixels * channels).max(1);
        for (out_image, image) in output.chunks_mut(image_len).zip(input.chunks(image_len)) {
            crate::parallel::for_each_chunk(
                crate::parallel::threads(),
                out_image,
                pixels * CHANNEL_BLOCK,
                |block, out| {
                    let first_channel = block * CHANNEL_BLOCK;
                    for first in (0..pixels).step_by(TILE) {
                        let count = TILE.min(pixels - first);
                        let tile = &image[first * channels..(first + count) * channels];
                        for (offset, run) in out.chunks_exact_mut(pixels).enumerate() {
                            let channel = first_channel + offset;
                            for (value, pixel) in run[first..first + count]
                                .iter_mut()
                                .zip(tile.chunks_exact(channels))
                            {
                                *value = pixel[channel];
                            }
                        }
                    }
                },
            );
        }
        Array4::from_shape_vec((batch, channels, height, width), output)
            .expect("the same number of elements")
    }

    /// The shape in torch's NCHW order, for reports.
    pub fn nchw_shape(&self) -> [usize; 4] {
        let [n, h, w, c] = self.nhwc_shape();
        [n, c, h, w]
    }

    pub fn nhwc_shape(&self) -> [usize; 4] {
        let s = self.0.shape();
        [s[0], s[1], s[2], s[3]]
    }

    pub fn batch(&self) -> usize {
        self.0.shape()[0]
    }
    pub fn height(&self) -> usize {
        self.0.shape()[1]
    }
    pub fn width(&self) -> usize {
        self.0.shape()[2]
    }
    pub fn channels(&self) -> usize {
        self.0.shape()[3]
    }

    pub fn view(&self) -> ArrayView4<'_, f32> {
        self.0.view()
    }

    pub fn view_mut(&mut self) -> ArrayViewMut4<'_, f32> {
        self.0.view_mut()
    }

    /// The NHWC data, contiguous.
    pub fn as_slice(&self) -> &[f32] {
        self.0
            .as_slice()
            .expect("Tensor keeps its data in standard layout")
    }

    pub fn as_slice_mut(&mut self) -> &mut [f32] {
        self.0
            .as_slice_mut()
            .expect("Tensor keeps its data in standard layout")
    }

    pub fn into_array(self) -> Array4<f32> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nchw_round_trip_moves_channels_last() {
        let nchw = Array4::from_shape_fn((2, 3, 4, 5), |(n, c, h, w)| {
            (n * 1000 + c * 100 + h * 10 + w) as f32
        });
        let tensor = Tensor::from_nchw(nchw.view());
        assert_eq!(tensor.nhwc_shape(), [2, 4, 5, 3]);
        assert_eq!(tensor.nchw_shape(), [2, 3, 4, 5]);
        // Element (n=1, c=2, h=3, w=4) lives at NHWC index (1, 3, 4, 2).
        assert_eq!(tensor.view()[[1, 3, 4, 2]], 1234.0);
        // Channels of one pixel are adjacent in memory.
        let pixel = &tensor.as_slice()[..3];
        assert_eq!(pixel, &[0.0, 100.0, 200.0]);
        assert_eq!(tensor.to_nchw(), nchw);
    }
}

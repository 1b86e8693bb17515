//! Helpers shared by the core's unit tests.

/// Deterministic values in [-0.5, 0.5); other seeds give unrelated values
/// (the seed reaches the high bits, which the low ones would not).
pub(crate) fn values(count: usize, seed: u32) -> Vec<f32> {
    (0..count)
        .map(|i| {
            let bits = (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(0x9E37_79B9))
                >> 8;
            bits as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

/// An NHWC tensor of `shape` filled with [`values`].
pub(crate) fn tensor(shape: [usize; 4], seed: u32) -> crate::Tensor {
    let [batch, height, width, channels] = shape;
    let data = values(shape.iter().product(), seed);
    crate::Tensor::from_nhwc(
        ndarray::Array4::from_shape_vec((batch, height, width, channels), data)
            .expect("as many values as the shape holds"),
    )
}

/// Close enough for two f32 computations of the same sum: within 1e-5 of
/// `want`, relative to `1 + |want|`, times `scale` (more for longer sums).
pub(crate) fn close(got: f32, want: f32, scale: f32) -> bool {
    (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * scale
}

use super::ShapeError;
use crate::{parallel, Tensor};

/// Elements per parallel task in element-wise passes: large enough that a
/// task outweighs its scheduling.
pub(crate) const PARALLEL_CHUNK: usize = 1 << 15;

/// torch's ReLU of one value: a negative value is 0; NaN stays NaN and -0
/// stays -0, as in torch. (`f32::max(v, 0.0)` turned NaN into 0, so a
/// network that met a NaN gave finite logits where torch gives NaN.) The
/// vector kernels get the same from `max_ps(zero, v)`, which returns its
/// second operand for a NaN and for two zeros.
#[inline(always)]
pub fn relu_value(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}

pub fn relu(x: &Tensor) -> Tensor {
    let mut out = x.clone();
    relu_in_place(&mut out);
    out
}

pub fn relu_in_place(x: &mut Tensor) {
    parallel::for_each_chunk(
        parallel::threads(),
        x.as_slice_mut(),
        PARALLEL_CHUNK,
        |_, chunk| chunk.iter_mut().for_each(|v| *v = relu_value(*v)),
    );
}

/// The end of every residual block: `relu(residual + identity)`.
pub fn add_relu(residual: &Tensor, identity: &Tensor) -> Result<Tensor, ShapeError> {
    let mut out = residual.clone();
    add_relu_in_place(&mut out, identity)?;
    Ok(out)
}

/// [`add_relu`], written over the residual.
pub fn add_relu_in_place(residual: &mut Tensor, identity: &Tensor) -> Result<(), ShapeError> {
    if residual.nhwc_shape() != identity.nhwc_shape() {
        return Err(ShapeError::ResidualIdentity {
            residual: residual.nhwc_shape(),
            identity: identity.nhwc_shape(),
        });
    }
    let identity = identity.as_slice();
    parallel::for_each_chunk(
        parallel::threads(),
        residual.as_slice_mut(),
        PARALLEL_CHUNK,
        |index, sums| {
            let skips = &identity[index * PARALLEL_CHUNK..];
            for (sum, &skip) in sums.iter_mut().zip(skips) {
                *sum = relu_value(*sum + skip);
            }
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relu_keeps_nan_and_the_sign_of_zero_as_torch_does() {
        // torch.relu(tensor([-0., nan, -1., 2.])) is [-0., nan, 0., 2.].
        let got = [
            -0.0f32,
            f32::NAN,
            -1.0,
            2.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
        ]
        .map(relu_value);
        assert_eq!(got[0].to_bits(), (-0.0f32).to_bits());
        assert!(got[1].is_nan());
        assert_eq!(got[2].to_bits(), 0.0f32.to_bits());
        assert_eq!(&got[3..], &[2.0, 0.0, f32::INFINITY]);
        let values = vec![f32::NAN, -1.0, 1.0, -0.0];
        let x = Tensor::from_nhwc(ndarray::Array4::from_shape_vec((1, 1, 1, 4), values).unwrap());
        let out = add_relu(&x, &Tensor::zeros(1, 1, 1, 4)).unwrap();
        assert!(out.as_slice()[0].is_nan() && relu(&x).as_slice()[0].is_nan());
        assert_eq!(&out.as_slice()[1..3], &[0.0, 1.0]);
    }
}

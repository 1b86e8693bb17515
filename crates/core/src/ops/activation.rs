use rayon::prelude::*;

use super::ShapeError;
use crate::Tensor;

/// Elements per parallel task in element-wise passes: large enough that a
/// task outweighs its scheduling.
pub(crate) const PARALLEL_CHUNK: usize = 1 << 15;

pub fn relu(x: &Tensor) -> Tensor {
    let mut out = x.clone();
    relu_in_place(&mut out);
    out
}

pub fn relu_in_place(x: &mut Tensor) {
    x.as_slice_mut()
        .par_chunks_mut(PARALLEL_CHUNK)
        .for_each(|chunk| chunk.iter_mut().for_each(|v| *v = v.max(0.0)));
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
    residual
        .as_slice_mut()
        .par_chunks_mut(PARALLEL_CHUNK)
        .zip(identity.as_slice().par_chunks(PARALLEL_CHUNK))
        .for_each(|(sums, skips)| {
            for (sum, &skip) in sums.iter_mut().zip(skips) {
                *sum = (*sum + skip).max(0.0);
            }
        });
    Ok(())
}

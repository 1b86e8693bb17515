use super::ShapeError;
use crate::{parallel, Tensor};

/// Elements per parallel task in element-wise passes: large enough that a
/// task outweighs its scheduling.
pub(crate) const PARALLEL_CHUNK: usize = 1 << 15;

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
        |_, chunk| chunk.iter_mut().for_each(|v| *v = v.max(0.0)),
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
                *sum = (*sum + skip).max(0.0);
            }
        },
    );
    Ok(())
}

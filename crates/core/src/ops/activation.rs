use super::ShapeError;
use crate::Tensor;

pub fn relu(x: &Tensor) -> Tensor {
    let mut out = x.clone();
    out.as_slice_mut().iter_mut().for_each(|v| *v = v.max(0.0));
    out
}

/// The end of every residual block: `relu(residual + identity)`.
pub fn add_relu(residual: &Tensor, identity: &Tensor) -> Result<Tensor, ShapeError> {
    if residual.nhwc_shape() != identity.nhwc_shape() {
        return Err(format!(
            "the residual {:?} and the identity {:?} must have the same shape",
            residual.nhwc_shape(),
            identity.nhwc_shape()
        ));
    }
    let mut out = residual.clone();
    for (sum, &skip) in out.as_slice_mut().iter_mut().zip(identity.as_slice()) {
        *sum = (*sum + skip).max(0.0);
    }
    Ok(out)
}

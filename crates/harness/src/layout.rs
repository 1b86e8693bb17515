//! Bringing the core's tensors and the dumps' arrays into torch's NCHW
//! order, the order every report speaks in (the axis questions themselves
//! are [`resnet_dump::Layout`]'s).

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use resnet_core::Tensor;

/// The core's NHWC tensor as NCHW, shaped like `reference_shape` where the
/// two agree element for element (the logits: `[N, 1, 1, C]` is `[N, C]`).
pub fn candidate_nchw(tensor: &Tensor, reference_shape: &[usize]) -> Option<ArrayD<f32>> {
    let nchw = tensor.to_nchw().into_dyn();
    if nchw.shape() == reference_shape {
        return Some(nchw);
    }
    let [n, c, h, w] = tensor.nchw_shape();
    (reference_shape == [n, c] && h == 1 && w == 1).then(|| {
        nchw.into_shape_with_order(IxDyn(&[n, c]))
            .expect("same size")
    })
}

/// An NCHW reference (or `[N, C]` logits) as the core's input tensor.
pub fn reference_tensor(nchw: ArrayViewD<'_, f32>) -> Option<Tensor> {
    match *nchw.shape() {
        [n, c, h, w] => Some(Tensor::from_nchw(
            nchw.into_shape_with_order((n, c, h, w)).ok()?,
        )),
        [n, c] => Some(Tensor::from_nhwc(
            nchw.into_shape_with_order((n, 1, 1, c)).ok()?.to_owned(),
        )),
        _ => None,
    }
}

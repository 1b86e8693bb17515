//! Bringing stored arrays into torch's NCHW order, the order every report
//! speaks in.

use ndarray::{ArrayD, ArrayViewD, IxDyn};
use resnet_core::Tensor;
use resnet_dump::{Dump, DumpError, Layout, StageEntry};

/// An activation in NCHW order (4-D), or `[N, features]` for `fc`.
pub fn to_nchw(array: ArrayD<f32>, layout: Layout) -> ArrayD<f32> {
    match (layout, array.ndim()) {
        (Layout::NHWC, 4) => array
            .permuted_axes(IxDyn(&[0, 3, 1, 2]))
            .as_standard_layout()
            .into_owned(),
        _ => array,
    }
}

/// A dump's stage, read and brought into NCHW order.
pub fn load_nchw(dump: &Dump, entry: &StageEntry) -> Result<ArrayD<f32>, DumpError> {
    Ok(to_nchw(
        dump.load_stage(entry)?.data,
        dump.manifest().layout,
    ))
}

/// The inverse of [`to_nchw`], without a copy: an NCHW array seen in the
/// axis order of a file stored in `layout`, so that iterating it walks the
/// file's memory order.
pub fn as_stored(nchw: &ArrayD<f32>, layout: Layout) -> ArrayViewD<'_, f32> {
    match (layout, nchw.ndim()) {
        (Layout::NHWC, 4) => nchw.view().permuted_axes(IxDyn(&[0, 2, 3, 1])),
        _ => nchw.view(),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_stored_walks_the_file_order_back() {
        let nhwc = ArrayD::from_shape_fn(IxDyn(&[2, 3, 4, 5]), |i| {
            (i[0] * 1000 + i[1] * 100 + i[2] * 10 + i[3]) as f32
        });
        let file_order: Vec<f32> = nhwc.iter().copied().collect();
        for layout in [Layout::NHWC, Layout::NCHW] {
            let nchw = to_nchw(nhwc.clone(), layout);
            let stored = as_stored(&nchw, layout);
            assert_eq!(stored.shape(), nhwc.shape());
            assert_eq!(stored.iter().copied().collect::<Vec<_>>(), file_order);
        }
    }
}

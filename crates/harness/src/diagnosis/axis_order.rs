//! Axis orders, and the layout hypothesis: the candidate holds the reference's values with the axes in
//! another order. Either its file says so in its shape (NHWC stored, read
//! as NCHW), or it does not (NHWC data under an NCHW shape: a reshape
//! without a transpose). Both are the same test on the stored buffer: read
//! it in every other axis order and see whether one gives the reference.

use ndarray::{Array4, ArrayD, ArrayViewD};
use resnet_dump::Layout;

use super::{Evidence, Hint, Hypothesis};

/// An order of a 4-D tensor's axes in memory: `order[k]` is the logical
/// axis stored at position `k` (NHWC is `[0, 2, 3, 1]` over NCHW).
pub type AxisOrder = [usize; 4];

pub const NCHW: AxisOrder = Layout::NCHW.axis_order();
pub const NHWC: AxisOrder = Layout::NHWC.axis_order();

/// `order` named with `letters` (`"NCHW"` or `"OIHW"`): NHWC, OHWI.
pub fn order_name(order: AxisOrder, letters: &str) -> String {
    order.iter().map(|&axis| &letters[axis..axis + 1]).collect()
}

/// Every order of four axes that differs from `except` in a way that
/// matters for `shape`: axes of size 1 may sit anywhere without changing
/// the memory, so orders that differ only by them are left out (and only
/// the first of several equivalent orders is kept).
pub fn other_orders(shape: &[usize], except: AxisOrder) -> Vec<AxisOrder> {
    let key = |order: &AxisOrder| -> Vec<usize> {
        order
            .iter()
            .copied()
            .filter(|&axis| shape[axis] != 1)
            .collect()
    };
    let mut seen = vec![key(&except)];
    let mut orders = Vec::new();
    for order in permutations() {
        let order_key = key(&order);
        if !seen.contains(&order_key) {
            seen.push(order_key);
            orders.push(order);
        }
    }
    orders
}

fn permutations() -> Vec<AxisOrder> {
    let mut all = Vec::with_capacity(24);
    for a in 0..4 {
        for b in (0..4).filter(|&b| b != a) {
            for c in (0..4).filter(|&c| c != a && c != b) {
                let d = 6 - a - b - c;
                all.push([a, b, c, d]);
            }
        }
    }
    all
}

/// The shape a tensor of logical `shape` has when stored in `order`.
pub fn stored_shape(shape: &[usize], order: AxisOrder) -> [usize; 4] {
    order.map(|axis| shape[axis])
}

/// `buffer` read as a tensor of logical `shape` stored in `order`, back in
/// logical order. None if the sizes differ.
pub fn read_in_order(buffer: &[f32], shape: &[usize], order: AxisOrder) -> Option<ArrayD<f32>> {
    let stored = Array4::from_shape_vec(stored_shape(shape, order), buffer.to_vec()).ok()?;
    let mut logical_axes = [0; 4];
    for (position, &axis) in order.iter().enumerate() {
        logical_axes[axis] = position;
    }
    Some(
        stored
            .permuted_axes(logical_axes)
            .as_standard_layout()
            .into_owned()
            .into_dyn(),
    )
}

/// The inverse of [`read_in_order`]: `array` transposed to `order` and its
/// memory read back in logical order, as a saver that transposed without
/// reshaping would leave it.
pub fn written_in_order(array: &ArrayD<f32>, order: AxisOrder) -> Option<ArrayD<f32>> {
    if array.ndim() != 4 {
        return None;
    }
    let buffer: Vec<f32> = array
        .view()
        .permuted_axes(order.to_vec())
        .iter()
        .copied()
        .collect();
    ArrayD::from_shape_vec(array.shape(), buffer).ok()
}

/// A layout that turns the candidate's stored data into the reference.
#[derive(Clone, Debug)]
pub struct LayoutMatch {
    pub order: AxisOrder,
    pub hint: Hint,
    /// The file has the shape its layout says, with the values in `order`:
    /// they were reshaped, not transposed, and no reading flag undoes that.
    pub reshaped: bool,
}

/// Whether the candidate's file (`stored`, as read, before any layout
/// conversion; `assumed` is the layout it was read with) is the reference
/// in another axis order.
pub(crate) fn find(
    evidence: &Evidence,
    stored: ArrayViewD<'_, f32>,
    assumed: Layout,
    reference: &ArrayD<f32>,
) -> Option<LayoutMatch> {
    let buffer = stored_buffer(stored.view(), reference)?;
    let assumed_order = assumed.axis_order();
    for order in other_orders(reference.shape(), assumed_order) {
        let Some(error) = reproduced_in_order(evidence, &buffer, order, reference) else {
            continue;
        };
        let name = order_name(order, "NCHW");
        let assumed_name = order_name(assumed_order, "NCHW");
        let reshaped = stored.shape() == stored_shape(reference.shape(), assumed_order);
        let message = if reshaped {
            // Only height and width trade places: as likely an image
            // transposed (x.transpose(2, 3)) as a reshape.
            let height_width_only = order == [0, 1, 3, 2] && assumed_order == NCHW;
            format!(
                "the candidate holds the reference's values in {name} order under its {assumed_name} shape {:?}: {}",
                stored.shape(),
                if height_width_only {
                    "height and width swapped (the image transposed, or reshaped without a transpose)"
                } else {
                    "a reshape without a transpose"
                }
            )
        } else {
            let flag = if [NCHW, NHWC].contains(&order) {
                format!("pass --cand-layout {} or ", name.to_lowercase())
            } else {
                String::new()
            };
            format!(
                "the candidate's file is the reference stored {name} (shape {:?}), read as {assumed_name}; {flag}write {assumed_name}",
                stored.shape(),
            )
        };
        return Some(LayoutMatch {
            order,
            reshaped,
            hint: Hint {
                hypothesis: Hypothesis::Layout,
                message,
                relative_error: Some(error),
            },
        });
    }
    None
}

/// Whether `stored` is the reference in `order` (to confirm on more
/// stages a layout found on one).
pub(crate) fn holds(
    evidence: &Evidence,
    stored: ArrayViewD<'_, f32>,
    order: AxisOrder,
    reference: &ArrayD<f32>,
) -> bool {
    stored_buffer(stored, reference)
        .and_then(|buffer| reproduced_in_order(evidence, &buffer, order, reference))
        .is_some()
}

/// The stored values in memory order, if they could be a 4-D reference's.
fn stored_buffer(stored: ArrayViewD<'_, f32>, reference: &ArrayD<f32>) -> Option<Vec<f32>> {
    (reference.ndim() == 4 && stored.len() == reference.len())
        .then(|| stored.iter().copied().collect())
}

/// How closely `buffer` read in `order` reproduces the reference, if it does.
fn reproduced_in_order(
    evidence: &Evidence,
    buffer: &[f32],
    order: AxisOrder,
    reference: &ArrayD<f32>,
) -> Option<f64> {
    evidence.reproduces(&read_in_order(buffer, reference.shape(), order)?, reference)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    #[test]
    fn nhwc_storage_is_read_back_in_nchw_order() {
        let nchw = ndarray::Array::from_shape_fn(IxDyn(&[2, 3, 4, 5]), |i| {
            (i[0] * 1000 + i[1] * 100 + i[2] * 10 + i[3]) as f32
        });
        let nhwc: Vec<f32> = nchw
            .view()
            .permuted_axes(IxDyn(&[0, 2, 3, 1]))
            .iter()
            .copied()
            .collect();
        assert_eq!(read_in_order(&nhwc, nchw.shape(), NHWC).unwrap(), nchw);
        assert_ne!(read_in_order(&nhwc, nchw.shape(), NCHW).unwrap(), nchw);
        let misread = read_in_order(nchw.as_slice().unwrap(), nchw.shape(), NHWC).unwrap();
        assert_eq!(written_in_order(&misread, NHWC).unwrap(), nchw);
    }

    #[test]
    fn orders_that_only_move_unit_axes_are_not_tried_twice() {
        // Batch 1: N can sit anywhere; 6 orders of C, H, W remain, less NCHW.
        assert_eq!(other_orders(&[1, 3, 4, 5], NCHW).len(), 5);
        assert_eq!(other_orders(&[2, 3, 4, 5], NCHW).len(), 23);
        assert_eq!(order_name(NHWC, "NCHW"), "NHWC");
        assert_eq!(order_name([0, 2, 3, 1], "OIHW"), "OHWI");
    }
}

//! Buffers that the inference path writes whole before anything reads
//! them: a conv's output, its padded input, Winograd's transformed tiles
//! and products, the max pool's output. They are handed out unwritten
//! rather than zeroed: zeroing is a pass over the whole buffer on the
//! calling thread while the others wait, 0.55 ms of a ResNet50 pass at two
//! threads. (Without it, a pass at two threads is 0.2-0.4 ms faster, not
//! 0.55: the region's first writes now meet memory the zeroing had
//! brought into the cache.) `MaybeUninit` keeps "written before read" in
//! the types.

use std::mem::MaybeUninit;

use ndarray::Array4;

use crate::Tensor;

/// A `len`-long buffer, filled by `write`.
///
/// # Safety
/// `write` must write every element of the slice it is given.
pub(crate) unsafe fn vec_written_by(
    len: usize,
    write: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut buffer = Box::<[f32]>::new_uninit_slice(len);
    write(&mut buffer);
    // SAFETY: the caller promises that `write` wrote every element.
    unsafe { buffer.assume_init() }.into_vec()
}

/// An NHWC tensor of `shape`, filled by `write` (its elements in NHWC
/// order).
///
/// # Safety
/// `write` must write every element of the slice it is given.
pub(crate) unsafe fn tensor_written_by(
    [batch, height, width, channels]: [usize; 4],
    write: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> Tensor {
    let mut array = Array4::<f32>::uninit((batch, height, width, channels));
    write(array.as_slice_mut().expect("a new array is contiguous"));
    // SAFETY: the caller promises that `write` wrote every element.
    Tensor::from_nhwc(unsafe { array.assume_init() })
}

/// `buffer` with every element set to `value`, as floats.
pub(crate) fn filled(buffer: &mut [MaybeUninit<f32>], value: f32) -> &mut [f32] {
    buffer.fill(MaybeUninit::new(value));
    // SAFETY: every element was just written, and `MaybeUninit<f32>` has
    // the layout of `f32`.
    unsafe { &mut *(buffer as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// Where an element-wise loop puts a result: a float already written (a
/// scratch row) or one not yet written (a buffer of this module's).
pub(crate) trait Store {
    fn store(&mut self, value: f32);
}

impl Store for f32 {
    fn store(&mut self, value: f32) {
        *self = value;
    }
}

impl Store for MaybeUninit<f32> {
    fn store(&mut self, value: f32) {
        self.write(value);
    }
}

//! The one entry point to the GEMM crate. `gemm` brings packed, cache-blocked
//! kernels for AVX2, AVX-512 and NEON with rayon threading: writing and tuning
//! that by hand is exactly what a well-kept crate is for.

use gemm::Parallelism;

/// A row-major (or transposed, through the strides) matrix inside a slice.
#[derive(Clone, Copy)]
pub(crate) struct MatrixView<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub row_stride: usize,
    pub column_stride: usize,
}

impl<'a> MatrixView<'a> {
    pub fn row_major(data: &'a [f32], offset: usize, row_stride: usize) -> Self {
        MatrixView {
            data,
            offset,
            row_stride,
            column_stride: 1,
        }
    }

    fn check(&self, rows: usize, columns: usize) {
        if rows > 0 && columns > 0 {
            let last =
                self.offset + (rows - 1) * self.row_stride + (columns - 1) * self.column_stride;
            assert!(last < self.data.len(), "matrix view reaches past its slice");
        }
    }
}

/// Where a product is written: `rows x columns` elements starting at a raw
/// pointer with a row stride, so that several groups of a grouped conv can
/// write their disjoint column blocks of one output at the same time.
#[derive(Clone, Copy)]
pub(crate) struct OutputBlock {
    pub data: *mut f32,
    pub row_stride: usize,
}

impl OutputBlock {
    /// The same rows, starting `columns` further right.
    ///
    /// # Safety
    /// The shifted block must stay inside the allocation.
    pub unsafe fn shifted(self, columns: usize) -> Self {
        OutputBlock {
            data: self.data.add(columns),
            row_stride: self.row_stride,
        }
    }
}

// SAFETY: an OutputBlock is only shared between threads that write disjoint
// column blocks of the same output (see `multiply`'s contract).
unsafe impl Send for OutputBlock {}
unsafe impl Sync for OutputBlock {}

/// `output = lhs (m x k) * rhs (k x n)`.
///
/// # Safety
/// `output` must point to `m` rows of at least `n` writable elements each,
/// `row_stride` apart, that nothing else reads or writes during the call.
pub(crate) unsafe fn multiply(
    m: usize,
    n: usize,
    k: usize,
    lhs: MatrixView<'_>,
    rhs: MatrixView<'_>,
    output: OutputBlock,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    lhs.check(m, k);
    rhs.check(k, n);
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        output.data,
        1,
        output.row_stride as isize,
        false,
        lhs.data.as_ptr().add(lhs.offset),
        lhs.column_stride as isize,
        lhs.row_stride as isize,
        rhs.data.as_ptr().add(rhs.offset),
        rhs.column_stride as isize,
        rhs.row_stride as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

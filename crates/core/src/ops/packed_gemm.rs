//! The inference path's GEMM: `output = activations x weights`, with the
//! weights packed once when the network is loaded, and the conv's epilogue
//! (bias, residual add, ReLU) applied as each output tile is stored.
//!
//! Why not the `gemm` crate here, as everywhere else? Its API takes two plain
//! matrices per call, so it packs the weights again on every call (about 10%
//! of a ResNet50 forward pass, measured with perf) and leaves the epilogue
//! to a second pass over the output. A conv's weights never change, and its
//! epilogue is cheap only while the tile is still in registers. The kernel
//! is BLIS's register tile, 6x16 (12 of the 16 AVX2 registers as
//! accumulators), over weights packed in 16-column panels. Measured on
//! ResNet50 here, two of BLIS's usual steps lost time and are left out: the
//! activations are read in place rather than packed (a 6-row tile reads six
//! contiguous streams), and each output tile is stored once, epilogue
//! included. Rows are blocked so that an activation block stays in L2
//! while the weight panels pass over it.
//!
//! On a CPU with AVX-512 the tile is 14x32: two panels side by side, one
//! 16-float register per row and panel (28 of the 32 registers), so each
//! activation value loaded serves two FMAs; 14 rows fit the 56/28/14 maps
//! with no tail. Its first tile of each panel pair prefetches the next
//! pair. Every kernel sums the depth in the same order ([`sum_in_chunks`]:
//! chunks of 256 steps, for accuracy), so they give the same bits. The
//! kernel is chosen at each call from the CPU's features
//! (`is_x86_feature_detected!` caches them). CPUs without AVX2 and FMA use
//! the `gemm` crate (see `conv.rs`).

use std::mem::MaybeUninit;

use super::activation::relu_value;

/// Rows of the AVX2 register tile (output pixels).
const MR: usize = 6;
/// Rows of the AVX-512 register tile.
const MR_512: usize = 14;
/// Columns of a weight panel, and of the AVX2 tile (output channels): two
/// 8-float registers, or one 16-float register.
const NR: usize = 16;
/// Panels side by side in the AVX-512 tile (14x32): 28 accumulators, so
/// that each activation value loaded serves two FMAs.
const PANELS_512: usize = 2;
/// Depth steps summed into fresh accumulators before they are added to the
/// tile's running total: a two-level sum, whose rounding error grows with
/// `CHUNK + depth / CHUNK` rather than with the depth (4608 in ResNet50's
/// last 3x3 convs). `scripts/measure-accuracy` (ResNet50, against float64):
/// one running sum left the core's error up to 2.2x PyTorch float32's own
/// (fc; layer4.2.bn3 1.9x); in chunks of 256, 1.6x at fc and at most 1.3x
/// elsewhere, for about 2% of the time.
const CHUNK: usize = 256;
/// An activation block's size in floats (256 KiB): it stays in L2 while
/// every weight panel passes over it.
const BLOCK_FLOATS: usize = 64 * 1024;

/// How many activation blocks a GEMM's rows are cut into: blocks of as
/// many rows as fit [`BLOCK_FLOATS`] (24 to 384), each one more pass of all
/// the weights through the cache.
fn block_count(rows: usize, own_per_row: usize) -> usize {
    let most = (BLOCK_FLOATS / own_per_row.max(1)).clamp(4 * MR, 64 * MR);
    rows.div_ceil(most)
}

/// A GEMM's rows in `count` blocks of whole register tiles, or more: a
/// multiple of the threads (nine blocks of ResNet50's 3136-row layer1 left
/// one thread five and the other four). Their heights are as even as tiles
/// allow (a last block of one row, in the 49-pixel late layers, would cost
/// a whole pass of the weights), the taller first (blocks of 4, 4, 3 and 3
/// tiles, taken two at a time, give each thread 7; in the order 3, 4, 3, 4
/// one thread got 8).
struct RowBlocks {
    rows: usize,
    tile_rows: usize,
    tiles: usize,
    count: usize,
}

impl RowBlocks {
    fn new(rows: usize, count: usize, tile_rows: usize, threads: usize) -> Self {
        let tiles = rows.div_ceil(tile_rows);
        let count = match count {
            0 | 1 => 1,
            _ => count.next_multiple_of(threads.max(1)).min(tiles),
        };
        RowBlocks {
            rows,
            tile_rows,
            tiles,
            count,
        }
    }

    /// Block `index`'s first row and its number of rows.
    fn block(&self, index: usize) -> (usize, usize) {
        let (base, extra) = (self.tiles / self.count, self.tiles % self.count);
        let first_tile = index * base + index.min(extra);
        let end_tile = first_tile + base + (index < extra) as usize;
        let first = first_tile * self.tile_rows;
        let end = (end_tile * self.tile_rows).min(self.rows);
        (first, end - first)
    }
}

/// A register-tile kernel and its height.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// 6x16, AVX2 and FMA.
    Avx2,
    /// 14x32, AVX-512F (14x16 on a last, odd panel).
    Avx512,
}

impl Kernel {
    /// The fastest kernel this CPU runs, if any.
    pub fn best() -> Option<Kernel> {
        Kernel::all()
            .into_iter()
            .rev()
            .find(|kernel| kernel.runs_here())
    }

    pub fn all() -> [Kernel; 2] {
        [Kernel::Avx2, Kernel::Avx512]
    }

    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            match self {
                Kernel::Avx2 => avx2,
                Kernel::Avx512 => avx2 && is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// Whether this CPU runs a kernel (the std macro caches the features).
pub(crate) fn available() -> bool {
    Kernel::best().is_some()
}

/// A `depth x columns` row-major matrix as 16-column panels, each `depth`
/// rows of 16 contiguous values, zero past the last column.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PackedWeights {
    depth: usize,
    columns: usize,
    data: Vec<f32>,
}

impl PackedWeights {
    pub fn pack(matrix: &[f32], depth: usize, columns: usize) -> Self {
        assert_eq!(matrix.len(), depth * columns);
        Self::packed_by_panel(depth, columns, |first, width, packed| {
            for (row, packed_row) in packed.chunks_exact_mut(NR).enumerate() {
                let start = row * columns + first;
                packed_row[..width].copy_from_slice(&matrix[start..start + width]);
            }
        })
    }

    /// Packs the `depth x columns` matrix held column after column, each
    /// column's rows in the order `source_rows` gives: row `k` of column
    /// `c` is `column_major[c * depth + source_rows[k]]`. A torch conv
    /// weight (OIHW: filter after filter) is such a matrix, packed here
    /// without first being reordered into a row-major one (that reorder
    /// took 20 ms of building ResNet50, the packing after it 11).
    pub fn pack_columns(column_major: &[f32], source_rows: &[usize], columns: usize) -> Self {
        let depth = source_rows.len();
        assert_eq!(column_major.len(), depth * columns);
        Self::packed_by_panel(depth, columns, |first, width, packed| {
            let sources = &column_major[first * depth..(first + width) * depth];
            for (packed_row, &source_row) in packed.chunks_exact_mut(NR).zip(source_rows) {
                for (value, column) in packed_row.iter_mut().zip(sources.chunks_exact(depth)) {
                    *value = column[source_row];
                }
            }
        })
    }

    /// Panels filled by `fill(first column, width, panel)`, zero past the
    /// last column, the panels on the core's threads: the first writes to
    /// fresh memory are page faults, and building ResNet50 (100 MB of
    /// packed weights) spent most of its packing in them.
    fn packed_by_panel(
        depth: usize,
        columns: usize,
        fill: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) -> Self {
        let panels = columns.div_ceil(NR);
        let mut data = vec![0f32; panels * depth * NR];
        crate::parallel::for_each_chunk(
            crate::parallel::threads(),
            &mut data,
            depth * NR,
            |panel, packed| {
                let first = panel * NR;
                fill(first, NR.min(columns - first), packed);
            },
        );
        PackedWeights {
            depth,
            columns,
            data,
        }
    }

    /// The `depth x columns` row-major matrix it was packed from.
    pub fn unpack(&self) -> Vec<f32> {
        let mut matrix = vec![0f32; self.depth * self.columns];
        for (panel, packed) in self.data.chunks_exact(self.depth * NR).enumerate() {
            let first = panel * NR;
            let width = NR.min(self.columns - first);
            for (row, packed_row) in packed.chunks_exact(NR).enumerate() {
                let start = row * self.columns + first;
                matrix[start..start + width].copy_from_slice(&packed_row[..width]);
            }
        }
        matrix
    }

    /// Panels `first..first + count`, one after the other.
    fn panels(&self, first: usize, count: usize) -> &[f32] {
        &self.data[first * self.depth * NR..(first + count) * self.depth * NR]
    }
}

/// What is done to each output element once its sum is complete.
#[derive(Clone, Copy, Default)]
pub(crate) struct Epilogue<'a> {
    /// One value per column.
    pub bias: Option<&'a [f32]>,
    /// Laid out as the output.
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

/// The left-hand matrix (activations), row by row: each row is `taps` runs
/// of `segment` contiguous values. A plain row-major matrix is one run per
/// row; a conv's patches are one run of input channels per kernel tap,
/// read straight from the NHWC input, so no im2col copy is made.
pub(crate) struct Rows<'a> {
    pub taps: usize,
    pub segment: usize,
    /// Values of the activations that a row reads and its neighbours do
    /// not (`depth` for a plain matrix; for a conv's patches, about its
    /// strides' worth of pixels): what a block of rows keeps in cache.
    pub own_per_row: usize,
    /// Writes where row `row`'s runs start; each must be readable for
    /// `segment` values (padding points at zeros).
    pub locate: &'a (dyn Fn(usize, &mut [*const f32]) + Sync),
}

/// The output, shared by tasks that write disjoint tiles of it.
#[derive(Clone, Copy)]
struct Output {
    data: *mut f32,
    columns: usize,
}
// SAFETY: tasks write disjoint (row block, panel range) rectangles.
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

/// `output (rows x weights.columns, row-major) = lhs (rows x depth) x
/// weights`, then the epilogue; split over `threads`. Every element of
/// `output` is written (it need not be initialised first).
pub(crate) fn multiply(
    rows: usize,
    lhs: &Rows<'_>,
    weights: &PackedWeights,
    output: &mut [MaybeUninit<f32>],
    epilogue: Epilogue<'_>,
    threads: usize,
) {
    let kernel = Kernel::best().expect("the packed kernel needs AVX2 and FMA");
    multiply_with(kernel, rows, lhs, weights, output, epilogue, threads);
}

/// [`multiply`] with a kernel of the caller's choice (one this CPU runs).
pub(crate) fn multiply_with(
    kernel: Kernel,
    rows: usize,
    lhs: &Rows<'_>,
    weights: &PackedWeights,
    output: &mut [MaybeUninit<f32>],
    epilogue: Epilogue<'_>,
    threads: usize,
) {
    assert!(kernel.runs_here(), "{kernel:?} does not run on this CPU");
    let (depth, columns) = (weights.depth, weights.columns);
    if rows == 0 || columns == 0 {
        return;
    }
    assert_eq!(lhs.taps * lhs.segment, depth);
    assert_eq!(output.len(), rows * columns);
    if let Some(bias) = epilogue.bias {
        assert_eq!(bias.len(), columns);
    }
    if let Some(residual) = epilogue.residual {
        assert_eq!(residual.len(), output.len());
    }

    let (tile_rows, tile_panels) = match kernel {
        Kernel::Avx2 => (MR, 1),
        Kernel::Avx512 => (MR_512, PANELS_512),
    };
    // One task per thread where the work allows: the tasks are equal, so
    // more of them balance nothing, and each costs (its activation block
    // brought into cache, its first weight panels read cold: a late layer
    // split eight ways read half its panels unprefetched). ResNet50 at two
    // threads, the sum of its steps' medians: 19.0-19.7 ms with four tasks
    // a thread and blocks of unequal height, 18.3-18.8 with this.
    let blocks = RowBlocks::new(rows, block_count(rows, lhs.own_per_row), tile_rows, threads);
    let row_blocks = blocks.count;
    let panels = columns.div_ceil(NR);
    // A late layer of ResNet50 at batch 1 has 49 output pixels, one row
    // block: its work is split over the output channels.
    let panel_splits = threads.div_ceil(row_blocks).clamp(1, panels);
    // Whole tiles per task: a pair of panels is not split.
    let panels_per_task = panels.div_ceil(panel_splits).next_multiple_of(tile_panels);
    let tasks = row_blocks * panels.div_ceil(panels_per_task);
    let out = Output {
        data: output.as_mut_ptr().cast::<f32>(),
        columns,
    };
    let task = |task: usize| {
        let (row_block, split) = (task % row_blocks, task / row_blocks);
        let (first_row, block_rows) = blocks.block(row_block);
        let first_panel = split * panels_per_task;
        let last_panel = panels.min(first_panel + panels_per_task);
        let panels = first_panel..last_panel;
        // SAFETY: this task's rows and panels are its own; the kernel's
        // CPU features were checked above.
        unsafe {
            match kernel {
                Kernel::Avx2 => block::<MR>(
                    lhs,
                    block_rows,
                    weights,
                    panels,
                    1,
                    out,
                    first_row,
                    epilogue,
                    kernel_avx2,
                ),
                Kernel::Avx512 => block::<MR_512>(
                    lhs,
                    block_rows,
                    weights,
                    panels,
                    PANELS_512,
                    out,
                    first_row,
                    epilogue,
                    kernel_avx512,
                ),
            }
        };
    };
    crate::parallel::run(threads, tasks, &task);
}

/// A register-tile kernel of `ROWS` rows: the tile's activation rows (each
/// its taps' run starts), its weight panels (one after the other, as many
/// as `Tile::columns` reaches into), the panels the next tiles will read
/// (which the kernel may prefetch), where the tile goes.
type TileKernel<const ROWS: usize> =
    unsafe fn(usize, usize, &[*const *const f32; ROWS], &[f32], Option<&[f32]>, &Tile);

/// One row block against a range of weight panels: each `tile_panels`
/// panels (16 output channels each, the whole depth) pass over the block's
/// register tiles together.
#[allow(clippy::too_many_arguments)]
unsafe fn block<const ROWS: usize>(
    lhs: &Rows<'_>,
    rows: usize,
    weights: &PackedWeights,
    panels: std::ops::Range<usize>,
    tile_panels: usize,
    out: Output,
    first_row: usize,
    epilogue: Epilogue<'_>,
    kernel: TileKernel<ROWS>,
) {
    let taps = lhs.taps;
    let mut starts = vec![std::ptr::null(); rows * taps];
    for (row, row_starts) in starts.chunks_exact_mut(taps).enumerate() {
        (lhs.locate)(first_row + row, row_starts);
    }
    for panel in panels.clone().step_by(tile_panels) {
        let count = tile_panels.min(panels.end - panel);
        let weight_panels = weights.panels(panel, count);
        let first_column = panel * NR;
        let width = (count * NR).min(weights.columns - first_column);
        // The first tile of these panels fetches the next ones into L2 as
        // it goes: in ResNet50's last layers (49 pixels) each panel serves
        // only four tiles, and the weights come from memory, not L3.
        let next_panel = panel + count;
        let next = (next_panel < panels.end)
            .then(|| weights.panels(next_panel, tile_panels.min(panels.end - next_panel)));
        for first in (0..rows).step_by(ROWS) {
            let tile_rows = ROWS.min(rows - first);
            // The tile's rows of the activations, read in place: six (or
            // fourteen) streams the prefetcher follows, no packing. Past the
            // last row, the last row again (computed, never stored).
            let mut lhs_rows = [std::ptr::null(); ROWS];
            for (r, pointer) in lhs_rows.iter_mut().enumerate() {
                *pointer = starts.as_ptr().add((first + r.min(tile_rows - 1)) * taps);
            }
            let row = first_row + first;
            let tile = Tile {
                output: out.data.add(row * out.columns + first_column),
                stride: out.columns,
                rows: tile_rows,
                columns: width,
                bias: epilogue.bias.map(|b| b.as_ptr().add(first_column)),
                residual: epilogue
                    .residual
                    .map(|r| r.as_ptr().add(row * out.columns + first_column)),
                relu: epilogue.relu,
            };
            let prefetch = if first == 0 { next } else { None };
            kernel(taps, lhs.segment, &lhs_rows, weight_panels, prefetch, &tile);
        }
    }
}

/// Where one register tile goes.
struct Tile {
    output: *mut f32,
    stride: usize,
    rows: usize,
    columns: usize,
    bias: Option<*const f32>,
    residual: Option<*const f32>,
    relu: bool,
}

impl Tile {
    /// The part of this tile from column `first` on.
    unsafe fn columns_from(&self, first: usize) -> Tile {
        Tile {
            output: self.output.add(first),
            columns: self.columns - first,
            bias: self.bias.map(|bias| bias.add(first)),
            residual: self.residual.map(|residual| residual.add(first)),
            ..*self
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(
    taps: usize,
    segment: usize,
    rows: &[*const *const f32; MR],
    panel: &[f32],
    _next: Option<&[f32]>,
    tile: &Tile,
) {
    use std::arch::x86_64::*;

    debug_assert!(tile.columns <= NR && panel.len() == taps * segment * NR);
    let mut b = panel.as_ptr();
    let acc = sum_in_chunks(
        taps,
        segment,
        _mm256_setzero_ps(),
        |total, part| _mm256_add_ps(total, part),
        |acc: &mut [[__m256; 2]; MR], tap, steps| {
            let a: [*const f32; MR] = std::array::from_fn(|r| *rows[r].add(tap));
            for step in steps {
                let b0 = _mm256_loadu_ps(b);
                let b1 = _mm256_loadu_ps(b.add(8));
                b = b.add(NR);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let value = _mm256_broadcast_ss(&*a[r].add(step));
                    acc[0] = _mm256_fmadd_ps(value, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(value, b1, acc[1]);
                }
            }
        },
    );

    if tile.rows == MR && tile.columns == NR {
        let zero = _mm256_setzero_ps();
        for (r, acc) in acc.iter().enumerate() {
            let out = tile.output.add(r * tile.stride);
            for (half, &sum) in acc.iter().enumerate() {
                let mut sum = sum;
                if let Some(bias) = tile.bias {
                    sum = _mm256_add_ps(sum, _mm256_loadu_ps(bias.add(8 * half)));
                }
                if let Some(residual) = tile.residual {
                    let residual = residual.add(r * tile.stride + 8 * half);
                    sum = _mm256_add_ps(sum, _mm256_loadu_ps(residual));
                }
                if tile.relu {
                    // Zero first: NaN and -0 pass, as in torch (relu_value).
                    sum = _mm256_max_ps(zero, sum);
                }
                _mm256_storeu_ps(out.add(8 * half), sum);
            }
        }
        return;
    }
    // An edge tile: through memory, element by element.
    let mut values = [0f32; MR * NR];
    for (r, acc) in acc.iter().enumerate() {
        _mm256_storeu_ps(values.as_mut_ptr().add(r * NR), acc[0]);
        _mm256_storeu_ps(values.as_mut_ptr().add(r * NR + 8), acc[1]);
    }
    store_edge(&values, tile);
}

/// The AVX-512 tile: 14 rows of two panels' 32 columns (one panel's 16 on
/// a last, odd panel), each row's 16 columns of a panel in one register,
/// the activation value broadcast from memory into the FMA. The sums run
/// over the depth in the same order as [`kernel_avx2`]'s, so the bits are
/// the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn kernel_avx512(
    taps: usize,
    segment: usize,
    rows: &[*const *const f32; MR_512],
    panels: &[f32],
    next: Option<&[f32]>,
    tile: &Tile,
) {
    // The next panels are prefetched only when they have the same length,
    // one cache line per panel and depth step, at the depth step this tile
    // is at.
    let next = next.filter(|next| next.len() == panels.len());
    match (tile.columns > NR, next) {
        (true, None) => kernel_avx512_panels::<2, false>(taps, segment, rows, panels, panels, tile),
        (true, Some(next)) => {
            kernel_avx512_panels::<2, true>(taps, segment, rows, panels, next, tile)
        }
        (false, None) => {
            kernel_avx512_panels::<1, false>(taps, segment, rows, panels, panels, tile)
        }
        (false, Some(next)) => {
            kernel_avx512_panels::<1, true>(taps, segment, rows, panels, next, tile)
        }
    }
}

// Not inlined: inlined together into `kernel_avx512`, the four variants
// had LLVM keep the accumulators of one of them on the stack (3x slower).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline(never)]
unsafe fn kernel_avx512_panels<const PANELS: usize, const PREFETCH: bool>(
    taps: usize,
    segment: usize,
    rows: &[*const *const f32; MR_512],
    panels: &[f32],
    next: &[f32],
    tile: &Tile,
) {
    use std::arch::x86_64::*;

    let panel_len = taps * segment * NR;
    debug_assert!(tile.columns <= PANELS * NR && panels.len() == PANELS * panel_len);
    let mut b = panels.as_ptr();
    let mut ahead = next.as_ptr();
    let acc = sum_in_chunks(
        taps,
        segment,
        _mm512_setzero_ps(),
        |total, part| _mm512_add_ps(total, part),
        |acc: &mut [[__m512; PANELS]; MR_512], tap, steps| {
            let a: [*const f32; MR_512] = std::array::from_fn(|r| *rows[r].add(tap));
            for step in steps {
                let weights: [__m512; PANELS] =
                    std::array::from_fn(|panel| _mm512_loadu_ps(b.add(panel * panel_len)));
                b = b.add(NR);
                if PREFETCH {
                    for panel in 0..PANELS {
                        _mm_prefetch::<_MM_HINT_T1>(ahead.add(panel * panel_len).cast());
                    }
                    ahead = ahead.add(NR);
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let value = _mm512_set1_ps(*a[r].add(step));
                    for (acc, &weights) in acc.iter_mut().zip(&weights) {
                        *acc = _mm512_fmadd_ps(value, weights, *acc);
                    }
                }
            }
        },
    );

    if tile.rows == MR_512 && tile.columns == PANELS * NR {
        let zero = _mm512_setzero_ps();
        for (r, acc) in acc.iter().enumerate() {
            for (panel, &sum) in acc.iter().enumerate() {
                let column = panel * NR;
                let mut sum = sum;
                if let Some(bias) = tile.bias {
                    sum = _mm512_add_ps(sum, _mm512_loadu_ps(bias.add(column)));
                }
                if let Some(residual) = tile.residual {
                    let residual = residual.add(r * tile.stride + column);
                    sum = _mm512_add_ps(sum, _mm512_loadu_ps(residual));
                }
                if tile.relu {
                    // Zero first: NaN and -0 pass, as in torch (relu_value).
                    sum = _mm512_max_ps(zero, sum);
                }
                _mm512_storeu_ps(tile.output.add(r * tile.stride + column), sum);
            }
        }
        return;
    }
    let mut values = [[0f32; MR_512 * NR]; PANELS];
    for (r, acc) in acc.iter().enumerate() {
        for (panel, &sum) in acc.iter().enumerate() {
            _mm512_storeu_ps(values[panel].as_mut_ptr().add(r * NR), sum);
        }
    }
    for (panel, values) in values.iter().enumerate() {
        let column = panel * NR;
        if column < tile.columns {
            store_edge(values, &tile.columns_from(column));
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_avx2(
    _: usize,
    _: usize,
    _: &[*const *const f32; MR],
    _: &[f32],
    _: Option<&[f32]>,
    _: &Tile,
) {
    unreachable!("no kernel runs off x86_64")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_avx512(
    _: usize,
    _: usize,
    _: &[*const *const f32; MR_512],
    _: &[f32],
    _: Option<&[f32]>,
    _: &Tile,
) {
    unreachable!("no kernel runs off x86_64")
}

/// The order of every kernel's sums over the depth (`taps` runs of
/// `segment` steps), so that the kernels give the same bits: a depth of at
/// most [`CHUNK`] is one running sum; a longer one is summed in chunks
/// (each tap's steps, [`CHUNK`] at a time) from zero, each chunk then added
/// to the total. The accumulators are a tile's registers, `ROWS` rows of
/// `COLUMNS` vectors; `steps(accumulators, tap, steps)` adds those steps of
/// a tap, in order, to them; `add` adds two vectors.
#[inline(always)]
fn sum_in_chunks<Vector: Copy, const COLUMNS: usize, const ROWS: usize>(
    taps: usize,
    segment: usize,
    zero: Vector,
    add: impl Fn(Vector, Vector) -> Vector,
    mut steps: impl FnMut(&mut [[Vector; COLUMNS]; ROWS], usize, std::ops::Range<usize>),
) -> [[Vector; COLUMNS]; ROWS] {
    let zero = [[zero; COLUMNS]; ROWS];
    let mut total = zero;
    if taps * segment <= CHUNK {
        for tap in 0..taps {
            steps(&mut total, tap, 0..segment);
        }
        return total;
    }
    for tap in 0..taps {
        for first in (0..segment).step_by(CHUNK) {
            let mut part = zero;
            steps(&mut part, tap, first..segment.min(first + CHUNK));
            for (total, part) in total.iter_mut().zip(part) {
                for (total, part) in total.iter_mut().zip(part) {
                    *total = add(*total, part);
                }
            }
        }
    }
    total
}

/// The epilogue for a tile cut by the output's edge, in the same order of
/// additions as the full tile, so that edge and inner values round alike;
/// `values` holds one panel's sums, `NR` per row.
unsafe fn store_edge<const VALUES: usize>(values: &[f32; VALUES], tile: &Tile) {
    for r in 0..tile.rows {
        for c in 0..tile.columns.min(NR) {
            let out = tile.output.add(r * tile.stride + c);
            let mut sum = values[r * NR + c];
            if let Some(bias) = tile.bias {
                sum += *bias.add(c);
            }
            if let Some(residual) = tile.residual {
                sum += *residual.add(r * tile.stride + c);
            }
            if tile.relu {
                sum = relu_value(sum);
            }
            *out = sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{close, values};

    /// f64 reference with the same epilogue.
    fn naive(
        rows: usize,
        depth: usize,
        columns: usize,
        a: &[f32],
        b: &[f32],
        e: Epilogue,
    ) -> Vec<f32> {
        let mut out = vec![0f32; rows * columns];
        for i in 0..rows {
            for j in 0..columns {
                let mut sum: f64 = (0..depth)
                    .map(|k| a[i * depth + k] as f64 * b[k * columns + j] as f64)
                    .sum();
                sum += e.bias.map_or(0.0, |bias| bias[j] as f64);
                sum += e.residual.map_or(0.0, |r| r[i * columns + j] as f64);
                out[i * columns + j] = if e.relu { sum.max(0.0) } else { sum } as f32;
            }
        }
        out
    }

    #[test]
    fn every_kernel_this_cpu_runs_agrees_with_the_definition() {
        let kernels: Vec<Kernel> = Kernel::all()
            .into_iter()
            .filter(|k| k.runs_here())
            .collect();
        for kernel in kernels {
            agrees_with_the_definition_on_edges_blocks_and_epilogues(kernel);
        }
    }

    #[test]
    fn a_nan_passes_the_relu_epilogue_in_every_kernel_and_edge_tile() {
        // A row of NaN activations: torch's conv then ReLU gives NaN across
        // the row; max(sum, 0) would give 0. 20 rows and 40 columns make
        // whole and edge tiles of both kernels.
        let (rows, depth, columns) = (20, 3, 40);
        let mut a = values(rows * depth, 8);
        for nan_row in [2, 17] {
            a[nan_row * depth..(nan_row + 1) * depth].fill(f32::NAN);
        }
        let packed = PackedWeights::pack(&values(depth * columns, 9), depth, columns);
        let locate = |row: usize, starts: &mut [*const f32]| starts[0] = a[row * depth..].as_ptr();
        let lhs = Rows {
            taps: 1,
            segment: depth,
            own_per_row: depth,
            locate: &locate,
        };
        for kernel in Kernel::all().into_iter().filter(|k| k.runs_here()) {
            let mut output = vec![MaybeUninit::new(0f32); rows * columns];
            let epilogue = Epilogue {
                relu: true,
                ..Epilogue::default()
            };
            multiply_with(kernel, rows, &lhs, &packed, &mut output, epilogue, 1);
            for (index, value) in output.iter().enumerate() {
                // SAFETY: every element was written.
                let value = unsafe { value.assume_init() };
                let row = index / columns;
                if row == 2 || row == 17 {
                    assert!(
                        value.is_nan(),
                        "{kernel:?}: row {row}, element {index}: {value}"
                    );
                } else {
                    assert!(value >= 0.0, "{kernel:?}: element {index}: {value}");
                }
            }
        }
    }

    #[test]
    fn the_kernels_give_the_same_bits() {
        if !(Kernel::Avx2.runs_here() && Kernel::Avx512.runs_here()) {
            return;
        }
        // One running sum (a depth within one chunk), and several chunks
        // per tap with a short last one.
        for (taps, segment) in [(1, 147), (2, 600)] {
            let (rows, depth, columns) = (61, taps * segment, 70);
            let a = values(rows * depth, 5);
            let packed = PackedWeights::pack(&values(depth * columns, 6), depth, columns);
            let locate = |row: usize, starts: &mut [*const f32]| {
                for (tap, start) in starts.iter_mut().enumerate() {
                    *start = a[row * depth + tap * segment..].as_ptr();
                }
            };
            let lhs = Rows {
                taps,
                segment,
                own_per_row: depth,
                locate: &locate,
            };
            let run = |kernel| {
                let mut output = vec![MaybeUninit::new(0f32); rows * columns];
                multiply_with(
                    kernel,
                    rows,
                    &lhs,
                    &packed,
                    &mut output,
                    Epilogue::default(),
                    2,
                );
                // SAFETY: every element was written.
                output
                    .iter()
                    .map(|v| unsafe { v.assume_init() }.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(run(Kernel::Avx2), run(Kernel::Avx512), "{taps} x {segment}");
        }
    }

    #[test]
    fn unpacking_gives_the_matrix_back() {
        for (depth, columns) in [(1, 1), (3, 17), (5, 32), (7, 70)] {
            let matrix = values(depth * columns, 7);
            assert_eq!(
                PackedWeights::pack(&matrix, depth, columns).unpack(),
                matrix
            );
        }
    }

    #[test]
    fn a_long_depth_is_summed_in_chunks() {
        // 2^24, then ones: a running sum stays at 2^24 (each +1 rounds back
        // to even); summed in chunks, only the first chunk's ones are lost.
        let depth = 3 * CHUNK;
        let mut a = vec![1f32; depth];
        a[0] = 16_777_216.0;
        let packed = PackedWeights::pack(&vec![1f32; depth], depth, 1);
        let plain = |_: usize, starts: &mut [*const f32]| starts[0] = a.as_ptr();
        let lhs = Rows {
            taps: 1,
            segment: depth,
            own_per_row: depth,
            locate: &plain,
        };
        for kernel in Kernel::all().into_iter().filter(|k| k.runs_here()) {
            let mut output = [MaybeUninit::new(0f32)];
            multiply_with(
                kernel,
                1,
                &lhs,
                &packed,
                &mut output,
                Epilogue::default(),
                1,
            );
            // SAFETY: written by `multiply_with`.
            let sum = unsafe { output[0].assume_init() };
            assert_eq!(sum, 16_777_216.0 + 2.0 * CHUNK as f32, "{kernel:?}");
        }
    }

    #[test]
    fn row_blocks_cover_the_rows_in_whole_tiles_evenly_a_multiple_of_the_threads() {
        for (rows, count, tile_rows, threads) in [
            (3136, 9, 14, 2),
            (196, 4, 14, 2),
            (49, 2, 14, 2),
            (49, 1, 14, 4),
            (100, 3, 6, 4),
            (5, 3, 6, 2),
            (12544, 33, 14, 3),
        ] {
            let blocks = RowBlocks::new(rows, count, tile_rows, threads);
            let case =
                format!("{rows} rows, {count} blocks of {tile_rows}-row tiles, {threads} threads");
            assert!(blocks.count >= count.min(blocks.tiles), "{case}");
            assert!(
                blocks.count == 1
                    || blocks.count.is_multiple_of(threads)
                    || blocks.count == blocks.tiles,
                "{case}"
            );
            let mut next = 0;
            let mut heights = Vec::new();
            for index in 0..blocks.count {
                let (first, height) = blocks.block(index);
                assert_eq!(first, next, "{case}");
                assert!(height > 0 && first % tile_rows == 0, "{case}");
                next = first + height;
                heights.push(height.div_ceil(tile_rows));
            }
            assert_eq!(next, rows, "{case}");
            // Whole tiles, within one tile of each other, the taller first.
            assert!(
                heights.windows(2).all(|pair| pair[0] >= pair[1]),
                "{case}: {heights:?}"
            );
            assert!(
                heights[0] - heights[heights.len() - 1] <= 1,
                "{case}: {heights:?}"
            );
        }
    }

    fn agrees_with_the_definition_on_edges_blocks_and_epilogues(kernel: Kernel) {
        // Rows and columns off the tile sizes, depth over one K block,
        // rows over one row block, one and several threads.
        for &(rows, depth, columns) in &[
            (1, 1, 1),
            (7, 3, 17),
            (97, 300, 33),
            (13, 9, 20),
            (200, 600, 64),
            (49, 64, 2048),
        ] {
            let a = values(rows * depth, 1);
            let b = values(depth * columns, 2);
            let bias = values(columns, 3);
            let residual = values(rows * columns, 4);
            let packed = PackedWeights::pack(&b, depth, columns);
            for epilogue in [
                Epilogue::default(),
                Epilogue {
                    bias: Some(&bias),
                    residual: Some(&residual),
                    relu: true,
                },
                Epilogue {
                    bias: Some(&bias),
                    residual: None,
                    relu: false,
                },
            ] {
                let expected = naive(rows, depth, columns, &a, &b, epilogue);
                for threads in [1, 3] {
                    let mut output = vec![MaybeUninit::new(f32::NAN); rows * columns];
                    let locate = |row: usize, starts: &mut [*const f32]| {
                        // Three runs per row, as a conv's taps would be.
                        for (tap, start) in starts.iter_mut().enumerate() {
                            *start = a[row * depth + tap * depth / 3..].as_ptr();
                        }
                    };
                    let (taps, segment) = if depth % 3 == 0 {
                        (3, depth / 3)
                    } else {
                        (1, depth)
                    };
                    let plain = |row: usize, starts: &mut [*const f32]| {
                        starts[0] = a[row * depth..].as_ptr();
                    };
                    let lhs = Rows {
                        taps,
                        segment,
                        own_per_row: depth,
                        locate: if taps == 3 { &locate } else { &plain },
                    };
                    multiply_with(kernel, rows, &lhs, &packed, &mut output, epilogue, threads);
                    for (index, (got, &want)) in output.iter().zip(&expected).enumerate() {
                        // SAFETY: `multiply` wrote every element.
                        let got = unsafe { got.assume_init() };
                        assert!(
                            close(got, want, (depth as f32).sqrt()),
                            "{kernel:?} {rows}x{depth}x{columns}, {threads} threads, element {index}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

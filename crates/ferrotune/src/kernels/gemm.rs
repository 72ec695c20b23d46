//! [`sgemm`]: the strided single-precision GEMM call the fused linear layer and the fused
//! attention share, split over candle's thread pool.

use ::gemm::Parallelism;

/// A strided f32 matrix: element `(i, j)` at `p + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub p: *const f32,
    pub rs: usize,
    pub cs: usize,
}

// Safety: a view for reading; `sgemm`'s caller guarantees the data outlives the call.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

impl Mat {
    /// A row-major matrix with row stride `rs`.
    pub fn rows(p: *const f32, rs: usize) -> Self {
        Mat { p, rs, cs: 1 }
    }

    /// The transpose of a row-major matrix with row stride `rs` (a view, nothing copied).
    pub fn rows_t(p: *const f32, rs: usize) -> Self {
        Mat { p, rs: 1, cs: rs }
    }
}

/// `dst (m×n, row stride dst_rs) = [dst +] scale · a (m×k) · b (k×n)` through the `gemm`
/// crate (the GEMM candle's own matmul runs), reading any strides in place.
///
/// With `parallel`, the rows (or, when `n > m`, the columns) are split in one block per
/// thread, each block a single-threaded GEMM on candle's thread pool, rather than the
/// `gemm` crate splitting the work on rayon's pool: with both pools on the same cores,
/// candle's workers spin while rayon's compute, and a MiniLM training step measured ~7%
/// faster this way. (The linear tests cover both splits: shapes with `n > m` and not.)
///
/// # Safety
/// Every pointer must be valid for the elements the strides reach; `dst` must not overlap
/// `a` or `b`, nor another GEMM running at the same time.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    scale: f32,
    parallel: bool,
) {
    let threads = threads();
    // Column blocks when the output is wider than tall: each thread then packs all of `a`
    // and only its own columns of `b`, the larger operand (bert-base inference, 1024 tokens
    // x 3072 outputs: 5% faster than row blocks, which pack all of `b` in every thread).
    let by_cols = n > m && n >= 2 * ROWS_MIN;
    let by_rows = !by_cols && m >= 2 * ROWS_MIN;
    let g = Block {
        k,
        dst: SendPtr(dst),
        dst_rs,
        accumulate,
        a,
        b,
        scale,
    };
    if parallel && threads > 1 && (by_cols || by_rows) {
        // One block per thread, each a single-threaded GEMM, on candle's pool.
        let len = if by_cols { n } else { m };
        let size = len.div_ceil(threads);
        candle_core::utils::barrier_pool().execute_chunked(threads, |r| {
            for blk in r {
                let s0 = blk * size;
                if s0 >= len {
                    continue;
                }
                let sn = size.min(len - s0);
                if by_cols {
                    g.run(0, m, s0, sn, Parallelism::None)
                } else {
                    g.run(s0, sn, 0, n, Parallelism::None)
                }
            }
        });
        return;
    }
    let par = if parallel && threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    g.run(0, m, 0, n, par)
}

/// The thread count, read once: candle's `get_num_threads` reads the environment (and,
/// without `RAYON_NUM_THREADS`, `/proc/cpuinfo`) on every call. Candle's pool has this size
/// from its first use on, so reading it once loses nothing.
fn threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(candle_core::utils::get_num_threads)
}

/// The arguments of one [`sgemm`] call, for running it on a block of the output.
struct Block {
    k: usize,
    dst: SendPtr,
    dst_rs: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    scale: f32,
}

impl Block {
    /// Output rows `r0..r0 + mr`, columns `c0..c0 + nc`.
    ///
    /// # Safety
    /// As [`sgemm`]; blocks running at the same time must not overlap.
    unsafe fn run(&self, r0: usize, mr: usize, c0: usize, nc: usize, par: Parallelism) {
        let (a, b) = (self.a, self.b);
        ::gemm::gemm(
            mr,
            nc,
            self.k,
            self.dst.get().add(r0 * self.dst_rs + c0),
            1,
            self.dst_rs as isize,
            self.accumulate,
            a.p.add(r0 * a.rs),
            a.cs as isize,
            a.rs as isize,
            b.p.add(c0 * b.cs),
            b.cs as isize,
            b.rs as isize,
            1.0,
            self.scale,
            false,
            false,
            false,
            par,
        )
    }
}

/// Fewest rows of a GEMM block worth a thread.
const ROWS_MIN: usize = 64;

/// A pointer the GEMM's row blocks share (each writes its own rows).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// Safety: see `sgemm`: blocks read shared inputs and write disjoint rows.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

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
/// With `parallel`, the rows (or, when `n > m`, the columns) are split in a few blocks
/// ([`blocks`]), each block a single-threaded GEMM on candle's thread pool, rather than the
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
        // Single-threaded GEMMs on candle's pool, each thread taking the next block.
        let bounds = blocks(if by_cols { n } else { m }, threads);
        candle_core::utils::barrier_pool().execute_chunked(bounds.len() - 1, |r| {
            for blk in r {
                let (s0, s1) = (bounds[blk], bounds[blk + 1]);
                if s1 <= s0 {
                    continue;
                }
                if by_cols {
                    g.run(0, m, s0, s1 - s0, Parallelism::None)
                } else {
                    g.run(s0, s1 - s0, 0, n, Parallelism::None)
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

/// The boundaries of the blocks that split `len` rows (or columns) over `threads`: first
/// one block of ~90%/`threads` per thread, then `threads` tail blocks of ~10%/`threads`
/// (a multiple of [`TAIL_ALIGN`]; none when `len` is too small for that), taken by
/// whichever thread is free first. With only the equal blocks, the thread that finished
/// first waited for the other: on 2 Zen 3 vCPUs the pool's worker ran its half of a GEMM
/// ~5-8% slower than the calling thread, cause not found (not the CPU it runs on). The
/// tails measured 2-8% more GFLOP/s on the shapes of a SmolLM2 LoRA step (1024 × 1536 ×
/// 576, 1024 × 3072 × 576, 1024 × 576 × 576, the 512 × 49152 × 576 LM head) than halves,
/// and more than tails of 3% or 10% of the work. The blocks are fixed by the shape, not by
/// which thread takes them, so results repeat bit for bit; against a GEMM in one piece they
/// may differ in the last bits (the `gemm` crate picks its kernels by block shape: the
/// losses of a SmolLM2 run moved by ~1e-7 relative).
fn blocks(len: usize, threads: usize) -> Vec<usize> {
    let tail = len / (10 * threads) / TAIL_ALIGN * TAIL_ALIGN;
    let (tails, head) = if tail == 0 {
        (0, len)
    } else {
        (threads, len - threads * tail)
    };
    let size = head.div_ceil(threads);
    let mut b: Vec<usize> = (0..threads).map(|i| (i * size).min(head)).collect();
    b.extend((0..=tails).map(|i| head + i * tail));
    b
}

/// Tail blocks are a multiple of this many rows or columns (the micro-kernel's 16 rows).
const TAIL_ALIGN: usize = 16;

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocks cover `0..len` in order; the tails, when there are any, are aligned and
    /// together about a tenth of the work.
    #[test]
    fn blocks_cover_the_range() {
        for threads in [2, 3, 8] {
            for len in [1, 15, 128, 320, 333, 1024, 1536, 49_152] {
                let b = blocks(len, threads);
                assert_eq!((b[0], *b.last().unwrap()), (0, len), "{len} over {threads}");
                assert!(b.windows(2).all(|w| w[0] <= w[1]), "{b:?}");
                if b.len() > threads + 1 {
                    assert_eq!(b.len(), 2 * threads + 1);
                    let tails = &b[threads..];
                    assert!(tails.windows(2).all(|w| (w[1] - w[0]) % TAIL_ALIGN == 0));
                    let share = (len - b[threads]) as f64 / len as f64;
                    assert!(
                        (0.05..=0.1).contains(&share),
                        "{len} over {threads}: {share}"
                    );
                }
            }
        }
        assert_eq!(blocks(128, 2), vec![0, 64, 128]);
        assert_eq!(blocks(1024, 2), vec![0, 464, 928, 976, 1024]);
    }

    /// Split over the pool, by rows and by columns, the product repeats bit for bit and
    /// equals the same GEMM run in one piece to rounding.
    #[test]
    fn the_split_repeats_and_matches_one_piece() {
        for (m, n, k) in [(700, 90, 37), (90, 1100, 53), (1024, 576, 64)] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 1000) as f32 / 300.0 - 1.6)
                .collect();
            let b: Vec<f32> = (0..k * n)
                .map(|i| ((i * 104_729) % 997) as f32 / 250.0 - 2.0)
                .collect();
            let run = |parallel| {
                let mut c = vec![0.5f32; m * n];
                // Safety: a is m×k, b is k×n, c is m×n, all row-major and distinct.
                unsafe {
                    sgemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        n,
                        true,
                        Mat::rows(a.as_ptr(), k),
                        Mat::rows(b.as_ptr(), n),
                        0.75,
                        parallel,
                    )
                };
                c
            };
            let (split, whole) = (run(true), run(false));
            assert_eq!(split, run(true), "{m}×{n}×{k}");
            for (x, y) in split.iter().zip(&whole) {
                assert!(
                    (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                    "{m}×{n}×{k}: {x} vs {y}"
                );
            }
        }
    }
}

//! The parallel loop and the raw-buffer helpers every fused kernel shares: work split
//! over candle's thread pool, outputs written in disjoint parts through a shared pointer,
//! and the contiguous f32 data of a CPU tensor.

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor};

/// Rows (or elements) below this are not worth a thread.
pub(crate) const PAR_MIN: usize = 1 << 14;

/// Runs `f(i)` for every `i` in `0..n`, on candle's own thread pool when `parallel` (the
/// pool its element-wise kernels use, sized by `--threads`). Not rayon's: candle's pinned
/// workers spin between operations, and a second pool beside them made inference slower.
pub(crate) fn par_for(n: usize, parallel: bool, f: impl Fn(usize) + Sync) {
    if parallel && n > 1 {
        candle_core::utils::barrier_pool().execute_chunked(n, |r| r.for_each(&f));
    } else {
        (0..n).for_each(f);
    }
}

/// A pointer into an output buffer that tasks of [`par_for`] write in disjoint parts.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32, pub(crate) usize);
// Safety: every task writes a part no other task touches (see `Out::part`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    pub(crate) fn new(v: &mut [f32]) -> Self {
        Out(v.as_mut_ptr(), v.len())
    }

    /// The start of the buffer (a method, so closures capture the whole `Out`, which is
    /// `Sync`, not the bare pointer).
    pub(crate) fn ptr(&self) -> *mut f32 {
        self.0
    }

    /// Elements `start..start + len` (clipped to the buffer).
    ///
    /// # Safety
    /// Each part must be taken by one task only, and the buffer must outlive the tasks.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn part(&self, start: usize, len: usize) -> &mut [f32] {
        let end = (start + len).min(self.1);
        let start = start.min(end);
        std::slice::from_raw_parts_mut(self.0.add(start), end - start)
    }
}

/// A new vector of `src.len()` elements, part `i` (of `chunk` elements) written by
/// `f(i, input part i, output part i)`, in parallel when the input is large. The output is
/// not zeroed first (a single-threaded memset on the calling thread, ~3% of a MiniLM
/// step over all the ops that did it), so `f` must write every element of its part.
pub(crate) fn map_parts(
    src: &[f32],
    chunk: usize,
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let n = src.len();
    let parts = n.div_ceil(chunk);
    // Safety: the parts cover `0..n` and `f` writes each whole part (above).
    unsafe {
        filled(n, |p| {
            let o = Out(p, n);
            par_for(parts, n >= PAR_MIN, |i| {
                let a = i * chunk;
                let b = (a + chunk).min(n);
                // Part i is written by this task only.
                f(i, &src[a..b], o.part(a, b - a))
            });
        })
    }
}

/// The contiguous f32 data of a CPU storage under `layout`.
pub(crate) fn f32_data<'a>(s: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op on a non-contiguous tensor"),
    }
}

/// Runs `f` on the contiguous f32 data of CPU tensor `t` (copied to contiguous first if
/// it is not).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(cs) => Ok(f(f32_data(cs, l)?)),
        _ => candle_core::bail!("fused op on a non-CPU tensor"),
    }
}

/// Runs `f` on `n` elements of this thread's scratch buffer `key`, which keeps its memory
/// from one call to the next (grown when too small, never shrunk): for buffers too large,
/// or needed too often, to allocate per call. The elements hold whatever the last user
/// left there (zeros when new).
pub(crate) fn with_scratch<T: Copy + Default, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<Vec<T>>>,
    n: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < n {
            s.resize(n, T::default());
        }
        f(&mut s[..n])
    })
}

pub(crate) fn fusable(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// A vector of `n` elements that `fill` writes completely through the pointer it gets
/// (no zeroing pass over memory that is about to be overwritten).
///
/// # Safety
/// `fill` must write all `n` elements.
pub(crate) unsafe fn filled(n: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v = Vec::<f32>::with_capacity(n);
    fill(v.as_mut_ptr());
    v.set_len(n);
    v
}

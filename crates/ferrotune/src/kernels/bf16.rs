//! bf16 linear layers: `y = x Wᵀ + b` with `x` and `W` rounded to bf16 (round to nearest
//! even) and the products summed in f32 — for inference on weights packed once
//! ([`linear_bf16`]), and for mixed-precision training, where [`bgemm`] runs the linear
//! layer's three GEMMs on operands rounded as they are packed.
//!
//! Three kernels compute the sums, picked at run time ([`Kernel::best`]):
//!
//! - **AMX** (`amx_bf16`, Sapphire Rapids and later): `tdpbf16ps` multiplies a 16×32 bf16
//!   tile by a 32×16 one into 16×16 f32 sums; four tiles of sums make a 32×32 block of the
//!   output. Linux must grant the process the tile state first (`arch_prctl`), asked once.
//! - **AVX-512 BF16** (`avx512_bf16`: Zen 4, Cooper Lake and later): `vdpbf16ps` adds the
//!   products of a pair of bf16 values to each 32-bit lane, `acc += a₁·b₁; acc += a₀·b₀`,
//!   each an f32 fused multiply-add with denormal inputs read as zero, denormal results
//!   flushed to zero, round to nearest even (Intel SDM, VDPBF16PS). The product of two
//!   bf16 values is exact in f32, so each step is one f32 addition, rounded once.
//! - **Emulated**: exactly `vdpbf16ps`'s steps in plain Rust, in the same order and
//!   blocking, so it is the reference the AVX-512 kernel is tested against bit for bit. It
//!   runs everywhere, but slowly: bf16 is only offered where the CPU has the instruction
//!   ([`crate::precision`]).
//!
//! AMX does not add in `vdpbf16ps`'s order: measured on a Sapphire Rapids, its sums of 32
//! products are within 1.3 f32 ulps of `Σ|aᵢbᵢ|` of the exact sum (more accurate than one
//! rounding per product), and equal the sequential sums in ~90% of outputs. Its tests hold
//! it to the emulation within `(k + 2) · 2⁻²⁴ · Σ|aᵢbᵢ|`, the sequential sum's own bound.
//!
//! Every kernel reads the same packed operands: `A` (the rows) as bf16 row-major with `k`
//! padded to [`KB`]; `B` (the columns) in blocks of [`NR`] columns, in each, for every pair
//! of `k`, the [`NR`] columns' two values together (the layout both `vdpbf16ps` and
//! `tdpbf16ps` read). The output is computed in 32×32 blocks, column blocks of about
//! 256 KiB of `B` outside row groups of about 256 KiB of `A`, so both stay in L2.

use super::amx;
use super::gemm::Mat;
use super::par::{filled, par_for, with_scratch};

/// Output columns per packed block (one 512-bit register, or one AMX tile, of f32 sums).
const NR: usize = 16;
/// Rows per AVX-512 / emulated micro-kernel call.
const MR: usize = 8;
/// `k` per AMX tile row (64 bytes of bf16); packed operands pad `k` to a multiple of it.
const KB: usize = 32;
/// Rows and columns of one output block (2 × 2 AMX tiles of sums).
const TB: usize = amx::TB;
/// About how many bytes of each packed operand one task keeps in cache.
const CACHE_BYTES: usize = 256 << 10;

/// `k` padded for the packed operands.
fn padded_k(k: usize) -> usize {
    k.div_ceil(KB) * KB
}

/// `x` rounded to bf16, to nearest even (NaN stays NaN), a denormal to zero — exactly what
/// `vcvtneps2bf16` does, which converts where the CPU has it.
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    if x != 0.0 && x.abs() < f32::MIN_POSITIVE {
        return ((b >> 16) & 0x8000) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 `h`.
#[inline]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `src` rounded to bf16 into `dst` (same length), 16 at a time where the CPU converts.
fn convert(src: &[f32], dst: &mut [u16]) {
    debug_assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if avx512_bf16() {
        // Safety: the CPU has AVX-512 BF16; the lengths are equal.
        unsafe { convert_avx512(src, dst) };
        return;
    }
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = to_bf16(v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn convert_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_loadu_ps(src.as_ptr().add(i));
        let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
        _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, h);
        i += 16;
    }
    for j in i..n {
        dst[j] = to_bf16(src[j]);
    }
}

/// A weight matrix `(out, in)` in bf16, packed for the kernels.
#[derive(Debug, Clone)]
pub struct BWeight {
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
    /// `inp` padded to [`KB`].
    kp: usize,
    /// The right operand of `x · Wᵀ`, packed (see the module documentation).
    packed: Vec<u16>,
}

impl BWeight {
    /// Rounds a row-major `(out, inp)` f32 matrix to bf16 and packs it.
    pub fn pack(w: &[f32], out: usize, inp: usize) -> BWeight {
        assert_eq!(w.len(), out * inp, "weight size");
        let b = Mat::rows_t(w.as_ptr(), inp);
        // Safety: `b` reads the (k = inp) × (n = out) transpose of `w`, all in bounds.
        let (packed, kp) = unsafe { pack_b(inp, out, b, out * inp >= 1 << 16) };
        BWeight {
            out,
            inp,
            kp,
            packed,
        }
    }
}

/// A pointer tasks write through in disjoint parts.
#[derive(Clone, Copy)]
struct Ptr<T>(*mut T);
// Safety: every user writes parts no other task touches (see each use).
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}
impl<T> Ptr<T> {
    /// The pointer (a method, so closures capture the whole `Ptr`, which is `Sync`).
    fn get(self) -> *mut T {
        self.0
    }
}

/// The right operand `B (k × n)` of a GEMM rounded to bf16 and packed for the kernels
/// (module documentation), zero-padded; returns it and `k` padded. Column blocks in
/// parallel when `parallel`.
///
/// # Safety
/// `b` must be valid for every `(k, n)` element.
unsafe fn pack_b(k: usize, n: usize, b: Mat, parallel: bool) -> (Vec<u16>, usize) {
    let kp = padded_k(k);
    let blocks = n.div_ceil(NR);
    let mut packed = vec![0u16; blocks * NR * kp];
    let out = Ptr(packed.as_mut_ptr());
    let b = &b;
    par_for(blocks, parallel, |blk| {
        let (j0, nc) = (blk * NR, NR.min(n - blk * NR));
        // Safety: block `blk` alone writes its NR·kp values; `b` is valid (the caller).
        let dst = unsafe { std::slice::from_raw_parts_mut(out.get().add(blk * NR * kp), NR * kp) };
        let mut row = [0f32; 2 * NR];
        let mut half = vec![0u16; kp];
        if b.rs == 1 {
            // Column-major (`Wᵀ` of a row-major `W`): each column's `k` values are
            // contiguous; its pairs go to every NR-th 32-bit slot.
            for c in 0..nc {
                // Safety: column j0 + c has k contiguous values (the caller).
                let col = unsafe { std::slice::from_raw_parts(b.p.add((j0 + c) * b.cs), k) };
                convert(col, &mut half[..k]);
                half[k..kp].fill(0);
                for k2 in 0..kp / 2 {
                    dst[k2 * NR * 2 + c * 2] = half[2 * k2];
                    dst[k2 * NR * 2 + c * 2 + 1] = half[2 * k2 + 1];
                }
            }
        } else if b.cs == 1 {
            // Row-major: rows `kk` and `kk + 1` of the block, interleaved.
            for k2 in 0..k.div_ceil(2) {
                // Safety: rows 2·k2 (and 2·k2 + 1 when < k) have the block's nc columns.
                let r0 = unsafe { std::slice::from_raw_parts(b.p.add(2 * k2 * b.rs + j0), nc) };
                let r1 = (2 * k2 + 1 < k).then(|| unsafe {
                    std::slice::from_raw_parts(b.p.add((2 * k2 + 1) * b.rs + j0), nc)
                });
                interleave_pair(r0, r1, &mut dst[k2 * NR * 2..(k2 + 1) * NR * 2]);
            }
        } else {
            // Any strides: gathered into rows first.
            let (g0, g1) = row.split_at_mut(NR);
            for k2 in 0..k.div_ceil(2) {
                for (i, g) in [&mut *g0, &mut g1[..NR]].into_iter().enumerate() {
                    for (c, v) in g[..nc].iter_mut().enumerate() {
                        let kk = (2 * k2 + i).min(k - 1);
                        *v = unsafe { *b.p.add(kk * b.rs + (j0 + c) * b.cs) };
                    }
                }
                let r1 = (2 * k2 + 1 < k).then_some(&g1[..nc]);
                interleave_pair(&g0[..nc], r1, &mut dst[k2 * NR * 2..(k2 + 1) * NR * 2]);
            }
        }
    });
    (packed, kp)
}

/// Rows `kk` and `kk + 1` (`r1`; `None` past the end of `k`: zeros) of up to [`NR`]
/// columns, rounded to bf16 and interleaved into one packed row of a column block:
/// `d[2c] = r0[c]`, `d[2c + 1] = r1[c]`, zeros past `r0.len()`.
fn interleave_pair(r0: &[f32], r1: Option<&[f32]>, d: &mut [u16]) {
    assert!(r0.len() <= NR && r1.is_none_or(|r| r.len() == r0.len()) && d.len() == 2 * NR);
    #[cfg(target_arch = "x86_64")]
    if avx512_bf16() {
        // Safety: the CPU has AVX-512 BF16; lengths checked above.
        unsafe { interleave_pair_avx512(r0, r1, d) };
        return;
    }
    d.fill(0);
    for (c, &v) in r0.iter().enumerate() {
        d[2 * c] = to_bf16(v);
        d[2 * c + 1] = r1.map_or(0, |r| to_bf16(r[c]));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn interleave_pair_avx512(r0: &[f32], r1: Option<&[f32]>, d: &mut [u16]) {
    use std::arch::x86_64::*;
    let mask: __mmask16 = ((1u32 << r0.len()) - 1) as u16;
    let widen = |v: __m512| -> __m512i {
        _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
            _mm512_cvtneps_pbh(v),
        ))
    };
    let lo = widen(_mm512_maskz_loadu_ps(mask, r0.as_ptr()));
    let hi = match r1 {
        Some(r1) => _mm512_slli_epi32::<16>(widen(_mm512_maskz_loadu_ps(mask, r1.as_ptr()))),
        None => _mm512_setzero_si512(),
    };
    _mm512_storeu_si512(d.as_mut_ptr() as *mut __m512i, _mm512_or_si512(lo, hi));
}

/// Rows `0..rows` of `A` into `buf` (row stride `kp`) in bf16, where element `(r, kk)` is
/// at `p + r + kk·cs` (the transposed gradient of the weight GEMM): `rows` consecutive
/// values per `kk`.
///
/// # Safety
/// `p` must be valid for every such element.
unsafe fn fill_transposed(
    p: *const f32,
    cs: usize,
    rows: usize,
    k: usize,
    kp: usize,
    buf: &mut [u16],
) {
    assert!(rows <= TB && buf.len() >= rows * kp && k <= kp);
    #[cfg(target_arch = "x86_64")]
    if avx512_bf16() {
        fill_transposed_avx512(p, cs, rows, k, kp, buf);
        return;
    }
    let mut col = [0f32; TB];
    let mut half = [0u16; TB];
    for kk in 0..k {
        col[..rows].copy_from_slice(std::slice::from_raw_parts(p.add(kk * cs), rows));
        convert(&col[..rows], &mut half[..rows]);
        for (r, &h) in half[..rows].iter().enumerate() {
            buf[r * kp + kk] = h;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
unsafe fn fill_transposed_avx512(
    p: *const f32,
    cs: usize,
    rows: usize,
    k: usize,
    kp: usize,
    buf: &mut [u16],
) {
    use std::arch::x86_64::*;
    let widen = |v: __m512| -> __m512i {
        _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
            _mm512_cvtneps_pbh(v),
        ))
    };
    let out = buf.as_mut_ptr() as *mut i32;
    for r0 in (0..rows).step_by(16) {
        let nr = 16.min(rows - r0);
        let mask: __mmask16 = ((1u32 << nr) - 1) as u16;
        // Row r's pairs start at 32-bit slot r·kp/2.
        let idx = _mm512_mullo_epi32(
            _mm512_add_epi32(
                _mm512_set1_epi32(r0 as i32),
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            ),
            _mm512_set1_epi32((kp / 2) as i32),
        );
        for k2 in 0..k.div_ceil(2) {
            let lo = widen(_mm512_maskz_loadu_ps(mask, p.add(2 * k2 * cs + r0)));
            let hi = if 2 * k2 + 1 < k {
                _mm512_slli_epi32::<16>(widen(_mm512_maskz_loadu_ps(
                    mask,
                    p.add((2 * k2 + 1) * cs + r0),
                )))
            } else {
                _mm512_setzero_si512()
            };
            _mm512_mask_i32scatter_epi32::<4>(out.add(k2), mask, idx, _mm512_or_si512(lo, hi));
        }
    }
}

/// Which kernel computes the sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust, the same operations as `vdpbf16ps` (the reference; slow).
    Emulated,
    /// AVX-512 BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// AMX (`tdpbf16ps`).
    Amx,
}

impl Kernel {
    /// The fastest kernel this CPU runs (checked at run time), or the one
    /// `FERROTUNE_BF16_KERNEL=amx|avx512_bf16|emulated` names (for measurements; one the CPU
    /// lacks falls back to the emulation).
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let forced = std::env::var("FERROTUNE_BF16_KERNEL").ok();
            match forced.as_deref() {
                Some("amx") => Kernel::Amx,
                Some("avx512_bf16") => Kernel::Avx512Bf16,
                Some("emulated") => Kernel::Emulated,
                _ => [Kernel::Amx, Kernel::Avx512Bf16]
                    .into_iter()
                    .find(|k| k.available())
                    .unwrap_or(Kernel::Emulated),
            }
        })
    }

    /// True when this CPU runs it.
    pub fn available(self) -> bool {
        match self {
            Kernel::Emulated => true,
            Kernel::Avx512Bf16 => avx512_bf16(),
            Kernel::Amx => avx512_bf16() && amx::available(amx::Op::Bf16),
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Emulated => "emulated",
            Kernel::Avx512Bf16 => "avx512_bf16",
            Kernel::Amx => "amx_bf16",
        }
    }
}

/// True when the CPU has AVX-512 BF16 (checked at run time).
fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512bf16") && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What is done with a block's sums `s`: `out = [out +] scale · s [+ bias]`.
struct Epilogue<'a> {
    scale: f32,
    accumulate: bool,
    bias: Option<&'a [f32]>,
}

impl Epilogue<'_> {
    /// Writes sums `s` of columns `j0..j0 + s.len()` into `row`.
    #[inline]
    fn apply(&self, s: &[f32], row: &mut [f32], j0: usize) {
        let scale = self.scale;
        match (self.accumulate, self.bias) {
            (false, None) => row.iter_mut().zip(s).for_each(|(o, &v)| *o = scale * v),
            (true, None) => row.iter_mut().zip(s).for_each(|(o, &v)| *o += scale * v),
            (false, Some(b)) => row
                .iter_mut()
                .zip(s)
                .zip(&b[j0..])
                .for_each(|((o, &v), &b)| *o = scale * v + b),
            (true, Some(b)) => row
                .iter_mut()
                .zip(s)
                .zip(&b[j0..])
                .for_each(|((o, &v), &b)| *o += scale * v + b),
        }
    }
}

impl Epilogue<'_> {
    /// [`Epilogue::apply`] on `rows` rows and `nc` columns of a block's sums, the same
    /// float operations in the same order, 16 lanes at a time (the 4-lane loop was 5% of a
    /// bf16 inference pass); row `r` goes to `y + r·ys`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `y` is valid for the `rows × nc` block at row stride `ys`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn apply_avx512(
        &self,
        acc: &[[f32; TB]; TB],
        rows: usize,
        nc: usize,
        y: *mut f32,
        ys: usize,
        j0: usize,
    ) {
        use std::arch::x86_64::*;
        let scale = _mm512_set1_ps(self.scale);
        for c in (0..nc).step_by(16) {
            let mask: __mmask16 = if nc - c >= 16 {
                0xffff
            } else {
                (1u16 << (nc - c)) - 1
            };
            let bias = self
                .bias
                .map(|b| _mm512_maskz_loadu_ps(mask, b.as_ptr().add(j0 + c)));
            for (r, s) in acc.iter().enumerate().take(rows) {
                let p = y.add(r * ys + c);
                let mut v = _mm512_mul_ps(scale, _mm512_loadu_ps(s.as_ptr().add(c)));
                if let Some(b) = bias {
                    v = _mm512_add_ps(v, b);
                }
                if self.accumulate {
                    v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, p), v);
                }
                _mm512_mask_storeu_ps(p, mask, v);
            }
        }
    }
}

thread_local! {
    /// The packed left operand of the last GEMM on this thread (kept: a fresh allocation
    /// per call would page-fault its way through megabytes every layer).
    static A_BUF: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The GEMM over packed `B` (`n` columns, `kp` rows): `fill(i0, rows, buf)` writes rows
/// `i0..i0 + rows` of `A` (`k` values each, in bf16) into `buf` at row stride `kp`; the
/// result goes to `dst` (row stride `dst_rs`) through `ep`, in parallel on candle's pool
/// when `parallel`.
///
/// # Safety
/// `dst` must be valid for `m` rows of `n` at stride `dst_rs`, and not read or written by
/// anyone else during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_packed(
    m: usize,
    n: usize,
    k: usize,
    fill: &(dyn Fn(usize, usize, &mut [u16]) + Sync),
    bp: &[u16],
    dst: *mut f32,
    dst_rs: usize,
    ep: &Epilogue,
    parallel: bool,
    kernel: Kernel,
) {
    if m == 0 || n == 0 {
        return;
    }
    let kernel = if kernel.available() {
        kernel
    } else {
        Kernel::Emulated
    };
    let kp = padded_k(k);
    debug_assert_eq!(bp.len(), n.div_ceil(NR) * NR * kp);
    let mp = m.div_ceil(TB) * TB;
    let big = m * n * kp >= super::par::PAR_MIN * 16;
    let parallel = parallel && big;
    with_scratch(&A_BUF, mp * kp, |abuf| {
        // A in bf16, TB rows per task, zero-padded to kp columns and mp rows.
        let ap = Ptr(abuf.as_mut_ptr());
        par_for(mp / TB, parallel, |p| {
            let rows = TB.min(m.saturating_sub(p * TB));
            // Safety: task p alone writes rows p·TB.. of the buffer (mp·kp long).
            let buf = unsafe { std::slice::from_raw_parts_mut(ap.get().add(p * TB * kp), TB * kp) };
            if rows > 0 {
                fill(p * TB, rows, &mut buf[..rows * kp]);
            }
            for r in 0..rows {
                buf[r * kp + k..(r + 1) * kp].fill(0);
            }
            buf[rows * kp..].fill(0);
            if kernel == Kernel::Amx {
                tile_panel(buf, kp);
            }
        });
        let abuf_ref = &abuf[..mp * kp];
        // Tasks: column chunks (outer) × row groups, each about CACHE_BYTES of its operand.
        // Equal chunks: the pool gives each thread a run of consecutive tasks, so a short last
        // chunk (384 columns as 320 + 64) left one thread idle most of the GEMM.
        let span = (CACHE_BYTES / (2 * kp.max(1)) / TB).max(1) * TB;
        let even = |len: usize| len.div_ceil(len.div_ceil(span)).div_ceil(TB) * TB;
        let (cw, rh) = (even(n), even(mp));
        let (ncc, nrg) = (n.div_ceil(cw), mp.div_ceil(rh));
        let dst = Ptr(dst);
        par_for(ncc * nrg, parallel, |t| {
            let (cc, rg) = (t / nrg, t % nrg);
            #[cfg(target_arch = "x86_64")]
            if kernel == Kernel::Amx {
                // Safety: the CPU has AMX and Linux granted the tile state (`available`).
                unsafe { amx::configure() };
            }
            let mut acc = [[0f32; TB]; TB];
            for r0 in (rg * rh..mp.min((rg + 1) * rh)).step_by(TB) {
                if r0 >= m {
                    break;
                }
                let a = &abuf_ref[r0 * kp..(r0 + TB) * kp];
                for j0 in (cc * cw..n.min((cc + 1) * cw)).step_by(TB) {
                    let nc = TB.min(n - j0);
                    let b0 = &bp[(j0 / NR) * NR * kp..];
                    let two = nc > NR;
                    match kernel {
                        #[cfg(target_arch = "x86_64")]
                        // Safety: AMX is configured on this thread; `a` holds TB rows and `b0`
                        // one (or two) blocks of kp.
                        Kernel::Amx => unsafe {
                            amx::block(
                                amx::Op::Bf16,
                                a.as_ptr() as *const u8,
                                2 * kp,
                                b0.as_ptr() as *const u8,
                                two,
                                &mut acc,
                            )
                        },
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx512Bf16 => vector_block(a, kp, b0, two, &mut acc, |a, b, s| {
                            // Safety: the CPU has AVX-512 BF16 (`available`).
                            unsafe { avx512_block(a, kp, b, s) }
                        }),
                        _ => vector_block(a, kp, b0, two, &mut acc, |a, b, s| {
                            emulated_block(a, kp, b, s)
                        }),
                    }
                    let rows = TB.min(m - r0);
                    #[cfg(target_arch = "x86_64")]
                    if kernel != Kernel::Emulated {
                        // Safety: the hardware kernels' CPUs have AVX-512F; task t alone
                        // writes rows r0.. and columns j0..j0 + nc of `dst`.
                        unsafe {
                            ep.apply_avx512(
                                &acc,
                                rows,
                                nc,
                                dst.get().add(r0 * dst_rs + j0),
                                dst_rs,
                                j0,
                            )
                        };
                        continue;
                    }
                    for (r, s) in acc.iter().enumerate().take(rows) {
                        // Safety: task t alone writes rows r0.. and columns j0.. of `dst`.
                        let row = unsafe {
                            std::slice::from_raw_parts_mut(
                                dst.get().add((r0 + r) * dst_rs + j0),
                                nc,
                            )
                        };
                        ep.apply(&s[..nc], row, j0);
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            if kernel == Kernel::Amx {
                // Safety: as above; the state is not needed after this task.
                unsafe { amx::release() };
            }
        });
    })
}

thread_local! {
    /// A panel of `A` being reordered into tiles ([`tile_panel`]).
    static PANEL: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reorders a row-major panel of [`TB`] rows (stride `kp`) in place into AMX tile order
/// ([`amx::tile_order`]).
fn tile_panel(buf: &mut [u16], kp: usize) {
    with_scratch(&PANEL, TB * kp, |t| {
        t.copy_from_slice(&buf[..TB * kp]);
        amx::tile_order(t, buf, 2 * kp);
    })
}

/// A TB×TB block of sums from [`MR`]×[`NR`] micro-kernel calls `f(a rows, b block, sums)`.
fn vector_block(
    a: &[u16],
    kp: usize,
    b0: &[u16],
    two: bool,
    acc: &mut [[f32; TB]; TB],
    f: impl Fn(&[u16], &[u16], &mut [[f32; NR]; MR]),
) {
    for cb in 0..if two { 2 } else { 1 } {
        let b = &b0[cb * NR * kp..(cb + 1) * NR * kp];
        for r0 in (0..TB).step_by(MR) {
            let mut s = [[0f32; NR]; MR];
            f(&a[r0 * kp..(r0 + MR) * kp], b, &mut s);
            for (r, s) in s.iter().enumerate() {
                acc[r0 + r][cb * NR..(cb + 1) * NR].copy_from_slice(s);
            }
        }
    }
}

/// `y (m, out) = x (m, inp) · Wᵀ + b` in bf16 with f32 sums, in parallel on candle's pool
/// when `parallel`, with `kernel` (the emulation where the CPU lacks it).
pub fn linear_bf16(
    x: &[f32],
    m: usize,
    w: &BWeight,
    bias: Option<&[f32]>,
    parallel: bool,
    kernel: Kernel,
) -> Vec<f32> {
    assert_eq!(x.len(), m * w.inp, "input size");
    let (inp, kp) = (w.inp, w.kp);
    let fill = |i0: usize, rows: usize, buf: &mut [u16]| {
        for r in 0..rows {
            convert(
                &x[(i0 + r) * inp..(i0 + r + 1) * inp],
                &mut buf[r * kp..r * kp + inp],
            );
        }
    };
    let ep = Epilogue {
        scale: 1.0,
        accumulate: false,
        bias,
    };
    // Safety: y holds m rows of w.out, every one written by the GEMM (no accumulation),
    // so it need not be zeroed first (a memset was 4% of a MiniLM inference pass).
    unsafe {
        filled(m * w.out, |y| {
            gemm_packed(
                m, w.out, inp, &fill, &w.packed, y, w.out, &ep, parallel, kernel,
            )
        })
    }
}

/// [`super::gemm::sgemm`]'s contract in bf16: `dst (m×n) = [dst +] scale · a (m×k) ·
/// b (k×n)` with both operands rounded to bf16 (to nearest even) as they are packed and
/// the products summed in f32 ([`Kernel::best`]). The mixed-precision linear layer's three
/// GEMMs (forward, input and weight gradients) run through it.
///
/// # Safety
/// As `sgemm`: every pointer valid for the elements the strides reach; `dst` overlapping
/// neither operand nor another GEMM running at the same time.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn bgemm(
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
    bgemm_with(
        m,
        n,
        k,
        dst,
        dst_rs,
        accumulate,
        a,
        b,
        scale,
        parallel,
        Kernel::best(),
    )
}

/// [`bgemm`] with a given kernel.
///
/// # Safety
/// As [`bgemm`].
#[allow(clippy::too_many_arguments)]
unsafe fn bgemm_with(
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
    kernel: Kernel,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Safety: the caller's contract covers every (row, column) read here.
    let (bp, kp) = pack_b(k, n, b, parallel && k * n >= 1 << 16);
    // Captured whole (a `Sync` view), not its raw pointer field.
    let a = &a;
    let fill = |i0: usize, rows: usize, buf: &mut [u16]| {
        if a.cs == 1 {
            for r in 0..rows {
                // Safety: row i0 + r has k elements from its start (the contract).
                let src = unsafe { std::slice::from_raw_parts(a.p.add((i0 + r) * a.rs), k) };
                convert(src, &mut buf[r * kp..r * kp + k]);
            }
        } else if a.rs == 1 {
            // The transposed gradient of the weight GEMM: `rows` consecutive values per k.
            // Safety: as above.
            unsafe { fill_transposed(a.p.add(i0), a.cs, rows, k, kp, buf) };
        } else {
            for r in 0..rows {
                for kk in 0..k {
                    // Safety: as above.
                    buf[r * kp + kk] = to_bf16(unsafe { *a.p.add((i0 + r) * a.rs + kk * a.cs) });
                }
            }
        }
    };
    let ep = Epilogue {
        scale,
        accumulate,
        bias: None,
    };
    gemm_packed(m, n, k, &fill, &bp, dst, dst_rs, &ep, parallel, kernel)
}

/// A bf16 value as `vdpbf16ps` reads it: denormals as zero.
#[inline]
fn daz(h: u16) -> f32 {
    let v = from_bf16(h);
    if v != 0.0 && v.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(v)
    } else {
        v
    }
}

/// An f32 result as `vdpbf16ps` writes it: denormals flushed to zero.
#[inline]
fn ftz(v: f32) -> f32 {
    if v != 0.0 && v.abs() < f32::MIN_POSITIVE {
        0.0f32.copysign(v)
    } else {
        v
    }
}

/// `acc[r][c] = Σ_k x[r,k] · w[c,k]` over [`MR`] rows, pair by pair as `vdpbf16ps` does.
fn emulated_block(xb: &[u16], kp: usize, wb: &[u16], acc: &mut [[f32; NR]; MR]) {
    for k2 in 0..kp / 2 {
        let wk = &wb[k2 * NR * 2..(k2 + 1) * NR * 2];
        for (r, acc) in acc.iter_mut().enumerate() {
            let (x0, x1) = (daz(xb[r * kp + 2 * k2]), daz(xb[r * kp + 2 * k2 + 1]));
            for (c, a) in acc.iter_mut().enumerate() {
                *a = ftz(*a + x1 * daz(wk[c * 2 + 1]));
                *a = ftz(*a + x0 * daz(wk[c * 2]));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn avx512_block(xb: &[u16], kp: usize, wb: &[u16], acc: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    assert!(xb.len() >= MR * kp && wb.len() >= NR * kp);
    let mut s = [_mm512_setzero_ps(); MR];
    let xp = xb.as_ptr();
    let wp = wb.as_ptr();
    for k2 in 0..kp / 2 {
        let wv: __m512bh =
            std::mem::transmute(_mm512_loadu_si512(wp.add(k2 * NR * 2) as *const __m512i));
        for (r, sr) in s.iter_mut().enumerate() {
            // The pair x[r, 2·k2], x[r, 2·k2+1] in every 32-bit lane.
            let pair = (xp.add(r * kp + 2 * k2) as *const i32).read_unaligned();
            let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            *sr = _mm512_dpbf16_ps(*sr, xv, wv);
        }
    }
    for (r, sr) in s.iter().enumerate() {
        _mm512_storeu_ps(acc[r].as_mut_ptr(), *sr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
    }

    /// Says which hardware kernels this CPU cannot run (their checks are skipped).
    fn hardware() -> Vec<Kernel> {
        let mut k = Vec::new();
        for kern in [Kernel::Avx512Bf16, Kernel::Amx] {
            if kern.available() {
                k.push(kern);
            } else {
                eprintln!(
                    "skipped: the {} kernel (this CPU or OS does not run it)",
                    kern.name()
                );
            }
        }
        k
    }

    /// `got` (a hardware kernel's) against the emulation's `emu`: bit for bit for AVX-512;
    /// for AMX within `(k + 2) · 2⁻²⁴ · Σ|aᵢbᵢ|` of each output (`sabs`, its sum of
    /// absolute products), the sequential sum's own error bound.
    fn assert_matches(kern: Kernel, got: &[f32], emu: &[f32], sabs: &[f32], k: usize, what: &str) {
        if kern == Kernel::Avx512Bf16 {
            assert_eq!(got, emu, "{what}: avx512_bf16 differs from the emulation");
            return;
        }
        let tol = (k as f32 + 2.0) * 2f32.powi(-24);
        for (i, ((g, e), s)) in got.iter().zip(emu).zip(sabs).enumerate() {
            assert!(
                (g - e).abs() <= tol * s + f32::MIN_POSITIVE,
                "{what}: {} output {i}: {g} vs emulated {e} (Σ|ab| {s})",
                kern.name()
            );
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: to even (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: to even (1 + 2⁻⁶).
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert_eq!(
            to_bf16(-f32::MIN_POSITIVE / 3.0),
            0x8000,
            "a denormal to zero"
        );
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        let v = rand_vec(1000, 5);
        for &x in &v {
            let back = from_bf16(to_bf16(x));
            assert!((back - x).abs() <= x.abs() / 256.0, "{x} → {back}");
        }
        // The vector conversion (where the CPU has it) equals the scalar one, also on
        // halfway cases, denormals, infinities and NaN.
        let mut special = v.clone();
        special.extend([
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::MIN_POSITIVE / 4.0,
            -f32::MIN_POSITIVE * 0.999,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            0.0,
            -0.0,
        ]);
        let mut h = vec![0u16; special.len()];
        convert(&special, &mut h);
        let scalar: Vec<u16> = special.iter().map(|&x| to_bf16(x)).collect();
        assert_eq!(h, scalar);
        let mut n = [0u16; 1];
        convert(&[f32::NAN], &mut n);
        assert!(from_bf16(n[0]).is_nan());
    }

    /// The emulation tracks f32 within bf16's rounding of the inputs, on odd shapes (one
    /// task, and several column chunks and row groups); the hardware kernels, where the CPU
    /// has them, match the emulation.
    #[test]
    fn kernels_agree_and_track_f32_on_odd_shapes() {
        let hw = hardware();
        for (m, out, inp, seed) in [
            (1, 1, 1, 1),
            (5, 17, 13, 2),
            (9, 33, 64, 3),
            (37, 40, 385, 4),
            (70, 300, 1100, 5),
        ] {
            let x = rand_vec(m * inp, seed);
            let w = rand_vec(out * inp, seed + 100);
            let b = rand_vec(out, seed + 200);
            let bw = BWeight::pack(&w, out, inp);
            let emu = linear_bf16(&x, m, &bw, Some(&b), true, Kernel::Emulated);
            let mut sabs = vec![0f32; m * out];
            for i in 0..m {
                for j in 0..out {
                    let (xr, wr) = (&x[i * inp..(i + 1) * inp], &w[j * inp..(j + 1) * inp]);
                    let exact: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>() + b[j];
                    sabs[i * out + j] =
                        xr.iter().zip(wr).map(|(a, b)| (a * b).abs()).sum::<f32>() + b[j].abs();
                    // Each input is off by at most 2⁻⁹ of itself (|x|, |w| ≤ 1): a product by
                    // at most 2·2⁻⁹ + 2⁻¹⁸, plus f32 rounding of the sums.
                    let bound = inp as f32 * (2.0 / 512.0 + 1e-5) + 1e-5;
                    let got = emu[i * out + j];
                    assert!(
                        (got - exact).abs() <= bound,
                        "{m}x{out}x{inp}: {got} vs {exact}"
                    );
                }
            }
            for &kern in &hw {
                let got = linear_bf16(&x, m, &bw, Some(&b), true, kern);
                assert_matches(kern, &got, &emu, &sabs, inp, &format!("{m}x{out}x{inp}"));
                // Serial and parallel runs agree bit for bit.
                assert_eq!(got, linear_bf16(&x, m, &bw, Some(&b), false, kern));
            }
        }
    }

    /// `bgemm` reads every operand layout the linear layer gives it (row-major, transposed,
    /// general strides), scales and accumulates; each kernel against the plain sums of the
    /// bf16-rounded operands.
    #[test]
    fn bgemm_reads_every_layout() {
        let (m, n, k) = (45, 37, 71);
        let a = rand_vec(m * k * 2, 11);
        let b = rand_vec(k * n * 2, 12);
        let r = |v: f32| from_bf16(to_bf16(v));
        // (a, b) views: A row-major / transposed / stride 2; B row-major / transposed /
        // stride 2.
        let a_views = [
            Mat::rows(a.as_ptr(), k),
            Mat::rows_t(a.as_ptr(), m),
            Mat {
                p: a.as_ptr(),
                rs: 2 * k,
                cs: 2,
            },
        ];
        let b_views = [
            Mat::rows(b.as_ptr(), n),
            Mat::rows_t(b.as_ptr(), k),
            Mat {
                p: b.as_ptr(),
                rs: 2 * n,
                cs: 2,
            },
        ];
        let at = |v: &Mat, i: usize, j: usize| unsafe { *v.p.add(i * v.rs + j * v.cs) };
        let mut kernels = vec![Kernel::Emulated];
        kernels.extend(hardware());
        for av in &a_views {
            for bv in &b_views {
                let init = rand_vec(m * n, 13);
                let mut want = init.clone();
                for i in 0..m {
                    for j in 0..n {
                        let s: f64 = (0..k)
                            .map(|kk| r(at(av, i, kk)) as f64 * r(at(bv, kk, j)) as f64)
                            .sum();
                        want[i * n + j] += 0.5 * s as f32;
                    }
                }
                for &kern in &kernels {
                    let mut got = init.clone();
                    unsafe {
                        bgemm_with(
                            m,
                            n,
                            k,
                            got.as_mut_ptr(),
                            n,
                            true,
                            *av,
                            *bv,
                            0.5,
                            true,
                            kern,
                        )
                    };
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - w).abs() <= 1e-4, "{}: {g} vs {w}", kern.name());
                    }
                }
            }
        }
    }

    #[test]
    fn denormals_are_read_as_zero_and_flushed() {
        let tiny = f32::MIN_POSITIVE / 4.0; // a denormal
        let w = [1.0f32, tiny];
        let bw = BWeight::pack(&w, 1, 2);
        let y = linear_bf16(&[tiny, 1.0], 1, &bw, None, false, Kernel::Emulated);
        assert_eq!(y, vec![0.0]);
        for kern in hardware() {
            let hw = linear_bf16(&[tiny, 1.0], 1, &bw, None, false, kern);
            assert_eq!(hw, y, "{}", kern.name());
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// GFLOP/s of each kernel on the shapes of MiniLM and bert-base (a measurement, not a
    /// check: `cargo test --release -p ferrotune --lib bf16::speed -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn gflops() {
        for (m, out, inp) in [
            (2048, 384, 384),
            (2048, 1536, 384),
            (2048, 384, 1536),
            (1024, 3072, 768),
            (1024, 768, 3072),
        ] {
            let x: Vec<f32> = (0..m * inp)
                .map(|i| ((i % 97) as f32 - 48.0) / 50.0)
                .collect();
            let w: Vec<f32> = (0..out * inp)
                .map(|i| ((i % 89) as f32 - 44.0) / 50.0)
                .collect();
            let bw = BWeight::pack(&w, out, inp);
            for kern in [Kernel::Amx, Kernel::Avx512Bf16] {
                if !kern.available() {
                    continue;
                }
                let _ = linear_bf16(&x, m, &bw, None, true, kern);
                let reps = 20;
                let mut s = f64::MAX;
                for _ in 0..reps {
                    let t = std::time::Instant::now();
                    std::hint::black_box(linear_bf16(&x, m, &bw, None, true, kern));
                    s = s.min(t.elapsed().as_secs_f64());
                }
                let gf = 2.0 * (m * out * inp) as f64 / s / 1e9;
                eprintln!(
                    "{m}x{out}x{inp} {}: {:.2} ms, {gf:.0} GFLOP/s",
                    kern.name(),
                    s * 1e3
                );
                // The GEMM alone: output allocated once, input converted once.
                let mut y = vec![0f32; m * out];
                let mut xa = vec![0u16; m * bw.kp];
                for r in 0..m {
                    convert(
                        &x[r * inp..(r + 1) * inp],
                        &mut xa[r * bw.kp..r * bw.kp + inp],
                    );
                }
                let fill = |i0: usize, rows: usize, buf: &mut [u16]| {
                    buf.copy_from_slice(&xa[i0 * bw.kp..(i0 + rows) * bw.kp])
                };
                let ep = Epilogue {
                    scale: 1.0,
                    accumulate: false,
                    bias: None,
                };
                let mut s = f64::MAX;
                for _ in 0..reps {
                    let t = std::time::Instant::now();
                    unsafe {
                        gemm_packed(
                            m,
                            out,
                            inp,
                            &fill,
                            &bw.packed,
                            y.as_mut_ptr(),
                            out,
                            &ep,
                            true,
                            kern,
                        )
                    };
                    s = s.min(t.elapsed().as_secs_f64());
                }
                let gf = 2.0 * (m * out * inp) as f64 / s / 1e9;
                eprintln!("   gemm only: {:.2} ms, {gf:.0} GFLOP/s", s * 1e3);
            }
        }
    }
}

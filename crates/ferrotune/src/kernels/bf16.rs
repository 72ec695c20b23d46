//! bf16 linear layers: `y = x Wᵀ + b` with `x` and `W` rounded to bf16 (round to nearest
//! even) and the products summed in f32 — for inference on weights packed once
//! ([`linear_bf16`]), and for mixed-precision training, where [`bgemm`] runs the linear
//! layer's three GEMMs on operands rounded as they are packed.
//!
//! The hardware kernel is AVX-512 BF16's `vdpbf16ps`: each 32-bit lane of the accumulator
//! gains the two products of a pair of bf16 values, `acc += a₁·b₁; acc += a₀·b₀`, each an
//! f32 fused multiply-add with denormal inputs read as zero, denormal results flushed to
//! zero, round to nearest even (Intel SDM, VDPBF16PS). The product of two bf16 values is
//! exact in f32, so each step is one f32 addition, rounded once.
//!
//! [`Kernel::Emulated`] does exactly those steps in plain Rust, in the same order and
//! blocking, so it is the reference the hardware kernel is tested against bit for bit
//! (where the CPU has `avx512_bf16`; elsewhere that test says it was skipped). It runs
//! everywhere, but slowly: bf16 is only offered where the CPU has the instruction
//! ([`crate::precision`]).

use super::gemm::Mat;

/// Output columns per packed block (one 512-bit register of f32 sums).
const NR: usize = 16;
/// Rows per micro-kernel call.
const MR: usize = 8;

/// `x` rounded to bf16, to nearest even (NaN stays NaN).
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 `h`.
#[inline]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A weight matrix `(out, in)` in bf16, packed for the kernels.
#[derive(Debug, Clone)]
pub struct BWeight {
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
    /// `inp` rounded up to even.
    kp: usize,
    /// Blocks of [`NR`] columns; in each, for every pair of inputs, [`NR`] × 2 values
    /// (column `c`'s two consecutive weights together), zero-padded.
    packed: Vec<u16>,
}

impl BWeight {
    /// Rounds a row-major `(out, inp)` f32 matrix to bf16 and packs it.
    pub fn pack(w: &[f32], out: usize, inp: usize) -> BWeight {
        assert_eq!(w.len(), out * inp, "weight size");
        // As the right operand of `x · Wᵀ`: element (k, j) is w[j, k].
        let (packed, kp) = pack_b(inp, out, |k, j| w[j * inp + k]);
        BWeight {
            out,
            inp,
            kp,
            packed,
        }
    }
}

/// The right operand `B (k × n)` of a GEMM rounded to bf16 and packed for the kernels:
/// blocks of [`NR`] columns; in each, for every pair of `k`, [`NR`] × 2 values (column `c`'s
/// two consecutive values together), zero-padded. Returns it and `k` rounded up to even.
fn pack_b(k: usize, n: usize, get: impl Fn(usize, usize) -> f32) -> (Vec<u16>, usize) {
    let kp = k.div_ceil(2) * 2;
    let blocks = n.div_ceil(NR);
    let mut packed = vec![0u16; blocks * NR * kp];
    for j in 0..n {
        let (b, c) = (j / NR, j % NR);
        for kk in 0..k {
            packed[b * NR * kp + (kk / 2) * NR * 2 + c * 2 + kk % 2] = to_bf16(get(kk, j));
        }
    }
    (packed, kp)
}

/// Which kernel computes the sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust, the same operations as the instruction (the reference; slow).
    Emulated,
    /// AVX-512 BF16 (`vdpbf16ps`).
    Avx512Bf16,
}

impl Kernel {
    /// The hardware kernel where the CPU has it (checked at run time), else the emulation.
    pub fn best() -> Kernel {
        if Kernel::Avx512Bf16.available() {
            Kernel::Avx512Bf16
        } else {
            Kernel::Emulated
        }
    }

    /// True when this CPU runs it.
    pub fn available(self) -> bool {
        match self {
            Kernel::Emulated => true,
            Kernel::Avx512Bf16 => avx512_bf16(),
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Emulated => "emulated",
            Kernel::Avx512Bf16 => "avx512_bf16",
        }
    }
}

/// True when the CPU has AVX-512 BF16 (checked at run time).
fn avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows per task: rounded together, then every column block runs over them.
const PANEL: usize = 32;

/// What is done with a block's sums `s`: `out = [out +] scale · s [+ bias]`.
struct Epilogue<'a> {
    scale: f32,
    accumulate: bool,
    bias: Option<&'a [f32]>,
}

/// The GEMM over packed `B` (`n` columns, `kp` rows): `fill(i0, rows, buf)` writes rows
/// `i0..i0 + rows` of `A` in bf16 into `buf` (row stride `kp`, zero padding); the result
/// goes to `dst` (row stride `dst_rs`) through `ep`. Panels of rows on candle's pool when
/// `parallel`.
///
/// # Safety
/// `dst` must be valid for `m` rows of `n` at stride `dst_rs`, and not read or written by
/// anyone else during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_packed(
    m: usize,
    n: usize,
    kp: usize,
    fill: &(dyn Fn(usize, usize, &mut [u16]) + Sync),
    bp: &[u16],
    dst: *mut f32,
    dst_rs: usize,
    ep: &Epilogue,
    parallel: bool,
    kernel: Kernel,
) {
    let kernel = if kernel.available() {
        kernel
    } else {
        Kernel::Emulated
    };
    let dst = SendPtr(dst);
    let run = |t: usize| {
        let p0 = t * PANEL;
        let prows = PANEL.min(m - p0);
        let mut ab = vec![0u16; prows * kp];
        fill(p0, prows, &mut ab);
        for b in 0..n.div_ceil(NR) {
            let wb = &bp[b * NR * kp..(b + 1) * NR * kp];
            let (j0, nc) = (b * NR, NR.min(n - b * NR));
            for r0 in (0..prows).step_by(MR) {
                let rows = MR.min(prows - r0);
                let ar = &ab[r0 * kp..(r0 + rows) * kp];
                let mut acc = [[0f32; NR]; MR];
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // Safety: the CPU has AVX-512 BF16 (`available`); slices hold rows·kp
                    // and NR·kp values.
                    Kernel::Avx512Bf16 => unsafe { avx512_block(ar, rows, kp, wb, &mut acc) },
                    _ => emulated_block(ar, rows, kp, wb, &mut acc),
                }
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    // Safety: panel `t` writes its own rows of `dst` only.
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(
                            dst.get().add((p0 + r0 + r) * dst_rs + j0),
                            nc,
                        )
                    };
                    for c in 0..nc {
                        let mut v = ep.scale * acc[c];
                        if ep.accumulate {
                            v += row[c];
                        }
                        if let Some(b) = ep.bias {
                            v += b[j0 + c];
                        }
                        row[c] = v;
                    }
                }
            }
        }
    };
    let big = m * n * kp >= super::par::PAR_MIN * 16;
    super::par::par_for(m.div_ceil(PANEL), parallel && big, run);
}

/// A pointer the panels share (each writes its own rows).
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// Safety: see `gemm_packed`: panels write disjoint rows.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `y (m, out) = x (m, inp) · Wᵀ + b` in bf16 with f32 sums, over panels of rows on
/// candle's pool when `parallel`, with `kernel` (the emulation where the CPU lacks it).
pub fn linear_bf16(
    x: &[f32],
    m: usize,
    w: &BWeight,
    bias: Option<&[f32]>,
    parallel: bool,
    kernel: Kernel,
) -> Vec<f32> {
    assert_eq!(x.len(), m * w.inp, "input size");
    let mut y = vec![0f32; m * w.out];
    let (inp, kp) = (w.inp, w.kp);
    let fill = |i0: usize, rows: usize, buf: &mut [u16]| {
        for r in 0..rows {
            for (d, &v) in buf[r * kp..r * kp + inp]
                .iter_mut()
                .zip(&x[(i0 + r) * inp..(i0 + r + 1) * inp])
            {
                *d = to_bf16(v);
            }
        }
    };
    let ep = Epilogue {
        scale: 1.0,
        accumulate: false,
        bias,
    };
    // Safety: y holds m rows of w.out.
    unsafe {
        gemm_packed(
            m,
            w.out,
            kp,
            &fill,
            &w.packed,
            y.as_mut_ptr(),
            w.out,
            &ep,
            parallel,
            kernel,
        )
    };
    y
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
    // Safety: the caller's contract covers every (row, column) read here.
    let (bp, kp) = pack_b(k, n, |kk, j| unsafe { *b.p.add(kk * b.rs + j * b.cs) });
    // Captured whole (a `Sync` view), not its raw pointer field.
    let a = &a;
    let fill = |i0: usize, rows: usize, buf: &mut [u16]| {
        for r in 0..rows {
            for kk in 0..k {
                // Safety: as above.
                buf[r * kp + kk] = to_bf16(unsafe { *a.p.add((i0 + r) * a.rs + kk * a.cs) });
            }
        }
    };
    let ep = Epilogue {
        scale,
        accumulate,
        bias: None,
    };
    gemm_packed(
        m,
        n,
        kp,
        &fill,
        &bp,
        dst,
        dst_rs,
        &ep,
        parallel,
        Kernel::best(),
    )
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

/// `acc[r][c] += Σ_k x[r,k] · w[c,k]`, pair by pair as `vdpbf16ps` does.
fn emulated_block(xb: &[u16], rows: usize, kp: usize, wb: &[u16], acc: &mut [[f32; NR]; MR]) {
    for k2 in 0..kp / 2 {
        let wk = &wb[k2 * NR * 2..(k2 + 1) * NR * 2];
        for (r, acc) in acc.iter_mut().enumerate().take(rows) {
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
unsafe fn avx512_block(xb: &[u16], rows: usize, kp: usize, wb: &[u16], acc: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    let mut s = [_mm512_setzero_ps(); MR];
    let xp = xb.as_ptr();
    let wp = wb.as_ptr();
    for k2 in 0..kp / 2 {
        let wv: __m512bh =
            std::mem::transmute(_mm512_loadu_si512(wp.add(k2 * NR * 2) as *const __m512i));
        for (r, sr) in s.iter_mut().enumerate().take(rows) {
            // The pair x[r, 2·k2], x[r, 2·k2+1] in every 32-bit lane.
            let pair = (xp.add(r * kp + 2 * k2) as *const i32).read_unaligned();
            let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            *sr = _mm512_dpbf16_ps(*sr, xv, wv);
        }
    }
    for (r, sr) in s.iter().enumerate().take(rows) {
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

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: to even (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: to even (1 + 2⁻⁶).
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        for v in rand_vec(1000, 5) {
            let back = from_bf16(to_bf16(v));
            assert!((back - v).abs() <= v.abs() / 256.0, "{v} → {back}");
        }
    }

    /// The emulation tracks f32 within bf16's rounding of the inputs, on odd shapes; the
    /// hardware kernel, where the CPU has it, equals the emulation bit for bit.
    #[test]
    fn kernels_agree_and_track_f32_on_odd_shapes() {
        for (m, out, inp, seed) in [
            (1, 1, 1, 1),
            (5, 17, 13, 2),
            (9, 33, 64, 3),
            (37, 40, 385, 4),
        ] {
            let x = rand_vec(m * inp, seed);
            let w = rand_vec(out * inp, seed + 100);
            let b = rand_vec(out, seed + 200);
            let bw = BWeight::pack(&w, out, inp);
            let emu = linear_bf16(&x, m, &bw, Some(&b), true, Kernel::Emulated);
            for i in 0..m {
                for j in 0..out {
                    let exact: f32 = (0..inp)
                        .map(|k| x[i * inp + k] * w[j * inp + k])
                        .sum::<f32>()
                        + b[j];
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
            if Kernel::Avx512Bf16.available() {
                let hw = linear_bf16(&x, m, &bw, Some(&b), true, Kernel::Avx512Bf16);
                assert_eq!(hw, emu, "{m}x{out}x{inp}");
            } else {
                eprintln!("skipped: the avx512_bf16 kernel (this CPU has no avx512_bf16)");
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
        if Kernel::Avx512Bf16.available() {
            let hw = linear_bf16(&[tiny, 1.0], 1, &bw, None, false, Kernel::Avx512Bf16);
            assert_eq!(hw, y);
        }
    }
}

//! int8 inference for linear layers: per-output-channel symmetric int8 weights, dynamic
//! per-row activation quantization, and an integer GEMM with i32 accumulation.
//!
//! `y[i,j] = sx_i · sw_j · Σ_k qx[i,k] · qw[j,k] + b_j`, where `qx = round(x / sx)` with
//! `sx = max|x_i| / 127` (per row, computed for every input: dynamic quantization) and
//! `qw = round(w / sw)` with `sw = max|w_j| / 63` (per output channel, once).
//!
//! Weights keep 7 bits (±63), as ONNX Runtime's `reduce_range` does on CPUs without VNNI:
//! the AVX2 kernel multiplies unsigned activation bytes (`qx + 128`, 1..=255) by signed
//! weight bytes with `vpmaddubsw`, which adds pairs of products into 16 bits with
//! saturation; `255 · 63 · 2 = 32130` stays below `i16::MAX`, so nothing saturates and the
//! integer sums are exact. The `+128` is taken back out with each column's weight sum:
//! `Σ (qx+128)·qw = Σ qx·qw + 128·Σ qw`.
//!
//! Where the CPU has AVX-512 VNNI (Zen 4, Ice Lake and later Xeons), `vpdpbusd` does the
//! same byte products and sums them into 32 bits in one instruction; the 7-bit weights are
//! kept so that one quantized model gives the same numbers on every CPU. Where it has AMX
//! (`amx_int8`, Sapphire Rapids), `tdpbusd` does them on tiles: 16 rows × 64 bytes of
//! activations times 64 × 16 weights per instruction, into 16×16 i32 sums
//! ([`super::amx`]); the packed weights are already in the layout its tiles read.
//!
//! The portable kernel does the same integer arithmetic and the same float epilogue in
//! the same order, so all kernels give bit-identical outputs (tested wherever the CPU has
//! them; elsewhere the test says it skipped them).

use super::amx;

/// Output columns per packed block (two AVX2 registers of eight i32 sums).
const NR: usize = 16;
/// Rows per micro-kernel call.
const MR: usize = 4;
/// What `k` is padded to: 64 bytes, one AMX tile row (a weight block's every 64 inputs
/// are then one tile of 16 rows of 16 columns × 4 bytes).
const KP: usize = 64;
/// The weight range: ±63 (7 bits; see the module documentation).
pub const W_MAX: f32 = 63.0;
/// The activation range: ±127.
pub const X_MAX: f32 = 127.0;

/// A quantized weight matrix `(out, in)`, packed for the kernels.
#[derive(Debug, Clone)]
pub struct QWeight {
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
    /// `inp` rounded up to a multiple of [`KP`].
    kp: usize,
    /// Blocks of [`NR`] columns; in each, for every 4 inputs, [`NR`] × 4 bytes (column
    /// `c`'s four consecutive weights together), zero-padded.
    packed: Vec<i8>,
    /// Per output channel: `sw_j`.
    pub scales: Vec<f32>,
    /// Per output channel: `Σ_k qw[j,k]`.
    col_sums: Vec<i32>,
}

impl QWeight {
    /// Quantizes a row-major `(out, inp)` f32 matrix.
    pub fn quantize(w: &[f32], out: usize, inp: usize) -> QWeight {
        assert_eq!(w.len(), out * inp, "weight size");
        let mut q = vec![0i8; out * inp];
        let mut scales = vec![0f32; out];
        for j in 0..out {
            let row = &w[j * inp..(j + 1) * inp];
            let m = row.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let s = if m > 0.0 { m / W_MAX } else { 1.0 };
            scales[j] = s;
            for (d, &v) in q[j * inp..(j + 1) * inp].iter_mut().zip(row) {
                *d = (v / s).round().clamp(-W_MAX, W_MAX) as i8;
            }
        }
        QWeight::from_quantized(q, scales, out, inp)
    }

    /// Packs weights already quantized (`q` row-major `(out, inp)`, each in ±63).
    pub fn from_quantized(q: Vec<i8>, scales: Vec<f32>, out: usize, inp: usize) -> QWeight {
        let kp = inp.div_ceil(KP) * KP;
        let blocks = out.div_ceil(NR);
        let mut packed = vec![0i8; blocks * NR * kp];
        for j in 0..out {
            let (b, c) = (j / NR, j % NR);
            for k in 0..inp {
                let at = b * NR * kp + (k / 4) * NR * 4 + c * 4 + k % 4;
                packed[at] = q[j * inp + k];
            }
        }
        let col_sums = (0..out)
            .map(|j| q[j * inp..(j + 1) * inp].iter().map(|&v| v as i32).sum())
            .collect();
        QWeight {
            out,
            inp,
            kp,
            packed,
            scales,
            col_sums,
        }
    }

    /// The matrices one below another (same `inp`): rows are quantized on their own, so
    /// this equals quantizing the concatenated f32 weights.
    pub fn concat(parts: &[&QWeight]) -> QWeight {
        let inp = parts[0].inp;
        assert!(parts.iter().all(|p| p.inp == inp), "concat: input widths");
        let out = parts.iter().map(|p| p.out).sum();
        let q = parts.iter().flat_map(|p| p.unpacked()).collect();
        let scales = parts
            .iter()
            .flat_map(|p| p.scales.iter().copied())
            .collect();
        QWeight::from_quantized(q, scales, out, inp)
    }

    /// The quantized weights, row-major `(out, inp)` (for saving).
    pub fn unpacked(&self) -> Vec<i8> {
        let mut q = vec![0i8; self.out * self.inp];
        for j in 0..self.out {
            let (b, c) = (j / NR, j % NR);
            for k in 0..self.inp {
                q[j * self.inp + k] =
                    self.packed[b * NR * self.kp + (k / 4) * NR * 4 + c * 4 + k % 4];
            }
        }
        q
    }
}

/// The first `scales.len()` rows of `x` (row-major, `k` wide) quantized into `q`: bytes
/// `qx + 128` with row stride `kp` (padding 128, i.e. zero), and each row's scale into
/// `scales`; with the AVX2 (or AVX-512) loop when `use_avx2` (the caller checked the CPU).
fn quantize_into(x: &[f32], k: usize, kp: usize, q: &mut [u8], scales: &mut [f32], use_avx2: bool) {
    for (i, sc) in scales.iter_mut().enumerate() {
        let row = &x[i * k..(i + 1) * k];
        let a = max_abs(row);
        let s = if a > 0.0 { a / X_MAX } else { 1.0 };
        *sc = s;
        let inv = 1.0 / s;
        let dst = &mut q[i * kp..(i + 1) * kp];
        dst[k..].fill(128);
        let dst = &mut dst[..k];
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if use_avx2 {
            done = if super::simd::avx512() {
                // Safety: AVX-512 checked; both slices hold `k` elements.
                unsafe { quantize_avx512(row, inv, dst) }
            } else {
                // Safety: AVX2 checked by the caller; as above.
                unsafe { quantize_avx2(row, inv, dst) }
            };
        }
        let _ = use_avx2;
        for (d, &v) in dst[done..].iter_mut().zip(&row[done..]) {
            *d = quantize_one(v, inv);
        }
    }
}

/// [`quantize_one`] over the first multiple of 16 of `row`, the same float operations in
/// sixteen lanes; returns how many were done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_avx512(row: &[f32], inv: f32, dst: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let n = row.len() / 16 * 16;
    let (vinv, lo, hi) = (
        _mm512_set1_ps(inv),
        _mm512_set1_ps(-X_MAX),
        _mm512_set1_ps(X_MAX),
    );
    let magic = _mm512_set1_ps(12_582_912.0);
    let off = _mm512_set1_epi32(128);
    let p = row.as_ptr();
    for i in (0..n).step_by(16) {
        let v = _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), vinv);
        let v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        let v = _mm512_sub_ps(_mm512_add_ps(v, magic), magic);
        // 1..=255: the low byte of each lane is the value.
        let b = _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvttps_epi32(v), off));
        _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, b);
    }
    n
}

/// One activation: `round(clamp(v / s)) + 128`.
#[inline]
fn quantize_one(v: f32, inv: f32) -> u8 {
    (round((v * inv).clamp(-X_MAX, X_MAX)) + 128) as u8
}

/// [`quantize_one`] over the first multiple of 32 of `row`, the same float operations in
/// eight lanes; returns how many were done.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(row: &[f32], inv: f32, dst: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let n = row.len() / 32 * 32;
    let (vinv, lo, hi) = (
        _mm256_set1_ps(inv),
        _mm256_set1_ps(-X_MAX),
        _mm256_set1_ps(X_MAX),
    );
    let magic = _mm256_set1_ps(12_582_912.0);
    let off = _mm256_set1_epi32(128);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let p = row.as_ptr();
    for i in (0..n).step_by(32) {
        let q = |j: usize| {
            let v = _mm256_mul_ps(_mm256_loadu_ps(p.add(i + j)), vinv);
            let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
            let v = _mm256_sub_ps(_mm256_add_ps(v, magic), magic);
            _mm256_add_epi32(_mm256_cvttps_epi32(v), off)
        };
        let ab = _mm256_packs_epi32(q(0), q(8));
        let cd = _mm256_packs_epi32(q(16), q(24));
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), order);
        _mm256_storeu_si256(dst.as_mut_ptr().add(i) as *mut __m256i, bytes);
    }
    n
}

/// Round to nearest, ties to even, by the float trick (adding and taking away 1.5·2²³
/// leaves the integer part in the mantissa), so that the loop vectorises without SSE4.1's
/// `roundps` or a libm call; exact for `|x| < 2²²` (here `|x| ≤ 127`).
#[inline]
fn round(x: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    ((x + MAGIC) - MAGIC) as i32
}

super::simd::dispatch! {
    /// `max |v|`, in 32 lanes so that it vectorises into independent chains (exact in any
    /// order).
    fn max_abs(v: &[f32]) -> f32 {
        let mut m = [0f32; 32];
        let chunks = v.chunks_exact(32);
        let tail = chunks.remainder();
        for c in chunks {
            for (m, &x) in m.iter_mut().zip(c) {
                // A compare, not `f32::max`, whose NaN handling took a blend per lane
                // (8% of an int8 pass); both skip NaN.
                let a = x.abs();
                *m = if a > *m { a } else { *m };
            }
        }
        tail.iter()
            .fold(m.iter().fold(0f32, |a, &b| a.max(b)), |a, &x| {
                a.max(x.abs())
            })
    }
}

/// An integer GEMM kernel. All three compute the same exact i32 sums and the same float
/// epilogue, so their outputs are bit-identical (tested wherever the CPU has them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust (any CPU).
    Portable,
    /// AVX2: `vpmaddubsw` + `vpmaddwd` (16-bit pair sums; exact because weights keep 7 bits).
    Avx2,
    /// AVX-512 VNNI (with AVX-512 VL, on 256-bit registers): `vpdpbusd`, four byte products
    /// summed into 32 bits in one instruction.
    Vnni,
    /// AMX (`amx_int8`, Sapphire Rapids and later): `tdpbusd`, the same byte products on
    /// 16×64 by 64×16 tiles ([`super::amx`]).
    Amx,
}

impl Kernel {
    /// Every kernel.
    pub const ALL: [Kernel; 4] = [Kernel::Portable, Kernel::Avx2, Kernel::Vnni, Kernel::Amx];

    /// The fastest kernel this CPU runs (checked at run time). `FERROTUNE_INT8_KERNEL`
    /// (`portable`, `avx2`, `vnni`, `amx`) picks another, where the CPU has it, for
    /// measurements.
    pub fn best() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let asked = std::env::var("FERROTUNE_INT8_KERNEL")
                .ok()
                .and_then(|v| Kernel::ALL.into_iter().find(|k| k.name() == v));
            match asked {
                Some(k) if k.available() => k,
                _ if Kernel::Amx.available() => Kernel::Amx,
                _ if Kernel::Vnni.available() => Kernel::Vnni,
                _ if Kernel::Avx2.available() => Kernel::Avx2,
                _ => Kernel::Portable,
            }
        })
    }

    /// True when this CPU runs it.
    pub fn available(self) -> bool {
        match self {
            Kernel::Portable => true,
            Kernel::Avx2 => avx2(),
            Kernel::Vnni => vnni(),
            Kernel::Amx => vnni() && amx_avx512() && amx::available(amx::Op::Int8),
        }
    }

    /// Its name (`portable`, `avx2`, `vnni`, `amx`).
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Vnni => "vnni",
            Kernel::Amx => "amx",
        }
    }
}

/// The kernel that runs ([`Kernel::best`]), by name.
pub fn kernel_name() -> &'static str {
    Kernel::best().name()
}

fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2()
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512F, which the AMX kernel's epilogue uses (every CPU with AMX has it).
fn amx_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Rows per task: quantized together, then every column block of the weights runs over
/// them while it is in cache.
const PANEL: usize = 32;

/// `y (m, out) = x (m, inp) · Wᵀ + b` through int8, over panels of rows on candle's pool
/// when `parallel`, with `kernel` (the portable one where the CPU lacks it).
pub fn linear_i8(
    x: &[f32],
    m: usize,
    w: &QWeight,
    bias: Option<&[f32]>,
    parallel: bool,
    kernel: Kernel,
) -> Vec<f32> {
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = vec![0f32; w.out];
            &zeros
        }
    };
    let kernel = if kernel.available() {
        kernel
    } else {
        Kernel::Portable
    };
    let big = m * w.out * w.inp >= super::par::PAR_MIN * 16;
    let n = m * w.out;
    // Safety: every kernel writes every output (each panel's rows, every column block),
    // so `y` need not be zeroed first (that memset was 5% of an int8 MiniLM pass).
    unsafe {
        super::par::filled(n, |y| {
            linear_into(
                x,
                m,
                w,
                bias,
                super::par::Out(y, n),
                parallel && big,
                kernel,
            )
        })
    }
}

/// [`linear_i8`] into `out` (`m · w.out`, written completely) with an available kernel.
fn linear_into(
    x: &[f32],
    m: usize,
    w: &QWeight,
    bias: &[f32],
    out: super::par::Out,
    parallel: bool,
    kernel: Kernel,
) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Amx {
        // Safety: the CPU has AMX-INT8 and AVX-512F (`available`).
        unsafe { amx_linear(x, m, w, bias, out, parallel) };
        return;
    }
    let use_avx2 = kernel != Kernel::Portable;
    let use_vnni = kernel == Kernel::Vnni;
    let run = |t: usize| {
        let p0 = t * PANEL;
        let prows = PANEL.min(m - p0);
        let mut sx = [1f32; PANEL];
        super::par::with_scratch(&TILES, PANEL * w.kp, |qx| {
            let xp = &x[p0 * w.inp..(p0 + prows) * w.inp];
            quantize_into(xp, w.inp, w.kp, qx, &mut sx[..prows], use_avx2);
            let ep = Epilogue {
                sx: &sx[..prows],
                sums: &w.col_sums,
                scales: &w.scales,
                bias,
            };
            // Safety: panel `t` writes rows p0..p0+prows only, all `w.out` columns of each.
            #[cfg(target_arch = "x86_64")]
            if use_avx2 {
                // Safety: the CPU has the kernel's instructions (`Kernel::available`);
                // `qx` holds prows·kp bytes, `packed` every column block.
                unsafe {
                    let y = out.ptr().add(p0 * w.out);
                    if use_vnni {
                        vnni_panel(qx, w.kp, &w.packed, &ep, y, w.out);
                    } else {
                        avx2_panel(qx, w.kp, &w.packed, &ep, y, w.out);
                    }
                }
                return;
            }
            let _ = use_vnni;
            // Safety: as above.
            let yp = unsafe { out.part(p0 * w.out, prows * w.out) };
            portable_panel(qx, w, &ep, yp);
        })
    };
    super::par::par_for(m.div_ceil(PANEL), parallel, run);
}

thread_local! {
    /// A panel's quantized rows, row-major, then (second half, AMX only) in tile order.
    static TILES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`linear_i8`] by AMX: per panel of [`PANEL`] (= [`amx::TB`]) rows, the quantized rows
/// in tile order, then 32×32 blocks of exact i32 sums ([`amx::block`]) through the same
/// float epilogue as the other kernels (so the outputs are bit-identical).
///
/// # Safety
/// The CPU has AMX-INT8 and AVX-512F and Linux granted the tile state
/// ([`Kernel::available`]); `out` holds `m · w.out` elements.
#[cfg(target_arch = "x86_64")]
unsafe fn amx_linear(
    x: &[f32],
    m: usize,
    w: &QWeight,
    bias: &[f32],
    out: super::par::Out,
    parallel: bool,
) {
    const _: () = assert!(PANEL == amx::TB);
    let (kp, n) = (w.kp, w.out);
    super::par::par_for(m.div_ceil(PANEL), parallel, |t| {
        let p0 = t * PANEL;
        let prows = PANEL.min(m - p0);
        let mut sx = [1f32; PANEL];
        super::par::with_scratch(&TILES, 2 * PANEL * kp, |buf| {
            let (rows, tiles) = buf.split_at_mut(PANEL * kp);
            let xp = &x[p0 * w.inp..(p0 + prows) * w.inp];
            quantize_into(xp, w.inp, kp, rows, &mut sx[..prows], true);
            rows[prows * kp..].fill(128); // rows past m: zeros (their sums are not used)
            amx::tile_order(rows, tiles, kp);
            // Safety: the caller checked the CPU; the tiles are released below.
            unsafe { amx::configure() };
            let mut acc = [[0i32; amx::TB]; amx::TB];
            for j0 in (0..n).step_by(amx::TB) {
                let nc = amx::TB.min(n - j0);
                // Safety: `tiles` holds TB·kp bytes; block j0 / NR (and the next when
                // nc > NR) NR·kp bytes each of `packed`; kp is a multiple of 64.
                unsafe {
                    amx::block(
                        amx::Op::Int8,
                        tiles.as_ptr(),
                        kp,
                        w.packed.as_ptr().add(j0 * kp) as *const u8,
                        nc > NR,
                        &mut acc,
                    )
                };
                let ep = Epilogue {
                    sx: &sx[..prows],
                    sums: &w.col_sums[j0..j0 + nc],
                    scales: &w.scales[j0..j0 + nc],
                    bias: &bias[j0..j0 + nc],
                };
                // Safety: AVX-512F (the caller); panel t alone writes rows p0.. of `out`,
                // and row r's columns j0..j0 + nc are inside it.
                unsafe { epilogue_avx512(&acc, &ep, out.ptr().add(p0 * n + j0), n) };
            }
            // Safety: as above.
            unsafe { amx::release() };
        })
    });
}

/// A block's outputs from its integer sums (`ep.sx.len()` rows, `ep.sums.len()` columns,
/// row stride `ys`): the portable epilogue's float operations in the same order (no fused
/// multiply-add), 16 lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn epilogue_avx512(acc: &[[i32; amx::TB]; amx::TB], ep: &Epilogue, y: *mut f32, ys: usize) {
    use std::arch::x86_64::*;
    let nc = ep.sums.len();
    let c128 = _mm512_set1_epi32(128);
    for c in (0..nc).step_by(16) {
        let mask: __mmask16 = if nc - c >= 16 {
            0xffff
        } else {
            (1u16 << (nc - c)) - 1
        };
        let s = _mm512_mullo_epi32(
            _mm512_maskz_loadu_epi32(mask, ep.sums.as_ptr().add(c)),
            c128,
        );
        let sc = _mm512_maskz_loadu_ps(mask, ep.scales.as_ptr().add(c));
        let b = _mm512_maskz_loadu_ps(mask, ep.bias.as_ptr().add(c));
        for (r, &sx) in ep.sx.iter().enumerate() {
            let a = _mm512_loadu_si512(acc[r].as_ptr().add(c) as *const _);
            let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(a, s));
            let o = _mm512_add_ps(_mm512_mul_ps(v, _mm512_mul_ps(_mm512_set1_ps(sx), sc)), b);
            _mm512_mask_storeu_ps(y.add(r * ys + c), mask, o);
        }
    }
}

/// `acc[r][c] += Σ_k xb[r,k] · w[c,k]` (bytes `qx+128` times weights), portable.
fn portable_block(xb: &[u8], rows: usize, kp: usize, wb: &[i8], acc: &mut [[i32; NR]; MR]) {
    for k4 in 0..kp / 4 {
        let wk = &wb[k4 * NR * 4..(k4 + 1) * NR * 4];
        for (r, acc) in acc.iter_mut().enumerate().take(rows) {
            let xk = &xb[r * kp + k4 * 4..r * kp + k4 * 4 + 4];
            for (c, a) in acc.iter_mut().enumerate() {
                let wc = &wk[c * 4..c * 4 + 4];
                *a += (0..4).map(|t| xk[t] as i32 * wc[t] as i32).sum::<i32>();
            }
        }
    }
}

/// What turns a block's integer sums into outputs: the rows' scales, and the block's
/// column sums, scales and biases.
struct Epilogue<'a> {
    sx: &'a [f32],
    sums: &'a [i32],
    scales: &'a [f32],
    bias: &'a [f32],
}

/// A panel's outputs by the portable kernel: every column block, [`MR`] rows at a time.
fn portable_panel(qx: &[u8], w: &QWeight, ep: &Epilogue, yp: &mut [f32]) {
    let prows = ep.sx.len();
    for b in 0..w.out.div_ceil(NR) {
        let wb = &w.packed[b * NR * w.kp..(b + 1) * NR * w.kp];
        let (j0, nc) = (b * NR, NR.min(w.out - b * NR));
        for r0 in (0..prows).step_by(MR) {
            let rows = MR.min(prows - r0);
            let mut acc = [[0i32; NR]; MR];
            portable_block(&qx[r0 * w.kp..(r0 + rows) * w.kp], rows, w.kp, wb, &mut acc);
            for (r, acc) in acc.iter().enumerate().take(rows) {
                let s = ep.sx[r0 + r];
                let yr = &mut yp[(r0 + r) * w.out + j0..(r0 + r) * w.out + j0 + nc];
                for (c, y) in yr.iter_mut().enumerate() {
                    let (j, a) = (j0 + c, acc[c]);
                    let v = (a - 128 * ep.sums[j]) as f32 * (s * ep.scales[j]);
                    *y = v + ep.bias[j];
                }
            }
        }
    }
}

/// A panel kernel on 256-bit registers: for every column block of [`NR`], every [`MR`]
/// rows of the panel's quantized activations (`qx`, row stride `kp`, `ep.sx.len()` rows),
/// the integer sums by `$sums`, then the epilogue in registers (the portable one's float
/// operations in the same order, no fused multiply-add), written to `y` (row stride `ys`).
/// One function runs the whole panel so that the sums and the epilogue inline into it
/// (one call per 4×16 block, with the block's arguments passed through memory, cost
/// about 15% of an int8 MiniLM pass on Zen 3). The two builds differ only in the sums'
/// instructions.
macro_rules! panel_kernel {
    ($(#[$doc:meta])* $name:ident, $features:literal, $sums:ident) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(qx: &[u8], kp: usize, packed: &[i8], ep: &Epilogue, y: *mut f32, ys: usize) {
            use std::arch::x86_64::*;
            let (prows, n) = (ep.sx.len(), ep.sums.len());
            let c128 = _mm256_set1_epi32(128);
            for j0 in (0..n).step_by(NR) {
                let nc = NR.min(n - j0);
                // The block's column sums (times 128), scales and biases; a last block of
                // fewer than NR columns reads them from a zero-padded copy.
                let (mut cs, mut sc, mut bi) = ([0i32; NR], [0f32; NR], [0f32; NR]);
                let (csp, scp, bip) = if nc == NR {
                    let p = (ep.sums.as_ptr(), ep.scales.as_ptr(), ep.bias.as_ptr());
                    (p.0.add(j0), p.1.add(j0), p.2.add(j0))
                } else {
                    cs[..nc].copy_from_slice(&ep.sums[j0..j0 + nc]);
                    sc[..nc].copy_from_slice(&ep.scales[j0..j0 + nc]);
                    bi[..nc].copy_from_slice(&ep.bias[j0..j0 + nc]);
                    (cs.as_ptr(), sc.as_ptr(), bi.as_ptr())
                };
                let col = |h: usize| {
                    (
                        _mm256_mullo_epi32(
                            _mm256_loadu_si256(csp.add(8 * h) as *const __m256i),
                            c128,
                        ),
                        _mm256_loadu_ps(scp.add(8 * h)),
                        _mm256_loadu_ps(bip.add(8 * h)),
                    )
                };
                let cols = [col(0), col(1)];
                let w = packed.as_ptr().add(j0 * kp);
                for r0 in (0..prows).step_by(MR) {
                    let rows = MR.min(prows - r0);
                    let x = qx.as_ptr().add(r0 * kp);
                    // The row count is a constant in each build of the sums, so their
                    // loop over rows unrolls into straight code (with `rows` a variable,
                    // a test and branch per row took a fifth of the inner loop).
                    let s = match rows {
                        4 => $sums::<4>(x, kp, w),
                        3 => $sums::<3>(x, kp, w),
                        2 => $sums::<2>(x, kp, w),
                        _ => $sums::<1>(x, kp, w),
                    };
                    for (r, sr) in s.iter().enumerate().take(rows) {
                        let sx = _mm256_set1_ps(ep.sx[r0 + r]);
                        let out = |h: usize| {
                            let (cs, sc, b) = cols[h];
                            let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(sr[h], cs));
                            _mm256_add_ps(_mm256_mul_ps(v, _mm256_mul_ps(sx, sc)), b)
                        };
                        let yr = y.add((r0 + r) * ys + j0);
                        if nc == NR {
                            _mm256_storeu_ps(yr, out(0));
                            _mm256_storeu_ps(yr.add(8), out(1));
                        } else {
                            // A last block of fewer than NR columns: through a row buffer.
                            let mut tail = [0f32; NR];
                            _mm256_storeu_ps(tail.as_mut_ptr(), out(0));
                            _mm256_storeu_ps(tail.as_mut_ptr().add(8), out(1));
                            std::ptr::copy_nonoverlapping(tail.as_ptr(), yr, nc);
                        }
                    }
                }
            }
        }
    };
}

panel_kernel! {
    /// [`panel_kernel`] by AVX2 ([`avx2_sums`]).
    ///
    /// # Safety
    /// The CPU has AVX2; `qx` holds `ep.sx.len() · kp` bytes, `packed` every column block
    /// of `ep.sums.len()` columns, and `y` the panel's rows of `ys ≥ ep.sums.len()` floats.
    avx2_panel, "avx2", avx2_sums
}

panel_kernel! {
    /// [`panel_kernel`] by AVX-512 VNNI ([`vnni_sums`]); safety as [`avx2_panel`], and the
    /// CPU has AVX-512 VNNI and VL.
    vnni_panel, "avx2,avx512f,avx512vl,avx512vnni", vnni_sums
}

/// The integer sums of a block: `R` rows (`x`, row stride `kp`) by [`NR`] columns (`w`,
/// `NR · kp` bytes), two registers a row; rows `R..` are zeros.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn avx2_sums<const R: usize>(
    x: *const u8,
    kp: usize,
    w: *const i8,
) -> [[std::arch::x86_64::__m256i; 2]; MR] {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut s = [[_mm256_setzero_si256(); 2]; MR];
    for k4 in 0..kp / 4 {
        let w0 = _mm256_loadu_si256(w.add(k4 * NR * 4) as *const __m256i);
        let w1 = _mm256_loadu_si256(w.add(k4 * NR * 4 + 32) as *const __m256i);
        for (r, sr) in s.iter_mut().enumerate().take(R) {
            // Four activation bytes of row r, in every 32-bit lane.
            let xv = _mm256_set1_epi32((x.add(r * kp + k4 * 4) as *const i32).read_unaligned());
            let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(xv, w0), ones);
            let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(xv, w1), ones);
            sr[0] = _mm256_add_epi32(sr[0], p0);
            sr[1] = _mm256_add_epi32(sr[1], p1);
        }
    }
    s
}

/// [`avx2_sums`] by AVX-512 VNNI: `vpdpbusd` adds the four products of unsigned activation
/// bytes and signed weight bytes of each 32-bit lane into it, with no 16-bit step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
#[inline]
unsafe fn vnni_sums<const R: usize>(
    x: *const u8,
    kp: usize,
    w: *const i8,
) -> [[std::arch::x86_64::__m256i; 2]; MR] {
    use std::arch::x86_64::*;
    let mut s = [[_mm256_setzero_si256(); 2]; MR];
    for k4 in 0..kp / 4 {
        let w0 = _mm256_loadu_si256(w.add(k4 * NR * 4) as *const __m256i);
        let w1 = _mm256_loadu_si256(w.add(k4 * NR * 4 + 32) as *const __m256i);
        for (r, sr) in s.iter_mut().enumerate().take(R) {
            let xv = _mm256_set1_epi32((x.add(r * kp + k4 * 4) as *const i32).read_unaligned());
            sr[0] = _mm256_dpbusd_epi32(sr[0], xv, w0);
            sr[1] = _mm256_dpbusd_epi32(sr[1], xv, w1);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const FAST: [Kernel; 3] = [Kernel::Avx2, Kernel::Vnni, Kernel::Amx];

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
    }

    fn f32_linear(x: &[f32], m: usize, w: &[f32], out: usize, inp: usize, b: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; m * out];
        for i in 0..m {
            for j in 0..out {
                let d: f32 = (0..inp).map(|k| x[i * inp + k] * w[j * inp + k]).sum();
                y[i * out + j] = d + b[j];
            }
        }
        y
    }

    #[test]
    fn kernels_agree_bit_for_bit_and_track_f32_on_odd_shapes() {
        for (m, out, inp, seed) in [
            (1, 1, 1, 1),
            (5, 17, 13, 2),
            (9, 33, 64, 3),
            (37, 40, 385, 4),
        ] {
            let x = rand_vec(m * inp, seed);
            let w = rand_vec(out * inp, seed + 100);
            let b = rand_vec(out, seed + 200);
            let q = QWeight::quantize(&w, out, inp);
            let fast = linear_i8(&x, m, &q, Some(&b), true, Kernel::best());
            let portable = linear_i8(&x, m, &q, Some(&b), false, Kernel::Portable);
            assert_eq!(fast, portable, "{m}x{out}x{inp}");
            for k in FAST {
                if k.available() {
                    let y = linear_i8(&x, m, &q, Some(&b), true, k);
                    assert_eq!(y, portable, "{} {m}x{out}x{inp}", k.name());
                } else {
                    eprintln!("skipped: the {} kernel (this CPU lacks it)", k.name());
                }
            }
            let exact = f32_linear(&x, m, &w, out, inp, &b);
            // Error bound: each product errs by at most |x|·sw/2 + |w|·sx/2 (+ their
            // product), summed over inp terms.
            for (i, (a, e)) in fast.iter().zip(&exact).enumerate() {
                let bound = inp as f32 * (1.0 / W_MAX + 1.0 / X_MAX);
                assert!((a - e).abs() <= bound, "{m}x{out}x{inp} [{i}]: {a} vs {e}");
            }
            let rel: f32 = fast
                .iter()
                .zip(&exact)
                .map(|(a, e)| (a - e).abs())
                .sum::<f32>()
                / exact.iter().map(|e| e.abs()).sum::<f32>();
            if inp >= 64 {
                assert!(rel < 0.03, "{m}x{out}x{inp}: relative error {rel}");
            }
        }
    }

    #[test]
    fn extreme_values_do_not_saturate() {
        // Every activation at +127 (byte 255) and every weight at ±63: the largest pair
        // sums vpmaddubsw sees.
        let (m, out, inp) = (3, 18, 40);
        let x = vec![1.0f32; m * inp];
        let mut w = vec![1.0f32; out * inp];
        for v in w.iter_mut().skip(inp).take(inp) {
            *v = -1.0;
        }
        let q = QWeight::quantize(&w, out, inp);
        let y = linear_i8(&x, m, &q, None, false, Kernel::Portable);
        assert_eq!(y[0], inp as f32);
        assert_eq!(y[1], -(inp as f32));
        for k in FAST {
            if k.available() {
                assert_eq!(y, linear_i8(&x, m, &q, None, false, k), "{}", k.name());
            } else {
                eprintln!("skipped: the {} kernel (this CPU lacks it)", k.name());
            }
        }
    }

    #[test]
    fn quantizing_rows_agrees_between_kernels() {
        let (m, k) = (5, 77);
        let mut x = rand_vec(m * k, 11);
        x[3] = 0.5; // ties and extremes
        x[4] = -1.0;
        let rows = |fast: bool| {
            let (mut q, mut scales) = (vec![0u8; m * 80], vec![0f32; m]);
            quantize_into(&x, k, 80, &mut q, &mut scales, fast);
            (q, scales)
        };
        assert_eq!(rows(avx2()), rows(false));
    }

    #[test]
    fn packing_round_trips() {
        let w = rand_vec(19 * 7, 9);
        let q = QWeight::quantize(&w, 19, 7);
        let back = QWeight::from_quantized(q.unpacked(), q.scales.clone(), 19, 7);
        assert_eq!(back.packed, q.packed);
        assert_eq!(back.col_sums, q.col_sums);
        assert!(q.unpacked().iter().all(|&v| (v as f32).abs() <= W_MAX));
    }

    #[test]
    fn concatenating_equals_quantizing_the_concatenation() {
        let (a, b) = (rand_vec(5 * 9, 1), rand_vec(12 * 9, 2));
        let whole: Vec<f32> = a.iter().chain(&b).copied().collect();
        let cat = QWeight::concat(&[&QWeight::quantize(&a, 5, 9), &QWeight::quantize(&b, 12, 9)]);
        let direct = QWeight::quantize(&whole, 17, 9);
        assert_eq!(
            (cat.packed, cat.scales, cat.col_sums),
            (direct.packed, direct.scales, direct.col_sums)
        );
    }
}

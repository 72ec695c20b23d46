//! Vectorised element-wise kernels of the fused operations: exp, erf, the exact GELU and
//! its derivative, a softmax row.
//!
//! libm's `expf` and `erff` are scalar calls, so a loop over them runs one element at a
//! time (they were 7 % of a MiniLM training step). Here `exp` and `erf` are branch-free
//! polynomials the compiler vectorises, and each slice kernel is compiled three times: for
//! the baseline x86-64 the crate is built for, with AVX2 + FMA, and with AVX-512, picked at
//! run time (the `gemm` crate dispatches the same way); the lanes of every reduction are
//! fixed in the source, so all three give the same bits. Accuracy: `exp` within 2 ulp of libm (Cephes'
//! polynomial), `erf` within 5e-7 absolute (the rational approximation of Eigen); the tests
//! check both over their whole useful range.

/// Defines `fn $name(args)` running `$body` compiled for AVX2 + FMA when the CPU has
/// them, else for the baseline target. Rust never fuses a multiply and an add by itself, so
/// both versions compute the same results.
macro_rules! dispatch {
    ($(#[$m:meta])* $v:vis fn $name:ident($($a:ident: $t:ty),*) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $v fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            fn body($($a: $t),*) $(-> $r)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                unsafe fn avx512($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                if $crate::kernels::simd::avx512() {
                    // Safety: the CPU has the features `avx512` was compiled for.
                    return unsafe { avx512($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // Safety: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}
pub(crate) use dispatch;

/// True when the CPU has AVX-512 (F, BW, VL, DQ) and FMA: [`dispatch`] then runs the
/// 16-lane build (measured on a Sapphire Rapids: softmax and GELU were 18% of a bf16
/// MiniLM inference pass in their 8-lane build). `FERROTUNE_NO_AVX512=1` keeps the AVX2
/// build, for measurements.
#[cfg(target_arch = "x86_64")]
pub fn avx512() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("fma")
            && std::env::var_os("FERROTUNE_NO_AVX512").is_none()
    })
}

/// `e^x` (Cephes' `expf` polynomial; inputs below -88.4 give 0, above 88.4 saturate near
/// f32's largest value).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-88.376_26, 88.376_26);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    // n as an integer: adding 1.5·2²³ puts it in the low mantissa bits (exact for |n| < 2²²).
    // `n as i32` would be the same number, but its saturating conversion does not vectorise
    // (it was one scalar convert and two compares per element).
    let ni = (n + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
    // 2^n through the exponent bits (n >= -127 after the clamp; -127 gives 0).
    y * f32::from_bits(((ni + 127).max(0) as u32) << 23)
}

/// Σ of a slice, in 8 lanes (a plain `sum()` of floats stays scalar: the compiler may not
/// reorder the additions).
#[inline(always)]
pub fn sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    // The tail goes to the lanes its indices would have had in a longer row, so a row
    // with trailing zeros sums to exactly the same value: a prediction does not depend on
    // how far its batch is padded.
    for (a, x) in acc.iter_mut().zip(rest) {
        *a += x;
    }
    acc.iter().sum::<f32>()
}

/// Σ a·b, in 8 lanes.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    // The tail in its lanes, as in [`sum`]: trailing zeros change nothing.
    for ((a, x), y) in acc.iter_mut().zip(ra).zip(rb) {
        *a += x * y;
    }
    acc.iter().sum::<f32>()
}

/// The largest element (NEG_INFINITY for none; NaNs ignored), in 8 lanes.
#[inline(always)]
pub fn max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `erf(x)`, within 5e-7 absolute: the rational approximation Eigen and XLA vectorise,
/// `x·P(x²)/Q(x²)` on [-4, 4] (outside, erf is ±1 in f32).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const A: [f32; 7] = [
        -1.609_603_3e-2,
        -2.954_6e-3,
        -7.349_906_3e-4,
        -5.692_506_4e-5,
        -2.101_024_1e-6,
        2.770_681_4e-8,
        -2.726_142_3e-10,
    ];
    const B: [f32; 5] = [
        -1.426_473_9e-2,
        -7.373_329e-3,
        -1.682_827e-3,
        -2.133_740_5e-4,
        -1.456_607_2e-5,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = A[6];
    for &c in A[..6].iter().rev() {
        p = p * x2 + c;
    }
    let mut q = B[4];
    for &c in B[..4].iter().rev() {
        q = q * x2 + c;
    }
    x * p / q
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

dispatch! {
    /// `y = x·Φ(x)`, the exact GELU.
    pub fn gelu(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2));
        }
    }
}

dispatch! {
    /// `dx = dy·(Φ(x) + x·φ(x))`, the exact GELU's backward.
    pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
            *dx = dy * (cdf + x * FRAC_1_SQRT_2PI * exp(-0.5 * x * x));
        }
    }
}

dispatch! {
    /// In place, the softmax of every row of `n` elements of `y` after adding `bias` (`n`
    /// elements, or empty for none) to each row.
    pub fn softmax_rows(y: &mut [f32], bias: &[f32], n: usize) {
        for yr in y.chunks_mut(n) {
            if !bias.is_empty() {
                yr.iter_mut().zip(bias).for_each(|(y, &b)| *y += b);
            }
            let m = max(yr);
            yr.iter_mut().for_each(|y| *y = exp(*y - m));
            let inv = 1.0 / sum(yr);
            yr.iter_mut().for_each(|y| *y *= inv);
        }
    }
}

dispatch! {
    /// In place, `g ← y·(g - Σ g·y)` for every row of `n` elements: the softmax backward
    /// from its output `y` and upstream gradient `g`.
    pub fn softmax_rows_backward(y: &[f32], g: &mut [f32], n: usize) {
        for (yr, gr) in y.chunks(n).zip(g.chunks_mut(n)) {
            let d = dot(yr, gr);
            for (g, &y) in gr.iter_mut().zip(yr) {
                *g = y * (*g - d);
            }
        }
    }
}

dispatch! {
    /// Σ x², accumulated in f64 over 16 lanes (so the loop vectorises; the lanes are
    /// added in a fixed order, so the result does not depend on the CPU's vector width).
    pub fn sum_squares(v: &[f32]) -> f64 {
        let mut acc = [0f64; 16];
        let chunks = v.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            for i in 0..16 {
                acc[i] += c[i] as f64 * c[i] as f64;
            }
        }
        acc.iter().sum::<f64>() + rest.iter().map(|&x| x as f64 * x as f64).sum::<f64>()
    }
}

/// A 32-bit integer hash with full avalanche (Wellons' `lowbias32`).
#[inline(always)]
fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

dispatch! {
    /// Dropout multipliers: `out[i]` is 0 when the hash of `(keys, i)` falls below
    /// `threshold` (probability `threshold / 2³²`), else `scale`. A counter-based generator
    /// (the element's index, hashed twice under two key words): any element's draw is
    /// computed on its own, so the loop vectorises and a mask can be regenerated in the
    /// backward pass without storing it.
    pub fn dropout_keep(keys: (u32, u32), threshold: u32, scale: f32, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            let x = hash32(hash32((i as u32).wrapping_mul(0x9e37_79b9) ^ keys.0) ^ keys.1);
            *o = if x < threshold { 0.0 } else { scale };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep() -> impl Iterator<Item = f32> {
        (-200_000..=200_000).map(|i| i as f32 * 1e-4)
    }

    #[test]
    fn exp_is_within_2_ulp_of_libm() {
        for x in (-87_000..=88_000)
            .map(|i| i as f32 * 1e-3)
            .chain([0.0, -0.0, 1e-30])
        {
            let (a, b) = (exp(x), x.exp());
            let ulp = (b.to_bits() as i64 - a.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {a}, libm {b}");
        }
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn sum_squares_matches_a_plain_sum() {
        for n in [0usize, 1, 15, 16, 17, 1000, 100_003] {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 31) % 103) as f32 * 0.1 - 5.0)
                .collect();
            let want: f64 = v.iter().map(|&x| x as f64 * x as f64).sum();
            let got = sum_squares(&v);
            assert!(
                (got - want).abs() <= 1e-12 * want.max(1.0),
                "n={n}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn erf_is_within_tolerance() {
        for x in sweep() {
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            assert!((erf(x) as f64 - want).abs() < 5e-7, "erf({x})");
        }
        assert_eq!(erf(0.0), 0.0);
        assert!((erf(10.0) - 1.0).abs() < 5e-7 && (erf(-1e30) + 1.0).abs() < 5e-7);
    }

    #[test]
    fn reductions_match_the_plain_ones() {
        for n in [0, 1, 7, 8, 9, 31, 130] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7919) % 113) as f32 - 50.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 31) % 17) as f32).collect();
            // Integers: exact in any order.
            assert_eq!(sum(&a), a.iter().sum::<f32>());
            assert_eq!(
                dot(&a, &b),
                a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
            );
            assert_eq!(max(&a), a.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)));
        }
    }

    #[test]
    fn kernels_match_their_scalar_definitions() {
        let x: Vec<f32> = sweep().step_by(7).collect();
        let dy: Vec<f32> = x.iter().map(|v| (v * 3.7).sin()).collect();
        let mut y = vec![0f32; x.len()];
        gelu(&x, &mut y);
        let mut dx = vec![0f32; x.len()];
        gelu_backward(&x, &dy, &mut dx);
        for i in 0..x.len() {
            let v = x[i] as f64;
            let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(v / 2f64.sqrt()));
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            assert!(
                (y[i] as f64 - v * cdf).abs() < 1e-6 * (1.0 + v.abs()),
                "gelu({v})"
            );
            let want = dy[i] as f64 * (cdf + v * pdf);
            assert!(
                (dx[i] as f64 - want).abs() < 1e-6 * (1.0 + v.abs()),
                "gelu'({v})"
            );
        }
        // Softmax rows of 5 with a bias masking the last element.
        let n = 5;
        let x: Vec<f32> = (0..35).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let bias = [0.0, 0.0, 0.0, 0.0, f32::MIN];
        let mut p = x.clone();
        softmax_rows(&mut p, &bias, n);
        for (xr, pr) in x.chunks(n).zip(p.chunks(n)) {
            let z: f64 = xr[..4].iter().map(|&v| (v as f64).exp()).sum();
            for k in 0..4 {
                assert!((pr[k] as f64 - (xr[k] as f64).exp() / z).abs() < 1e-6);
            }
            assert_eq!(pr[4], 0.0);
        }
    }
}

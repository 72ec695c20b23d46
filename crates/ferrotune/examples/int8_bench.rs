//! The int8 linear layer against the f32 one on the shapes of MiniLM-L6 (16×128 tokens)
//! and bert-base (8×128), median of 7 runs each, on all threads (`RAYON_NUM_THREADS=1`:
//! one), with the int8 kernel's best run in GOP/s (two operations a multiply-add).
//! `cargo run --release -p ferrotune --example int8_bench`

use std::time::Instant;

use candle_core::{Device, Tensor};
use ferrotune::kernels::{int8, linear};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// GOP/s of the AVX2 kernel's instruction sequence alone on one core (`vpmaddubsw`,
/// `vpmaddwd`, `vpaddd` on registers, four independent sums, 64 operations a sequence):
/// the ceiling the AVX2 int8 GEMM can approach; the best of 7 runs. `None` without AVX2.
#[cfg(target_arch = "x86_64")]
fn avx2_ceiling() -> Option<f64> {
    if !std::arch::is_x86_feature_detected!("avx2") {
        return None;
    }
    const N: u64 = 20_000_000;
    let mut best = f64::INFINITY;
    for _ in 0..7 {
        let t = Instant::now();
        let n = N;
        // Safety: AVX2 checked above; the loop touches registers only.
        unsafe {
            std::arch::asm!(
                "vpcmpeqw ymm15, ymm15, ymm15",
                "2:",
                "vpmaddubsw ymm1, ymm13, ymm14", "vpmaddwd ymm1, ymm1, ymm15", "vpaddd ymm2, ymm2, ymm1",
                "vpmaddubsw ymm3, ymm12, ymm14", "vpmaddwd ymm3, ymm3, ymm15", "vpaddd ymm4, ymm4, ymm3",
                "vpmaddubsw ymm5, ymm11, ymm14", "vpmaddwd ymm5, ymm5, ymm15", "vpaddd ymm6, ymm6, ymm5",
                "vpmaddubsw ymm7, ymm10, ymm14", "vpmaddwd ymm7, ymm7, ymm15", "vpaddd ymm8, ymm8, ymm7",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) n => _,
                out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _, out("ymm5") _,
                out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm15") _,
                options(nomem, nostack),
            );
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    Some((N * 4 * 64) as f64 / best / 1e9)
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_ceiling() -> Option<f64> {
    None
}

fn main() -> ferrotune::Result<()> {
    let threads = ferrotune::num_threads();
    println!("int8 kernel: {}, {threads} threads", int8::kernel_name());
    if let Some(g) = avx2_ceiling() {
        println!("AVX2 instruction-sequence ceiling, one core: {g:.0} GOP/s");
    }
    println!(
        "| m | out | in | f32 ms | int8 ms (incl. quantizing x) | int8 / f32 | int8 best GOP/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    let shapes = [
        (2048, 1152, 384),
        (2048, 384, 384),
        (2048, 1536, 384),
        (2048, 384, 1536),
        (1024, 2304, 768),
        (1024, 768, 768),
        (1024, 3072, 768),
        (1024, 768, 3072),
    ];
    let dev = Device::Cpu;
    for (m, out, inp) in shapes {
        let x = Tensor::randn(0f32, 1.0, (m, inp), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (out, inp), &dev)?;
        let b = Tensor::randn(0f32, 0.05, out, &dev)?;
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let wv: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let bv: Vec<f32> = b.to_vec1()?;
        let q = int8::QWeight::quantize(&wv, out, inp);
        let mut tf = Vec::new();
        let mut ti = Vec::new();
        for _ in 0..7 {
            let t = Instant::now();
            let y = linear::linear(&x, &w, &b)?;
            std::hint::black_box(y);
            tf.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            let y = int8::linear_i8(&xv, m, &q, Some(&bv), true, int8::Kernel::best());
            std::hint::black_box(y);
            ti.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let best = ti.iter().copied().fold(f64::INFINITY, f64::min);
        let gops = 2.0 * (m * out * inp) as f64 / best / 1e6;
        let (f, i) = (median(tf), median(ti));
        println!(
            "| {m} | {out} | {inp} | {f:.2} | {i:.2} | {:.2} | {gops:.0} |",
            i / f
        );
    }
    Ok(())
}

//! The int8 linear layer against the f32 one on the shapes of MiniLM-L6 (16×128 tokens)
//! and bert-base (8×128), median of 7 runs each, on all threads (`RAYON_NUM_THREADS=1`:
//! one), with the picked int8 kernel's median and every kernel's best run in GOP/s (two
//! operations a multiply-add; the kernels' runs interleaved). On AVX2 it first prints the
//! instruction sequences' ceilings on one core and, from them, the least time the linear
//! layers of a MiniLM-L6 and a bert-base inference pass can take on this CPU.
//! `cargo run --release -p ferrotune --example int8_bench`

use std::time::Instant;

use candle_core::{Device, Tensor};
use ferrotune::bench::Preset;
use ferrotune::kernels::{int8, linear};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Loop count of each instruction-sequence timing.
#[cfg(target_arch = "x86_64")]
const N: u64 = 20_000_000;

/// Seconds that [`N`] runs of the AVX2 loop body `$body` (registers only; `ymm15` holds
/// all ones, `ymm0`-`ymm8` are free) take. The caller checks AVX2.
#[cfg(target_arch = "x86_64")]
macro_rules! time_loop {
    ($($body:literal),+ $(,)?) => {{
        let t = Instant::now();
        let n = N;
        // Safety: the caller checked AVX2; the loop touches registers only.
        unsafe {
            std::arch::asm!(
                "vpcmpeqw ymm15, ymm15, ymm15",
                "2:",
                $($body,)+
                "dec {n}",
                "jnz 2b",
                n = inout(reg) n => _,
                out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _, out("ymm4") _,
                out("ymm5") _, out("ymm6") _, out("ymm7") _, out("ymm8") _, out("ymm15") _,
                options(nomem, nostack),
            );
        }
        t.elapsed().as_secs_f64()
    }};
}

/// GOP/s of AVX2 int8 instruction sequences alone on one core, on registers, four
/// independent sums, the best of 7 runs: the `avx2` kernel's (`vpmaddubsw`, `vpmaddwd`,
/// `vpaddd`: 64 operations a sequence), the ceiling it can approach, and that of 7-bit
/// activations (two `vpmaddubsw` added by `vpaddw`, then `vpmaddwd`, `vpaddd`: 128
/// operations; tried and not kept, docs/RESULTS.md, "7-bit activations on AVX2").
/// `None` without AVX2.
#[cfg(target_arch = "x86_64")]
fn avx2_ceilings() -> Option<(f64, f64)> {
    if !std::arch::is_x86_feature_detected!("avx2") {
        return None;
    }
    let (mut best8, mut best7) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..7 {
        best8 = best8.min(time_loop!(
            "vpmaddubsw ymm1, ymm13, ymm14",
            "vpmaddwd ymm1, ymm1, ymm15",
            "vpaddd ymm2, ymm2, ymm1",
            "vpmaddubsw ymm3, ymm12, ymm14",
            "vpmaddwd ymm3, ymm3, ymm15",
            "vpaddd ymm4, ymm4, ymm3",
            "vpmaddubsw ymm5, ymm11, ymm14",
            "vpmaddwd ymm5, ymm5, ymm15",
            "vpaddd ymm6, ymm6, ymm5",
            "vpmaddubsw ymm7, ymm10, ymm14",
            "vpmaddwd ymm7, ymm7, ymm15",
            "vpaddd ymm8, ymm8, ymm7",
        ));
        best7 = best7.min(time_loop!(
            "vpmaddubsw ymm1, ymm13, ymm14",
            "vpmaddubsw ymm0, ymm13, ymm9",
            "vpaddw ymm1, ymm1, ymm0",
            "vpmaddwd ymm1, ymm1, ymm15",
            "vpaddd ymm2, ymm2, ymm1",
            "vpmaddubsw ymm3, ymm12, ymm14",
            "vpmaddubsw ymm0, ymm12, ymm9",
            "vpaddw ymm3, ymm3, ymm0",
            "vpmaddwd ymm3, ymm3, ymm15",
            "vpaddd ymm4, ymm4, ymm3",
            "vpmaddubsw ymm5, ymm11, ymm14",
            "vpmaddubsw ymm0, ymm11, ymm9",
            "vpaddw ymm5, ymm5, ymm0",
            "vpmaddwd ymm5, ymm5, ymm15",
            "vpaddd ymm6, ymm6, ymm5",
            "vpmaddubsw ymm7, ymm10, ymm14",
            "vpmaddubsw ymm0, ymm10, ymm9",
            "vpaddw ymm7, ymm7, ymm0",
            "vpmaddwd ymm7, ymm7, ymm15",
            "vpaddd ymm8, ymm8, ymm7",
        ));
    }
    let ops = (N * 4 * 64) as f64 / 1e9;
    Some((ops / best8, 2.0 * ops / best7))
}

/// GOP of the linear layers of one inference pass of `preset` (`batch` sequences of `seq`
/// tokens) as ferrotune runs it: every token through every layer but the last, whose
/// attention output, output projection and feed-forward run for the `[CLS]` row of each
/// sequence only (the classifier reads nothing else); its Q, K, V projection runs for
/// every token (the keys and values). [`ferrotune::bench::forward_flops`] counts every
/// layer whole, attention's products included.
fn pass_gop(preset: &str, batch: usize, seq: usize) -> ferrotune::Result<f64> {
    let p: Preset = preset.parse().map_err(ferrotune::Error::Msg)?;
    let (h, i, layers) = (p.shape.hidden, p.shape.intermediate, p.shape.layers);
    let qkv = 3 * h * h;
    let rest = h * h + 2 * h * i;
    let macs = batch * seq * (layers * qkv + (layers - 1) * rest) + batch * rest;
    Ok(2.0 * macs as f64 / 1e9)
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_ceilings() -> Option<(f64, f64)> {
    None
}

fn main() -> ferrotune::Result<()> {
    let threads = ferrotune::num_threads();
    println!("int8 kernel: {}, {threads} threads", int8::kernel_name());
    if let Some((g8, g7)) = avx2_ceilings() {
        println!(
            "AVX2 instruction-sequence ceilings, one core: {g8:.0} GOP/s (8-bit activations), \
             {g7:.0} GOP/s (7-bit)"
        );
        // The least time a whole int8 pass can take with these instructions: its linear
        // layers alone at the ceiling on every thread (perfect scaling; attention, softmax,
        // GELU, norms and quantizing free). Against PyTorch's best time of the same pass
        // (`bench/step-side-by-side --int8 --infer-only`) it bounds the ratio from below.
        for (name, batch) in [("minilm-l6", 16), ("bert-base", 8)] {
            let gop = pass_gop(name, batch, 128)?;
            let cores = threads as f64;
            println!(
                "{name} {batch}x128 inference pass: linear layers {gop:.1} GOP, at least {:.0} ms \
                 (8-bit) / {:.0} ms (7-bit) on {threads} cores at those ceilings",
                gop / (g8 * cores) * 1e3,
                gop / (g7 * cores) * 1e3
            );
        }
    }
    // Every kernel this CPU has but the portable one, interleaved run by run so that the
    // VM's drifts hit them alike.
    let kernels: Vec<int8::Kernel> = int8::Kernel::ALL
        .into_iter()
        .filter(|k| k.available() && *k != int8::Kernel::Portable)
        .collect();
    let names: Vec<&str> = kernels.iter().map(|k| k.name()).collect();
    println!(
        "| m | out | in | f32 ms | int8 ms (incl. quantizing x) | int8 / f32 | best GOP/s: {} |",
        names.join(" / ")
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
        let mut ti = vec![Vec::new(); kernels.len()];
        for _ in 0..7 {
            let t = Instant::now();
            let y = linear::linear(&x, &w, &b)?;
            std::hint::black_box(y);
            tf.push(t.elapsed().as_secs_f64() * 1e3);
            for (k, t) in kernels.iter().zip(ti.iter_mut()) {
                let t0 = Instant::now();
                let y = int8::linear_i8(&xv, m, &q, Some(&bv), true, *k);
                std::hint::black_box(y);
                t.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        let gops: Vec<String> = ti
            .iter()
            .map(|t| {
                let best = t.iter().copied().fold(f64::INFINITY, f64::min);
                format!("{:.0}", 2.0 * (m * out * inp) as f64 / best / 1e6)
            })
            .collect();
        let pick = kernels.iter().position(|k| *k == int8::Kernel::best());
        let (f, i) = (median(tf), pick.map_or(f64::NAN, |p| median(ti[p].clone())));
        println!(
            "| {m} | {out} | {inp} | {f:.2} | {i:.2} | {:.2} | {} |",
            i / f,
            gops.join(" / ")
        );
    }
    Ok(())
}

//! Times the gradient norm and one AdamW update over bert-base-sized buffers (108 M
//! parameters in bert-base's tensor sizes), the part of a training step after the backward
//! pass. `cargo run --release --example optimizer_bench [THREADS]`; prints the median of 8.

use std::time::Instant;

use candle_core::{Device, Var};
use ferrotune::nn::{Param, ParamStore};
use ferrotune::optim::{clip_factor, grad_norm, AdamW, AdamWConfig};

fn main() {
    let threads = std::env::args().nth(1).unwrap_or_else(|| "2".into());
    std::env::set_var("RAYON_NUM_THREADS", threads);
    let mut sizes = vec![30522 * 768, 512 * 768];
    for _ in 0..12 {
        sizes.extend([
            768 * 2304,
            2304,
            768 * 768,
            768,
            768 * 3072,
            3072,
            3072 * 768,
        ]);
        sizes.extend([768; 5]);
    }
    let mut store = ParamStore::default();
    let mut grads = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let w: Vec<f32> = (0..n)
            .map(|k| ((k * 7919 + i) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        grads.push(Some(w.iter().map(|x| x * 0.01).collect::<Vec<f32>>()));
        let var = Var::from_vec(w, n, &Device::Cpu).expect("a CPU tensor");
        store.params.push(Param {
            name: format!("p{i}"),
            var,
            group: 0,
            no_decay: false,
        });
    }
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut opt = AdamW::new(cfg, sizes.len());
    let lrs = vec![1e-5; sizes.len()];
    let (mut norm_ms, mut adamw_ms) = (Vec::new(), Vec::new());
    for _ in 0..8 {
        let t = Instant::now();
        let norm = grad_norm(&grads);
        norm_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        opt.step(&store, &grads, clip_factor(norm, 1.0), &lrs)
            .expect("an update");
        adamw_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    norm_ms.sort_by(f64::total_cmp);
    adamw_ms.sort_by(f64::total_cmp);
    println!(
        "{} parameters: gradient norm {:.1} ms, AdamW update {:.1} ms (median of 8)",
        sizes.iter().sum::<usize>(),
        norm_ms[4],
        adamw_ms[4]
    );
}

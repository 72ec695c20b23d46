//! `ferrotune bench`: time one training step or one inference pass of a randomly
//! initialised model of a known shape (any family), the same code the trainer runs.
//!
//! The result is the median and minimum over the timed steps (after 2 warm-up steps), the
//! achieved GFLOP/s (the model's multiply-adds counted as 2 FLOPs, training = 3× the
//! forward pass) and the process's peak resident memory.

use std::time::Instant;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::families::{Family, HeadSpec, HfConfig, ModelShape, FAMILIES};
use crate::loss::{LossConfig, Targets};
use crate::nn::{Batch, Ctx, TokenBatch, Weights};
use crate::optim::{clip_factor, grad_norm, AdamW, AdamWConfig};
use crate::train::step::loss_and_grads_into;

/// A named model shape of some family (`minilm-l6`, `bert-base`, `mpnet-base`, ...):
/// each family lists its own ([`crate::families::Family::presets`]).
#[derive(Clone, Copy)]
pub struct Preset {
    /// Its name.
    pub name: &'static str,
    /// The family.
    pub family: &'static dyn Family,
    /// The shape.
    pub shape: ModelShape,
}

impl std::fmt::Debug for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.family.model_type())
    }
}

/// Every family's presets.
pub fn presets() -> Vec<Preset> {
    FAMILIES
        .iter()
        .flat_map(|&family| {
            family.presets().iter().map(move |&(name, shape)| Preset {
                name,
                family,
                shape,
            })
        })
        .collect()
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let all = presets();
        all.iter().find(|p| p.name == s).copied().ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|p| p.name).collect();
            format!("unknown preset `{s}` (expected {})", names.join(", "))
        })
    }
}

/// What to time.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// The shape.
    pub preset: Preset,
    /// Training step (forward, loss, backward, clipping, AdamW) or inference (forward).
    pub train: bool,
    /// Sequences per batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Timed steps (after 2 warm-up steps).
    pub steps: usize,
    /// `auto`, `f32`, `bf16` or `int8` (inference), as [`crate::precision`] decides.
    pub precision: String,
}

/// Timings of a benchmark.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    /// Median step time.
    pub median_ms: f64,
    /// Fastest step.
    pub min_ms: f64,
    /// FLOPs of one step / median time.
    pub gflops: f64,
    /// Peak resident memory of the process.
    pub peak_rss_mb: f64,
    /// Threads the kernels used.
    pub threads: usize,
    /// `"release"` or `"debug"` ([`crate::BUILD_PROFILE`]): a debug build's timings are
    /// not ferrotune's speed.
    pub build: &'static str,
}

/// FLOPs of one forward pass: 2 per multiply-add of the linear layers and of attention's
/// two batched products (embeddings and element-wise work not counted).
pub fn forward_flops(preset: &Preset, batch: usize, seq: usize) -> f64 {
    let s = preset.shape;
    let (h, l, i) = (s.hidden, s.layers, s.intermediate);
    let tokens = (batch * seq) as f64;
    let (h, i, s) = (h as f64, i as f64, seq as f64);
    let linear = 2.0 * tokens * (4.0 * h * h + 2.0 * h * i);
    let attention = 2.0 * 2.0 * batch as f64 * s * s * h;
    l as f64 * (linear + attention)
}

/// Peak resident set size of this process, in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Runs the benchmark, calling `on_step(i, ms)` after each step (warm-up included).
pub fn run(spec: &BenchSpec, mut on_step: impl FnMut(usize, f64)) -> Result<BenchResult> {
    use crate::precision::{for_inference, for_training, Precision};
    let requested = Precision::parse(&spec.precision).ok_or_else(|| {
        Error::Config(format!(
            "precision `{}`: expected auto, f32, bf16 or int8",
            spec.precision
        ))
    })?;
    let (precision, _) = if spec.train {
        for_training(requested)?
    } else {
        for_inference(requested, false, true)?
    };
    if spec.batch == 0 || spec.seq < 2 || spec.steps == 0 || spec.seq > 512 {
        return Err(Error::Config(
            "bench: batch >= 1, 2 <= seq <= 512 and steps >= 1 are required".into(),
        ));
    }
    let family = spec.preset.family;
    let serde_json::Value::Object(json) = family.config_json(&spec.preset.shape) else {
        return Err(Error::Msg(
            "bench: a family's config is not an object".into(),
        ));
    };
    let cfg = HfConfig::from_object(json, std::path::Path::new("(bench preset)"))?;
    let device = crate::nn::device();
    let loaded = family.build(&cfg, &Weights::Random, &HeadSpec::new(2), 0, &device)?;
    let (model, params) = (loaded.model, loaded.params);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let n = spec.batch * spec.seq;
    let ids: Vec<u32> = (0..n).map(|_| rng.random_range(1000..30000)).collect();
    let batch = Batch::Tokens(TokenBatch {
        input_ids: Tensor::from_vec(ids, (spec.batch, spec.seq), &device)?,
        token_type_ids: Tensor::zeros((spec.batch, spec.seq), candle_core::DType::U32, &device)?,
        attention_mask: Tensor::ones((spec.batch, spec.seq), candle_core::DType::F32, &device)?,
    });
    let y: Vec<u32> = (0..spec.batch).map(|k| (k % 2) as u32).collect();
    let targets = Targets::Classes(Tensor::from_vec(y, spec.batch, &device)?);
    let loss = LossConfig::default();
    let frozen = vec![false; params.num_groups()];
    let mut opt = AdamW::new(
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        },
        params.params.len(),
    );
    let lrs = vec![1e-5; params.params.len()];
    let mut times = Vec::new();
    let mut grads: Vec<Option<Vec<f32>>> = vec![None; params.params.len()];
    for step in 0..spec.steps + 2 {
        let t0 = Instant::now();
        if spec.train {
            let ctx = Ctx {
                train: true,
                frozen: &frozen,
                rng: Some(&mut rng),
                int8: false,
                bf16: precision == Precision::Bf16,
                row0: 0,
                tokens: (0, 0),
                freeze_bn: false,
            };
            // As the trainer: gradient buffers kept from step to step.
            loss_and_grads_into(
                model.as_ref(),
                &params,
                &batch,
                &targets,
                &loss,
                1.0,
                ctx,
                &mut grads,
                false,
            )?;
            let clip = clip_factor(grad_norm(&grads), 1.0);
            opt.step(&params, &grads, clip, &lrs)?;
        } else {
            let mut ctx = Ctx::eval_with(precision);
            let logits = model.forward(&mut ctx, &batch)?;
            logits.to_vec2::<f32>()?;
        }
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        on_step(step, ms);
        if step >= 2 {
            times.push(ms);
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = if times.len() % 2 == 1 {
        times[times.len() / 2]
    } else {
        (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0
    };
    let flops =
        forward_flops(&spec.preset, spec.batch, spec.seq) * if spec.train { 3.0 } else { 1.0 };
    Ok(BenchResult {
        median_ms: median,
        min_ms: times[0],
        gflops: flops / (median / 1000.0) / 1e9,
        peak_rss_mb: peak_rss_mb(),
        threads: candle_core::utils::get_num_threads(),
        build: crate::BUILD_PROFILE,
    })
}

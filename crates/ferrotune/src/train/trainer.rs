//! The training loop: data → tokens → batches → forward → loss → backward → clip → AdamW →
//! schedule, with an evaluation after every epoch and the best epoch exported.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::config::TrainConfig;
use crate::data::batch::{make_batch, pad_id, tokenize, Features};
use crate::data::labels::LabelMap;
use crate::data::reader::{read_examples, Example, ReaderOptions};
use crate::data::split::stratified_split;
use crate::error::{Error, Result};
use crate::eval::metrics::classification_report;
use crate::export::{export_model, ExportSpec};
use crate::models::bert::{BertClassifier, Weights};
use crate::models::tokenizer::load_tokenizer;
use crate::models::{Batch, Ctx, HfConfig, ParamStore};
use crate::predict::{infer_logits, ExportInfo};
use crate::train::loss::cross_entropy;
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::train::schedule::{warmup_from_ratio, LrSchedule};

/// What the trainer reports as it goes. The library prints nothing itself; the CLI shows
/// progress bars and prints the messages.
pub trait Progress {
    /// A phase with `total` examples starts (`"train epoch 1/3"`, `"eval epoch 1"`).
    fn start(&mut self, _name: &str, _total: u64) {}
    /// `n` more examples done.
    fn advance(&mut self, _n: u64) {}
    /// The phase is over.
    fn finish(&mut self) {}
    /// A line for the user (the per-epoch results, notes).
    fn message(&mut self, _msg: &str) {}
}

/// Progress that reports nothing.
pub struct Silent;
impl Progress for Silent {}

/// Evaluation results of one epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean cross-entropy on the evaluation set.
    pub eval_loss: f64,
    /// Accuracy.
    pub eval_accuracy: f64,
    /// Macro-averaged F1.
    pub eval_macro_f1: f64,
}

impl EpochMetrics {
    fn get(&self, name: &str) -> f64 {
        match name {
            "loss" => self.eval_loss,
            "macro_f1" => self.eval_macro_f1,
            _ => self.eval_accuracy,
        }
    }
}

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Per-epoch evaluation results.
    pub epochs: Vec<EpochMetrics>,
    /// The epoch whose weights were exported.
    pub best_epoch: usize,
    /// Where the model was exported.
    pub model_dir: PathBuf,
    /// Seconds spent in training steps (evaluation excluded).
    pub train_seconds: f64,
}

/// Everything loaded and prepared before the first step.
pub struct Prepared {
    /// The resolved recipe.
    pub cfg: TrainConfig,
    /// The pretrained model's configuration.
    pub hf: HfConfig,
    /// The model.
    pub model: BertClassifier,
    /// Its parameters.
    pub params: ParamStore,
    /// The tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
    /// The label set of the training data.
    pub labels: LabelMap,
    /// Tokenized training examples and their label ids.
    pub train: (Vec<Features>, Vec<u32>),
    /// Tokenized evaluation examples and their label ids.
    pub eval: (Vec<Features>, Vec<u32>),
    /// Padding id.
    pub pad: u32,
    /// Notes for the user (new head, ...).
    pub notes: Vec<String>,
}

fn reader_options(cfg: &TrainConfig) -> ReaderOptions {
    ReaderOptions {
        text_column: cfg.text_column.clone(),
        text_pair_column: cfg.text_pair_column.clone(),
        label_column: Some(cfg.label_column.clone()),
        encoding_errors: cfg.encoding_errors,
    }
}

/// Writes `split.json`: the example ids of each side of a `validation_split`, so that the
/// split can be reused elsewhere (the PyTorch comparison script reads it).
fn write_split(path: &Path, cfg: &TrainConfig, train: &[Example], eval: &[Example]) -> Result<()> {
    let v = json!({
        "seed": cfg.seed,
        "validation_split": cfg.validation_split,
        "train_file": cfg.train_file,
        "train": train.iter().map(|e| &e.id).collect::<Vec<_>>(),
        "eval": eval.iter().map(|e| &e.id).collect::<Vec<_>>(),
    });
    std::fs::write(path, v.to_string()).map_err(|e| Error::io(path, e))
}

/// Checks that `dir` can be created and written, before anything slow happens.
pub fn ensure_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let probe = dir.join(".ferrotune-write-test");
    std::fs::write(&probe, b"ok").map_err(|e| Error::io(dir, e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Reads the data and the model, tokenizes: everything up to the first training step.
/// Data errors come before the model is loaded.
pub fn prepare(cfg: &TrainConfig, device: &Device) -> Result<Prepared> {
    ensure_writable(&cfg.output_dir)?;
    let opts = reader_options(cfg);
    let all_train = read_examples(&cfg.train_file, &opts)?;
    let (mut train, mut eval, eval_path) = match &cfg.validation_file {
        Some(vf) => (all_train, read_examples(vf, &opts)?, vf.clone()),
        None => {
            let frac = cfg.validation_split.unwrap_or(0.2);
            let label_of = |e: &Example| match &e.label {
                Some(crate::data::reader::RawLabel::Text(t)) => t.clone(),
                Some(crate::data::reader::RawLabel::List(l)) => l.join(","),
                None => String::new(),
            };
            let (t, e) = stratified_split(all_train, label_of, frac, cfg.seed);
            write_split(&cfg.output_dir.join("split.json"), cfg, &t, &e)?;
            (t, e, cfg.train_file.clone())
        }
    };
    if let Some(n) = cfg.max_train_samples {
        train.truncate(n);
    }
    if let Some(n) = cfg.max_eval_samples {
        eval.truncate(n);
    }
    if train.is_empty() {
        return Err(Error::file(&cfg.train_file, "no training examples"));
    }
    if eval.is_empty() {
        return Err(Error::file(&eval_path, "no evaluation examples"));
    }
    let labels = LabelMap::from_examples(&train, &cfg.train_file)?;
    let encode = |ex: &[Example], path: &Path| -> Result<Vec<u32>> {
        ex.iter()
            .map(|e| Ok(labels.encode(e, path, &cfg.label_column)? as u32))
            .collect()
    };
    let train_y = encode(&train, &cfg.train_file)?;
    let eval_y = encode(&eval, &eval_path)?;

    let hf = HfConfig::from_dir(&cfg.model_name_or_path)?;
    if cfg.max_seq_length > hf.max_position_embeddings {
        return Err(Error::Config(format!(
            "`max_seq_length` {} exceeds the model's max_position_embeddings {}",
            cfg.max_seq_length, hf.max_position_embeddings
        )));
    }
    let st = cfg.model_name_or_path.join("model.safetensors");
    if !st.exists() {
        return Err(Error::file(
            &cfg.model_name_or_path,
            "no model.safetensors in the model directory",
        ));
    }
    let tokenizer = load_tokenizer(&cfg.model_name_or_path, cfg.max_seq_length)?;
    let loaded = BertClassifier::load(
        &hf,
        Weights::Safetensors(&st),
        labels.len(),
        cfg.pooling,
        cfg.seed,
        device,
    )?;
    let mut model = loaded.model;
    model.set_dropout(
        cfg.hidden_dropout_prob,
        cfg.attention_probs_dropout_prob,
        cfg.classifier_dropout,
    );
    let mut notes = Vec::new();
    if loaded.new_pooler {
        notes.push("the pooler is newly initialised (not in the checkpoint)".to_string());
    }
    if loaded.new_head {
        notes.push(format!(
            "a new classifier head for {} labels is initialised",
            labels.len()
        ));
    }
    let pad = pad_id(&tokenizer);
    let train_f = tokenize(&tokenizer, &train)?;
    let eval_f = tokenize(&tokenizer, &eval)?;
    Ok(Prepared {
        cfg: cfg.clone(),
        hf,
        model,
        params: loaded.params,
        tokenizer,
        labels,
        train: (train_f, train_y),
        eval: (eval_f, eval_y),
        pad,
        notes,
    })
}

/// Forward, loss and backward on one batch. Returns the loss and, for each parameter, its
/// flattened gradient (`None` for a frozen parameter, which gets none).
pub fn loss_and_grads(
    model: &BertClassifier,
    params: &ParamStore,
    batch: &Batch,
    targets: &Tensor,
    frozen: &[bool],
    rng: &mut ChaCha8Rng,
) -> Result<(f32, Vec<Option<Vec<f32>>>)> {
    let mut ctx = Ctx {
        train: true,
        frozen,
        rng: Some(rng),
    };
    let logits = model.forward(&mut ctx, batch)?;
    let loss = cross_entropy(&logits, targets)?;
    let grads = loss.backward()?;
    let mut out = Vec::with_capacity(params.params.len());
    for p in &params.params {
        let g = if frozen.get(p.group).copied().unwrap_or(false) {
            None
        } else {
            match grads.get(p.var.as_tensor()) {
                Some(g) => Some(g.flatten_all()?.to_vec1::<f32>()?),
                None => None,
            }
        };
        out.push(g);
    }
    Ok((loss.to_scalar::<f32>()?, out))
}

/// Evaluates the model on tokenized examples: mean cross-entropy, accuracy, macro-F1.
pub fn evaluate(
    model: &BertClassifier,
    (feats, labels): (&[Features], &[u32]),
    num_labels: usize,
    batch_size: usize,
    pad: u32,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<(f64, Vec<usize>, crate::eval::metrics::ClassificationReport)> {
    let logits = infer_logits(model, feats, batch_size, pad, device, |n| {
        progress.advance(n as u64)
    })?;
    let mut loss = 0.0;
    let mut preds = Vec::with_capacity(logits.len());
    for (row, &y) in logits.iter().zip(labels) {
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = row
            .iter()
            .map(|&z| (z as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        loss += lse - row[y as usize] as f64;
        let (best, _) = row
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |acc, (i, &z)| if z > acc.1 { (i, z) } else { acc },
            );
        preds.push(best);
    }
    let n = logits.len().max(1) as f64;
    let y: Vec<usize> = labels.iter().map(|&l| l as usize).collect();
    let report = classification_report(&preds, &y, num_labels);
    Ok((loss / n, preds, report))
}

struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    fn create(path: PathBuf) -> Result<Self> {
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog { file, path })
    }
    fn line(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}")
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Runs the whole recipe: prepare, train with evaluation after every epoch, export the best
/// epoch to `output_dir/model`.
pub fn train(cfg: &TrainConfig, progress: &mut dyn Progress) -> Result<TrainSummary> {
    let device = Device::Cpu;
    let prep = prepare(cfg, &device)?;
    for n in &prep.notes {
        progress.message(&format!("note: {n}"));
    }
    run(prep, &device, progress)
}

/// Trains a prepared run.
pub fn run(prep: Prepared, device: &Device, progress: &mut dyn Progress) -> Result<TrainSummary> {
    let Prepared {
        cfg,
        hf,
        model,
        params,
        tokenizer,
        labels,
        train: (train_f, train_y),
        eval: (eval_f, eval_y),
        pad,
        ..
    } = prep;
    let out = cfg.output_dir.clone();
    std::fs::write(out.join("recipe.resolved.toml"), cfg.to_toml())
        .map_err(|e| Error::io(out.join("recipe.resolved.toml"), e))?;
    let mut log = MetricsLog::create(out.join("metrics.jsonl"))?;

    let bs = cfg.per_device_train_batch_size;
    let steps_per_epoch = train_f.len().div_ceil(bs);
    let total_steps = steps_per_epoch * cfg.num_train_epochs;
    let warmup = if cfg.warmup_steps > 0 {
        cfg.warmup_steps
    } else {
        warmup_from_ratio(total_steps, cfg.warmup_ratio)
    };
    let schedule = LrSchedule {
        kind: cfg.lr_scheduler_type,
        warmup_steps: warmup,
        total_steps,
        stlr_cut_frac: 0.1,
        stlr_ratio: 32.0,
    };
    let threads = candle_core::utils::get_num_threads();
    log.line(json!({
        "split": "run",
        "threads": threads,
        "train_examples": train_f.len(),
        "eval_examples": eval_f.len(),
        "num_labels": labels.len(),
        "labels": labels.labels(),
        "parameters": params.count(),
        "total_steps": total_steps,
        "warmup_steps": warmup,
    }))?;
    progress.message(&format!(
        "{} training / {} evaluation examples, {} labels, {} parameters, {} steps ({} warm-up), {} threads",
        train_f.len(),
        eval_f.len(),
        labels.len(),
        params.count(),
        total_steps,
        warmup,
        threads
    ));

    let frozen = vec![false; params.num_groups()];
    let mut opt = AdamW::new(
        AdamWConfig {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        },
        params.params.len(),
    );
    let mut dropout_rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(1));
    let (best_name, greater) = cfg.best_metric().unwrap_or(("accuracy", true));
    let mut best: Option<(f64, usize, Vec<Tensor>)> = None;
    let mut epochs = Vec::new();
    let mut step = 0usize;
    let mut loss_acc = 0.0f64;
    let mut loss_n = 0usize;
    let mut train_seconds = 0.0;

    for epoch in 1..=cfg.num_train_epochs {
        let mut order: Vec<usize> = (0..train_f.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(
            cfg.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64),
        ));
        progress.start(
            &format!("train epoch {epoch}/{}", cfg.num_train_epochs),
            train_f.len() as u64,
        );
        let t0 = Instant::now();
        for chunk in order.chunks(bs) {
            let feats: Vec<&Features> = chunk.iter().map(|&i| &train_f[i]).collect();
            let batch = make_batch(&feats, pad, device)?;
            let y: Vec<u32> = chunk.iter().map(|&i| train_y[i]).collect();
            let y = Tensor::from_vec(y, chunk.len(), device)?;
            let (loss, mut grads) =
                loss_and_grads(&model, &params, &batch, &y, &frozen, &mut dropout_rng)?;
            if !loss.is_finite() {
                return Err(Error::Msg(format!(
                    "the loss became {loss} at step {step} (epoch {epoch}); lower learning_rate?"
                )));
            }
            let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm);
            let lr = cfg.learning_rate * schedule.factor(step);
            let lrs = vec![lr; params.params.len()];
            opt.step(&params, &grads, &lrs)?;
            step += 1;
            loss_acc += loss as f64;
            loss_n += 1;
            if step.is_multiple_of(cfg.logging_steps) {
                log.line(json!({
                    "split": "train",
                    "step": step,
                    "epoch": step as f64 / steps_per_epoch as f64,
                    "loss": loss_acc / loss_n as f64,
                    "learning_rate": lr,
                    "grad_norm": grad_norm,
                }))?;
                loss_acc = 0.0;
                loss_n = 0;
            }
            progress.advance(chunk.len() as u64);
        }
        train_seconds += t0.elapsed().as_secs_f64();
        progress.finish();

        progress.start(&format!("eval epoch {epoch}"), eval_f.len() as u64);
        let (eval_loss, _, report) = evaluate(
            &model,
            (&eval_f, &eval_y),
            labels.len(),
            cfg.per_device_eval_batch_size,
            pad,
            device,
            progress,
        )?;
        progress.finish();
        let m = EpochMetrics {
            epoch,
            eval_loss,
            eval_accuracy: report.accuracy,
            eval_macro_f1: report.macro_f1,
        };
        log.line(json!({
            "epoch": epoch,
            "split": "eval",
            "step": step,
            "eval_loss": m.eval_loss,
            "eval_accuracy": m.eval_accuracy,
            "eval_macro_f1": m.eval_macro_f1,
        }))?;
        progress.message(&format!(
            "epoch {epoch}: eval_loss {:.4} eval_accuracy {:.4} eval_macro_f1 {:.4}",
            m.eval_loss, m.eval_accuracy, m.eval_macro_f1
        ));
        let score = m.get(best_name);
        let better = match &best {
            None => true,
            Some((b, _, _)) => {
                if greater {
                    score > *b
                } else {
                    score < *b
                }
            }
        };
        if better {
            best = Some((score, epoch, params.snapshot()?));
        }
        epochs.push(m);
    }

    let (best_score, best_epoch, snap) = best.ok_or_else(|| Error::Msg("no epoch ran".into()))?;
    params.restore(&snap)?;
    log.line(
        json!({"split": "best", "epoch": best_epoch, "metric": best_name, "value": best_score}),
    )?;
    let model_dir = out.join("model");
    export_model(
        &model_dir,
        &ExportSpec {
            base: &hf,
            source_dir: &cfg.model_name_or_path,
            params: &params,
            tokenizer: &tokenizer,
            labels: labels.labels(),
            problem_type: "single_label_classification",
            info: ExportInfo {
                pooling: cfg.pooling,
                max_seq_length: cfg.max_seq_length,
                text_column: cfg.text_column.clone(),
                text_pair_column: cfg.text_pair_column.clone(),
                label_column: cfg.label_column.clone(),
            },
        },
    )?;
    let summary = json!({
        "best_epoch": best_epoch,
        "best_metric": best_name,
        "best_value": best_score,
        "train_seconds": train_seconds,
        "threads": threads,
    });
    let sp = out.join("train_summary.json");
    std::fs::write(&sp, summary.to_string()).map_err(|e| Error::io(&sp, e))?;
    progress.message(&format!(
        "best epoch {best_epoch} ({best_name} {best_score:.4}); model written to {}",
        model_dir.display()
    ));
    Ok(TrainSummary {
        epochs,
        best_epoch,
        model_dir,
        train_seconds,
    })
}

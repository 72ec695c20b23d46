//! The training loop: data → tokens → batches → forward → loss → backward → clip → AdamW →
//! schedule, with an evaluation after every epoch and the best epoch exported.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::config::{ClassWeights, FreezeMode, OnBadRow, OptimizerKind, ProblemType, TrainConfig};
use crate::data::batch::{group_by_length, make_batch, pad_id, tokenize, Features};
use crate::data::labels::LabelMap;
use crate::data::reader::{
    read_examples, read_examples_skipping, Example, RawLabel, ReaderOptions,
};
use crate::data::split::stratified_split;
use crate::error::{Error, Result};
use crate::export::{export_model, ExportSpec};
use crate::models::bert::{BertClassifier, Weights};
use crate::models::grad_sink::GradSink;
use crate::models::tokenizer::load_tokenizer;
use crate::models::{Batch, Ctx, HfConfig, Param, ParamStore};
use crate::predict::{infer_logits, ExportInfo};
use crate::task::{encode_targets, evaluate_outputs, headline, label_map, Evaluation, TargetData};
use crate::train::checkpoint::{self, RunState, Snapshot};
use crate::train::loss::{compute, LossConfig, Targets};
use crate::train::optim::{clip_factor, grad_norm, AdamW, AdamWConfig, Optimizer, Sgd};
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
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: usize,
    /// Metric name (without `eval_`) → value; see [`crate::task::evaluate_outputs`].
    pub metrics: BTreeMap<String, f64>,
}

impl EpochMetrics {
    /// A metric by name (without `eval_`); NaN when absent.
    pub fn get(&self, name: &str) -> f64 {
        self.metrics.get(name).copied().unwrap_or(f64::NAN)
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
    /// Optimisation steps taken.
    pub steps: usize,
    /// True when early stopping ended the run.
    pub stopped_early: bool,
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
    /// Class names (classification) or target names (regression).
    pub labels: LabelMap,
    /// Tokenized training examples and their targets.
    pub train: (Vec<Features>, TargetData),
    /// The training examples' ids (`line N`, or a path), for messages.
    pub train_ids: Vec<String>,
    /// Tokenized evaluation examples and their targets.
    pub eval: (Vec<Features>, TargetData),
    /// The loss.
    pub loss: LossConfig,
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

/// Rows left out under `on_bad_row = "skip"`, and notes about data clean-up.
#[derive(Default)]
struct SkipLog {
    rows: Vec<serde_json::Value>,
    notes: Vec<String>,
}

impl SkipLog {
    /// Reads a data file, skipping bad rows when the recipe says so.
    fn read(
        &mut self,
        cfg: &TrainConfig,
        path: &Path,
        opts: &ReaderOptions,
    ) -> Result<Vec<Example>> {
        match cfg.on_bad_row {
            OnBadRow::Error => read_examples(path, opts),
            OnBadRow::Skip => {
                let (ex, skipped) = read_examples_skipping(path, opts)?;
                if !skipped.is_empty() {
                    self.notes.push(format!(
                        "{} row(s) of {} skipped (see skipped_rows.jsonl)",
                        skipped.len(),
                        path.display()
                    ));
                }
                self.rows.extend(
                    skipped
                        .into_iter()
                        .map(|s| json!({"file": path, "line": s.line, "reason": s.reason})),
                );
                Ok(ex)
            }
        }
    }

    /// Keeps the examples whose targets encode; the others are skipped rows.
    fn keep_encodable(
        &mut self,
        examples: Vec<Example>,
        path: &Path,
        encode: impl Fn(&Example) -> Result<TargetData>,
    ) -> Vec<Example> {
        let before = examples.len();
        let kept: Vec<Example> = examples
            .into_iter()
            .filter(|e| match encode(e) {
                Ok(_) => true,
                Err(err) => {
                    self.rows
                        .push(json!({"file": path, "line": e.line, "reason": err.to_string()}));
                    false
                }
            })
            .collect();
        if kept.len() < before {
            self.notes.push(format!(
                "{} row(s) of {} skipped: target not a number (see skipped_rows.jsonl)",
                before - kept.len(),
                path.display()
            ));
        }
        kept
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let p = dir.join("skipped_rows.jsonl");
        if self.rows.is_empty() {
            let _ = std::fs::remove_file(&p);
            return Ok(());
        }
        let text: String = self.rows.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
    }
}

/// Drops examples whose (text, text pair) repeats an earlier one; the first is kept.
pub fn deduplicate(examples: Vec<Example>, notes: &mut Vec<String>) -> Vec<Example> {
    let before = examples.len();
    let mut seen = std::collections::HashSet::new();
    let kept: Vec<Example> = examples
        .into_iter()
        .filter(|e| seen.insert((e.text.clone(), e.text_pair.clone())))
        .collect();
    if kept.len() < before {
        notes.push(format!(
            "{} duplicate example(s) dropped",
            before - kept.len()
        ));
    }
    kept
}

/// Checks that `dir` can be created and written, before anything slow happens.
pub fn ensure_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let probe = dir.join(".ferrotune-write-test");
    std::fs::write(&probe, b"ok").map_err(|e| Error::io(dir, e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The loss of a run, with class weights resolved against the training targets.
pub fn loss_config(cfg: &TrainConfig, labels: &LabelMap, train: &TargetData) -> Result<LossConfig> {
    let class_weights = match (&cfg.class_weights, train) {
        (None, _) => None,
        (Some(ClassWeights::List(w)), _) => {
            if w.len() != labels.len() {
                return Err(Error::Config(format!(
                    "`class_weights` has {} values but the training data has {} classes ({})",
                    w.len(),
                    labels.len(),
                    labels.labels().join(", ")
                )));
            }
            Some(w.clone())
        }
        (Some(ClassWeights::Named(_)), TargetData::Classes(y)) => {
            // scikit-learn's "balanced": n / (k · count(c)).
            let k = labels.len();
            let mut count = vec![0usize; k];
            y.iter().for_each(|&c| count[c as usize] += 1);
            Some(
                count
                    .iter()
                    .map(|&c| y.len() as f64 / (k as f64 * c.max(1) as f64))
                    .collect(),
            )
        }
        (Some(ClassWeights::Named(_)), _) => None,
    };
    let pos_weight = match &cfg.pos_weight {
        Some(w) if w.len() == 1 => Some(vec![w[0]; labels.len()]),
        Some(w) if w.len() != labels.len() => {
            return Err(Error::Config(format!(
                "`pos_weight` has {} values but there are {} labels",
                w.len(),
                labels.len()
            )))
        }
        other => other.clone(),
    };
    Ok(LossConfig {
        kind: cfg.loss_kind(),
        label_smoothing: cfg.label_smoothing,
        class_weights,
        pos_weight,
        focal_gamma: cfg.focal_gamma,
        focal_alpha: cfg.focal_alpha,
        smooth_l1_beta: cfg.smooth_l1_beta,
        huber_delta: cfg.huber_delta,
    })
}

/// Reads the data and the model, tokenizes: everything up to the first training step.
/// Data errors come before the model is loaded.
pub fn prepare(cfg: &TrainConfig, device: &Device) -> Result<Prepared> {
    ensure_writable(&cfg.output_dir)?;
    let opts = reader_options(cfg);
    let task = cfg.problem_type;
    let sep = cfg.label_separator.as_deref();
    let field = cfg.label_column.as_str();
    let mut skipped = SkipLog::default();
    // Reads a file; under `on_bad_row = "skip"` a regression target that is not a number
    // is a bad row too.
    let mut read = |path: &Path| -> Result<Vec<Example>> {
        let ex = skipped.read(cfg, path, &opts)?;
        if cfg.on_bad_row == OnBadRow::Skip && task == ProblemType::Regression {
            let probe = LabelMap::from_labels(vec![field.to_string()]);
            return Ok(skipped.keep_encodable(ex, path, |e| {
                encode_targets(task, &probe, std::slice::from_ref(e), path, field, sep)
            }));
        }
        Ok(ex)
    };
    let mut all_train = read(&cfg.train_file)?;
    let eval_file = match &cfg.validation_file {
        Some(vf) => Some(read(vf)?),
        None => None,
    };
    if cfg.deduplicate {
        all_train = deduplicate(all_train, &mut skipped.notes);
    }
    let (mut train, mut eval, eval_path) = match (&cfg.validation_file, eval_file) {
        (Some(vf), Some(ev)) => (all_train, ev, vf.clone()),
        _ => {
            let frac = cfg.validation_split.unwrap_or(0.2);
            // Regression targets are not classes: no stratification.
            let regression = cfg.problem_type == ProblemType::Regression;
            let label_of = |e: &Example| match (&e.label, regression) {
                (_, true) => String::new(),
                (Some(RawLabel::Text(t)), _) => t.clone(),
                (Some(RawLabel::List(l)), _) => l.join(","),
                (None, _) => String::new(),
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
    skipped.write(&cfg.output_dir)?;
    if train.is_empty() {
        return Err(Error::file(&cfg.train_file, "no training examples"));
    }
    if eval.is_empty() {
        return Err(Error::file(&eval_path, "no evaluation examples"));
    }
    let labels = label_map(task, &train, &cfg.train_file, &cfg.label_column, sep)?;
    let train_y = encode_targets(task, &labels, &train, &cfg.train_file, field, sep)?;
    let eval_y = encode_targets(task, &labels, &eval, &eval_path, field, sep)?;
    let loss = loss_config(cfg, &labels, &train_y)?;
    loss.validate()?;

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
    let mut notes = skipped.notes.clone();
    if loaded.new_pooler {
        notes.push("the pooler is newly initialised (not in the checkpoint)".to_string());
    }
    if loaded.new_head {
        notes.push(format!(
            "a new head with {} outputs is initialised",
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
        train_ids: train.iter().map(|e| e.id.clone()).collect(),
        eval: (eval_f, eval_y),
        loss,
        pad,
        notes,
    })
}

/// Forward, loss and backward on one batch in training context `ctx` (its frozen groups
/// and dropout generator), the loss multiplied by `scale` (for gradient accumulation).
/// Returns the unscaled loss and, for each parameter, its flattened gradient (`None` for a
/// frozen parameter, which gets none).
pub fn loss_and_grads(
    model: &BertClassifier,
    params: &ParamStore,
    batch: &Batch,
    targets: &Targets,
    loss_cfg: &LossConfig,
    scale: f64,
    ctx: Ctx,
) -> Result<(f32, Vec<Option<Vec<f32>>>)> {
    let mut out = vec![None; params.params.len()];
    let loss = loss_and_grads_into(
        model, params, batch, targets, loss_cfg, scale, ctx, &mut out, false,
    )?;
    Ok((loss, out))
}

/// [`loss_and_grads`] into the buffers of `out`: each gradient overwrites (`add` false) or
/// is added to (`add` true, for accumulation) the buffer already there, so a training loop
/// that keeps `out` from step to step allocates no gradient memory (a fresh 90 MB of
/// gradients per MiniLM step cost page faults and a single-threaded copy). The fused
/// linear layers and embeddings write their weights' gradients into the buffers directly
/// ([`GradSink`]); the rest are copied from candle's store in parallel. A parameter
/// without a gradient is set to `None` when not adding, left alone when adding.
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grads_into(
    model: &BertClassifier,
    params: &ParamStore,
    batch: &Batch,
    targets: &Targets,
    loss_cfg: &LossConfig,
    scale: f64,
    mut ctx: Ctx,
    out: &mut [Option<Vec<f32>>],
    add: bool,
) -> Result<f32> {
    let frozen = ctx.frozen;
    let is_frozen = |p: &Param| frozen.get(p.group).copied().unwrap_or(false);
    // The fused layers write weight gradients straight into the buffers (see
    // `models::grad_sink`); candle's store has the others.
    let tensors: Vec<Option<&Tensor>> = params
        .params
        .iter()
        .map(|p| (!is_frozen(p)).then(|| p.var.as_tensor()))
        .collect();
    let bufs = out.iter_mut().map(std::mem::take).collect();
    let sink = GradSink::new(&tensors, bufs, add);
    let (r, sink) = sink.run(|| -> Result<_> {
        let logits = model.forward(&mut ctx, batch)?;
        let loss = compute(loss_cfg, &logits, targets)?;
        let grads = (&loss * scale)?.backward()?;
        Ok((loss, grads))
    });
    let (bufs, wrote) = sink.into_parts();
    for (slot, b) in out.iter_mut().zip(bufs) {
        *slot = b;
    }
    let (loss, grads) = r?;
    for ((p, slot), wrote) in params.params.iter().zip(out.iter_mut()).zip(wrote) {
        let g = if is_frozen(p) {
            None
        } else {
            grads.get(p.var.as_tensor())
        };
        // Added to what the sink wrote this pass, if anything.
        let add = add || wrote;
        match g {
            Some(g) => {
                let g = g.flatten_all()?.contiguous()?;
                let (st, layout) = g.storage_and_layout();
                let src = match (&*st, layout.contiguous_offsets()) {
                    (candle_core::Storage::Cpu(cs), Some((a, b))) => &cs.as_slice::<f32>()?[a..b],
                    _ => {
                        drop(st);
                        let v = g.to_vec1::<f32>()?;
                        merge_grad(slot, &v, add);
                        continue;
                    }
                };
                merge_grad(slot, src, add);
            }
            None if !add => *slot = None,
            None => {}
        }
    }
    Ok(loss.to_scalar::<f32>()?)
}

/// `slot ← src` (or `slot += src` when `add` and there is a buffer), reusing the buffer when
/// it has the right size; the copy or sum is split over candle's thread pool.
fn merge_grad(slot: &mut Option<Vec<f32>>, src: &[f32], add: bool) {
    use crate::models::fused::{par_for, Out, PAR_MIN};
    const CHUNK: usize = 1 << 15;
    match slot {
        Some(buf) if buf.len() == src.len() => {
            let n = buf.len();
            let o = Out::new(buf);
            par_for(n.div_ceil(CHUNK), n >= PAR_MIN, |i| {
                // Safety: chunk i of the buffer is written by this task only.
                let dst = unsafe { o.part(i * CHUNK, CHUNK) };
                let s = &src[i * CHUNK..i * CHUNK + dst.len()];
                if add {
                    dst.iter_mut().zip(s).for_each(|(d, s)| *d += s);
                } else {
                    dst.copy_from_slice(s);
                }
            });
        }
        _ => *slot = Some(src.to_vec()),
    }
}

/// Evaluates the model on tokenized examples (see [`evaluate_outputs`] for the metrics).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &BertClassifier,
    (feats, targets): (&[Features], &TargetData),
    task: ProblemType,
    loss: &LossConfig,
    threshold: f64,
    batch_size: usize,
    pad: u32,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<Evaluation> {
    let logits = infer_logits(model, feats, batch_size, pad, device, |n| {
        progress.advance(n as u64)
    })?;
    evaluate_outputs(task, &logits, targets, loss, threshold)
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
    /// Opens the log of an interrupted run, cut back to `len` bytes (what it held when the
    /// checkpoint was taken).
    fn resume(path: PathBuf, len: u64) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        file.set_len(len).map_err(|e| Error::io(&path, e))?;
        let mut file = file;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog { file, path })
    }
    fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(&self.path, e))
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
    train_with(cfg, progress, &Control::default())
}

/// How a run is steered from outside: resume from a checkpoint, and a flag that asks it
/// to stop (set by the CLI on Ctrl-C / SIGTERM): the current step finishes, a checkpoint
/// is written, and the run returns [`Error::Interrupted`].
#[derive(Default)]
pub struct Control {
    /// `latest` or a checkpoint directory.
    pub resume: Option<String>,
    /// Set to stop after the current step.
    pub stop: Arc<AtomicBool>,
}

/// [`train`], with resume and stop control.
pub fn train_with(
    cfg: &TrainConfig,
    progress: &mut dyn Progress,
    control: &Control,
) -> Result<TrainSummary> {
    let device = Device::Cpu;
    if let Some(which) = &control.resume {
        // Fail before loading anything when there is nothing to resume from.
        checkpoint::resolve(&cfg.output_dir, which)?;
    }
    let prep = prepare(cfg, &device)?;
    for n in &prep.notes {
        progress.message(&format!("note: {n}"));
    }
    run(prep, &device, progress, control)
}

/// A test hook: `FERROTUNE_FAILPOINT=name=N` makes the trainer fail at step N in the named
/// way (`abort_after_step`: the process aborts after that step, as if killed;
/// `checkpoint_write_fail`: the checkpoint of that step fails after its first file, as on a
/// full disk).
fn failpoint(name: &str) -> Option<usize> {
    let v = std::env::var("FERROTUNE_FAILPOINT").ok()?;
    let (n, step) = v.split_once('=')?;
    if n == name {
        step.parse().ok()
    } else {
        None
    }
}

/// The name of parameter group `g` of a model with `layers` encoder layers.
pub fn group_name(g: usize, layers: usize) -> String {
    match g {
        0 => "embeddings".into(),
        g if g <= layers => format!("layer.{}", g - 1),
        g if g == layers + 1 => "pooler".into(),
        _ => "head".into(),
    }
}

/// The learning rate of each parameter group before scheduling: discriminative
/// (`layerwise_lr_decay`) and `head_learning_rate`. Encoder layer `i` (0-based from the
/// bottom) is `l = L − i` below the top and gets `lr·decay^l`; the embeddings get
/// `lr·decay^(L+1)`; the pooler and head get `head_learning_rate` (default `lr`).
pub fn group_learning_rates(cfg: &TrainConfig, layers: usize) -> Vec<f64> {
    let lr = cfg.learning_rate;
    let head = cfg.head_learning_rate.unwrap_or(lr);
    (0..layers + 3)
        .map(|g| match g {
            0 => lr * cfg.layerwise_lr_decay.powi(layers as i32 + 1),
            g if g <= layers => lr * cfg.layerwise_lr_decay.powi((layers + 1 - g) as i32),
            _ => head,
        })
        .collect()
}

/// Which groups are frozen at an epoch (1-based) and step: the recipe's fixed freezing, and
/// with `gradual_unfreeze` every encoder group not yet unfrozen. Gradual unfreezing starts
/// with the pooler and head alone and unfreezes one group per epoch (or every
/// `unfreeze_every_steps` steps) from the top layer down to the embeddings.
pub fn frozen_groups(cfg: &TrainConfig, layers: usize, epoch: usize, step: usize) -> Vec<bool> {
    let mut frozen = vec![false; layers + 3];
    match cfg.freeze {
        FreezeMode::None => {}
        FreezeMode::Embeddings => frozen[0] = true,
        FreezeMode::Backbone => frozen[..=layers].iter_mut().for_each(|f| *f = true),
    }
    if cfg.freeze_layers > 0 {
        let n = cfg.freeze_layers.min(layers);
        frozen[..=n].iter_mut().for_each(|f| *f = true);
    }
    if cfg.gradual_unfreeze {
        let unfrozen = match cfg.unfreeze_every_steps {
            Some(k) => step / k,
            None => epoch.saturating_sub(1),
        };
        // Encoder groups are 0..=layers; the top `unfrozen` of them train.
        for (g, f) in frozen.iter_mut().enumerate().take(layers + 1) {
            if g + unfrozen <= layers {
                *f = true;
            }
        }
    }
    frozen
}

/// Adds the gradient of `l1·Σ|w| + l2·Σw²` over the trainable weights (not biases or
/// LayerNorm weights) to `grads`, and returns the penalty's value.
fn add_penalties(
    params: &ParamStore,
    grads: &mut [Option<Vec<f32>>],
    l1: f64,
    l2: f64,
) -> Result<f64> {
    if l1 == 0.0 && l2 == 0.0 {
        return Ok(0.0);
    }
    let mut value = 0.0;
    for (p, g) in params.params.iter().zip(grads.iter_mut()) {
        let Some(g) = g else { continue };
        if p.no_decay {
            continue;
        }
        let w = p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        for (g, &w) in g.iter_mut().zip(&w) {
            value += l1 * (w as f64).abs() + l2 * (w as f64) * (w as f64);
            let sign = if w > 0.0 {
                1.0
            } else if w < 0.0 {
                -1.0
            } else {
                0.0
            };
            *g += (l1 * sign + 2.0 * l2 * w as f64) as f32;
        }
    }
    Ok(value)
}

/// Trains a prepared run.
pub fn run(
    prep: Prepared,
    device: &Device,
    progress: &mut dyn Progress,
    control: &Control,
) -> Result<TrainSummary> {
    let Prepared {
        cfg,
        hf,
        model,
        params,
        tokenizer,
        labels,
        train: (train_f, train_y),
        train_ids,
        eval: (eval_f, eval_y),
        loss: loss_cfg,
        pad,
        ..
    } = prep;
    let task = cfg.problem_type;
    let out = cfg.output_dir.clone();
    let recipe = cfg.to_toml();
    let resume = match &control.resume {
        Some(which) => {
            let dir = checkpoint::resolve(&out, which)?;
            let ck = checkpoint::load(&dir, params.params.len())?;
            let theirs = std::fs::read_to_string(dir.join("recipe.resolved.toml"))
                .map_err(|e| Error::io(dir.join("recipe.resolved.toml"), e))?;
            if theirs != recipe {
                return Err(Error::file(
                    dir.join("recipe.resolved.toml"),
                    "the checkpoint was written by a different recipe; resume with the same \
                     recipe and --set values",
                ));
            }
            Some(ck)
        }
        None => None,
    };
    std::fs::write(out.join("recipe.resolved.toml"), &recipe)
        .map_err(|e| Error::io(out.join("recipe.resolved.toml"), e))?;
    let mut log = match &resume {
        Some(ck) => MetricsLog::resume(out.join("metrics.jsonl"), ck.state.metrics_len)?,
        None => MetricsLog::create(out.join("metrics.jsonl"))?,
    };

    let bs = cfg.per_device_train_batch_size;
    let accum = cfg.gradient_accumulation_steps;
    let batches_per_epoch = train_f.len().div_ceil(bs);
    let steps_per_epoch = batches_per_epoch.div_ceil(accum);
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
        stlr_cut_frac: cfg.stlr_cut_frac,
        stlr_ratio: cfg.stlr_ratio,
    };
    let threads = candle_core::utils::get_num_threads();
    let layers = params.num_layers();
    log.line(json!({
        "split": "run",
        "threads": threads,
        "problem_type": task.as_str(),
        "loss": loss_cfg.kind.name(),
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

    let group_lr = group_learning_rates(&cfg, layers);
    let mut optimizer = match cfg.optimizer {
        OptimizerKind::Adamw => Optimizer::AdamW(AdamW::new(
            AdamWConfig {
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_epsilon,
                weight_decay: cfg.weight_decay,
            },
            params.params.len(),
        )),
        OptimizerKind::Sgd => Optimizer::Sgd(Sgd::new(
            cfg.momentum,
            cfg.nesterov,
            cfg.weight_decay,
            params.params.len(),
        )),
    };
    let mut dropout_rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(1));
    let (best_name, greater) = cfg.best_metric().unwrap_or(("loss", false));
    let mut best: Option<(f64, usize, Vec<Tensor>, Option<Evaluation>)> = None;
    let mut st = RunState {
        step: 0,
        epoch: 1,
        window: 0,
        rng_word_pos: 0,
        loss_acc: 0.0,
        loss_n: 0,
        best: None,
        since_best: 0,
        epochs: Vec::new(),
        train_seconds: 0.0,
        metrics_len: 0,
        optimizer_steps: Vec::new(),
        stopped_early: false,
        bad_in_row: 0,
        bad_total: 0,
    };
    if let Some(ck) = resume {
        params.restore(&ck.weights)?;
        optimizer.import_state(&ck.optimizer, &ck.state.optimizer_steps)?;
        dropout_rng.set_word_pos(ck.state.rng_word_pos);
        if let (Some((score, epoch)), Some(w)) = (ck.state.best, ck.best) {
            best = Some((score, epoch, w, None));
        }
        progress.message(&format!(
            "resuming from {} (step {}, epoch {})",
            ck.dir.display(),
            ck.state.step,
            ck.state.epoch
        ));
        st = ck.state;
    }
    let mut frozen = frozen_groups(&cfg, layers, st.epoch, st.step);
    if st.step == 0 {
        log_groups(&mut log, &params, &group_lr, &frozen, 0, progress)?;
    }
    // Writes a checkpoint of the current state.
    let save = |st: &mut RunState,
                best: &Option<(f64, usize, Vec<Tensor>, Option<Evaluation>)>,
                optimizer: &Optimizer,
                rng: &ChaCha8Rng,
                log: &MetricsLog|
     -> Result<PathBuf> {
        let (opt_tensors, opt_steps) = optimizer.export_state()?;
        st.rng_word_pos = rng.get_word_pos();
        st.metrics_len = log.len()?;
        st.optimizer_steps = opt_steps;
        st.best = best.as_ref().map(|(s, e, ..)| (*s, *e));
        let snap = Snapshot {
            state: st,
            weights: params
                .params
                .iter()
                .map(|p| p.var.as_tensor().clone())
                .collect(),
            optimizer: opt_tensors,
            best: best.as_ref().map(|(_, _, w, _)| w.as_slice()),
            recipe: recipe.clone(),
        };
        let fail = failpoint("checkpoint_write_fail")
            .filter(|&s| s == st.step)
            .map(|_| 1);
        checkpoint::save(&out, &snap, cfg.save_total_limit.unwrap_or(0), fail)
    };

    let train_lengths: Vec<usize> = train_f.iter().map(|f| f.ids.len()).collect();
    // Gradient buffers, reused from step to step (see `loss_and_grads_into`).
    let mut grads: Vec<Option<Vec<f32>>> = vec![None; params.params.len()];
    let first_epoch = st.epoch;
    for epoch in first_epoch..=cfg.num_train_epochs {
        if st.stopped_early {
            break;
        }
        let mut order: Vec<usize> = (0..train_f.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(
            cfg.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64),
        ));
        if cfg.group_by_length {
            order = group_by_length(&order, &train_lengths, bs);
        }
        progress.start(
            &format!("train epoch {epoch}/{}", cfg.num_train_epochs),
            train_f.len() as u64,
        );
        let t0 = Instant::now();
        let batches: Vec<&[usize]> = order.chunks(bs).collect();
        let windows: Vec<&[&[usize]]> = batches.chunks(accum).collect();
        let skip = if epoch == first_epoch { st.window } else { 0 };
        if skip > 0 {
            let done: usize = windows[..skip.min(windows.len())]
                .iter()
                .flat_map(|w| w.iter())
                .map(|c| c.len())
                .sum();
            progress.advance(done as u64);
        }
        for (wi, window) in windows.iter().enumerate().skip(skip) {
            let step = st.step;
            let now = frozen_groups(&cfg, layers, epoch, step);
            if now != frozen {
                frozen = now;
                log_groups(&mut log, &params, &group_lr, &frozen, step, progress)?;
            }
            // Each micro-batch's mean loss is weighted by its share of the window's
            // examples: the summed gradient is that of the mean over the whole window.
            let window_n: usize = window.iter().map(|c| c.len()).sum();
            let mut bad: Option<String> = None;
            let mut window_loss = 0.0f64;
            for (ci, chunk) in window.iter().enumerate() {
                let feats: Vec<&Features> = chunk.iter().map(|&i| &train_f[i]).collect();
                let batch = make_batch(&feats, pad, device)?;
                let y = train_y.select(chunk, task, device)?;
                let share = chunk.len() as f64 / window_n as f64;
                let ctx = Ctx {
                    train: true,
                    frozen: &frozen,
                    rng: Some(&mut dropout_rng),
                };
                // The window's first batch overwrites the buffers kept from the last step,
                // the others add to them.
                let loss = loss_and_grads_into(
                    &model,
                    &params,
                    &batch,
                    &y,
                    &loss_cfg,
                    share,
                    ctx,
                    &mut grads,
                    ci > 0,
                )?;
                if !loss.is_finite() && bad.is_none() {
                    bad = Some(format!("loss {loss}"));
                }
                window_loss += loss as f64 * share;
                progress.advance(chunk.len() as u64);
            }
            window_loss += add_penalties(&params, &mut grads, cfg.l1_penalty, cfg.l2_penalty)?;
            let grad_norm = grad_norm(&grads);
            if bad.is_none() && !grad_norm.is_finite() {
                bad = Some(format!("gradient norm {grad_norm}"));
            }
            let factor = schedule.factor(step);
            if let Some(reason) = &bad {
                // A non-finite step is skipped: no update, logged and counted; too many in
                // a row stop the run (the last good checkpoint stays).
                st.bad_in_row += 1;
                st.bad_total += 1;
                let rows: Vec<&str> = window
                    .iter()
                    .flat_map(|c| c.iter())
                    .map(|&i| train_ids[i].as_str())
                    .collect();
                log.line(
                    json!({"split": "train", "step": step + 1, "skipped": reason, "rows": rows}),
                )?;
                progress.message(&format!(
                    "step {}: {reason}, step skipped ({} in a row)",
                    step + 1,
                    st.bad_in_row
                ));
                if st.bad_in_row > cfg.max_bad_steps {
                    let last = checkpoint::list(&checkpoint::checkpoints_dir(&out))
                        .pop()
                        .map(|(_, d)| d.display().to_string())
                        .unwrap_or_else(|| "none".into());
                    return Err(Error::Msg(format!(
                        "stopped: {} non-finite steps in a row, the last at step {} (epoch {epoch}, {reason}) on rows {} of {}; last good checkpoint: {last}",
                        st.bad_in_row,
                        step + 1,
                        rows.join(", "),
                        cfg.train_file.display()
                    )));
                }
            } else {
                st.bad_in_row = 0;
                let lrs: Vec<f64> = params
                    .params
                    .iter()
                    .map(|p| group_lr[p.group] * factor)
                    .collect();
                let clip = clip_factor(grad_norm, cfg.max_grad_norm);
                optimizer.step(&params, &grads, clip, &lrs)?;
                st.loss_acc += window_loss;
                st.loss_n += 1;
            }
            st.step += 1;
            let step = st.step;
            if step.is_multiple_of(cfg.logging_steps) {
                log.line(json!({
                    "split": "train",
                    "step": step,
                    "epoch": step as f64 / steps_per_epoch as f64,
                    "loss": st.loss_acc / st.loss_n.max(1) as f64,
                    "learning_rate": cfg.learning_rate * factor,
                    "grad_norm": grad_norm,
                }))?;
                st.loss_acc = 0.0;
                st.loss_n = 0;
            }
            let last_window = wi + 1 == windows.len();
            let interrupted = control.stop.load(Ordering::SeqCst);
            let periodic = cfg.save_steps.is_some_and(|k| step.is_multiple_of(k));
            if (interrupted || periodic) && !last_window {
                st.epoch = epoch;
                st.window = wi + 1;
                let elapsed = t0.elapsed().as_secs_f64();
                st.train_seconds += elapsed;
                let dir = save(&mut st, &best, &optimizer, &dropout_rng, &log)?;
                st.train_seconds -= elapsed;
                if interrupted {
                    progress.finish();
                    return Err(Error::Interrupted {
                        step,
                        checkpoint: dir,
                    });
                }
            }
            if failpoint("abort_after_step") == Some(step) {
                std::process::abort();
            }
        }
        st.train_seconds += t0.elapsed().as_secs_f64();
        progress.finish();
        let step = st.step;

        progress.start(&format!("eval epoch {epoch}"), eval_f.len() as u64);
        let ev = evaluate(
            &model,
            (&eval_f, &eval_y),
            task,
            &loss_cfg,
            cfg.threshold,
            cfg.per_device_eval_batch_size,
            pad,
            device,
            progress,
        )?;
        progress.finish();
        let mut line = serde_json::Map::new();
        line.insert("epoch".into(), json!(epoch));
        line.insert("split".into(), json!("eval"));
        line.insert("step".into(), json!(step));
        for (k, v) in &ev.metrics {
            line.insert(format!("eval_{k}"), json!(v));
        }
        log.line(serde_json::Value::Object(line))?;
        let shown: Vec<String> = headline(task)
            .iter()
            .map(|k| format!("eval_{k} {:.4}", ev.get(k)))
            .collect();
        progress.message(&format!("epoch {epoch}: {}", shown.join(" ")));
        let m = EpochMetrics {
            epoch,
            metrics: ev.metrics.clone(),
        };
        let score = m.get(best_name);
        let better = match &best {
            None => true,
            Some((b, ..)) => {
                if greater {
                    score > *b
                } else {
                    score < *b
                }
            }
        };
        st.epochs.push(m);
        if better {
            best = Some((score, epoch, params.snapshot()?, Some(ev)));
            st.since_best = 0;
        } else {
            st.since_best += 1;
            if let Some(p) = cfg.early_stopping_patience {
                if st.since_best >= p && epoch < cfg.num_train_epochs {
                    log.line(json!({"split": "early_stop", "epoch": epoch, "step": step}))?;
                    progress.message(&format!(
                        "early stopping: no better eval_{best_name} for {p} evaluation(s)"
                    ));
                    st.stopped_early = true;
                }
            }
        }
        st.epoch = epoch + 1;
        st.window = 0;
        let dir = save(&mut st, &best, &optimizer, &dropout_rng, &log)?;
        if control.stop.load(Ordering::SeqCst) && epoch < cfg.num_train_epochs && !st.stopped_early
        {
            return Err(Error::Interrupted {
                step,
                checkpoint: dir,
            });
        }
    }
    let RunState {
        epochs,
        train_seconds,
        stopped_early,
        step,
        ..
    } = st;

    let (best_score, best_epoch, snap, best_eval) =
        best.ok_or_else(|| Error::Msg("no epoch ran".into()))?;
    params.restore(&snap)?;
    // After a resume the best epoch's evaluation is recomputed from its weights.
    let best_eval = match best_eval {
        Some(ev) => ev,
        None => evaluate(
            &model,
            (&eval_f, &eval_y),
            task,
            &loss_cfg,
            cfg.threshold,
            cfg.per_device_eval_batch_size,
            pad,
            device,
            &mut Silent,
        )?,
    };
    log.line(
        json!({"split": "best", "epoch": best_epoch, "metric": best_name, "value": best_score}),
    )?;
    if let Some(r) = &best_eval.report {
        let p = out.join("confusion_matrix.csv");
        std::fs::write(&p, r.confusion_csv(labels.labels())).map_err(|e| Error::io(&p, e))?;
        progress.message(&format!(
            "best epoch {best_epoch}, per class:\n{}",
            r.per_class_table(labels.labels())
        ));
        progress.message(&format!(
            "confusion matrix (rows: true, columns: predicted), also in {}:\n{}",
            p.display(),
            r.confusion_csv(labels.labels()).trim_end()
        ));
    }
    let model_dir = out.join("model");
    export_model(
        &model_dir,
        &ExportSpec {
            base: &hf,
            source_dir: &cfg.model_name_or_path,
            params: &params,
            tokenizer: &tokenizer,
            labels: labels.labels(),
            problem_type: task.as_str(),
            info: ExportInfo {
                pooling: cfg.pooling,
                max_seq_length: cfg.max_seq_length,
                text_column: cfg.text_column.clone(),
                text_pair_column: cfg.text_pair_column.clone(),
                label_column: cfg.label_column.clone(),
                threshold: cfg.threshold,
                label_separator: cfg.label_separator.clone(),
            },
        },
    )?;
    let summary = json!({
        "best_epoch": best_epoch,
        "best_metric": best_name,
        "best_value": best_score,
        "train_seconds": train_seconds,
        "steps": step,
        "stopped_early": stopped_early,
        "threads": threads,
    });
    let sp = out.join("train_summary.json");
    std::fs::write(&sp, summary.to_string()).map_err(|e| Error::io(&sp, e))?;
    progress.message(&format!(
        "best epoch {best_epoch} (eval_{best_name} {best_score:.4}); model written to {}",
        model_dir.display()
    ));
    Ok(TrainSummary {
        epochs,
        best_epoch,
        model_dir,
        train_seconds,
        steps: step,
        stopped_early,
    })
}

/// Logs each parameter group's learning rate and whether it is frozen.
fn log_groups(
    log: &mut MetricsLog,
    params: &ParamStore,
    group_lr: &[f64],
    frozen: &[bool],
    step: usize,
    progress: &mut dyn Progress,
) -> Result<()> {
    let layers = params.num_layers();
    let groups: Vec<serde_json::Value> = (0..params.num_groups())
        .map(|g| {
            json!({
                "group": group_name(g, layers),
                "learning_rate": group_lr[g],
                "frozen": frozen[g],
                "parameters": params.params.iter().filter(|p| p.group == g)
                    .map(|p| p.var.elem_count()).sum::<usize>(),
            })
        })
        .collect();
    log.line(json!({"split": "param_groups", "step": step, "groups": groups}))?;
    let trainable: Vec<String> = (0..params.num_groups())
        .filter(|&g| !frozen[g])
        .map(|g| group_name(g, layers))
        .collect();
    if step == 0 || frozen.iter().any(|&f| f) {
        progress.message(&format!(
            "step {step}: training {} of {} parameter groups ({})",
            trainable.len(),
            params.num_groups(),
            trainable.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Param;
    use candle_core::Var;

    fn cfg(sets: &[&str]) -> TrainConfig {
        let text = "model_name_or_path = \"m\"\ntrain_file = \"t.csv\"\nvalidation_split = 0.2\n";
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        TrainConfig::from_toml_str(text, Path::new("t.toml"), &sets).unwrap()
    }

    #[test]
    fn layerwise_learning_rates_follow_the_formula() {
        let c = cfg(&[
            "learning_rate=1e-4",
            "layerwise_lr_decay=0.5",
            "head_learning_rate=1e-3",
        ]);
        let lr = group_learning_rates(&c, 3);
        // groups: embeddings, layer.0, layer.1, layer.2, pooler, head
        let want = [
            1e-4 * 0.0625,
            1e-4 * 0.125,
            1e-4 * 0.25,
            1e-4 * 0.5,
            1e-3,
            1e-3,
        ];
        for (a, b) in lr.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{lr:?}");
        }
        assert_eq!(group_learning_rates(&cfg(&[]), 2), vec![5e-5; 5]);
    }

    #[test]
    fn freezing_and_gradual_unfreezing_groups() {
        let f = |sets: &[&str], epoch, step| frozen_groups(&cfg(sets), 3, epoch, step);
        let (t, o) = (true, false);
        assert_eq!(f(&[], 1, 0), [o, o, o, o, o, o]);
        assert_eq!(f(&["freeze=\"embeddings\""], 1, 0), [t, o, o, o, o, o]);
        assert_eq!(f(&["freeze=\"backbone\""], 1, 0), [t, t, t, t, o, o]);
        assert_eq!(f(&["freeze_layers=2"], 1, 0), [t, t, t, o, o, o]);
        let g = ["gradual_unfreeze=true"];
        assert_eq!(f(&g, 1, 0), [t, t, t, t, o, o]);
        assert_eq!(f(&g, 2, 0), [t, t, t, o, o, o]);
        assert_eq!(f(&g, 4, 0), [t, o, o, o, o, o]);
        assert_eq!(f(&g, 9, 0), [o, o, o, o, o, o]);
        let s = ["gradual_unfreeze=true", "unfreeze_every_steps=10"];
        assert_eq!(f(&s, 1, 9), [t, t, t, t, o, o]);
        assert_eq!(f(&s, 1, 10), [t, t, t, o, o, o]);
        // Permanently frozen groups stay frozen.
        let p = ["gradual_unfreeze=true", "freeze=\"embeddings\""];
        assert_eq!(f(&p, 9, 0), [t, o, o, o, o, o]);
    }

    #[test]
    fn penalty_gradients_equal_autodiff_of_the_penalties() {
        let w = Var::from_vec(vec![0.5f32, -2.0, 0.0, 1.5], (2, 2), &Device::Cpu).unwrap();
        let b = Var::from_vec(vec![3.0f32, -1.0], 2, &Device::Cpu).unwrap();
        let mut store = ParamStore::new(0);
        for (name, var, no_decay) in [("w", &w, false), ("b.bias", &b, true)] {
            store.params.push(Param {
                name: name.into(),
                var: var.clone(),
                group: 0,
                no_decay,
            });
        }
        let (l1, l2) = (0.3, 0.7);
        let mut grads = vec![Some(vec![0f32; 4]), Some(vec![0f32; 2])];
        let value = add_penalties(&store, &mut grads, l1, l2).unwrap();
        let ws = [w.as_tensor().clone()];
        let p = ((crate::train::loss::l1_penalty(&ws).unwrap() * l1).unwrap()
            + (crate::train::loss::l2_penalty(&ws).unwrap() * l2).unwrap())
        .unwrap();
        assert!((p.to_scalar::<f32>().unwrap() as f64 - value).abs() < 1e-5);
        let g = p.backward().unwrap();
        let auto = g
            .get(w.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in auto.iter().zip(grads[0].as_ref().unwrap()) {
            assert!((a - b).abs() < 1e-6, "{auto:?} vs {grads:?}");
        }
        // Biases and LayerNorm weights carry no penalty.
        assert_eq!(grads[1].as_ref().unwrap(), &vec![0f32; 2]);
    }
}

//! The training loop: batches → [`step`](crate::train::step) → clip → optimizer →
//! schedule, an evaluation after every epoch, checkpoints, and the best epoch exported.
//!
//! [`run`] reads as the loop itself; each job is a method of [`Run`]: [`Run::start`]
//! (resume, logs, optimizer), [`Run::train_epoch`] and [`Run::train_window`] (the steps),
//! [`Run::evaluate_epoch`] (evaluation, best epoch, early stopping), [`Run::checkpoint`],
//! and [`Run::finish`] (the best weights, report and export).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::artifact::ExportInfo;
use crate::config::{OptimizerKind, TrainConfig};
use crate::data::batch::{group_by_length, Features};
use crate::data::labels::LabelMap;
use crate::data::mixup::MixConfig;
use crate::data::InputEncoder;
use crate::dist::{GradReducer, World};
use crate::error::{Error, Result};
use crate::export::{export_model, ExportSpec};
use crate::families::{Family, HfConfig, Model};
use crate::formats::write_whole;
use crate::infer::infer_logits;
use crate::loss::LossConfig;
use crate::nn::{Ctx, ParamStore};
use crate::optim::schedule::{warmup_from_ratio, LrSchedule};
use crate::optim::{clip_factor, grad_norm, AdamW, AdamWConfig, Optimizer, Sgd};
use crate::precision::Precision;
use crate::tasks::{Evaluation, TargetData, Task};
use crate::train::checkpoint::{self, Checkpoint, EpochMetrics, RunState, Snapshot};
use crate::train::ema::Ema;
use crate::train::groups::{frozen_groups, group_learning_rates, log_groups};
use crate::train::held_out::{predictions_jsonl, HeldOut};
use crate::train::log::{MetricsLog, Progress, Silent};
use crate::train::prepare::{prepare_for, Prepared};
use crate::train::step::{add_penalties, loss_and_grads_into};

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

impl TrainSummary {
    /// The summary of a finished run's state.
    fn of(st: RunState, best_epoch: usize, model_dir: PathBuf) -> Self {
        TrainSummary {
            epochs: st.epochs,
            best_epoch,
            model_dir,
            train_seconds: st.train_seconds,
            steps: st.step,
            stopped_early: st.stopped_early,
        }
    }
}

/// Evaluates `model` on encoded examples under the task's metrics; also returns the
/// logits (for `eval_predictions.jsonl`).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &dyn Model,
    encoder: &dyn InputEncoder,
    (items, targets): (&[Features], &TargetData),
    task: &dyn Task,
    loss: &LossConfig,
    threshold: f64,
    batch_size: usize,
    device: &Device,
    progress: &mut dyn Progress,
) -> Result<(Evaluation, Vec<Vec<f32>>)> {
    let logits = eval_outputs(model, encoder, items, targets, batch_size, device, |n| {
        progress.advance(n as u64)
    })?;
    Ok((task.evaluate(&logits, targets, loss, threshold)?, logits))
}

/// What a task's evaluation reads for each item: the head's outputs, or for causal-LM
/// targets each sequence's `[nll sum, counted tokens]`
/// ([`crate::tasks::causal_lm::nll_rows`]: a sequence's logits are never kept).
fn eval_outputs(
    model: &dyn Model,
    encoder: &dyn InputEncoder,
    items: &[Features],
    targets: &TargetData,
    batch_size: usize,
    device: &Device,
    on_batch: impl FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    match targets {
        TargetData::Tokens(labels) => crate::tasks::causal_lm::nll_rows(
            model, encoder, items, labels, batch_size, device, on_batch,
        ),
        _ => infer_logits(
            model,
            encoder,
            items,
            batch_size,
            device,
            Precision::F32,
            on_batch,
        ),
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
    /// Replace a previous run in the output directory (transformers'
    /// `overwrite_output_dir`): without it, such a directory is refused.
    pub overwrite_output_dir: bool,
    /// The ranks training together ([`crate::dist`]); one process by default.
    pub world: World,
}

impl Control {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// [`train`], with resume and stop control.
pub fn train_with(
    cfg: &TrainConfig,
    progress: &mut dyn Progress,
    control: &Control,
) -> Result<TrainSummary> {
    let device = crate::nn::device();
    let world = &control.world;
    // Before anything is read or written: every rank must run the same recipe.
    world.check_same("recipes", cfg.to_toml().as_bytes())?;
    match &control.resume {
        // Fail before loading anything when there is nothing to resume from.
        Some(which) => {
            checkpoint::resolve(&cfg.output_dir, which)?;
        }
        // Rank 0 alone writes to the output directory.
        None if world.is_main() => claim_output_dir(&cfg.output_dir, control.overwrite_output_dir)?,
        None => {}
    }
    // A causal language model reads documents, not labelled examples.
    let prep = if cfg.problem_type == crate::tasks::ProblemType::CausalLm {
        crate::train::causal_lm::prepare(cfg, &device, progress, world.is_main())?
    } else {
        prepare_for(cfg, &device, progress, world.is_main())?
    };
    for n in &prep.notes {
        if n.starts_with("warning:") {
            progress.message(n);
        } else {
            progress.message(&format!("note: {n}"));
        }
    }
    run(prep, &device, progress, control)
}

/// What a run writes at the top of its output directory.
pub const RUN_FILES: &[&str] = &[
    "checkpoints",
    "model",
    "adapter",
    "metrics.jsonl",
    "runs",
    "recipe.resolved.toml",
    "split.json",
    "skipped_rows.jsonl",
    "confusion_matrix.csv",
    "eval_predictions.jsonl",
    "train_summary.json",
    "report.html",
    "plots",
];

/// Checks that a new run may write into `dir`: it does not exist, is empty, holds only
/// what a run refused for bad input left, or holds a previous run and `overwrite` is set
/// (then that run's files are removed, so that neither `--resume latest` nor a reader of
/// `model/` can mistake them for the new run's). A previous run without `overwrite`, or a non-empty directory
/// that holds no run, is refused: nothing of the user's is written over silently.
pub fn claim_output_dir(dir: &Path, overwrite: bool) -> Result<()> {
    let entries: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => return Ok(()), // absent (or not a directory: creating it will say so)
    };
    if entries.is_empty() {
        return Ok(());
    }
    if !entries.iter().any(|e| RUN_FILES.contains(&e.as_str())) {
        let mut shown = entries.clone();
        shown.sort();
        shown.truncate(3);
        return Err(Error::file(
            dir,
            format!(
                "output_dir is not empty and holds no ferrotune run ({}{}); choose a new or \
                 empty directory",
                shown.join(", "),
                if entries.len() > 3 { ", ..." } else { "" }
            ),
        ));
    }
    // A run that stopped on bad input before training leaves at most these behind;
    // the next attempt writes over them.
    let started = [
        "checkpoints",
        "model",
        "metrics.jsonl",
        "recipe.resolved.toml",
    ];
    if !entries.iter().any(|e| started.contains(&e.as_str())) {
        return Ok(());
    }
    if !overwrite {
        return Err(Error::file(
            dir,
            "output_dir holds a previous run; continue it with --resume latest, or replace \
             it with --overwrite-output-dir",
        ));
    }
    for name in RUN_FILES {
        let p = dir.join(name);
        let removed = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&p, e)),
            _ => {}
        }
    }
    Ok(())
}

/// A test hook: `FERROTUNE_FAILPOINT=name=N` makes the trainer fail at step N in the named
/// way (`abort_after_step`: the process aborts after that step, as if killed;
/// `checkpoint_write_fail`: the checkpoint of that step fails after its first file, as on a
/// full disk; `sleep_ms_per_step`: every step then sleeps N ms, so a signal finds a tiny
/// run still training).
fn failpoint(name: &str) -> Option<usize> {
    let v = std::env::var("FERROTUNE_FAILPOINT").ok()?;
    let (n, step) = v.split_once('=')?;
    if n == name {
        step.parse().ok()
    } else {
        None
    }
}

/// Trains a prepared run: every epoch's steps, then its evaluation and checkpoint; at the
/// end the best epoch is exported.
pub fn run(
    prep: Prepared,
    device: &Device,
    progress: &mut dyn Progress,
    control: &Control,
) -> Result<TrainSummary> {
    let mut run = Run::start(prep, device, progress, control)?;
    for epoch in run.st.epoch..=run.cfg.num_train_epochs {
        if run.st.stopped_early {
            break;
        }
        run.train_epoch(epoch, progress, control)?;
        run.evaluate_epoch(epoch, progress)?;
        let dir = run.checkpoint()?;
        let last = epoch == run.cfg.num_train_epochs || run.st.stopped_early;
        // Every rank stops after the same epoch.
        if run.world.any(control.stopping()) && !last {
            return Err(Error::Interrupted {
                step: run.st.step,
                checkpoint: dir,
            });
        }
    }
    run.finish(progress)
}

/// The best epoch so far: its score, number, weights, and evaluation with its logits
/// (`None` after a resume, recomputed at the end).
type Best = (f64, usize, Vec<Tensor>, Option<(Evaluation, Vec<Vec<f32>>)>);

/// A run in progress: the prepared model and data, and everything the loop changes.
pub struct Run {
    cfg: TrainConfig,
    hf: HfConfig,
    family: &'static dyn Family,
    model: Box<dyn Model>,
    params: ParamStore,
    encoder: Box<dyn InputEncoder>,
    labels: LabelMap,
    task: &'static dyn Task,
    train: (Vec<Features>, TargetData),
    /// Each training item's cost (tokens), for `group_by_length`.
    train_costs: Vec<usize>,
    train_ids: Vec<String>,
    eval: (Vec<Features>, TargetData),
    eval_rows: Vec<HeldOut>,
    loss: LossConfig,
    device: Device,
    out: PathBuf,
    recipe: String,
    log: MetricsLog,
    schedule: LrSchedule,
    steps_per_epoch: usize,
    threads: usize,
    /// The linear layers' GEMMs in bf16 (mixed precision: `precision` bf16, or auto on a
    /// CPU where bf16 pays, [`crate::precision::for_training`]).
    mixed_bf16: bool,
    group_lr: Vec<f64>,
    optimizer: Optimizer,
    dropout_rng: ChaCha8Rng,
    best: Option<Best>,
    /// The state a checkpoint saves.
    st: RunState,
    frozen: Vec<bool>,
    /// Gradient buffers, reused from step to step (see [`loss_and_grads_into`]).
    grads: Vec<Option<Vec<f32>>>,
    /// Examples and tokens trained on since `speed_since`, for the throughput line.
    speed: (Instant, usize, usize),
    /// The ranks training together.
    world: World,
    /// Sums the gradients over the ranks (and counts the cost).
    reducer: GradReducer,
    /// The bytes and seconds of `reducer` at the last throughput line.
    reduced_at: (u64, f64),
    /// Some rank was asked to stop during the last step (agreed by all ranks).
    stop_agreed: bool,
    /// The weights' moving average (`model_ema_decay`).
    ema: Option<Ema>,
    /// Mixup / CutMix of training batches.
    mix: Option<MixConfig>,
}

impl Run {
    /// Resumes from the checkpoint `control` names (same recipe only), or starts afresh:
    /// writes the resolved recipe, opens `metrics.jsonl`, sets up the schedule, the
    /// optimizer and the parameter groups.
    pub fn start(
        prep: Prepared,
        device: &Device,
        progress: &mut dyn Progress,
        control: &Control,
    ) -> Result<Run> {
        let Prepared {
            cfg,
            hf,
            family,
            model,
            params,
            encoder,
            labels,
            train,
            train_ids,
            eval,
            eval_rows,
            loss,
            notes,
            ..
        } = prep;
        let out = cfg.output_dir.clone();
        let recipe = cfg.to_toml();
        let world = control.world.clone();
        // The same recipe is not enough: each host reads its own copy of the data.
        if world.is_distributed() {
            let mut data: Vec<u8> = train_ids.join("\n").into_bytes();
            data.extend(labels.labels().join("\n").bytes());
            for f in train.0.iter().chain(&eval.0) {
                data.extend(
                    f.ids
                        .iter()
                        .chain(&f.type_ids)
                        .flat_map(|i| i.to_le_bytes()),
                );
                if let Some(img) = &f.image {
                    data.extend((img.width() as u64).to_le_bytes());
                    data.extend(img.as_raw());
                }
                data.push(b'\n');
            }
            world.check_same("training and evaluation data", &data)?;
        }
        let resume = match &control.resume {
            Some(which) => Some(load_resume(
                &out,
                which,
                &recipe,
                params.state_len(),
                world.size(),
            )?),
            None => None,
        };
        let main = world.is_main();
        if main {
            let rp = out.join("recipe.resolved.toml");
            std::fs::write(&rp, &recipe).map_err(|e| Error::io(&rp, e))?;
        }
        let mut log = match &resume {
            _ if !main => MetricsLog::discard(),
            Some(ck) => MetricsLog::resume(out.join("metrics.jsonl"), ck.state.metrics_len)?,
            None => MetricsLog::create(out.join("metrics.jsonl"))?,
        };
        if let Some(dir) = cfg.tensorboard_dir().filter(|_| main) {
            let resumed_at = resume.as_ref().map(|ck| ck.state.step as u64);
            log = log.with_tensorboard(&dir, resumed_at, &recipe)?;
        }
        let task = cfg.problem_type.task();
        // A global batch is `per_device_train_batch_size` on every rank.
        let batches = train
            .0
            .len()
            .div_ceil(cfg.per_device_train_batch_size * world.size());
        let steps_per_epoch = batches.div_ceil(cfg.gradient_accumulation_steps);
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
        let n = params.params.len();
        let optimizer = match cfg.optimizer {
            OptimizerKind::Adamw => Optimizer::AdamW(AdamW::new(
                AdamWConfig {
                    beta1: cfg.adam_beta1,
                    beta2: cfg.adam_beta2,
                    eps: cfg.adam_epsilon,
                    weight_decay: cfg.weight_decay,
                },
                n,
            )),
            OptimizerKind::Sgd => {
                Optimizer::Sgd(Sgd::new(cfg.momentum, cfg.nesterov, cfg.weight_decay, n))
            }
        };
        // The same generator on every rank: each dropout's seed is shared, and each rank
        // draws the masks of its own sequences (`Ctx::row0`).
        let dropout_rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(1));
        let mut run = Run {
            group_lr: group_learning_rates(&cfg, &params.groups),
            dropout_rng,
            world,
            reducer: GradReducer::default(),
            reduced_at: (0, 0.0),
            stop_agreed: false,
            mix: cfg.mixing().then_some(MixConfig {
                mixup_alpha: cfg.mixup_alpha,
                cutmix_alpha: cfg.cutmix_alpha,
                prob: cfg.mixup_prob,
                switch_prob: cfg.mixup_switch_prob,
            }),
            ema: cfg
                .model_ema_decay
                .map(|d| Ema::new(d, cfg.model_ema_warmup)),
            threads: candle_core::utils::get_num_threads(),
            mixed_bf16: crate::precision::for_training(cfg.precision)?.0 == Precision::Bf16,
            frozen: Vec::new(),
            grads: vec![None; n],
            speed: (Instant::now(), 0, 0),
            st: RunState::default(),
            train_costs: train.0.iter().map(|f| encoder.cost(f)).collect(),
            best: None,
            cfg,
            hf,
            family,
            model,
            params,
            encoder,
            labels,
            task,
            train,
            train_ids,
            eval,
            eval_rows,
            loss,
            device: device.clone(),
            out,
            recipe,
            log,
            schedule,
            steps_per_epoch,
            optimizer,
        };
        run.log_start(&notes, progress)?;
        if let Some(ck) = resume {
            run.restore(ck, progress)?;
        }
        run.frozen = frozen_groups(&run.cfg, &run.params.groups, run.st.epoch, run.st.step);
        if run.st.step == 0 {
            let Run {
                log,
                params,
                group_lr,
                frozen,
                ..
            } = &mut run;
            log_groups(log, params, group_lr, frozen, 0, progress)?;
        }
        Ok(run)
    }

    /// The run's first log line and message: data, model and schedule sizes.
    fn log_start(&mut self, notes: &[String], progress: &mut dyn Progress) -> Result<()> {
        let (train_n, eval_n) = (self.train.0.len(), self.eval.0.len());
        let (total, warmup) = (self.schedule.total_steps, self.schedule.warmup_steps);
        let (precision, why) = crate::precision::for_training(self.cfg.precision)?;
        let hosts = self.world.hosts();
        let transport = self.world.comm().transport();
        self.log.line(json!({
            "split": "run",
            "threads": self.threads,
            "world_size": self.world.size(),
            "hosts": hosts,
            "mpi": crate::dist::MPI_BUILT_IN,
            "transport": transport,
            "global_batch_size": self.cfg.per_device_train_batch_size * self.world.size(),
            "precision": precision.name(),
            "precision_reason": why,
            "cpu_features": crate::precision::cpu_features(),
            "build": crate::BUILD_PROFILE,
            "model_type": self.family.model_type(),
            "problem_type": self.task.name(),
            "loss": self.loss.kind.name(),
            "train_examples": train_n,
            "eval_examples": eval_n,
            "num_labels": self.labels.len(),
            "labels": self.labels.labels(),
            "parameters": self.params.count(),
            "total_steps": total,
            "warmup_steps": warmup,
            "notes": notes,
            "warnings": notes.iter().filter(|n| n.starts_with("warning:")).count(),
        }))?;
        progress.message(&format!(
            "{} training / {} evaluation examples, {} labels, {} parameters ({}), {} steps ({} warm-up), {} threads, {}{}",
            train_n,
            eval_n,
            self.labels.len(),
            self.params.count(),
            self.family.name(),
            total,
            warmup,
            self.threads,
            why,
            if crate::DEBUG_BUILD {
                " (a debug build: its timings are not ferrotune's speed; build with --release)"
            } else {
                ""
            }
        ));
        if self.world.is_distributed() {
            let mut distinct = hosts.clone();
            distinct.dedup();
            progress.message(&format!(
                "{} ranks × {} threads over {} on {}; global batch {} ({} per rank)",
                self.world.size(),
                self.threads,
                transport.unwrap_or_default(),
                distinct.join(", "),
                self.cfg.per_device_train_batch_size * self.world.size(),
                self.cfg.per_device_train_batch_size
            ));
            if let Some(note) = crate::dist::signal_note() {
                progress.message(&format!("note: {note}"));
            }
        }
        Ok(())
    }

    /// Sets the weights, optimizer state, dropout generator and run state from a checkpoint.
    fn restore(&mut self, ck: Checkpoint, progress: &mut dyn Progress) -> Result<()> {
        self.params.restore(&ck.weights)?;
        self.optimizer
            .import_state(&ck.optimizer, &ck.state.optimizer_steps)?;
        self.dropout_rng.set_word_pos(ck.state.rng_word_pos);
        if let (Some((score, epoch)), Some(w)) = (ck.state.best, ck.best) {
            self.best = Some((score, epoch, w, None));
        }
        if let (Some(ema), Some(w)) = (&mut self.ema, &ck.ema) {
            ema.restore(w, ck.state.ema_updates)?;
        }
        progress.message(&format!(
            "resuming from {} (step {}, epoch {})",
            ck.dir.display(),
            ck.state.step,
            ck.state.epoch
        ));
        self.st = ck.state;
        Ok(())
    }

    /// Writes a checkpoint of the current state and returns its directory.
    fn checkpoint(&mut self) -> Result<PathBuf> {
        let (opt_tensors, opt_steps) = self.optimizer.export_state();
        let st = &mut self.st;
        st.rng_word_pos = self.dropout_rng.get_word_pos();
        st.metrics_len = self.log.bytes_written()?;
        st.optimizer_steps = opt_steps;
        st.best = self.best.as_ref().map(|(s, e, ..)| (*s, *e));
        st.world_size = self.world.size();
        st.ema_updates = self.ema.as_ref().map_or(0, |e| e.updates);
        if !self.world.is_main() {
            // Every rank holds the same state; rank 0 writes it.
            return Ok(checkpoint::checkpoints_dir(&self.out));
        }
        let ema = match &self.ema {
            Some(e) => e.tensors(&self.params)?,
            None => None,
        };
        let snap = Snapshot {
            state: st,
            weights: self.params.current(),
            optimizer: opt_tensors,
            best: self.best.as_ref().map(|(_, _, w, _)| w.as_slice()),
            ema: ema.as_deref(),
            recipe: self.recipe.clone(),
        };
        let fail = failpoint("checkpoint_write_fail")
            .filter(|&s| s == st.step)
            .map(|_| 1);
        let keep = self.cfg.save_total_limit.unwrap_or(0);
        checkpoint::save(&self.out, &snap, keep, fail)
    }

    /// One epoch of optimisation steps (from where a resumed run left off); stops with a
    /// checkpoint when `control` asks.
    pub fn train_epoch(
        &mut self,
        epoch: usize,
        progress: &mut dyn Progress,
        control: &Control,
    ) -> Result<()> {
        let (bs, accum) = (
            self.cfg.per_device_train_batch_size,
            self.cfg.gradient_accumulation_steps,
        );
        let n = self.train.0.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(
            self.cfg
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(epoch as u64),
        ));
        // Global batches: `bs` examples for every rank (split in `window_gradients`).
        let global_bs = bs * self.world.size();
        if self.cfg.group_by_length {
            order = group_by_length(&order, &self.train_costs, global_bs);
        }
        let epochs = self.cfg.num_train_epochs;
        progress.start(&format!("train epoch {epoch}/{epochs}"), n as u64);
        let t0 = Instant::now();
        self.speed = (t0, 0, 0);
        let batches: Vec<&[usize]> = order.chunks(global_bs).collect();
        let windows: Vec<&[&[usize]]> = batches.chunks(accum).collect();
        // A resumed run skips the windows its checkpoint had done.
        let skip = if epoch == self.st.epoch {
            self.st.window
        } else {
            0
        };
        if skip > 0 {
            let done: usize = windows[..skip.min(windows.len())]
                .iter()
                .flat_map(|w| w.iter())
                .map(|c| c.len())
                .sum();
            progress.advance(done as u64);
        }
        for (wi, window) in windows.iter().enumerate().skip(skip) {
            self.train_window(epoch, window, progress, control)?;
            let step = self.st.step;
            let last_window = wi + 1 == windows.len();
            // Ranks agree on stopping within the step's gradient sum.
            let interrupted = if self.world.is_distributed() {
                self.stop_agreed
            } else {
                control.stopping()
            };
            let periodic = self.cfg.save_steps.is_some_and(|k| step.is_multiple_of(k));
            if (interrupted || periodic) && !last_window {
                self.st.epoch = epoch;
                self.st.window = wi + 1;
                let elapsed = t0.elapsed().as_secs_f64();
                self.st.train_seconds += elapsed;
                let dir = self.checkpoint()?;
                self.st.train_seconds -= elapsed;
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
            if let Some(ms) = failpoint("sleep_ms_per_step") {
                std::thread::sleep(std::time::Duration::from_millis(ms as u64));
            }
        }
        self.st.train_seconds += t0.elapsed().as_secs_f64();
        progress.finish();
        Ok(())
    }

    /// One optimisation step over an accumulation window of batches: gradients, penalties,
    /// clipping, the optimizer update (or a skipped step when the loss or gradient is not
    /// finite), and the training log line every `logging_steps`.
    fn train_window(
        &mut self,
        epoch: usize,
        window: &[&[usize]],
        progress: &mut dyn Progress,
        control: &Control,
    ) -> Result<()> {
        let step = self.st.step;
        let now = frozen_groups(&self.cfg, &self.params.groups, epoch, step);
        if now != self.frozen {
            self.frozen = now;
            log_groups(
                &mut self.log,
                &self.params,
                &self.group_lr,
                &self.frozen,
                step,
                progress,
            )?;
        }
        let (loss, bad) = self.window_gradients(window, progress, control)?;
        let norm = grad_norm(&self.grads);
        let bad = bad.or_else(|| (!norm.is_finite()).then(|| format!("gradient norm {norm}")));
        let factor = self.schedule.factor(step);
        match bad {
            Some(reason) => self.skip_step(epoch, window, &reason, progress)?,
            None => {
                self.st.bad_in_row = 0;
                let lrs: Vec<f64> = self
                    .params
                    .params
                    .iter()
                    .map(|p| self.group_lr[p.group] * factor)
                    .collect();
                let clip = clip_factor(norm, self.cfg.max_grad_norm);
                self.optimizer.step(&self.params, &self.grads, clip, &lrs)?;
                if let Some(ema) = &mut self.ema {
                    ema.update(&self.params)?;
                }
                self.st.loss_acc += loss;
                self.st.loss_n += 1;
            }
        }
        self.st.step += 1;
        let step = self.st.step;
        for batch in window {
            self.speed.1 += batch.len();
            self.speed.2 += batch.iter().map(|&i| self.train_costs[i]).sum::<usize>();
        }
        if step.is_multiple_of(self.cfg.logging_steps) {
            // Wall-clock rates on a line of their own: the train line stays exactly the
            // same across an interrupted and resumed run.
            let secs = self.speed.0.elapsed().as_secs_f64().max(1e-9);
            self.log.line(json!({
                "split": "throughput",
                "step": step,
                "examples_per_second": self.speed.1 as f64 / secs,
                "tokens_per_second": self.speed.2 as f64 / secs,
            }))?;
            self.speed = (Instant::now(), 0, 0);
            if self.world.is_distributed() {
                // What the gradient sums cost per step since the last such line.
                let (bytes, comm) = (self.reducer.bytes, self.reducer.seconds);
                let k = self.cfg.logging_steps as f64;
                self.log.line(json!({
                    "split": "allreduce",
                    "step": step,
                    "bytes_per_step": (bytes - self.reduced_at.0) as f64 / k,
                    "seconds_per_step": (comm - self.reduced_at.1) / k,
                    "step_seconds": secs / k,
                }))?;
                self.reduced_at = (bytes, comm);
            }
            self.log.line(json!({
                "split": "train",
                "step": step,
                "epoch": step as f64 / self.steps_per_epoch as f64,
                "loss": self.st.loss_acc / self.st.loss_n.max(1) as f64,
                "learning_rate": self.cfg.learning_rate * factor,
                "grad_norm": norm,
            }))?;
            self.st.loss_acc = 0.0;
            self.st.loss_n = 0;
        }
        Ok(())
    }

    /// The window's gradients into [`Run::grads`] and its loss (penalties included), and
    /// why the step must be skipped, if a loss was not finite. Each micro-batch's mean
    /// loss is weighted by its share of the window's examples: the summed gradient is
    /// that of the mean over the whole window.
    fn window_gradients(
        &mut self,
        window: &[&[usize]],
        progress: &mut dyn Progress,
        control: &Control,
    ) -> Result<(f64, Option<String>)> {
        // Examples, or for causal LM counted tokens (`TargetData::weight`).
        let window_n: f64 = window.iter().map(|c| self.train.1.weight(c)).sum();
        let mut bad = None;
        let mut loss = 0.0f64;
        let mut first = true;
        for (micro, chunk) in window.iter().enumerate() {
            // This rank's part of the global batch; weighted by its share of the whole
            // window, the ranks' gradients sum to that of the window's mean loss.
            let part = self.world.range(chunk.len());
            let mine = &chunk[part.clone()];
            progress.advance(chunk.len() as u64);
            if mine.is_empty() {
                continue;
            }
            let items: Vec<&Features> = mine.iter().map(|&i| &self.train.0[i]).collect();
            // Random transforms (images) are seeded by the run's seed, the step, the
            // micro-batch and the example's place in the global batch: a resumed run, or
            // one split over ranks, draws the same.
            let seed = crate::dist::hash64(
                &[self.cfg.seed, self.st.step as u64, micro as u64]
                    .map(u64::to_le_bytes)
                    .concat(),
            )
            .wrapping_add(part.start as u64);
            let batch = self.encoder.collate_train(&items, seed, &self.device)?;
            let y = self.train.1.select(mine, &self.device)?;
            // Mixup / CutMix: one draw per micro-batch, the same on every rank; each
            // rank mixes its part of the batch with that part reversed.
            let (batch, y) = match &self.mix {
                Some(m) => {
                    let (_, h, w, _) = batch.pixels()?.pixels.dims4()?;
                    let s = crate::dist::hash64(
                        &[
                            self.cfg.seed,
                            self.st.step as u64,
                            micro as u64,
                            0x6d69_7875,
                        ]
                        .map(u64::to_le_bytes)
                        .concat(),
                    );
                    crate::data::mixup::apply(batch, y, m.draw(h, w, s)?)?
                }
                None => (batch, y),
            };
            let share = self.train.1.weight(mine) / window_n.max(f64::MIN_POSITIVE);
            // Where this rank's part begins in the global batch (the dropout masks
            // follow the sequence: the same as one process's).
            let row0 = part.start as u64;
            // LoRA's dropout seeds derive from the generator's position without drawing
            // (`nn::lora::Lora::delta`): one draw per micro-batch moves them on.
            if self.cfg.lora_r > 0 && self.cfg.lora_dropout > 0.0 {
                let _: u64 = self.dropout_rng.random();
            }
            let ctx = Ctx {
                train: true,
                frozen: &self.frozen,
                rng: Some(&mut self.dropout_rng),
                int8: false,
                bf16: self.mixed_bf16,
                row0,
                tokens: batch
                    .tokens()
                    .ok()
                    .and_then(|t| t.input_ids.dims2().ok())
                    .unwrap_or((0, 0)),
                freeze_bn: self.cfg.freeze_bn,
            };
            // The window's first batch overwrites the buffers kept from the last step,
            // the others add to them.
            let l = loss_and_grads_into(
                self.model.as_ref(),
                &self.params,
                &batch,
                &y,
                &self.loss,
                share,
                ctx,
                &mut self.grads,
                !first,
            )?;
            first = false;
            if !l.is_finite() && bad.is_none() {
                bad = Some(format!("loss {l}"));
            }
            loss += l as f64 * share;
        }
        if self.world.is_distributed() {
            if first {
                // No example here this step: no gradient (zeros in the sum).
                self.grads.iter_mut().for_each(|g| *g = None);
            }
            let sizes: Vec<Option<usize>> = self
                .params
                .params
                .iter()
                .map(|p| {
                    let frozen = self.frozen.get(p.group).copied().unwrap_or(false);
                    (!frozen).then(|| p.var.as_tensor().elem_count())
                })
                .collect();
            let mut scalars = [
                loss,
                bad.is_some() as u8 as f64,
                control.stopping() as u8 as f64,
            ];
            self.reducer
                .reduce(&self.world, &sizes, &mut self.grads, &mut scalars);
            loss = scalars[0];
            if bad.is_none() && scalars[1] > 0.0 {
                bad = Some(format!("non-finite loss on {} rank(s)", scalars[1]));
            }
            self.stop_agreed = scalars[2] > 0.0;
            // A rank that had no example drew no dropout masks: all continue from the
            // furthest position, so the generators stay in step (and a checkpoint's one
            // position holds for every rank).
            if window.iter().any(|c| c.len() < self.world.size()) {
                let pos = self.world.max_u64(self.dropout_rng.get_word_pos() as u64);
                self.dropout_rng.set_word_pos(pos as u128);
            }
        }
        let (l1, l2) = (self.cfg.l1_penalty, self.cfg.l2_penalty);
        loss += add_penalties(&self.params, &mut self.grads, l1, l2)?;
        Ok((loss, bad))
    }

    /// A non-finite step is skipped: no update, logged and counted; too many in a row stop
    /// the run (the last good checkpoint stays).
    fn skip_step(
        &mut self,
        epoch: usize,
        window: &[&[usize]],
        reason: &str,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let step = self.st.step;
        self.st.bad_in_row += 1;
        self.st.bad_total += 1;
        let rows: Vec<&str> = window
            .iter()
            .flat_map(|c| c.iter())
            .map(|&i| self.train_ids[i].as_str())
            .collect();
        self.log
            .line(json!({"split": "train", "step": step + 1, "skipped": reason, "rows": rows}))?;
        progress.message(&format!(
            "step {}: {reason}, step skipped ({} in a row)",
            step + 1,
            self.st.bad_in_row
        ));
        if self.st.bad_in_row > self.cfg.max_bad_steps {
            let last = checkpoint::list(&checkpoint::checkpoints_dir(&self.out))
                .pop()
                .map(|(_, d)| d.display().to_string())
                .unwrap_or_else(|| "none".into());
            return Err(Error::Msg(format!(
                "stopped: {} non-finite steps in a row, the last at step {} (epoch {epoch}, {reason}) on rows {} of {}; last good checkpoint: {last}",
                self.st.bad_in_row,
                step + 1,
                rows.join(", "),
                self.cfg.train_file.display()
            )));
        }
        Ok(())
    }

    /// The evaluation of the model as it is now, and its logits.
    fn evaluate(&self, progress: &mut dyn Progress) -> Result<(Evaluation, Vec<Vec<f32>>)> {
        if self.world.is_distributed() {
            return self.evaluate_shared(progress);
        }
        evaluate(
            self.model.as_ref(),
            self.encoder.as_ref(),
            (&self.eval.0, &self.eval.1),
            self.task,
            &self.loss,
            self.cfg.threshold,
            self.cfg.per_device_eval_batch_size,
            &self.device,
            progress,
        )
    }

    /// [`Run::evaluate`] over several ranks: each infers its part of the evaluation set,
    /// the logits are gathered on every rank (in order), and each computes the same
    /// metrics from them, so that all agree on the best epoch and on early stopping.
    fn evaluate_shared(&self, progress: &mut dyn Progress) -> Result<(Evaluation, Vec<Vec<f32>>)> {
        let items = &self.eval.0;
        let mine = self.world.part(items);
        let start = self.world.range(items.len()).start;
        let my_targets = self
            .eval
            .1
            .keep(&(start..start + mine.len()).collect::<Vec<_>>());
        let logits = eval_outputs(
            self.model.as_ref(),
            self.encoder.as_ref(),
            mine,
            &my_targets,
            self.cfg.per_device_eval_batch_size,
            &self.device,
            |n| progress.advance(n as u64),
        )?;
        let width = self
            .world
            .max_u64(logits.first().map_or(0, |l| l.len()) as u64) as usize;
        let flat: Vec<f32> = logits.concat();
        let counts: Vec<usize> = self
            .world
            .part_counts(items.len())
            .iter()
            .map(|c| c * width)
            .collect();
        let all = self.world.comm().gather_f32(&flat, &counts);
        progress.advance((items.len() - mine.len()) as u64);
        let logits: Vec<Vec<f32>> = all.chunks(width.max(1)).map(<[f32]>::to_vec).collect();
        let ev = self
            .task
            .evaluate(&logits, &self.eval.1, &self.loss, self.cfg.threshold)?;
        Ok((ev, logits))
    }

    /// The evaluation after an epoch: logged and printed; the best epoch's weights kept;
    /// early stopping decided.
    pub fn evaluate_epoch(&mut self, epoch: usize, progress: &mut dyn Progress) -> Result<()> {
        let step = self.st.step;
        progress.start(&format!("eval epoch {epoch}"), self.eval.0.len() as u64);
        let (ev, logits) = self.evaluate(progress)?;
        progress.finish();
        // With a moving average of the weights, it is evaluated too; as in timm, its
        // evaluation picks the best epoch and its weights are what is kept and exported.
        let ema_eval = match self.ema.as_ref().map(|e| e.tensors(&self.params)) {
            Some(Ok(Some(avg))) => {
                let now = self.params.snapshot()?;
                self.params.restore(&avg)?;
                progress.start(
                    &format!("eval epoch {epoch} (EMA)"),
                    self.eval.0.len() as u64,
                );
                let r = self.evaluate(progress);
                progress.finish();
                self.params.restore(&now)?;
                Some((r?, avg))
            }
            Some(Err(e)) => return Err(e),
            _ => None,
        };
        let mut line = serde_json::Map::new();
        line.insert("epoch".into(), json!(epoch));
        line.insert("split".into(), json!("eval"));
        line.insert("step".into(), json!(step));
        for (k, v) in &ev.metrics {
            line.insert(format!("eval_{k}"), json!(v));
        }
        if let Some(((e, _), _)) = &ema_eval {
            for (k, v) in &e.metrics {
                line.insert(format!("eval_ema_{k}"), json!(v));
            }
        }
        self.log.line(serde_json::Value::Object(line))?;
        let mut shown: Vec<String> = self
            .task
            .headline()
            .iter()
            .map(|k| format!("eval_{k} {:.4}", ev.get(k)))
            .collect();
        if let Some(((e, _), _)) = &ema_eval {
            shown.extend(
                self.task
                    .headline()
                    .iter()
                    .map(|k| format!("eval_ema_{k} {:.4}", e.get(k))),
            );
        }
        progress.message(&format!("epoch {epoch}: {}", shown.join(" ")));
        let (best_name, greater) = self.cfg.best_metric().unwrap_or(("loss", false));
        let mut metrics = ev.metrics.clone();
        if let Some(((e, _), _)) = &ema_eval {
            for (k, v) in &e.metrics {
                metrics.insert(format!("ema_{k}"), *v);
            }
        }
        let m = EpochMetrics { epoch, metrics };
        let (ev, logits, weights) = match ema_eval {
            Some(((e, l), avg)) => (e, l, Some(avg)),
            None => (ev, logits, None),
        };
        let score = ev.get(best_name);
        let better = match &self.best {
            None => true,
            Some((b, ..)) if greater => score > *b,
            Some((b, ..)) => score < *b,
        };
        self.st.epochs.push(m);
        if better {
            let weights = match weights {
                Some(w) => w,
                None => self.params.snapshot()?,
            };
            self.best = Some((score, epoch, weights, Some((ev, logits))));
            self.st.since_best = 0;
        } else {
            self.st.since_best += 1;
            if let Some(p) = self.cfg.early_stopping_patience {
                if self.st.since_best >= p && epoch < self.cfg.num_train_epochs {
                    self.log
                        .line(json!({"split": "early_stop", "epoch": epoch, "step": step}))?;
                    progress.message(&format!(
                        "early stopping: no better eval_{best_name} for {p} evaluation(s)"
                    ));
                    self.st.stopped_early = true;
                }
            }
        }
        self.st.epoch = epoch + 1;
        self.st.window = 0;
        Ok(())
    }

    /// The end of the run: the best epoch's weights restored, its report written, the
    /// model exported, the summary written.
    pub fn finish(mut self, progress: &mut dyn Progress) -> Result<TrainSummary> {
        let (best_name, _) = self.cfg.best_metric().unwrap_or(("loss", false));
        let (best_score, best_epoch, snap, best_eval) = self
            .best
            .take()
            .ok_or_else(|| Error::Msg("no epoch ran".into()))?;
        self.params.restore(&snap)?;
        // After a resume the best epoch's evaluation is recomputed from its weights.
        let (best_eval, logits) = match best_eval {
            Some(ev) => ev,
            None => self.evaluate(&mut Silent)?,
        };
        if !self.world.is_main() {
            // Rank 0 writes the report, predictions and model.
            return Ok(TrainSummary::of(
                self.st,
                best_epoch,
                self.out.join("model"),
            ));
        }
        self.log.line(
            json!({"split": "best", "epoch": best_epoch, "metric": best_name, "value": best_score}),
        )?;
        if let Some(r) = &best_eval.report {
            let names = self.labels.labels();
            let p = self.out.join("confusion_matrix.csv");
            write_whole(&p, r.confusion_csv(names).as_bytes())?;
            progress.message(&format!(
                "best epoch {best_epoch}, per class:\n{}",
                r.per_class_table(names)
            ));
            progress.message(&format!(
                "confusion matrix (rows: true, columns: predicted), also in {}:\n{}",
                p.display(),
                r.confusion_csv(names).trim_end()
            ));
        }
        let bytes = if self.task.language_model() {
            crate::train::causal_lm::predictions_jsonl(&self.eval_rows, &logits)
        } else {
            predictions_jsonl(
                self.task,
                self.labels.labels(),
                self.cfg.threshold,
                &self.loss,
                &self.eval_rows,
                &logits,
                &self.eval.1,
            )?
        };
        write_whole(&self.out.join("eval_predictions.jsonl"), &bytes)?;
        let model_dir = self.out.join("model");
        self.export(&model_dir, best_epoch)?;
        let st = self.st;
        let summary = json!({
            "best_epoch": best_epoch,
            "best_metric": best_name,
            "best_value": best_score,
            "train_seconds": st.train_seconds,
            "steps": st.step,
            "stopped_early": st.stopped_early,
            "threads": self.threads,
        });
        let sp = self.out.join("train_summary.json");
        write_whole(&sp, summary.to_string().as_bytes())?;
        progress.message(&format!(
            "best epoch {best_epoch} (eval_{best_name} {best_score:.4}); model written to {}",
            model_dir.display()
        ));
        Ok(TrainSummary::of(st, best_epoch, model_dir))
    }

    /// Writes the model as it is now to `dir` (a Hugging Face directory). With LoRA, the
    /// PEFT adapter goes to `adapter` beside it (see [`Trainer::export_adapter`]) and
    /// `dir` holds the merged model unless `merge_adapters` is off.
    fn export(&self, dir: &Path, best_epoch: usize) -> Result<()> {
        let cfg = &self.cfg;
        let card = self.model_card(best_epoch);
        let spec = self.export_spec(card);
        if self.params.lora.is_some() {
            let adapter = dir.with_file_name("adapter");
            self.export_adapter(&adapter, &spec)?;
            if !cfg.merge_adapters {
                return Ok(());
            }
        }
        export_model(dir, &spec)
    }

    /// Writes the PEFT adapter directory `dir` (`adapter_config.json`,
    /// `adapter_model.safetensors`) and `ferrotune_config.json`
    /// (the exported model's `config.json`: labels and settings for `--adapter`).
    fn export_adapter(&self, dir: &Path, spec: &ExportSpec) -> Result<()> {
        let cfg = serde_json::to_vec_pretty(&crate::export::export_config(spec))
            .map_err(|e| Error::Msg(format!("cannot serialise the config: {e}")))?;
        // The base model as the run loaded it (PEFT writes the path or id given to
        // `from_pretrained`).
        let base = self.cfg.model_name_or_path.display().to_string();
        let task = crate::nn::lora::task_type(self.labels.labels().len());
        crate::nn::lora::write_adapter(
            dir,
            &self.params,
            &base,
            task,
            &[(crate::export::ADAPTER_SIDE_CONFIG, cfg)],
        )
    }

    /// What [`export_model`] writes for the model as it is now.
    fn export_spec(&self, card: String) -> ExportSpec<'_> {
        let cfg = &self.cfg;
        ExportSpec {
            base: &self.hf,
            family: self.family,
            source_dir: &cfg.model_name_or_path,
            params: &self.params,
            tokenizer: self.encoder.tokenizer(),
            labels: self.labels.labels(),
            problem_type: self.task.name(),
            info: ExportInfo {
                pooling: self.model.pooling(),
                max_seq_length: cfg.max_seq_length,
                text_column: cfg.input_column().to_string(),
                text_pair_column: cfg.text_pair_column.clone(),
                label_column: cfg.label_column.clone(),
                threshold: cfg.threshold,
                label_separator: cfg.label_separator.clone(),
                header: cfg.header,
                column_names: cfg.column_names.clone(),
                image_eval: self.encoder.image_eval().cloned(),
            },
            card: Some(card),
        }
    }

    /// The exported model's card: the run's settings and per-epoch results.
    fn model_card(&self, best_epoch: usize) -> String {
        let cfg = &self.cfg;
        let base_dir = cfg.model_name_or_path.file_name().map_or_else(
            || cfg.model_name_or_path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        // The Hub id when the pretrained config's `_name_or_path` is `<owner>/<this
        // directory's name>` (a saved config often names the model it came from instead,
        // e.g. all-MiniLM-L6-v2's names nreimers/MiniLM-L6-H384-uncased), else the name.
        let base = self
            .hf
            .raw
            .get("_name_or_path")
            .and_then(|v| v.as_str())
            .filter(|n| {
                n.rsplit_once('/').is_some_and(|(owner, tail)| {
                    tail == base_dir && !owner.is_empty() && !owner.contains(['.', '/'])
                })
            })
            .map_or(base_dir.clone(), str::to_string);
        let name = self.out.file_name().map_or_else(
            || "ferrotune-model".to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let (best_metric, _) = cfg.best_metric().unwrap_or(("loss", false));
        let settings = vec![
            ("learning_rate", format!("{}", cfg.learning_rate)),
            ("num_train_epochs", cfg.num_train_epochs.to_string()),
            (
                "per_device_train_batch_size",
                cfg.per_device_train_batch_size.to_string(),
            ),
            (
                "gradient_accumulation_steps",
                cfg.gradient_accumulation_steps.to_string(),
            ),
            ("max_seq_length", cfg.max_seq_length.to_string()),
            (
                "lr_scheduler_type",
                format!("{:?}", cfg.lr_scheduler_type).to_lowercase(),
            ),
            ("warmup_ratio", cfg.warmup_ratio.to_string()),
            ("weight_decay", cfg.weight_decay.to_string()),
            ("optimizer", format!("{:?}", cfg.optimizer).to_lowercase()),
            ("loss", self.loss.kind.name().to_string()),
            ("seed", cfg.seed.to_string()),
            (
                "pooling",
                format!("{:?}", self.model.pooling()).to_lowercase(),
            ),
        ];
        crate::card::model_card(&crate::card::CardFacts {
            name: &name,
            base_model: &base,
            model_type: self.family.model_type(),
            problem_type: self.task.name(),
            labels: self.labels.labels(),
            settings,
            epochs: self
                .st
                .epochs
                .iter()
                .map(|e| (e.epoch, &e.metrics))
                .collect(),
            best_epoch,
            best_metric,
            dataset: &cfg
                .train_file
                .file_name()
                .map_or_else(|| "data".to_string(), |n| n.to_string_lossy().into_owned()),
            train_examples: self.train.0.len(),
            eval_examples: self.eval.0.len(),
        })
    }
}

/// The checkpoint `which` of the run in `out`, checked to be of the same recipe.
fn load_resume(
    out: &Path,
    which: &str,
    recipe: &str,
    n_params: usize,
    world_size: usize,
) -> Result<Checkpoint> {
    let dir = checkpoint::resolve(out, which)?;
    let ck = checkpoint::load(&dir, n_params)?;
    if ck.state.world_size != world_size {
        let n = ck.state.world_size;
        return Err(Error::file(
            dir.join("state.json"),
            format!(
                "the checkpoint was written by a run of {n} rank(s) and this run has \
                 {world_size}: the global batch and the data order depend on it; resume \
                 with {}",
                if n == 1 {
                    "a single process (no mpirun)".to_string()
                } else {
                    format!("mpirun -n {n}")
                }
            ),
        ));
    }
    let rp = dir.join("recipe.resolved.toml");
    let theirs = std::fs::read_to_string(&rp).map_err(|e| Error::io(&rp, e))?;
    if theirs != recipe {
        return Err(Error::file(
            rp,
            format!(
                "the checkpoint was written by a different recipe ({}); resume with the \
                 same recipe and --set values",
                recipe_diff(&theirs, recipe)
            ),
        ));
    }
    Ok(ck)
}

/// The keys whose values differ between two resolved recipes, as
/// "`key` was OLD, now NEW; ...".
fn recipe_diff(old: &str, new: &str) -> String {
    let parse = |s: &str| s.parse::<toml::Table>().unwrap_or_default();
    let (old, new) = (parse(old), parse(new));
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&toml::Value>| v.map_or("unset".to_string(), |v| v.to_string());
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| format!("`{k}` was {}, now {}", show(old.get(k)), show(new.get(k))))
        .collect();
    if diffs.is_empty() {
        "the files differ in layout only".to_string()
    } else {
        diffs.join("; ")
    }
}

//! Checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! A checkpoint is a directory `OUTPUT_DIR/checkpoints/checkpoint-<step>/` holding
//! `model.safetensors` (the current weights), `optimizer.safetensors` (moments / momentum
//! buffers), `best.safetensors` (the best epoch's weights so far, if any), `state.json`
//! (step, epoch, position in the epoch's data order, dropout generator position, best
//! metric, optimizer step counts, logging accumulators, length of `metrics.jsonl`), a copy
//! of the resolved recipe, and `manifest.json` with the SHA-256 of every file.
//!
//! It is written under `checkpoint-<step>.partial/`, every file is fsynced, then the
//! directory is renamed into place and the parent directory fsynced. A checkpoint counts
//! only when its manifest is present and every checksum matches, so a crash or a failed
//! write mid-checkpoint never leaves one that `--resume latest` would pick.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::formats::safetensors::{write_f32_safetensors, write_safetensors, F32View};

/// Evaluation results of one epoch.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: usize,
    /// Metric name (without `eval_`) → value; see [`crate::tasks::Task::evaluate`].
    pub metrics: BTreeMap<String, f64>,
}

impl EpochMetrics {
    /// A metric by name (without `eval_`); NaN when absent.
    pub fn get(&self, name: &str) -> f64 {
        self.metrics.get(name).copied().unwrap_or(f64::NAN)
    }
}

/// Where a run continues from (everything except tensors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Optimisation steps done.
    pub step: usize,
    /// The epoch (1-based) the next step belongs to.
    pub epoch: usize,
    /// Accumulation windows of that epoch already done.
    pub window: usize,
    /// Position of the dropout generator (ChaCha8 word position).
    pub rng_word_pos: u128,
    /// Training loss summed since the last log line, and the number of steps summed.
    pub loss_acc: f64,
    /// Steps in `loss_acc`.
    pub loss_n: usize,
    /// Best metric value so far and its epoch.
    pub best: Option<(f64, usize)>,
    /// Evaluations since the best one.
    pub since_best: usize,
    /// Evaluation results so far.
    pub epochs: Vec<EpochMetrics>,
    /// Seconds of training so far.
    pub train_seconds: f64,
    /// Bytes of `metrics.jsonl` written when the checkpoint was taken.
    pub metrics_len: u64,
    /// Optimizer per-parameter step counts (AdamW; `None`: no state yet).
    pub optimizer_steps: Vec<Option<u64>>,
    /// Early stopping ended the run (only the export is left).
    #[serde(default)]
    pub stopped_early: bool,
    /// Non-finite steps in a row (skipped).
    #[serde(default)]
    pub bad_in_row: usize,
    /// Non-finite steps in all.
    #[serde(default)]
    pub bad_total: usize,
    /// Ranks that trained together (`mpirun -n`); 1 for one process.
    #[serde(default = "one")]
    pub world_size: usize,
    /// Updates of the weights' moving average (`model_ema_decay`) so far.
    #[serde(default)]
    pub ema_updates: u64,
}

fn one() -> usize {
    1
}

impl Default for RunState {
    /// The state before the first step.
    fn default() -> Self {
        RunState {
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
            world_size: 1,
            ema_updates: 0,
        }
    }
}

/// A checkpoint read back.
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// The run state.
    pub state: RunState,
    /// Current weights by parameter index.
    pub weights: Vec<Tensor>,
    /// Optimizer tensors by name (`m.<i>`, `v.<i>`, `buf.<i>`).
    pub optimizer: HashMap<String, Tensor>,
    /// Best weights so far, by parameter index.
    pub best: Option<Vec<Tensor>>,
    /// The weights' moving average, by parameter index (`ema.safetensors`).
    pub ema: Option<Vec<Tensor>>,
}

/// The checkpoints folder of a run.
pub fn checkpoints_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("checkpoints")
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn indexed(tensors: &[Tensor]) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("p.{i:05}"), t.clone()))
        .collect()
}

fn unindexed(map: HashMap<String, Tensor>, n: usize, path: &Path) -> Result<Vec<Tensor>> {
    (0..n)
        .map(|i| {
            map.get(&format!("p.{i:05}"))
                .cloned()
                .ok_or_else(|| Error::at(path, None, Some(&format!("p.{i:05}")), "tensor missing"))
        })
        .collect()
}

/// What one checkpoint holds, borrowed from the trainer.
pub struct Snapshot<'a> {
    /// The run state.
    pub state: &'a RunState,
    /// Current weights, by parameter index.
    pub weights: Vec<Tensor>,
    /// Optimizer state vectors, by name (borrowed: written without a copy).
    pub optimizer: Vec<(String, &'a [f32])>,
    /// Best weights so far.
    pub best: Option<&'a [Tensor]>,
    /// The weights' moving average.
    pub ema: Option<&'a [Tensor]>,
    /// The resolved recipe (TOML).
    pub recipe: String,
}

/// Writes checkpoint `checkpoint-<step>` atomically and keeps the newest `keep` (0: all).
/// `fail_after_files` is a test hook: stop (with an error) after writing that many files,
/// as a full disk would.
pub fn save(
    output_dir: &Path,
    snap: &Snapshot,
    keep: usize,
    fail_after_files: Option<usize>,
) -> Result<PathBuf> {
    let root = checkpoints_dir(output_dir);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let name = format!("checkpoint-{}", snap.state.step);
    let tmp = root.join(format!("{name}.partial"));
    let dir = root.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    // A write that fails (a full disk) removes its partial directory at once, so that it
    // does not hold the disk until the next run.
    write_partial(&tmp, snap, fail_after_files).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&tmp);
    })?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    sync_file(&root)?;
    prune(&root, keep)?;
    Ok(dir)
}

/// Writes a checkpoint's files and manifest into `tmp`.
fn write_partial(tmp: &Path, snap: &Snapshot, fail_after_files: Option<usize>) -> Result<()> {
    let mut files: Vec<&str> = Vec::new();
    let mut written = 0usize;
    let check_fail = |written: usize| -> Result<()> {
        if fail_after_files == Some(written) {
            return Err(Error::io(
                tmp,
                std::io::Error::other("simulated write failure"),
            ));
        }
        Ok(())
    };
    let save_st = |name: &str, map: &HashMap<String, Tensor>| -> Result<()> {
        let p = tmp.join(name);
        write_safetensors(map, &p)?;
        sync_file(&p)
    };
    save_st("model.safetensors", &indexed(&snap.weights))?;
    files.push("model.safetensors");
    written += 1;
    check_fail(written)?;
    let p = tmp.join("optimizer.safetensors");
    let views = snap
        .optimizer
        .iter()
        .map(|(n, d)| {
            let view = F32View {
                shape: vec![d.len()],
                data: d,
            };
            (n.clone(), view)
        })
        .collect();
    write_f32_safetensors(views, &p)?;
    sync_file(&p)?;
    files.push("optimizer.safetensors");
    written += 1;
    check_fail(written)?;
    if let Some(best) = snap.best {
        save_st("best.safetensors", &indexed(best))?;
        files.push("best.safetensors");
        written += 1;
        check_fail(written)?;
    }
    if let Some(ema) = snap.ema {
        save_st("ema.safetensors", &indexed(ema))?;
        files.push("ema.safetensors");
        written += 1;
        check_fail(written)?;
    }
    let state = serde_json::to_string_pretty(snap.state)
        .map_err(|e| Error::Msg(format!("cannot serialise the run state: {e}")))?;
    write_synced(&tmp.join("state.json"), state.as_bytes())?;
    files.push("state.json");
    write_synced(&tmp.join("recipe.resolved.toml"), snap.recipe.as_bytes())?;
    files.push("recipe.resolved.toml");
    written += 2;
    check_fail(written)?;
    let mut sums = serde_json::Map::new();
    for f in &files {
        sums.insert(f.to_string(), sha256_file(&tmp.join(f))?.into());
    }
    let manifest = serde_json::json!({"step": snap.state.step, "sha256": sums});
    write_synced(&tmp.join("manifest.json"), manifest.to_string().as_bytes())
}

/// Complete checkpoints in `root`, oldest first, as (step, directory).
pub fn list(root: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            Some((step, e.path()))
        })
        .filter(|(_, p)| verify(p).is_ok())
        .collect();
    out.sort();
    out
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let all = list(root);
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Checks a checkpoint's manifest and checksums.
pub fn verify(dir: &Path) -> Result<()> {
    let mp = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mp).map_err(|e| Error::io(&mp, e))?;
    let m: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::file(&mp, format!("invalid: {e}")))?;
    let sums = m
        .get("sha256")
        .and_then(|s| s.as_object())
        .ok_or_else(|| Error::at(&mp, None, Some("sha256"), "missing"))?;
    for (f, want) in sums {
        let got = sha256_file(&dir.join(f))?;
        if Some(got.as_str()) != want.as_str() {
            return Err(Error::at(&mp, None, Some(f), "checksum does not match"));
        }
    }
    Ok(())
}

/// The checkpoint `--resume` names: `latest` (the newest complete one in the run's
/// `checkpoints/`) or a checkpoint directory.
pub fn resolve(output_dir: &Path, which: &str) -> Result<PathBuf> {
    if which == "latest" {
        let root = checkpoints_dir(output_dir);
        return list(&root)
            .pop()
            .map(|(_, p)| p)
            .ok_or_else(|| Error::file(&root, "no complete checkpoint to resume from"));
    }
    let p = PathBuf::from(which);
    verify(&p)?;
    Ok(p)
}

/// Reads a checkpoint of a model with `n_params` parameters.
pub fn load(dir: &Path, n_params: usize) -> Result<Checkpoint> {
    verify(dir)?;
    let sp = dir.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    let state: RunState =
        serde_json::from_str(&text).map_err(|e| Error::file(&sp, format!("invalid: {e}")))?;
    let read = |name: &str| -> Result<HashMap<String, Tensor>> {
        let p = dir.join(name);
        crate::formats::safetensors::read_safetensors(&p, &Device::Cpu)
    };
    let weights = unindexed(
        read("model.safetensors")?,
        n_params,
        &dir.join("model.safetensors"),
    )?;
    let optimizer = read("optimizer.safetensors")?;
    let bp = dir.join("best.safetensors");
    let best = if bp.exists() {
        Some(unindexed(read("best.safetensors")?, n_params, &bp)?)
    } else {
        None
    };
    let ep = dir.join("ema.safetensors");
    let ema = if ep.exists() {
        Some(unindexed(read("ema.safetensors")?, n_params, &ep)?)
    } else {
        None
    };
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
        weights,
        optimizer,
        best,
        ema,
    })
}

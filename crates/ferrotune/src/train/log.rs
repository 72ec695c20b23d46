//! What a run reports: progress for the user ([`Progress`]; the library prints nothing
//! itself) and `metrics.jsonl` ([`MetricsLog`]), mirrored to TensorBoard when asked.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::formats::tfevents::EventWriter;

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

/// `metrics.jsonl`: one JSON object per line, flushed as written; with TensorBoard on,
/// each line's numbers also go to an event file as scalars (see [`scalars_of`]), so the
/// two always agree.
pub struct MetricsLog {
    /// `None`: lines are dropped (a rank other than 0 of a distributed run).
    file: Option<File>,
    path: PathBuf,
    tensorboard: Option<EventWriter>,
}

/// The TensorBoard scalars of a `metrics.jsonl` line, and its step: every number of a
/// line whose `split` is S is the scalar `S/<key>` (an `eval_` prefix dropped, so
/// `eval_accuracy` is `eval/accuracy`, as transformers' Trainer names it); a
/// `param_groups` line gives `train/learning_rate/<group>` per group. `None` for a line
/// without a split.
pub fn scalars_of(v: &serde_json::Value) -> Option<(u64, Vec<(String, f32)>)> {
    let obj = v.as_object()?;
    let split = obj.get("split")?.as_str()?;
    let step = obj.get("step").and_then(|s| s.as_u64()).unwrap_or(0);
    let mut out = Vec::new();
    if split == "param_groups" {
        for g in obj.get("groups")?.as_array()? {
            if let (Some(name), Some(lr)) = (
                g.get("group").and_then(|n| n.as_str()),
                g.get("learning_rate").and_then(|l| l.as_f64()),
            ) {
                out.push((format!("train/learning_rate/{name}"), lr as f32));
            }
        }
        return Some((step, out));
    }
    let prefix = format!("{split}_");
    for (k, val) in obj {
        if k == "step" {
            continue;
        }
        if let Some(x) = val.as_f64() {
            let k = k.strip_prefix(&prefix).unwrap_or(k);
            out.push((format!("{split}/{k}"), x as f32));
        }
    }
    Some((step, out))
}

impl MetricsLog {
    /// A new, empty log.
    pub fn create(path: PathBuf) -> Result<Self> {
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog {
            file: Some(file),
            path,
            tensorboard: None,
        })
    }
    /// Opens the log of an interrupted run, cut back to `len` bytes (what it held when the
    /// checkpoint was taken).
    pub fn resume(path: PathBuf, len: u64) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        file.set_len(len).map_err(|e| Error::io(&path, e))?;
        let mut file = file;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog {
            file: Some(file),
            path,
            tensorboard: None,
        })
    }

    /// A log that writes nothing: ranks other than 0 of a distributed run.
    pub fn discard() -> Self {
        MetricsLog {
            file: None,
            path: PathBuf::new(),
            tensorboard: None,
        }
    }

    /// Also writes every line to a new TensorBoard event file in `dir`, which starts with
    /// `recipe` as text. `resumed_at`: the step a resumed run continues from (TensorBoard
    /// then drops what earlier files logged after it).
    pub fn with_tensorboard(
        mut self,
        dir: &Path,
        resumed_at: Option<u64>,
        recipe: &str,
    ) -> Result<Self> {
        let mut w = EventWriter::create(dir, resumed_at)?;
        let indented: String = recipe.lines().map(|l| format!("    {l}\n")).collect();
        w.text(resumed_at.unwrap_or(0), "recipe", &indented)?;
        self.tensorboard = Some(w);
        Ok(self)
    }
    /// Bytes written so far.
    pub fn bytes_written(&self) -> Result<u64> {
        let Some(file) = &self.file else {
            return Ok(0);
        };
        file.metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(&self.path, e))
    }
    /// Appends one line.
    pub fn line(&mut self, v: serde_json::Value) -> Result<()> {
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        writeln!(file, "{v}")
            .and_then(|_| file.flush())
            .map_err(|e| Error::io(&self.path, e))?;
        if let (Some(w), Some((step, scalars))) = (&mut self.tensorboard, scalars_of(&v)) {
            w.scalars(step, &scalars)?;
        }
        Ok(())
    }
}

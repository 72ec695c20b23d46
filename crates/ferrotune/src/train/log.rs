//! What a run reports: progress for the user ([`Progress`]; the library prints nothing
//! itself) and `metrics.jsonl` ([`MetricsLog`]).

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use crate::error::{Error, Result};

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

/// `metrics.jsonl`: one JSON object per line, flushed as written.
pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    /// A new, empty log.
    pub fn create(path: PathBuf) -> Result<Self> {
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(MetricsLog { file, path })
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
        Ok(MetricsLog { file, path })
    }
    /// Bytes written so far.
    pub fn bytes_written(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(&self.path, e))
    }
    /// Appends one line.
    pub fn line(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}")
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }
}

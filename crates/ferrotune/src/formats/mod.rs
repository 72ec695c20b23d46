//! File formats: weights, read as data only, and TensorBoard's event files.
//!
//! - [`safetensors`]: Hugging Face's safetensors files (and their headers alone).
//! - [`pickle`]: PyTorch weight files (`.bin`, `.pth`) through an unpickler that can only
//!   rebuild tensors: no code in the file ever runs.
//! - [`gguf`]: llama.cpp's GGUF files, converted to a Hugging Face model directory.
//! - [`tfevents`]: TensorBoard event files (written; read back for checks).
//! - [`write_whole`]: any small file, written whole or not at all.

pub mod gguf;
pub mod pickle;
pub mod safetensors;
pub mod tfevents;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through `PATH.tmp` renamed into place, so that a reader (or a
/// run killed meanwhile) never sees half a file.
pub fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

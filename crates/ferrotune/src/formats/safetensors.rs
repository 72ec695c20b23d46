//! safetensors files: the tensors of a checkpoint, or only its header (names and shapes),
//! with errors that name the file.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Reads a safetensors file into named tensors, with errors naming the file.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        Error::file(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })
}

/// Reads the header of a safetensors file: tensor names and shapes, without the data,
/// sorted by name.
pub fn safetensors_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| Error::file(path, "too short to be a safetensors file"))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || n + 8 > len {
        return Err(Error::file(
            path,
            format!("invalid safetensors header length {n} (file of {len} bytes)"),
        ));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&buf)
        .map_err(|e| Error::file(path, format!("invalid safetensors header: {e}")))?;
    let mut out = Vec::new();
    if let Some(m) = v.as_object() {
        for (k, t) in m {
            if k == "__metadata__" {
                continue;
            }
            let shape = t
                .get("shape")
                .and_then(|s| s.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_u64())
                        .map(|d| d as usize)
                        .collect()
                })
                .unwrap_or_default();
            out.push((k.clone(), shape));
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `tensors` to `path` as safetensors. A failed write (a full disk, a denied
/// permission) is an [`Error::Io`] naming `path`, never an input error.
pub fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path).map_err(|e| match io_error(e) {
        Ok(io) => Error::io(path, io),
        Err(e) => Error::Msg(format!("{}: cannot write: {e}", path.display())),
    })
}

/// The I/O error inside a candle error, if that is what it is.
fn io_error(e: candle_core::Error) -> std::result::Result<std::io::Error, candle_core::Error> {
    use candle_core::Error as E;
    match e {
        E::Io(io) | E::SafeTensor(safetensors::SafeTensorError::IoError(io)) => Ok(io),
        E::WithBacktrace { inner, .. } | E::WithPath { inner, .. } | E::Context { inner, .. } => {
            io_error(*inner)
        }
        e => Err(e),
    }
}

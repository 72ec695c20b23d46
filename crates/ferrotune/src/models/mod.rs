//! Models: the Hugging Face configuration, the parameter store, and the architectures.
//!
//! - [`config`]: reading `config.json`.
//! - [`params`]: the parameters with their layer groups.
//! - [`bert`]: BERT with a sequence-classification head.
//! - [`fused`], [`linear`], [`attention`]: fused operations with their backward passes
//!   (layer norm, GELU, softmax; the linear layer; self-attention).
//! - [`embedding`]: the embedding lookup, its table's gradient into the trainer's buffer.
//! - [`grad_sink`]: parameter gradients written by those operations straight into the
//!   trainer's buffers.
//! - [`tokenizer`]: loading `tokenizer.json` (or building one from `vocab.txt`).
//! - [`pickle`]: reading PyTorch weight files (`.bin`, `.pth`) without running code.

pub mod attention;
pub mod bert;
pub mod config;
pub mod embedding;
pub mod fused;
pub mod grad_sink;
pub mod linear;
pub mod params;
pub mod pickle;
pub mod simd;
pub mod tokenizer;

pub use bert::{Batch, BertClassifier, Ctx, Pooling};
pub use config::HfConfig;
pub use params::{Param, ParamStore};

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Reads the header of a safetensors file: tensor names and shapes, without the data.
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

/// A human-readable description of a model directory (`ferrotune inspect`).
pub fn inspect(dir: &Path) -> Result<String> {
    let cfg = HfConfig::from_dir(dir)?;
    let st = dir.join("model.safetensors");
    let shapes = safetensors_shapes(&st)?;
    let params: usize = shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let arch = cfg
        .raw
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
        .unwrap_or("(none: a base model)")
        .to_string();
    let ft = cfg.raw.get("ferrotune");
    let max_len = ft
        .and_then(|f| f.get("max_seq_length"))
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .unwrap_or(cfg.max_position_embeddings);
    let mut s = format!(
        "model:        {}\nmodel_type:   {}\narchitecture: {}\nlayers:       {} (hidden {}, heads {}, intermediate {})\nparameters:   {} ({} tensors)\nmax length:   {} tokens\n",
        dir.display(),
        cfg.model_type,
        arch,
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.intermediate_size,
        params,
        shapes.len(),
        max_len
    );
    match cfg.labels() {
        Some(l) => s.push_str(&format!("labels:       {} ({})\n", l.len(), l.join(", "))),
        None => s.push_str("labels:       (none)\n"),
    }
    if let Some(p) = ft.and_then(|f| f.get("pooling")).and_then(|p| p.as_str()) {
        s.push_str(&format!("pooling:      {p}\n"));
    }
    Ok(s.trim_end().to_string())
}

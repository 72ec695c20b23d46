//! A model directory as ferrotune writes and reads it: the settings it adds to an exported
//! `config.json` (under the key `ferrotune`) so that predictions can be reproduced, and
//! `ferrotune inspect`'s description of any model directory.

use std::path::Path;

use crate::error::Result;
use crate::families::{self, HfConfig};
use crate::formats::safetensors::safetensors_shapes;
use crate::nn::Pooling;

/// What ferrotune adds to an exported `config.json` under the key `ferrotune`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExportInfo {
    /// Pooling the head was trained with.
    pub pooling: Pooling,
    /// Truncation length used in training.
    pub max_seq_length: usize,
    /// Text column of the training data (the default column for predict input).
    pub text_column: String,
    /// Second text column, for pair tasks.
    pub text_pair_column: Option<String>,
    /// Label column of the training data (used by `ferrotune eval`).
    pub label_column: String,
    /// Multi-label decision threshold.
    #[serde(default = "half")]
    pub threshold: f64,
    /// Multi-label separator in CSV/TSV label cells.
    #[serde(default)]
    pub label_separator: Option<String>,
    /// Whether the training CSV/TSV had a header row (the default for predict and eval
    /// input; written only when it had none).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub header: bool,
    /// Column names given for the training CSV/TSV, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column_names: Option<Vec<String>>,
    /// Image models: the evaluation pipeline of training (what predict and serve run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_eval: Option<crate::data::image::Pipeline>,
}

impl ExportInfo {
    /// The settings of a model trained on a `text` column with a `label` column (CSV with
    /// a header, threshold 0.5): what a directory without a `ferrotune` key is read as.
    pub fn defaults(pooling: Pooling, max_seq_length: usize) -> ExportInfo {
        ExportInfo {
            pooling,
            max_seq_length,
            text_column: "text".into(),
            text_pair_column: None,
            label_column: "label".into(),
            threshold: 0.5,
            label_separator: None,
            header: true,
            column_names: None,
            image_eval: None,
        }
    }
}

fn half() -> f64 {
    0.5
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// A human-readable description of a model directory (`ferrotune inspect`).
pub fn inspect(dir: &Path) -> Result<String> {
    let cfg = HfConfig::from_dir(dir)?;
    let fam = families::family(&cfg)?;
    let shapes = safetensors_shapes(&dir.join("model.safetensors"))?;
    let quantized = cfg.raw.get(crate::precision::QUANTIZATION_CONFIG);
    // A quantized model's scales are not parameters.
    let params: usize = shapes
        .iter()
        .filter(|(n, _)| quantized.is_none() || !n.ends_with(crate::nn::builder::SCALE_SUFFIX))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let arch = cfg.architecture().unwrap_or("(none: a base model)");
    let ft = cfg.raw.get("ferrotune");
    let max_len = match ft
        .and_then(|f| f.get("max_seq_length"))
        .and_then(|v| v.as_u64())
    {
        Some(v) => v as usize,
        None => fam.max_tokens(&cfg)?,
    };
    let mut s = format!(
        "model:        {}\nfamily:       {} (model_type {})\narchitecture: {}\nlayers:       {}\nparameters:   {} ({} tensors)\nmax length:   {} tokens\n",
        dir.display(),
        fam.name(),
        cfg.model_type,
        arch,
        fam.describe(&cfg)?,
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
    if let Some(q) = quantized {
        let layers = q
            .get("quantized_layers")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        let method = q
            .get("quant_method")
            .and_then(|v| v.as_str())
            .unwrap_or("?");
        s.push_str(&format!(
            "quantized:    {method}: {layers} linear layers hold int8 weights (runs in int8)\n"
        ));
    }
    Ok(s.trim_end().to_string())
}

//! The Hugging Face `config.json` of a pretrained model, read with clear errors.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Model families ferrotune can load. Adding one (roberta, distilbert, mpnet) means a new
/// variant here, its tensor naming in [`crate::models::bert::Naming`], and any forward-pass
/// difference in `bert.rs`.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["bert"];

/// The fields of a BERT-family `config.json` that ferrotune uses. The whole JSON object is
/// kept in [`HfConfig::raw`] so the exporter can write back what it did not interpret.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    /// `bert`, ... (see [`SUPPORTED_MODEL_TYPES`]).
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden (model) width.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Activation of the feed-forward layer (`gelu` is the exact, erf-based GELU).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Dropout on hidden states.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Dropout before the classifier; `None` means `hidden_dropout_prob`.
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    /// Number of position embeddings (the longest input).
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Standard deviation of new weights.
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// The padding token id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Labels of a fine-tuned checkpoint.
    #[serde(default)]
    pub id2label: Option<BTreeMap<String, String>>,
    /// `single_label_classification`, `multi_label_classification` or `regression`.
    #[serde(default)]
    pub problem_type: Option<String>,
    /// The whole object as read.
    #[serde(skip)]
    pub raw: serde_json::Map<String, serde_json::Value>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_init_range() -> f64 {
    0.02
}

impl HfConfig {
    /// Reads and checks `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    /// Reads and checks a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::at(path, Some(e.line()), None, format!("invalid JSON: {e}")))?;
        let obj = match raw {
            serde_json::Value::Object(m) => m,
            _ => return Err(Error::file(path, "expected a JSON object")),
        };
        match obj.get("model_type").and_then(|v| v.as_str()) {
            None => {
                return Err(Error::at(path, None, Some("model_type"), "missing"));
            }
            Some(t) if !SUPPORTED_MODEL_TYPES.contains(&t) => {
                return Err(Error::at(
                    path,
                    None,
                    Some("model_type"),
                    format!(
                        "unsupported model type `{t}` (supported: {})",
                        SUPPORTED_MODEL_TYPES.join(", ")
                    ),
                ));
            }
            Some(_) => {}
        }
        let mut cfg: HfConfig = serde_json::from_value(serde_json::Value::Object(obj.clone()))
            .map_err(|e| Error::file(path, format!("{e}")))?;
        cfg.raw = obj;
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            return Err(Error::at(
                path,
                None,
                Some("num_attention_heads"),
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    cfg.hidden_size, cfg.num_attention_heads
                ),
            ));
        }
        if !matches!(cfg.hidden_act.as_str(), "gelu" | "gelu_new" | "relu") {
            return Err(Error::at(
                path,
                None,
                Some("hidden_act"),
                format!(
                    "unsupported activation `{}` (supported: gelu, gelu_new, relu)",
                    cfg.hidden_act
                ),
            ));
        }
        Ok(cfg)
    }

    /// The labels of a fine-tuned checkpoint, in id order, if it has them.
    pub fn labels(&self) -> Option<Vec<String>> {
        let map = self.id2label.as_ref()?;
        let mut pairs: Vec<(usize, String)> = map
            .iter()
            .filter_map(|(k, v)| k.parse::<usize>().ok().map(|k| (k, v.clone())))
            .collect();
        pairs.sort();
        if pairs.iter().enumerate().all(|(i, (k, _))| i == *k) && !pairs.is_empty() {
            Some(pairs.into_iter().map(|(_, v)| v).collect())
        } else {
            None
        }
    }
}

//! Tiny random models written in the real file formats, for tests and benchmarks.
//!
//! A test builds its own model directory (`config.json`, `model.safetensors`, `vocab.txt`)
//! in a few milliseconds, so unit tests need no downloaded assets and no network.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Device;
use serde_json::json;

use crate::error::{Error, Result};
use crate::models::bert::{BertClassifier, Weights};
use crate::models::{HfConfig, Pooling};

/// Words of the tiny vocabulary (after the special tokens).
pub const TINY_WORDS: &[&str] = &[
    "the", "a", "is", "was", "good", "great", "fine", "bad", "awful", "poor", "movie", "film",
    "plot", "acting", "very", "not", ".", ",", "!", "##s",
];

/// Shape of a random BERT.
#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    /// Hidden width.
    pub hidden: usize,
    /// Encoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Feed-forward width.
    pub intermediate: usize,
    /// Positions.
    pub max_positions: usize,
    /// Write backbone tensors with the `bert.` prefix (as HF fine-tuned checkpoints do).
    pub prefix: bool,
    /// Seed of the random weights.
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            hidden: 16,
            layers: 2,
            heads: 2,
            intermediate: 32,
            max_positions: 64,
            prefix: false,
            seed: 7,
        }
    }
}

/// The `config.json` of a random BERT of `spec` with `vocab_size` tokens.
pub fn tiny_config(spec: &TinySpec, vocab_size: usize) -> serde_json::Value {
    json!({
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "intermediate_size": spec.intermediate,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": spec.max_positions,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "initializer_range": 0.2,
        "pad_token_id": 0
    })
}

/// Writes a random pretrained BERT (no classifier) to `dir`: `config.json`,
/// `model.safetensors`, `vocab.txt`.
pub fn write_tiny_model(dir: &Path, spec: &TinySpec) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut vocab: Vec<&str> = vec!["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    vocab.extend_from_slice(TINY_WORDS);
    let vp = dir.join("vocab.txt");
    std::fs::write(&vp, vocab.join("\n") + "\n").map_err(|e| Error::io(&vp, e))?;
    let cfg_json = tiny_config(spec, vocab.len());
    let cp = dir.join("config.json");
    std::fs::write(&cp, cfg_json.to_string()).map_err(|e| Error::io(&cp, e))?;
    let cfg = HfConfig::from_file(&cp)?;
    let loaded = BertClassifier::load(
        &cfg,
        Weights::Random,
        2,
        Pooling::Pooler,
        spec.seed,
        &Device::Cpu,
    )?;
    let tensors: HashMap<String, candle_core::Tensor> = loaded
        .params
        .named_tensors()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("classifier."))
        .map(|(k, v)| {
            let k = if spec.prefix {
                k
            } else {
                k.trim_start_matches("bert.").to_string()
            };
            (k, v)
        })
        .collect();
    let sp = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &sp).map_err(|e| Error::file(&sp, format!("{e}")))
}

/// Writes a small labelled sentiment CSV (`text,label`) of `n` rows, balanced, to `path`.
pub fn write_tiny_csv(path: &Path, n: usize) -> Result<()> {
    let good = ["good", "great", "fine"];
    let bad = ["bad", "awful", "poor"];
    let nouns = ["movie", "film", "plot", "acting"];
    let mut s = String::from("text,label\n");
    for i in 0..n {
        let pos = i % 2 == 0;
        let adj = if pos { good[i % 3] } else { bad[i % 3] };
        let noun = nouns[(i / 2) % 4];
        let very = if i % 3 == 0 { "very " } else { "" };
        s.push_str(&format!(
            "the {noun} was {very}{adj} .,{}\n",
            if pos { "pos" } else { "neg" }
        ));
    }
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

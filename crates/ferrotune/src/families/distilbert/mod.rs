//! DistilBERT (`model_type = "distilbert"`): six BERT-style layers under its own tensor
//! names (`transformer.layer.N.attention.q_lin`, ...), no token types, no pooler, and a
//! `pre_classifier` → ReLU → classifier head. Tensor names carry the `distilbert.` prefix
//! (or none).

pub mod model;

use candle_core::Device;
use serde_json::json;

use crate::error::Result;
use crate::families::encoder::describe;
use crate::families::{Family, HeadSpec, HfConfig, Loaded, ModelShape};
use crate::nn::{Pooling, Weights};

pub use model::DistilBertConfig;

/// The DistilBERT family.
pub struct DistilBert;

impl Family for DistilBert {
    fn model_type(&self) -> &'static str {
        "distilbert"
    }

    fn name(&self) -> &'static str {
        "DistilBERT"
    }

    fn architecture(&self) -> &'static str {
        "DistilBertForSequenceClassification"
    }

    fn tokenizer_class(&self) -> &'static str {
        "DistilBertTokenizer"
    }

    fn claims(&self, names: &[&str]) -> bool {
        names
            .iter()
            .any(|n| n.ends_with("transformer.layer.0.attention.q_lin.weight"))
    }

    fn poolings(&self) -> &'static [Pooling] {
        &[Pooling::Cls, Pooling::Mean]
    }

    fn max_tokens(&self, cfg: &HfConfig) -> Result<usize> {
        Ok(cfg.parse::<DistilBertConfig>()?.max_position_embeddings)
    }

    fn describe(&self, cfg: &HfConfig) -> Result<String> {
        Ok(describe(&cfg.parse::<DistilBertConfig>()?.encoder()))
    }

    fn config_json(&self, s: &ModelShape) -> serde_json::Value {
        json!({
            "model_type": "distilbert",
            "architectures": ["DistilBertModel"],
            "vocab_size": s.vocab_size,
            "dim": s.hidden,
            "n_layers": s.layers,
            "n_heads": s.heads,
            "hidden_dim": s.intermediate,
            "activation": "gelu",
            "dropout": 0.1,
            "attention_dropout": 0.1,
            "max_position_embeddings": s.max_positions,
            "sinusoidal_pos_embds": false,
            "initializer_range": s.initializer_range,
            "seq_classif_dropout": 0.2,
            "qa_dropout": 0.1,
            "pad_token_id": 0,
            "tie_weights_": true
        })
    }

    fn presets(&self) -> &'static [(&'static str, ModelShape)] {
        const PRESETS: &[(&str, ModelShape)] = &[(
            "distilbert-base",
            ModelShape {
                layers: 6,
                ..ModelShape::base(30522)
            },
        )];
        PRESETS
    }

    fn build(
        &self,
        cfg: &HfConfig,
        weights: &Weights,
        head: &HeadSpec,
        seed: u64,
        device: &Device,
    ) -> Result<Loaded> {
        model::build(cfg, weights, head, seed, device)
    }
}

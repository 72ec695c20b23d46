//! BERT (`model_type = "bert"`), and the sentence-transformers checkpoints built on it
//! (all-MiniLM-L6-v2). Tensor names are transformers' with the `bert.` prefix, or without
//! it (sentence-transformers); exported with it.

pub mod model;

use candle_core::Device;
use serde_json::json;

use crate::error::Result;
use crate::families::encoder::describe;
use crate::families::{Family, HeadSpec, HfConfig, Loaded, ModelShape};
use crate::nn::encoder::EncoderConfig;
use crate::nn::{Pooling, Weights};

/// The BERT family.
pub struct Bert;

impl Family for Bert {
    fn model_type(&self) -> &'static str {
        "bert"
    }

    fn name(&self) -> &'static str {
        "BERT"
    }

    fn architecture(&self) -> &'static str {
        "BertForSequenceClassification"
    }

    fn tokenizer_class(&self) -> &'static str {
        "BertTokenizer"
    }

    fn claims(&self, names: &[&str]) -> bool {
        let has = |n: &str| names.contains(&n);
        (has("bert.embeddings.word_embeddings.weight") || has("embeddings.word_embeddings.weight"))
            && names
                .iter()
                .any(|n| n.ends_with("attention.self.query.weight"))
    }

    fn poolings(&self) -> &'static [Pooling] {
        &[Pooling::Pooler, Pooling::Cls, Pooling::Mean]
    }

    fn max_tokens(&self, cfg: &HfConfig) -> Result<usize> {
        Ok(cfg.parse::<EncoderConfig>()?.max_position_embeddings)
    }

    fn describe(&self, cfg: &HfConfig) -> Result<String> {
        Ok(describe(&cfg.parse()?))
    }

    fn config_json(&self, s: &ModelShape) -> serde_json::Value {
        json!({
            "model_type": "bert",
            "architectures": ["BertModel"],
            "vocab_size": s.vocab_size,
            "hidden_size": s.hidden,
            "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads,
            "intermediate_size": s.intermediate,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": s.max_positions,
            "type_vocab_size": 2,
            "layer_norm_eps": 1e-12,
            "initializer_range": s.initializer_range,
            "pad_token_id": 0
        })
    }

    fn presets(&self) -> &'static [(&'static str, ModelShape)] {
        const PRESETS: &[(&str, ModelShape)] = &[
            (
                "minilm-l6",
                ModelShape {
                    hidden: 384,
                    layers: 6,
                    intermediate: 1536,
                    ..ModelShape::base(30522)
                },
            ),
            ("bert-base", ModelShape::base(30522)),
        ];
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

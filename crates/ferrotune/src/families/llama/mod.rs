//! Llama (`model_type = "llama"`): SmolLM2, TinyLlama, Llama 2/3 and the many checkpoints
//! in its layout, from an HF directory (or a GGUF file, converted by
//! [`crate::formats::gguf`]). Tensor names are transformers' (`model.layers.{i}...`,
//! `lm_head`, `score`). Built with `num_labels = 0` it is the language model
//! (`LlamaForCausalLM`), else the sequence classifier (`LlamaForSequenceClassification`).

pub mod model;

use candle_core::Device;
use serde_json::json;

use crate::error::Result;
use crate::families::{Family, HeadSpec, HfConfig, Loaded, ModelShape};
use crate::nn::{Pooling, Weights};

use model::LlamaConfig;

/// The Llama family.
pub struct Llama;

impl Family for Llama {
    fn model_type(&self) -> &'static str {
        "llama"
    }

    fn name(&self) -> &'static str {
        "Llama"
    }

    fn architecture(&self) -> &'static str {
        "LlamaForSequenceClassification"
    }

    fn export_keys(
        &self,
        cfg: &HfConfig,
        labels: &[String],
    ) -> serde_json::Map<String, serde_json::Value> {
        crate::families::decoder_export_keys(
            cfg,
            labels,
            "LlamaForCausalLM",
            "LlamaForSequenceClassification",
        )
    }

    fn tokenizer_class(&self) -> &'static str {
        "PreTrainedTokenizerFast"
    }

    fn claims(&self, names: &[&str]) -> bool {
        names.iter().any(|n| n.ends_with("embed_tokens.weight"))
            && names.iter().any(|n| n.ends_with("self_attn.q_proj.weight"))
    }

    fn poolings(&self) -> &'static [Pooling] {
        &[Pooling::Last]
    }

    fn max_tokens(&self, cfg: &HfConfig) -> Result<usize> {
        Ok(LlamaConfig::read(cfg)?.max_position_embeddings)
    }

    fn describe(&self, cfg: &HfConfig) -> Result<String> {
        let c = LlamaConfig::read(cfg)?;
        Ok(format!(
            "{} (hidden {}, heads {} / {} key-value, intermediate {}, vocab {})",
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.kv_heads(),
            c.intermediate_size,
            c.vocab_size
        ))
    }

    fn config_json(&self, s: &ModelShape) -> serde_json::Value {
        json!({
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": s.vocab_size,
            "hidden_size": s.hidden,
            "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads,
            "num_key_value_heads": s.heads,
            "intermediate_size": s.intermediate,
            "hidden_act": "silu",
            "max_position_embeddings": s.max_positions,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "attention_dropout": 0.1,
            "tie_word_embeddings": true,
            "initializer_range": s.initializer_range,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 2
        })
    }

    fn presets(&self) -> &'static [(&'static str, ModelShape)] {
        const PRESETS: &[(&str, ModelShape)] = &[(
            "smollm2-135m",
            ModelShape {
                vocab_size: 49152,
                hidden: 576,
                layers: 30,
                heads: 9,
                intermediate: 1536,
                max_positions: 8192,
                initializer_range: 0.02,
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

//! GPT-2 (`model_type = "gpt2"`) and checkpoints in its layout (DistilGPT-2, DialoGPT...),
//! from an HF directory. Tensor names are transformers' (`transformer.h.{i}...`, with or
//! without the `transformer.` prefix, `score`); `Conv1D` weights are read and exported in
//! their `(in, out)` layout. Built with `num_labels = 0` it is the language model
//! (`GPT2LMHeadModel`), else the sequence classifier (`GPT2ForSequenceClassification`).

pub mod model;

use candle_core::Device;
use serde_json::json;

use crate::error::Result;
use crate::families::{Family, HeadSpec, HfConfig, Loaded, ModelShape};
use crate::nn::{Pooling, Weights};

use model::Gpt2Config;

/// The GPT-2 family.
pub struct Gpt2;

impl Family for Gpt2 {
    fn model_type(&self) -> &'static str {
        "gpt2"
    }

    fn name(&self) -> &'static str {
        "GPT-2"
    }

    fn architecture(&self) -> &'static str {
        "GPT2ForSequenceClassification"
    }

    fn export_keys(
        &self,
        cfg: &HfConfig,
        labels: &[String],
    ) -> serde_json::Map<String, serde_json::Value> {
        crate::families::decoder_export_keys(
            cfg,
            labels,
            "GPT2LMHeadModel",
            "GPT2ForSequenceClassification",
        )
    }

    fn tokenizer_class(&self) -> &'static str {
        "PreTrainedTokenizerFast"
    }

    fn claims(&self, names: &[&str]) -> bool {
        names.iter().any(|n| n.ends_with("wte.weight"))
            && names.iter().any(|n| n.ends_with("attn.c_attn.weight"))
    }

    fn poolings(&self) -> &'static [Pooling] {
        &[Pooling::Last]
    }

    fn max_tokens(&self, cfg: &HfConfig) -> Result<usize> {
        Ok(Gpt2Config::read(cfg)?.n_positions)
    }

    fn describe(&self, cfg: &HfConfig) -> Result<String> {
        let c = Gpt2Config::read(cfg)?;
        Ok(format!(
            "{} (hidden {}, heads {}, inner {}, vocab {})",
            c.n_layer,
            c.n_embd,
            c.n_head,
            c.inner(),
            c.vocab_size
        ))
    }

    fn config_json(&self, s: &ModelShape) -> serde_json::Value {
        json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": s.vocab_size,
            "n_embd": s.hidden,
            "n_layer": s.layers,
            "n_head": s.heads,
            "n_inner": s.intermediate,
            "n_positions": s.max_positions,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.1,
            "embd_pdrop": 0.1,
            "attn_pdrop": 0.1,
            "layer_norm_epsilon": 1e-5,
            "initializer_range": s.initializer_range,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 2
        })
    }

    fn presets(&self) -> &'static [(&'static str, ModelShape)] {
        const PRESETS: &[(&str, ModelShape)] = &[(
            "gpt2",
            ModelShape {
                vocab_size: 50257,
                hidden: 768,
                layers: 12,
                heads: 12,
                intermediate: 3072,
                max_positions: 1024,
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

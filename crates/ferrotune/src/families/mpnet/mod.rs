//! MPNet (`model_type = "mpnet"`), as all-mpnet-base-v2: BERT-style layers with a learned
//! relative position bias in attention, positions numbered from the padding index, no
//! token types, and a dense → tanh → out_proj head. Tensor names carry the `mpnet.` prefix
//! in fine-tuned checkpoints, none in sentence-transformers ones.

pub mod model;

use candle_core::Device;
use serde_json::json;

use crate::error::Result;
use crate::families::encoder::describe;
use crate::families::{Family, HeadSpec, HfConfig, Loaded, ModelShape};
use crate::nn::encoder::EncoderConfig;
use crate::nn::{Pooling, Weights};

pub use model::relative_position_bucket;

/// The MPNet family.
pub struct MpNet;

impl Family for MpNet {
    fn model_type(&self) -> &'static str {
        "mpnet"
    }

    fn name(&self) -> &'static str {
        "MPNet"
    }

    fn architecture(&self) -> &'static str {
        "MPNetForSequenceClassification"
    }

    fn tokenizer_class(&self) -> &'static str {
        "MPNetTokenizer"
    }

    fn claims(&self, names: &[&str]) -> bool {
        names
            .iter()
            .any(|n| n.ends_with("encoder.relative_attention_bias.weight"))
    }

    fn poolings(&self) -> &'static [Pooling] {
        &[Pooling::Cls, Pooling::Mean]
    }

    /// Positions start after the padding index: `max_position_embeddings − pad − 1`.
    fn max_tokens(&self, cfg: &HfConfig) -> Result<usize> {
        let c: EncoderConfig = cfg.parse()?;
        let pad = c.pad_token_id.unwrap_or(1) as usize;
        Ok(c.max_position_embeddings.saturating_sub(pad + 1))
    }

    fn describe(&self, cfg: &HfConfig) -> Result<String> {
        Ok(describe(&cfg.parse()?) + ", relative position bias")
    }

    fn config_json(&self, s: &ModelShape) -> serde_json::Value {
        json!({
            "model_type": "mpnet",
            "architectures": ["MPNetModel"],
            "vocab_size": s.vocab_size,
            "hidden_size": s.hidden,
            "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads,
            "intermediate_size": s.intermediate,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": s.max_positions + 2,
            "relative_attention_num_buckets": 32,
            "layer_norm_eps": 1e-5,
            "initializer_range": s.initializer_range,
            "bos_token_id": 0,
            "pad_token_id": 1,
            "eos_token_id": 2
        })
    }

    fn presets(&self) -> &'static [(&'static str, ModelShape)] {
        const PRESETS: &[(&str, ModelShape)] = &[("mpnet-base", ModelShape::base(30527))];
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

//! RoBERTa (`model_type = "roberta"`): BERT's encoder with positions numbered from the
//! padding index, no token types, a byte-level BPE tokenizer and a dense → tanh →
//! out_proj head. Tensor names are transformers' with the `roberta.` prefix (or without).

pub mod model;

use candle_core::Device;
use serde_json::json;

use crate::error::Result;
use crate::families::encoder::describe;
use crate::families::{Family, HeadSpec, HfConfig, Loaded, ModelShape};
use crate::nn::encoder::EncoderConfig;
use crate::nn::{Pooling, Weights};

/// The RoBERTa family.
pub struct Roberta;

impl Family for Roberta {
    fn model_type(&self) -> &'static str {
        "roberta"
    }

    fn name(&self) -> &'static str {
        "RoBERTa"
    }

    fn architecture(&self) -> &'static str {
        "RobertaForSequenceClassification"
    }

    fn tokenizer_class(&self) -> &'static str {
        "RobertaTokenizer"
    }

    /// `roberta.`-prefixed names, or BERT's names without prefix (the two layouts are the
    /// same tensors).
    fn claims(&self, names: &[&str]) -> bool {
        let has = |n: &str| names.contains(&n);
        (has("roberta.embeddings.word_embeddings.weight")
            || has("embeddings.word_embeddings.weight"))
            && names
                .iter()
                .any(|n| n.ends_with("attention.self.query.weight"))
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
        Ok(describe(&cfg.parse()?))
    }

    fn config_json(&self, s: &ModelShape) -> serde_json::Value {
        json!({
            "model_type": "roberta",
            "architectures": ["RobertaModel"],
            "vocab_size": s.vocab_size,
            "hidden_size": s.hidden,
            "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads,
            "intermediate_size": s.intermediate,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": s.max_positions + 2,
            "type_vocab_size": 1,
            "layer_norm_eps": 1e-5,
            "initializer_range": s.initializer_range,
            "bos_token_id": 0,
            "pad_token_id": 1,
            "eos_token_id": 2
        })
    }

    fn presets(&self) -> &'static [(&'static str, ModelShape)] {
        const PRESETS: &[(&str, ModelShape)] = &[("roberta-base", ModelShape::base(50265))];
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

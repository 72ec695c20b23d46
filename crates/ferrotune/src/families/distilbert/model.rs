//! DistilBERT with a sequence-classification head, as transformers'
//! `DistilBertForSequenceClassification`: word + position embeddings (no token types) →
//! layer norm → dropout → 6 post-norm layers whose attention output has no dropout →
//! first token → `pre_classifier` → ReLU → dropout → classifier. Its `config.json` names
//! differ from BERT's (`dim`, `n_layers`, ...); [`DistilBertConfig::encoder`] maps them.

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::families::encoder::{dropout, Embed, EncoderClassifier};
use crate::families::{pooling, HeadSpec, HfConfig, Loaded};
use crate::nn::encoder::{Encoder, EncoderConfig, LayerNames};
use crate::nn::head::{ClassificationHead, Dense};
use crate::nn::layers::{Activation, Embedding, LayerNorm};
use crate::nn::{Builder, Ctx, GroupKind, TokenBatch, Weights};

use super::DistilBert;

/// transformers' names for a DistilBERT layer's tensors.
pub const LAYER_NAMES: LayerNames = LayerNames {
    layer: "transformer.layer",
    q: "attention.q_lin",
    k: "attention.k_lin",
    v: "attention.v_lin",
    o: "attention.out_lin",
    ln1: "sa_layer_norm",
    inter: "ffn.lin1",
    out: "ffn.lin2",
    ln2: "output_layer_norm",
};

/// DistilBERT's `config.json` fields.
#[derive(Debug, Clone, Deserialize)]
pub struct DistilBertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub dim: usize,
    /// Layers.
    pub n_layers: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Feed-forward width.
    pub hidden_dim: usize,
    /// Hidden-state dropout.
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// Attention-probability dropout.
    #[serde(default = "default_dropout")]
    pub attention_dropout: f64,
    /// Feed-forward activation.
    #[serde(default = "default_act")]
    pub activation: String,
    /// Position embeddings.
    pub max_position_embeddings: usize,
    /// Fixed sinusoidal position embeddings (not supported: they must not train).
    #[serde(default)]
    pub sinusoidal_pos_embds: bool,
    /// Standard deviation of new weights.
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// Dropout of the classification head.
    #[serde(default = "default_head_dropout")]
    pub seq_classif_dropout: f64,
    /// The padding id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_dropout() -> f64 {
    0.1
}
fn default_act() -> String {
    "gelu".into()
}
fn default_init_range() -> f64 {
    0.02
}
fn default_head_dropout() -> f64 {
    0.2
}

impl DistilBertConfig {
    /// The shared encoder's view of this config (layer norm epsilon 1e-12, as
    /// transformers hard-codes for DistilBERT).
    pub fn encoder(&self) -> EncoderConfig {
        EncoderConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.dim,
            num_hidden_layers: self.n_layers,
            num_attention_heads: self.n_heads,
            intermediate_size: self.hidden_dim,
            hidden_act: self.activation.clone(),
            hidden_dropout_prob: self.dropout,
            attention_probs_dropout_prob: self.attention_dropout,
            classifier_dropout: Some(self.seq_classif_dropout),
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: 0,
            layer_norm_eps: 1e-12,
            initializer_range: self.initializer_range,
            pad_token_id: self.pad_token_id,
        }
    }

    /// Reads and checks the config; errors name the file and field.
    pub fn read(cfg: &HfConfig) -> Result<DistilBertConfig> {
        let c: DistilBertConfig = cfg.parse()?;
        if c.sinusoidal_pos_embds {
            return Err(Error::at(
                &cfg.path,
                None,
                Some("sinusoidal_pos_embds"),
                "fixed sinusoidal position embeddings are not supported",
            ));
        }
        // The shared checks, naming DistilBERT's own fields.
        c.encoder().check().map_err(|(field, msg)| {
            fn ours(f: &str) -> &str {
                match f {
                    "hidden_size" => "dim",
                    "num_hidden_layers" => "n_layers",
                    "num_attention_heads" => "n_heads",
                    "intermediate_size" => "hidden_dim",
                    "hidden_act" => "activation",
                    f => f,
                }
            }
            let msg = ["hidden_size", "num_attention_heads"]
                .iter()
                .fold(msg, |m, f| m.replace(f, ours(f)));
            Error::at(&cfg.path, None, Some(ours(field)), msg)
        })?;
        Ok(c)
    }
}

/// DistilBERT's embeddings: word + position, layer norm, dropout.
struct Embeddings {
    word: Embedding,
    pos: Embedding,
    ln: LayerNorm,
    dropout: f64,
}

impl Embed for Embeddings {
    fn forward(&self, ctx: &mut Ctx, t: &TokenBatch) -> Result<Tensor> {
        let (bsz, seq) = t.input_ids.dims2()?;
        if seq > self.pos.rows() {
            return Err(Error::Msg(format!(
                "sequence of {seq} tokens is longer than the model's {} positions",
                self.pos.rows()
            )));
        }
        let word = self.word.forward(ctx, &t.input_ids)?;
        let h = word.dim(1)?;
        let pos = self.pos.first_rows(ctx, seq)?;
        let x = word.reshape((bsz, seq, h))?.broadcast_add(&pos)?;
        let x = self.ln.forward(ctx, &x.reshape((bsz * seq, h))?)?;
        ctx.dropout(&x, self.dropout)
    }
}

/// Builds DistilBERT (see [`crate::families::Family::build`]).
pub fn build(
    cfg: &HfConfig,
    weights: &Weights,
    head: &HeadSpec,
    seed: u64,
    device: &Device,
) -> Result<Loaded> {
    let dc = DistilBertConfig::read(cfg)?;
    let ec = dc.encoder();
    let pooling = pooling(&DistilBert, head)?;
    let h = ec.hidden_size;
    // DistilBERT adds the attention output to its input without dropout.
    let drop = dropout(&ec, head, false);
    let init = ec.initializer_range;
    let probe = "embeddings.word_embeddings.weight";
    let mut b = Builder::new(weights, "distilbert.", probe, init, seed, device);
    let emb = b.group(GroupKind::Embeddings);
    let embeddings = Embeddings {
        word: b.embedding("embeddings.word_embeddings", ec.vocab_size, h, emb)?,
        pos: b.embedding(
            "embeddings.position_embeddings",
            ec.max_position_embeddings,
            h,
            emb,
        )?,
        ln: b.layer_norm("embeddings.LayerNorm", h, ec.layer_norm_eps, emb)?,
        dropout: drop.hidden,
    };
    let encoder = Encoder::build(&mut b, &ec, &LAYER_NAMES, drop)?;
    let hg = b.group(GroupKind::Head);
    let (pre, n1) = b.optional_linear("pre_classifier", "pre_classifier", h, h, hg)?;
    let n = head.num_labels;
    let (classifier, n2) = b.optional_linear("classifier", "classifier", n, h, hg)?;
    let head = ClassificationHead {
        dropout_first: false,
        dense: Some(Dense {
            linear: pre,
            act: Activation::Relu,
        }),
        classifier,
        dropout: head.classifier_dropout.unwrap_or(dc.seq_classif_dropout),
    };
    let model = EncoderClassifier {
        embeddings: Box::new(embeddings),
        encoder,
        pooling,
        head,
        first_token_last_layer: true,
    };
    Ok(model.loaded(b.finish(), n1 || n2, Vec::new()))
}

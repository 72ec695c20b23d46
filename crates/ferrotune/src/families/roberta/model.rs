//! RoBERTa with a sequence-classification head, as transformers'
//! `RobertaForSequenceClassification`: BERT's encoder under other embeddings — positions
//! numbered from the padding index (`pad + 1` for the first token), no token types (the
//! one token-type row is added to every token) — and its classification head on the
//! first token (`<s>`): dropout → dense → tanh → dropout → out_proj.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::families::encoder::{dropout, Embed, EncoderClassifier};
use crate::families::{pooling, HeadSpec, HfConfig, Loaded};
use crate::nn::encoder::{Encoder, EncoderConfig, LayerNames};
use crate::nn::head::{ClassificationHead, Dense};
use crate::nn::layers::{positions_after_padding, Activation, Embedding, LayerNorm};
use crate::nn::{Builder, Ctx, GroupKind, TokenBatch, Weights};

use super::Roberta;

/// transformers' names for a RoBERTa layer's tensors (BERT's).
pub const LAYER_NAMES: LayerNames = LayerNames {
    layer: "encoder.layer",
    q: "attention.self.query",
    k: "attention.self.key",
    v: "attention.self.value",
    o: "attention.output.dense",
    ln1: "attention.output.LayerNorm",
    inter: "intermediate.dense",
    out: "output.dense",
    ln2: "output.LayerNorm",
};

/// RoBERTa's embeddings.
struct Embeddings {
    word: Embedding,
    pos: Embedding,
    token_type: Embedding,
    ln: LayerNorm,
    dropout: f64,
    pad: u32,
}

impl Embed for Embeddings {
    fn forward(&self, ctx: &mut Ctx, t: &TokenBatch) -> Result<Tensor> {
        let ids = &t.input_ids;
        let seq = ids.dim(1)?;
        let longest = self.pos.rows().saturating_sub(self.pad as usize + 1);
        if seq > longest {
            return Err(Error::Msg(format!(
                "sequence of {seq} tokens is longer than the model's {longest} positions"
            )));
        }
        let word = self.word.forward(ctx, ids)?;
        let pos = self
            .pos
            .forward(ctx, &positions_after_padding(ids, self.pad)?)?;
        // transformers passes no token types to RoBERTa: every token gets row 0.
        let tt = self.token_type.first_rows(ctx, 1)?;
        let x = (word + pos)?.broadcast_add(&tt)?;
        let x = self.ln.forward(ctx, &x)?;
        ctx.dropout(&x, self.dropout)
    }
}

/// Builds RoBERTa (see [`crate::families::Family::build`]).
pub fn build(
    cfg: &HfConfig,
    weights: &Weights,
    head: &HeadSpec,
    seed: u64,
    device: &Device,
) -> Result<Loaded> {
    let ec: EncoderConfig = cfg.parse()?;
    ec.validate(&cfg.path)?;
    let pooling = pooling(&Roberta, head)?;
    let h = ec.hidden_size;
    let drop = dropout(&ec, head, true);
    let init = ec.initializer_range;
    let probe = "embeddings.word_embeddings.weight";
    let mut b = Builder::new(weights, "roberta.", probe, init, seed, device);
    let emb = b.group(GroupKind::Embeddings);
    let embeddings = Embeddings {
        word: b.embedding("embeddings.word_embeddings", ec.vocab_size, h, emb)?,
        pos: b.embedding(
            "embeddings.position_embeddings",
            ec.max_position_embeddings,
            h,
            emb,
        )?,
        token_type: b.embedding(
            "embeddings.token_type_embeddings",
            ec.type_vocab_size,
            h,
            emb,
        )?,
        ln: b.layer_norm("embeddings.LayerNorm", h, ec.layer_norm_eps, emb)?,
        dropout: drop.hidden,
        pad: ec.pad_token_id.unwrap_or(1),
    };
    let encoder = Encoder::build(&mut b, &ec, &LAYER_NAMES, drop)?;
    let hg = b.group(GroupKind::Head);
    let (dense, n1) = b.optional_linear("classifier.dense", "classifier.dense", h, h, hg)?;
    let n = head.num_labels;
    let (out, n2) = b.optional_linear("classifier.out_proj", "classifier.out_proj", n, h, hg)?;
    let head = ClassificationHead {
        dropout_first: true,
        dense: Some(Dense {
            linear: dense,
            act: Activation::Tanh,
        }),
        classifier: out,
        dropout: head.classifier_dropout.unwrap_or(ec.head_dropout()),
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

//! BERT with a sequence-classification head, as transformers'
//! `BertForSequenceClassification`: embeddings (word + position + token type) → layer
//! norm → dropout → the shared post-norm encoder → pooling → head (BERT's pooler →
//! dropout → linear classifier, or `[CLS]` / mean pooling → dropout → classifier).
//!
//! Why our own model code rather than `candle-transformers`' `BertModel`: that one has no
//! pooler, no dropout, and uses candle's fast layer norm and softmax, which have no
//! backward pass and cut the gradient graph silently (see `docs/DESIGN-NOTES.md`).

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::families::encoder::{dropout, Embed, EncoderClassifier};
use crate::families::{pooling, HeadSpec, HfConfig, Loaded};
use crate::nn::encoder::{Encoder, EncoderConfig, LayerNames};
use crate::nn::head::{ClassificationHead, Dense};
use crate::nn::layers::{Activation, Embedding, LayerNorm};
use crate::nn::{Builder, Ctx, GroupKind, Pooling, TokenBatch, Weights};

use super::Bert;

/// transformers' names for a BERT layer's tensors.
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

/// BERT's embeddings: word + position + token type, layer norm, dropout.
struct Embeddings {
    word: Embedding,
    pos: Embedding,
    token_type: Embedding,
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
        let tt = self.token_type.forward(ctx, &t.token_type_ids)?;
        let pos = self.pos.first_rows(ctx, seq)?;
        let x = (word + tt)?.reshape((bsz, seq, h))?.broadcast_add(&pos)?;
        let x = self.ln.forward(ctx, &x.reshape((bsz * seq, h))?)?;
        ctx.dropout(&x, self.dropout)
    }
}

/// Builds BERT from `cfg` and `weights` with the head of `head` (see
/// [`crate::families::Family::build`]).
pub fn build(
    cfg: &HfConfig,
    weights: &Weights,
    head: &HeadSpec,
    seed: u64,
    device: &Device,
) -> Result<Loaded> {
    let ec: EncoderConfig = cfg.parse()?;
    ec.validate(&cfg.path)?;
    let pooling = pooling(&Bert, head)?;
    let h = ec.hidden_size;
    let drop = dropout(&ec, head, true);
    let init = ec.initializer_range;
    let probe = "embeddings.word_embeddings.weight";
    let mut b = Builder::new(weights, "bert.", probe, init, seed, device);
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
    };
    let encoder = Encoder::build(&mut b, &ec, &LAYER_NAMES, drop)?;
    // The pooler's group exists whatever the pooling (the group layout of every BERT is
    // the same: embeddings, layers, pooler, head).
    let pg = b.group(GroupKind::Pooler);
    let mut notes = Vec::new();
    let dense = if pooling == Pooling::Pooler {
        let ckpt = format!("{}pooler.dense", b.checkpoint_prefix());
        let (linear, new) = b.optional_linear(&ckpt, "bert.pooler.dense", h, h, pg)?;
        if new {
            notes.push("the pooler is newly initialised (not in the checkpoint)".to_string());
        }
        Some(Dense {
            linear,
            act: Activation::Tanh,
        })
    } else {
        None
    };
    let hg = b.group(GroupKind::Head);
    let n = head.num_labels;
    let (classifier, new_head) = b.optional_linear("classifier", "classifier", n, h, hg)?;
    let head = ClassificationHead {
        dropout_first: false,
        dense,
        classifier,
        dropout: head.classifier_dropout.unwrap_or(ec.head_dropout()),
    };
    let model = EncoderClassifier {
        embeddings: Box::new(embeddings),
        encoder,
        pooling,
        head,
        first_token_last_layer: true,
    };
    Ok(model.loaded(b.finish(), new_head, notes))
}

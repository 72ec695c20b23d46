//! BERT with a sequence-classification head, as transformers'
//! `BertForSequenceClassification`: embeddings (word + position + token type) → layer
//! norm → dropout → the shared post-norm encoder ([`crate::nn::encoder`]) → pooling →
//! head (BERT's pooler → dropout → linear classifier, or `[CLS]` / mean pooling →
//! dropout → classifier).
//!
//! Why our own model code rather than `candle-transformers`' `BertModel`: that one has no
//! pooler, no dropout, and uses candle's fast layer norm and softmax, which have no
//! backward pass and cut the gradient graph silently (see `docs/DESIGN-NOTES.md`).

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::families::{pooling, HeadSpec, HfConfig, Model};
use crate::nn::encoder::{Encoder, EncoderConfig, EncoderDropout, LayerNames};
use crate::nn::head::{ClassificationHead, Dense};
use crate::nn::layers::{Activation, Embedding, LayerNorm};
use crate::nn::{Batch, Builder, Ctx, GroupKind, ParamStore, Pooling, Weights};

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

impl Embeddings {
    fn forward(
        &self,
        ctx: &mut Ctx,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
    ) -> Result<Tensor> {
        let (bsz, seq) = input_ids.dims2()?;
        if seq > self.pos.rows() {
            return Err(Error::Msg(format!(
                "sequence of {seq} tokens is longer than the model's {} positions",
                self.pos.rows()
            )));
        }
        let word = self.word.forward(ctx, input_ids)?;
        let h = word.dim(1)?;
        let tt = self.token_type.forward(ctx, token_type_ids)?;
        let pos = self.pos.first_rows(ctx, seq)?;
        let x = (word + tt)?.reshape((bsz, seq, h))?.broadcast_add(&pos)?;
        let x = self.ln.forward(ctx, &x.reshape((bsz * seq, h))?)?;
        ctx.dropout(&x, self.dropout)
    }
}

/// BERT with a classification (or regression) head.
pub struct BertClassifier {
    embeddings: Embeddings,
    encoder: Encoder,
    pooling: Pooling,
    head: ClassificationHead,
    /// Whether [`Model::forward`] runs the last layer after attention for the `[CLS]`
    /// row only, when the pooling reads nothing else.
    first_token_last_layer: bool,
}

/// A built BERT: the model, its parameters, and whether the head and pooler are new.
pub struct Built {
    /// The model.
    pub model: BertClassifier,
    /// Its parameters.
    pub params: ParamStore,
    /// The classifier was newly initialised.
    pub new_head: bool,
    /// The pooler was newly initialised.
    pub new_pooler: bool,
}

impl BertClassifier {
    /// Builds BERT from `cfg` and `weights` with the head of `head` (see
    /// [`crate::families::Family::build`]).
    pub fn build(
        cfg: &HfConfig,
        weights: &Weights,
        head: &HeadSpec,
        seed: u64,
        device: &Device,
    ) -> Result<Built> {
        let ec: EncoderConfig = cfg.parse()?;
        ec.validate(&cfg.path)?;
        let pooling = pooling(&Bert, head)?;
        let h = ec.hidden_size;
        let hidden_dropout = head.hidden_dropout.unwrap_or(ec.hidden_dropout_prob);
        let mut b = Builder::new(
            weights,
            "bert.",
            "embeddings.word_embeddings.weight",
            ec.initializer_range,
            seed,
            device,
        );
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
            dropout: hidden_dropout,
        };
        let dropout = EncoderDropout {
            hidden: hidden_dropout,
            attention: head
                .attention_dropout
                .unwrap_or(ec.attention_probs_dropout_prob),
            attention_output: hidden_dropout,
        };
        let encoder = Encoder::build(&mut b, &ec, &LAYER_NAMES, dropout)?;
        // The pooler's group exists whatever the pooling (the group layout of every BERT
        // is the same: embeddings, layers, pooler, head).
        let pg = b.group(GroupKind::Pooler);
        let (dense, new_pooler) = if pooling == Pooling::Pooler {
            let ckpt = format!("{}pooler.dense", b.checkpoint_prefix());
            let (linear, new) = b.optional_linear(&ckpt, "bert.pooler.dense", h, h, pg)?;
            let act = Activation::Tanh;
            (Some(Dense { linear, act }), new)
        } else {
            (None, false)
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
        Ok(Built {
            model: BertClassifier {
                embeddings,
                encoder,
                pooling,
                head,
                first_token_last_layer: true,
            },
            params: b.finish(),
            new_head,
            new_pooler,
        })
    }

    fn encode(&self, ctx: &mut Ctx, batch: &Batch, first_only: bool) -> Result<Tensor> {
        let t = batch.tokens()?;
        let x = self
            .embeddings
            .forward(ctx, &t.input_ids, &t.token_type_ids)?;
        self.encoder
            .forward(ctx, x, &t.attention_mask, None, first_only)
    }
}

impl Model for BertClassifier {
    /// With `pooler` or `cls` pooling only the last layer's `[CLS]` row reaches the head,
    /// so after the last attention that layer runs on that row alone (see
    /// [`Encoder::forward`]).
    fn forward(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Tensor> {
        let first_only = self.first_token_last_layer && self.pooling.reads_first_token_only();
        let hidden = self.encode(ctx, batch, first_only)?;
        let pooled = self
            .pooling
            .pool(&hidden, &batch.tokens()?.attention_mask)?;
        self.head.forward(ctx, &pooled)
    }

    fn hidden_states(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Tensor> {
        self.encode(ctx, batch, false)
    }

    fn pooling(&self) -> Pooling {
        self.pooling
    }

    fn set_first_token_only(&mut self, on: bool) {
        self.first_token_last_layer = on;
    }
}

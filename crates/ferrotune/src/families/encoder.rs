//! What the encoder families (BERT, RoBERTa, DistilBERT, MPNet) share above `nn`: a model
//! that is embeddings → the post-norm encoder ([`Encoder`]) → pooling → a classification
//! head, implementing [`Model`] once. A family supplies its embeddings ([`Embed`]), its
//! layer names and its head; `build` functions in the family folders assemble the rest.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::families::{HeadSpec, Loaded, Model};
use crate::nn::encoder::{Encoder, EncoderConfig, EncoderDropout};
use crate::nn::head::ClassificationHead;
use crate::nn::{Batch, Ctx, ParamStore, Pooling, TokenBatch};

/// A family's embeddings: token ids in, `(batch·seq, hidden)` out (after their layer norm
/// and dropout), and any position bias the attention adds.
pub trait Embed: Send + Sync {
    /// The embedded tokens, `(batch·seq, hidden)`.
    fn forward(&self, ctx: &mut Ctx, tokens: &TokenBatch) -> Result<Tensor>;

    /// A per-head bias `(heads, seq, seq)` added to every layer's attention scores (MPNet's
    /// relative position bias); none by default.
    fn position_bias(&self, _ctx: &Ctx, _seq: usize, _device: &Device) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// An encoder family's model: embeddings → encoder → pooling → head.
pub struct EncoderClassifier {
    /// The family's embeddings.
    pub embeddings: Box<dyn Embed>,
    /// The encoder layers.
    pub encoder: Encoder,
    /// What the head reads.
    pub pooling: Pooling,
    /// The head.
    pub head: ClassificationHead,
    /// Whether [`Model::forward`] runs the last layer after attention for the first row
    /// only, when the pooling reads nothing else (see [`Encoder::forward`]).
    pub first_token_last_layer: bool,
}

impl EncoderClassifier {
    /// The model, its parameters and whether its head is new, as [`Loaded`].
    pub fn loaded(self, params: ParamStore, new_head: bool, notes: Vec<String>) -> Loaded {
        Loaded {
            model: Box::new(self),
            params,
            new_head,
            notes,
        }
    }

    fn encode(&self, ctx: &mut Ctx, batch: &Batch, first_only: bool) -> Result<Tensor> {
        let t = batch.tokens()?;
        let x = self.embeddings.forward(ctx, t)?;
        let seq = t.input_ids.dim(1)?;
        let bias = self
            .embeddings
            .position_bias(ctx, seq, t.input_ids.device())?;
        self.encoder
            .forward(ctx, x, &t.attention_mask, bias.as_ref(), first_only)
    }
}

impl Model for EncoderClassifier {
    /// With a pooling that reads only the first token, the last layer after its attention
    /// runs on that row alone (see [`Encoder::forward`]).
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

/// The encoder's dropout rates: the recipe's overrides in `head`, else `cfg`'s;
/// `attention_output` says whether the attention output has dropout before its residual
/// sum (DistilBERT's has none).
pub fn dropout(cfg: &EncoderConfig, head: &HeadSpec, attention_output: bool) -> EncoderDropout {
    let hidden = head.hidden_dropout.unwrap_or(cfg.hidden_dropout_prob);
    EncoderDropout {
        hidden,
        attention: head
            .attention_dropout
            .unwrap_or(cfg.attention_probs_dropout_prob),
        attention_output: if attention_output { hidden } else { 0.0 },
    }
}

/// `ferrotune inspect`'s line for an encoder: layers, widths and heads.
pub fn describe(cfg: &EncoderConfig) -> String {
    format!(
        "{} (hidden {}, heads {}, intermediate {})",
        cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
    )
}

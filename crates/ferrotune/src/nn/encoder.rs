//! The post-layer-norm transformer encoder that BERT, RoBERTa, MPNet and DistilBERT share:
//! each layer is self-attention → dropout → add & norm → feed-forward → dropout → add &
//! norm. Families differ in their embeddings, their tensor names ([`LayerNames`]), an
//! optional per-head position bias added to the attention scores (MPNet), whether the
//! attention output has dropout (DistilBERT's has none), and their heads.

use std::sync::OnceLock;

use candle_core::{Tensor, Var};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::kernels::int8::QWeight;
use crate::kernels::{attention, fused, grad_sink, linear};
use crate::nn::builder::Builder;
use crate::nn::layers::{add_lora_deltas, forward_stacked_4bit, Activation, LayerNorm, Linear};
use crate::nn::params::GroupKind;
use crate::nn::Ctx;

/// The fields of a BERT-style `config.json` (BERT, RoBERTa, MPNet use these names; a
/// family with other names converts into it). Parsed by
/// [`crate::families::HfConfig::parse`], so errors name the file.
#[derive(Debug, Clone, Deserialize)]
pub struct EncoderConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden (model) width.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Activation of the feed-forward layer (`gelu` is the exact, erf-based GELU).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Dropout on hidden states.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Dropout before (and inside) the classifier; `None` means `hidden_dropout_prob`.
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    /// Number of position embeddings.
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Standard deviation of new weights.
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
    /// The padding token id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_init_range() -> f64 {
    0.02
}

impl EncoderConfig {
    /// Checks the shape fields; errors name `path` and the field.
    pub fn validate(&self, path: &std::path::Path) -> Result<()> {
        self.check()
            .map_err(|(field, msg)| Error::at(path, None, Some(field), msg))
    }

    /// The first problem with the shape fields: the field and what is wrong.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err((
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err((field, "must be at least 1".into()));
            }
        }
        if let Err(e) = Activation::parse(&self.hidden_act) {
            return Err(("hidden_act", e.to_string()));
        }
        Ok(())
    }

    /// The classifier's dropout: `classifier_dropout`, else `hidden_dropout_prob`.
    pub fn head_dropout(&self) -> f64 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }
}

/// Where a family keeps a layer's tensors: `{layer}.{i}.{q}.weight` and so on.
#[derive(Debug, Clone, Copy)]
pub struct LayerNames {
    /// The layers' common prefix (`encoder.layer`), followed by `.{i}`.
    pub layer: &'static str,
    /// Query projection.
    pub q: &'static str,
    /// Key projection.
    pub k: &'static str,
    /// Value projection.
    pub v: &'static str,
    /// Attention output projection.
    pub o: &'static str,
    /// Layer norm after attention.
    pub ln1: &'static str,
    /// Feed-forward in.
    pub inter: &'static str,
    /// Feed-forward out.
    pub out: &'static str,
    /// Layer norm after the feed-forward.
    pub ln2: &'static str,
}

/// One encoder layer.
pub struct EncoderLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln1: LayerNorm,
    inter: Linear,
    out: Linear,
    ln2: LayerNorm,
    /// int8 or bf16 inference: the three projections as one layer, made at first use.
    qkv_low: OnceLock<Linear>,
}

impl EncoderLayer {
    /// The query, key and value projections side by side, `(tokens, 3·hidden)`: the base
    /// projections from one GEMM, plus the LoRA adapters' outputs of those that have one.
    fn qkv(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let lins = [&self.q, &self.k, &self.v];
        if let Some(y) = forward_stacked_4bit(ctx, &lins, x)? {
            return Ok(y);
        }
        let base = self.qkv_base(ctx, x)?;
        add_lora_deltas(ctx, base, &[&self.q, &self.k, &self.v], x)
    }

    /// The base query, key and value projections side by side, `(tokens, 3·hidden)`, from
    /// one GEMM over the concatenated weights (the input is read once; the weights, a few
    /// hundred KiB, are concatenated per forward pass).
    fn qkv_base(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        if ctx.low_precision() && self.q.q4.is_some() {
            // 4-bit weights in int8 or bf16 inference: each layer converts its own.
            let parts = [&self.q, &self.k, &self.v].map(|l| l.forward_base(ctx, x));
            let [q, k, v] = parts;
            return Ok(Tensor::cat(&[q?, k?, v?], 1)?);
        }
        if ctx.low_precision() || (self.q.int8_only && !ctx.train) {
            let l = match self.qkv_low.get() {
                Some(l) => l,
                None => {
                    let cat = |f: fn(&Linear) -> &Var| -> Result<Var> {
                        let ts = [&self.q, &self.k, &self.v].map(|l| f(l).as_tensor().clone());
                        Ok(Var::from_tensor(&Tensor::cat(&ts, 0)?)?)
                    };
                    let l = match [&self.q, &self.k, &self.v].map(|l| l.q.get()) {
                        // A quantized model: its int8 weights, one below another.
                        [Some(q), Some(k), Some(v)] if self.q.int8_only => Linear::quantized(
                            QWeight::concat(&[q, k, v]),
                            cat(|l| &l.b)?,
                            self.q.group,
                        )?,
                        _ => Linear::new(cat(|l| &l.w)?, cat(|l| &l.b)?, self.q.group),
                    };
                    let _ = self.qkv_low.set(l);
                    self.qkv_low.get().expect("set above")
                }
            };
            return l.forward_base(ctx, x);
        }
        if self.q.int8_only {
            return Err(Linear::int8_only_error());
        }
        let ws = [&self.q, &self.k, &self.v].map(|l| ctx.w(&l.w, l.group));
        let bs = [&self.q, &self.k, &self.v].map(|l| ctx.w(&l.b, l.group));
        // With a gradient sink on, the concatenations' gradients go to the three
        // parameters' own buffers.
        let w = grad_sink::concat(&ws.each_ref())?;
        let b = grad_sink::concat(&bs.each_ref())?;
        linear::linear_mixed(x, &w, &b, ctx.bf16 && ctx.train)
    }
}

/// Dropout rates of an encoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderDropout {
    /// On the embeddings' output and each feed-forward output.
    pub hidden: f64,
    /// On the attention probabilities.
    pub attention: f64,
    /// On each attention output before its residual sum (`hidden` for BERT; 0 for
    /// DistilBERT, which has none there).
    pub attention_output: f64,
}

/// A stack of encoder layers.
pub struct Encoder {
    layers: Vec<EncoderLayer>,
    heads: usize,
    hidden: usize,
    act: Activation,
    /// Its dropout rates.
    pub dropout: EncoderDropout,
}

/// The additive attention bias of a padding mask `(batch, seq)` (1 token, 0 padding):
/// 0 for tokens, the most negative f32 for padding (as transformers).
pub fn key_bias(attention_mask: &Tensor) -> Result<Tensor> {
    Ok(((attention_mask.ones_like()? - attention_mask)? * f32::MIN as f64)?)
}

/// Row 0 of each sequence of `t` `(batch·seq, hidden)`: `(batch, hidden)`.
fn first_rows(t: &Tensor, batch: usize, seq: usize) -> Result<Tensor> {
    let h = t.dim(1)?;
    Ok(t.reshape((batch, seq, h))?
        .narrow(1, 0, 1)?
        .contiguous()?
        .reshape((batch, h))?)
}

impl Encoder {
    /// Builds `cfg.num_hidden_layers` layers named by `names`, each in its own layer group
    /// (declared here, after the caller's embeddings group).
    pub fn build(
        b: &mut Builder,
        cfg: &EncoderConfig,
        names: &LayerNames,
        dropout: EncoderDropout,
    ) -> Result<Encoder> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let eps = cfg.layer_norm_eps;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let g = b.group(GroupKind::Layer(l));
            let p = format!("{}.{l}", names.layer);
            let n = |s: &str| format!("{p}.{s}");
            layers.push(EncoderLayer {
                q: b.linear(&n(names.q), h, h, g)?,
                k: b.linear(&n(names.k), h, h, g)?,
                v: b.linear(&n(names.v), h, h, g)?,
                o: b.linear(&n(names.o), h, h, g)?,
                ln1: b.layer_norm(&n(names.ln1), h, eps, g)?,
                inter: b.linear(&n(names.inter), i, h, g)?,
                out: b.linear(&n(names.out), h, i, g)?,
                ln2: b.layer_norm(&n(names.ln2), h, eps, g)?,
                qkv_low: OnceLock::new(),
            });
        }
        Ok(Encoder {
            layers,
            heads: cfg.num_attention_heads,
            hidden: h,
            act: Activation::parse(&cfg.hidden_act)?,
            dropout,
        })
    }

    /// Runs the layers on `x` `(batch·seq, hidden)` (the embeddings' output) with padding
    /// `attention_mask` `(batch, seq)` and, if any, `pos_bias` `(heads, seq, seq)` added to
    /// every sequence's attention scores. Returns `(batch, seq, hidden)`, or with
    /// `first_only` `(batch, 1, hidden)`: the first (`[CLS]`) row of each sequence.
    ///
    /// Attention mixes tokens; everything after it in a layer (output projection,
    /// residual, layer norm, feed-forward) works on each token's row alone, so the last
    /// layer's first row needs the other rows only up to its attention: with `first_only`
    /// the rest of that layer runs on one row per sequence instead of `seq`, and its
    /// attention computes the first query's scores only. Same values and gradients as the
    /// full layer (tested); about 12% of a MiniLM-L6 training step's multiply-adds at 128
    /// tokens, 6% of bert-base's.
    pub fn forward(
        &self,
        ctx: &mut Ctx,
        x: Tensor,
        attention_mask: &Tensor,
        pos_bias: Option<&Tensor>,
        first_only: bool,
    ) -> Result<Tensor> {
        let (bsz, seq) = attention_mask.dims2()?;
        let (h, nh) = (self.hidden, self.heads);
        let dh = h / nh;
        let scale = 1.0 / (dh as f64).sqrt();
        let key_bias = key_bias(attention_mask)?;
        let bias = key_bias.reshape((bsz, 1, 1, seq))?;
        let d = self.dropout;
        let last = self.layers.len().saturating_sub(1);
        let mut x = x;
        let mut rows = seq;
        for (i, layer) in self.layers.iter().enumerate() {
            let first = first_only && i == last && seq > 1;
            let attn = if ctx.fused() {
                let qkv = layer.qkv(ctx, &x)?;
                let drop = ctx.dropout_seed(d.attention);
                if first {
                    // One row per sequence (the first query's).
                    attention::attention_first_query(&qkv, &key_bias, pos_bias, drop, nh)?
                } else {
                    attention::attention(&qkv, &key_bias, pos_bias, drop, nh)?
                }
            } else {
                // The composed reference (`FERROTUNE_NO_FUSED=1`).
                let heads = |t: Tensor| -> Result<Tensor> {
                    Ok(t.reshape((bsz, seq, nh, dh))?
                        .transpose(1, 2)?
                        .contiguous()?)
                };
                let q = heads(layer.q.forward(ctx, &x)?)?;
                let k = heads(layer.k.forward(ctx, &x)?)?;
                let v = heads(layer.v.forward(ctx, &x)?)?;
                let mut scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
                if let Some(pb) = pos_bias {
                    scores = scores.broadcast_add(&pb.unsqueeze(0)?)?;
                }
                let probs = fused::softmax_last_composed(&scores)?;
                let probs = match ctx.dropout_seed(d.attention) {
                    Some(drop) => {
                        let mask = fused::dropout_mask(&[bsz, nh, seq, seq], drop)?;
                        (probs * mask.to_device(x.device())?)?
                    }
                    None => probs,
                };
                let attn = probs
                    .matmul(&v)?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((bsz * seq, h))?;
                if first {
                    first_rows(&attn, bsz, seq)?
                } else {
                    attn
                }
            };
            let residual = if first {
                rows = 1;
                first_rows(&x, bsz, seq)?
            } else {
                x
            };
            let attn = layer.o.forward(ctx, &attn)?;
            let x1 = layer
                .ln1
                .forward_residual(ctx, &attn, &residual, d.attention_output)?;
            let inter = layer.inter.forward_act(ctx, &x1, self.act)?;
            let out = layer.out.forward(ctx, &inter)?;
            x = layer.ln2.forward_residual(ctx, &out, &x1, d.hidden)?;
        }
        Ok(x.reshape((bsz, rows, h))?)
    }
}

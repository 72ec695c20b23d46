//! What decoder families (Llama, GPT-2) share: rotary position embeddings, causal
//! (grouped-query) self-attention over a fused Q/K/V projection with an optional KV cache,
//! and the [`Generator`] interface that `ferrotune generate` and the server's `/generate`
//! drive.
//!
//! Training and full-sequence inference run the attention over the whole sequence
//! ([`causal_attention`]); generation runs it for the new tokens only, against the keys
//! and values of the earlier ones kept in a [`KvCache`].

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;
use crate::kernels::decode;
use crate::nn::encoder::key_bias;
use crate::nn::layers::{Embedding, Linear};
use crate::nn::Ctx;

/// Rotary position embeddings as transformers' Llama applies them (`rotate_half`: the
/// first and second halves of each head's dimensions form the pairs), with the tables
/// computed in f32 as transformers does so that long positions round alike.
#[derive(Debug, Clone)]
pub struct Rope {
    /// Per-head width.
    pub head_dim: usize,
    /// The inverse frequencies, `head_dim / 2` of them (f32, as transformers).
    inv_freq: Vec<f32>,
    /// Positions are divided by this (`rope_scaling` of type `linear`); 1 otherwise.
    pub linear_factor: f32,
}

impl Rope {
    /// The embedding of heads `head_dim` wide with base `theta`.
    pub fn new(head_dim: usize, theta: f64) -> Rope {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Rope {
            head_dim,
            inv_freq,
            linear_factor: 1.0,
        }
    }

    /// Replaces the inverse frequencies (scaled variants such as Llama 3's).
    pub fn with_inv_freq(mut self, inv_freq: Vec<f32>) -> Rope {
        self.inv_freq = inv_freq;
        self
    }

    /// Positions divided by `factor` (`rope_scaling` of type `linear`).
    pub fn with_linear_factor(mut self, factor: f32) -> Rope {
        self.linear_factor = factor;
        self
    }

    /// The inverse frequencies.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `cos` and `sin` tables `(positions, head_dim)` for positions `start..start + n`.
    pub fn tables(&self, start: usize, n: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let (dh, half) = (self.head_dim, self.head_dim / 2);
        let mut cos = Vec::with_capacity(n * dh);
        let mut sin = Vec::with_capacity(n * dh);
        for p in start..start + n {
            let pos = p as f32 / self.linear_factor;
            for _ in 0..2 {
                for &f in &self.inv_freq[..half] {
                    let a = pos * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        Ok((
            Tensor::from_vec(cos, (n, dh), device)?,
            Tensor::from_vec(sin, (n, dh), device)?,
        ))
    }

    /// `x` `(batch·seq, heads·head_dim)` (tokens first) rotated by the tables of
    /// [`Rope::tables`] `(seq, head_dim)`, in the same layout.
    pub fn apply_rows(
        &self,
        x: &Tensor,
        batch: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let (rows, w) = x.dims2()?;
        let seq = rows / batch.max(1);
        let heads = w / self.head_dim;
        let y = self.apply(&x.reshape((batch, seq, heads, self.head_dim))?, cos, sin)?;
        Ok(y.reshape((rows, w))?)
    }

    /// `x` `(batch, seq, heads, head_dim)` rotated by the tables of [`Rope::tables`]
    /// `(seq, head_dim)`: `x·cos + rotate_half(x)·sin`. Differentiable.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (_, seq, _, dh) = x.dims4()?;
        let half = dh / 2;
        let cos = cos.reshape((1, seq, 1, dh))?;
        let sin = sin.reshape((1, seq, 1, dh))?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
    }
}

/// The keys and values of one layer for the tokens seen so far, `(batch, total,
/// kv_heads·head_dim)` each, after rotary embedding.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// Keys.
    pub k: Option<Tensor>,
    /// Values.
    pub v: Option<Tensor>,
}

/// A decoder's KV cache: one [`LayerCache`] per layer, and how many positions it holds.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer.
    pub layers: Vec<LayerCache>,
    /// Tokens already in the cache (the position of the next one).
    pub len: usize,
}

impl KvCache {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> KvCache {
        KvCache {
            layers: vec![LayerCache::default(); layers],
            len: 0,
        }
    }
}

/// A model that generates text one token at a time (what `ferrotune generate` drives).
pub trait Generator: Send + Sync {
    /// An empty cache for one sequence.
    fn new_cache(&self) -> KvCache;

    /// Runs `ids` (the next tokens of one sequence, at least one) through the model,
    /// appending their keys and values to `cache`, and returns the next-token logits after
    /// the last of them, `vocab` long.
    fn step(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>>;

    /// The longest sequence the model takes (its position embeddings or `rope` range).
    fn max_positions(&self) -> usize;
}

/// The weight of a decoder's language-model head as this pass reads it (detached when
/// frozen) when the head is exactly `h · Wᵀ`: `lm_head` without an adapter or int8-only
/// weights, or the embedding table when tied (`lm_head` `None`). `None` otherwise, and with
/// the fused operations off or in low precision (see [`crate::families::Model::lm_head_parts`]).
pub fn plain_lm_head(ctx: &Ctx, lm_head: Option<&Linear>, embed: &Embedding) -> Option<Tensor> {
    if !ctx.fused() || ctx.low_precision() {
        return None;
    }
    match lm_head {
        None => Some(ctx.w(&embed.table, embed.group)),
        Some(l) if l.lora.is_none() && !l.int8_only && l.q4.is_none() => Some(ctx.w(&l.w, l.group)),
        Some(_) => None,
    }
}

/// Causal self-attention of `q` `(batch·seq, heads·head_dim)` over `k`, `v` `(batch·seq,
/// kv_heads·head_dim)` (after rotary embedding), with padding `attention_mask` `(batch,
/// seq)` (1 token, 0 padding) and probability dropout `p`: the fused kernel
/// ([`decode::causal_attention`], forward and backward), or with the fused operations off
/// its composition of candle operations (transformers' eager attention). Returns
/// `(batch·seq, heads·head_dim)`, tokens first.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention(
    ctx: &mut Ctx,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    attention_mask: &Tensor,
    heads: usize,
    kv_heads: usize,
    p: f64,
) -> Result<Tensor> {
    let qkv = Tensor::cat(&[q, k, v], 1)?;
    let key_bias = key_bias(attention_mask)?;
    let drop = ctx.dropout_seed(p);
    if ctx.fused() {
        decode::causal_attention(&qkv, &key_bias, drop, heads, kv_heads)
    } else {
        decode::causal_attention_composed(&qkv, &key_bias, drop, heads, kv_heads)
    }
}

/// Attention of new queries `q` `(new, heads·head_dim)` of one sequence against the cache
/// of their layer, after appending their keys and values `k`, `v` `(new,
/// kv_heads·head_dim)` to it (inference: generation). Returns `(new, heads·head_dim)`.
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kv_heads: usize,
    cache: &mut LayerCache,
) -> Result<Tensor> {
    let (new, w) = k.dims2()?;
    let k = k.reshape((1, new, w))?;
    let v = v.reshape((1, new, w))?;
    let k = match &cache.k {
        Some(old) => Tensor::cat(&[old, &k], 1)?,
        None => k,
    };
    let v = match &cache.v {
        Some(old) => Tensor::cat(&[old, &v], 1)?,
        None => v,
    };
    let total = k.dim(1)?;
    let bias = Tensor::zeros((1, total), DType::F32, q.device())?;
    let out = decode::decode_attention(q, &k, &v, &bias, heads, kv_heads)?;
    cache.k = Some(k);
    cache.v = Some(v);
    Ok(out)
}

/// Row `b·seq + last_b` of `hidden` `(batch·seq, width)` for each sequence `b`, where
/// `last_b` is its last token under `attention_mask` (transformers' decoder classifiers
/// read the last non-padding token): `(batch, width)`.
pub fn last_token_rows(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let (b, s) = attention_mask.dims2()?;
    let mask = attention_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let idx: Vec<u32> = mask
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let last = row.iter().rposition(|&m| m > 0.0).unwrap_or(s - 1);
            (i * s + last) as u32
        })
        .collect();
    let idx = Tensor::from_vec(idx, b, hidden.device())?;
    Ok(hidden.index_select(&idx, 0)?)
}

//! What decoder families (Llama, GPT-2) share: rotary position embeddings, causal
//! (grouped-query) self-attention over a fused Q/K/V projection with an optional KV cache,
//! and the [`Generator`] interface that `ferrotune generate` and the server's `/generate`
//! drive.
//!
//! Training and full-sequence inference run the attention over the whole sequence
//! ([`causal_attention`]); generation runs it for the new tokens only, against the keys
//! and values of the earlier ones kept in a [`KvCache`].

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};
use crate::kernels::fused;
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

/// The keys and values of one layer for the tokens seen so far, `(batch, kv_heads, total,
/// head_dim)` each, after rotary embedding.
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

/// `(batch, seq, heads, head_dim)` → `(batch, heads, seq, head_dim)`, contiguous.
fn heads_first(t: &Tensor) -> Result<Tensor> {
    Ok(t.transpose(1, 2)?.contiguous()?)
}

/// `kv` `(batch, kv_heads, n, head_dim)` repeated so that query head `h` reads kv head
/// `h / rep` (transformers' `repeat_kv`): `(batch, kv_heads·rep, n, head_dim)`.
fn repeat_kv(kv: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(kv.clone());
    }
    let (b, kvh, n, dh) = kv.dims4()?;
    Ok(kv
        .unsqueeze(2)?
        .broadcast_as((b, kvh, rep, n, dh))?
        .contiguous()?
        .reshape((b, kvh * rep, n, dh))?)
}

/// Causal self-attention of `q` `(batch, seq, heads, head_dim)` over `k`, `v` `(batch,
/// seq, kv_heads, head_dim)` (after rotary embedding), with padding `attention_mask`
/// `(batch, seq)` (1 token, 0 padding) and probability dropout `p`. Returns `(batch·seq,
/// heads·head_dim)`, tokens first. Composed of differentiable candle operations (the
/// reference the fused kernel is tested against), transformers' eager attention.
pub fn causal_attention(
    ctx: &mut Ctx,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    attention_mask: &Tensor,
    p: f64,
) -> Result<Tensor> {
    let (b, s, nh, dh) = q.dims4()?;
    let kvh = k.dim(2)?;
    if kvh == 0 || nh % kvh != 0 {
        return Err(Error::Msg(format!(
            "attention: {nh} query heads do not share {kvh} key/value heads evenly"
        )));
    }
    let q = heads_first(q)?;
    let k = repeat_kv(&heads_first(k)?, nh / kvh)?;
    let v = repeat_kv(&heads_first(v)?, nh / kvh)?;
    let bias = causal_bias(attention_mask, s)?;
    let scale = 1.0 / (dh as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
    let mut probs = fused::softmax_last_composed(&scores)?;
    if let Some(d) = ctx.dropout_seed(p) {
        let mask = fused::dropout_mask(&[b, nh, s, s], d)?.to_device(q.device())?;
        probs = (probs * mask)?;
    }
    Ok(probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * s, nh * dh))?)
}

/// The additive attention bias `(batch, 1, new, total)` of `new` queries at positions
/// `total − new ..` over `total` keys: 0 where the key is a token at or before the query,
/// the most negative f32 where it is later or padding (as transformers' masks).
pub fn causal_bias(attention_mask: &Tensor, new: usize) -> Result<Tensor> {
    let (b, total) = attention_mask.dims2()?;
    let mask = attention_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let off = total - new;
    let mut out = Vec::with_capacity(b * new * total);
    for row in &mask {
        for i in 0..new {
            for (j, &m) in row.iter().enumerate() {
                out.push(if j <= off + i && m > 0.0 {
                    0.0
                } else {
                    f32::MIN
                });
            }
        }
    }
    Ok(Tensor::from_vec(
        out,
        (b, 1, new, total),
        attention_mask.device(),
    )?)
}

/// Attention of new queries `q` `(1, new, heads, head_dim)` against the cache of their
/// layer, after appending their keys and values `k`, `v` `(1, new, kv_heads, head_dim)`
/// to it (inference: generation). Returns `(new, heads·head_dim)`.
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cache: &mut LayerCache,
) -> Result<Tensor> {
    let (b, new, nh, dh) = q.dims4()?;
    let kvh = k.dim(2)?;
    let (k, v) = (heads_first(k)?, heads_first(v)?);
    let k = match &cache.k {
        Some(old) => Tensor::cat(&[old, &k], 2)?,
        None => k,
    };
    let v = match &cache.v {
        Some(old) => Tensor::cat(&[old, &v], 2)?,
        None => v,
    };
    cache.k = Some(k.clone());
    cache.v = Some(v.clone());
    let total = k.dim(2)?;
    let q = heads_first(q)?;
    let k = repeat_kv(&k, nh / kvh)?;
    let v = repeat_kv(&v, nh / kvh)?;
    let mask = Tensor::ones((b, total), DType::F32, q.device())?;
    let bias = causal_bias(&mask, new)?;
    let scale = 1.0 / (dh as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * new, nh * dh))?)
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

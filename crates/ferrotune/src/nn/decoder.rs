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
use crate::kernels::par::fusable;
use crate::kernels::{decode, rope};
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

    /// The fused projection `qkv` `(batch·seq, (heads + 2·kv_heads)·head_dim)` with its
    /// query and key heads rotated by the tables of [`Rope::tables`] `(seq, head_dim)` and
    /// its value heads unchanged, in the same layout: one fused operation
    /// ([`rope::rope_qkv`]) on CPU f32 tensors when `fused`, else the composition of
    /// [`Rope::apply`] (the same bits). Differentiable in `qkv`.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_qkv(
        &self,
        fused: bool,
        qkv: &Tensor,
        batch: usize,
        heads: usize,
        kv_heads: usize,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        if fused && fusable(&[qkv, cos, sin]) {
            return rope::rope_qkv(qkv, cos, sin, heads, kv_heads);
        }
        let [q, k, v] = split_qkv(qkv, heads, kv_heads, self.head_dim)?;
        let q = self.apply_rows(&q, batch, cos, sin)?;
        let k = self.apply_rows(&k, batch, cos, sin)?;
        Ok(Tensor::cat(&[&q, &k, &v], 1)?)
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

/// The query, key and value blocks (views) of a fused projection `(rows, (heads +
/// 2·kv_heads)·head_dim)`: `(rows, heads·head_dim)`, then `(rows, kv_heads·head_dim)` twice.
pub fn split_qkv(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<[Tensor; 3]> {
    let (q, kv) = (heads * head_dim, kv_heads * head_dim);
    Ok([
        qkv.narrow(1, 0, q)?,
        qkv.narrow(1, q, kv)?,
        qkv.narrow(1, q + kv, kv)?,
    ])
}

/// Causal self-attention of the fused projection `qkv` `(batch·seq, (heads +
/// 2·kv_heads)·head_dim)` (query, key, value heads side by side; after rotary embedding),
/// with padding `attention_mask` `(batch, seq)` (1 token, 0 padding) and probability
/// dropout `p`: the fused kernel
/// ([`decode::causal_attention`], forward and backward), or with the fused operations off
/// its composition of candle operations (transformers' eager attention). Returns
/// `(batch·seq, heads·head_dim)`, tokens first.
pub fn causal_attention(
    ctx: &mut Ctx,
    qkv: &Tensor,
    attention_mask: &Tensor,
    heads: usize,
    kv_heads: usize,
    p: f64,
) -> Result<Tensor> {
    let key_bias = key_bias(attention_mask)?;
    let drop = ctx.dropout_seed(p);
    if ctx.fused() {
        decode::causal_attention(qkv, &key_bias, drop, heads, kv_heads)
    } else {
        decode::causal_attention_composed(qkv, &key_bias, drop, heads, kv_heads)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// The fused rotary embedding of a fused QKV projection gives the composition's bits,
    /// forward and backward: with one and with grouped KV heads, at a later start position,
    /// and large enough to run on the thread pool. The value heads pass unchanged.
    #[test]
    fn fused_rope_on_qkv_is_the_composition() {
        let dev = Device::Cpu;
        for (batch, seq, heads, kv, dh, start) in [
            (1, 3, 2, 1, 4, 0),
            (3, 40, 6, 2, 16, 0),
            (2, 200, 9, 3, 64, 0),
            (1, 5, 4, 4, 8, 7),
        ] {
            let rope = Rope::new(dh, 10_000.0);
            let (cos, sin) = rope.tables(start, seq, &dev).unwrap();
            let w = (heads + 2 * kv) * dh;
            let x = Tensor::randn(0f32, 2.0, (batch * seq, w), &dev).unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let g = Tensor::randn(0f32, 1.0, (batch * seq, w), &dev).unwrap();
            let run = |fused| {
                let y = rope
                    .apply_qkv(fused, x.as_tensor(), batch, heads, kv, &cos, &sin)
                    .unwrap();
                let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let dx = grads.get(x.as_tensor()).unwrap().clone();
                (y, dx)
            };
            let ((yf, df), (yc, dc)) = (run(true), run(false));
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(bits(&yf), bits(&yc), "forward, {heads}/{kv} heads of {dh}");
            assert_eq!(bits(&df), bits(&dc), "backward, {heads}/{kv} heads of {dh}");
            let v0 = (heads + kv) * dh;
            let v = |t: &Tensor| bits(&t.narrow(1, v0, kv * dh).unwrap());
            assert_eq!(v(&yf), v(x.as_tensor()));
            let q = |t: &Tensor| bits(&t.narrow(1, 0, v0).unwrap());
            assert_ne!(q(&yf), q(x.as_tensor()));
        }
    }

    /// Projections whose width is not that of the heads, or whose rows are not whole
    /// sequences of the tables, are errors, not panics.
    #[test]
    fn fused_rope_rejects_mismatched_shapes() {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 10_000.0);
        let (cos, sin) = rope.tables(0, 4, &dev).unwrap();
        let x = Tensor::zeros((8, 8 * 5), DType::F32, &dev).unwrap();
        assert!(rope.apply_qkv(true, &x, 2, 3, 1, &cos, &sin).is_ok());
        let e = rope.apply_qkv(true, &x, 2, 2, 1, &cos, &sin).unwrap_err();
        assert!(e.to_string().contains("do not hold"), "{e}");
        let x = Tensor::zeros((7, 8 * 5), DType::F32, &dev).unwrap();
        assert!(rope.apply_qkv(true, &x, 1, 3, 1, &cos, &sin).is_err());
    }
}

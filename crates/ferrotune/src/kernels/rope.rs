//! Llama's rotary position embedding on the fused QKV projection, forward and backward as
//! one candle custom op (issue 15).
//!
//! Composed (`nn::decoder::Rope::apply`), each of the query and key blocks takes two
//! narrows, a negation, a concatenation, two broadcast products and a sum, the attention
//! input then a concatenation of q, k and v; the backward pass pads each narrow's gradient
//! with zeros and adds the pieces up. Those were single-threaded copies and separate
//! passes over the activations, ~3% of a SmolLM2 LoRA step (`perf`). Here the forward is
//! one parallel pass over the rows that rotates the query and key heads and copies the
//! value heads, and the backward one pass that rotates back. Both compute each element
//! with the composition's operations in its order, so the results are the same bits.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::par::{f32_data, filled, par_for, with_f32, Out, PAR_MIN};
use super::simd::dispatch;
use crate::error::{Error, Result};

/// `qkv` `(batch·seq, (heads + 2·kv_heads)·head_dim)` — query heads, key heads, value
/// heads side by side, tokens first — with every query and key head rotated by the tables
/// `cos`, `sin` `(seq, head_dim)` of `Rope::tables` (row `r` is position `r % seq`):
/// `x·cos + rotate_half(x)·sin`, with `rotate_half(x) = [−x₂, x₁]` for the halves `x₁`,
/// `x₂` of a head. The value heads are copied unchanged. Differentiable in `qkv`; the
/// tables are constants. All three must be f32 CPU tensors.
pub fn rope_qkv(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    let (rows, width) = qkv.dims2()?;
    let (seq, head_dim) = cos.dims2()?;
    if sin.dims() != cos.dims() {
        return Err(Error::Msg(format!(
            "rotary embedding: cos table {:?}, sin table {:?}",
            cos.dims(),
            sin.dims()
        )));
    }
    if head_dim % 2 != 0
        || seq == 0
        || rows % seq != 0
        || width != (heads + 2 * kv_heads) * head_dim
    {
        return Err(Error::Msg(format!(
            "rotary embedding: {rows}×{width} projections do not hold {heads} query and \
             {kv_heads}+{kv_heads} key/value heads of {head_dim} over sequences of {seq}"
        )));
    }
    let op = RopeQkv {
        cos: with_f32(cos, <[f32]>::to_vec)?,
        sin: with_f32(sin, <[f32]>::to_vec)?,
        seq,
        head_dim,
        width,
        rotated: (heads + kv_heads) * head_dim,
    };
    Ok(qkv.contiguous()?.apply_op1(op)?)
}

struct RopeQkv {
    /// `(seq, head_dim)`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    seq: usize,
    head_dim: usize,
    /// Columns of a row.
    width: usize,
    /// The leading columns of a row that are rotated (query and key heads).
    rotated: usize,
}

/// [`rotate`] or [`unrotate`]: `(input heads, cos row, sin row, output heads)`.
type HeadsFn = fn(&[f32], &[f32], &[f32], &mut [f32]);

/// Rows per parallel task.
const ROWS: usize = 16;

dispatch! {
    /// The heads of `head_dim` of `x` forward: `y = x·c + rotate_half(x)·s`.
    fn rotate(x: &[f32], c: &[f32], s: &[f32], y: &mut [f32]) {
        let h = c.len() / 2;
        for (x, y) in x.chunks_exact(2 * h).zip(y.chunks_exact_mut(2 * h)) {
            let (x1, x2) = x.split_at(h);
            let (y1, y2) = y.split_at_mut(h);
            for i in 0..h {
                y1[i] = x1[i] * c[i] + -x2[i] * s[i];
                y2[i] = x2[i] * c[h + i] + x1[i] * s[h + i];
            }
        }
    }
}

dispatch! {
    /// The heads of `head_dim` of `dy` backward: `dx = dy·c + rotate_halfᵀ(dy·s)`, with
    /// `rotate_halfᵀ(g) = [g₂, −g₁]`.
    fn unrotate(dy: &[f32], c: &[f32], s: &[f32], dx: &mut [f32]) {
        let h = c.len() / 2;
        for (d, x) in dy.chunks_exact(2 * h).zip(dx.chunks_exact_mut(2 * h)) {
            let (d1, d2) = d.split_at(h);
            let (x1, x2) = x.split_at_mut(h);
            for i in 0..h {
                x1[i] = d1[i] * c[i] + d2[i] * s[h + i];
                x2[i] = d2[i] * c[h + i] + -(d1[i] * s[i]);
            }
        }
    }
}

impl RopeQkv {
    /// `out` from `src` (both `rows × width`), each row's rotated heads through `f`, the rest
    /// copied.
    fn map(&self, src: &[f32], f: HeadsFn) -> Vec<f32> {
        let (n, width) = (src.len(), self.width);
        let rows = n / width;
        let dh = self.head_dim;
        // Safety: the tasks cover every row and write each of its elements.
        unsafe {
            filled(n, |p| {
                let o = Out(p, n);
                par_for(rows.div_ceil(ROWS), n >= PAR_MIN, |t| {
                    for r in t * ROWS..((t + 1) * ROWS).min(rows) {
                        let pos = (r % self.seq) * dh;
                        let (c, s) = (&self.cos[pos..pos + dh], &self.sin[pos..pos + dh]);
                        let x = &src[r * width..(r + 1) * width];
                        // Row r is written by this task only.
                        let y = o.part(r * width, width);
                        let k = self.rotated;
                        f(&x[..k], c, s, &mut y[..k]);
                        y[k..].copy_from_slice(&x[k..]);
                    }
                });
            })
        }
    }
}

impl CustomOp1 for RopeQkv {
    fn name(&self) -> &'static str {
        "ferrotune-rope-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l)?;
        Ok((CpuStorage::F32(self.map(x, rotate)), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dx = with_f32(grad, |dy| self.map(dy, unrotate))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

//! Fused operations with a forward AND a backward pass, as candle custom ops (issue 4).
//!
//! Composed of candle's element-wise operations, a layer norm is about ten passes over its
//! input forward and twenty backward, each allocating a tensor and running on one thread;
//! the exact GELU is three passes forward and six backward. Here each is one multi-threaded
//! pass forward (rows or chunks split over candle's thread pool, so `--threads` holds) and one
//! backward, recomputing the few statistics it needs instead of storing them.
//!
//! candle's own fast `layer_norm` has no backward and silently cuts the graph (see
//! `../shared/DESIGN.md`); these do have one, and `tests` check both passes against the
//! composed reference on odd shapes. They run on contiguous f32 CPU tensors; anything else
//! (another dtype or device) takes the composed path, so results never depend on whether a
//! fused op exists.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor, D};

use std::sync::Mutex;

use super::par::{f32_data, filled, fusable, map_parts, par_for, with_f32, Out, PAR_MIN};
use super::{grad_sink, simd};
use crate::error::Result;

/// Whether the model uses the fused operations: yes, unless the environment sets
/// `FERROTUNE_NO_FUSED=1` (for benchmarks that compare the two paths, and for bisecting a
/// numerical difference). Read once; tests can override it on their own thread
/// ([`with_enabled`]).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    OVERRIDE.with(|o| o.get()).unwrap_or_else(|| {
        *ON.get_or_init(|| std::env::var_os("FERROTUNE_NO_FUSED").is_none_or(|v| v != "1"))
    })
}

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the fused operations on or off on this thread (the model's operations
/// are dispatched from the calling thread), whatever the environment says.
pub fn with_enabled<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let before = OVERRIDE.with(|o| o.replace(Some(on)));
    let r = f();
    OVERRIDE.with(|o| o.set(before));
    r
}

// ---------------------------------------------------------------------------------------
// Layer norm

/// Layer norm over the last dimension: `(x - mean) / sqrt(var + eps) * g + b`, with the
/// biased variance, as `torch.nn.LayerNorm`. Differentiable in `x`, `g` and `b`.
pub fn layer_norm(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(&[x, g, b]) && g.rank() == 1 && b.dims() == g.dims() {
        let (x, g, b) = (x.contiguous()?, g.contiguous()?, b.contiguous()?);
        return Ok(x.apply_op3(&g, &b, LayerNormOp { eps: eps as f32 })?);
    }
    layer_norm_composed(x, g, b, eps)
}

/// The reference composition of [`layer_norm`] from candle's differentiable operations.
pub fn layer_norm_composed(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(g)?.broadcast_add(b)?)
}

struct LayerNormOp {
    eps: f32,
}

/// Mean and 1/sqrt(var + eps) of one row (two passes, in f32 as PyTorch's CPU kernel; the
/// sums in 8 lanes, so they vectorise).
#[inline(always)]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = simd::sum(row) / n;
    let mut acc = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += (c[l] - mean) * (c[l] - mean);
        }
    }
    let var =
        (acc.iter().sum::<f32>() + rest.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>()) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

simd::dispatch! {
    /// The layer norm of every row of `g.len()` elements of `x` into `y`.
    fn layer_norm_rows(x: &[f32], g: &[f32], b: &[f32], y: &mut [f32], eps: f32) {
        let n = g.len();
        for (xr, yr) in x.chunks(n).zip(y.chunks_mut(n)) {
            let (mean, rstd) = row_stats(xr, eps);
            for i in 0..n {
                yr[i] = (xr[i] - mean) * rstd * g[i] + b[i];
            }
        }
    }
}

simd::dispatch! {
    /// The layer norm's backward for every row of `g.len()` elements: `dx` written, the
    /// rows' `dy · x̂` and `dy` added into `adg` and `adb`.
    fn layer_norm_rows_backward(
        x: &[f32],
        g: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        adg: &mut [f32],
        adb: &mut [f32],
        eps: f32
    ) {
        let n = g.len();
        for ((xr, dyr), dxr) in x.chunks(n).zip(dy.chunks(n)).zip(dx.chunks_mut(n)) {
            let (mean, rstd) = row_stats(xr, eps);
            // s1 = Σ dy·g, s2 = Σ dy·g·x̂, in 8 lanes.
            let (mut a1, mut a2) = ([0f32; 8], [0f32; 8]);
            let full = n / 8 * 8;
            for ((xc, dc), gc) in xr[..full]
                .chunks_exact(8)
                .zip(dyr[..full].chunks_exact(8))
                .zip(g[..full].chunks_exact(8))
            {
                for l in 0..8 {
                    let dxhat = dc[l] * gc[l];
                    a1[l] += dxhat;
                    a2[l] += dxhat * ((xc[l] - mean) * rstd);
                }
            }
            let (mut s1, mut s2) = (a1.iter().sum::<f32>(), a2.iter().sum::<f32>());
            for i in full..n {
                let dxhat = dyr[i] * g[i];
                s1 += dxhat;
                s2 += dxhat * ((xr[i] - mean) * rstd);
            }
            let (m1, m2) = (s1 / n as f32, s2 / n as f32);
            for i in 0..n {
                let xhat = (xr[i] - mean) * rstd;
                dxr[i] = rstd * (dyr[i] * g[i] - m1 - xhat * m2);
                adg[i] += dyr[i] * xhat;
                adb[i] += dyr[i];
            }
        }
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "ferrotune-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_data(s1, l1)?;
        let g = f32_data(s2, l2)?;
        let b = f32_data(s3, l3)?;
        let n = g.len();
        if n == 0 || l1.dims().last() != Some(&n) || b.len() != n {
            candle_core::bail!("layer norm: last dimension of x does not match the weights");
        }
        // Parts of 16 rows; every element of each row written.
        let y = map_parts(x, 16 * n, |_, xs, ys| {
            layer_norm_rows(xs, g, b, ys, self.eps)
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        let (dx, dg, db) = with_f32(x, |x| {
            with_f32(g, |g| {
                with_f32(grad, |dy| layer_norm_grads(x, g, dy, self.eps))
            })
        })????;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dg, n, dev)?),
            Some(Tensor::from_vec(db, n, dev)?),
        ))
    }
}

/// The layer norm's gradients `(dx, dg, db)` for input `x` (rows of `g.len()`), weights `g`
/// and upstream gradient `dy`, on the thread pool.
fn layer_norm_grads(
    x: &[f32],
    g: &[f32],
    dy: &[f32],
    eps: f32,
) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let n = g.len();
    if n == 0 || !x.len().is_multiple_of(n) || dy.len() != x.len() {
        candle_core::bail!(
            "layer norm backward: {} inputs, {} gradients, rows of {n}",
            x.len(),
            dy.len()
        );
    }
    // Partial sums of dg and db over fixed blocks of rows, added in block order: the
    // result does not depend on which thread takes a block, so runs stay bit-for-bit
    // repeatable (and resumable) on any thread count.
    const ROWS: usize = 32;
    let blocks = x.len().div_ceil(ROWS * n);
    // Block i's partial dg in partials[2i·n..], its partial db after it.
    let mut partials = vec![0f32; blocks * 2 * n];
    let po = Out::new(&mut partials);
    // Safety: the blocks cover every row of dx and write all of each row.
    let dx = unsafe {
        filled(x.len(), |dxp| {
            let dxo = Out(dxp, x.len());
            par_for(blocks, x.len() >= PAR_MIN, |blk| {
                let a = blk * ROWS * n;
                let b = (a + ROWS * n).min(x.len());
                // Safety: block `blk` alone writes these parts.
                let dxs = dxo.part(a, b - a);
                let acc = po.part(blk * 2 * n, 2 * n);
                let (adg, adb) = acc.split_at_mut(n);
                layer_norm_rows_backward(&x[a..b], g, &dy[a..b], dxs, adg, adb, eps);
            });
        })
    };
    let (mut dg, mut db) = (vec![0f32; n], vec![0f32; n]);
    for part in partials.chunks(2 * n) {
        let (pg, pb) = part.split_at(n);
        dg.iter_mut().zip(pg).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    Ok((dx, dg, db))
}

// ---------------------------------------------------------------------------------------
// Residual + layer norm

/// `layer_norm(r + dropout(h))`, the end of BERT's attention and feed-forward blocks
/// (`drop`: the dropout's `(p, seed)`, as [`dropout`]; `None` for none), as one operation:
/// one pass makes the sum, one normalises it, and no candle gradient bookkeeping runs for
/// the dropout's output or the sum. The same values, bit for bit, as the three operations
/// it replaces. The weight and bias gradients go to the gradient sink when it holds them
/// ([`grad_sink::concat`]). Differentiable in `h`, `r`, `g` and `b`.
pub fn residual_layer_norm(
    h: &Tensor,
    r: &Tensor,
    g: &Tensor,
    b: &Tensor,
    eps: f64,
    drop: Option<Dropout>,
) -> Result<Tensor> {
    if fusable(&[h, r, g, b])
        && enabled()
        && g.rank() == 1
        && b.dims() == g.dims()
        && h.dims() == r.dims()
        && h.dims().last() == Some(&g.elem_count())
    {
        let gb = grad_sink::concat(&[g, b])?;
        let op = ResidualLayerNormOp {
            eps: eps as f32,
            drop,
            dims: h.dims().to_vec(),
            grad_gb: gb.track_op() || grad_sink::holds(&gb),
            sum: Mutex::new(Vec::new()),
        };
        return Ok(h.contiguous()?.apply_op3(&r.contiguous()?, &gb, op)?);
    }
    let h = match drop {
        Some(d) => dropout(h, d)?,
        None => h.clone(),
    };
    layer_norm(&(h + r)?, g, b, eps)
}

struct ResidualLayerNormOp {
    eps: f32,
    drop: Option<Dropout>,
    /// `h`'s shape (the dropout's rows).
    dims: Vec<usize>,
    /// Whether the weights (`g` and `b`, concatenated) want a gradient.
    grad_gb: bool,
    /// The forward pass's `r + dropout(h)`, for the backward pass.
    sum: Mutex<Vec<f32>>,
}

impl CustomOp3 for ResidualLayerNormOp {
    fn name(&self) -> &'static str {
        "ferrotune-residual-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, r, gb) = (f32_data(s1, l1)?, f32_data(s2, l2)?, f32_data(s3, l3)?);
        let n = gb.len() / 2;
        if n == 0 || h.len() != r.len() || l1.dims().last() != Some(&n) {
            candle_core::bail!("residual layer norm: shapes of h, r and the weights differ");
        }
        // r + dropout(h), in the dropout's streams: the multipliers first, as `dropout`
        // computes them, then times h plus r (two roundings, as the separate operations).
        let chunk = rows_chunk(&self.dims);
        let sum = map_parts(h, chunk, |i, hs, o| {
            let rs = &r[i * chunk..i * chunk + o.len()];
            if let Some(d) = self.drop {
                fill_multipliers(d, &self.dims, i * chunk, o);
                for ((o, &h), &r) in o.iter_mut().zip(hs).zip(rs) {
                    *o = *o * h + r;
                }
            } else {
                for ((o, &h), &r) in o.iter_mut().zip(hs).zip(rs) {
                    *o = h + r;
                }
            }
        });
        let (g, b) = gb.split_at(n);
        let y = map_parts(&sum, 16 * n, |_, xs, ys| {
            layer_norm_rows(xs, g, b, ys, self.eps)
        });
        *self.sum.lock().unwrap_or_else(|e| e.into_inner()) = sum;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        h: &Tensor,
        _r: &Tensor,
        gb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let sum = self.sum.lock().unwrap_or_else(|e| e.into_inner());
        let n = gb.elem_count() / 2;
        let (ds, dg, db) = with_f32(gb, |gb| {
            with_f32(grad, |dy| layer_norm_grads(&sum, &gb[..n], dy, self.eps))
        })???;
        let dev = h.device();
        let dh = match self.drop {
            Some(d) => Some(Tensor::from_vec(
                DropoutOp {
                    d,
                    dims: self.dims.clone(),
                }
                .apply(&ds),
                h.shape(),
                dev,
            )?),
            None => None,
        };
        let ds = Tensor::from_vec(ds, h.shape(), dev)?;
        let dgb = [dg, db].concat();
        let dgb = if !self.grad_gb || grad_sink::write_slice(gb, n, &dgb) {
            None
        } else {
            Some(Tensor::from_vec(dgb, 2 * n, dev)?)
        };
        // Without dropout, h and r get the same gradient tensor.
        Ok((Some(dh.unwrap_or_else(|| ds.clone())), Some(ds), dgb))
    }
}

// ---------------------------------------------------------------------------------------
// Exact GELU

/// The exact GELU, `x · Φ(x) = x/2 · (1 + erf(x/√2))`, as `hidden_act = "gelu"` in
/// transformers (and candle's `gelu_erf`). Differentiable.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fusable(&[x]) {
        return Ok(x.contiguous()?.apply_op1(GeluErfOp)?);
    }
    Ok(x.gelu_erf()?)
}

struct GeluErfOp;

impl CustomOp1 for GeluErfOp {
    fn name(&self) -> &'static str {
        "ferrotune-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l)?;
        let y = map_parts(x, 4096, |_, xs, ys| simd::gelu(xs, ys));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d/dx x·Φ(x) = Φ(x) + x·φ(x).
        let dx = with_f32(x, |x| {
            with_f32(grad, |dy| {
                const CHUNK: usize = 4096;
                map_parts(x, CHUNK, |i, xs, o| {
                    simd::gelu_backward(xs, &dy[i * CHUNK..i * CHUNK + xs.len()], o)
                })
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

// ---------------------------------------------------------------------------------------
// Softmax

/// Softmax over the last dimension (the attention probabilities). Differentiable; the
/// backward pass is `y · (dy - Σ dy·y)` from the saved output, one pass.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fusable(&[x]) && x.rank() >= 1 && x.dim(D::Minus1)? > 0 {
        return Ok(x.contiguous()?.apply_op1(SoftmaxLastOp)?);
    }
    softmax_last_composed(x)
}

/// The reference composition of [`softmax_last`]. The row maximum is subtracted for
/// stability and detached: it does not change the result, so it needs no gradient.
pub fn softmax_last_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Log-softmax over the last dimension, composed of differentiable operations (the row
/// maximum detached, as in [`softmax_last_composed`]); the losses use it.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let d = x.broadcast_sub(&max)?;
    let lse = d.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(d.broadcast_sub(&lse)?)
}

struct SoftmaxLastOp;

impl CustomOp1 for SoftmaxLastOp {
    fn name(&self) -> &'static str {
        "ferrotune-softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l)?;
        let n = *l.dims().last().unwrap_or(&1);
        let mut y = x.to_vec();
        let rows = (4096 / n).max(1);
        let o = Out::new(&mut y);
        par_for(y.len().div_ceil(rows * n), y.len() >= PAR_MIN, |i| {
            // Safety: part i is written by this task only.
            simd::softmax_rows(unsafe { o.part(i * rows * n, rows * n) }, &[], n)
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let n = res.dim(D::Minus1)?;
        let dx = with_f32(res, |y| {
            with_f32(grad, |dy| {
                let mut dx = dy.to_vec();
                let chunk = (4096 / n).max(1) * n;
                let o = Out::new(&mut dx);
                par_for(y.len().div_ceil(chunk), y.len() >= PAR_MIN, |i| {
                    let ys = &y[i * chunk..((i + 1) * chunk).min(y.len())];
                    // Safety: part i is written by this task only.
                    simd::softmax_rows_backward(ys, unsafe { o.part(i * chunk, chunk) }, n)
                });
                dx
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

// ---------------------------------------------------------------------------------------
// Dropout

/// One dropout of a forward pass: its probability, its seed (one draw from the run's
/// generator), and the index, in the whole global batch, of this batch's first sequence
/// (`row0`: nonzero on the ranks after the first of a distributed run).
///
/// Every row of a tensor (its last dimension) draws its mask from its own stream, named by
/// the row's sequence (`row0` + its index along the first dimension) and its indices along
/// the dimensions between ([`row_stream`]). A sequence's masks therefore do not depend on
/// which other sequences share its batch, where the batch was split between ranks, or how
/// far it was padded: 2 ranks × 8 sequences draw exactly the masks of 1 × 16.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// Probability of dropping an element.
    pub p: f32,
    /// The masks' seed.
    pub seed: u64,
    /// Index of the batch's first sequence in the global batch.
    pub row0: u64,
    /// The batch's sequences and tokens per sequence, when known: a 2-D tensor of
    /// `batch·seq` rows (the encoder's flattened hidden states) then counts tokens along
    /// its first dimension, and draws the streams of its `(batch, seq, hidden)` view.
    pub tokens: (usize, usize),
}

/// Elements per parallel part of [`dropout`] (whole rows of at least this many).
const DROPOUT_PART: usize = 4096;

/// The stream of row `row` (row-major over all dimensions but the last) of a tensor of
/// shape `dims` under dropout `d`: its sequence `row0 + i₀` in the high 32 bits; its indices along the
/// dimensions between the first and the last (for `(batch, seq, hidden)`: the token; for
/// attention probabilities `(batch, heads, query, key)`: head and query) 16 bits each in
/// the low ones (mixed in beyond two such dimensions).
pub fn row_stream(dims: &[usize], row: usize, d: &Dropout) -> u64 {
    let (batch, seq) = d.tokens;
    let flat = [batch, seq, dims.last().copied().unwrap_or(1)];
    let dims = if dims.len() == 2 && seq > 1 && dims[0] == batch * seq {
        &flat[..]
    } else {
        dims
    };
    let mids = if dims.len() > 2 {
        &dims[1..dims.len() - 1]
    } else {
        &[][..]
    };
    let (mut rest, mut low) = (row, 0u64);
    for (k, &m) in mids.iter().rev().enumerate() {
        let m = m.max(1);
        let j = (rest % m) as u64;
        rest /= m;
        low = if k < 2 {
            low | (j << (16 * k))
        } else {
            low.rotate_left(7) ^ j.wrapping_mul(0x9e37_79b9)
        };
    }
    ((rest as u64).wrapping_add(d.row0) << 32) | (low & 0xffff_ffff)
}

/// Elements per part of whole rows of a tensor of shape `dims`, for [`map_parts`].
fn rows_chunk(dims: &[usize]) -> usize {
    let w = dims.last().copied().unwrap_or(1).max(1);
    w * DROPOUT_PART.div_ceil(w)
}

/// The multipliers of dropout `d` for the elements of a tensor of shape `dims` from flat
/// index `start` (the start of a row) into `out` (whole rows, the last maybe cut).
pub fn fill_multipliers(d: Dropout, dims: &[usize], start: usize, out: &mut [f32]) {
    let w = dims.last().copied().unwrap_or(1).max(1);
    for (k, o) in out.chunks_mut(w).enumerate() {
        dropout_multipliers(d.seed, row_stream(dims, start / w + k, &d), d.p, o);
    }
}

/// Writes inverted-dropout multipliers (0 with probability `p`, else `1/(1-p)`) into
/// `out`, from stream `stream` of `seed` ([`simd::dropout_keep`]: a hash of the element's
/// index under keys mixed from the seed and the stream).
pub fn dropout_multipliers(seed: u64, stream: u64, p: f32, out: &mut [f32]) {
    // SplitMix64's finaliser, to spread seed and stream over both key words.
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let k = mix(seed ^ mix(stream.wrapping_add(0x9e37_79b9_7f4a_7c15)));
    let threshold = (p as f64 * 4_294_967_296.0).min(u32::MAX as f64) as u32;
    simd::dropout_keep(
        (k as u32, (k >> 32) as u32),
        threshold,
        1.0 / (1.0 - p),
        out,
    );
}

/// The full multiplier tensor of dropout `d` on a tensor of `shape` (the composed
/// reference path, and the attention's probabilities).
pub fn dropout_mask(shape: &[usize], d: Dropout) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut m = vec![0f32; n];
    let chunk = rows_chunk(shape);
    let o = Out::new(&mut m);
    par_for(n.div_ceil(chunk), n >= PAR_MIN, |i| {
        // Safety: part i alone writes its rows.
        fill_multipliers(d, shape, i * chunk, unsafe { o.part(i * chunk, chunk) })
    });
    Ok(Tensor::from_vec(m, shape, &candle_core::Device::Cpu)?)
}

/// Inverted dropout `d`: one pass forward, and one backward that regenerates the mask
/// instead of storing it. Differentiable.
pub fn dropout(x: &Tensor, d: Dropout) -> Result<Tensor> {
    if fusable(&[x]) && enabled() {
        let op = DropoutOp {
            d,
            dims: x.dims().to_vec(),
        };
        return Ok(x.contiguous()?.apply_op1(op)?);
    }
    let mask = dropout_mask(x.dims(), d)?.to_device(x.device())?;
    Ok((x * mask.to_dtype(x.dtype())?)?)
}

struct DropoutOp {
    d: Dropout,
    dims: Vec<usize>,
}

impl DropoutOp {
    fn apply(&self, src: &[f32]) -> Vec<f32> {
        // The multipliers fill each part, then scale the input into it.
        let chunk = rows_chunk(&self.dims);
        map_parts(src, chunk, |i, s, o| {
            fill_multipliers(self.d, &self.dims, i * chunk, o);
            o.iter_mut().zip(s).for_each(|(o, s)| *o *= s);
        })
    }
}

impl CustomOp1 for DropoutOp {
    fn name(&self) -> &'static str {
        "ferrotune-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l)?;
        Ok((CpuStorage::F32(self.apply(x)), l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let dx = with_f32(grad, |dy| self.apply(dy))?;
        Ok(Some(Tensor::from_vec(dx, grad.shape(), grad.device())?))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Gradients of `Σ y·w` (a non-trivial upstream gradient `w`).
    pub(crate) fn grads_of(y: Tensor, w: &Tensor) -> candle_core::backprop::GradStore {
        (y * w).unwrap().sum_all().unwrap().backward().unwrap()
    }

    /// Forward and every gradient of the fused layer norm equal the composition, on odd
    /// shapes, small and large enough to run on the thread pool.
    #[test]
    fn layer_norm_matches_the_composition() {
        for (k, shape) in [
            vec![1, 1],
            vec![3, 7],
            vec![5, 33],
            vec![2, 3, 17],
            vec![37, 384],
            vec![4, 129, 100],
        ]
        .into_iter()
        .enumerate()
        {
            let n = *shape.last().unwrap();
            let x = Var::from_tensor(&randn(&shape, k as u64)).unwrap();
            let g = Var::from_tensor(&randn(&[n], 100 + k as u64)).unwrap();
            let b = Var::from_tensor(&randn(&[n], 200 + k as u64)).unwrap();
            // A non-trivial upstream gradient.
            let w = randn(&shape, 300 + k as u64);
            let fused = layer_norm(&x, &g, &b, 1e-12).unwrap();
            let reference = layer_norm_composed(&x, &g, &b, 1e-12).unwrap();
            assert!(max_diff(&fused, &reference) < 1e-5, "{shape:?} forward");
            let gf = grads_of(fused, &w);
            let gr = grads_of(reference, &w);
            for (name, v) in [("x", &x), ("g", &g), ("b", &b)] {
                let (a, r) = (gf.get(v).unwrap(), gr.get(v).unwrap());
                let scale = r.abs().unwrap().max_keepdim(0).unwrap().max_all().unwrap();
                let tol = 2e-5 * scale.to_scalar::<f32>().unwrap().max(1.0);
                assert!(
                    max_diff(a, r) < tol,
                    "{shape:?} d{name}: {}",
                    max_diff(a, r)
                );
            }
        }
    }

    /// The fused residual layer norm gives bit for bit what the separate fused dropout, sum
    /// and layer norm give, forward and every gradient, and the composition of candle's
    /// operations within tolerance; with and without dropout, on odd shapes (one over
    /// several dropout streams and thread-pool tasks).
    #[test]
    fn residual_layer_norm_matches_its_parts() {
        for (k, shape) in [
            vec![1, 1],
            vec![3, 7],
            vec![2, 3, 17],
            vec![37, 384],
            vec![4, 129, 100],
        ]
        .into_iter()
        .enumerate()
        {
            let n = *shape.last().unwrap();
            let k = k as u64;
            let h = Var::from_tensor(&randn(&shape, k)).unwrap();
            let r = Var::from_tensor(&randn(&shape, 50 + k)).unwrap();
            let g = Var::from_tensor(&randn(&[n], 100 + k)).unwrap();
            let b = Var::from_tensor(&randn(&[n], 200 + k)).unwrap();
            let w = randn(&shape, 300 + k);
            let d = Dropout {
                p: 0.25,
                seed: 11 + k,
                row0: k,
                tokens: (0, 0),
            };
            for drop in [None, Some(d)] {
                let parts = |on: bool| {
                    with_enabled(on, || {
                        let hd = match drop {
                            Some(d) => dropout(&h, d).unwrap(),
                            None => h.as_tensor().clone(),
                        };
                        let x = (hd + r.as_tensor()).unwrap();
                        if on {
                            layer_norm(&x, &g, &b, 1e-12).unwrap()
                        } else {
                            layer_norm_composed(&x, &g, &b, 1e-12).unwrap()
                        }
                    })
                };
                let fused = with_enabled(true, || {
                    residual_layer_norm(&h, &r, &g, &b, 1e-12, drop).unwrap()
                });
                let (separate, composed) = (parts(true), parts(false));
                let vec = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(vec(&fused) == vec(&separate), "{shape:?} {drop:?} forward");
                assert!(
                    max_diff(&fused, &composed) < 1e-5,
                    "{shape:?} {drop:?} forward"
                );
                let (gf, gs, gc) = (
                    grads_of(fused, &w),
                    grads_of(separate, &w),
                    grads_of(composed, &w),
                );
                for (name, v) in [("h", &h), ("r", &r), ("g", &g), ("b", &b)] {
                    let (f, s, c) = (gf.get(v).unwrap(), gs.get(v).unwrap(), gc.get(v).unwrap());
                    assert!(vec(f) == vec(s), "{shape:?} {drop:?} d{name}");
                    let scale = c.abs().unwrap().max_keepdim(0).unwrap().max_all().unwrap();
                    let tol = 2e-5 * scale.to_scalar::<f32>().unwrap().max(1.0);
                    assert!(
                        max_diff(f, c) < tol,
                        "{shape:?} {drop:?} d{name}: {}",
                        max_diff(f, c)
                    );
                }
            }
        }
    }

    /// A constant row (variance 0) gives the bias and finite gradients, as the composition.
    #[test]
    fn layer_norm_of_a_constant_row() {
        let x =
            Var::from_tensor(&Tensor::ones((2, 8), candle_core::DType::F32, &Device::Cpu).unwrap())
                .unwrap();
        let g = Var::from_tensor(&randn(&[8], 1)).unwrap();
        let b = Var::from_tensor(&randn(&[8], 2)).unwrap();
        let y = layer_norm(&x, &g, &b, 1e-5).unwrap();
        assert!(max_diff(&y, &b.broadcast_as((2, 8)).unwrap()) < 1e-6);
        let gr = y.sum_all().unwrap().backward().unwrap();
        let dx = gr
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(dx.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn gelu_matches_candles_gelu_erf() {
        for (k, shape) in [vec![1], vec![7, 3], vec![3, 1537], vec![16, 128, 9]]
            .into_iter()
            .enumerate()
        {
            let x = Var::from_tensor(&randn(&shape, 10 + k as u64)).unwrap();
            let w = randn(&shape, 20 + k as u64);
            let fused = gelu_erf(&x).unwrap();
            let reference = x.gelu_erf().unwrap();
            assert!(max_diff(&fused, &reference) < 1e-6, "{shape:?} forward");
            let gf = grads_of(fused, &w);
            let gr = grads_of(reference, &w);
            let d = max_diff(gf.get(&x).unwrap(), gr.get(&x).unwrap());
            assert!(d < 1e-5, "{shape:?} backward: {d}");
        }
    }

    /// A non-contiguous input (a transpose) gives the same as its contiguous copy.
    #[test]
    fn non_contiguous_input() {
        let x = randn(&[6, 10], 5).t().unwrap();
        let g = randn(&[6], 6);
        let b = randn(&[6], 7);
        let a = layer_norm(&x, &g, &b, 1e-5).unwrap();
        let c = layer_norm(&x.contiguous().unwrap(), &g, &b, 1e-5).unwrap();
        assert!(max_diff(&a, &c) == 0.0);
        let a = gelu_erf(&x).unwrap();
        let c = gelu_erf(&x.contiguous().unwrap()).unwrap();
        assert!(max_diff(&a, &c) == 0.0);
    }

    /// Softmax forward and backward equal the composition, with the attention's additive
    /// padding mask (the most negative f32) on some positions.
    #[test]
    fn softmax_matches_the_composition_with_a_mask() {
        for (k, shape) in [
            vec![1, 1],
            vec![3, 7],
            vec![2, 3, 5, 13],
            vec![4, 12, 33, 33],
        ]
        .into_iter()
        .enumerate()
        {
            let n = *shape.last().unwrap();
            let mask: Vec<f32> = (0..n)
                .map(|i| if i > 0 && i % 4 == 0 { f32::MIN } else { 0.0 })
                .collect();
            let mask = Tensor::from_vec(mask, n, &Device::Cpu).unwrap();
            let x = Var::from_tensor(&randn(&shape, 40 + k as u64)).unwrap();
            let w = randn(&shape, 50 + k as u64);
            let scores = x.broadcast_add(&mask).unwrap();
            let fused = softmax_last(&scores).unwrap();
            let reference = softmax_last_composed(&scores).unwrap();
            assert!(max_diff(&fused, &reference) < 1e-6, "{shape:?} forward");
            let gf = grads_of(fused, &w);
            let gr = grads_of(reference, &w);
            let d = max_diff(gf.get(&x).unwrap(), gr.get(&x).unwrap());
            assert!(d < 1e-5, "{shape:?} backward: {d}");
        }
    }

    /// The layer norm's weight gradients are sums over rows, computed in parallel; they
    /// come out bit-identical on every run (fixed blocks, added in order), so runs repeat
    /// exactly and resume byte-identically.
    #[test]
    fn layer_norm_gradients_are_repeatable() {
        let grads = || {
            let x = Var::from_tensor(&randn(&[515, 96], 1)).unwrap();
            let g = Var::from_tensor(&randn(&[96], 2)).unwrap();
            let b = Var::from_tensor(&randn(&[96], 3)).unwrap();
            let w = randn(&[515, 96], 4);
            let y = layer_norm(&x, &g, &b, 1e-12).unwrap();
            let gr = grads_of(y, &w);
            [&x, &g, &b].map(|v| {
                gr.get(v)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
        };
        let first = grads();
        for _ in 0..5 {
            assert_eq!(first, grads());
        }
    }

    /// The fused dropout equals multiplying by its mask, forward and backward; the mask
    /// keeps about 1 - p and does not depend on the thread split.
    #[test]
    fn dropout_matches_its_mask() {
        let d = |seed| Dropout {
            p: 0.25,
            seed,
            row0: 0,
            tokens: (0, 0),
        };
        for &n in &[1usize, 1000, 3 * DROPOUT_PART + 17] {
            let x = Var::from_tensor(&randn(&[n], 3)).unwrap();
            let w = randn(&[n], 4);
            let y = dropout(&x, d(99)).unwrap();
            let mask = dropout_mask(&[n], d(99)).unwrap();
            let r = (x.as_tensor() * &mask).unwrap();
            assert_eq!(max_diff(&y, &r), 0.0);
            let g = grads_of(y, &w);
            assert_eq!(max_diff(g.get(&x).unwrap(), &(&w * &mask).unwrap()), 0.0);
            if n > 1000 {
                let m = mask.to_vec1::<f32>().unwrap();
                let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
                assert!((dropped - 0.25).abs() < 0.02, "{dropped}");
                // Neighbours independent: both dropped about p² of the time.
                let both = m.windows(2).filter(|w| w[0] == 0.0 && w[1] == 0.0).count();
                let both = both as f64 / (n - 1) as f64;
                assert!((both - 0.0625).abs() < 0.012, "{both}");
                assert!(m.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75));
            }
        }
        assert_ne!(
            dropout_mask(&[64], d(1)).unwrap().to_vec1::<f32>().unwrap(),
            dropout_mask(&[64], d(2)).unwrap().to_vec1::<f32>().unwrap()
        );
    }

    /// A sequence's mask depends on its index in the global batch, not on the batch it
    /// is in or its padding: the second half of a batch of 4 (row0 0) has the masks of a
    /// batch of 2 with row0 2, also padded to a shorter length.
    #[test]
    fn masks_follow_the_sequence_not_the_batch_split_or_the_padding() {
        let d = |row0| Dropout {
            p: 0.5,
            seed: 7,
            row0,
            tokens: (0, 0),
        };
        // (batch, seq, hidden)
        let whole = dropout_mask(&[4, 6, 5], d(0)).unwrap();
        let half = dropout_mask(&[2, 4, 5], d(2)).unwrap();
        let want = whole.narrow(0, 2, 2).unwrap().narrow(1, 0, 4).unwrap();
        assert_eq!(max_diff(&half, &want), 0.0);
        // The same rows flattened to (batch·seq, hidden), when the batch's shape is known.
        let flat = |row0, tokens| Dropout { tokens, ..d(row0) };
        let half_flat = dropout_mask(&[8, 5], flat(2, (2, 4))).unwrap();
        assert_eq!(max_diff(&half_flat, &half.reshape((8, 5)).unwrap()), 0.0);
        // (batch, heads, query, key)
        let whole = dropout_mask(&[4, 3, 6, 6], d(0)).unwrap();
        let half = dropout_mask(&[2, 3, 4, 4], d(2)).unwrap();
        let want = whole
            .narrow(0, 2, 2)
            .unwrap()
            .narrow(2, 0, 4)
            .unwrap()
            .narrow(3, 0, 4)
            .unwrap();
        assert_eq!(max_diff(&half, &want), 0.0);
        // Different sequences, tokens and heads draw different masks.
        let m = dropout_mask(&[2, 2, 2, 64], d(0)).unwrap();
        let rows: Vec<Vec<f32>> = m.reshape((8, 64)).unwrap().to_vec2().unwrap();
        for i in 0..8 {
            for j in i + 1..8 {
                assert_ne!(rows[i], rows[j], "rows {i} and {j}");
            }
        }
    }
}

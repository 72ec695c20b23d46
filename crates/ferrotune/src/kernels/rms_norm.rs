//! RMS norm (Llama's, T5's): `x / sqrt(mean(x²) + eps) · g` over the last dimension, as one
//! candle custom op, forward and backward (issue 15).
//!
//! Composed of candle operations it is six passes forward (square, mean, add, sqrt,
//! reciprocal, two broadcast products) and twice that backward, each with a fresh
//! activation-sized buffer, twice per layer. Here each row is read once for its mean square
//! and once to write the output; the backward recomputes the row's scale rather than
//! keeping it. The weight's gradient is computed only when the weight trains (not under
//! LoRA), summed over fixed blocks of rows in block order, so it is bit-for-bit the same on
//! any thread count.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, D};

use super::grad_sink;
use super::par::{f32_data, filled, fusable, map_parts, par_for, with_f32, Out, PAR_MIN};
use super::simd::dispatch;
use crate::error::Result;

/// RMS norm of `x` over its last dimension, weights `g` (of that size). Differentiable in
/// `x` and `g`.
pub fn rms_norm(x: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(&[x, g]) && g.rank() == 1 && x.dims().last() == Some(&g.elem_count()) {
        let op = RmsNormOp {
            eps: eps as f32,
            grad_g: g.track_op() || grad_sink::holds(g),
        };
        return Ok(x.contiguous()?.apply_op2(&g.contiguous()?, op)?);
    }
    rms_norm_composed(x, g, eps)
}

/// The reference composition of [`rms_norm`] (transformers' `LlamaRMSNorm` in f32).
pub fn rms_norm_composed(x: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(g)?)
}

struct RmsNormOp {
    eps: f32,
    grad_g: bool,
}

/// `1 / sqrt(mean(row²) + eps)`, the sum in 8 lanes.
#[inline(always)]
fn rstd(row: &[f32], eps: f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l] * c[l];
        }
    }
    for (a, v) in acc.iter_mut().zip(rest) {
        *a += v * v;
    }
    1.0 / (acc.iter().sum::<f32>() / row.len() as f32 + eps).sqrt()
}

dispatch! {
    /// The RMS norm of every row of `g.len()` elements of `x` into `y`.
    fn rows_forward(x: &[f32], g: &[f32], y: &mut [f32], eps: f32) {
        let n = g.len();
        for (xr, yr) in x.chunks(n).zip(y.chunks_mut(n)) {
            let r = rstd(xr, eps);
            for i in 0..n {
                yr[i] = xr[i] * r * g[i];
            }
        }
    }
}

dispatch! {
    /// The backward of every row of `g.len()` elements: `dx` written; with `adg`, the
    /// rows' `dy · x̂` added into it.
    fn rows_backward(x: &[f32], g: &[f32], dy: &[f32], dx: &mut [f32], adg: Option<&mut [f32]>, eps: f32) {
        let n = g.len();
        let mut adg = adg;
        for ((xr, dyr), dxr) in x.chunks(n).zip(dy.chunks(n)).zip(dx.chunks_mut(n)) {
            let r = rstd(xr, eps);
            // m = mean(dy·g·x̂) with x̂ = x·r.
            let mut acc = [0f32; 8];
            let full = n / 8 * 8;
            for ((xc, dc), gc) in xr[..full]
                .chunks_exact(8)
                .zip(dyr[..full].chunks_exact(8))
                .zip(g[..full].chunks_exact(8))
            {
                for l in 0..8 {
                    acc[l] += dc[l] * gc[l] * xc[l];
                }
            }
            let mut s = acc.iter().sum::<f32>();
            for i in full..n {
                s += dyr[i] * g[i] * xr[i];
            }
            let m = s * r / n as f32;
            for i in 0..n {
                let xhat = xr[i] * r;
                dxr[i] = r * (dyr[i] * g[i] - xhat * m);
            }
            if let Some(adg) = adg.as_deref_mut() {
                for i in 0..n {
                    adg[i] += dyr[i] * xr[i] * r;
                }
            }
        }
    }
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "ferrotune-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        let n = g.len();
        if n == 0 || l1.dims().last() != Some(&n) {
            candle_core::bail!("rms norm: last dimension of x does not match the weights");
        }
        // Parts of 16 rows; every element of each row written.
        let y = map_parts(x, 16 * n, |_, xs, ys| rows_forward(xs, g, ys, self.eps));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        let (dx, dg) = with_f32(x, |x| {
            with_f32(g, |g| {
                with_f32(grad, |dy| grads(x, g, dy, self.eps, self.grad_g))
            })
        })????;
        let dev = x.device();
        let dg = match dg {
            Some(dg) if !grad_sink::write_slice(g, 1, &dg) => Some(Tensor::from_vec(dg, n, dev)?),
            _ => None,
        };
        Ok((Some(Tensor::from_vec(dx, x.shape(), dev)?), dg))
    }
}

/// `(dx, dg)` (`dg` only with `grad_g`) on the thread pool.
fn grads(
    x: &[f32],
    g: &[f32],
    dy: &[f32],
    eps: f32,
    grad_g: bool,
) -> candle_core::Result<(Vec<f32>, Option<Vec<f32>>)> {
    let n = g.len();
    if n == 0 || !x.len().is_multiple_of(n) || dy.len() != x.len() {
        candle_core::bail!(
            "rms norm backward: {} inputs, {} gradients, rows of {n}",
            x.len(),
            dy.len()
        );
    }
    // Partial weight gradients over fixed blocks of rows, added in block order.
    const ROWS: usize = 32;
    let blocks = x.len().div_ceil(ROWS * n);
    let mut partials = vec![0f32; if grad_g { blocks * n } else { 0 }];
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
                let adg = grad_g.then(|| po.part(blk * n, n));
                rows_backward(&x[a..b], g, &dy[a..b], dxs, adg, eps);
            });
        })
    };
    let dg = grad_g.then(|| {
        let mut dg = vec![0f32; n];
        for part in partials.chunks(n) {
            dg.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        dg
    });
    Ok((dx, dg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::tests::{grads_of, max_diff};
    use candle_core::{Device, Var};

    /// Value and gradients equal the composition (rows of a width that is not a multiple
    /// of 8, more rows than one block).
    #[test]
    fn matches_the_composition() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (70, 19), &dev).unwrap()).unwrap();
        let g = Var::from_tensor(&Tensor::randn(1f32, 0.3, 19, &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (70, 19), &dev).unwrap();
        let f = rms_norm(x.as_tensor(), g.as_tensor(), 1e-5).unwrap();
        let c = rms_norm_composed(x.as_tensor(), g.as_tensor(), 1e-5).unwrap();
        assert!(max_diff(&f, &c) < 1e-5);
        let (gf, gc) = (grads_of(f, &w), grads_of(c, &w));
        for p in [&x, &g] {
            let d = max_diff(
                gf.get(p.as_tensor()).unwrap(),
                gc.get(p.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "gradient differs by {d}");
        }
    }

    /// A detached weight gets no gradient.
    #[test]
    fn a_frozen_weight_gets_no_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap()).unwrap();
        let g = Tensor::ones(8, candle_core::DType::F32, &dev).unwrap();
        let y = rms_norm(x.as_tensor(), &g, 1e-6).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&g).is_none());
        assert!(grads.get(x.as_tensor()).is_some());
    }
}

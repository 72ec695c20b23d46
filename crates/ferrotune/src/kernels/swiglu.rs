//! The gated activation of Llama's MLP, `silu(gate) · up`, as one candle custom op, forward
//! and backward (issue 15).
//!
//! Composed, candle runs the SiLU, the product, and a backward of several element-wise
//! passes (the SiLU's derivative alone is four), each a fresh buffer the size of the MLP's
//! widest activation. Here the forward is one pass, and the backward one pass writing both
//! gradients.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::par::{f32_data, filled, fusable, map_parts, par_for, with_f32, Out, PAR_MIN};
use super::simd::{self, dispatch};
use crate::error::Result;

/// `silu(g) · u` element-wise (`g`, `u` of one shape). Differentiable in both.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if fusable(&[g, u]) && g.dims() == u.dims() {
        return Ok(g.contiguous()?.apply_op2(&u.contiguous()?, SiluMul)?);
    }
    silu_mul_composed(g, u)
}

/// The reference composition of [`silu_mul`].
pub fn silu_mul_composed(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    Ok((g.silu()? * u)?)
}

struct SiluMul;

/// Elements per parallel part.
const CHUNK: usize = 4096;

dispatch! {
    /// `y = silu(g) · u`.
    fn forward(g: &[f32], u: &[f32], y: &mut [f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g / (1.0 + simd::exp(-g)) * u;
        }
    }
}

dispatch! {
    /// `dg = dy · u · silu'(g)`, `du = dy · silu(g)`, with `silu'(g) = s·(1 + g·(1 − s))`
    /// and `s` the sigmoid of `g`.
    fn backward(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        for i in 0..g.len().min(dg.len()).min(du.len()) {
            let s = 1.0 / (1.0 + simd::exp(-g[i]));
            du[i] = dy[i] * g[i] * s;
            dg[i] = dy[i] * u[i] * (s * (1.0 + g[i] * (1.0 - s)));
        }
    }
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "ferrotune-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        if g.len() != u.len() {
            candle_core::bail!("silu·mul: {} gate values, {} up values", g.len(), u.len());
        }
        let y = map_parts(g, CHUNK, |i, gs, ys| {
            forward(gs, &u[i * CHUNK..i * CHUNK + gs.len()], ys)
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        let (dg, du) = with_f32(g, |g| {
            with_f32(u, |u| {
                with_f32(grad, |dy| {
                    let mut du = Vec::<f32>::with_capacity(n);
                    // Safety: the parts cover 0..n and each writes all of its elements of
                    // both outputs; `du`'s length is set once they are written.
                    let dg = unsafe {
                        filled(n, |dgp| {
                            let (dgo, duo) = (Out(dgp, n), Out(du.as_mut_ptr(), n));
                            par_for(n.div_ceil(CHUNK), n >= PAR_MIN, |i| {
                                let (a, b) = (i * CHUNK, ((i + 1) * CHUNK).min(n));
                                let (dg, du) = (dgo.part(a, b - a), duo.part(a, b - a));
                                backward(&g[a..b], &u[a..b], &dy[a..b], dg, du);
                            });
                        })
                    };
                    unsafe { du.set_len(n) };
                    (dg, du)
                })
            })
        })???;
        let dev = g.device();
        Ok((
            Some(Tensor::from_vec(dg, g.shape(), dev)?),
            Some(Tensor::from_vec(du, u.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::tests::{grads_of, max_diff};
    use candle_core::{Device, Var};

    /// Value and both gradients equal the composition, over several parts and large
    /// magnitudes.
    #[test]
    fn matches_the_composition() {
        let dev = Device::Cpu;
        let g = Var::from_tensor(&Tensor::randn(0f32, 4.0, (9, 2000), &dev).unwrap()).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, 2000), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (9, 2000), &dev).unwrap();
        let f = silu_mul(g.as_tensor(), u.as_tensor()).unwrap();
        let c = silu_mul_composed(g.as_tensor(), u.as_tensor()).unwrap();
        assert!(max_diff(&f, &c) < 1e-5);
        let (gf, gc) = (grads_of(f, &w), grads_of(c, &w));
        for p in [&g, &u] {
            let d = max_diff(
                gf.get(p.as_tensor()).unwrap(),
                gc.get(p.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "gradient differs by {d}");
        }
    }
}

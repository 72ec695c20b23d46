//! The fused linear layer `y = x Wᵀ + b` as a candle custom op, forward and backward
//! (issue 4).
//!
//! Composed of candle operations, a linear layer is a matmul into a zeroed buffer, then a
//! broadcast add of the bias (a second pass); its backward sums the bias gradient with a
//! reduction over rows and lets candle transpose and accumulate the weight gradient. Here
//! the output buffer starts as the bias rows and one GEMM adds `x Wᵀ` into it; the backward
//! is two GEMMs reading `W` and `x` in place through strides (no transposed copies) and one
//! column sum. Gradients are computed only for inputs that need them: a frozen layer's
//! weights cost no GEMM.
//!
//! [`sgemm`] is the strided GEMM call shared with the fused attention.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::bf16::bgemm;
use super::gemm::{sgemm, Mat};
use super::grad_sink;
use super::par::{f32_data, filled, fusable, map_parts, par_for, with_f32, Out, PAR_MIN};
use super::simd;
use crate::error::Result;

/// `x Wᵀ + b` for `x` of shape `(n, in)`, `w` `(out, in)`, `b` `(out)`. Differentiable in
/// all three.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    linear_mixed(x, w, b, false)
}

/// [`linear`], its three GEMMs in bf16 with f32 sums when `bf16` (mixed precision:
/// [`super::bf16::bgemm`]; the bias, its gradient and everything else stay f32).
pub fn linear_mixed(x: &Tensor, w: &Tensor, b: &Tensor, bf16: bool) -> Result<Tensor> {
    match fused_linear(x, w, b, false, bf16)? {
        Some(y) => Ok(y),
        None => linear_composed(x, w, b),
    }
}

/// `gelu(x Wᵀ + b)` with the exact (erf) GELU, as BERT's intermediate layer: one op, so the
/// `(tokens, 4·hidden)` pre-activation gets no gradient tensor of its own in candle's
/// backward (a zeroed buffer and an add over the layer's widest activation); the op keeps
/// it for its backward pass instead. Differentiable in all three.
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    linear_gelu_mixed(x, w, b, false)
}

/// [`linear_gelu`], its GEMMs in bf16 when `bf16` (see [`linear_mixed`]).
pub fn linear_gelu_mixed(x: &Tensor, w: &Tensor, b: &Tensor, bf16: bool) -> Result<Tensor> {
    match fused_linear(x, w, b, true, bf16)? {
        Some(y) => Ok(y),
        None => linear_gelu_composed(x, w, b),
    }
}

/// The reference composition of [`linear_gelu`].
pub fn linear_gelu_composed(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(linear_composed(x, w, b)?.gelu_erf()?)
}

/// The fused op, or `None` when the tensors are not fusable (another device or dtype).
fn fused_linear(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    gelu: bool,
    bf16: bool,
) -> Result<Option<Tensor>> {
    if !(fusable(&[x, w, b]) && x.rank() == 2 && w.rank() == 2 && b.rank() == 1) {
        return Ok(None);
    }
    let grad_x = x.track_op();
    let grad_wb = w.track_op() || b.track_op() || grad_sink::holds(w) || grad_sink::holds(b);
    let op = LinearOp {
        grad_x,
        grad_wb,
        bf16,
        gelu: gelu.then(|| Gelu {
            keep: grad_x || grad_wb,
            pre: Default::default(),
        }),
    };
    let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
    Ok(Some(x.apply_op3(&w, &b, op)?))
}

/// The reference composition of [`linear`].
pub fn linear_composed(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?.broadcast_add(b)?)
}

struct LinearOp {
    /// `x` needs a gradient.
    grad_x: bool,
    /// `w` or `b` needs a gradient (from candle, or for the gradient sink).
    grad_wb: bool,
    /// The GEMMs in bf16 with f32 sums ([`bgemm`]) rather than f32 ([`sgemm`]).
    bf16: bool,
    /// The output goes through the exact GELU.
    gelu: Option<Gelu>,
}

/// The GELU after the linear layer.
struct Gelu {
    /// Keep the pre-activation for the backward pass (something needs a gradient).
    keep: bool,
    /// The pre-activation `x Wᵀ + b`, kept by the forward pass.
    pre: std::sync::Mutex<Vec<f32>>,
}

/// The signature [`sgemm`] and [`bgemm`] share.
pub(crate) type Gemm = unsafe fn(usize, usize, usize, *mut f32, usize, bool, Mat, Mat, f32, bool);

impl LinearOp {
    /// The GEMM this op runs.
    fn gemm(&self) -> Gemm {
        if self.bf16 {
            bgemm
        } else {
            sgemm
        }
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "ferrotune-linear"
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
        let (x, w, b) = (f32_data(s1, l1)?, f32_data(s2, l2)?, f32_data(s3, l3)?);
        let (n, inp) = l1.shape().dims2()?;
        let (out, inp_w) = l2.shape().dims2()?;
        if inp != inp_w || b.len() != out {
            candle_core::bail!(
                "linear: x is {n}x{inp}, weight {out}x{inp_w}, bias {}",
                b.len()
            );
        }
        let y = forward_rows(x, n, inp, w, out, Some(b), self.gemm());
        let y = match &self.gelu {
            None => y,
            Some(g) => {
                let act = map_parts(&y, 4096, |_, z, a| simd::gelu(z, a));
                if g.keep {
                    *g.pre.lock().unwrap_or_else(|e| e.into_inner()) = y;
                }
                act
            }
        };
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, inp) = x.dims2()?;
        let out = b.elem_count();
        let dev = x.device();
        let (w_t, b_t) = (w, b);
        let gemm = self.gemm();
        // Through the GELU first: dz = dy · gelu'(z), z the kept pre-activation.
        let dz = match &self.gelu {
            None => None,
            Some(g) => {
                let pre = g.pre.lock().unwrap_or_else(|e| e.into_inner());
                if pre.len() != n * out {
                    candle_core::bail!("linear+gelu: backward without the kept pre-activation");
                }
                Some(with_f32(grad, |dy| {
                    const CHUNK: usize = 4096;
                    map_parts(&pre, CHUNK, |i, z, o| {
                        simd::gelu_backward(z, &dy[i * CHUNK..i * CHUNK + z.len()], o)
                    })
                })?)
            }
        };
        let grad = match dz {
            Some(dz) => Tensor::from_vec(dz, (n, out), grad.device())?,
            None => grad.clone(),
        };
        let (dx, dwb) = with_f32(x, |x| {
            with_f32(w, |w| {
                with_f32(&grad, |dy| {
                    let dx = self.grad_x.then(|| input_grad(dy, n, out, w, inp, gemm));
                    // dW = dyᵀ · x (out×n · n×inp), rows r0.. of it from columns r0.. of dy.
                    let dw_rows = |r0: usize, rows: usize, dst: *mut f32, acc: bool| unsafe {
                        gemm(
                            rows,
                            inp,
                            n,
                            dst,
                            inp,
                            acc,
                            Mat::rows_t(dy.as_ptr().add(r0), out),
                            Mat::rows(x.as_ptr(), inp),
                            1.0,
                            true,
                        )
                    };
                    // Straight into the trainer's buffer when a gradient sink holds W,
                    // else a tensor for candle.
                    let dw = self.grad_wb.then(|| {
                        if grad_sink::write_rows(w_t, inp, dw_rows) {
                            None
                        } else {
                            Some(unsafe { filled(out * inp, |p| dw_rows(0, out, p, false)) })
                        }
                    });
                    // db = column sums of dy.
                    let db = self.grad_wb.then(|| {
                        let db = column_sums(dy, out);
                        (!grad_sink::write_slice(b_t, 1, &db)).then_some(db)
                    });
                    (dx, (dw.flatten(), db.flatten()))
                })
            })
        })???;
        let dx = dx.map(|v| Tensor::from_vec(v, (n, inp), dev)).transpose()?;
        let dw = dwb
            .0
            .map(|v| Tensor::from_vec(v, (out, inp), dev))
            .transpose()?;
        let db = dwb.1.map(|v| Tensor::from_vec(v, out, dev)).transpose()?;
        Ok((dx, dw, db))
    }
}

/// `x Wᵀ + b` for `x` `(n, inp)` and `w` `(out, inp)`, row-major (`b` `None`: zero), by
/// `gemm`: the forward GEMM of the fused linear layer and of the 4-bit one.
pub(crate) fn forward_rows(
    x: &[f32],
    n: usize,
    inp: usize,
    w: &[f32],
    out: usize,
    b: Option<&[f32]>,
    gemm: Gemm,
) -> Vec<f32> {
    assert!(x.len() >= n * inp && w.len() >= out * inp && b.is_none_or(|b| b.len() == out));
    // Safety: y is n×out, x n×inp and w out×inp (checked above); the bias rows fill y
    // whole (in parallel: a single-threaded fill was ~1.5% of a MiniLM step) before the
    // GEMM adds into it, or the GEMM writes it whole.
    unsafe {
        filled(n * out, |yp| {
            if let Some(b) = b {
                let o = Out(yp, n * out);
                const ROWS: usize = 64;
                par_for(n.div_ceil(ROWS), n * out >= PAR_MIN, |i| {
                    for r in i * ROWS..n.min((i + 1) * ROWS) {
                        o.part(r * out, out).copy_from_slice(b);
                    }
                });
            }
            gemm(
                n,
                out,
                inp,
                yp,
                out,
                b.is_some(),
                Mat::rows(x.as_ptr(), inp),
                Mat::rows_t(w.as_ptr(), inp),
                1.0,
                true,
            )
        })
    }
}

/// `dx = dy · W` (`(n, out) · (out, inp)`, row-major) by `gemm`: the input gradient of the
/// fused linear layer and of the 4-bit one.
pub(crate) fn input_grad(
    dy: &[f32],
    n: usize,
    out: usize,
    w: &[f32],
    inp: usize,
    gemm: Gemm,
) -> Vec<f32> {
    assert!(dy.len() >= n * out && w.len() >= out * inp);
    // Safety: dx is n×inp, written whole by the GEMM; the sizes are checked above.
    unsafe {
        filled(n * inp, |p| {
            gemm(
                n,
                inp,
                out,
                p,
                inp,
                false,
                Mat::rows(dy.as_ptr(), out),
                Mat::rows(w.as_ptr(), inp),
                1.0,
                true,
            )
        })
    }
}

/// Sums of the columns of a row-major matrix with `cols` columns. Each column is added in
/// row order whatever the thread count (columns are split between threads, rows never), so
/// the result is bit-for-bit repeatable.
pub(super) fn column_sums(m: &[f32], cols: usize) -> Vec<f32> {
    let mut sums = vec![0f32; cols];
    // Blocks of 64 columns.
    const BLOCK: usize = 64;
    let blocks = cols.div_ceil(BLOCK);
    let o = Out::new(&mut sums);
    par_for(blocks, m.len() >= PAR_MIN, |i| {
        let a = i * BLOCK;
        // Safety: block i alone writes sums[a..a + BLOCK].
        let acc = unsafe { o.part(a, BLOCK) };
        for row in m.chunks(cols) {
            for (s, v) in acc.iter_mut().zip(&row[a..]) {
                *s += v;
            }
        }
    });
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::tests::{grads_of, max_diff, randn};
    use candle_core::Var;

    type Op = fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

    /// `op` equals `reference`, forward and every gradient, on odd shapes, small and large
    /// enough for the thread pool.
    fn matches(op: Op, reference: Op) {
        for &(n, inp, out) in &[(1, 1, 1), (3, 5, 7), (37, 19, 130), (300, 64, 96)] {
            let x = Var::from_tensor(&randn(&[n, inp], 1)).unwrap();
            let w = Var::from_tensor(&randn(&[out, inp], 2)).unwrap();
            let b = Var::from_tensor(&randn(&[out], 3)).unwrap();
            let up = randn(&[n, out], 4);
            let y = op(&x, &w, &b).unwrap();
            let r = reference(&x, &w, &b).unwrap();
            assert!(max_diff(&y, &r) < 1e-4, "forward {n}x{inp}x{out}");
            let (g, gr) = (grads_of(y, &up), grads_of(r, &up));
            for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                let d = max_diff(g.get(v).unwrap(), gr.get(v).unwrap());
                assert!(d < 1e-3, "grad {name} {n}x{inp}x{out}: {d}");
            }
        }
    }

    /// The linear layer equals the composition (matmul + broadcast add).
    #[test]
    fn linear_matches_the_composition() {
        matches(linear, linear_composed);
    }

    /// The linear layer with the GELU inside equals linear + candle's exact GELU, tracked
    /// or not.
    #[test]
    fn linear_gelu_matches_the_composition() {
        matches(linear_gelu, linear_gelu_composed);
        let (x, w, b) = (randn(&[4, 3], 5), randn(&[2, 3], 6), randn(&[2], 7));
        let y = linear_gelu(&x, &w, &b).unwrap();
        assert!(!y.track_op());
        let r = linear_gelu_composed(&x, &w, &b).unwrap();
        assert!(max_diff(&y, &r) < 1e-5);
    }

    /// A frozen (detached) weight gets no gradient, and the input's gradient is unchanged.
    #[test]
    fn frozen_weights_get_no_gradient() {
        let x = Var::from_tensor(&randn(&[9, 6], 5)).unwrap();
        let w = randn(&[4, 6], 6);
        let b = randn(&[4], 7);
        let up = randn(&[9, 4], 8);
        let g = grads_of(linear(&x, &w, &b).unwrap(), &up);
        let gr = grads_of(linear_composed(&x, &w, &b).unwrap(), &up);
        assert!(g.get(&w).is_none() && g.get(&b).is_none());
        assert!(max_diff(g.get(&x).unwrap(), gr.get(&x).unwrap()) < 1e-4);
    }

    /// A tensor of quarters in [-12, 12]: bf16 holds each exactly, and f32 holds exactly
    /// every sum of their products the tests below form.
    fn quarters(shape: &[usize], seed: u64) -> Tensor {
        (randn(shape, seed) * 4.0)
            .unwrap()
            .round()
            .unwrap()
            .clamp(-48f32, 48f32)
            .unwrap()
            .affine(0.25, 0.0)
            .unwrap()
    }

    /// On values bf16 holds exactly, with sums f32 holds exactly, the bf16 GEMMs give the
    /// f32 layer's results bit for bit, forward and every gradient: the packing, strides
    /// and transposes of all three GEMMs are right. (With the GELU the forward is exact
    /// too; its backward multiplies by gelu', which leaves the exact values.)
    #[test]
    fn mixed_linear_is_exact_on_exact_values() {
        for &(n, inp, out) in &[(1, 1, 1), (3, 5, 7), (37, 19, 130), (300, 64, 96)] {
            for gelu in [false, true] {
                let x = Var::from_tensor(&quarters(&[n, inp], 1)).unwrap();
                let w = Var::from_tensor(&quarters(&[out, inp], 2)).unwrap();
                let b = Var::from_tensor(&quarters(&[out], 3)).unwrap();
                let up = quarters(&[n, out], 4);
                let f = if gelu {
                    linear_gelu_mixed
                } else {
                    linear_mixed
                };
                let (y, r) = (f(&x, &w, &b, true).unwrap(), f(&x, &w, &b, false).unwrap());
                assert_eq!(max_diff(&y, &r), 0.0, "forward {n}x{inp}x{out}");
                if gelu {
                    continue;
                }
                let (g, gr) = (grads_of(y, &up), grads_of(r, &up));
                for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                    let d = max_diff(g.get(v).unwrap(), gr.get(v).unwrap());
                    assert_eq!(d, 0.0, "grad {name} {n}x{inp}x{out}");
                }
            }
        }
    }

    /// On random values the bf16 layer tracks f32 within bf16's rounding (2⁻⁹ of each
    /// operand): within 2% of each result's scale, forward and gradients, with and
    /// without the GELU (3% for gradients: through the GELU, gelu' of the bf16
    /// pre-activation adds its own difference; 2.2% measured here).
    #[test]
    fn mixed_linear_tracks_f32() {
        let (n, inp, out) = (300, 64, 96);
        let x = Var::from_tensor(&randn(&[n, inp], 1)).unwrap();
        let w = Var::from_tensor(&randn(&[out, inp], 2)).unwrap();
        let b = Var::from_tensor(&randn(&[out], 3)).unwrap();
        let up = randn(&[n, out], 4);
        for gelu in [false, true] {
            let f = if gelu {
                linear_gelu_mixed
            } else {
                linear_mixed
            };
            let (y, r) = (f(&x, &w, &b, true).unwrap(), f(&x, &w, &b, false).unwrap());
            let scale = |t: &Tensor| {
                t.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(max_diff(&y, &r) > 0.0, "bf16 did not run");
            assert!(max_diff(&y, &r) <= 0.02 * scale(&r), "gelu {gelu}");
            let (g, gr) = (grads_of(y, &up), grads_of(r, &up));
            for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                let (a, e) = (g.get(v).unwrap(), gr.get(v).unwrap());
                let rel = max_diff(a, e) / scale(e);
                assert!(rel <= 0.03, "grad {name} gelu {gelu}: {rel}");
            }
        }
    }

    /// Column sums are exact on integers and do not depend on the thread split.
    #[test]
    fn column_sums_are_exact() {
        let (rows, cols) = (513, 131);
        let m: Vec<f32> = (0..rows * cols).map(|i| (i % 7) as f32).collect();
        let s = column_sums(&m, cols);
        for (c, &v) in s.iter().enumerate() {
            let want: f32 = (0..rows).map(|r| ((r * cols + c) % 7) as f32).sum();
            assert_eq!(v, want, "column {c}");
        }
    }
}

//! A language model's head fused with its next-token loss (issue 15): the mean over the
//! counted rows of `CE(h Wᵀ, target)`, without ever holding the `(tokens, vocab)` logits.
//!
//! Composed, a causal LM's last step is a `(tokens, hidden) × (hidden, vocab)` GEMM into
//! logits (SmolLM2, 4 × 256 tokens: 200 MB), the loss over them, a gradient of the same
//! size, and candle's matmul backward, which computes the weight's gradient even when the
//! weight is frozen (the tied embedding under LoRA: a wasted (vocab × hidden × tokens)
//! GEMM, 58 GFLOP per SmolLM2 step). Here only the rows whose target is counted are scored
//! (a prompt's tokens cost nothing), in chunks of up to 512 rows whose logits fit a 128 MB
//! buffer: one GEMM makes a chunk's logits, one pass over each row sums its loss and turns
//! the row, in place, into the loss's gradient `softmax − one-hot`, and a second GEMM
//! multiplies that back by `W` into the gradient of `h` (a third adds `gradᵀ h` into
//! `W`'s, only when `W` trains). The loss is the step's last operation, so its gradients
//! are known in the forward pass; the backward only scales them by the incoming gradient.
//! (Liger-Kernel's fused linear cross-entropy does the same on GPUs.)

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::gemm::{sgemm, Mat};
use super::grad_sink;
use super::par::{f32_data, par_for, with_scratch, Out, PAR_MIN};
use super::simd::{self, dispatch};
use crate::error::Result;

/// Logits held at once, at most, in elements (a chunk of rows × vocab): 128 MB. SmolLM2's
/// 49,152-token vocabulary gets chunks of 512 rows (100 MB): the two GEMMs stream the whole
/// head's weight once per chunk, and at the 85 rows of a 16 MB buffer they ran at ~97
/// GFLOP/s on 2 Zen 3 cores against ~120 at 512 rows, 4% of a LoRA training step.
const CHUNK_ELEMS: usize = 1 << 25;

thread_local! {
    /// A chunk's logits, kept from one call to the next on the thread that runs the op: a
    /// fresh 100 MB buffer every step cost the kernel's clearing of its pages on first
    /// touch, ~2.4% of a SmolLM2 LoRA step's CPU time.
    static LOGITS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The mean over `rows` — `(row of h, target token)` pairs — of the cross-entropy of the
/// logits `h[row] · Wᵀ` against the target, for `h` `(n, hidden)` and `w` `(vocab,
/// hidden)`, both f32 on the CPU. Differentiable in both (each gradient is computed only
/// when needed). Targets must be below `vocab`; `rows` must not be empty.
pub fn nll(h: &Tensor, w: &Tensor, rows: Vec<(usize, u32)>) -> Result<Tensor> {
    nll_chunked(h, w, rows, CHUNK_ELEMS)
}

/// [`nll`] with logits of at most `chunk_elems` elements held at once (a chunk has 16 to
/// 512 rows whatever the budget).
fn nll_chunked(
    h: &Tensor,
    w: &Tensor,
    rows: Vec<(usize, u32)>,
    chunk_elems: usize,
) -> Result<Tensor> {
    let (n, d) = h.dims2()?;
    let (v, dw) = w.dims2()?;
    if d != dw || rows.is_empty() || rows.iter().any(|&(r, t)| r >= n || t as usize >= v) {
        return Err(crate::Error::Msg(format!(
            "internal: language-model head of {v}x{dw} over {n}x{d} hidden rows, {} targets",
            rows.len()
        )));
    }
    let op = HeadNll {
        grad_h: h.track_op(),
        grad_w: w.track_op() || grad_sink::holds(w),
        rows,
        chunk_elems,
        saved: Mutex::new(Saved::default()),
    };
    Ok(h.contiguous()?.apply_op2(&w.contiguous()?, op)?)
}

/// The fused op (see the module documentation).
struct HeadNll {
    rows: Vec<(usize, u32)>,
    chunk_elems: usize,
    grad_h: bool,
    grad_w: bool,
    saved: Mutex<Saved>,
}

/// The gradients the forward pass computes, for one upstream gradient of 1 per row (the
/// backward scales them by the real one over the row count).
#[derive(Default)]
struct Saved {
    dh: Option<Vec<f32>>,
    dw: Option<Vec<f32>>,
}

impl CustomOp2 for HeadNll {
    fn name(&self) -> &'static str {
        "ferrotune-lm-head-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, w) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        let (n, d) = l1.shape().dims2()?;
        let v = l2.shape().dims2()?.0;
        let m = self.rows.len();
        let grad = self.grad_h || self.grad_w;
        // The counted rows, side by side.
        let mut hc = Vec::with_capacity(m * d);
        for &(r, _) in &self.rows {
            hc.extend_from_slice(&h[r * d..(r + 1) * d]);
        }
        let chunk = (self.chunk_elems / v.max(1)).clamp(16, 512).min(m);
        let mut nll = vec![0f32; m];
        let mut dhc = self.grad_h.then(|| vec![0f32; m * d]);
        let mut dw = self.grad_w.then(|| vec![0f32; v * d]);
        // Every element a chunk uses is written by its first GEMM before it is read.
        with_scratch(&LOGITS, chunk * v, |z| {
            for c0 in (0..m).step_by(chunk) {
                let c = chunk.min(m - c0);
                let hp = hc[c0 * d..].as_ptr();
                // Safety: z holds c × v, hc's rows c0.. hold c × d, w is v × d, all contiguous.
                unsafe {
                    sgemm(
                        c,
                        v,
                        d,
                        z.as_mut_ptr(),
                        v,
                        false,
                        Mat::rows(hp, d),
                        Mat::rows_t(w.as_ptr(), d),
                        1.0,
                        true,
                    )
                };
                let (zo, no) = (Out::new(&mut z[..c * v]), Out::new(&mut nll[c0..c0 + c]));
                par_for(c, c * v >= PAR_MIN, |i| {
                    // Safety: row i of the chunk and its loss are written by this task only.
                    let (row, loss) = unsafe { (zo.part(i * v, v), no.part(i, 1)) };
                    loss[0] = row_loss(row, self.rows[c0 + i].1 as usize, grad);
                });
                // Safety: as above; dh's rows c0.. hold c × d, dw holds v × d.
                if let Some(dh) = dhc.as_mut() {
                    unsafe {
                        sgemm(
                            c,
                            d,
                            v,
                            dh[c0 * d..].as_mut_ptr(),
                            d,
                            false,
                            Mat::rows(z.as_ptr(), v),
                            Mat::rows(w.as_ptr(), d),
                            1.0,
                            true,
                        )
                    };
                }
                if let Some(dw) = dw.as_mut() {
                    unsafe {
                        sgemm(
                            v,
                            d,
                            c,
                            dw.as_mut_ptr(),
                            d,
                            c0 > 0,
                            Mat::rows_t(z.as_ptr(), v),
                            Mat::rows(hp, d),
                            1.0,
                            true,
                        )
                    };
                }
            }
        });
        // The gradient of h: the counted rows' back in place, zero elsewhere.
        let dh = dhc.map(|dc| {
            let mut dh = vec![0f32; n * d];
            for (k, &(r, _)) in self.rows.iter().enumerate() {
                dh[r * d..(r + 1) * d].copy_from_slice(&dc[k * d..(k + 1) * d]);
            }
            dh
        });
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Saved { dh, dw };
        let total: f64 = nll.iter().map(|&x| x as f64).sum();
        Ok((
            CpuStorage::F32(vec![(total / m as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let g = g / self.rows.len() as f32;
        let saved = std::mem::take(&mut *self.saved.lock().unwrap_or_else(|e| e.into_inner()));
        let dh = match saved.dh {
            Some(mut dh) => {
                scale(&mut dh, g);
                Some(Tensor::from_vec(dh, h.shape(), h.device())?)
            }
            None => None,
        };
        let dw = match saved.dw {
            Some(mut dw) => {
                scale(&mut dw, g);
                let cols = w.dim(1)?;
                // Straight into the trainer's buffer when a gradient sink holds W.
                if grad_sink::write_slice(w, cols, &dw) {
                    None
                } else {
                    Some(Tensor::from_vec(dw, w.shape(), w.device())?)
                }
            }
            None => None,
        };
        Ok((dh, dw))
    }
}

/// `v ← g·v`, split over the thread pool.
fn scale(v: &mut [f32], g: f32) {
    const CHUNK: usize = 1 << 15;
    let n = v.len();
    let o = Out::new(v);
    par_for(n.div_ceil(CHUNK), n >= PAR_MIN, |i| {
        // Safety: chunk i is written by this task only.
        unsafe { o.part(i * CHUNK, CHUNK) }
            .iter_mut()
            .for_each(|x| *x *= g);
    });
}

dispatch! {
    /// The cross-entropy `logsumexp(z) − z[t]` of logits row `z`; with `grad`, `z` becomes
    /// its gradient `softmax(z) − one-hot(t)`.
    fn row_loss(z: &mut [f32], t: usize, grad: bool) -> f32 {
        let max = simd::max(z);
        let zt = z[t];
        let sum = if grad {
            z.iter_mut().for_each(|x| *x = simd::exp(*x - max));
            simd::sum(z)
        } else {
            let mut acc = [0f32; 8];
            let chunks = z.chunks_exact(8);
            let rest = chunks.remainder();
            for c in chunks {
                for i in 0..8 {
                    acc[i] += simd::exp(c[i] - max);
                }
            }
            for (a, x) in acc.iter_mut().zip(rest) {
                *a += simd::exp(x - max);
            }
            acc.iter().sum::<f32>()
        };
        if grad {
            let inv = 1.0 / sum;
            z.iter_mut().for_each(|x| *x *= inv);
            z[t] -= 1.0;
        }
        sum.ln() + max - zt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::tests::max_diff;
    use candle_core::{Device, Var};

    /// Value and both gradients equal the composed head and cross-entropy, with skipped
    /// rows and a vocabulary that spans several chunks.
    #[test]
    fn matches_the_composed_head_and_loss() {
        let dev = Device::Cpu;
        // Over 16 counted rows at this vocabulary and budget: several chunks of rows.
        let (n, d, v, budget) = (40, 5, 1027, 1 << 14);
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (v, d), &dev).unwrap()).unwrap();
        let mut rows: Vec<(usize, u32)> = (0..n)
            .filter(|r| r % 4 != 1)
            .map(|r| (r, (r * 7919 % v) as u32))
            .collect();
        rows[2].1 = (v - 1) as u32;
        let fused = nll_chunked(h.as_tensor(), w.as_tensor(), rows.clone(), budget).unwrap();
        // Composed: log-softmax of the full logits, the counted rows picked.
        let logits = h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let lp = candle_nn::ops::log_softmax(&logits, 1).unwrap();
        let mut picked = Vec::new();
        for &(r, t) in &rows {
            picked.push(lp.get(r).unwrap().get(t as usize).unwrap());
        }
        let composed = (Tensor::stack(&picked, 0)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap()
            / rows.len() as f64)
            .unwrap();
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            composed.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let gf = (&fused * 3.0).unwrap().backward().unwrap();
        let gc = (&composed * 3.0).unwrap().backward().unwrap();
        for p in [&h, &w] {
            let diff = max_diff(
                gf.get(p.as_tensor()).unwrap(),
                gc.get(p.as_tensor()).unwrap(),
            );
            assert!(diff < 1e-5, "gradient differs by {diff}");
        }
        // Skipped rows get a zero gradient.
        let dh = gf.get(h.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert!(dh[1].iter().chain(&dh[5]).chain(&dh[37]).all(|&x| x == 0.0));
        assert!(dh[0].iter().chain(&dh[39]).any(|&x| x != 0.0));
    }

    /// A detached weight gets no gradient; the hidden rows still do.
    #[test]
    fn a_frozen_weight_gets_no_gradient() {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (11, 4), &dev).unwrap();
        let l = nll(h.as_tensor(), &w, vec![(0, 1), (2, 10)]).unwrap();
        let g = l.backward().unwrap();
        assert!(g.get(&w).is_none());
        let dh = g.get(h.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert!(dh[0].iter().any(|&x| x != 0.0) && dh[1].iter().all(|&x| x == 0.0));
    }
}

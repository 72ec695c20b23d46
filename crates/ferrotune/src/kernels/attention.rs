//! Fused self-attention as a candle custom op, forward and backward (issue 4).
//!
//! Composed of candle operations, attention copies Q, K and V into a heads-first layout
//! (three transposes made contiguous), runs a batched matmul, scales, adds the padding mask,
//! takes the softmax, applies dropout, runs a second batched matmul and copies the result
//! back to tokens-first; the backward pass repeats every copy and keeps every intermediate.
//! Here one task per (sequence, head) reads its head's Q, K and V where the fused QKV
//! projection wrote them (row stride `3·hidden`), computes `softmax(Q Kᵀ·scale + mask)`
//! into a scratch matrix, applies the dropout mask, and writes `P V` straight into the
//! tokens-first output. Nothing is stored for the backward pass but the inputs: it
//! recomputes `P` (one small GEMM per head) and writes dQ, dK and dV into one gradient of
//! the QKV projection's output.
//!
//! Tasks run on candle's thread pool (`--threads`), each GEMM single-threaded.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Tensor};

use super::fused::{dropout_mask, fill_multipliers, Dropout};
use super::gemm::{sgemm, Mat};
use super::par::{f32_data, filled, fusable, par_for, with_f32, Out};
use super::simd;
use crate::error::{Error, Result};

/// The causal grouped-query attention of decoders lives in [`super::decode`].
pub use super::decode::{causal_attention, causal_attention_composed, decode_attention};

/// Multi-head self-attention over a fused projection.
///
/// - `qkv`: `(batch·seq, 3·hidden)`, the Q, K and V projections side by side (each
///   `hidden = heads·head_dim` wide, head `h` in columns `h·head_dim..`), as the
///   concatenated query/key/value weights produce them.
/// - `key_bias`: `(batch, seq)`, added to every score of that key (0 for a token, a large
///   negative number for padding).
/// - `pos_bias`: `(heads, seq, seq)`, added to the scores of every sequence (MPNet's
///   relative position bias), or `None`. Differentiable: its gradient is the scores'
///   gradient summed over the batch.
/// - `dropout`: `(p, seed)` of the dropout of the probabilities, or `None`. The mask of
///   (sequence `b`, head `h`) is stream `b·heads + h` of the seed
///   ([`super::fused::dropout_multipliers`]), regenerated in the backward pass.
///
/// Returns the attended values `(batch·seq, hidden)`, heads side by side (tokens-first, the
/// layout the output projection reads). Differentiable in `qkv` and `pos_bias`.
pub fn attention(
    qkv: &Tensor,
    key_bias: &Tensor,
    pos_bias: Option<&Tensor>,
    dropout: Option<Dropout>,
    heads: usize,
) -> Result<Tensor> {
    attend(qkv, key_bias, pos_bias, dropout, heads, false)
}

/// [`attention`] for each sequence's first query (`[CLS]`) only: `(batch, hidden)`, row `b`
/// equal to row `b·seq` of [`attention`]'s output (the same dropout masks: the first row
/// of each sequence and head's). Keys and values are every token's; the scores are one row
/// per sequence and head instead of `seq`.
pub fn attention_first_query(
    qkv: &Tensor,
    key_bias: &Tensor,
    pos_bias: Option<&Tensor>,
    dropout: Option<Dropout>,
    heads: usize,
) -> Result<Tensor> {
    attend(qkv, key_bias, pos_bias, dropout, heads, true)
}

/// [`attention`], or with `first_only` [`attention_first_query`]: the fused op, or the
/// composition when the inputs are not on the CPU in f32.
fn attend(
    qkv: &Tensor,
    key_bias: &Tensor,
    pos_bias: Option<&Tensor>,
    dropout: Option<Dropout>,
    heads: usize,
    first_only: bool,
) -> Result<Tensor> {
    let (batch, seq) = key_bias.dims2()?;
    let shape = Dims::new(batch, seq, heads, qkv)?;
    if let Some(pb) = pos_bias {
        if pb.dims() != [heads, seq, seq] {
            return Err(Error::Msg(format!(
                "attention: position bias is {:?}, expected [{heads}, {seq}, {seq}]",
                pb.dims()
            )));
        }
    }
    let queries = if first_only { seq.min(1) } else { seq };
    let mut all = vec![qkv, key_bias];
    all.extend(pos_bias);
    if fusable(&all) {
        let op = AttentionOp {
            shape,
            dropout,
            queries,
        };
        let (qkv, kb) = (qkv.contiguous()?, key_bias.contiguous()?);
        return Ok(match pos_bias {
            None => qkv.apply_op2(&kb, op)?,
            Some(pb) => qkv.apply_op3(&kb, &pb.contiguous()?, op)?,
        });
    }
    let y = attention_composed(qkv, key_bias, pos_bias, dropout, heads)?;
    if !first_only {
        return Ok(y);
    }
    let h = shape.hidden;
    Ok(y.reshape((batch, seq, h))?
        .narrow(1, 0, queries)?
        .contiguous()?
        .reshape((batch * queries, h))?)
}

/// The reference composition of [`attention`] from candle's differentiable operations (the
/// layout transformers' BERT uses).
pub fn attention_composed(
    qkv: &Tensor,
    key_bias: &Tensor,
    pos_bias: Option<&Tensor>,
    dropout: Option<Dropout>,
    heads: usize,
) -> Result<Tensor> {
    let (batch, seq) = key_bias.dims2()?;
    let s = Dims::new(batch, seq, heads, qkv)?;
    let split = |i: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(1, i * s.hidden, s.hidden)?
            .reshape((batch, seq, heads, s.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
    let bias = key_bias.reshape((batch, 1, 1, seq))?;
    let mut scores = (q.matmul(&k.t()?)? * s.scale as f64)?.broadcast_add(&bias)?;
    if let Some(pb) = pos_bias {
        scores = scores.broadcast_add(&pb.unsqueeze(0)?)?;
    }
    let mut probs = super::fused::softmax_last_composed(&scores)?;
    if let Some(d) = dropout {
        let shape = [batch, heads, seq, seq];
        let mask = dropout_mask(&shape, d)?.to_device(qkv.device())?;
        probs = (probs * mask)?;
    }
    Ok(probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((batch * seq, s.hidden))?)
}

#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    hidden: usize,
    scale: f32,
}

impl Dims {
    fn new(batch: usize, seq: usize, heads: usize, qkv: &Tensor) -> Result<Dims> {
        let (rows, cols) = qkv.dims2()?;
        if heads == 0 || cols % (3 * heads) != 0 || rows != batch * seq {
            return Err(Error::Msg(format!(
                "attention: qkv is {rows}x{cols}, expected ({batch}·{seq})x(3·{heads}·head_dim)"
            )));
        }
        let hidden = cols / 3;
        let head_dim = hidden / heads;
        Ok(Dims {
            batch,
            seq,
            heads,
            head_dim,
            hidden,
            scale: 1.0 / (head_dim as f32).sqrt(),
        })
    }
}

struct AttentionOp {
    shape: Dims,
    dropout: Option<Dropout>,
    /// Query rows per sequence: `seq` (every token), or 1 (the first token only; the
    /// output then has one row per sequence).
    queries: usize,
}

/// Pointer wrapper for reading a shared input from the tasks.
#[derive(Clone, Copy)]
struct In(*const f32);
// Safety: the tasks only read through it, while the op holds the input.
unsafe impl Send for In {}
unsafe impl Sync for In {}

impl In {
    /// The pointer (a method, so closures capture the `Sync` wrapper).
    fn get(self) -> *const f32 {
        self.0
    }
}

impl AttentionOp {
    /// The probabilities of task `t` (sequence `t / heads`, head `t % heads`) into `p`
    /// (`queries × seq`): `softmax(Q Kᵀ·scale + pos_bias + key_bias)` for the first
    /// `queries` queries.
    ///
    /// # Safety
    /// `qkv` must hold the whole `(batch·seq, 3·hidden)` input.
    unsafe fn probs(&self, t: usize, qkv: In, kb: &[f32], pb: Option<&[f32]>, p: &mut [f32]) {
        let Dims {
            seq: s,
            heads,
            head_dim: dh,
            hidden: h,
            scale,
            ..
        } = self.shape;
        let (bi, hd) = (t / heads, t % heads);
        let q = qkv.get().add(bi * s * 3 * h + hd * dh);
        let k = q.add(h);
        sgemm(
            self.queries,
            s,
            dh,
            p.as_mut_ptr(),
            s,
            false,
            Mat::rows(q, 3 * h),
            Mat::rows_t(k, 3 * h),
            scale,
            false,
        );
        if let Some(pb) = pb {
            // This head's first `queries` rows of the position bias.
            let rows = &pb[hd * s * s..hd * s * s + self.queries * s];
            p.iter_mut().zip(rows).for_each(|(p, b)| *p += b);
        }
        simd::softmax_rows(p, &kb[bi * s..(bi + 1) * s], s);
    }

    /// The dropout multipliers of task `t`'s probabilities into `d` (`queries × seq`: the
    /// first rows of the `seq × seq` mask), if any.
    fn drop_mask(&self, t: usize, d: &mut Vec<f32>) -> bool {
        match self.dropout {
            Some(drop) => {
                // Rows t·seq.. of the (batch, heads, seq, seq) probabilities.
                let Dims {
                    batch, heads, seq, ..
                } = self.shape;
                d.resize(self.queries * seq, 0.0);
                fill_multipliers(drop, &[batch, heads, seq, seq], t * seq * seq, d);
                true
            }
            None => false,
        }
    }

    /// Tasks are worth a thread when the whole op is not tiny.
    fn parallel(&self) -> bool {
        let s = self.shape;
        s.batch * s.heads > 1 && s.batch * s.heads * self.queries * s.seq * s.head_dim >= 1 << 16
    }
}

impl AttentionOp {
    /// The forward pass on the contiguous inputs.
    fn forward(
        &self,
        qkv: &[f32],
        kb: &[f32],
        pb: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let Dims {
            batch,
            seq: s,
            heads,
            head_dim: dh,
            hidden: h,
            ..
        } = self.shape;
        let nq = self.queries;
        let qkv_in = In(qkv.as_ptr());
        let y = unsafe {
            filled(batch * nq * h, |yp| {
                let yo = Out(yp, batch * nq * h);
                par_for(batch * heads, self.parallel(), |t| {
                    let mut p = vec![0f32; nq * s];
                    self.probs(t, qkv_in, kb, pb, &mut p);
                    let mut d = Vec::new();
                    if self.drop_mask(t, &mut d) {
                        p.iter_mut().zip(&d).for_each(|(p, d)| *p *= d);
                    }
                    let (bi, hd) = (t / heads, t % heads);
                    let v = qkv_in.get().add(bi * s * 3 * h + 2 * h + hd * dh);
                    // Task t alone writes rows of sequence bi, columns of head hd.
                    let dst = yo.ptr().add(bi * nq * h + hd * dh);
                    sgemm(
                        nq,
                        dh,
                        s,
                        dst,
                        h,
                        false,
                        Mat::rows(p.as_ptr(), s),
                        Mat::rows(v, 3 * h),
                        1.0,
                        false,
                    );
                });
            })
        };
        Ok((
            CpuStorage::F32(y),
            candle_core::Shape::from((batch * nq, h)),
        ))
    }

    /// The gradients of `qkv` and of the position bias (when there is one).
    fn backward(
        &self,
        qkv: &Tensor,
        key_bias: &Tensor,
        pos_bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let Dims {
            batch,
            seq: s,
            heads,
            head_dim: dh,
            hidden: h,
            scale,
        } = self.shape;
        let nq = self.queries;
        // The position bias is small (heads·seq²): read from a copy.
        let pb_data = pos_bias
            .map(|t| t.flatten_all().and_then(|t| t.to_vec1::<f32>()))
            .transpose()?;
        let pb = pb_data.as_deref();
        // The scores' gradient of every task, when the position bias needs it.
        let mut ds_all = vec![
            0f32;
            if pb.is_some() {
                batch * heads * nq * s
            } else {
                0
            }
        ];
        let dso = Out::new(&mut ds_all);
        let dqkv = with_f32(qkv, |qkv| {
            with_f32(key_bias, |kb| {
                with_f32(grad, |dy| {
                    let (qkv_in, dy_in) = (In(qkv.as_ptr()), In(dy.as_ptr()));
                    let n = batch * s * 3 * h;
                    unsafe {
                        filled(n, |gp| {
                            let go = Out(gp, n);
                            par_for(batch * heads, self.parallel(), |t| {
                                let mut p = vec![0f32; nq * s];
                                self.probs(t, qkv_in, kb, pb, &mut p);
                                let mut d = Vec::new();
                                let dropout = self.drop_mask(t, &mut d);
                                // Pd = P ⊙ D (the probabilities after dropout).
                                let pd: Vec<f32> = if dropout {
                                    p.iter().zip(&d).map(|(p, d)| p * d).collect()
                                } else {
                                    Vec::new()
                                };
                                let pd_ptr = if dropout { pd.as_ptr() } else { p.as_ptr() };
                                let (bi, hd) = (t / heads, t % heads);
                                let base = bi * s * 3 * h + hd * dh;
                                let (q, k, v) = (
                                    qkv_in.get().add(base),
                                    qkv_in.get().add(base + h),
                                    qkv_in.get().add(base + 2 * h),
                                );
                                let d_o = dy_in.get().add(bi * nq * h + hd * dh);
                                let (dq, dk, dv) = (
                                    go.ptr().add(base),
                                    go.ptr().add(base + h),
                                    go.ptr().add(base + 2 * h),
                                );
                                // Queries without an output get no gradient (this task's
                                // head columns of the rows after the first `nq`).
                                for r in nq..s {
                                    std::slice::from_raw_parts_mut(dq.add(r * 3 * h), dh).fill(0.0);
                                }
                                // dV = Pdᵀ dO.
                                sgemm(
                                    s,
                                    dh,
                                    nq,
                                    dv,
                                    3 * h,
                                    false,
                                    Mat::rows_t(pd_ptr, s),
                                    Mat::rows(d_o, h),
                                    1.0,
                                    false,
                                );
                                // dPd = dO Vᵀ; dP = dPd ⊙ D; dS = P ⊙ (dP - rowsum(dP ⊙ P)).
                                let mut ds = vec![0f32; nq * s];
                                sgemm(
                                    nq,
                                    s,
                                    dh,
                                    ds.as_mut_ptr(),
                                    s,
                                    false,
                                    Mat::rows(d_o, h),
                                    Mat::rows_t(v, 3 * h),
                                    1.0,
                                    false,
                                );
                                if dropout {
                                    ds.iter_mut().zip(&d).for_each(|(g, d)| *g *= d);
                                }
                                simd::softmax_rows_backward(&p, &mut ds, s);
                                if pb.is_some() {
                                    // Task t alone writes its block of the scores' gradient.
                                    dso.part(t * nq * s, nq * s).copy_from_slice(&ds);
                                }
                                // dQ = scale · dS K;  dK = scale · dSᵀ Q.
                                sgemm(
                                    nq,
                                    dh,
                                    s,
                                    dq,
                                    3 * h,
                                    false,
                                    Mat::rows(ds.as_ptr(), s),
                                    Mat::rows(k, 3 * h),
                                    scale,
                                    false,
                                );
                                sgemm(
                                    s,
                                    dh,
                                    nq,
                                    dk,
                                    3 * h,
                                    false,
                                    Mat::rows_t(ds.as_ptr(), s),
                                    Mat::rows(q, 3 * h),
                                    scale,
                                    false,
                                );
                            });
                        })
                    }
                })
            })
        })???;
        let dqkv = Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?;
        let dpb = match pos_bias {
            None => None,
            Some(t) => {
                // Σ over the sequences of each head's scores' gradient (rows past the
                // first `nq` queries get none).
                let mut g = vec![0f32; heads * s * s];
                for (task, ds) in ds_all.chunks(nq * s).enumerate() {
                    let hd = task % heads;
                    let dst = &mut g[hd * s * s..hd * s * s + nq * s];
                    dst.iter_mut().zip(ds).for_each(|(g, d)| *g += d);
                }
                Some(Tensor::from_vec(g, t.shape(), t.device())?)
            }
        };
        Ok((dqkv, dpb))
    }
}

impl CustomOp2 for AttentionOp {
    fn name(&self) -> &'static str {
        "ferrotune-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        self.forward(f32_data(s1, l1)?, f32_data(s2, l2)?, None)
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        key_bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dqkv, _) = self.backward(qkv, key_bias, None, grad)?;
        Ok((Some(dqkv), None))
    }
}

/// With a position bias (MPNet): the same op, differentiable in the bias too.
impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "ferrotune-attention-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        self.forward(
            f32_data(s1, l1)?,
            f32_data(s2, l2)?,
            Some(f32_data(s3, l3)?),
        )
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        key_bias: &Tensor,
        pos_bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dqkv, dpb) = self.backward(qkv, key_bias, Some(pos_bias), grad)?;
        Ok((Some(dqkv), None, dpb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::tests::{grads_of, max_diff, randn};
    use candle_core::{Device, Var};

    fn key_bias(batch: usize, seq: usize) -> Tensor {
        // Sequence b has b padding keys at the end (the first sequence none).
        let v: Vec<f32> = (0..batch * seq)
            .map(|i| {
                if i % seq + i / seq >= seq {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(v, (batch, seq), &Device::Cpu).unwrap()
    }

    /// `(batch, seq, heads, head_dim, dropout)`: odd shapes (head_dim 1, a single token,
    /// more tasks than threads), with and without dropout.
    const CASES: [(usize, usize, usize, usize, bool); 5] = [
        (1, 1, 1, 1, false),
        (2, 5, 3, 1, true),
        (3, 7, 2, 5, false),
        (4, 33, 3, 8, true),
        (5, 64, 4, 16, true),
    ];

    /// A random QKV input, the padding bias of `batch x seq` and the dropout of a case.
    fn inputs(
        (batch, seq, heads, dh, dropout): (usize, usize, usize, usize, bool),
        seed: u64,
    ) -> (Var, Tensor, Option<Dropout>) {
        let h = heads * dh;
        let qkv = (randn(&[batch * seq, 3 * h], seed) * 0.5).unwrap();
        (
            Var::from_tensor(&qkv).unwrap(),
            key_bias(batch, seq),
            dropout.then_some(Dropout {
                p: 0.2,
                seed: seed + 1,
                row0: 0,
                tokens: (0, 0),
            }),
        )
    }

    /// Forward and the gradient of the fused QKV input equal the composition, with padding
    /// and dropout, on odd shapes.
    #[test]
    fn attention_matches_the_composition() {
        for case in CASES {
            let (batch, seq, heads, dh, dropout) = case;
            let h = heads * dh;
            let (qkv, kb, d) = inputs(case, 11);
            let up = randn(&[batch * seq, h], 13);
            let y = attention(&qkv, &kb, None, d, heads).unwrap();
            let r = attention_composed(&qkv, &kb, None, d, heads).unwrap();
            let what = format!("{batch}x{seq} heads {heads}x{dh} dropout {dropout}");
            assert!(max_diff(&y, &r) < 1e-4, "forward {what}");
            let (g, gr) = (grads_of(y, &up), grads_of(r, &up));
            let d = max_diff(g.get(&qkv).unwrap(), gr.get(&qkv).unwrap());
            assert!(d < 1e-4, "grad {what}: {d}");
        }
    }

    /// The first-query op gives row `b·seq` of the full op's output for every sequence `b`,
    /// and the gradient of the full op's output when only those rows get a gradient (the
    /// other queries' gradient is zero), with padding and dropout, on odd shapes.
    #[test]
    fn first_query_matches_the_full_attention() {
        for case in CASES {
            let (batch, seq, heads, dh, dropout) = case;
            let h = heads * dh;
            let (qkv, kb, d) = inputs(case, 31);
            let up = randn(&[batch, h], 33);
            let first = |y: Tensor| {
                y.reshape((batch, seq, h))
                    .unwrap()
                    .narrow(1, 0, 1)
                    .unwrap()
                    .reshape((batch, h))
                    .unwrap()
            };
            let y = attention_first_query(&qkv, &kb, None, d, heads).unwrap();
            let r = first(attention(&qkv, &kb, None, d, heads).unwrap());
            let c = first(attention_composed(&qkv, &kb, None, d, heads).unwrap());
            let what = format!("{batch}x{seq} heads {heads}x{dh} dropout {dropout}");
            assert_eq!(y.dims(), &[batch, h], "{what}");
            assert!(max_diff(&y, &r) < 1e-5, "forward {what}");
            let (g, gr, gc) = (grads_of(y, &up), grads_of(r, &up), grads_of(c, &up));
            let (g, gr, gc) = (
                g.get(&qkv).unwrap(),
                gr.get(&qkv).unwrap(),
                gc.get(&qkv).unwrap(),
            );
            assert!(max_diff(g, gr) < 1e-5, "grad vs fused {what}");
            assert!(max_diff(g, gc) < 1e-4, "grad vs composed {what}");
        }
    }

    /// With a per-head position bias (MPNet's): forward, the QKV gradient and the bias's
    /// gradient equal the composition, for every query and for the first query only, with
    /// padding and dropout, on odd shapes.
    #[test]
    fn position_bias_matches_the_composition() {
        for case in CASES {
            let (batch, seq, heads, dh, dropout) = case;
            let h = heads * dh;
            let (qkv, kb, d) = inputs(case, 41);
            let pb = Var::from_tensor(&randn(&[heads, seq, seq], 43)).unwrap();
            let what = format!("{batch}x{seq} heads {heads}x{dh} dropout {dropout}");
            let up = randn(&[batch * seq, h], 45);
            let y = attention(&qkv, &kb, Some(pb.as_tensor()), d, heads).unwrap();
            let r = attention_composed(&qkv, &kb, Some(pb.as_tensor()), d, heads).unwrap();
            assert!(max_diff(&y, &r) < 1e-4, "forward {what}");
            let (g, gr) = (grads_of(y, &up), grads_of(r, &up));
            for v in [&qkv, &pb] {
                let d = max_diff(g.get(v).unwrap(), gr.get(v).unwrap());
                assert!(d < 1e-4, "grad {what}: {d}");
            }
            // The first query only: the bias's gradient is that of its first rows.
            let up = randn(&[batch, h], 47);
            let y = attention_first_query(&qkv, &kb, Some(pb.as_tensor()), d, heads).unwrap();
            let r = attention_composed(&qkv, &kb, Some(pb.as_tensor()), d, heads)
                .unwrap()
                .reshape((batch, seq, h))
                .unwrap()
                .narrow(1, 0, 1)
                .unwrap()
                .reshape((batch, h))
                .unwrap();
            assert!(max_diff(&y, &r) < 1e-4, "first-query forward {what}");
            let (g, gr) = (grads_of(y, &up), grads_of(r, &up));
            for v in [&qkv, &pb] {
                let d = max_diff(g.get(v).unwrap(), gr.get(v).unwrap());
                assert!(d < 1e-4, "first-query grad {what}: {d}");
            }
        }
    }

    /// Padding keys get no attention: changing their values changes nothing for the tokens.
    #[test]
    fn padding_keys_are_ignored() {
        let (batch, seq, heads, dh) = (2, 6, 2, 3);
        let h = heads * dh;
        let kb = key_bias(batch, seq);
        let a = randn(&[batch * seq, 3 * h], 21);
        // Sequence 1 has one padding position (its last row): change its K and V.
        let mut v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let row = 2 * seq - 1;
        for c in h..3 * h {
            v[row * 3 * h + c] += 5.0;
        }
        let b = Tensor::from_vec(v, a.shape(), a.device()).unwrap();
        let (ya, yb) = (
            attention(&a, &kb, None, None, heads).unwrap(),
            attention(&b, &kb, None, None, heads).unwrap(),
        );
        let tokens = |y: &Tensor| y.narrow(0, seq, seq - 1).unwrap();
        assert!(max_diff(&tokens(&ya), &tokens(&yb)) < 1e-6);
    }
}

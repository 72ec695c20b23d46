//! Causal grouped-query self-attention of decoder models (Llama with grouped KV heads,
//! GPT-2 with one KV head per query head), forward and backward as a candle custom op, and
//! the attention of generation over a KV cache (issue 15).
//!
//! As [`super::attention::attention`]: one task per (sequence, query head) reads its Q, K
//! and V where the fused QKV projection wrote them (no heads-first copies), runs
//! single-threaded GEMMs, and the backward pass recomputes the probabilities instead of
//! storing them. Causality is exploited in blocks of [`BLOCK`] queries: block `r0..r1`
//! scores keys `0..r1` only (the lower triangle of the scores, plus the upper half of the
//! diagonal block, which is zeroed), so the work is about half of the full `seq × seq`.
//! Query head `h` reads KV head `h / (heads / kv_heads)` (transformers' `repeat_kv`); in
//! the backward pass the K and V gradients of the query heads of a group are summed.

use candle_core::{CpuStorage, CustomOp2, Layout, Tensor};

use super::fused::{dropout_mask, dropout_multipliers, row_stream, Dropout};
use super::gemm::{sgemm, Mat};
use super::par::{f32_data, filled, fusable, par_for, with_f32, Out};
use super::simd;
use crate::error::{Error, Result};

/// Queries per block of the causal scores: small enough that the wasted upper half of the
/// diagonal block is a small part of the work, large enough for efficient GEMMs.
const BLOCK: usize = 64;

/// Causal grouped-query self-attention over a fused projection.
///
/// - `qkv`: `(batch·seq, (heads + 2·kv_heads)·head_dim)`: the `heads` query heads side by
///   side, then the `kv_heads` key heads, then the `kv_heads` value heads (one GEMM over
///   the concatenated q/k/v projection weights gives this). Query head `h` reads key/value
///   head `h / (heads / kv_heads)`; `heads` must be a multiple of `kv_heads`.
/// - `key_bias`: `(batch, seq)`, added to every score of that key: 0 for a token,
///   `f32::MIN` for padding (not `-inf`).
/// - `dropout`: `(p, seed)` of the dropout of the probabilities, or `None`. The mask of
///   (sequence `b`, head `h`) is that of [`super::attention::attention`]: the rows of
///   stream `b·heads + h` of a `(batch, heads, seq, seq)` mask, regenerated in the backward
///   pass.
///
/// Query `i` attends to keys `0..=i` (with scale `1/√head_dim`); later keys are not
/// computed at all. A query whose keys are all padding (a left-padded position) attends
/// uniformly to keys `0..=i`: its output is finite and meaningless (transformers' eager
/// attention gives another meaningless value there; the loss ignores these positions).
///
/// Returns `(batch·seq, heads·head_dim)`, tokens-first (the layout the output projection
/// reads). Differentiable in `qkv`. Fused on CPU f32 inputs, else
/// [`causal_attention_composed`].
pub fn causal_attention(
    qkv: &Tensor,
    key_bias: &Tensor,
    dropout: Option<Dropout>,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    let (batch, seq) = key_bias.dims2()?;
    let shape = Gqa::new(batch, seq, heads, kv_heads, qkv)?;
    if fusable(&[qkv, key_bias]) {
        let op = CausalOp { shape, dropout };
        return Ok(qkv.contiguous()?.apply_op2(&key_bias.contiguous()?, op)?);
    }
    causal_attention_composed(qkv, key_bias, dropout, heads, kv_heads)
}

/// The reference composition of [`causal_attention`] from candle's differentiable
/// operations, as transformers' eager `LlamaAttention`: heads-first Q, K, V, the KV heads
/// repeated (`repeat_kv`), `softmax(Q Kᵀ/√d + padding bias + causal mask)`, dropout,
/// times V. Any dtype and device (the bias and mask are converted to the inputs' dtype).
pub fn causal_attention_composed(
    qkv: &Tensor,
    key_bias: &Tensor,
    dropout: Option<Dropout>,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    let (batch, seq) = key_bias.dims2()?;
    let s = Gqa::new(batch, seq, heads, kv_heads, qkv)?;
    let dh = s.head_dim;
    let split = |col: usize, n: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(1, col * dh, n * dh)?
            .reshape((batch, seq, n, dh))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let q = split(0, heads)?;
    let k = split(heads, kv_heads)?;
    let v = split(heads + kv_heads, kv_heads)?;
    let y = composed(&q, &k, &v, key_bias, dropout)?;
    Ok(y.transpose(1, 2)?
        .contiguous()?
        .reshape((batch * seq, heads * dh))?)
}

/// Attention of the last `new` positions of each sequence over its KV cache, for
/// generation (inference only: the result carries no gradient).
///
/// - `q`: `(batch·new, heads·head_dim)`, the queries of positions `total − new ..total`
///   of each sequence.
/// - `k`, `v`: `(batch, total, kv_heads·head_dim)`, the keys and values of positions
///   `0..total` (`total ≥ new`).
/// - `key_bias`: `(batch, total)`, as [`causal_attention`]'s.
///
/// Query `j` sits at position `total − new + j` and attends to keys `0..=total − new + j`:
/// the rows of [`causal_attention`] over the whole sequences. Returns `(batch·new,
/// heads·head_dim)`. Fused on CPU f32 inputs (one query per sequence: one task per
/// (sequence, KV head) over that group's query heads, reading the cache once), else
/// composed of candle operations.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<Tensor> {
    let d = DecodeDims::new(q, k, v, key_bias, heads, kv_heads)?;
    if !fusable(&[q, k, v, key_bias]) {
        return decode_composed(q, k, v, key_bias, d);
    }
    let y = with_f32(q, |q| {
        with_f32(k, |k| {
            with_f32(v, |v| with_f32(key_bias, |kb| d.fused(q, k, v, kb)))
        })
    })????;
    Ok(Tensor::from_vec(
        y,
        (d.batch * d.new, heads * d.head_dim),
        q.device(),
    )?)
}

/// `heads` must be a positive multiple of `kv_heads`.
fn check_heads(what: &str, heads: usize, kv_heads: usize) -> Result<()> {
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(Error::Msg(format!(
            "{what}: {heads} attention heads are not a positive multiple of {kv_heads} \
             key/value heads"
        )));
    }
    Ok(())
}

/// The composed attention of heads-first `q` `(batch, heads, nq, dh)` over `k`, `v`
/// `(batch, kv_heads, total, dh)`, query `r` at position `total − nq + r`:
/// `(batch, heads, nq, dh)`.
fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    let (batch, heads, nq, dh) = q.dims4()?;
    let (_, kv_heads, total, _) = k.dims4()?;
    let group = heads / kv_heads;
    // transformers' repeat_kv: (batch, kv, total, dh) → (batch, kv·group, total, dh).
    let repeat = |t: &Tensor| -> Result<Tensor> {
        if group == 1 {
            return Ok(t.clone());
        }
        Ok(t.unsqueeze(2)?
            .broadcast_as((batch, kv_heads, group, total, dh))?
            .contiguous()?
            .reshape((batch, heads, total, dh))?)
    };
    let (k, v) = (repeat(k)?, repeat(v)?);
    // Keys after a query's position get -inf (exp gives exactly 0, even when every key the
    // query may see is padding at f32::MIN).
    let off = total - nq;
    let causal: Vec<f32> = (0..nq * total)
        .map(|i| {
            if i % total <= off + i / total {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, nq, total), q.device())?.to_dtype(q.dtype())?;
    let kb = key_bias
        .reshape((batch, 1, 1, total))?
        .to_dtype(q.dtype())?
        .to_device(q.device())?;
    let scale = 1.0 / (dh as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?
        .broadcast_add(&kb)?
        .broadcast_add(&causal)?;
    let mut probs = super::fused::softmax_last_composed(&scores)?;
    if let Some(d) = dropout {
        let mask = dropout_mask(&[batch, heads, nq, total], d)?
            .to_dtype(q.dtype())?
            .to_device(q.device())?;
        probs = (probs * mask)?;
    }
    Ok(probs.matmul(&v)?)
}

/// [`decode_attention`] composed of candle operations.
fn decode_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: &Tensor,
    d: DecodeDims,
) -> Result<Tensor> {
    let DecodeDims {
        batch,
        new,
        total,
        heads,
        kv_heads,
        head_dim: dh,
    } = d;
    let q = q
        .reshape((batch, new, heads, dh))?
        .transpose(1, 2)?
        .contiguous()?;
    let kv = |t: &Tensor| -> Result<Tensor> {
        Ok(t.reshape((batch, total, kv_heads, dh))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let y = composed(&q, &kv(k)?, &kv(v)?, key_bias, None)?;
    Ok(y.transpose(1, 2)?
        .contiguous()?
        .reshape((batch * new, heads * dh))?)
}

/// The shape of a [`causal_attention`].
#[derive(Clone, Copy, Debug)]
struct Gqa {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
}

impl Gqa {
    fn new(batch: usize, seq: usize, heads: usize, kv_heads: usize, qkv: &Tensor) -> Result<Gqa> {
        check_heads("causal_attention", heads, kv_heads)?;
        let (rows, cols) = qkv.dims2()?;
        let width = heads + 2 * kv_heads;
        if cols == 0 || cols % width != 0 || rows != batch * seq {
            return Err(Error::Msg(format!(
                "causal_attention: qkv is {rows}x{cols}, expected \
                 ({batch}·{seq})x(({heads} + 2·{kv_heads})·head_dim)"
            )));
        }
        let head_dim = cols / width;
        Ok(Gqa {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        })
    }

    /// Query heads per KV head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Elements per row of `qkv`.
    fn row(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

/// The shape of a [`decode_attention`].
#[derive(Clone, Copy, Debug)]
struct DecodeDims {
    batch: usize,
    new: usize,
    total: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl DecodeDims {
    fn new(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_bias: &Tensor,
        heads: usize,
        kv_heads: usize,
    ) -> Result<DecodeDims> {
        check_heads("decode_attention", heads, kv_heads)?;
        let (batch, total) = key_bias.dims2()?;
        let (rows, cols) = q.dims2()?;
        let new = rows.checked_div(batch).unwrap_or(0);
        if cols == 0 || cols % heads != 0 || rows != batch * new || new > total {
            return Err(Error::Msg(format!(
                "decode_attention: queries are {rows}x{cols}, expected \
                 ({batch}·new)x({heads}·head_dim) with new ≤ {total} cached positions"
            )));
        }
        let head_dim = cols / heads;
        for (what, t) in [("keys", k), ("values", v)] {
            if t.dims() != [batch, total, kv_heads * head_dim] {
                return Err(Error::Msg(format!(
                    "decode_attention: cached {what} are {:?}, expected [{batch}, {total}, \
                     {kv_heads}·{head_dim}]",
                    t.dims()
                )));
            }
        }
        Ok(DecodeDims {
            batch,
            new,
            total,
            heads,
            kv_heads,
            head_dim,
        })
    }

    /// The fused decode attention on contiguous data.
    fn fused(&self, q: &[f32], k: &[f32], v: &[f32], kb: &[f32]) -> Vec<f32> {
        let DecodeDims {
            batch,
            new,
            total,
            heads,
            kv_heads: kvh,
            head_dim: dh,
        } = *self;
        let (qc, kvc) = (heads * dh, kvh * dh);
        let group = heads / kvh;
        let scale = 1.0 / (dh as f32).sqrt();
        let n = batch * new * qc;
        let (qi, ki, vi) = (In(q.as_ptr()), In(k.as_ptr()), In(v.as_ptr()));
        let parallel = batch * heads * new * total * dh >= 1 << 16;
        // Safety: every task writes its own heads' columns of its own rows, and the tasks
        // cover every element.
        unsafe {
            filled(n, |yp| {
                let yo = Out(yp, n);
                if new == 1 {
                    // One query per sequence: the group's query heads are adjacent columns
                    // of its row, a (group × dh) matrix, scored against the cache at once.
                    par_for(batch * kvh, parallel && batch * kvh > 1, |t| {
                        let (b, g) = (t / kvh, t % kvh);
                        let qg = qi.get().add(b * qc + g * group * dh);
                        let kp = ki.get().add(b * total * kvc + g * dh);
                        let vp = vi.get().add(b * total * kvc + g * dh);
                        let mut s = vec![0f32; group * total];
                        sgemm(
                            group,
                            total,
                            dh,
                            s.as_mut_ptr(),
                            total,
                            false,
                            Mat::rows(qg, dh),
                            Mat::rows_t(kp, kvc),
                            scale,
                            false,
                        );
                        simd::softmax_rows(&mut s, &kb[b * total..(b + 1) * total], total);
                        sgemm(
                            group,
                            dh,
                            total,
                            yo.ptr().add(b * qc + g * group * dh),
                            dh,
                            false,
                            Mat::rows(s.as_ptr(), total),
                            Mat::rows(vp, kvc),
                            1.0,
                            false,
                        );
                    });
                } else {
                    par_for(batch * heads, parallel && batch * heads > 1, |t| {
                        let (b, h) = (t / heads, t % heads);
                        let g = h / group;
                        let head = Head {
                            q: qi.get().add(b * new * qc + h * dh),
                            q_rs: qc,
                            k: ki.get().add(b * total * kvc + g * dh),
                            k_rs: kvc,
                            v: vi.get().add(b * total * kvc + g * dh),
                            v_rs: kvc,
                            dh,
                            nq: new,
                            off: total - new,
                            scale,
                            drop: None,
                        };
                        head.forward(
                            &kb[b * total..(b + 1) * total],
                            yo.ptr().add(b * new * qc + h * dh),
                            qc,
                        );
                    });
                }
            })
        }
    }
}

/// Pointer wrapper for reading a shared input from the tasks.
#[derive(Clone, Copy)]
struct In(*const f32);
// Safety: the tasks only read through it, while the caller holds the input.
unsafe impl Send for In {}
unsafe impl Sync for In {}

impl In {
    /// The pointer (a method, so closures capture the `Sync` wrapper).
    fn get(self) -> *const f32 {
        self.0
    }
}

/// The dropout of one head's probabilities: rows `row0..` of a mask of shape `dims`.
#[derive(Clone, Copy)]
struct RowDrop {
    d: Dropout,
    dims: [usize; 4],
    row0: usize,
}

/// One (sequence, query head) of a causal attention: where its Q (`nq` rows), K and V
/// (`off + nq` rows) lie. Query row `r` sits at position `off + r` and sees keys
/// `0..=off + r`.
#[derive(Clone, Copy)]
struct Head {
    q: *const f32,
    q_rs: usize,
    k: *const f32,
    k_rs: usize,
    v: *const f32,
    v_rs: usize,
    dh: usize,
    nq: usize,
    off: usize,
    scale: f32,
    drop: Option<RowDrop>,
}

impl Head {
    /// Scratch elements of one block's scores.
    fn block_len(&self) -> usize {
        BLOCK.min(self.nq) * (self.off + self.nq).div_ceil(8) * 8
    }

    /// The probabilities of query rows `r0..r1` over keys `0..n` (`n = off + r1`, the
    /// keys the last of them sees) into `p` (row stride `ld`, `n` rounded up to 8), zero
    /// after each row's own position. Returns `(n, ld)`.
    ///
    /// # Safety
    /// The pointers must reach every row they are read at; `kb` holds `n` keys at least.
    unsafe fn probs(&self, r0: usize, r1: usize, kb: &[f32], p: &mut [f32]) -> (usize, usize) {
        let (m, n) = (r1 - r0, self.off + r1);
        let ld = n.div_ceil(8) * 8;
        sgemm(
            m,
            n,
            self.dh,
            p.as_mut_ptr(),
            ld,
            false,
            Mat::rows(self.q.add(r0 * self.q_rs), self.q_rs),
            Mat::rows_t(self.k, self.k_rs),
            self.scale,
            false,
        );
        causal_softmax_rows(&mut p[..m * ld], ld, kb, self.off + r0 + 1);
        (n, ld)
    }

    /// The dropout multipliers of rows `r0..r1` (row stride `ld`) into `d`, if any.
    fn drop_mask(&self, r0: usize, r1: usize, ld: usize, d: &mut [f32]) -> bool {
        let Some(rd) = self.drop else {
            return false;
        };
        for (i, row) in d[..(r1 - r0) * ld].chunks_mut(ld).enumerate() {
            // A row's multipliers of its first keys are those of the whole row (each
            // element's draw depends on its index only).
            let len = self.off + r0 + i + 1;
            let stream = row_stream(&rd.dims, rd.row0 + r0 + i, &rd.d);
            dropout_multipliers(rd.d.seed, stream, rd.d.p, &mut row[..len]);
            row[len..].fill(0.0);
        }
        true
    }

    /// `P V` into `y` (row stride `y_rs`).
    ///
    /// # Safety
    /// As [`Head::probs`]; `y` must reach `nq` rows of `dh` and no other task writes them.
    unsafe fn forward(&self, kb: &[f32], y: *mut f32, y_rs: usize) {
        let mut p = vec![0f32; self.block_len()];
        let mut d = vec![0f32; if self.drop.is_some() { p.len() } else { 0 }];
        for r0 in (0..self.nq).step_by(BLOCK) {
            let r1 = (r0 + BLOCK).min(self.nq);
            let (n, ld) = self.probs(r0, r1, kb, &mut p);
            let mn = (r1 - r0) * ld;
            if self.drop_mask(r0, r1, ld, &mut d) {
                p[..mn].iter_mut().zip(&d[..mn]).for_each(|(p, d)| *p *= d);
            }
            sgemm(
                r1 - r0,
                self.dh,
                n,
                y.add(r0 * y_rs),
                y_rs,
                false,
                Mat::rows(p.as_ptr(), ld),
                Mat::rows(self.v, self.v_rs),
                1.0,
                false,
            );
        }
    }

    /// The gradients from the output's gradient `dy` (row stride `dy_rs`): dQ into `dq`,
    /// dK and dV of keys `0..off + nq` into `dk`, `dv` (written, not added to).
    ///
    /// # Safety
    /// As [`Head::forward`], for every output pointer.
    #[allow(clippy::too_many_arguments)]
    unsafe fn backward(
        &self,
        kb: &[f32],
        dy: *const f32,
        dy_rs: usize,
        (dq, dq_rs): (*mut f32, usize),
        (dk, dk_rs): (*mut f32, usize),
        (dv, dv_rs): (*mut f32, usize),
    ) {
        let len = self.block_len();
        let (mut p, mut ds) = (vec![0f32; len], vec![0f32; len]);
        let dropout = self.drop.is_some();
        let (mut d, mut pd) = if dropout {
            (vec![0f32; len], vec![0f32; len])
        } else {
            (Vec::new(), Vec::new())
        };
        let starts: Vec<usize> = (0..self.nq).step_by(BLOCK).collect();
        // The last block first: it sees every key, so it writes all of dK and dV and the
        // blocks before it add to them.
        for (j, &r0) in starts.iter().enumerate().rev() {
            let add = j + 1 < starts.len();
            let r1 = (r0 + BLOCK).min(self.nq);
            let m = r1 - r0;
            let (n, ld) = self.probs(r0, r1, kb, &mut p);
            let mn = m * ld;
            // Pd = P ⊙ D (the probabilities after dropout).
            if self.drop_mask(r0, r1, ld, &mut d) {
                pd[..mn]
                    .iter_mut()
                    .zip(p[..mn].iter().zip(&d[..mn]))
                    .for_each(|(o, (p, d))| *o = p * d);
            }
            let pd_ptr = if dropout { pd.as_ptr() } else { p.as_ptr() };
            let d_o = dy.add(r0 * dy_rs);
            // dV (+)= Pdᵀ dO.
            sgemm(
                n,
                self.dh,
                m,
                dv,
                dv_rs,
                add,
                Mat::rows_t(pd_ptr, ld),
                Mat::rows(d_o, dy_rs),
                1.0,
                false,
            );
            // dPd = dO Vᵀ; dP = dPd ⊙ D; dS = P ⊙ (dP − rowsum(dP ⊙ P)) (zero after each
            // row's position, where P is).
            sgemm(
                m,
                n,
                self.dh,
                ds.as_mut_ptr(),
                ld,
                false,
                Mat::rows(d_o, dy_rs),
                Mat::rows_t(self.v, self.v_rs),
                1.0,
                false,
            );
            if dropout {
                ds[..mn].iter_mut().zip(&d[..mn]).for_each(|(g, d)| *g *= d);
            }
            for i in 0..m {
                let r = i * ld..i * ld + n;
                simd::softmax_rows_backward(&p[r.clone()], &mut ds[r], n);
            }
            // dQ = scale · dS K;  dK (+)= scale · dSᵀ Q.
            sgemm(
                m,
                self.dh,
                n,
                dq.add(r0 * dq_rs),
                dq_rs,
                false,
                Mat::rows(ds.as_ptr(), ld),
                Mat::rows(self.k, self.k_rs),
                self.scale,
                false,
            );
            sgemm(
                n,
                self.dh,
                m,
                dk,
                dk_rs,
                add,
                Mat::rows_t(ds.as_ptr(), ld),
                Mat::rows(self.q.add(r0 * self.q_rs), self.q_rs),
                self.scale,
                false,
            );
        }
    }
}

simd::dispatch! {
    /// In place, for every row `i` of `ld` elements of `p` (`ld` a multiple of 8): the
    /// softmax of its first `len = len0 + i` elements plus `kb`'s, zeros after. The row is
    /// processed in whole groups of 8 lanes (`-inf` past `len`, whose exp is exactly 0), so
    /// that no row of a causal mask, whatever its length, runs a scalar tail (rows of
    /// every length made the exp loop of a plain softmax mostly scalar).
    fn causal_softmax_rows(p: &mut [f32], ld: usize, kb: &[f32], len0: usize) {
        for (i, row) in p.chunks_mut(ld).enumerate() {
            let len = len0 + i;
            let (live, rest) = row.split_at_mut(len.div_ceil(8) * 8);
            live.iter_mut().zip(&kb[..len]).for_each(|(y, b)| *y += b);
            live[len..].fill(f32::NEG_INFINITY);
            let m = simd::max(live);
            for c in live.chunks_exact_mut(8) {
                let c: &mut [f32; 8] = c.try_into().unwrap();
                for y in c.iter_mut() {
                    *y = simd::exp(*y - m);
                }
            }
            let inv = 1.0 / simd::sum(live);
            for c in live.chunks_exact_mut(8) {
                let c: &mut [f32; 8] = c.try_into().unwrap();
                for y in c.iter_mut() {
                    *y *= inv;
                }
            }
            rest.fill(0.0);
        }
    }
}

struct CausalOp {
    shape: Gqa,
    dropout: Option<Dropout>,
}

impl CausalOp {
    /// Task `t`'s head: sequence `t / heads`, query head `t % heads`.
    ///
    /// # Safety
    /// `qkv` must point at the whole `(batch·seq, row)` input.
    unsafe fn head(&self, qkv: *const f32, t: usize) -> Head {
        let Gqa {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim: dh,
            scale,
        } = self.shape;
        let (b, h) = (t / heads, t % heads);
        let g = h / self.shape.group();
        let rs = self.shape.row();
        let base = qkv.add(b * seq * rs);
        Head {
            q: base.add(h * dh),
            q_rs: rs,
            k: base.add((heads + g) * dh),
            k_rs: rs,
            v: base.add((heads + kv_heads + g) * dh),
            v_rs: rs,
            dh,
            nq: seq,
            off: 0,
            scale,
            drop: self.dropout.map(|d| RowDrop {
                d,
                dims: [batch, heads, seq, seq],
                row0: t * seq,
            }),
        }
    }

    /// Tasks are worth a thread when the whole op is not tiny.
    fn parallel(&self) -> bool {
        let s = self.shape;
        s.batch * s.heads > 1 && s.batch * s.heads * s.seq * s.seq * s.head_dim >= 1 << 17
    }

    /// The forward pass on the contiguous inputs.
    fn forward(&self, qkv: &[f32], kb: &[f32]) -> (CpuStorage, candle_core::Shape) {
        let Gqa {
            batch,
            seq,
            heads,
            head_dim: dh,
            ..
        } = self.shape;
        let hid = heads * dh;
        let n = batch * seq * hid;
        let qkv_in = In(qkv.as_ptr());
        // Safety: task t alone writes the rows of its sequence, columns of its head; the
        // tasks cover the output.
        let y = unsafe {
            filled(n, |yp| {
                let yo = Out(yp, n);
                par_for(batch * heads, self.parallel(), |t| {
                    let head = self.head(qkv_in.get(), t);
                    let (b, h) = (t / heads, t % heads);
                    head.forward(
                        &kb[b * seq..(b + 1) * seq],
                        yo.ptr().add(b * seq * hid + h * dh),
                        hid,
                    );
                });
            })
        };
        (
            CpuStorage::F32(y),
            candle_core::Shape::from((batch * seq, hid)),
        )
    }

    /// The gradient of `qkv`.
    fn backward(
        &self,
        qkv: &Tensor,
        key_bias: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let Gqa {
            batch,
            seq,
            heads,
            kv_heads,
            head_dim: dh,
            ..
        } = self.shape;
        let (group, rs, hid) = (self.shape.group(), self.shape.row(), heads * dh);
        let parallel = self.parallel();
        let dqkv = with_f32(qkv, |qkv| {
            with_f32(key_bias, |kb| {
                with_f32(grad, |dy| {
                    let (qkv_in, dy_in) = (In(qkv.as_ptr()), In(dy.as_ptr()));
                    let n = batch * seq * rs;
                    // With grouped heads, each query head's dK and dV go to a scratch
                    // part of their own (seq × dh each), summed per group afterwards.
                    let part = seq * dh;
                    let scratch = if group > 1 {
                        2 * batch * heads * part
                    } else {
                        0
                    };
                    // Safety: task t alone writes its head's Q columns of its sequence's
                    // rows, and its own scratch parts (or, ungrouped, its KV head's
                    // columns); the group sums then write every K and V column.
                    unsafe {
                        filled(n, |gp| {
                            let go = Out(gp, n);
                            let _scratch = filled(scratch, |sp| {
                                let so = Out(sp, scratch);
                                par_for(batch * heads, parallel, |t| {
                                    let head = self.head(qkv_in.get(), t);
                                    let (b, h) = (t / heads, t % heads);
                                    let g = h / group;
                                    let base = go.ptr().add(b * seq * rs);
                                    let (dk, dv, kv_rs) = if group > 1 {
                                        let s = so.ptr().add(2 * t * part);
                                        (s, s.add(part), dh)
                                    } else {
                                        (
                                            base.add((heads + g) * dh),
                                            base.add((heads + kv_heads + g) * dh),
                                            rs,
                                        )
                                    };
                                    head.backward(
                                        &kb[b * seq..(b + 1) * seq],
                                        dy_in.get().add(b * seq * hid + h * dh),
                                        hid,
                                        (base.add(h * dh), rs),
                                        (dk, kv_rs),
                                        (dv, kv_rs),
                                    );
                                });
                                if group > 1 {
                                    par_for(batch * kv_heads, parallel, |t| {
                                        let (b, g) = (t / kv_heads, t % kv_heads);
                                        let base = go.ptr().add(b * seq * rs);
                                        for (which, col) in
                                            [(0, heads + g), (1, heads + kv_heads + g)]
                                        {
                                            for i in 0..seq {
                                                let dst = std::slice::from_raw_parts_mut(
                                                    base.add(i * rs + col * dh),
                                                    dh,
                                                );
                                                for hl in 0..group {
                                                    let task = b * heads + g * group + hl;
                                                    let src = std::slice::from_raw_parts(
                                                        so.ptr().add(
                                                            (2 * task + which) * part + i * dh,
                                                        ),
                                                        dh,
                                                    );
                                                    if hl == 0 {
                                                        dst.copy_from_slice(src);
                                                    } else {
                                                        dst.iter_mut()
                                                            .zip(src)
                                                            .for_each(|(d, s)| *d += s);
                                                    }
                                                }
                                            }
                                        }
                                    });
                                }
                            });
                        })
                    }
                })
            })
        })???;
        Tensor::from_vec(dqkv, qkv.shape(), qkv.device())
    }
}

impl CustomOp2 for CausalOp {
    fn name(&self) -> &'static str {
        "ferrotune-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        Ok(self.forward(f32_data(s1, l1)?, f32_data(s2, l2)?))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        key_bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.backward(qkv, key_bias, grad)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::tests::{grads_of, max_diff, randn};
    use candle_core::{DType, Device, Var};

    /// Where the padding of a batch lies.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Pad {
        /// After the tokens (training batches).
        Right,
        /// Before the tokens (batched generation): the first queries see only padding.
        Left,
    }

    /// `(batch, seq)`: sequence `b` has `b·(seq + 2)/3` padding keys (at most `seq`; the
    /// first sequence none, the second of a 1-token batch only padding).
    fn key_bias(batch: usize, seq: usize, pad: Pad) -> Tensor {
        let v: Vec<f32> = (0..batch * seq)
            .map(|i| {
                let (b, j) = (i / seq, i % seq);
                let pads = (b * (seq + 2) / 3).min(seq);
                let padded = match pad {
                    Pad::Right => j >= seq - pads,
                    Pad::Left => j < pads,
                };
                if padded {
                    f32::MIN
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(v, (batch, seq), &Device::Cpu).unwrap()
    }

    /// `(batch, seq, heads, kv_heads, head_dim, dropout)`: odd shapes, every grouping of 6
    /// heads, single tokens, and sequences of several query blocks on the thread pool.
    const CASES: [(usize, usize, usize, usize, usize, bool); 10] = [
        (2, 1, 6, 1, 4, false),
        (2, 1, 6, 6, 8, true),
        (2, 5, 6, 2, 8, true),
        (2, 5, 6, 3, 4, false),
        (2, 7, 6, 3, 8, true),
        (2, 7, 6, 6, 4, true),
        (2, 7, 6, 1, 8, false),
        (2, 7, 6, 2, 4, false),
        (3, 150, 4, 2, 8, true),
        (2, 129, 6, 6, 4, false),
    ];

    type Case = (usize, usize, usize, usize, usize, bool);

    /// A random QKV input, the padding bias and the dropout of a case.
    fn inputs(case: Case, pad: Pad, seed: u64) -> (Var, Tensor, Option<Dropout>) {
        let (batch, seq, heads, kv, dh, dropout) = case;
        let qkv = (randn(&[batch * seq, (heads + 2 * kv) * dh], seed) * 0.5).unwrap();
        (
            Var::from_tensor(&qkv).unwrap(),
            key_bias(batch, seq, pad),
            dropout.then_some(Dropout {
                p: 0.2,
                seed: seed + 1,
                row0: 0,
                tokens: (0, 0),
            }),
        )
    }

    fn all_finite(t: &Tensor) -> bool {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|x| x.is_finite())
    }

    /// `max |a − b| / (1 + max |b|)`.
    fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let m = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        max_diff(a, b) / (1.0 + m.to_scalar::<f32>().unwrap())
    }

    /// Forward and the gradient of the fused QKV input equal the composition (transformers'
    /// eager math), with right and left padding, with and without dropout, on odd shapes;
    /// everything is finite, also for queries that see only padding.
    #[test]
    fn causal_attention_matches_the_composition() {
        for case in CASES {
            for pad in [Pad::Right, Pad::Left] {
                let (batch, seq, heads, kv, dh, dropout) = case;
                let (qkv, kb, d) = inputs(case, pad, 11);
                let up = randn(&[batch * seq, heads * dh], 13);
                let y = causal_attention(&qkv, &kb, d, heads, kv).unwrap();
                let r = causal_attention_composed(&qkv, &kb, d, heads, kv).unwrap();
                let what =
                    format!("{batch}x{seq} heads {heads}/{kv}x{dh} dropout {dropout} {pad:?}");
                assert_eq!(y.dims(), [batch * seq, heads * dh], "{what}");
                assert!(all_finite(&y), "forward not finite {what}");
                let e = max_diff(&y, &r);
                assert!(e < 1e-5, "forward {what}: {e}");
                let (g, gr) = (grads_of(y, &up), grads_of(r, &up));
                let (g, gr) = (g.get(&qkv).unwrap(), gr.get(&qkv).unwrap());
                assert_eq!(g.dims(), qkv.dims(), "{what}");
                assert!(all_finite(g), "gradient not finite {what}");
                let e = rel_diff(g, gr);
                assert!(e < 1e-5, "grad {what}: {e}");
            }
        }
    }

    /// Dropout drops: with it the output differs from without, and regenerating the same
    /// seed gives the same output.
    #[test]
    fn dropout_is_applied_and_repeatable() {
        let case = (2, 7, 6, 3, 8, true);
        let (qkv, kb, d) = inputs(case, Pad::Right, 5);
        let a = causal_attention(&qkv, &kb, d, 6, 3).unwrap();
        let b = causal_attention(&qkv, &kb, d, 6, 3).unwrap();
        let c = causal_attention(&qkv, &kb, None, 6, 3).unwrap();
        assert_eq!(max_diff(&a, &b), 0.0);
        assert!(max_diff(&a, &c) > 1e-2);
    }

    /// Causality and padding: changing the keys and values of later tokens, or of padding
    /// tokens, changes no token's output.
    #[test]
    fn later_and_padding_keys_are_ignored() {
        let (batch, seq, heads, kv, dh) = (2, 7, 6, 2, 4);
        let width = (heads + 2 * kv) * dh;
        let a = randn(&[batch * seq, width], 21);
        let changed = |rows: &[usize]| {
            let mut v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for &r in rows {
                for c in heads * dh..width {
                    v[r * width + c] += 5.0;
                }
            }
            Tensor::from_vec(v, a.shape(), a.device()).unwrap()
        };
        let rows_of = |y: &Tensor, b: usize, r: std::ops::Range<usize>| {
            y.narrow(0, b * seq + r.start, r.len()).unwrap()
        };
        // Later keys: rows 4.. of each sequence change, rows ..4 do not.
        let kb = key_bias(batch, seq, Pad::Right);
        let y = causal_attention(&a, &kb, None, heads, kv).unwrap();
        let z = causal_attention(&changed(&[4, 5, 6, 11, 12, 13]), &kb, None, heads, kv).unwrap();
        for b in 0..batch {
            assert_eq!(max_diff(&rows_of(&y, b, 0..4), &rows_of(&z, b, 0..4)), 0.0);
        }
        assert!(max_diff(&rows_of(&y, 0, 4..7), &rows_of(&z, 0, 4..7)) > 1e-3);
        // Padding keys (sequence 1 has 3): the tokens' outputs do not change.
        for (pad, rows, tokens) in [
            (Pad::Right, [11, 12, 13], 7..11),
            (Pad::Left, [7, 8, 9], 10..14),
        ] {
            let kb = key_bias(batch, seq, pad);
            let y = causal_attention(&a, &kb, None, heads, kv).unwrap();
            let z = causal_attention(&changed(&rows), &kb, None, heads, kv).unwrap();
            let t = |y: &Tensor| y.narrow(0, tokens.start, tokens.len()).unwrap();
            assert!(max_diff(&t(&y), &t(&z)) < 1e-6, "{pad:?}");
        }
    }

    /// The fused gradient equals central finite differences of the attention computed in
    /// f64 (the composed path), for entries of Q, K and V of several tokens and of a
    /// padding position, with left padding and dropout.
    #[test]
    fn gradient_matches_finite_differences() {
        let case = (2, 7, 6, 3, 8, true);
        let (batch, seq, heads, kv, dh, _) = case;
        let width = (heads + 2 * kv) * dh;
        let (qkv, kb, d) = inputs(case, Pad::Left, 3);
        // The upstream gradient is zero at padding positions, as the loss's: a query that
        // sees only padding scores every key at f32::MIN, where the scores' true derivative
        // is 0 but autograd's (and transformers') is not; with the loss's zeros there, the
        // gradient of padding keys is 0 both ways (entry (9, ..) below is one).
        let tokens = kb.eq(0f32).unwrap().to_dtype(DType::F32).unwrap();
        let tokens = tokens.reshape((batch * seq, 1)).unwrap();
        let up = randn(&[batch * seq, heads * dh], 4)
            .broadcast_mul(&tokens)
            .unwrap();
        let y = causal_attention(&qkv, &kb, d, heads, kv).unwrap();
        let g = grads_of(y, &up).get(&qkv).unwrap().clone();
        let g = g.to_vec2::<f32>().unwrap();
        let x0 = qkv.to_dtype(DType::F64).unwrap();
        let up64 = up.to_dtype(DType::F64).unwrap();
        let loss = |x: &Tensor| -> f64 {
            let y = causal_attention(x, &kb, d, heads, kv).unwrap();
            (y * &up64)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let eps = 1e-4;
        // (row, column): queries, keys and values of both sequences, early and late tokens.
        let entries = [
            (0, 1),
            (6, 5 * dh + 3),
            (3, heads * dh + 2),
            (9, (heads + 1) * dh + 7),
            (12, (heads + 2) * dh),
            (1, (heads + kv) * dh + 4),
            (11, (heads + kv + 2) * dh + 1),
            (13, width - 1),
        ];
        for (r, c) in entries {
            let mut v = x0.to_vec2::<f64>().unwrap();
            v[r][c] += eps;
            let plus = loss(&Tensor::new(v.clone(), &Device::Cpu).unwrap());
            v[r][c] -= 2.0 * eps;
            let minus = loss(&Tensor::new(v, &Device::Cpu).unwrap());
            let fd = (plus - minus) / (2.0 * eps);
            let got = g[r][c] as f64;
            assert!(
                (fd - got).abs() < 1e-3 * (1.0 + fd.abs()),
                "d/dqkv[{r}][{c}]: fused {got}, finite differences {fd}"
            );
        }
    }

    /// The last `new` rows of a full causal pass equal decode_attention over the same
    /// cache, fused and composed, for every grouping, one and several new queries, both
    /// paddings, and a cache of several query blocks.
    #[test]
    fn decode_matches_the_last_rows_of_a_full_pass() {
        for (batch, seq, heads, kv, dh, news) in [
            (2, 7, 6, 1, 8, &[1, 3, 7][..]),
            (2, 7, 6, 2, 4, &[1, 2, 7][..]),
            (2, 7, 6, 6, 8, &[1, 4][..]),
            (3, 150, 4, 2, 8, &[1, 70, 150][..]),
        ] {
            for pad in [Pad::Right, Pad::Left] {
                let (qkv, kb, _) = inputs((batch, seq, heads, kv, dh, false), pad, 7);
                let qkv = qkv.as_tensor();
                let (hid, kvc) = (heads * dh, kv * dh);
                let full = causal_attention(qkv, &kb, None, heads, kv).unwrap();
                let cols = |c: usize, w: usize| {
                    qkv.narrow(1, c, w)
                        .unwrap()
                        .reshape((batch, seq, w))
                        .unwrap()
                };
                let (k, v) = (cols(hid, kvc), cols(hid + kvc, kvc));
                for &new in news {
                    let last = |t: Tensor, w: usize| {
                        t.reshape((batch, seq, w))
                            .unwrap()
                            .narrow(1, seq - new, new)
                            .unwrap()
                            .contiguous()
                            .unwrap()
                            .reshape((batch * new, w))
                            .unwrap()
                    };
                    let q = last(qkv.narrow(1, 0, hid).unwrap(), hid);
                    let want = last(full.clone(), hid);
                    let y = decode_attention(&q, &k, &v, &kb, heads, kv).unwrap();
                    let what = format!("{batch}x{seq} heads {heads}/{kv} new {new} {pad:?}");
                    assert_eq!(y.dims(), [batch * new, hid], "{what}");
                    assert!(all_finite(&y), "{what}");
                    let e = max_diff(&y, &want);
                    assert!(e < 1e-5, "fused {what}: {e}");
                    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
                    let c = decode_attention(&f64s(&q), &f64s(&k), &f64s(&v), &kb, heads, kv)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap();
                    let e = max_diff(&c, &want);
                    assert!(e < 1e-5, "composed {what}: {e}");
                }
            }
        }
    }

    /// Bad shapes are errors, not panics.
    #[test]
    fn bad_shapes_are_errors() {
        let kb = key_bias(2, 3, Pad::Right);
        let qkv = randn(&[6, (6 + 2 * 2) * 4], 1);
        assert!(causal_attention(&qkv, &kb, None, 6, 2).is_ok());
        let e = causal_attention(&qkv, &kb, None, 6, 4).unwrap_err();
        assert!(e.to_string().contains("not a positive multiple"), "{e}");
        assert!(causal_attention(&qkv, &kb, None, 5, 1).is_err());
        assert!(causal_attention(&qkv, &kb, None, 6, 0).is_err());
        assert!(causal_attention(&qkv.narrow(0, 0, 5).unwrap(), &kb, None, 6, 2).is_err());
        let q = randn(&[2, 24], 2);
        let k = randn(&[2, 3, 8], 3);
        assert!(decode_attention(&q, &k, &k, &kb, 6, 2).is_ok());
        assert!(decode_attention(&q, &k, &k, &kb, 6, 4).is_err());
        assert!(decode_attention(&q, &k.narrow(1, 0, 2).unwrap(), &k, &kb, 6, 2).is_err());
        assert!(decode_attention(&randn(&[8, 24], 2), &k, &k, &kb, 6, 2).is_err());
        assert!(decode_attention(&randn(&[2, 25], 2), &k, &k, &kb, 5, 1).is_err());
    }

    /// Fused vs composed, forward + backward, on SmolLM2-135M's shape (batch 8, seq 256,
    /// 9 heads over 3 KV heads of 64), with dropout: `cargo test -p ferrotune --release
    /// --lib kernels::decode::tests::speed -- --ignored --nocapture` (`RAYON_NUM_THREADS`
    /// sets the threads). Prints wall and process CPU milliseconds per step.
    #[test]
    #[ignore]
    fn speed() {
        let (batch, seq, heads, kv, dh) = (8, 256, 9, 3, 64);
        let (qkv, kb, d) = inputs((batch, seq, heads, kv, dh, true), Pad::Right, 1);
        let up = randn(&[batch * seq, heads * dh], 2);
        let cpu_ms = || {
            let mut u: libc::rusage = unsafe { std::mem::zeroed() };
            // Safety: getrusage writes the struct it is given.
            unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
            let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 * 1e-3;
            ms(u.ru_utime) + ms(u.ru_stime)
        };
        let time = |f: &dyn Fn() -> Tensor, backward: bool| {
            let step = || {
                let y = f();
                if backward {
                    assert!(grads_of(y, &up).get(&qkv).is_some());
                }
            };
            step();
            let n = 5;
            let (t, c) = (std::time::Instant::now(), cpu_ms());
            for _ in 0..n {
                step();
            }
            (
                t.elapsed().as_secs_f64() * 1e3 / n as f64,
                (cpu_ms() - c) / n as f64,
            )
        };
        let fused = || causal_attention(&qkv, &kb, d, heads, kv).unwrap();
        let composed = || causal_attention_composed(&qkv, &kb, d, heads, kv).unwrap();
        let (ff, fc) = (time(&fused, false), time(&composed, false));
        let (bf, bc) = (time(&fused, true), time(&composed, true));
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_default();
        println!(
            "causal attention {batch}x{seq} heads {heads}/{kv}x{dh}, dropout 0.2, {} threads, \
             {cpu} (ms per step, wall / cpu)\n\
             forward:          fused {:.1} / {:.1}, composed {:.1} / {:.1}: {:.2}x wall\n\
             forward+backward: fused {:.1} / {:.1}, composed {:.1} / {:.1}: {:.2}x wall",
            candle_core::utils::get_num_threads(),
            ff.0,
            ff.1,
            fc.0,
            fc.1,
            fc.0 / ff.0,
            bf.0,
            bf.1,
            bc.0,
            bc.1,
            bc.0 / bf.0,
        );
    }
}

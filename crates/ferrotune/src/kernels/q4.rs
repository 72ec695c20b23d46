//! 4-bit base weights for LoRA (QLoRA-style): a frozen linear layer's weights kept as
//! ggml's Q4_1 blocks (candle's [`BlockQ4_1`]: 32 consecutive inputs of one output share an
//! f16 scale `d` and minimum `m`, each weight `q·d + m` with `q` in 0..16; 20 bytes per 32
//! weights, 0.625 bytes each) and dequantised inside the layer's op, forward and backward,
//! into a scratch buffer that holds one layer: the model is never in memory as f32.
//!
//! Quantising and dequantising are candle's (`from_float` and `to_float`, ggml's
//! `quantize_row_q4_1` and `dequantize_row_q4_1`), so a GGUF file's Q4_1 weights,
//! dequantised by candle when the file is converted (`formats::gguf`) and quantised again
//! here, come back as the same blocks: training on them runs on exactly the file's weights
//! (the tests check it block for block on SmolLM2's GGUF).
//!
//! The op then runs the same [`sgemm`] calls as the fused linear layer on those weights:
//! `y = x Wᵀ + b` forward, `dx = dy W` backward, and no weight gradient (the weights are
//! frozen). Dequantising costs one pass over the layer's weights per GEMM, next to the
//! GEMM's `2·tokens` operations per weight.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::quantized::k_quants::{BlockQ4_1, GgmlType};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::gemm::sgemm;
use super::linear::{forward_rows, input_grad};
use super::par::{f32_data, par_for, with_f32, with_scratch, Out, PAR_MIN};
use crate::error::{Error, Result};

/// Weights per block (along the input).
pub const BLOCK: usize = 32;

/// A linear layer's weights `(out, inp)` as Q4_1 blocks, row by row.
pub struct Q4Weight {
    /// Outputs (rows).
    pub out: usize,
    /// Inputs (columns), a multiple of [`BLOCK`].
    pub inp: usize,
    blocks: Vec<BlockQ4_1>,
}

impl Q4Weight {
    /// The Q4_1 blocks of `w` `(out, inp)` row-major; `None` when `inp` is not a multiple
    /// of [`BLOCK`] (such a layer stays f32) or a weight is not finite.
    pub fn quantize(w: &[f32], out: usize, inp: usize) -> Option<Q4Weight> {
        if inp == 0 || !inp.is_multiple_of(BLOCK) || w.len() != out * inp {
            return None;
        }
        if w.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mut blocks = vec![BlockQ4_1::zeros(); w.len() / BLOCK];
        BlockQ4_1::from_float(w, &mut blocks);
        Some(Q4Weight { out, inp, blocks })
    }

    /// Bytes the blocks take.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.blocks.as_slice())
    }

    /// Rows `r0..r0 + dst.len() / inp` as f32 into `dst`.
    fn rows_into(&self, r0: usize, dst: &mut [f32]) {
        let per_row = self.inp / BLOCK;
        let rows = dst.len() / self.inp;
        BlockQ4_1::to_float(&self.blocks[r0 * per_row..(r0 + rows) * per_row], dst);
    }

    /// All the weights as f32, `(out, inp)` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.out * self.inp];
        dequantize_parts(&[self], &mut v);
        v
    }
}

/// `parts` stacked along the outputs, as f32 into `dst` (`Σ out × inp`), in parallel over
/// blocks of rows.
fn dequantize_parts(parts: &[&Q4Weight], dst: &mut [f32]) {
    const ROWS: usize = 32;
    let inp = parts.first().map_or(0, |p| p.inp);
    // (part, first row) of each task.
    let tasks: Vec<(usize, usize)> = parts
        .iter()
        .enumerate()
        .flat_map(|(i, p)| (0..p.out).step_by(ROWS).map(move |r| (i, r)))
        .collect();
    let offsets: Vec<usize> = parts
        .iter()
        .scan(0, |acc, p| {
            let at = *acc;
            *acc += p.out * inp;
            Some(at)
        })
        .collect();
    let o = Out::new(dst);
    par_for(tasks.len(), dst.len() >= PAR_MIN, |t| {
        let (i, r) = tasks[t];
        let rows = ROWS.min(parts[i].out - r);
        // Safety: each task writes its own rows of its own part.
        let out = unsafe { o.part(offsets[i] + r * inp, rows * inp) };
        parts[i].rows_into(r, out);
    });
}

thread_local! {
    /// The dequantised weights of the layer being computed (reused between calls: the
    /// largest layer's size, a few MiB).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on the f32 weights of `parts` stacked along the outputs, dequantised into this
/// thread's scratch buffer.
fn with_weights<R>(parts: &[Arc<Q4Weight>], f: impl FnOnce(&[f32]) -> R) -> R {
    let refs: Vec<&Q4Weight> = parts.iter().map(|p| p.as_ref()).collect();
    let n: usize = refs.iter().map(|p| p.out * p.inp).sum();
    with_scratch(&SCRATCH, n, |s| {
        dequantize_parts(&refs, s);
        f(s)
    })
}

/// `x Wᵀ + b` for `x` `(n, inp)` on the CPU, `W` the 4-bit weights `parts` stacked along
/// the outputs (one GEMM for a layer's query, key and value), `b` their biases side by side
/// (`None`: zero). Differentiable in `x` only: the weights and biases are frozen.
pub fn linear(x: &Tensor, parts: &[Arc<Q4Weight>], b: Option<&Tensor>) -> Result<Tensor> {
    let inp = parts.first().map_or(0, |p| p.inp);
    if parts.iter().any(|p| p.inp != inp) {
        return Err(Error::Msg(
            "4-bit linear: stacked weights of different input widths".into(),
        ));
    }
    let out: usize = parts.iter().map(|p| p.out).sum();
    let bias = match b {
        Some(b) => {
            let v = with_f32(b, |v| v.to_vec())?;
            if v.len() != out {
                return Err(Error::Msg(format!(
                    "4-bit linear: {} biases for {out} outputs",
                    v.len()
                )));
            }
            Some(v)
        }
        None => None,
    };
    let op = Q4Linear {
        parts: parts.to_vec(),
        bias,
        out,
        inp,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

struct Q4Linear {
    parts: Vec<Arc<Q4Weight>>,
    bias: Option<Vec<f32>>,
    out: usize,
    inp: usize,
}

impl CustomOp1 for Q4Linear {
    fn name(&self) -> &'static str {
        "ferrotune-q4-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l)?;
        let (n, inp) = l.shape().dims2()?;
        let out = self.out;
        if inp != self.inp {
            candle_core::bail!("4-bit linear of {} inputs given {inp}", self.inp);
        }
        let y = with_weights(&self.parts, |w| {
            forward_rows(x, n, inp, w, out, self.bias.as_deref(), sgemm)
        });
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, inp) = x.dims2()?;
        let out = self.out;
        let dx = with_f32(grad, |dy| {
            with_weights(&self.parts, |w| input_grad(dy, n, out, w, inp, sgemm))
        })?;
        Ok(Some(Tensor::from_vec(dx, (n, inp), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::tests::{grads_of, max_diff, randn};
    use crate::kernels::linear;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Var};

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Quantising is ggml's Q4_1 (candle's quantised tensors give the same weights back),
    /// and quantising the dequantised weights again gives the same blocks: weights that
    /// came from Q4_1 blocks (a GGUF file) are kept exactly.
    #[test]
    fn blocks_are_ggml_q4_1_and_requantising_is_exact() {
        let (out, inp) = (7, 96);
        let mut w = values(&randn(&[out, inp], 11));
        // A constant block (scale 0) and one with a large offset.
        w[..BLOCK].fill(0.25);
        for v in &mut w[BLOCK..2 * BLOCK] {
            *v += 40.0;
        }
        let q = Q4Weight::quantize(&w, out, inp).unwrap();
        assert_eq!(q.bytes(), out * inp / BLOCK * 20);
        let mine = q.dequantize();
        let t = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).unwrap();
        let theirs = values(
            &QTensor::quantize(&t, GgmlDType::Q4_1)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap(),
        );
        assert_eq!(mine, theirs);
        assert!(
            mine.iter().zip(&w).any(|(a, b)| a != b),
            "4 bits lose detail"
        );
        let again = Q4Weight::quantize(&mine, out, inp).unwrap().dequantize();
        assert_eq!(again, mine);
        // Widths that are not whole blocks, and weights that are not finite, stay f32.
        assert!(Q4Weight::quantize(&w[..out * 40], out, 40).is_none());
        w[3] = f32::NAN;
        assert!(Q4Weight::quantize(&w, out, inp).is_none());
    }

    /// The op equals the fused linear layer on the dequantised weights (the same GEMMs, so
    /// bit for bit), forward and the input's gradient, with stacked parts and a bias, on
    /// shapes small and large enough for the thread pool; it gives the weights nothing.
    #[test]
    fn the_op_is_the_linear_layer_on_the_dequantised_weights() {
        for &(n, inp, outs) in &[
            (1, 32, &[1usize][..]),
            (5, 64, &[3, 2, 2]),
            (300, 96, &[64, 32, 32]),
        ] {
            let parts: Vec<Arc<Q4Weight>> = outs
                .iter()
                .enumerate()
                .map(|(i, &o)| {
                    let w = values(&randn(&[o, inp], 20 + i as u64));
                    Arc::new(Q4Weight::quantize(&w, o, inp).unwrap())
                })
                .collect();
            let out: usize = outs.iter().sum();
            let dense: Vec<f32> = parts.iter().flat_map(|p| p.dequantize()).collect();
            let w = Tensor::from_vec(dense, (out, inp), &Device::Cpu).unwrap();
            let b = randn(&[out], 3);
            let x = Var::from_tensor(&randn(&[n, inp], 1)).unwrap();
            let up = randn(&[n, out], 4);
            let y = linear(x.as_tensor(), &parts, Some(&b)).unwrap();
            let r = linear::linear(x.as_tensor(), &w, &b).unwrap();
            assert_eq!(max_diff(&y, &r), 0.0, "forward {n}x{inp}x{out}");
            let (g, gr) = (grads_of(y, &up), grads_of(r, &up));
            assert_eq!(max_diff(g.get(&x).unwrap(), gr.get(&x).unwrap()), 0.0);
            // Without a bias: zero.
            let y0 = linear(x.as_tensor(), &parts, None).unwrap();
            let r0 = linear::linear(x.as_tensor(), &w, &b.zeros_like().unwrap()).unwrap();
            assert_eq!(max_diff(&y0, &r0), 0.0);
        }
    }
}

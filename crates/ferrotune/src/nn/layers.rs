//! Layers shared by model families: linear, layer norm, RMS norm, embedding lookup,
//! activations. Each reads its parameters through the [`Ctx`] (frozen groups are detached) and runs the
//! fused kernel, or the composition of candle operations it is tested against when the
//! fused operations are off.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::kernels::bf16::{self, BWeight};
use crate::kernels::int8::{self, QWeight};
use crate::kernels::lora as lora_ops;
use crate::kernels::par::with_f32;
use crate::kernels::q4::{self, Q4Weight};
use crate::kernels::{embedding, fused, linear, rms_norm};
use crate::nn::lora::Lora;
use crate::nn::Ctx;

/// A linear layer `y = x Wᵀ + b` on 2-D input.
pub struct Linear {
    /// `(out, in)`; `(out, 0)` for a layer loaded from a quantized model, which holds
    /// its int8 weights only ([`Linear::int8_only`]), and for a 4-bit one ([`Linear::q4`]).
    pub w: Var,
    /// `(out)`.
    pub b: Var,
    /// Its parameter group.
    pub group: usize,
    /// The int8 weights: made from `w` at the first int8 inference (see [`Ctx::int8`]),
    /// or loaded from a quantized model.
    pub q: OnceLock<QWeight>,
    /// Loaded from a quantized model: no f32 weights, int8 inference only.
    pub int8_only: bool,
    /// The bf16 weights, made from `w` at the first bf16 inference (see [`Ctx::bf16`]).
    pub bw: OnceLock<BWeight>,
    /// A LoRA adapter added to the output ([`crate::nn::lora`]); its base weights are then
    /// in the frozen group, so the base GEMM runs on detached weights.
    pub lora: Option<Lora>,
    /// Frozen base weights kept in 4 bits (`load_in_4bit`, [`crate::kernels::q4`]): then
    /// `w` is empty and every pass dequantises these.
    pub q4: Option<Arc<Q4Weight>>,
}

impl Linear {
    /// A layer of these parameters.
    pub fn new(w: Var, b: Var, group: usize) -> Linear {
        Linear {
            w,
            b,
            group,
            q: OnceLock::new(),
            int8_only: false,
            bw: OnceLock::new(),
            lora: None,
            q4: None,
        }
    }

    /// A layer of int8 weights only (from a quantized model): it runs int8 in any
    /// inference and refuses training.
    pub fn quantized(q: QWeight, b: Var, group: usize) -> Result<Linear> {
        let w = Var::from_tensor(&Tensor::zeros((q.out, 0), DType::F32, b.device())?)?;
        let cell = OnceLock::new();
        let _ = cell.set(q);
        Ok(Linear {
            w,
            b,
            group,
            q: cell,
            int8_only: true,
            bw: OnceLock::new(),
            lora: None,
            q4: None,
        })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        match (&self.q4, self.q.get()) {
            (Some(q), _) => Ok((q.out, q.inp)),
            (None, Some(q)) if self.int8_only => Ok((q.out, q.inp)),
            _ => Ok(self.w.dims2()?),
        }
    }

    /// This layer with its weights in 4 bits ([`Q4Weight`]), its f32 weights dropped;
    /// unchanged when they do not fit the blocks (an input width that is not a multiple of
    /// 32). For frozen layers only: nothing gives 4-bit weights a gradient.
    pub fn into_4bit(mut self) -> Result<Linear> {
        if self.int8_only || self.q4.is_some() {
            return Ok(self);
        }
        let (out, inp) = self.w.dims2()?;
        let wv: Vec<f32> = self.w.as_tensor().flatten_all()?.to_vec1()?;
        if let Some(q) = Q4Weight::quantize(&wv, out, inp) {
            self.q4 = Some(Arc::new(q));
            self.w = Var::from_tensor(&Tensor::zeros((out, 0), DType::F32, self.b.device())?)?;
        }
        Ok(self)
    }

    /// The error of an int8-only layer asked to train.
    pub fn int8_only_error() -> Error {
        Error::Msg(
            "this model is quantized (int8 weights only): it runs inference only, in int8; \
             train the f32 model it was quantized from"
                .into(),
        )
    }

    /// `(rows, inputs)` of `x` when the int8 and bf16 kernels take it: 2-D f32 on the CPU.
    fn cpu_rows(x: &Tensor) -> Option<(usize, usize)> {
        match x.dims() {
            &[m, k] if x.dtype() == DType::F32 && x.device().is_cpu() => Some((m, k)),
            _ => None,
        }
    }

    /// The weights converted by `make` (int8 or bf16) from `w`, once, kept in `cell`;
    /// `None` when `w` does not take `k` inputs.
    fn converted<'a, T>(
        &self,
        cell: &'a OnceLock<T>,
        k: usize,
        make: fn(&[f32], usize, usize) -> T,
    ) -> Result<Option<&'a T>> {
        if let Some(t) = cell.get() {
            return Ok(Some(t));
        }
        let (out, inp) = self.dims()?;
        if inp != k {
            return Ok(None);
        }
        let wv: Vec<f32> = match &self.q4 {
            Some(q) => q.dequantize(),
            None => self.w.as_tensor().flatten_all()?.to_vec1()?,
        };
        let _ = cell.set(make(&wv, out, inp));
        Ok(cell.get())
    }

    /// `x Wᵀ + b` through int8 (inference): `None` where the layer cannot (not 2-D f32 on
    /// the CPU).
    fn forward_int8(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((m, k)) = Linear::cpu_rows(x) else {
            return Ok(None);
        };
        let Some(q) = self.converted(&self.q, k, QWeight::quantize)? else {
            return Ok(None);
        };
        if q.inp != k {
            return Err(Error::Msg(format!(
                "int8 linear layer of {} inputs given {k}",
                q.inp
            )));
        }
        // Read in place: no copy of the activations or the bias.
        let y = with_f32(x, |xv| {
            with_f32(self.b.as_tensor(), |bv| {
                int8::linear_i8(xv, m, q, Some(bv), true, int8::Kernel::best())
            })
        })??;
        Ok(Some(Tensor::from_vec(y, (m, q.out), x.device())?))
    }

    /// `x Wᵀ + b` in bf16 with f32 sums (inference): `None` where the layer cannot (not
    /// 2-D f32 on the CPU, or int8 weights only).
    fn forward_bf16(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((m, k)) = Linear::cpu_rows(x).filter(|_| !self.int8_only) else {
            return Ok(None);
        };
        let Some(bw) = self.converted(&self.bw, k, BWeight::pack)? else {
            return Ok(None);
        };
        let y = with_f32(x, |xv| {
            with_f32(self.b.as_tensor(), |bv| {
                bf16::linear_bf16(xv, m, bw, Some(bv), true, bf16::Kernel::best())
            })
        })??;
        Ok(Some(Tensor::from_vec(y, (m, bw.out), x.device())?))
    }

    /// `x Wᵀ + b`, plus the LoRA adapter's output if the layer has one. An int8-only layer
    /// (a quantized model) runs int8 in any inference.
    pub fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let y = self.forward_base(ctx, x)?;
        add_lora_deltas(ctx, y, &[self], x)
    }

    /// The LoRA adapter's output `s·(dropout(x) Aᵀ) Bᵀ` (`None` without an adapter), for
    /// callers that run the base GEMM fused with others (the encoder's query, key and
    /// value).
    pub fn lora_delta(&self, ctx: &Ctx, x: &Tensor) -> Result<Option<Tensor>> {
        self.lora.as_ref().map(|l| l.delta(ctx, x)).transpose()
    }

    /// `x Wᵀ + b` without the adapter.
    pub fn forward_base(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        if (ctx.int8 || self.int8_only) && !ctx.train {
            if let Some(y) = self.forward_int8(x)? {
                return Ok(y);
            }
        } else if ctx.bf16 && !ctx.train {
            if let Some(y) = self.forward_bf16(x)? {
                return Ok(y);
            }
        }
        if self.int8_only {
            return Err(Linear::int8_only_error());
        }
        let b = ctx.w(&self.b, self.group);
        if let Some(q) = &self.q4 {
            return q4::linear(x, std::slice::from_ref(q), Some(&b));
        }
        let w = ctx.w(&self.w, self.group);
        if ctx.fused() {
            linear::linear_mixed(x, &w, &b, ctx.bf16 && ctx.train)
        } else {
            linear::linear_composed(x, &w, &b)
        }
    }

    /// `act(x Wᵀ + b)`; the exact GELU runs inside the fused linear op.
    pub fn forward_act(&self, ctx: &Ctx, x: &Tensor, act: Activation) -> Result<Tensor> {
        if self.lora.is_some() {
            // The adapter's output is added before the activation.
            let y = self.forward(ctx, x)?;
            return match act {
                Activation::Gelu if ctx.fused() => fused::gelu_erf(&y),
                act => act.apply(&y),
            };
        }
        match act {
            // int8 or bf16 (or a quantized layer in inference), or 4-bit weights: that
            // GEMM, then the fused (vectorised) GELU.
            Activation::Gelu
                if (ctx.low_precision() || (self.int8_only && !ctx.train) || self.q4.is_some())
                    && ctx.fused() =>
            {
                fused::gelu_erf(&self.forward(ctx, x)?)
            }
            Activation::Gelu if ctx.fused() && !self.int8_only && self.q4.is_none() => {
                let w = ctx.w(&self.w, self.group);
                let b = ctx.w(&self.b, self.group);
                linear::linear_gelu_mixed(x, &w, &b, ctx.bf16 && ctx.train)
            }
            act => act.apply(&self.forward(ctx, x)?),
        }
    }
}

/// The side-by-side outputs of `lins` on `x` (a layer's query, key and value) from one
/// 4-bit GEMM over their stacked weights, with their adapters' outputs: `None` unless every
/// layer of `lins` has 4-bit weights (and the pass is not int8 or bf16 inference).
pub fn forward_stacked_4bit(ctx: &Ctx, lins: &[&Linear], x: &Tensor) -> Result<Option<Tensor>> {
    let parts: Option<Vec<Arc<Q4Weight>>> = lins.iter().map(|l| l.q4.clone()).collect();
    let Some(parts) = parts.filter(|_| !ctx.low_precision()) else {
        return Ok(None);
    };
    let bs: Vec<Tensor> = lins.iter().map(|l| ctx.w(&l.b, l.group)).collect();
    let base = q4::linear(x, &parts, Some(&Tensor::cat(&bs, 0)?))?;
    Ok(Some(add_lora_deltas(ctx, base, lins, x)?))
}

/// `base` (the side-by-side outputs of `lins` on `x`, from one fused GEMM over their
/// concatenated weights) plus the LoRA adapters' outputs of those layers that have one,
/// in the same columns: the two fused ops of [`lora_ops`] on 2-D input (the adapters'
/// dropout masks regenerated, not stored), else the composition [`Lora::delta`].
pub fn add_lora_deltas(ctx: &Ctx, base: Tensor, lins: &[&Linear], x: &Tensor) -> Result<Tensor> {
    if lins.iter().all(|l| l.lora.is_none()) {
        return Ok(base);
    }
    if ctx.fused() && x.rank() == 2 && crate::kernels::par::fusable(&[x, &base]) {
        let (mut a, mut b, mut down, mut up) = (vec![], vec![], vec![], vec![]);
        let mut y_col = 0;
        for l in lins {
            let out = l.b.dim(0)?;
            if let Some(lora) = &l.lora {
                let (la, lb, part) = lora.fused_part(ctx);
                up.push(lora_ops::UpPart { y_col, out });
                a.push(la);
                b.push(lb);
                down.push(part);
            }
            y_col += out;
        }
        let h = lora_ops::down(x, &Tensor::cat(&a, 0)?, &down)?;
        return lora_ops::up_add(&base, &h, &Tensor::cat(&b, 0)?, &up);
    }
    let parts = lins
        .iter()
        .map(|l| match l.lora_delta(ctx, x)? {
            Some(d) => Ok(d),
            None => Ok(Tensor::zeros(
                (x.dim(0)?, l.b.dim(0)?),
                x.dtype(),
                x.device(),
            )?),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((base + Tensor::cat(&parts, 1)?)?)
}

/// Layer norm over the last dimension ([`fused::layer_norm`]: one pass forward, one
/// backward).
pub struct LayerNorm {
    /// Scale.
    pub g: Var,
    /// Shift.
    pub b: Var,
    /// Epsilon.
    pub eps: f64,
    /// Its parameter group.
    pub group: usize,
}

impl LayerNorm {
    /// `LayerNorm(x)`.
    pub fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let g = ctx.w(&self.g, self.group);
        let b = ctx.w(&self.b, self.group);
        if ctx.fused() {
            fused::layer_norm(x, &g, &b, self.eps)
        } else {
            fused::layer_norm_composed(x, &g, &b, self.eps)
        }
    }

    /// `LayerNorm(dropout(h) + r)` with dropout probability `p`: one fused operation
    /// ([`fused::residual_layer_norm`]), or the composition of the three.
    pub fn forward_residual(
        &self,
        ctx: &mut Ctx,
        h: &Tensor,
        r: &Tensor,
        p: f64,
    ) -> Result<Tensor> {
        if ctx.fused() {
            let g = ctx.w(&self.g, self.group);
            let b = ctx.w(&self.b, self.group);
            let drop = ctx.dropout_seed(p);
            return fused::residual_layer_norm(h, r, &g, &b, self.eps, drop);
        }
        let h = ctx.dropout(h, p)?;
        self.forward(ctx, &(h + r)?)
    }
}

/// RMS norm over the last dimension, `x / sqrt(mean(x²) + eps) · g` (Llama's
/// `LlamaRMSNorm`: the mean of squares in f32, no shift): the fused kernel
/// ([`rms_norm::rms_norm`]), or with the fused operations off its candle composition.
pub struct RmsNorm {
    /// Scale.
    pub g: Var,
    /// Epsilon.
    pub eps: f64,
    /// Its parameter group.
    pub group: usize,
}

impl RmsNorm {
    /// `RmsNorm(x)`.
    pub fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let g = ctx.w(&self.g, self.group);
        if ctx.fused() {
            rms_norm::rms_norm(x, &g, self.eps)
        } else {
            rms_norm::rms_norm_composed(x, &g, self.eps)
        }
    }
}

/// An embedding table `(rows, dim)`.
pub struct Embedding {
    /// The table.
    pub table: Var,
    /// Its parameter group.
    pub group: usize,
}

impl Embedding {
    /// The rows of `ids` (any shape, u32): `(ids.elem_count(), dim)`.
    pub fn forward(&self, ctx: &Ctx, ids: &Tensor) -> Result<Tensor> {
        let table = ctx.w(&self.table, self.group);
        let ids = ids.flatten_all()?;
        if ctx.fused() {
            embedding::embedding(&table, &ids)
        } else {
            Ok(table.embedding(&ids)?)
        }
    }

    /// The first `n` rows of the table (positions `0..n`), `(n, dim)`.
    pub fn first_rows(&self, ctx: &Ctx, n: usize) -> Result<Tensor> {
        Ok(ctx.w(&self.table, self.group).narrow(0, 0, n)?)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.table.dims().first().copied().unwrap_or(0)
    }
}

/// Position ids counted from the padding index, as RoBERTa and MPNet number positions
/// (transformers' `create_position_ids_from_input_ids`): in each row, the `k`-th token
/// that is not `pad` gets `pad + k` (from 1), every `pad` token gets `pad`. `(batch, seq)`
/// u32.
pub fn positions_after_padding(input_ids: &Tensor, pad: u32) -> Result<Tensor> {
    let (bsz, seq) = input_ids.dims2()?;
    let ids = input_ids.flatten_all()?.to_vec1::<u32>()?;
    let mut pos = Vec::with_capacity(ids.len());
    for row in ids.chunks(seq.max(1)) {
        let mut k = 0;
        for &id in row {
            if id == pad {
                pos.push(pad);
            } else {
                k += 1;
                pos.push(pad + k);
            }
        }
    }
    Ok(Tensor::from_vec(pos, (bsz, seq), input_ids.device())?)
}

/// The feed-forward activations of transformer encoders (`hidden_act` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// The exact, erf-based GELU (`gelu`).
    Gelu,
    /// The tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// `relu`.
    Relu,
    /// `tanh`.
    Tanh,
}

impl Activation {
    /// Parses a `hidden_act` value.
    pub fn parse(name: &str) -> Result<Activation> {
        Ok(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "tanh" => Activation::Tanh,
            _ => {
                return Err(Error::Msg(format!(
                    "unsupported activation `{name}` (supported: gelu, gelu_new, gelu_pytorch_tanh, relu)"
                )))
            }
        })
    }

    /// `act(x)`.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
            Activation::Tanh => x.tanh()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// RMS norm equals its formula row by row, and its gradients equal central finite
    /// differences of the summed, weighted output.
    #[test]
    fn rms_norm_matches_its_formula_and_finite_differences() {
        let dev = Device::Cpu;
        let xs: Vec<f32> = (0..15).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
        let gs = vec![0.5f32, -1.0, 2.0, 1.5, 0.25];
        let up: Vec<f32> = (0..15).map(|i| ((i * 5 % 7) as f32 - 3.0) * 0.2).collect();
        let x = Var::from_vec(xs.clone(), (3, 5), &dev).unwrap();
        let g = Var::from_vec(gs.clone(), 5, &dev).unwrap();
        let norm = RmsNorm {
            g: g.clone(),
            eps: 1e-6,
            group: 0,
        };
        let frozen = [false];
        let ctx = Ctx {
            train: true,
            frozen: &frozen,
            rng: None,
            int8: false,
            bf16: false,
            row0: 0,
            tokens: (0, 0),
            freeze_bn: false,
        };
        let y = norm.forward(&ctx, &x).unwrap();
        // The formula, in f64.
        let reference = |xs: &[f32], gs: &[f32]| -> Vec<f64> {
            xs.chunks(5)
                .flat_map(|r| {
                    let ms = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 5.0;
                    let inv = 1.0 / (ms + 1e-6).sqrt();
                    r.iter()
                        .zip(gs)
                        .map(move |(&v, &g)| v as f64 * inv * g as f64)
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let got = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip(reference(&xs, &gs)) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
        let upt = Tensor::from_vec(up.clone(), (3, 5), &dev).unwrap();
        let grads = (y * upt).unwrap().sum_all().unwrap().backward().unwrap();
        let objective = |xs: &[f32], gs: &[f32]| -> f64 {
            reference(xs, gs)
                .iter()
                .zip(&up)
                .map(|(y, &u)| y * u as f64)
                .sum()
        };
        let h = 1e-3f32;
        for (var, which) in [(&x, 0), (&g, 1)] {
            let analytic = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (i, a) in analytic.iter().enumerate() {
                let (mut xp, mut gp) = (xs.clone(), gs.clone());
                let (mut xm, mut gm) = (xs.clone(), gs.clone());
                if which == 0 {
                    xp[i] += h;
                    xm[i] -= h;
                } else {
                    gp[i] += h;
                    gm[i] -= h;
                }
                let fd = (objective(&xp, &gp) - objective(&xm, &gm)) / (2.0 * h as f64);
                assert!(
                    (*a as f64 - fd).abs() < 2e-3,
                    "d[{which}][{i}]: {a} vs {fd}"
                );
            }
        }
    }
}

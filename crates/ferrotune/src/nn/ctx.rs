//! The per-forward context every layer receives: training or inference, the frozen
//! groups, and the dropout generator.

use candle_core::{Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::kernels::fused;

/// Per-forward state: training or inference, which parameter groups are frozen, and the
/// random generator for dropout (seeded by the trainer, so runs are reproducible).
pub struct Ctx<'a> {
    /// Dropout active.
    pub train: bool,
    /// `frozen[g]`: parameters of group `g` get no gradient (see
    /// [`crate::nn::ParamStore::groups`]).
    pub frozen: &'a [bool],
    /// Dropout's random generator (needed when `train`).
    pub rng: Option<&'a mut ChaCha8Rng>,
    /// Inference only: linear layers run through int8 weights and activations
    /// ([`crate::kernels::int8`]); ignored when `train`.
    pub int8: bool,
    /// Linear layers in bf16 with f32 sums ([`crate::kernels::bf16`]): in inference on
    /// weights converted once, in training (mixed precision) on operands rounded per GEMM,
    /// forward and backward, with f32 master weights, gradients and optimizer state.
    /// Ignored with `int8`.
    pub bf16: bool,
    /// Index, in the global batch, of this batch's first sequence: where a rank's part
    /// of a distributed step begins (0 otherwise). Dropout masks follow the sequence
    /// ([`fused::Dropout`]), so a step splits over ranks without changing them.
    pub row0: u64,
    /// The batch's sequences and padded length, when known (see [`fused::Dropout`]);
    /// `(0, 0)` otherwise.
    pub tokens: (usize, usize),
    /// Batch norms normalise with their running statistics and leave them as they are,
    /// in training too (the recipe's `freeze_bn`).
    pub freeze_bn: bool,
}

impl Ctx<'_> {
    /// Whether to use the fused operations ([`crate::kernels`]), in training and inference
    /// alike. `FERROTUNE_NO_FUSED=1` turns them off (see [`fused::enabled`]): the model
    /// then runs the composition of candle operations they are tested against.
    pub fn fused(&self) -> bool {
        fused::enabled()
    }

    /// An inference context: no dropout, nothing tracked for gradients.
    pub fn eval() -> Ctx<'static> {
        Ctx {
            train: false,
            frozen: &[],
            rng: None,
            int8: false,
            bf16: false,
            row0: 0,
            tokens: (0, 0),
            freeze_bn: false,
        }
    }

    /// An inference context whose linear layers run in int8.
    pub fn eval_int8() -> Ctx<'static> {
        Ctx {
            int8: true,
            ..Ctx::eval()
        }
    }

    /// An inference context whose linear layers run in bf16.
    pub fn eval_bf16() -> Ctx<'static> {
        Ctx {
            bf16: true,
            ..Ctx::eval()
        }
    }

    /// An inference context for `precision` (f32 unless int8 or bf16).
    pub fn eval_with(precision: crate::precision::Precision) -> Ctx<'static> {
        use crate::precision::Precision;
        match precision {
            Precision::Int8 => Ctx::eval_int8(),
            Precision::Bf16 => Ctx::eval_bf16(),
            _ => Ctx::eval(),
        }
    }

    /// True when linear layers run in int8 or bf16 (inference).
    pub fn low_precision(&self) -> bool {
        !self.train && (self.int8 || self.bf16)
    }

    /// The value of parameter `v` of group `group` for this pass: tracked for gradients
    /// when training and the group is not frozen, detached otherwise.
    pub fn w(&self, v: &Var, group: usize) -> Tensor {
        if !self.train || self.frozen.get(group).copied().unwrap_or(false) {
            v.as_tensor().detach()
        } else {
            v.as_tensor().clone()
        }
    }

    /// Inverted dropout with probability `p`; its mask is seeded from the context's
    /// generator ([`fused::dropout`]).
    pub fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        match self.dropout_seed(p) {
            Some(d) => fused::dropout(x, d),
            None => Ok(x.clone()),
        }
    }

    /// A dropout with probability `p` (its seed one draw from the context's generator),
    /// or `None` when there is no dropout (inference, or `p = 0`).
    pub fn dropout_seed(&mut self, p: f64) -> Option<fused::Dropout> {
        if !self.train || p <= 0.0 {
            return None;
        }
        let rng = self.rng.as_deref_mut()?;
        Some(fused::Dropout {
            p: p as f32,
            seed: rng.random::<u64>(),
            row0: self.row0,
            tokens: self.tokens,
        })
    }
}

//! An exponential moving average of the weights (timm's `ModelEmaV3`, the recipe's
//! `model_ema_decay`): after every optimizer step each parameter and buffer (batch-norm
//! statistics too) moves towards the model's, `ema ← decay·ema + (1 − decay)·w`. The first
//! update copies the weights (timm: decay 0 at step 1); with `model_ema_warmup` the decay
//! at update `t` is `min(decay, 1 − (1 + t − 1)^(−2/3))`.

use candle_core::Tensor;

use crate::error::Result;
use crate::kernels::par::with_f32;
use crate::nn::ParamStore;

/// The average, one f32 vector per parameter and buffer ([`ParamStore::state`] order).
pub struct Ema {
    decay: f64,
    warmup: bool,
    /// The averaged values.
    pub values: Vec<Vec<f32>>,
    /// Updates so far.
    pub updates: u64,
}

impl Ema {
    /// A new average of `decay` (it starts as a copy of the weights at the first update).
    pub fn new(decay: f64, warmup: bool) -> Ema {
        Ema {
            decay,
            warmup,
            values: Vec::new(),
            updates: 0,
        }
    }

    /// The decay of update `t` (1-based), as timm's `ModelEmaV3.get_decay(step = t)`.
    pub fn decay_at(&self, t: u64) -> f64 {
        let s = t.saturating_sub(1);
        if s == 0 {
            return 0.0;
        }
        if self.warmup {
            let d = 1.0 - (1.0 + s as f64).powf(-2.0 / 3.0);
            d.min(self.decay).max(0.0)
        } else {
            self.decay
        }
    }

    /// One update towards the weights of `params`, after an optimizer step.
    pub fn update(&mut self, params: &ParamStore) -> Result<()> {
        self.updates += 1;
        let d = self.decay_at(self.updates) as f32;
        if self.values.len() != params.state_len() {
            self.values = vec![Vec::new(); params.state_len()];
        }
        for (avg, p) in self.values.iter_mut().zip(params.state()) {
            with_f32(p.var.as_tensor(), |w| {
                if avg.len() != w.len() || d == 0.0 {
                    avg.clear();
                    avg.extend_from_slice(w);
                } else {
                    let k = 1.0 - d;
                    for (a, &x) in avg.iter_mut().zip(w) {
                        *a = d * *a + k * x;
                    }
                }
            })?;
        }
        Ok(())
    }

    /// The average as tensors shaped as `params`' (for [`ParamStore::restore`] and
    /// checkpoints); `None` before the first update.
    pub fn tensors(&self, params: &ParamStore) -> Result<Option<Vec<Tensor>>> {
        if self.values.is_empty() {
            return Ok(None);
        }
        params
            .state()
            .zip(&self.values)
            .map(|(p, v)| {
                let t = p.var.as_tensor();
                Ok(Tensor::from_slice(v, t.shape(), t.device())?)
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Restores the average from a checkpoint's tensors (`updates` so far).
    pub fn restore(&mut self, tensors: &[Tensor], updates: u64) -> Result<()> {
        self.values = tensors
            .iter()
            .map(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
            .collect::<Result<_>>()?;
        self.updates = updates;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{Builder, GroupKind, Init, Weights};
    use candle_core::Device;

    /// The decays follow timm's `get_decay`, and the average follows the formula.
    #[test]
    fn follows_timms_formula() {
        let e = Ema::new(0.999, false);
        assert_eq!(e.decay_at(1), 0.0);
        assert_eq!(e.decay_at(2), 0.999);
        let w = Ema::new(0.999, true);
        // step 2: s = 1 → 1 − 2^(−2/3)
        assert!((w.decay_at(2) - (1.0 - 2f64.powf(-2.0 / 3.0))).abs() < 1e-12);
        assert_eq!(w.decay_at(10_000_000), 0.999);

        let mut b = Builder::new(&Weights::Random, "", "x", 0.02, 0, &Device::Cpu);
        let g = b.group(GroupKind::Head);
        let v = b.need("w", &[3], g, Init::Zeros, false).unwrap();
        let params = b.finish();
        let mut e = Ema::new(0.5, false);
        v.set(&Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap())
            .unwrap();
        e.update(&params).unwrap();
        assert_eq!(e.values[0], [1.0, 2.0, 3.0]);
        v.set(&Tensor::new(&[3f32, 2.0, 1.0], &Device::Cpu).unwrap())
            .unwrap();
        e.update(&params).unwrap();
        assert_eq!(e.values[0], [2.0, 2.0, 2.0]);
        let t = e.tensors(&params).unwrap().unwrap();
        assert_eq!(t[0].to_vec1::<f32>().unwrap(), [2.0, 2.0, 2.0]);
        let mut r = Ema::new(0.5, false);
        r.restore(&t, 2).unwrap();
        assert_eq!((r.values.clone(), r.updates), (e.values.clone(), 2));
    }
}

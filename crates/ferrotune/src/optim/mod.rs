//! AdamW with decoupled weight decay, over flat buffers, and global-norm gradient clipping.
//!
//! The update is PyTorch's `torch.optim.AdamW` (what the transformers `Trainer` uses), per
//! parameter with its own step count `t`:
//!
//! ```text
//! θ ← θ − lr·λ·θ                      (decoupled weight decay; λ = 0 for biases, LayerNorm)
//! m ← β₁ m + (1 − β₁) g
//! v ← β₂ v + (1 − β₂) g²
//! θ ← θ − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε)
//! ```
//!
//! Done as one loop per tensor, in place on the parameter's storage and split over
//! candle's thread pool, rather than a dozen tensor operations each (candle's own AdamW),
//! which allocates and passes over memory once per operation.
//! Frozen parameters (no gradient) get no state at all.
//!
//! [`schedule`] holds the learning-rate schedules.

pub mod schedule;

use std::collections::HashMap;

use candle_core::Tensor;

use crate::error::Result;
use crate::kernels::par::{par_for, Out, PAR_MIN};
use crate::kernels::simd;
use crate::nn::ParamStore;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
}

struct State {
    m: Vec<f32>,
    v: Vec<f32>,
    t: u64,
}

/// AdamW state for every parameter of a [`ParamStore`].
pub struct AdamW {
    cfg: AdamWConfig,
    state: Vec<Option<State>>,
}

/// The global L2 norm of `grads` (None: frozen, skipped), as `torch.nn.utils.clip_grad_norm_`
/// measures it before clipping. Sums of squares in f64 over fixed chunks, added in order:
/// the same on any thread count.
pub fn grad_norm(grads: &[Option<Vec<f32>>]) -> f64 {
    let sq: f64 = grads
        .iter()
        .flatten()
        .map(|g| {
            let parts = g.len().div_ceil(CHUNK);
            let mut sums = vec![0f64; parts];
            let o = OutF64(sums.as_mut_ptr());
            par_for(parts, g.len() >= PAR_MIN, |i| {
                let s = simd::sum_squares(&g[i * CHUNK..((i + 1) * CHUNK).min(g.len())]);
                // Safety: chunk i alone writes sums[i].
                unsafe { *o.get().add(i) = s };
            });
            sums.iter().sum::<f64>()
        })
        .sum();
    sq.sqrt()
}

/// The factor `torch.nn.utils.clip_grad_norm_` scales the gradients by so that their
/// global norm is at most `max_norm`: `max_norm / (norm + 1e-6)` when that is below 1,
/// else 1 (and 1 when `max_norm` is 0: clipping disabled). The optimizers take it as
/// their `grad_scale`, so clipping costs no pass of its own over the gradients.
pub fn clip_factor(norm: f64, max_norm: f64) -> f32 {
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            return coef as f32;
        }
    }
    1.0
}

/// Elements per task of the optimizer's and the clipping's parallel loops.
const CHUNK: usize = 1 << 14;

#[derive(Clone, Copy)]
struct OutF64(*mut f64);
// Safety: tasks write disjoint elements (see the callers).
unsafe impl Send for OutF64 {}
unsafe impl Sync for OutF64 {}
impl OutF64 {
    fn get(self) -> *mut f64 {
        self.0
    }
}

/// One AdamW update of a parameter's data in place (no copy of the weights in or out),
/// in parallel over chunks.
struct AdamWUpdate<'a> {
    g: &'a [f32],
    m: Out,
    v: Out,
    k: AdamWStep,
}

/// The constants of one parameter's update.
#[derive(Clone, Copy)]
struct AdamWStep {
    /// Multiplies each gradient first (gradient clipping).
    grad_scale: f32,
    decay: f32,
    b1: f32,
    b2: f32,
    step_size: f32,
    inv_bc2: f32,
    eps: f32,
}

simd::dispatch! {
    /// The update of one chunk: the formula of the module docs, element by element.
    fn adamw_chunk(w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], k: AdamWStep) {
        for (((w, m), v), &g) in w.iter_mut().zip(m).zip(v).zip(g) {
            let g = g * k.grad_scale;
            *w *= k.decay;
            *m = k.b1 * *m + (1.0 - k.b1) * g;
            *v = k.b2 * *v + (1.0 - k.b2) * g * g;
            let denom = v.sqrt() * k.inv_bc2 + k.eps;
            *w -= k.step_size * *m / denom;
        }
    }
}

impl candle_core::InplaceOp1 for AdamWUpdate<'_> {
    fn name(&self) -> &'static str {
        "ferrotune-adamw"
    }

    fn cpu_fwd(
        &self,
        s: &mut candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let data = match s {
            candle_core::CpuStorage::F32(d) => d,
            _ => candle_core::bail!("AdamW on a non-f32 parameter"),
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("AdamW on a non-contiguous parameter")
        };
        let w = &mut data[a..b];
        if w.len() != self.g.len() {
            candle_core::bail!("AdamW: {} weights, {} gradients", w.len(), self.g.len());
        }
        let n = w.len();
        let wo = Out::new(w);
        par_for(n.div_ceil(CHUNK), n >= PAR_MIN, |i| {
            let (a, len) = (i * CHUNK, CHUNK.min(n - i * CHUNK));
            // Safety: chunk i of w, m and v is written by this task only.
            let (w, m, v) = unsafe { (wo.part(a, len), self.m.part(a, len), self.v.part(a, len)) };
            adamw_chunk(w, m, v, &self.g[a..a + len], self.k);
        });
        Ok(())
    }
}

impl AdamW {
    /// New optimizer state for `n` parameters.
    pub fn new(cfg: AdamWConfig, n: usize) -> Self {
        AdamW {
            cfg,
            state: (0..n).map(|_| None).collect(),
        }
    }

    /// One update. `grads[i]` is the flattened gradient of parameter `i` (None: frozen or
    /// unused, left untouched), multiplied by `grad_scale` as it is read ([`clip_factor`];
    /// 1 leaves it as it is); `lrs[i]` is its learning rate for this step.
    pub fn step(
        &mut self,
        params: &ParamStore,
        grads: &[Option<Vec<f32>>],
        grad_scale: f32,
        lrs: &[f64],
    ) -> Result<()> {
        let c = self.cfg;
        for (i, p) in params.params.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let n = p.var.as_tensor().elem_count();
            let st = self.state[i].get_or_insert_with(|| State {
                m: vec![0.0; n],
                v: vec![0.0; n],
                t: 0,
            });
            st.t += 1;
            let lr = lrs[i];
            let wd = if p.no_decay { 0.0 } else { c.weight_decay };
            let bc1 = 1.0 - c.beta1.powi(st.t as i32);
            let bc2_sqrt = (1.0 - c.beta2.powi(st.t as i32)).sqrt();
            let update = AdamWUpdate {
                g,
                m: Out::new(&mut st.m),
                v: Out::new(&mut st.v),
                k: AdamWStep {
                    grad_scale,
                    decay: (1.0 - lr * wd) as f32,
                    b1: c.beta1 as f32,
                    b2: c.beta2 as f32,
                    step_size: (lr / bc1) as f32,
                    inv_bc2: (1.0 / bc2_sqrt) as f32,
                    eps: c.eps as f32,
                },
            };
            p.var.as_tensor().inplace_op1(&update)?;
        }
        Ok(())
    }
}

/// SGD as `torch.optim.SGD` (dampening 0):
///
/// ```text
/// g ← g + λ·θ                         (weight decay as L2; λ = 0 for biases, LayerNorm)
/// b ← μ·b + g   (b = g on the first step)
/// g ← g + μ·b   (Nesterov)   or   g ← b
/// θ ← θ − lr·g
/// ```
pub struct Sgd {
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
    buf: Vec<Option<Vec<f32>>>,
}

impl Sgd {
    /// New optimizer state for `n` parameters.
    pub fn new(momentum: f64, nesterov: bool, weight_decay: f64, n: usize) -> Self {
        Sgd {
            momentum,
            nesterov,
            weight_decay,
            buf: (0..n).map(|_| None).collect(),
        }
    }

    /// One update (see [`AdamW::step`] for the arguments).
    pub fn step(
        &mut self,
        params: &ParamStore,
        grads: &[Option<Vec<f32>>],
        grad_scale: f32,
        lrs: &[f64],
    ) -> Result<()> {
        let mu = self.momentum as f32;
        for (i, p) in params.params.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let t = p.var.as_tensor();
            let mut w = t.flatten_all()?.to_vec1::<f32>()?;
            let wd = if p.no_decay {
                0.0
            } else {
                self.weight_decay as f32
            };
            let lr = lrs[i] as f32;
            let mut d: Vec<f32> = g
                .iter()
                .zip(&w)
                .map(|(&g, &w)| g * grad_scale + wd * w)
                .collect();
            if mu != 0.0 {
                let buf = match &mut self.buf[i] {
                    Some(b) => {
                        b.iter_mut().zip(&d).for_each(|(b, &d)| *b = mu * *b + d);
                        b
                    }
                    slot @ None => slot.insert(d.clone()),
                };
                if self.nesterov {
                    d.iter_mut()
                        .zip(buf.iter())
                        .for_each(|(d, &b)| *d += mu * b);
                } else {
                    d.copy_from_slice(buf);
                }
            }
            w.iter_mut().zip(&d).for_each(|(w, &d)| *w -= lr * d);
            p.var.set(&Tensor::from_vec(w, t.shape(), t.device())?)?;
        }
        Ok(())
    }
}

/// Optimizer state for a checkpoint: tensors by name, and per-parameter step counts.
/// An optimizer's state for a checkpoint: its vectors by name (borrowed) and the
/// per-parameter step counts.
pub type OptimizerState<'a> = (Vec<(String, &'a [f32])>, Vec<Option<u64>>);

/// The optimizer of a run.
pub enum Optimizer {
    /// AdamW.
    AdamW(AdamW),
    /// SGD.
    Sgd(Sgd),
}

impl Optimizer {
    /// One update (see [`AdamW::step`] for the arguments).
    pub fn step(
        &mut self,
        params: &ParamStore,
        grads: &[Option<Vec<f32>>],
        grad_scale: f32,
        lrs: &[f64],
    ) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.step(params, grads, grad_scale, lrs),
            Optimizer::Sgd(o) => o.step(params, grads, grad_scale, lrs),
        }
    }

    /// The state, borrowed (`m.<i>`, `v.<i>` for AdamW, `buf.<i>` for SGD, each a 1-D
    /// vector), and the per-parameter step counts (`None`: no state yet), for checkpoints.
    pub fn export_state(&self) -> OptimizerState<'_> {
        let mut out = Vec::new();
        let mut steps = Vec::new();
        match self {
            Optimizer::AdamW(o) => {
                for (i, st) in o.state.iter().enumerate() {
                    steps.push(st.as_ref().map(|s| s.t));
                    if let Some(s) = st {
                        out.push((format!("m.{i}"), s.m.as_slice()));
                        out.push((format!("v.{i}"), s.v.as_slice()));
                    }
                }
            }
            Optimizer::Sgd(o) => {
                for (i, b) in o.buf.iter().enumerate() {
                    steps.push(b.as_ref().map(|_| 0));
                    if let Some(b) = b {
                        out.push((format!("buf.{i}"), b.as_slice()));
                    }
                }
            }
        }
        (out, steps)
    }

    /// Restores a state written by [`Optimizer::export_state`].
    pub fn import_state(
        &mut self,
        map: &HashMap<String, Tensor>,
        steps: &[Option<u64>],
    ) -> Result<()> {
        let get = |name: String| -> Result<Vec<f32>> {
            map.get(&name)
                .ok_or_else(|| {
                    crate::error::Error::Msg(format!(
                        "checkpoint: optimizer tensor `{name}` missing"
                    ))
                })?
                .to_vec1::<f32>()
                .map_err(Into::into)
        };
        match self {
            Optimizer::AdamW(o) => {
                for (i, t) in steps.iter().enumerate().take(o.state.len()) {
                    o.state[i] = match t {
                        Some(t) => Some(State {
                            m: get(format!("m.{i}"))?,
                            v: get(format!("v.{i}"))?,
                            t: *t,
                        }),
                        None => None,
                    };
                }
            }
            Optimizer::Sgd(o) => {
                for (i, t) in steps.iter().enumerate().take(o.buf.len()) {
                    o.buf[i] = match t {
                        Some(_) => Some(get(format!("buf.{i}"))?),
                        None => None,
                    };
                }
            }
        }
        Ok(())
    }

    /// Number of parameters holding optimizer state (frozen ones hold none).
    pub fn state_count(&self) -> usize {
        match self {
            Optimizer::AdamW(o) => o.state.iter().filter(|s| s.is_some()).count(),
            Optimizer::Sgd(o) => o.buf.iter().filter(|s| s.is_some()).count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Param;
    use candle_core::{Device, Var};

    /// A store holding one parameter `w` (decayed) with these values, and its variable.
    fn one_param(w: Vec<f32>) -> (Var, ParamStore) {
        let n = w.len();
        let var = Var::from_vec(w, n, &Device::Cpu).unwrap();
        let mut store = ParamStore::default();
        store.params.push(Param {
            name: "w".into(),
            var: var.clone(),
            group: 0,
            no_decay: false,
        });
        (var, store)
    }

    /// PyTorch's AdamW defaults, with weight decay 0.01.
    const ADAMW: AdamWConfig = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };

    #[test]
    fn matches_the_adamw_formula_for_two_steps() {
        let (var, store) = one_param(vec![1.0, -2.0]);
        let mut opt = AdamW::new(ADAMW, 1);
        let g1 = vec![0.5f32, -1.0];
        let g2 = vec![0.1f32, 0.2];
        opt.step(&store, &[Some(g1.clone())], 1.0, &[0.1]).unwrap();
        opt.step(&store, &[Some(g2.clone())], 1.0, &[0.1]).unwrap();
        // Reference computed in f64 by the formula in the module docs.
        let mut w = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for (t, g) in [(1, &g1), (2, &g2)] {
            for i in 0..2 {
                let gi = g[i] as f64;
                w[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.999 * v[i] + 0.001 * gi * gi;
                let bc1 = 1.0 - 0.9f64.powi(t);
                let bc2 = 1.0 - 0.999f64.powi(t);
                w[i] -= 0.1 / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + 1e-8);
            }
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            // f32 arithmetic (as PyTorch) against an f64 reference.
            assert!((got[i] as f64 - w[i]).abs() < 5e-6, "{got:?} vs {w:?}");
        }
    }

    #[test]
    fn clipping_factor_follows_torch() {
        let g = vec![Some(vec![3.0f32, 4.0]), None];
        let n = grad_norm(&g);
        assert!((n - 5.0).abs() < 1e-9);
        assert!((clip_factor(n, 1.0) as f64 - 1.0 / (5.0 + 1e-6)).abs() < 1e-7);
        assert_eq!(clip_factor(n, 10.0), 1.0);
        assert_eq!(clip_factor(n, 0.0), 1.0, "max_norm 0 disables clipping");
        // Long, odd-sized buffers (several parallel chunks, vector lanes and a remainder)
        // against a plain f64 sum.
        let a: Vec<f32> = (0..100_003)
            .map(|i| ((i * 37) % 101) as f32 * 0.01 - 0.5)
            .collect();
        let b: Vec<f32> = (0..17).map(|i| i as f32).collect();
        let want = a
            .iter()
            .chain(&b)
            .map(|&x| x as f64 * x as f64)
            .sum::<f64>()
            .sqrt();
        let got = grad_norm(&[Some(a), None, Some(b)]);
        assert!((got - want).abs() < 1e-12 * want, "{got} vs {want}");
    }

    /// `grad_scale` gives exactly (bit for bit) the update of gradients scaled beforehand.
    #[test]
    fn gradient_scale_equals_scaling_the_gradients_first() {
        let n = 70_001; // several parallel chunks and a remainder
        let w0: Vec<f32> = (0..n)
            .map(|i| ((i * 13) % 97) as f32 * 0.02 - 1.0)
            .collect();
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 29) % 89) as f32 * 0.03 - 1.3)
            .collect();
        let c = 0.37f32;
        let scaled: Vec<f32> = g.iter().map(|&x| x * c).collect();
        for sgd in [false, true] {
            let run = |grads: &[f32], scale: f32| {
                let (var, store) = one_param(w0.clone());
                let mut opt = if sgd {
                    Optimizer::Sgd(Sgd::new(0.9, true, 0.01, 1))
                } else {
                    Optimizer::AdamW(AdamW::new(ADAMW, 1))
                };
                for _ in 0..2 {
                    opt.step(&store, &[Some(grads.to_vec())], scale, &[0.01])
                        .unwrap();
                }
                var.as_tensor().to_vec1::<f32>().unwrap()
            };
            let (a, b) = (run(&g, c), run(&scaled, 1.0));
            assert!(a != w0, "the weights moved");
            assert!(
                a == b,
                "sgd={sgd}: scaled while read differs from scaled first"
            );
        }
    }

    #[test]
    fn sgd_momentum_and_nesterov_follow_torch() {
        // torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=..., weight_decay=0.01),
        // two steps with gradients g1 then g2, written out by hand.
        for nesterov in [false, true] {
            let (var, store) = one_param(vec![1.0, -2.0]);
            let mut opt = Sgd::new(0.9, nesterov, 0.01, 1);
            let (g1, g2) = ([0.5f64, -1.0], [0.1f64, 0.2]);
            opt.step(&store, &[Some(g1.map(|x| x as f32).to_vec())], 1.0, &[0.1])
                .unwrap();
            opt.step(&store, &[Some(g2.map(|x| x as f32).to_vec())], 1.0, &[0.1])
                .unwrap();
            let mut w = [1.0f64, -2.0];
            let mut b = [0.0f64; 2];
            for (t, g) in [(0, g1), (1, g2)] {
                for i in 0..2 {
                    let d = g[i] + 0.01 * w[i];
                    b[i] = if t == 0 { d } else { 0.9 * b[i] + d };
                    let d = if nesterov { d + 0.9 * b[i] } else { b[i] };
                    w[i] -= 0.1 * d;
                }
            }
            let got = var.as_tensor().to_vec1::<f32>().unwrap();
            for i in 0..2 {
                assert!((got[i] as f64 - w[i]).abs() < 1e-6, "{got:?} vs {w:?}");
            }
        }
    }
}

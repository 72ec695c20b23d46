//! One training step's arithmetic: forward, loss and backward on a batch with the
//! gradients written into buffers kept from step to step, and the L1/L2 penalties'
//! gradients. The loop around it is [`crate::train::trainer`].

use candle_core::Tensor;

use crate::error::Result;
use crate::families::Model;
use crate::kernels::grad_sink::GradSink;
use crate::loss::{compute, lm_head_loss, LossConfig, LossKind, Targets};
use crate::nn::{Batch, Ctx, Param, ParamStore};

/// Forward, loss and backward on one batch in training context `ctx` (its frozen groups
/// and dropout generator), the loss multiplied by `scale` (for gradient accumulation).
/// Returns the unscaled loss and, for each parameter, its flattened gradient (`None` for a
/// frozen parameter, which gets none).
pub fn loss_and_grads(
    model: &dyn Model,
    params: &ParamStore,
    batch: &Batch,
    targets: &Targets,
    loss_cfg: &LossConfig,
    scale: f64,
    ctx: Ctx,
) -> Result<(f32, Vec<Option<Vec<f32>>>)> {
    let mut out = vec![None; params.params.len()];
    let loss = loss_and_grads_into(
        model, params, batch, targets, loss_cfg, scale, ctx, &mut out, false,
    )?;
    Ok((loss, out))
}

/// [`loss_and_grads`] into the buffers of `out`: each gradient overwrites (`add` false) or
/// is added to (`add` true, for accumulation) the buffer already there, so a training loop
/// that keeps `out` from step to step allocates no gradient memory (a fresh 90 MB of
/// gradients per MiniLM step cost page faults and a single-threaded copy). The fused
/// linear layers and embeddings write their weights' gradients into the buffers directly
/// ([`GradSink`]); the rest are copied from candle's store in parallel. A parameter
/// without a gradient is set to `None` when not adding, left alone when adding.
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grads_into(
    model: &dyn Model,
    params: &ParamStore,
    batch: &Batch,
    targets: &Targets,
    loss_cfg: &LossConfig,
    scale: f64,
    mut ctx: Ctx,
    out: &mut [Option<Vec<f32>>],
    add: bool,
) -> Result<f32> {
    let frozen = ctx.frozen;
    let is_frozen = |p: &Param| frozen.get(p.group).copied().unwrap_or(false);
    // The fused layers write weight gradients straight into the buffers (see
    // `kernels::grad_sink`); candle's store has the others.
    let tensors: Vec<Option<&Tensor>> = params
        .params
        .iter()
        .map(|p| (!is_frozen(p)).then(|| p.var.as_tensor()))
        .collect();
    let bufs = out.iter_mut().map(std::mem::take).collect();
    let sink = GradSink::new(&tensors, bufs, add);
    let (r, sink) = sink.run(|| -> Result<_> {
        // A causal-LM target scores the language-model head at every position: fused
        // with the loss when the model's head is a plain `h · Wᵀ`.
        let loss = match targets {
            Targets::Tokens(labels) if loss_cfg.kind == LossKind::CrossEntropy => {
                match model.lm_head_parts(&mut ctx, batch)? {
                    Some((h, w)) => lm_head_loss(&h, &w, labels)?,
                    None => compute(loss_cfg, &model.lm_logits(&mut ctx, batch)?, targets)?,
                }
            }
            Targets::Tokens(_) => compute(loss_cfg, &model.lm_logits(&mut ctx, batch)?, targets)?,
            _ => compute(loss_cfg, &model.forward(&mut ctx, batch)?, targets)?,
        };
        let grads = (&loss * scale)?.backward()?;
        Ok((loss, grads))
    });
    let (bufs, wrote) = sink.into_parts();
    for (slot, b) in out.iter_mut().zip(bufs) {
        *slot = b;
    }
    let (loss, grads) = r?;
    for ((p, slot), wrote) in params.params.iter().zip(out.iter_mut()).zip(wrote) {
        let g = if is_frozen(p) {
            None
        } else {
            grads.get(p.var.as_tensor())
        };
        // Added to what the sink wrote this pass, if anything.
        let add = add || wrote;
        match g {
            Some(g) => {
                let g = g.flatten_all()?.contiguous()?;
                let (st, layout) = g.storage_and_layout();
                let src = match (&*st, layout.contiguous_offsets()) {
                    (candle_core::Storage::Cpu(cs), Some((a, b))) => &cs.as_slice::<f32>()?[a..b],
                    _ => {
                        drop(st);
                        let v = g.to_vec1::<f32>()?;
                        merge_grad(slot, &v, add);
                        continue;
                    }
                };
                merge_grad(slot, src, add);
            }
            None if !add => *slot = None,
            None => {}
        }
    }
    Ok(loss.to_scalar::<f32>()?)
}

/// `slot ← src` (or `slot += src` when `add` and there is a buffer), reusing the buffer when
/// it has the right size; the copy or sum is split over candle's thread pool.
fn merge_grad(slot: &mut Option<Vec<f32>>, src: &[f32], add: bool) {
    use crate::kernels::par::{par_for, Out, PAR_MIN};
    const CHUNK: usize = 1 << 15;
    match slot {
        Some(buf) if buf.len() == src.len() => {
            let n = buf.len();
            let o = Out::new(buf);
            par_for(n.div_ceil(CHUNK), n >= PAR_MIN, |i| {
                // Safety: chunk i of the buffer is written by this task only.
                let dst = unsafe { o.part(i * CHUNK, CHUNK) };
                let s = &src[i * CHUNK..i * CHUNK + dst.len()];
                if add {
                    dst.iter_mut().zip(s).for_each(|(d, s)| *d += s);
                } else {
                    dst.copy_from_slice(s);
                }
            });
        }
        _ => *slot = Some(src.to_vec()),
    }
}

/// Adds the gradient of `l1·Σ|w| + l2·Σw²` over the trainable weights (not biases or
/// LayerNorm weights) to `grads`, and returns the penalty's value.
pub fn add_penalties(
    params: &ParamStore,
    grads: &mut [Option<Vec<f32>>],
    l1: f64,
    l2: f64,
) -> Result<f64> {
    if l1 == 0.0 && l2 == 0.0 {
        return Ok(0.0);
    }
    let mut value = 0.0;
    for (p, g) in params.params.iter().zip(grads.iter_mut()) {
        let Some(g) = g else { continue };
        if p.no_decay {
            continue;
        }
        let w = p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        for (g, &w) in g.iter_mut().zip(&w) {
            value += l1 * (w as f64).abs() + l2 * (w as f64) * (w as f64);
            let sign = if w > 0.0 {
                1.0
            } else if w < 0.0 {
                -1.0
            } else {
                0.0
            };
            *g += (l1 * sign + 2.0 * l2 * w as f64) as f32;
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn penalty_gradients_equal_autodiff_of_the_penalties() {
        let w = Var::from_vec(vec![0.5f32, -2.0, 0.0, 1.5], (2, 2), &Device::Cpu).unwrap();
        let b = Var::from_vec(vec![3.0f32, -1.0], 2, &Device::Cpu).unwrap();
        let mut store = ParamStore::default();
        for (name, var, no_decay) in [("w", &w, false), ("b.bias", &b, true)] {
            store.params.push(Param {
                name: name.into(),
                var: var.clone(),
                group: 0,
                no_decay,
            });
        }
        let (l1, l2) = (0.3, 0.7);
        let mut grads = vec![Some(vec![0f32; 4]), Some(vec![0f32; 2])];
        let value = add_penalties(&store, &mut grads, l1, l2).unwrap();
        let ws = [w.as_tensor().clone()];
        let p = ((crate::loss::l1_penalty(&ws).unwrap() * l1).unwrap()
            + (crate::loss::l2_penalty(&ws).unwrap() * l2).unwrap())
        .unwrap();
        assert!((p.to_scalar::<f32>().unwrap() as f64 - value).abs() < 1e-5);
        let g = p.backward().unwrap();
        let auto = g
            .get(w.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in auto.iter().zip(grads[0].as_ref().unwrap()) {
            assert!((a - b).abs() < 1e-6, "{auto:?} vs {grads:?}");
        }
        // Biases and LayerNorm weights carry no penalty.
        assert_eq!(grads[1].as_ref().unwrap(), &vec![0f32; 2]);
    }
}

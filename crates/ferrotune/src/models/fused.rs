//! Fused operations with a forward AND a backward pass, as candle custom ops (issue 4).
//!
//! Composed of candle's element-wise operations, a layer norm is about ten passes over its
//! input forward and twenty backward, each allocating a tensor and running on one thread;
//! the exact GELU is three passes forward and six backward. Here each is one multi-threaded
//! pass forward (rows or chunks split over candle's thread pool, so `--threads` holds) and one
//! backward, recomputing the few statistics it needs instead of storing them.
//!
//! candle's own fast `layer_norm` has no backward and silently cuts the graph (see
//! `../shared/DESIGN.md`); these do have one, and `tests` check both passes against the
//! composed reference on odd shapes. They run on contiguous f32 CPU tensors; anything else
//! (another dtype or device) takes the composed path, so results never depend on whether a
//! fused op exists.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Storage, Tensor, D};

use crate::error::Result;

/// Whether the model uses the fused operations: yes, unless the environment sets
/// `FERROTUNE_NO_FUSED=1` (for benchmarks that compare the two paths, and for bisecting a
/// numerical difference). Read once.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FERROTUNE_NO_FUSED").is_none_or(|v| v != "1"))
}

/// Rows (or elements) below this are not worth a thread.
const PAR_MIN: usize = 1 << 14;

/// Runs `f(i)` for every `i` in `0..n`, on candle's own thread pool when `parallel` (the
/// pool its element-wise kernels use, sized by `--threads`). Not rayon's: candle's pinned
/// workers spin between operations, and a second pool beside them made inference slower.
fn par_for(n: usize, parallel: bool, f: impl Fn(usize) + Sync) {
    if parallel && n > 1 {
        candle_core::utils::barrier_pool().execute_chunked(n, |r| r.for_each(&f));
    } else {
        (0..n).for_each(f);
    }
}

/// A pointer into an output buffer that tasks of [`par_for`] write in disjoint parts.
#[derive(Clone, Copy)]
struct Out(*mut f32, usize);
// Safety: every task writes a part no other task touches (see `Out::part`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    fn new(v: &mut [f32]) -> Self {
        Out(v.as_mut_ptr(), v.len())
    }

    /// Elements `start..start + len` (clipped to the buffer).
    ///
    /// # Safety
    /// Each part must be taken by one task only, and the buffer must outlive the tasks.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, start: usize, len: usize) -> &mut [f32] {
        let end = (start + len).min(self.1);
        let start = start.min(end);
        std::slice::from_raw_parts_mut(self.0.add(start), end - start)
    }
}

/// Calls `f(i, input part i, output part i)` over parts of `chunk` elements, in parallel
/// when the input is large.
fn map_parts(
    src: &[f32],
    out: &mut [f32],
    chunk: usize,
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync,
) {
    debug_assert_eq!(src.len(), out.len());
    let parts = src.len().div_ceil(chunk);
    let o = Out::new(out);
    par_for(parts, src.len() >= PAR_MIN, |i| {
        let a = i * chunk;
        let b = (a + chunk).min(src.len());
        // Safety: part i is written by this task only; `out` outlives `par_for`.
        f(i, &src[a..b], unsafe { o.part(a, b - a) })
    });
}

/// The contiguous f32 data of a CPU storage under `layout`.
fn f32_data<'a>(s: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op on a non-contiguous tensor"),
    }
}

/// Runs `f` on the contiguous f32 data of CPU tensor `t` (copied to contiguous first if
/// it is not).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(cs) => Ok(f(f32_data(cs, l)?)),
        _ => candle_core::bail!("fused op on a non-CPU tensor"),
    }
}

fn fusable(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

// ---------------------------------------------------------------------------------------
// Layer norm

/// Layer norm over the last dimension: `(x - mean) / sqrt(var + eps) * g + b`, with the
/// biased variance, as `torch.nn.LayerNorm`. Differentiable in `x`, `g` and `b`.
pub fn layer_norm(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(&[x, g, b]) && g.rank() == 1 && b.dims() == g.dims() {
        let (x, g, b) = (x.contiguous()?, g.contiguous()?, b.contiguous()?);
        return Ok(x.apply_op3(&g, &b, LayerNormOp { eps: eps as f32 })?);
    }
    layer_norm_composed(x, g, b, eps)
}

/// The reference composition of [`layer_norm`] from candle's differentiable operations.
pub fn layer_norm_composed(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(g)?.broadcast_add(b)?)
}

struct LayerNormOp {
    eps: f32,
}

/// Mean and 1/sqrt(var + eps) of one row (two passes, in f32 as PyTorch's CPU kernel).
#[inline]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "ferrotune-layer-norm"
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
        let x = f32_data(s1, l1)?;
        let g = f32_data(s2, l2)?;
        let b = f32_data(s3, l3)?;
        let n = g.len();
        if n == 0 || l1.dims().last() != Some(&n) || b.len() != n {
            candle_core::bail!("layer norm: last dimension of x does not match the weights");
        }
        let mut y = vec![0f32; x.len()];
        // Parts of 16 rows.
        map_parts(x, &mut y, 16 * n, |_, xs, ys| {
            for (xr, yr) in xs.chunks(n).zip(ys.chunks_mut(n)) {
                let (mean, rstd) = row_stats(xr, self.eps);
                for i in 0..n {
                    yr[i] = (xr[i] - mean) * rstd * g[i] + b[i];
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = g.elem_count();
        let eps = self.eps;
        let (dx, dg, db) = with_f32(x, |x| {
            with_f32(g, |g| {
                with_f32(grad, |dy| {
                    let mut dx = vec![0f32; x.len()];
                    // Partial sums of dg and db over fixed blocks of rows, added in block
                    // order: the result does not depend on which thread takes a block, so
                    // runs stay bit-for-bit repeatable (and resumable) on any thread count.
                    const ROWS: usize = 32;
                    let blocks = x.len().div_ceil(ROWS * n);
                    // Block i's partial dg in partials[2i·n..], its partial db after it.
                    let mut partials = vec![0f32; blocks * 2 * n];
                    let (dxo, po) = (Out::new(&mut dx), Out::new(&mut partials));
                    par_for(blocks, x.len() >= PAR_MIN, |blk| {
                        let a = blk * ROWS * n;
                        let b = (a + ROWS * n).min(x.len());
                        // Safety: block `blk` alone writes these parts.
                        let dxs = unsafe { dxo.part(a, b - a) };
                        let acc = unsafe { po.part(blk * 2 * n, 2 * n) };
                        let (adg, adb) = acc.split_at_mut(n);
                        for ((xr, dyr), dxr) in x[a..b]
                            .chunks(n)
                            .zip(dy[a..b].chunks(n))
                            .zip(dxs.chunks_mut(n))
                        {
                            let (mean, rstd) = row_stats(xr, eps);
                            let (mut s1, mut s2) = (0f32, 0f32);
                            for i in 0..n {
                                let xhat = (xr[i] - mean) * rstd;
                                let dxhat = dyr[i] * g[i];
                                s1 += dxhat;
                                s2 += dxhat * xhat;
                                adg[i] += dyr[i] * xhat;
                                adb[i] += dyr[i];
                            }
                            let (m1, m2) = (s1 / n as f32, s2 / n as f32);
                            for i in 0..n {
                                let xhat = (xr[i] - mean) * rstd;
                                dxr[i] = rstd * (dyr[i] * g[i] - m1 - xhat * m2);
                            }
                        }
                    });
                    let (mut dg, mut db) = (vec![0f32; n], vec![0f32; n]);
                    for part in partials.chunks(2 * n) {
                        let (pg, pb) = part.split_at(n);
                        dg.iter_mut().zip(pg).for_each(|(a, b)| *a += b);
                        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
                    }
                    (dx, dg, db)
                })
            })
        })???;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dg, n, dev)?),
            Some(Tensor::from_vec(db, n, dev)?),
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Exact GELU

/// The exact GELU, `x · Φ(x) = x/2 · (1 + erf(x/√2))`, as `hidden_act = "gelu"` in
/// transformers (and candle's `gelu_erf`). Differentiable.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fusable(&[x]) {
        return Ok(x.contiguous()?.apply_op1(GeluErfOp)?);
    }
    Ok(x.gelu_erf()?)
}

struct GeluErfOp;

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// Applies `f` element-wise from `src` into a new vector, in parallel when large.
fn map_f32(src: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    map_parts(src, &mut out, 4096, |_, s, o| {
        for (o, &s) in o.iter_mut().zip(s) {
            *o = f(s);
        }
    });
    out
}

/// erf in f32 through candle's implementation (the one its `gelu_erf` uses), so the
/// fused and composed paths agree to the last bit in the forward pass.
#[inline]
fn erf(x: f32) -> f32 {
    candle_core::cpu::erf::erf_f32(x)
}

impl CustomOp1 for GeluErfOp {
    fn name(&self) -> &'static str {
        "ferrotune-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l)?;
        let y = map_f32(x, |v| (erf(v * FRAC_1_SQRT_2) + 1.0) * 0.5 * v);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // d/dx x·Φ(x) = Φ(x) + x·φ(x).
        let dx = with_f32(x, |x| {
            with_f32(grad, |dy| {
                let mut out = vec![0f32; x.len()];
                const CHUNK: usize = 4096;
                map_parts(x, &mut out, CHUNK, |i, xs, o| {
                    let dys = &dy[i * CHUNK..i * CHUNK + xs.len()];
                    for j in 0..o.len() {
                        let v = xs[j];
                        let cdf = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
                        let pdf = FRAC_1_SQRT_2PI * (-0.5 * v * v).exp();
                        o[j] = dys[j] * (cdf + v * pdf);
                    }
                });
                out
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

// ---------------------------------------------------------------------------------------
// Softmax

/// Softmax over the last dimension (the attention probabilities). Differentiable; the
/// backward pass is `y · (dy - Σ dy·y)` from the saved output, one pass.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fusable(&[x]) && x.rank() >= 1 && x.dim(D::Minus1)? > 0 {
        return Ok(x.contiguous()?.apply_op1(SoftmaxLastOp)?);
    }
    softmax_last_composed(x)
}

/// The reference composition of [`softmax_last`]. The row maximum is subtracted for
/// stability and detached: it does not change the result, so it needs no gradient.
pub fn softmax_last_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

struct SoftmaxLastOp;

impl CustomOp1 for SoftmaxLastOp {
    fn name(&self) -> &'static str {
        "ferrotune-softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l)?;
        let n = *l.dims().last().unwrap_or(&1);
        let mut y = vec![0f32; x.len()];
        let rows = (4096 / n).max(1);
        map_parts(x, &mut y, rows * n, |_, xs, ys| {
            for (xr, yr) in xs.chunks(n).zip(ys.chunks_mut(n)) {
                let max = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (y, &x) in yr.iter_mut().zip(xr) {
                    *y = (x - max).exp();
                    sum += *y;
                }
                let inv = 1.0 / sum;
                yr.iter_mut().for_each(|y| *y *= inv);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let n = res.dim(D::Minus1)?;
        let dx = with_f32(res, |y| {
            with_f32(grad, |dy| {
                let mut dx = vec![0f32; y.len()];
                let chunk = (4096 / n).max(1) * n;
                map_parts(y, &mut dx, chunk, |i, ys, dxs| {
                    let dys = &dy[i * chunk..i * chunk + ys.len()];
                    for ((yr, dyr), dxr) in ys.chunks(n).zip(dys.chunks(n)).zip(dxs.chunks_mut(n)) {
                        let dot: f32 = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
                        for k in 0..n {
                            dxr[k] = yr[k] * (dyr[k] - dot);
                        }
                    }
                });
                dx
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Gradients of `Σ y·w` (a non-trivial upstream gradient `w`).
    fn grads_of(y: Tensor, w: &Tensor) -> candle_core::backprop::GradStore {
        (y * w).unwrap().sum_all().unwrap().backward().unwrap()
    }

    /// Forward and every gradient of the fused layer norm equal the composition, on odd
    /// shapes, small and large enough to run on the thread pool.
    #[test]
    fn layer_norm_matches_the_composition() {
        for (k, shape) in [
            vec![1, 1],
            vec![3, 7],
            vec![5, 33],
            vec![2, 3, 17],
            vec![37, 384],
            vec![4, 129, 100],
        ]
        .into_iter()
        .enumerate()
        {
            let n = *shape.last().unwrap();
            let x = Var::from_tensor(&randn(&shape, k as u64)).unwrap();
            let g = Var::from_tensor(&randn(&[n], 100 + k as u64)).unwrap();
            let b = Var::from_tensor(&randn(&[n], 200 + k as u64)).unwrap();
            // A non-trivial upstream gradient.
            let w = randn(&shape, 300 + k as u64);
            let fused = layer_norm(&x, &g, &b, 1e-12).unwrap();
            let reference = layer_norm_composed(&x, &g, &b, 1e-12).unwrap();
            assert!(max_diff(&fused, &reference) < 1e-5, "{shape:?} forward");
            let gf = grads_of(fused, &w);
            let gr = grads_of(reference, &w);
            for (name, v) in [("x", &x), ("g", &g), ("b", &b)] {
                let (a, r) = (gf.get(v).unwrap(), gr.get(v).unwrap());
                let scale = r.abs().unwrap().max_keepdim(0).unwrap().max_all().unwrap();
                let tol = 2e-5 * scale.to_scalar::<f32>().unwrap().max(1.0);
                assert!(
                    max_diff(a, r) < tol,
                    "{shape:?} d{name}: {}",
                    max_diff(a, r)
                );
            }
        }
    }

    /// A constant row (variance 0) gives the bias and finite gradients, as the composition.
    #[test]
    fn layer_norm_of_a_constant_row() {
        let x = Var::from_tensor(&Tensor::ones((2, 8), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let g = Var::from_tensor(&randn(&[8], 1)).unwrap();
        let b = Var::from_tensor(&randn(&[8], 2)).unwrap();
        let y = layer_norm(&x, &g, &b, 1e-5).unwrap();
        assert!(max_diff(&y, &b.broadcast_as((2, 8)).unwrap()) < 1e-6);
        let gr = y.sum_all().unwrap().backward().unwrap();
        let dx = gr
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(dx.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn gelu_matches_candles_gelu_erf() {
        for (k, shape) in [vec![1], vec![7, 3], vec![3, 1537], vec![16, 128, 9]]
            .into_iter()
            .enumerate()
        {
            let x = Var::from_tensor(&randn(&shape, 10 + k as u64)).unwrap();
            let w = randn(&shape, 20 + k as u64);
            let fused = gelu_erf(&x).unwrap();
            let reference = x.gelu_erf().unwrap();
            assert!(max_diff(&fused, &reference) < 1e-6, "{shape:?} forward");
            let gf = grads_of(fused, &w);
            let gr = grads_of(reference, &w);
            let d = max_diff(gf.get(&x).unwrap(), gr.get(&x).unwrap());
            assert!(d < 1e-5, "{shape:?} backward: {d}");
        }
    }

    /// A non-contiguous input (a transpose) gives the same as its contiguous copy.
    #[test]
    fn non_contiguous_input() {
        let x = randn(&[6, 10], 5).t().unwrap();
        let g = randn(&[6], 6);
        let b = randn(&[6], 7);
        let a = layer_norm(&x, &g, &b, 1e-5).unwrap();
        let c = layer_norm(&x.contiguous().unwrap(), &g, &b, 1e-5).unwrap();
        assert!(max_diff(&a, &c) == 0.0);
        let a = gelu_erf(&x).unwrap();
        let c = gelu_erf(&x.contiguous().unwrap()).unwrap();
        assert!(max_diff(&a, &c) == 0.0);
    }

    /// Softmax forward and backward equal the composition, with the attention's additive
    /// padding mask (the most negative f32) on some positions.
    #[test]
    fn softmax_matches_the_composition_with_a_mask() {
        for (k, shape) in [
            vec![1, 1],
            vec![3, 7],
            vec![2, 3, 5, 13],
            vec![4, 12, 33, 33],
        ]
        .into_iter()
        .enumerate()
        {
            let n = *shape.last().unwrap();
            let mask: Vec<f32> = (0..n)
                .map(|i| if i > 0 && i % 4 == 0 { f32::MIN } else { 0.0 })
                .collect();
            let mask = Tensor::from_vec(mask, n, &Device::Cpu).unwrap();
            let x = Var::from_tensor(&randn(&shape, 40 + k as u64)).unwrap();
            let w = randn(&shape, 50 + k as u64);
            let scores = x.broadcast_add(&mask).unwrap();
            let fused = softmax_last(&scores).unwrap();
            let reference = softmax_last_composed(&scores).unwrap();
            assert!(max_diff(&fused, &reference) < 1e-6, "{shape:?} forward");
            let gf = grads_of(fused, &w);
            let gr = grads_of(reference, &w);
            let d = max_diff(gf.get(&x).unwrap(), gr.get(&x).unwrap());
            assert!(d < 1e-5, "{shape:?} backward: {d}");
        }
    }

    /// The layer norm's weight gradients are sums over rows, computed in parallel; they
    /// come out bit-identical on every run (fixed blocks, added in order), so runs repeat
    /// exactly and resume byte-identically.
    #[test]
    fn layer_norm_gradients_are_repeatable() {
        let grads = || {
            let x = Var::from_tensor(&randn(&[515, 96], 1)).unwrap();
            let g = Var::from_tensor(&randn(&[96], 2)).unwrap();
            let b = Var::from_tensor(&randn(&[96], 3)).unwrap();
            let w = randn(&[515, 96], 4);
            let y = layer_norm(&x, &g, &b, 1e-12).unwrap();
            let gr = grads_of(y, &w);
            [&x, &g, &b].map(|v| {
                gr.get(v)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
        };
        let first = grads();
        for _ in 0..5 {
            assert_eq!(first, grads());
        }
    }
}

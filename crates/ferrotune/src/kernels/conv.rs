//! The convolution, batch normalisation and pooling of image models, channels-last
//! (`(batch, height, width, channels)`), as candle custom ops with backward passes.
//!
//! Channels-last makes a 1×1 convolution a plain GEMM over `batch·height·width` rows (the
//! families call a matmul for it), a k×k convolution a GEMM over the rows [`im2col`] lays
//! out, and the depthwise convolution and batch norm loops run along contiguous channels,
//! which the compiler vectorises. The padding of each side is explicit, so TensorFlow's
//! "same" padding (more at the end) and PyTorch's symmetric padding are both
//! [`Padding`]s.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::par::{f32_data, filled, par_for, with_f32, Out, PAR_MIN};
use crate::error::Result;

/// Zero padding of a convolution or pooling window, per side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Padding {
    /// Rows above.
    pub top: usize,
    /// Rows below.
    pub bottom: usize,
    /// Columns left.
    pub left: usize,
    /// Columns right.
    pub right: usize,
}

impl Padding {
    /// PyTorch's `padding = p` on every side.
    pub fn symmetric(p: usize) -> Padding {
        Padding {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }

    /// TensorFlow's "SAME" padding for an input of `h × w`, a `k × k` window and `stride`:
    /// the output is `ceil(size / stride)`, the padding split with the odd one at the end.
    pub fn same(h: usize, w: usize, k: usize, stride: usize) -> Padding {
        let total = |n: usize| ((n.div_ceil(stride) - 1) * stride + k).saturating_sub(n);
        let (th, tw) = (total(h), total(w));
        Padding {
            top: th / 2,
            bottom: th - th / 2,
            left: tw / 2,
            right: tw - tw / 2,
        }
    }

    /// Output size of a window `k` with `stride` over `n` (plus this padding's `a + b`).
    fn out(n: usize, a: usize, b: usize, k: usize, stride: usize) -> usize {
        (n + a + b).saturating_sub(k) / stride + 1
    }
}

/// The geometry of one convolution: window, stride, padding and input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geom {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: Padding,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(dims: &[usize], kh: usize, kw: usize, stride: usize, pad: Padding) -> Result<Geom> {
        let &[b, h, w, c] = dims else {
            return Err(crate::error::Error::Msg(format!(
                "convolution: expected a (batch, height, width, channels) input, got {dims:?}"
            )));
        };
        if h + pad.top + pad.bottom < kh || w + pad.left + pad.right < kw || stride == 0 {
            return Err(crate::error::Error::Msg(format!(
                "convolution: a {kh}×{kw} window (stride {stride}) does not fit a {h}×{w} input"
            )));
        }
        Ok(Geom {
            b,
            h,
            w,
            c,
            kh,
            kw,
            stride,
            pad,
            ho: Padding::out(h, pad.top, pad.bottom, kh, stride),
            wo: Padding::out(w, pad.left, pad.right, kw, stride),
        })
    }

    /// The input row and column of output `(oy, ox)` under window tap `(ky, kx)`, if
    /// inside the image.
    #[inline]
    fn src(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let iy = (oy * self.stride + ky).checked_sub(self.pad.top)?;
        let ix = (ox * self.stride + kx).checked_sub(self.pad.left)?;
        (iy < self.h && ix < self.w).then_some((iy, ix))
    }

    /// Calls `f(d, xs, k)` for every output column of row `oy` of image `b` and every tap
    /// of its window inside the image: `d` the column's `c` outputs in `dst` (the row),
    /// `xs` the tap's `c` inputs in `x` (the batch), `k` as in [`Geom::taps`].
    #[inline(always)]
    fn row_taps(
        &self,
        x: &[f32],
        b: usize,
        oy: usize,
        dst: &mut [f32],
        mut f: impl FnMut(&mut [f32], &[f32], usize),
    ) {
        let img = &x[b * self.h * self.w * self.c..(b + 1) * self.h * self.w * self.c];
        for ox in 0..self.wo {
            let d = &mut dst[ox * self.c..(ox + 1) * self.c];
            self.taps(oy, ox, |t, k| f(&mut *d, &img[t..t + self.c], k));
        }
    }

    /// Calls `f(t, k)` for every tap of output `(oy, ox)`'s window that falls inside the
    /// image: `t` the input pixel's offset within its image (`(iy·w + ix)·c`), `k` the
    /// tap's (`(ky·kw + kx)·c`).
    #[inline(always)]
    fn taps(&self, oy: usize, ox: usize, mut f: impl FnMut(usize, usize)) {
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                if let Some((iy, ix)) = self.src(oy, ox, ky, kx) {
                    f((iy * self.w + ix) * self.c, (ky * self.kw + kx) * self.c);
                }
            }
        }
    }
}

/// The patches of a k×k convolution as rows: `(batch·out_h·out_w, kh·kw·channels)` from a
/// `(batch, h, w, channels)` input, zeros where the window hangs over the padding. A k×k
/// convolution is then this times the weight laid out `(out, kh, kw, in)`. Differentiable
/// (the backward adds each patch's gradient back into the image).
pub fn im2col(x: &Tensor, kh: usize, kw: usize, stride: usize, pad: Padding) -> Result<Tensor> {
    let g = Geom::new(x.dims(), kh, kw, stride, pad)?;
    Ok(x.contiguous()?.apply_op1(Im2Col(g))?)
}

/// The output size `(out_h, out_w)` of a window over a `(batch, h, w, c)` input.
pub fn out_size(
    dims: &[usize],
    kh: usize,
    kw: usize,
    stride: usize,
    pad: Padding,
) -> Result<(usize, usize)> {
    let g = Geom::new(dims, kh, kw, stride, pad)?;
    Ok((g.ho, g.wo))
}

struct Im2Col(Geom);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "ferrotune-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_data(s, l)?;
        let row = g.kh * g.kw * g.c;
        let rows = g.b * g.ho * g.wo;
        let n = rows * row;
        // Safety: output row r (one output pixel) is written whole by task (b, oy) only.
        let out = unsafe {
            filled(n, |p| {
                let o = Out(p, n);
                par_for(g.b * g.ho, n >= PAR_MIN, |t| {
                    let (b, oy) = (t / g.ho, t % g.ho);
                    let dst = o.part(t * g.wo * row, g.wo * row);
                    for ox in 0..g.wo {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let at = ox * row + (ky * g.kw + kx) * g.c;
                                let d = &mut dst[at..at + g.c];
                                match g.src(oy, ox, ky, kx) {
                                    Some((iy, ix)) => {
                                        let s = ((b * g.h + iy) * g.w + ix) * g.c;
                                        d.copy_from_slice(&x[s..s + g.c]);
                                    }
                                    None => d.fill(0.0),
                                }
                            }
                        }
                    }
                });
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((rows, row))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = self.0;
        let row = g.kh * g.kw * g.c;
        let img = g.h * g.w * g.c;
        let dx = with_f32(grad, |dy| {
            let mut dx = vec![0f32; g.b * img];
            let o = Out::new(&mut dx);
            // Each image's gradient is summed by one task, patches in a fixed order.
            par_for(g.b, g.b * img >= PAR_MIN / 4, |b| {
                // Safety: image b's part is written by this task only.
                let d = unsafe { o.part(b * img, img) };
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        let r = ((b * g.ho + oy) * g.wo + ox) * row;
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                if let Some((iy, ix)) = g.src(oy, ox, ky, kx) {
                                    let s = r + (ky * g.kw + kx) * g.c;
                                    let t = (iy * g.w + ix) * g.c;
                                    d[t..t + g.c]
                                        .iter_mut()
                                        .zip(&dy[s..s + g.c])
                                        .for_each(|(a, b)| *a += b);
                                }
                            }
                        }
                    }
                }
            });
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Depthwise convolution (one k×k filter per channel, PyTorch's `groups = channels`):
/// `x` `(batch, h, w, c)`, `w` `(kh·kw, c)` (tap-major: row `ky·kw + kx` holds every
/// channel's weight at that tap) → `(batch, out_h, out_w, c)`. Differentiable in both.
pub fn depthwise(
    x: &Tensor,
    w: &Tensor,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: Padding,
) -> Result<Tensor> {
    let g = Geom::new(x.dims(), kh, kw, stride, pad)?;
    if w.dims() != [kh * kw, g.c] {
        return Err(crate::error::Error::Msg(format!(
            "depthwise convolution: weight {:?} for a {kh}×{kw} window over {} channels",
            w.dims(),
            g.c
        )));
    }
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, Depthwise(g))?)
}

// The depthwise convolution's loops, compiled for AVX2 where the CPU has it (the
// baseline build is SSE2); they vectorise along the channels.
super::simd::dispatch! {
    /// Output row `oy` of image `b`: `dst` (`wo · c`) = Σ over the window of x · w.
    fn depthwise_row(x: &[f32], w: &[f32], dst: &mut [f32], g: Geom, b: usize, oy: usize) {
        dst.fill(0.0);
        g.row_taps(x, b, oy, dst, |d, xs, k| {
            d.iter_mut()
                .zip(xs)
                .zip(&w[k..k + g.c])
                .for_each(|((d, x), w)| *d += x * w)
        });
    }
}

super::simd::dispatch! {
    /// Image `b`'s input gradient `d` and its weight gradient `dwb` (both zeroed before),
    /// from the output gradient `dy` of the whole batch and the image's input `xs`.
    fn depthwise_image_grad(dy: &[f32], xs: &[f32], wv: &[f32], d: &mut [f32], dwb: &mut [f32],
                            g: Geom, b: usize) {
        for oy in 0..g.ho {
            for ox in 0..g.wo {
                let r = ((b * g.ho + oy) * g.wo + ox) * g.c;
                let gy = &dy[r..r + g.c];
                g.taps(oy, ox, |t, k| {
                    let x = &xs[t..t + g.c];
                    let dx = &mut d[t..t + g.c];
                    let ws = &wv[k..k + g.c];
                    let dwk = &mut dwb[k..k + g.c];
                    for ((((dx, dwk), &gy), &w), &x) in
                        dx.iter_mut().zip(dwk.iter_mut()).zip(gy).zip(ws).zip(x)
                    {
                        *dx += gy * w;
                        *dwk += gy * x;
                    }
                });
            }
        }
    }
}

struct Depthwise(Geom);

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "ferrotune-depthwise-conv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (x, w) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        let n = g.b * g.ho * g.wo * g.c;
        // Safety: output row (b, oy) is written whole by its task only.
        let out = unsafe {
            filled(n, |p| {
                let o = Out(p, n);
                par_for(g.b * g.ho, n >= PAR_MIN, |t| {
                    depthwise_row(
                        x,
                        w,
                        o.part(t * g.wo * g.c, g.wo * g.c),
                        g,
                        t / g.ho,
                        t % g.ho,
                    )
                });
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.ho, g.wo, g.c))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.0;
        let taps = g.kh * g.kw;
        let img = g.h * g.w * g.c;
        let (dx, dw) = with_f32(w, |wv| {
            with_f32(x, |xv| {
                with_f32(grad, |dy| {
                    let mut dx = vec![0f32; g.b * img];
                    // One weight gradient per image, summed in image order afterwards
                    // (repeatable).
                    let mut dws = vec![0f32; g.b * taps * g.c];
                    let (ox_, ow_) = (Out::new(&mut dx), Out::new(&mut dws));
                    par_for(g.b, g.b * img >= PAR_MIN / 4, |b| {
                        // Safety: image b's parts are written by this task only.
                        let (d, dwb) = unsafe {
                            (ox_.part(b * img, img), ow_.part(b * taps * g.c, taps * g.c))
                        };
                        depthwise_image_grad(dy, &xv[b * img..(b + 1) * img], wv, d, dwb, g, b);
                    });
                    let mut dw = vec![0f32; taps * g.c];
                    for part in dws.chunks(taps * g.c) {
                        dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
                    }
                    (dx, dw)
                })
            })
        })???;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

/// `min(max(x, 0), 6)` (ReLU6) in one pass; its backward passes the gradient where the
/// output is strictly between 0 and 6 (what PyTorch's `hardtanh_backward` does).
pub fn relu6(x: &Tensor) -> Result<Tensor> {
    if !super::par::fusable(&[x]) {
        return Ok(x.clamp(0f32, 6f32)?);
    }
    Ok(x.contiguous()?.apply_op1(Relu6)?)
}

struct Relu6;

/// Elements per task of the element-wise loops.
const ELEMS: usize = 1 << 14;

impl CustomOp1 for Relu6 {
    fn name(&self) -> &'static str {
        "ferrotune-relu6"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l)?;
        let out = super::par::map_parts(x, ELEMS, |_, src, dst| {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = v.clamp(0.0, 6.0);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let y = res.flatten_all()?.to_vec1::<f32>()?;
        let dx = with_f32(grad, |dy| {
            super::par::map_parts(dy, ELEMS, |i, src, dst| {
                let ys = &y[i * ELEMS..i * ELEMS + src.len()];
                for ((d, &g), &v) in dst.iter_mut().zip(src).zip(ys) {
                    *d = if v > 0.0 && v < 6.0 { g } else { 0.0 };
                }
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// Max pooling over `k × k` windows with `stride` (the ResNet stem's 3×3, stride 2,
/// padding 1), channels-last. The padding never wins (PyTorch pads with −∞); it may be
/// at most `k / 2` per side, so every window holds a pixel. The backward sends each
/// output's gradient to the first maximum of its window in row-major order (PyTorch's
/// choice among ties), summed where windows overlap.
pub fn max_pool(x: &Tensor, k: usize, stride: usize, pad: Padding) -> Result<Tensor> {
    let g = Geom::new(x.dims(), k, k, stride, pad)?;
    if [pad.top, pad.bottom, pad.left, pad.right]
        .iter()
        .any(|&p| p > k / 2)
    {
        return Err(crate::error::Error::Msg(format!(
            "max pooling: padding {pad:?} is more than half the {k}×{k} window"
        )));
    }
    Ok(x.contiguous()?.apply_op1(MaxPool(g))?)
}

struct MaxPool(Geom);

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "ferrotune-max-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_data(s, l)?;
        let n = g.b * g.ho * g.wo * g.c;
        // Safety: output row (b, oy) is written whole by task (b, oy) only.
        let out = unsafe {
            filled(n, |p| {
                let o = Out(p, n);
                par_for(g.b * g.ho, n >= PAR_MIN, |t| {
                    let (b, oy) = (t / g.ho, t % g.ho);
                    let dst = o.part(t * g.wo * g.c, g.wo * g.c);
                    dst.fill(f32::NEG_INFINITY);
                    g.row_taps(x, b, oy, dst, |d, xs, _| {
                        d.iter_mut()
                            .zip(xs)
                            .for_each(|(d, &v)| *d = if v > *d { v } else { *d })
                    });
                });
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.ho, g.wo, g.c))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = self.0;
        let img = g.h * g.w * g.c;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let dx = with_f32(grad, |dy| {
            let mut dx = vec![0f32; g.b * img];
            let o = Out::new(&mut dx);
            // Windows overlap within an image: each image is one task, in a fixed order.
            par_for(g.b, g.b * img >= PAR_MIN / 4, |b| {
                // Safety: image b's part is written by this task only.
                let d = unsafe { o.part(b * img, img) };
                let xs = &xv[b * img..(b + 1) * img];
                let mut best = vec![0f32; g.c];
                let mut at = vec![0usize; g.c];
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        best.fill(f32::NEG_INFINITY);
                        g.taps(oy, ox, |t, _| {
                            for c in 0..g.c {
                                if xs[t + c] > best[c] {
                                    best[c] = xs[t + c];
                                    at[c] = t + c;
                                }
                            }
                        });
                        let r = ((b * g.ho + oy) * g.wo + ox) * g.c;
                        for (c, &gy) in dy[r..r + g.c].iter().enumerate() {
                            d[at[c]] += gy;
                        }
                    }
                }
            });
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `max(a + b, 0)` in one pass: a residual block's sum and its ReLU. The backward gives
/// both inputs the gradient where the output is positive (PyTorch's ReLU backward).
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        return Err(crate::error::Error::Msg(format!(
            "residual add: shapes {:?} and {:?} differ",
            a.dims(),
            b.dims()
        )));
    }
    if !super::par::fusable(&[a, b]) {
        return Ok((a + b)?.relu()?);
    }
    Ok(a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)?)
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "ferrotune-add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (f32_data(s1, l1)?, f32_data(s2, l2)?);
        let out = super::par::map_parts(a, ELEMS, |i, src, dst| {
            let bs = &b[i * ELEMS..i * ELEMS + src.len()];
            for ((d, &x), &y) in dst.iter_mut().zip(src).zip(bs) {
                *d = (x + y).max(0.0);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let y = res.flatten_all()?.to_vec1::<f32>()?;
        let dx = with_f32(grad, |dy| {
            super::par::map_parts(dy, ELEMS, |i, src, dst| {
                let ys = &y[i * ELEMS..i * ELEMS + src.len()];
                for ((d, &g), &v) in dst.iter_mut().zip(src).zip(ys) {
                    *d = if v > 0.0 { g } else { 0.0 };
                }
            })
        })?;
        let dx = Tensor::from_vec(dx, res.shape(), res.device())?;
        Ok((Some(dx.clone()), Some(dx)))
    }
}

/// Rows per part of the batch-norm loops: partial sums are taken per part and added in
/// part order, so the result does not depend on the number of threads.
const BN_ROWS: usize = 256;

/// Per-part sums over rows of `(rows, c)` data: `f(part's rows, first row, sums)` adds
/// into a zeroed `k·c` vector of f64, and the parts' vectors are added in order. f64,
/// because these sums cancel: on Fashion-MNIST's flat backgrounds, f32 sums per part
/// moved the first step's gradient norm by 0.2–1.6%.
fn row_sums(
    v: &[f32],
    c: usize,
    k: usize,
    f: impl Fn(&[f32], usize, &mut [f64]) + Sync,
) -> Vec<f64> {
    let rows = v.len() / c.max(1);
    let parts = rows.div_ceil(BN_ROWS).max(1);
    let mut partial = vec![0f64; parts * k * c];
    {
        let ptr = partial.as_mut_ptr() as usize;
        par_for(parts, v.len() >= PAR_MIN, |i| {
            let r0 = i * BN_ROWS;
            let r1 = ((i + 1) * BN_ROWS).min(rows);
            // Safety: part i's sums are written by this task only.
            let out =
                unsafe { std::slice::from_raw_parts_mut((ptr as *mut f64).add(i * k * c), k * c) };
            f(&v[r0 * c..r1 * c], r0, out);
        });
    }
    let mut total = vec![0f64; k * c];
    for part in partial.chunks(k * c) {
        total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
    }
    total
}

// The batch-norm loops, each over whole rows of `c` channels and compiled for AVX2 where
// the CPU has it (`simd::dispatch!`; the baseline build is SSE2). They are zips of
// slices, which the compiler vectorises along the channels; per element they do what
// scalar loops did (products in f32, sums in f64, in row order), so the results are the
// same bits.
super::simd::dispatch! {
    /// `acc[i] += Σ_rows x[i]`.
    fn bn_sum(x: &[f32], acc: &mut [f64]) {
        for r in x.chunks_exact(acc.len()) {
            acc.iter_mut().zip(r).for_each(|(a, &x)| *a += x as f64);
        }
    }
}

super::simd::dispatch! {
    /// `acc[i] += Σ_rows (x[i] − mean[i])²`.
    fn bn_sum_sq(x: &[f32], mean: &[f64], acc: &mut [f64]) {
        for r in x.chunks_exact(acc.len()) {
            for ((a, &x), &m) in acc.iter_mut().zip(r).zip(mean) {
                let d = x as f64 - m;
                *a += d * d;
            }
        }
    }
}

super::simd::dispatch! {
    /// `y = min(max(x·scale + shift, lo), hi)`.
    fn bn_apply(x: &[f32], y: &mut [f32], scale: &[f32], shift: &[f32], lo: f32, hi: f32) {
        let c = scale.len();
        for (r, o) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            for (((o, &x), &a), &b) in o.iter_mut().zip(r).zip(scale).zip(shift) {
                *o = (x * a + b).max(lo).min(hi);
            }
        }
    }
}

/// The gradient through the clamp: `g` where the output `y` was strictly inside
/// `(lo, hi)`, else 0.
#[inline(always)]
fn clamp_pass(g: f32, y: f32, lo: f32, hi: f32) -> f32 {
    if y > lo && y < hi {
        g
    } else {
        0.0
    }
}

/// Calls `f(i, g)` for every channel `i` of a row, `g` the row's output gradient `gy`
/// through the clamp when the outputs `ys` are given (no clamp otherwise). Two loops, so
/// each vectorises without a test per element.
#[inline(always)]
fn with_clamped(gy: &[f32], ys: Option<&[f32]>, lo: f32, hi: f32, mut f: impl FnMut(usize, f32)) {
    match ys {
        Some(ys) => gy
            .iter()
            .zip(ys)
            .enumerate()
            .for_each(|(i, (&g, &y))| f(i, clamp_pass(g, y, lo, hi))),
        None => gy.iter().enumerate().for_each(|(i, &g)| f(i, g)),
    }
}

super::simd::dispatch! {
    /// `sdy[i] += Σ_rows g[i]`, `sdyx[i] += Σ_rows g[i]·x̂[i]` with `x̂ = (x − mean)·rstd`
    /// and `g` the output gradient `dy` through the clamp (`y` the output; none: no clamp).
    #[allow(clippy::too_many_arguments)]
    fn bn_grad_sums(dy: &[f32], x: &[f32], y: Option<&[f32]>, mean: &[f32], rstd: &[f32],
                    lo: f32, hi: f32, sdy: &mut [f64], sdyx: &mut [f64]) {
        let c = mean.len();
        let (rstd, sdy, sdyx) = (&rstd[..c], &mut sdy[..c], &mut sdyx[..c]);
        for (r, (gy, xs)) in dy.chunks_exact(c).zip(x.chunks_exact(c)).enumerate() {
            let ys = y.map(|y| &y[r * c..(r + 1) * c]);
            with_clamped(gy, ys, lo, hi, |i, g| {
                let xh = (xs[i] - mean[i]) * rstd[i];
                sdy[i] += g as f64;
                sdyx[i] += (g * xh) as f64;
            });
        }
    }
}

super::simd::dispatch! {
    /// `dx = scale·(g − m_dy − x̂·m_dyx)`, `g` and `x̂` as in [`bn_grad_sums`].
    #[allow(clippy::too_many_arguments)]
    fn bn_grad_x(dy: &[f32], x: &[f32], y: Option<&[f32]>, mean: &[f32], rstd: &[f32],
                 lo: f32, hi: f32, scale: &[f32], m_dy: &[f32], m_dyx: &[f32], dx: &mut [f32]) {
        let c = mean.len();
        let (rstd, scale, m_dy, m_dyx) = (&rstd[..c], &scale[..c], &m_dy[..c], &m_dyx[..c]);
        let rows = dx.chunks_exact_mut(c).zip(dy.chunks_exact(c)).zip(x.chunks_exact(c));
        for (r, ((d, gy), xs)) in rows.enumerate() {
            let ys = y.map(|y| &y[r * c..(r + 1) * c]);
            with_clamped(gy, ys, lo, hi, |i, g| {
                let xh = (xs[i] - mean[i]) * rstd[i];
                d[i] = scale[i] * (g - m_dy[i] - xh * m_dyx[i]);
            });
        }
    }
}

/// Per-channel mean and variance (biased, as batch norm normalises with) of `x`'s rows
/// (`(rows, channels)` or any shape whose last dimension is the channels), summed in f64
/// per part of rows, the parts in order.
pub fn channel_stats(x: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
    let c = *x.dims().last().unwrap_or(&1);
    Ok(with_f32(x, |v| {
        let rows = (v.len() / c.max(1)).max(1) as f64;
        let sum = row_sums(v, c, 1, |part, _, out| bn_sum(part, out));
        let mean: Vec<f64> = sum.iter().map(|s| s / rows).collect();
        let sq = row_sums(v, c, 1, |part, _, out| bn_sum_sq(part, &mean, out));
        (
            mean.iter().map(|&m| m as f32).collect(),
            sq.iter().map(|s| (s / rows) as f32).collect(),
        )
    })?)
}

/// Batch normalisation over the last dimension (channels-last): `(x − mean) / sqrt(var +
/// eps) · weight + bias`, with `mean` and `var` given (the batch's own, from
/// [`channel_stats`], in training; the running statistics otherwise). `batch_stats` says
/// which: the backward then also flows through the batch's mean and variance, as
/// PyTorch's training-mode batch norm does. `act` is applied in the same pass: ReLU clamps
/// the output to `[0, ∞)`, ReLU6 to `[0, 6]`, and the gradient passes where the output
/// was strictly inside. Differentiable in `x`, `weight` and `bias`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    mean: &[f32],
    var: &[f32],
    eps: f64,
    batch_stats: bool,
    act: BnAct,
) -> Result<Tensor> {
    let c = *x.dims().last().unwrap_or(&0);
    if weight.dims() != [c] || bias.dims() != [c] || mean.len() != c || var.len() != c {
        return Err(crate::error::Error::Msg(format!(
            "batch norm: {} channels but weight {:?}, bias {:?}, {} statistics",
            c,
            weight.dims(),
            bias.dims(),
            mean.len()
        )));
    }
    let op = BatchNorm {
        mean: mean.to_vec(),
        rstd: var
            .iter()
            .map(|&v| (1.0 / (v as f64 + eps).sqrt()) as f32)
            .collect(),
        batch_stats,
        act,
    };
    Ok(x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?)
}

/// The activation [`batch_norm`] applies in the same pass: a clamp of the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnAct {
    /// None.
    None,
    /// `max(y, 0)`.
    Relu,
    /// `min(max(y, 0), 6)`.
    Relu6,
}

impl BnAct {
    /// The clamp's bounds (infinite where there is none).
    fn bounds(self) -> (f32, f32) {
        match self {
            BnAct::None => (f32::NEG_INFINITY, f32::INFINITY),
            BnAct::Relu => (0.0, f32::INFINITY),
            BnAct::Relu6 => (0.0, 6.0),
        }
    }
}

struct BatchNorm {
    mean: Vec<f32>,
    rstd: Vec<f32>,
    batch_stats: bool,
    act: BnAct,
}

impl CustomOp3 for BatchNorm {
    fn name(&self) -> &'static str {
        "ferrotune-batch-norm"
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
        let (x, w, b) = (f32_data(s1, l1)?, f32_data(s2, l2)?, f32_data(s3, l3)?);
        let c = w.len();
        // y = x·scale + shift, per channel.
        let scale: Vec<f32> = w.iter().zip(&self.rstd).map(|(w, r)| w * r).collect();
        let shift: Vec<f32> = (0..c).map(|i| b[i] - self.mean[i] * scale[i]).collect();
        let (lo, hi) = self.act.bounds();
        let out = super::par::map_parts(x, BN_ROWS * c, |_, src, dst| {
            bn_apply(src, dst, &scale, &shift, lo, hi)
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = w.elem_count();
        let wv = w.to_vec1::<f32>()?;
        let (lo, hi) = self.act.bounds();
        let (mean, rstd) = (&self.mean[..], &self.rstd[..]);
        let act = self.act;
        // The input, the output (for the clamp's gradient) and the output gradient, read
        // in place.
        let (dx, dw, db) = with_f32(x, |xv| {
            with_f32(res, |yv| {
                let yv = (act != BnAct::None).then_some(yv);
                with_f32(grad, |dy| {
                    let rows = dy.len() / c.max(1);
                    let y_rows = |r0: usize, n: usize| yv.map(|y| &y[r0 * c..(r0 + n) * c]);
                    // Σ dy and Σ dy·x̂ per channel, per part of rows in order.
                    let sums = row_sums(dy, c, 2, |part, r0, out| {
                        let n = part.len() / c.max(1);
                        let (sdy, sdyx) = out.split_at_mut(c);
                        let xs = &xv[r0 * c..(r0 + n) * c];
                        bn_grad_sums(part, xs, y_rows(r0, n), mean, rstd, lo, hi, sdy, sdyx);
                    });
                    let (sdy, sdyx) = sums.split_at(c);
                    let scale: Vec<f32> = wv.iter().zip(rstd).map(|(w, r)| w * r).collect();
                    let n = rows.max(1) as f64;
                    let (m_dy, m_dyx): (Vec<f32>, Vec<f32>) = if self.batch_stats {
                        (
                            sdy.iter().map(|s| (s / n) as f32).collect(),
                            sdyx.iter().map(|s| (s / n) as f32).collect(),
                        )
                    } else {
                        (vec![0.0; c], vec![0.0; c])
                    };
                    let dx = super::par::map_parts(dy, BN_ROWS * c, |part, src, dst| {
                        let (r0, n) = (part * BN_ROWS, src.len() / c.max(1));
                        let xs = &xv[r0 * c..(r0 + n) * c];
                        bn_grad_x(
                            src,
                            xs,
                            y_rows(r0, n),
                            mean,
                            rstd,
                            lo,
                            hi,
                            &scale,
                            &m_dy,
                            &m_dyx,
                            dst,
                        );
                    });
                    (
                        dx,
                        sdyx.iter().map(|&s| s as f32).collect::<Vec<_>>(),
                        sdy.iter().map(|&s| s as f32).collect::<Vec<_>>(),
                    )
                })
            })
        })???;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::tests::{max_diff, randn};
    use candle_core::{DType, Device, Var, D};

    /// candle's NCHW convolution of a channels-last input, back to channels-last.
    fn reference_conv(
        x: &Tensor,
        w_oihw: &Tensor,
        stride: usize,
        pad: Padding,
        groups: usize,
    ) -> Tensor {
        let x = x
            .pad_with_zeros(1, pad.top, pad.bottom)
            .unwrap()
            .pad_with_zeros(2, pad.left, pad.right)
            .unwrap();
        let nchw = x.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
        nchw.conv2d(w_oihw, 0, stride, 1, groups)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap()
            .contiguous()
            .unwrap()
    }

    /// The gradients of `Σ y·probe` (a random linear functional of `y`).
    fn probe_grads(y: &Tensor, probe: &Tensor) -> candle_core::backprop::GradStore {
        (y * probe).unwrap().sum_all().unwrap().backward().unwrap()
    }

    /// The gradients of `vars` through `ours` and `theirs` (under the same random
    /// probe) agree within `tol`.
    fn same_grads(ours: &Tensor, theirs: &Tensor, vars: &[&Var], tol: f32, case: usize) {
        let probe = randn(ours.dims(), 99);
        let g1 = probe_grads(ours, &probe);
        let g2 = probe_grads(theirs, &probe);
        for v in vars {
            let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
            assert!(max_diff(a, b) < tol, "case {case}: {}", max_diff(a, b));
        }
    }

    /// A k×k convolution as im2col × weight: forward and the input's and weight's
    /// gradients equal candle's own convolution, on odd shapes, strides and both
    /// paddings.
    #[test]
    fn im2col_convolution_matches_candle() {
        for (i, &(b, h, w, cin, cout, k, s, same)) in [
            (1, 5, 7, 3, 4, 3, 1, false),
            (2, 9, 6, 3, 5, 3, 2, true),
            (3, 8, 8, 2, 3, 5, 2, false),
            (2, 7, 11, 4, 2, 1, 2, false),
            (2, 40, 33, 3, 8, 3, 2, true),
        ]
        .iter()
        .enumerate()
        {
            let pad = if same {
                Padding::same(h, w, k, s)
            } else {
                Padding::symmetric(k / 2)
            };
            let x = Var::from_tensor(&randn(&[b, h, w, cin], 10 + i as u64)).unwrap();
            let wt = Var::from_tensor(&randn(&[cout, cin, k, k], 20 + i as u64)).unwrap();
            let ours = {
                let cols = im2col(x.as_tensor(), k, k, s, pad).unwrap();
                let (ho, wo) = out_size(&[b, h, w, cin], k, k, s, pad).unwrap();
                let wm = wt
                    .as_tensor()
                    .permute((0, 2, 3, 1))
                    .unwrap()
                    .reshape((cout, k * k * cin))
                    .unwrap();
                cols.matmul(&wm.t().unwrap())
                    .unwrap()
                    .reshape((b, ho, wo, cout))
                    .unwrap()
            };
            let theirs = reference_conv(x.as_tensor(), wt.as_tensor(), s, pad, 1);
            assert_eq!(ours.dims(), theirs.dims(), "case {i}");
            assert!(max_diff(&ours, &theirs) < 1e-4, "case {i}");
            same_grads(&ours, &theirs, &[&x, &wt], 1e-3, i);
        }
    }

    /// The depthwise convolution equals candle's grouped convolution, forward and both
    /// gradients.
    #[test]
    fn depthwise_matches_candle() {
        for (i, &(b, h, w, c, k, s, same)) in [
            (1, 5, 5, 3, 3, 1, false),
            (2, 9, 7, 5, 3, 2, true),
            (2, 8, 10, 4, 5, 2, true),
            (3, 6, 6, 7, 5, 1, false),
            (2, 30, 30, 16, 3, 1, true),
        ]
        .iter()
        .enumerate()
        {
            let pad = if same {
                Padding::same(h, w, k, s)
            } else {
                Padding::symmetric(k / 2)
            };
            let x = Var::from_tensor(&randn(&[b, h, w, c], 30 + i as u64)).unwrap();
            let wt = Var::from_tensor(&randn(&[c, 1, k, k], 40 + i as u64)).unwrap();
            let taps = wt
                .as_tensor()
                .reshape((c, k * k))
                .unwrap()
                .t()
                .unwrap()
                .contiguous()
                .unwrap();
            let ours = depthwise(x.as_tensor(), &taps, k, k, s, pad).unwrap();
            let theirs = reference_conv(x.as_tensor(), wt.as_tensor(), s, pad, c);
            assert_eq!(ours.dims(), theirs.dims(), "case {i}");
            assert!(max_diff(&ours, &theirs) < 1e-4, "case {i}");
            same_grads(&ours, &theirs, &[&x, &wt], 1e-3, i);
        }
    }

    /// Batch norm with ReLU or ReLU6 in the same pass equals batch norm then the clamp,
    /// forward and in every gradient, with batch and with running statistics.
    #[test]
    fn batch_norm_with_an_activation_matches_the_two_ops() {
        let x = Var::from_tensor(&randn(&[3, 9, 7, 13], 81)).unwrap();
        let w = Var::from_tensor(&(randn(&[13], 82) * 2.0).unwrap()).unwrap();
        let b = Var::from_tensor(&(randn(&[13], 83) + 2.0).unwrap()).unwrap();
        let (mean, var) = channel_stats(x.as_tensor()).unwrap();
        for (case, (act, hi)) in [(BnAct::Relu6, 6f32), (BnAct::Relu, f32::MAX)]
            .into_iter()
            .enumerate()
        {
            for stats in [true, false] {
                let bn = |act| {
                    batch_norm(
                        x.as_tensor(),
                        w.as_tensor(),
                        b.as_tensor(),
                        &mean,
                        &var,
                        1e-3,
                        stats,
                        act,
                    )
                    .unwrap()
                };
                let ours = bn(act);
                let theirs = bn(BnAct::None).clamp(0f32, hi).unwrap();
                assert!(max_diff(&ours, &theirs) < 1e-6);
                // Some outputs are clamped, so the mask is exercised.
                let zeros = values(&ours).iter().filter(|&&v| v == 0.0).count();
                assert!(zeros > 0, "case {case}");
                same_grads(
                    &ours,
                    &theirs,
                    &[&x, &w, &b],
                    1e-3,
                    2 * case + stats as usize,
                );
            }
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// PyTorch's max pooling built from candle ops: the input padded with a very negative
    /// number, then the elementwise maximum of the k·k strided views (differentiable, and
    /// with distinct inputs the gradient goes to the one maximum, as PyTorch's).
    fn reference_max_pool(x: &Tensor, k: usize, s: usize, p: usize) -> Tensor {
        let (b, h, w, c) = x.dims4().unwrap();
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        // Padding p before, and enough after that every tap's strided view fits.
        let (hp, wp) = (s * ho + k, s * wo + k);
        let pad = |t: &Tensor| {
            t.pad_with_zeros(1, p, hp - h - p)
                .unwrap()
                .pad_with_zeros(2, p, wp - w - p)
                .unwrap()
        };
        let low = (pad(&x.ones_like().unwrap()) - 1.0).unwrap() * 1e9;
        let xp = (pad(x) + low.unwrap()).unwrap();
        let mut out: Option<Tensor> = None;
        for ky in 0..k {
            for kx in 0..k {
                let v = xp
                    .narrow(1, ky, s * ho)
                    .unwrap()
                    .narrow(2, kx, s * wo)
                    .unwrap()
                    .reshape((b, ho, s, wo, s, c))
                    .unwrap()
                    .narrow(2, 0, 1)
                    .unwrap()
                    .narrow(4, 0, 1)
                    .unwrap()
                    .reshape((b, ho, wo, c))
                    .unwrap();
                out = Some(match out {
                    None => v,
                    Some(o) => o.maximum(&v).unwrap(),
                });
            }
        }
        out.unwrap()
    }

    /// Max pooling equals candle's `max_pool2d` (NCHW, the padding as −∞) forward, and the
    /// composition of maxima in the input's gradient, on odd shapes, strides and
    /// paddings (ResNet's 3×3, stride 2, padding 1 among them).
    #[test]
    fn max_pool_matches_candle() {
        for (i, &(b, h, w, c, k, s, p)) in [
            (2, 9, 7, 5, 3, 2, 1),
            (1, 8, 8, 3, 3, 2, 1),
            (3, 5, 6, 4, 2, 2, 0),
            (2, 7, 7, 6, 3, 1, 1),
            (1, 11, 10, 2, 5, 3, 2),
            (2, 32, 30, 16, 3, 2, 1),
        ]
        .iter()
        .enumerate()
        {
            let x = Var::from_tensor(&randn(&[b, h, w, c], 110 + i as u64)).unwrap();
            let ours = max_pool(x.as_tensor(), k, s, Padding::symmetric(p)).unwrap();
            let padded = x.as_tensor().permute((0, 3, 1, 2)).unwrap();
            let minus_inf = |t: &Tensor, dim: usize| {
                let mut dims = t.dims().to_vec();
                dims[dim] = p;
                let edge = Tensor::full(f32::NEG_INFINITY, dims, &Device::Cpu).unwrap();
                Tensor::cat(&[&edge, t, &edge], dim).unwrap()
            };
            let candle = minus_inf(&minus_inf(&padded, 2), 3)
                .contiguous()
                .unwrap()
                .max_pool2d_with_stride(k, s)
                .unwrap()
                .permute((0, 2, 3, 1))
                .unwrap()
                .contiguous()
                .unwrap();
            assert_eq!(ours.dims(), candle.dims(), "case {i}");
            assert_eq!(max_diff(&ours, &candle), 0.0, "case {i}");
            let theirs = reference_max_pool(x.as_tensor(), k, s, p);
            assert_eq!(max_diff(&ours, &theirs), 0.0, "case {i}");
            same_grads(&ours, &theirs, &[&x], 1e-6, i);
        }
        // Padding wider than half the window is refused.
        assert!(max_pool(&randn(&[1, 4, 4, 1], 1), 3, 2, Padding::symmetric(2)).is_err());
    }

    /// Among equal values the first in the window (row-major) gets the gradient, each
    /// output's once, summed where windows overlap: PyTorch's choice.
    #[test]
    fn max_pool_gradient_goes_to_the_first_maximum() {
        // One image, one channel, 3×3 all ones: with a 2×2 window, stride 1, each of the
        // 4 windows picks its top-left pixel.
        let x = Var::from_tensor(&Tensor::ones((1, 3, 3, 1), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let y = max_pool(x.as_tensor(), 2, 1, Padding::symmetric(0)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let dx = values(g.get(&x).unwrap());
        assert_eq!(dx, [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    }

    /// The residual add with its ReLU equals `(a + b).relu()` forward and in both
    /// gradients.
    #[test]
    fn add_relu_matches_the_two_ops() {
        for (i, dims) in [vec![2, 5, 3, 7], vec![3, 40, 30, 9], vec![1, 1, 1, 1]]
            .into_iter()
            .enumerate()
        {
            let a = Var::from_tensor(&randn(&dims, 120 + i as u64)).unwrap();
            let b = Var::from_tensor(&randn(&dims, 130 + i as u64)).unwrap();
            let ours = add_relu(a.as_tensor(), b.as_tensor()).unwrap();
            let theirs = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
            assert_eq!(max_diff(&ours, &theirs), 0.0, "case {i}");
            same_grads(&ours, &theirs, &[&a, &b], 1e-6, i);
        }
        assert!(add_relu(&randn(&[2, 3], 1), &randn(&[3, 2], 2)).is_err());
    }

    /// ReLU6 equals the clamp, forward and backward (away from the kinks).
    #[test]
    fn relu6_matches_the_clamp() {
        let x = Var::from_tensor(&(randn(&[7, 5, 3, 11], 5) * 3.0).unwrap()).unwrap();
        let ours = relu6(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().clamp(0f32, 6f32).unwrap();
        assert_eq!(max_diff(&ours, &theirs), 0.0);
        same_grads(&ours, &theirs, &[&x], 1e-6, 0);
    }

    /// "Same" padding gives TensorFlow's output sizes and splits (odd one at the end).
    #[test]
    fn same_padding_is_tensorflows() {
        let p = Padding::same(224, 224, 3, 2);
        assert_eq!((p.top, p.bottom), (0, 1));
        assert_eq!(out_size(&[1, 224, 224, 3], 3, 3, 2, p).unwrap(), (112, 112));
        let p = Padding::same(7, 7, 5, 1);
        assert_eq!((p.top, p.bottom, p.left, p.right), (2, 2, 2, 2));
        let p = Padding::same(15, 15, 5, 2);
        assert_eq!((p.top, p.bottom), (2, 2));
        assert!(im2col(&randn(&[1, 2, 2, 1], 1), 5, 5, 1, Padding::symmetric(0)).is_err());
    }

    /// On a batch as large as an image model's (many parts of rows, channels not a
    /// multiple of the vector width, a mean far from zero) the statistics and every
    /// gradient of training-mode batch norm agree with the same composition in f64.
    #[test]
    fn batch_norm_sums_match_f64() {
        let (rows, c) = (16 * 16 * 64, 24);
        let x = ((randn(&[rows, c], 5) * 0.1).unwrap() + 2.5).unwrap();
        let w = randn(&[c], 6);
        let bias = randn(&[c], 7);
        let probe = randn(&[rows, c], 8);
        let eps = 1e-3;
        let (mean, var) = channel_stats(&x).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let (wv, bv) = (
            Var::from_tensor(&w).unwrap(),
            Var::from_tensor(&bias).unwrap(),
        );
        let ours = batch_norm(&xv, &wv, &bv, &mean, &var, eps, true, BnAct::None).unwrap();
        let g = probe_grads(&ours, &probe);
        // The reference, in f64.
        let f64v = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
        let (x2, w2, b2) = (f64v(&x), f64v(&w), f64v(&bias));
        let mu = x2.mean_keepdim(0).unwrap();
        let xc = x2.broadcast_sub(&mu).unwrap();
        let v = xc.sqr().unwrap().mean_keepdim(0).unwrap();
        let theirs = xc
            .broadcast_div(&(&v + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w2)
            .unwrap()
            .broadcast_add(&b2)
            .unwrap();
        let probe2 = probe.to_dtype(DType::F64).unwrap();
        let g2 = probe_grads(&theirs, &probe2);
        let rel = |a: &Tensor, b: &Tensor| {
            let b = b.to_dtype(DType::F32).unwrap();
            let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            max_diff(&a.flatten_all().unwrap(), &b.flatten_all().unwrap())
                / scale.to_scalar::<f32>().unwrap()
        };
        let m = Tensor::new(mean.as_slice(), &Device::Cpu).unwrap();
        let vv = Tensor::new(var.as_slice(), &Device::Cpu).unwrap();
        let errs = [
            ("mean", rel(&m, &mu)),
            ("var", rel(&vv, &v)),
            ("y", rel(&ours, &theirs)),
            ("dx", rel(g.get(&xv).unwrap(), g2.get(&x2).unwrap())),
            ("dw", rel(g.get(&wv).unwrap(), g2.get(&w2).unwrap())),
            ("db", rel(g.get(&bv).unwrap(), g2.get(&b2).unwrap())),
        ];
        println!("relative to f64: {errs:?}");
        for (what, e) in errs {
            assert!(e < 1e-4, "{what}: {e}");
        }
    }

    /// Batch norm with the batch's statistics equals the composition of candle ops,
    /// forward and every gradient; with given (running) statistics the input's gradient
    /// is the plain scale.
    #[test]
    fn batch_norm_matches_the_composition() {
        for (i, dims) in [vec![4, 3], vec![2, 5, 3, 7], vec![3, 40, 30, 9]]
            .into_iter()
            .enumerate()
        {
            let c = *dims.last().unwrap();
            let x = Var::from_tensor(&randn(&dims, 50 + i as u64)).unwrap();
            let w = Var::from_tensor(&randn(&[c], 60 + i as u64)).unwrap();
            let bias = Var::from_tensor(&randn(&[c], 70 + i as u64)).unwrap();
            let eps = 1e-3;
            let (mean, var) = channel_stats(x.as_tensor()).unwrap();
            let ours = batch_norm(
                x.as_tensor(),
                w.as_tensor(),
                bias.as_tensor(),
                &mean,
                &var,
                eps,
                true,
                BnAct::None,
            )
            .unwrap();
            let rows = x.as_tensor().reshape(((), c)).unwrap();
            let mu = rows.mean_keepdim(0).unwrap();
            let xc = rows.broadcast_sub(&mu).unwrap();
            let v = xc.sqr().unwrap().mean_keepdim(0).unwrap();
            let theirs = xc
                .broadcast_div(&(v + eps).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(w.as_tensor())
                .unwrap()
                .broadcast_add(bias.as_tensor())
                .unwrap()
                .reshape(dims.as_slice())
                .unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-4, "case {i}");
            let probe = randn(&dims, 97);
            let g1 = probe_grads(&ours, &probe);
            let g2 = probe_grads(&theirs, &probe);
            for var_ in [&x, &w, &bias] {
                let (a, b) = (g1.get(var_).unwrap(), g2.get(var_).unwrap());
                let scale = b
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(D::Minus1)
                    .unwrap();
                let scale = scale.to_scalar::<f32>().unwrap().max(1.0);
                assert!(
                    max_diff(a, b) / scale < 1e-4,
                    "case {i}: {}",
                    max_diff(a, b)
                );
            }
            // Running statistics: the input's gradient is weight · rstd · dy.
            let ours = batch_norm(
                x.as_tensor(),
                w.as_tensor(),
                bias.as_tensor(),
                &mean,
                &var,
                eps,
                false,
                BnAct::None,
            )
            .unwrap();
            let g = probe_grads(&ours, &probe);
            let rstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps as f32).sqrt()).collect();
            let want = probe
                .broadcast_mul(
                    &(w.as_tensor() * Tensor::new(rstd.as_slice(), &Device::Cpu).unwrap()).unwrap(),
                )
                .unwrap();
            assert!(max_diff(g.get(&x).unwrap(), &want) < 1e-4, "case {i}");
        }
    }
}

//! LoRA adapters' two thin GEMMs as two fused operations, forward and backward.
//!
//! An adapted linear layer adds `sᵢ·(dropoutᵢ(x) Aᵢᵀ) Bᵢᵀ` to its base output (PEFT's
//! `lora_dropout` on the adapter's input only). Composed of candle operations that costs,
//! per adapter, a dropped-out copy of `x` (kept alive until the backward, for `dA`), a
//! `(rows, out)` product and an add forward, and the dropout's and the add's passes
//! backward: element-wise passes over the layer's whole input and output next to GEMMs of
//! rank `r` (8). Here:
//!
//! - [`down`]: `H = [sᵢ·(dropoutᵢ(x)) Aᵢᵀ]ᵢ`, `(rows, Σ rᵢ)`, for the adapters of layers
//!   that share an input (a decoder's query, key and value), in blocks of rows: each
//!   block's dropped-out input lives in a scratch buffer the size of the L2 cache, and the
//!   backward regenerates the masks ([`fused::fill_multipliers`], the same multipliers as
//!   [`fused::dropout`]) instead of storing them or the dropped-out input.
//! - [`up_add`]: `y + [Hᵢ Bᵢᵀ]ᵢ`, each adapter's product accumulated by the GEMM into its
//!   layer's columns of a copy of the base output `y`.
//!
//! The adapters' gradients `dA` and `dB`, the input's `dx` (summed over the adapters) and
//! the base output's (passed through) come from the same GEMMs ([`sgemm`]). The
//! composition ([`crate::nn::lora::Lora::delta`]) stays as the reference: the tests compare
//! forward and every gradient with it.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::fused::{self, Dropout};
use super::gemm::{sgemm, Mat};
use super::par::{
    f32_data, filled, fusable, map_parts, par_for, with_f32, with_scratch, Out, PAR_MIN,
};
use crate::error::{Error, Result};

/// One adapter of a [`down`] op: its rank, scale and dropout (`None`: no dropout, as in
/// evaluation).
#[derive(Clone, Copy, Debug)]
pub struct Part {
    /// Rank `r`: the adapter's rows of the stacked `A` and columns of `H`.
    pub r: usize,
    /// Scale `s` (`α/r`).
    pub scale: f32,
    /// Dropout on the adapter's input.
    pub dropout: Option<Dropout>,
}

/// One adapter of an [`up_add`] op: where its output goes in `y`. Its columns of `H` and
/// rows of the stacked `B` follow from the adapters' order.
#[derive(Clone, Copy, Debug)]
pub struct UpPart {
    /// First column of the adapter's layer in `y`.
    pub y_col: usize,
    /// The layer's outputs (columns of `y`, rows of its `B`).
    pub out: usize,
}

/// An [`UpPart`] with what it reads: its first column of `H`, its first row of `B`.
#[derive(Clone, Copy, Debug)]
struct Slot {
    y_col: usize,
    out: usize,
    h_col: usize,
    b_row: usize,
}

thread_local! {
    /// Two row blocks of an adapter's input: the dropout multipliers (then the dropped-out
    /// input) and the input gradient's product.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Rows per block: about 16K elements of the input (64 KiB), at least 8 rows.
fn block_rows(inp: usize) -> usize {
    (16384 / inp.max(1)).clamp(8, 256)
}

/// `H = [sᵢ·(dropoutᵢ(x)) Aᵢᵀ]ᵢ` for 2-D `x` `(rows, in)` and the adapters' `A`s stacked
/// along their rows, `a` `(Σ rᵢ, in)`. Differentiable in `x` and `a`.
pub fn down(x: &Tensor, a: &Tensor, parts: &[Part]) -> Result<Tensor> {
    let (rows, inp) = x.dims2()?;
    let total: usize = parts.iter().map(|p| p.r).sum();
    if a.dims2()? != (total, inp) || !fusable(&[x, a]) {
        return Err(Error::Msg(format!(
            "LoRA down: A {:?} for input {:?} and ranks {:?}",
            a.dims(),
            x.dims(),
            parts.iter().map(|p| p.r).collect::<Vec<_>>()
        )));
    }
    let op = Down {
        parts: parts.to_vec(),
        rows,
        inp,
        total,
    };
    Ok(x.contiguous()?.apply_op2(&a.contiguous()?, op)?)
}

struct Down {
    parts: Vec<Part>,
    rows: usize,
    inp: usize,
    total: usize,
}

impl Down {
    /// First column of each part in `H` (first row in the stacked `A`).
    fn offsets(&self) -> Vec<usize> {
        self.parts
            .iter()
            .scan(0, |acc, p| {
                let at = *acc;
                *acc += p.r;
                Some(at)
            })
            .collect()
    }

    /// The dropout multipliers of part `p` for rows `r0..r0 + n`, times `x`'s rows, into
    /// `buf` (`n·in`).
    fn dropped(&self, d: Dropout, x: &[f32], r0: usize, n: usize, buf: &mut [f32]) {
        let inp = self.inp;
        fused::fill_multipliers(d, &[self.rows, inp], r0 * inp, buf);
        buf.iter_mut()
            .zip(&x[r0 * inp..(r0 + n) * inp])
            .for_each(|(m, x)| *m *= x);
    }

    fn forward(&self, x: &[f32], a: &[f32]) -> Vec<f32> {
        let (rows, inp, total) = (self.rows, self.inp, self.total);
        let block = block_rows(inp);
        let offs = self.offsets();
        let n_out = rows * total;
        // Safety: block t writes rows t·block.. of every part's columns, all of them.
        unsafe {
            filled(n_out, |h| {
                let h = Out(h, n_out);
                par_for(rows.div_ceil(block), rows * inp >= PAR_MIN, |t| {
                    let r0 = t * block;
                    let n = block.min(rows - r0);
                    with_scratch(&SCRATCH, 2 * block * inp, |s| {
                        let buf = &mut s[..n * inp];
                        for (p, &c) in self.parts.iter().zip(&offs) {
                            let src = match p.dropout {
                                Some(d) => {
                                    self.dropped(d, x, r0, n, buf);
                                    buf.as_ptr()
                                }
                                None => x[r0 * inp..].as_ptr(),
                            };
                            sgemm(
                                n,
                                p.r,
                                inp,
                                h.ptr().add(r0 * total + c),
                                total,
                                false,
                                Mat::rows(src, inp),
                                Mat::rows_t(a[c * inp..].as_ptr(), inp),
                                p.scale,
                                false,
                            );
                        }
                    });
                });
            })
        }
    }

    /// `(dx, dA)` from `dH` `(rows, Σ rᵢ)`: `dx = Σᵢ maskᵢ ⊙ (sᵢ·dHᵢ Aᵢ)`, `dAᵢ = sᵢ·dHᵢᵀ
    /// dropoutᵢ(x)`, the latter summed over the row blocks in order (the same numbers
    /// whatever the threads).
    fn backward(&self, x: &[f32], a: &[f32], dh: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (rows, inp, total) = (self.rows, self.inp, self.total);
        let block = block_rows(inp);
        let blocks = rows.div_ceil(block);
        let offs = self.offsets();
        let per = total * inp;
        let mut partial = vec![0f32; blocks * per];
        let pa = Out::new(&mut partial);
        // Safety: block t writes its rows of dx (all of them: the first part without
        // accumulating) and its own partial dA.
        let dx = unsafe {
            filled(rows * inp, |dx| {
                let dx = Out(dx, rows * inp);
                par_for(blocks, rows * inp >= PAR_MIN, |t| {
                    let r0 = t * block;
                    let n = block.min(rows - r0);
                    let dxb = dx.part(r0 * inp, n * inp);
                    let da = pa.part(t * per, per);
                    with_scratch(&SCRATCH, 2 * block * inp, |s| {
                        let (buf, tmp) = s.split_at_mut(block * inp);
                        let (buf, tmp) = (&mut buf[..n * inp], &mut tmp[..n * inp]);
                        for (i, (p, &c)) in self.parts.iter().zip(&offs).enumerate() {
                            let dhp = Mat::rows(dh[r0 * total + c..].as_ptr(), total);
                            let ap = Mat::rows(a[c * inp..].as_ptr(), inp);
                            let src = match p.dropout {
                                Some(d) => {
                                    // s·dH A into tmp, masked into dx.
                                    sgemm(
                                        n,
                                        inp,
                                        p.r,
                                        tmp.as_mut_ptr(),
                                        inp,
                                        false,
                                        dhp,
                                        ap,
                                        p.scale,
                                        false,
                                    );
                                    fused::fill_multipliers(d, &[rows, inp], r0 * inp, buf);
                                    if i == 0 {
                                        dxb.iter_mut()
                                            .zip(buf.iter().zip(tmp.iter()))
                                            .for_each(|(o, (m, v))| *o = m * v);
                                    } else {
                                        dxb.iter_mut()
                                            .zip(buf.iter().zip(tmp.iter()))
                                            .for_each(|(o, (m, v))| *o += m * v);
                                    }
                                    buf.iter_mut()
                                        .zip(&x[r0 * inp..(r0 + n) * inp])
                                        .for_each(|(m, x)| *m *= x);
                                    buf.as_ptr()
                                }
                                None => {
                                    sgemm(
                                        n,
                                        inp,
                                        p.r,
                                        dxb.as_mut_ptr(),
                                        inp,
                                        i > 0,
                                        dhp,
                                        ap,
                                        p.scale,
                                        false,
                                    );
                                    x[r0 * inp..].as_ptr()
                                }
                            };
                            // s·dHᵀ dropout(x) over this block's rows.
                            sgemm(
                                p.r,
                                inp,
                                n,
                                da[c * inp..].as_mut_ptr(),
                                inp,
                                false,
                                Mat::rows_t(dh[r0 * total + c..].as_ptr(), total),
                                Mat::rows(src, inp),
                                p.scale,
                                false,
                            );
                        }
                    });
                });
            })
        };
        let mut da = partial[..per].to_vec();
        for p in partial.chunks(per).skip(1) {
            da.iter_mut().zip(p).for_each(|(d, v)| *d += v);
        }
        (dx, da)
    }
}

impl CustomOp2 for Down {
    fn name(&self) -> &'static str {
        "ferrotune-lora-down"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = self.forward(f32_data(s1, l1)?, f32_data(s2, l2)?);
        Ok((CpuStorage::F32(h), Shape::from((self.rows, self.total))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, da) = with_f32(x, |x| {
            with_f32(a, |a| with_f32(grad, |dh| self.backward(x, a, dh)))
        })???;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(dx, (self.rows, self.inp), dev)?),
            Some(Tensor::from_vec(da, (self.total, self.inp), dev)?),
        ))
    }
}

/// `y + [Hᵢ Bᵢᵀ]ᵢ`: `y` `(rows, cols)` the base output, `h` `(rows, Σ rᵢ)` from [`down`],
/// `b` the adapters' `B`s `(outᵢ, r)` stacked along their rows, both in the order of
/// `parts`; each part's product is added to its columns of `y`. Differentiable in all
/// three.
pub fn up_add(y: &Tensor, h: &Tensor, b: &Tensor, parts: &[UpPart]) -> Result<Tensor> {
    let (rows, cols) = y.dims2()?;
    let (hr, total) = h.dims2()?;
    let (b_rows, r) = b.dims2()?;
    let mut b_row = 0;
    let slots: Vec<Slot> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let s = Slot {
                y_col: p.y_col,
                out: p.out,
                h_col: i * r,
                b_row,
            };
            b_row += p.out;
            s
        })
        .collect();
    let fits = parts.iter().all(|p| p.y_col + p.out <= cols)
        && parts.len() * r == total
        && b_row == b_rows;
    if hr != rows || !fits || !fusable(&[y, h, b]) {
        return Err(Error::Msg(format!(
            "LoRA up: y {:?}, H {:?}, B {:?} do not fit the adapters",
            y.dims(),
            h.dims(),
            b.dims()
        )));
    }
    let op = Up {
        parts: slots,
        rows,
        cols,
        total,
        r,
        b_rows,
    };
    Ok(y.contiguous()?
        .apply_op3(&h.contiguous()?, &b.contiguous()?, op)?)
}

struct Up {
    parts: Vec<Slot>,
    rows: usize,
    cols: usize,
    total: usize,
    r: usize,
    b_rows: usize,
}

impl CustomOp3 for Up {
    fn name(&self) -> &'static str {
        "ferrotune-lora-up"
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
        let (y, h, b) = (f32_data(s1, l1)?, f32_data(s2, l2)?, f32_data(s3, l3)?);
        // The base output copied on the pool: single-threaded, this copy was ~1% of a
        // SmolLM2 LoRA step with the other core waiting.
        let mut out = map_parts(y, 1 << 14, |_, src, dst| dst.copy_from_slice(src));
        for p in &self.parts {
            // Safety: the parts' columns do not overlap; `out`, `h`, `b` are distinct.
            unsafe {
                sgemm(
                    self.rows,
                    p.out,
                    self.r,
                    out.as_mut_ptr().add(p.y_col),
                    self.cols,
                    true,
                    Mat::rows(h[p.h_col..].as_ptr(), self.total),
                    Mat::rows_t(b[p.b_row * self.r..].as_ptr(), self.r),
                    1.0,
                    true,
                )
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((self.rows, self.cols))))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        h: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, cols, total, r) = (self.rows, self.cols, self.total, self.r);
        let (dh, db) = with_f32(h, |h| {
            with_f32(b, |b| {
                with_f32(grad, |g| {
                    let mut dh = vec![0f32; rows * total];
                    let mut db = vec![0f32; self.b_rows * r];
                    for p in &self.parts {
                        // Safety: each part writes its own columns of dh and rows of dB.
                        unsafe {
                            // dHᵢ = dyᵢ Bᵢ
                            sgemm(
                                rows,
                                r,
                                p.out,
                                dh.as_mut_ptr().add(p.h_col),
                                total,
                                false,
                                Mat::rows(g[p.y_col..].as_ptr(), cols),
                                Mat::rows(b[p.b_row * r..].as_ptr(), r),
                                1.0,
                                true,
                            );
                            // dBᵢ = dyᵢᵀ Hᵢ
                            sgemm(
                                p.out,
                                r,
                                rows,
                                db.as_mut_ptr().add(p.b_row * r),
                                r,
                                false,
                                Mat::rows_t(g[p.y_col..].as_ptr(), cols),
                                Mat::rows(h[p.h_col..].as_ptr(), total),
                                1.0,
                                true,
                            );
                        }
                    }
                    (dh, db)
                })
            })
        })???;
        let dev = grad.device();
        Ok((
            Some(grad.clone()),
            Some(Tensor::from_vec(dh, (rows, total), dev)?),
            Some(Tensor::from_vec(db, (self.b_rows, r), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::tests::randn;
    use candle_core::Var;

    /// The fused ops against the composition `y + [sᵢ·(dropoutᵢ(x) Aᵢᵀ) Bᵢᵀ]` (one layer
    /// of four without an adapter), forward and every gradient, with and without dropout,
    /// on shapes that split into several row blocks (and one that does not).
    #[test]
    fn fused_adapters_match_the_composition() {
        for (rows, inp, drop) in [(37, 2048, true), (300, 24, true), (45, 96, false)] {
            let r = 3;
            let outs = [5usize, 7, 4, 9];
            let adapted = [true, false, true, true];
            let cols: usize = outs.iter().sum();
            let x = Var::from_tensor(&randn(&[rows, inp], 1)).unwrap();
            let y = Var::from_tensor(&randn(&[rows, cols], 2)).unwrap();
            let mut a = vec![];
            let mut b = vec![];
            let mut parts = vec![];
            for (i, &o) in outs.iter().enumerate() {
                a.push(
                    Var::from_tensor(&(randn(&[r, inp], 10 + i as u64) * 0.1).unwrap()).unwrap(),
                );
                b.push(Var::from_tensor(&randn(&[o, r], 20 + i as u64)).unwrap());
                parts.push(Part {
                    r,
                    scale: 0.5 + i as f32,
                    dropout: drop.then_some(Dropout {
                        p: 0.3,
                        seed: 99 + i as u64,
                        row0: 0,
                        tokens: (1, rows),
                    }),
                });
            }
            let probe = randn(&[rows, cols], 3);

            // The composition.
            let deltas: Vec<Tensor> = (0..4)
                .map(|i| {
                    if !adapted[i] {
                        return Tensor::zeros((rows, outs[i]), candle_core::DType::F32, x.device())
                            .unwrap();
                    }
                    let xd = match parts[i].dropout {
                        Some(d) => fused::dropout(x.as_tensor(), d).unwrap(),
                        None => x.as_tensor().clone(),
                    };
                    let h =
                        (xd.matmul(&a[i].t().unwrap()).unwrap() * parts[i].scale as f64).unwrap();
                    h.matmul(&b[i].t().unwrap()).unwrap()
                })
                .collect();
            let want = (y.as_tensor() + Tensor::cat(&deltas, 1).unwrap()).unwrap();

            // The fused ops.
            let idx: Vec<usize> = (0..4).filter(|&i| adapted[i]).collect();
            let mut up = vec![];
            let mut y_col = 0;
            for (i, &o) in outs.iter().enumerate() {
                if adapted[i] {
                    up.push(UpPart { y_col, out: o });
                }
                y_col += o;
            }
            let a_cat = Tensor::cat(
                &idx.iter().map(|&i| a[i].as_tensor()).collect::<Vec<_>>(),
                0,
            )
            .unwrap();
            let b_cat = Tensor::cat(
                &idx.iter().map(|&i| b[i].as_tensor()).collect::<Vec<_>>(),
                0,
            )
            .unwrap();
            let down_parts: Vec<Part> = idx.iter().map(|&i| parts[i]).collect();
            let h = down(x.as_tensor(), &a_cat, &down_parts).unwrap();
            let got = up_add(y.as_tensor(), &h, &b_cat, &up).unwrap();

            let close = |g: &Tensor, w: &Tensor, what: &str| {
                let (g, w) = (
                    g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                assert_eq!(g.len(), w.len(), "{what}");
                let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                let err = g
                    .iter()
                    .zip(&w)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    err <= 2e-5 * scale,
                    "{what} ({rows}×{inp}): max error {err} of scale {scale}"
                );
            };
            close(&got, &want, "output");
            let gw = (want * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gg = (&got * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            close(gg.get(&x).unwrap(), gw.get(&x).unwrap(), "dx");
            close(gg.get(&y).unwrap(), gw.get(&y).unwrap(), "dy");
            for &i in &idx {
                close(
                    gg.get(&a[i]).unwrap(),
                    gw.get(&a[i]).unwrap(),
                    &format!("dA{i}"),
                );
                close(
                    gg.get(&b[i]).unwrap(),
                    gw.get(&b[i]).unwrap(),
                    &format!("dB{i}"),
                );
            }
            // Dropout really dropped: without it the output differs.
            if drop {
                let nodrop: Vec<Part> = down_parts
                    .iter()
                    .map(|p| Part {
                        dropout: None,
                        ..*p
                    })
                    .collect();
                let h2 = down(x.as_tensor(), &a_cat, &nodrop).unwrap();
                let other = up_add(y.as_tensor(), &h2, &b_cat, &up).unwrap();
                let diff = (other - &got)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff > 1e-3, "dropout changed nothing");
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let x = randn(&[4, 8], 1);
        let part = Part {
            r: 2,
            scale: 1.0,
            dropout: None,
        };
        assert!(down(&x, &randn(&[3, 8], 2), &[part]).is_err());
        let h = down(&x, &randn(&[2, 8], 2), &[part]).unwrap();
        let up = [UpPart { y_col: 4, out: 3 }];
        assert!(up_add(&randn(&[4, 6], 3), &h, &randn(&[3, 2], 4), &up).is_err());
    }
}

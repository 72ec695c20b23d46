//! The embedding lookup as a candle custom op whose backward writes into the gradient
//! sink (issue 4).
//!
//! candle's `embedding` is an `index_select`; its backward adds the rows into a fresh zeros
//! tensor the size of the whole table, through `index_add`, which copies that table once
//! more, and the trainer copies the result a third time. For bert-base's word embeddings
//! (30 522 × 768, 94 MB; MiniLM's 47 MB) those are allocations above glibc's mmap threshold:
//! every step page-faulted ~190 MB of fresh zeroed memory (`clear_page_erms` was 3.5% of a
//! bert-base step). Here, when a [`grad_sink`] holds the table, the backward clears the
//! trainer's own buffer (or keeps it, when accumulating) and adds each token's gradient row
//! into it, in token order (repeatable); otherwise it builds the same gradient as a tensor.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::grad_sink;
use super::par::{f32_data, filled, par_for, with_f32, Out, PAR_MIN};
use crate::error::Result;

/// Rows `ids` of `table` (`(vocab, dim)`), shape `(ids.len(), dim)`. Differentiable in the
/// table. An id outside the table is an error.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let fusable = table.device().is_cpu()
        && table.dtype() == DType::F32
        && table.rank() == 2
        && ids.rank() == 1
        && ids.dtype() == DType::U32;
    if !fusable {
        return Ok(table.embedding(ids)?);
    }
    let op = EmbeddingOp {
        grad: table.track_op() || grad_sink::holds(table),
    };
    Ok(table.contiguous()?.apply_op2(&ids.contiguous()?, op)?)
}

struct EmbeddingOp {
    /// The table needs a gradient (from candle, or for the gradient sink).
    grad: bool,
}

impl CustomOp2 for EmbeddingOp {
    fn name(&self) -> &'static str {
        "ferrotune-embedding"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let table = f32_data(s1, l1)?;
        let (vocab, dim) = l1.shape().dims2()?;
        let ids = match l2.contiguous_offsets() {
            Some((a, b)) => &s2.as_slice::<u32>()?[a..b],
            None => candle_core::bail!("embedding: non-contiguous ids"),
        };
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            candle_core::bail!("embedding: token id {bad} is outside the table of {vocab} rows");
        }
        let n = ids.len() * dim;
        // Safety: every token's row is written whole, by its task only.
        let out = unsafe {
            filled(n, |p| {
                let o = Out(p, n);
                par_for(ids.len(), n >= PAR_MIN, |t| {
                    let row = ids[t] as usize * dim;
                    o.part(t * dim, dim).copy_from_slice(&table[row..row + dim]);
                });
            })
        };
        Ok((CpuStorage::F32(out), Shape::from((ids.len(), dim))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !self.grad {
            return Ok((None, None));
        }
        let (vocab, dim) = table.dims2()?;
        let ids = ids.to_vec1::<u32>()?;
        // Rows `row0..row0 + rows` of the table's gradient into `dst`.
        let scatter = |dy: &[f32], row0: usize, rows: usize, dst: *mut f32, acc: bool| {
            let n = rows * dim;
            // Safety: `dst` holds `rows` rows (the sink's slot, or a fresh buffer).
            let dst = unsafe { std::slice::from_raw_parts_mut(dst, n) };
            if !acc {
                const CHUNK: usize = 1 << 16;
                let o = Out::new(dst);
                // Safety: chunk i is cleared by this task only.
                par_for(n.div_ceil(CHUNK), n >= PAR_MIN, |i| unsafe {
                    o.part(i * CHUNK, CHUNK).fill(0.0)
                });
            }
            for (t, &id) in ids.iter().enumerate() {
                let r = id as usize;
                if (row0..row0 + rows).contains(&r) {
                    let d = &mut dst[(r - row0) * dim..(r - row0 + 1) * dim];
                    d.iter_mut()
                        .zip(&dy[t * dim..(t + 1) * dim])
                        .for_each(|(d, g)| *d += g);
                }
            }
        };
        let dtable = with_f32(grad, |dy| {
            if grad_sink::write_rows(table, dim, |r0, rows, dst, acc| {
                scatter(dy, r0, rows, dst, acc)
            }) {
                None
            } else {
                let mut v = vec![0f32; vocab * dim];
                scatter(dy, 0, vocab, v.as_mut_ptr(), true);
                Some(v)
            }
        })?;
        let dtable = dtable
            .map(|v| Tensor::from_vec(v, (vocab, dim), table.device()))
            .transpose()?;
        Ok((dtable, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fused::tests::{grads_of, max_diff, randn};
    use candle_core::{Device, Var};

    /// Forward and gradient equal candle's `embedding` (repeated ids included); an id
    /// outside the table is an error, not a panic.
    #[test]
    fn embedding_matches_candle() {
        let table = Var::from_tensor(&randn(&[11, 5], 1)).unwrap();
        let ids = Tensor::new(&[3u32, 0, 10, 3, 3, 7], &Device::Cpu).unwrap();
        let up = randn(&[6, 5], 2);
        let y = embedding(&table, &ids).unwrap();
        let r = table.as_tensor().embedding(&ids).unwrap();
        assert_eq!(max_diff(&y, &r), 0.0);
        let (g, gr) = (grads_of(y, &up), grads_of(r, &up));
        assert!(max_diff(g.get(&table).unwrap(), gr.get(&table).unwrap()) < 1e-6);
        let bad = Tensor::new(&[11u32], &Device::Cpu).unwrap();
        let e = embedding(&table, &bad).unwrap_err().to_string();
        assert!(e.contains("token id 11"), "{e}");
    }
}

//! Parameter gradients written straight into the trainer's buffers (issue 4).
//!
//! candle's backward keeps every gradient in its `GradStore`: the first contribution to a
//! tensor's gradient is added to a fresh zeros tensor, and the trainer then copies the sum
//! into its own buffer. For the weight matrices that is a memset, an add and a copy over
//! every parameter on every step (bert-base: ~85 M weights, ~2 GB of memory traffic).
//!
//! While a [`GradSink`] is installed on the thread running the backward pass, the fused
//! linear layer ([`super::linear`]) writes its weight and bias gradients with the GEMM
//! straight into the trainer's buffers — overwriting them on the first contribution of the
//! pass (or adding, when accumulating gradients over several batches), adding after — and
//! gives candle nothing for them. Gradients of other tensors still come from candle's store;
//! the trainer merges the two ([`crate::train::step::loss_and_grads_into`]).
//!
//! The query, key and value weights run as one GEMM over their concatenation; [`concat`]
//! makes that concatenation a leaf variable whose gradient belongs, row block by row
//! block, to the three parameters.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{DType, Tensor, TensorId, Var};

use super::par::with_f32;

/// Part of a tensor's gradient: elements `start..start + len` of the tensor are slot
/// `slot`'s whole buffer.
struct Segment {
    slot: usize,
    start: usize,
    len: usize,
}

/// Gradient buffers, one slot per parameter, that fused operations write into during a
/// backward pass (see the module documentation).
pub struct GradSink {
    bufs: Vec<Option<Vec<f32>>>,
    sizes: Vec<usize>,
    /// The next write to the slot adds to the buffer (else it overwrites it).
    accumulate: Vec<bool>,
    /// The slot was written during this pass.
    wrote: Vec<bool>,
    index: HashMap<TensorId, Vec<Segment>>,
}

thread_local! {
    static SINK: RefCell<Option<GradSink>> = const { RefCell::new(None) };
}

impl GradSink {
    /// A sink over `bufs`, one slot per entry of `tensors` (a `None` tensor takes no
    /// gradient here). With `add`, gradients are added to the buffers (those of the right
    /// size); else the first contribution of the pass overwrites them. A slot without a
    /// buffer gets one at its first write.
    pub fn new(tensors: &[Option<&Tensor>], mut bufs: Vec<Option<Vec<f32>>>, add: bool) -> Self {
        let n = tensors.len().min(bufs.len());
        let mut index = HashMap::new();
        let mut sizes = vec![0; bufs.len()];
        let mut accumulate = vec![false; bufs.len()];
        for (i, t) in tensors.iter().enumerate().take(n) {
            let Some(t) = t else { continue };
            if t.dtype() != DType::F32 || !t.device().is_cpu() {
                continue;
            }
            let len = t.elem_count();
            sizes[i] = len;
            accumulate[i] = add && bufs[i].as_ref().is_some_and(|b| b.len() == len);
            if !accumulate[i] && bufs[i].as_ref().is_some_and(|b| b.len() != len) {
                bufs[i] = None;
            }
            index.insert(
                t.id(),
                vec![Segment {
                    slot: i,
                    start: 0,
                    len,
                }],
            );
        }
        let wrote = vec![false; bufs.len()];
        GradSink {
            bufs,
            sizes,
            accumulate,
            wrote,
            index,
        }
    }

    /// Runs `f` with this sink installed on the current thread; returns `f`'s result and
    /// the sink.
    pub fn run<R>(self, f: impl FnOnce() -> R) -> (R, Self) {
        /// Uninstalls the sink even if `f` panics.
        struct Installed;
        impl Drop for Installed {
            fn drop(&mut self) {
                SINK.with(|s| s.borrow_mut().take());
            }
        }
        SINK.with(|s| *s.borrow_mut() = Some(self));
        let guard = Installed;
        let r = f();
        let sink = SINK.with(|s| s.borrow_mut().take());
        drop(guard);
        (
            r,
            sink.expect("the gradient sink is installed while `run` runs"),
        )
    }

    /// The buffers, and for each slot whether this pass wrote it.
    pub fn into_parts(self) -> (Vec<Option<Vec<f32>>>, Vec<bool>) {
        (self.bufs, self.wrote)
    }
}

/// `parts` concatenated along their first dimension. When a sink is installed and holds
/// every part, the result is a fresh leaf variable (tracked, so that whatever it feeds
/// gets a backward pass, but asked for no gradient by candle) whose gradient goes, row
/// block by row block, straight to the parts' buffers; otherwise it is candle's tracked
/// concatenation.
pub(crate) fn concat(parts: &[&Tensor]) -> candle_core::Result<Tensor> {
    let segs = SINK.with(|s| {
        let s = s.borrow();
        let sink = s.as_ref()?;
        let mut segs = Vec::with_capacity(parts.len());
        let mut start = 0;
        for p in parts {
            match sink.index.get(&p.id()).map(Vec::as_slice) {
                Some([seg]) if seg.start == 0 && seg.len == p.elem_count() => segs.push(Segment {
                    slot: seg.slot,
                    start,
                    len: seg.len,
                }),
                _ => return None,
            }
            start += p.elem_count();
        }
        Some(segs)
    });
    let (Some(segs), Some(first)) = (segs, parts.first()) else {
        return Tensor::cat(parts, 0);
    };
    let mut dims = first.dims().to_vec();
    dims[0] = parts.iter().map(|p| p.dims()[0]).sum();
    let mut data = Vec::with_capacity(dims.iter().product());
    for p in parts {
        with_f32(p, |d| data.extend_from_slice(d))?;
    }
    let leaf = Var::from_vec(data, dims, first.device())?;
    SINK.with(|s| {
        if let Some(sink) = s.borrow_mut().as_mut() {
            sink.index.insert(leaf.id(), segs);
        }
    });
    Ok(leaf.as_tensor().clone())
}

/// Whether the installed sink takes the gradient of `t`.
pub(crate) fn holds(t: &Tensor) -> bool {
    SINK.with(|s| {
        s.borrow()
            .as_ref()
            .is_some_and(|s| s.index.contains_key(&t.id()))
    })
}

/// Hands the gradient of `t`, seen as a row-major matrix with `cols` columns, to the
/// installed sink: for each block of rows that belongs to one slot, `write(row0, rows, dst,
/// accumulate)` must write rows `row0..row0 + rows` of the gradient to `dst` (row stride
/// `cols`), adding to what is there when `accumulate`. Returns `false`, calling nothing,
/// when no sink holds `t`: the caller then returns the gradient to candle.
pub(crate) fn write_rows(
    t: &Tensor,
    cols: usize,
    mut write: impl FnMut(usize, usize, *mut f32, bool),
) -> bool {
    SINK.with(|s| {
        let mut s = s.borrow_mut();
        let Some(sink) = s.as_mut() else {
            return false;
        };
        let GradSink {
            bufs,
            sizes,
            accumulate,
            wrote,
            index,
        } = sink;
        let Some(segs) = index.get(&t.id()) else {
            return false;
        };
        let whole: usize = segs.iter().map(|g| g.len).sum();
        if cols == 0
            || whole != t.elem_count()
            || segs
                .iter()
                .any(|g| g.start % cols != 0 || g.len % cols != 0)
        {
            return false;
        }
        for g in segs {
            let buf = bufs[g.slot].get_or_insert_with(|| vec![0.0; sizes[g.slot]]);
            write(
                g.start / cols,
                g.len / cols,
                buf.as_mut_ptr(),
                accumulate[g.slot],
            );
            accumulate[g.slot] = true;
            wrote[g.slot] = true;
        }
        true
    })
}

/// [`write_rows`] for a gradient already computed: `src`, row-major with `cols` columns,
/// copied into the sink's buffers (added to them when accumulating). Returns `false`,
/// writing nothing, when no sink holds `t` or `src` is not its size.
pub(crate) fn write_slice(t: &Tensor, cols: usize, src: &[f32]) -> bool {
    if src.len() != t.elem_count() {
        return false;
    }
    write_rows(t, cols, |row0, rows, dst, acc| {
        let src = &src[row0 * cols..(row0 + rows) * cols];
        // Safety: the sink's buffer for these rows holds `rows · cols` elements.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst, rows * cols) };
        if acc {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        } else {
            dst.copy_from_slice(src);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], rows: usize) -> Tensor {
        Tensor::from_slice(v, (rows, v.len() / rows), &Device::Cpu).unwrap()
    }

    /// Writes overwrite first and add after; aliases split rows between the parts; a tensor
    /// not in the sink, or no sink at all, is refused.
    #[test]
    fn writes_overwrite_then_add_and_aliases_split_rows() {
        let (a, b, other) = (t(&[0.0; 4], 2), t(&[0.0; 2], 1), t(&[0.0; 2], 1));
        let bufs = vec![Some(vec![9.0; 4]), None, None];
        let sink = GradSink::new(&[Some(&a), Some(&b), None], bufs, false);
        let fill = |row0: usize, rows: usize, dst: *mut f32, acc: bool| {
            for r in 0..rows {
                for c in 0..2 {
                    let v = (10 * (row0 + r) + c) as f32;
                    let d = unsafe { &mut *dst.add(r * 2 + c) };
                    *d = if acc { *d + v } else { v };
                }
            }
        };
        let (_, sink) = sink.run(|| {
            assert!(write_rows(&a, 2, fill));
            assert!(write_rows(&a, 2, fill));
            let cat = concat(&[&a, &b]).unwrap();
            assert!(cat.is_variable() && holds(&cat));
            assert!(write_rows(&cat, 2, fill));
            assert!(!write_rows(&other, 2, fill));
            assert!(!write_rows(&a, 3, fill), "rows that straddle a slot");
        });
        assert!(!write_rows(&a, 2, fill), "no sink installed");
        assert!(!holds(&concat(&[&a, &b]).unwrap()));
        let (bufs, wrote) = sink.into_parts();
        // a: 2 x (rows 0, 1) + rows 0, 1 of the concatenation; b: row 2 of it.
        assert_eq!(bufs[0].as_deref(), Some(&[0.0, 3.0, 30.0, 33.0][..]));
        assert_eq!(bufs[1].as_deref(), Some(&[20.0, 21.0][..]));
        assert_eq!(bufs[2], None);
        assert_eq!(wrote, vec![true, true, false]);
    }

    /// With `add`, the first write adds to a buffer of the right size; a buffer of the wrong
    /// size is replaced.
    #[test]
    fn adding_keeps_buffers_of_the_right_size() {
        let (a, b) = (t(&[0.0; 2], 1), t(&[0.0; 2], 1));
        let bufs = vec![Some(vec![1.0; 2]), Some(vec![1.0; 3])];
        let sink = GradSink::new(&[Some(&a), Some(&b)], bufs, true);
        let ones = |_: usize, _: usize, dst: *mut f32, acc: bool| {
            for i in 0..2 {
                let d = unsafe { &mut *dst.add(i) };
                *d = if acc { *d + 1.0 } else { 1.0 };
            }
        };
        let (_, sink) = sink.run(|| {
            assert!(write_rows(&a, 2, ones));
            assert!(write_rows(&b, 2, ones));
        });
        let (bufs, _) = sink.into_parts();
        assert_eq!(bufs[0].as_deref(), Some(&[2.0, 2.0][..]));
        assert_eq!(bufs[1].as_deref(), Some(&[1.0, 1.0][..]));
    }
}

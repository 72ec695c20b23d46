//! Inference for any family: the one path that `ferrotune predict`, `ferrotune eval`, the
//! server and the trainer's per-epoch evaluation all use ([`infer_logits`]), and sentence
//! embeddings of a pretrained or fine-tuned backbone ([`embed`], `ferrotune embed`).

use candle_core::Device;

use crate::data::batch::{length_sorted_batches, Features};
use crate::data::{InputEncoder, TextEncoder};
use crate::error::Result;
use crate::families::{self, HeadSpec, HfConfig, Model};
use crate::nn::{Ctx, Pooling};
use crate::precision::Precision;

/// Head outputs for `items`, in input order, computed `batch_size` items at a time with the
/// items sorted by length so that each batch pads as little as possible. `on_batch(n)` is
/// called after each batch of `n` items. Linear layers run in `precision`
/// ([`Ctx::eval_with`]: int8, bf16, else f32).
pub fn infer_logits(
    model: &dyn Model,
    encoder: &dyn InputEncoder,
    items: &[Features],
    batch_size: usize,
    device: &Device,
    precision: Precision,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    let mut out = vec![Vec::new(); items.len()];
    for idx in length_sorted_batches(items, batch_size) {
        let refs: Vec<&Features> = idx.iter().map(|&i| &items[i]).collect();
        let batch = encoder.collate(&refs, device)?;
        let mut ctx = Ctx::eval_with(precision);
        let logits = model.forward(&mut ctx, &batch)?.to_vec2::<f32>()?;
        for (i, row) in idx.iter().zip(logits) {
            out[*i] = row;
        }
        on_batch(idx.len());
    }
    Ok(out)
}

/// Sentence embeddings of `items`, in input order: the backbone's last hidden states
/// pooled by `pooling` (`mean` over the non-padding tokens, as sentence-transformers; or
/// the first token's), L2-normalised when `normalize`. Computed `batch_size` items at a
/// time, sorted by length.
pub fn embed(
    model: &dyn Model,
    encoder: &dyn InputEncoder,
    items: &[Features],
    pooling: Pooling,
    normalize: bool,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let mut out = vec![Vec::new(); items.len()];
    for idx in length_sorted_batches(items, batch_size) {
        let refs: Vec<&Features> = idx.iter().map(|&i| &items[i]).collect();
        let batch = encoder.collate(&refs, device)?;
        let hidden = model.hidden_states(&mut Ctx::eval(), &batch)?;
        let mask = &batch.tokens()?.attention_mask;
        let mut pooled = pooling.pool(&hidden, mask)?;
        if normalize {
            let norm = pooled
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12, f64::MAX)?;
            pooled = pooled.broadcast_div(&norm)?;
        }
        for (i, row) in idx.iter().zip(pooled.to_vec2::<f32>()?) {
            out[*i] = row;
        }
    }
    Ok(out)
}

/// A backbone loaded for [`embed`] from a model directory (pretrained or fine-tuned; the
/// head, if any, is not used), and its encoder truncating to `max_len` tokens — by
/// default the `max_seq_length` of a sentence-transformers `sentence_bert_config.json`,
/// else the model's longest input (at most 512).
pub fn load_embedder(
    dir: &std::path::Path,
    max_len: Option<usize>,
    device: &Device,
) -> Result<(Box<dyn Model>, TextEncoder)> {
    let cfg = HfConfig::from_dir(dir)?;
    let family = families::family(&cfg)?;
    let longest = family.max_tokens(&cfg)?;
    let st_max = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v.get("max_seq_length").and_then(|m| m.as_u64()))
        .map(|m| m as usize);
    let max_len = max_len.or(st_max).unwrap_or(512).min(longest);
    // The head is not used (the hidden states are pooled here): the family's default.
    let head = HeadSpec::new(1);
    let loaded = families::load_weights(&cfg, family, dir, &head, 0, device)?;
    Ok((loaded.model, TextEncoder::load(dir, max_len)?))
}

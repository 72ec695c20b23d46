//! Causal-language-model fine-tuning (`problem_type = "causal_lm"` in a recipe): the
//! next-token loss, evaluation as loss and perplexity, and the preparation of a run from
//! text, prompt/completion or conversation data ([`crate::data::lm`]).
//!
//! **The loss** is transformers' `ForCausalLMLoss`: token-level cross-entropy of the
//! logits at position `t` against the label at `t + 1`, over the positions whose next
//! label is not [`IGNORE_INDEX`], averaged over those tokens. It runs as one fused
//! operation ([`lm_loss`]) on the `(tokens, vocab)` logits: the forward pass computes each
//! counted row's log-sum-exp without storing a log-softmax, and the backward pass writes
//! the one `(tokens, vocab)` gradient `(softmax − one-hot) / count` — for SmolLM2's 49152
//! tokens, no second or third logits-sized tensor is made.
//!
//! **Gradient accumulation** weights each micro-batch's mean loss by its share of the
//! counted tokens of the whole accumulation window ([`TargetData::weight`]), so the summed
//! gradient is that of the token mean over the window — what one batch holding the whole
//! window computes (transformers does the same with `num_items_in_batch`). Packed blocks
//! all count `block_size − 1` tokens, so there this equals weighting by examples.
//!
//! **Evaluation** sums each sequence's negative log-likelihood and counted tokens;
//! `eval_loss` is the sum over the whole evaluation set divided by its tokens, and
//! `perplexity` is `exp(eval_loss)` (run_clm's `math.exp(eval_loss)`). The best epoch is
//! the one of lowest `eval_loss` unless `metric_for_best_model` says otherwise.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;

use crate::data::batch::{make_batch, Features};
use crate::data::labels::LabelMap;
use crate::data::lm::{
    eos_id, pad_id, ChatTemplate, LmContent, LmItem, LmRow, LmTokenizer, IGNORE_INDEX,
};
use crate::data::reader::Example;
use crate::data::InputEncoder;
use crate::error::{Error, Result};
use crate::families::Model;
use crate::kernels::par::with_f32;
use crate::loss::{check_targets, row_nll, LossConfig, LossKind};
pub use crate::loss::{lm_loss, lm_loss_composed, shifted_targets};
use crate::nn::{Batch, Ctx};
use crate::tasks::{mismatch, Evaluation, TargetData, Task};

/// The causal-language-model task.
pub struct CausalLm;

/// The recipe's name of the task.
pub const NAME: &str = "causal_lm";

impl Task for CausalLm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn language_model(&self) -> bool {
        true
    }

    /// No labels: the targets are the text itself.
    fn label_map(&self, _: &[Example], _: &Path, _: &str, _: Option<&str>) -> Result<LabelMap> {
        Ok(LabelMap::from_labels(Vec::new()))
    }

    fn encode_targets(
        &self,
        _: &LabelMap,
        _: &[Example],
        _: &Path,
        _: &str,
        _: Option<&str>,
    ) -> Result<TargetData> {
        Err(Error::Msg(
            "internal: causal-LM targets come from the text (data::lm), not a label column".into(),
        ))
    }

    fn stratum(&self, _: &Example) -> String {
        String::new()
    }

    fn default_loss(&self) -> LossKind {
        LossKind::CrossEntropy
    }

    fn fits(&self, loss: LossKind) -> bool {
        loss == LossKind::CrossEntropy
    }

    fn default_metric(&self) -> &'static str {
        "loss"
    }

    fn metric(&self, name: &str) -> Option<(&'static str, bool)> {
        match name {
            "loss" => Some(("loss", false)),
            "perplexity" | "ppl" => Some(("perplexity", false)),
            _ => None,
        }
    }

    /// `rows` are each sequence's `[negative log-likelihood sum, counted tokens]`
    /// ([`nll_rows`]): `loss` is their token mean, `perplexity` its exponential.
    fn evaluate(
        &self,
        rows: &[Vec<f32>],
        targets: &TargetData,
        _: &LossConfig,
        _: f64,
    ) -> Result<Evaluation> {
        if !matches!(targets, TargetData::Tokens(_)) {
            return Err(mismatch());
        }
        Ok(Evaluation {
            metrics: lm_metrics(rows),
            report: None,
        })
    }

    fn headline(&self) -> &'static [&'static str] {
        &["loss", "perplexity"]
    }

    /// A sequence's `[nll sum, tokens]` → `[mean nll]`.
    fn activate(&self, row: &[f32]) -> Vec<f32> {
        match row {
            [sum, n] if *n > 0.0 => vec![sum / n],
            _ => vec![f32::NAN],
        }
    }

    fn format(&self, _: &[String], _: &[Vec<f32>], _: f64, _: bool) -> Result<Vec<u8>> {
        Err(Error::Config(
            "a causal language model has no class predictions; `ferrotune eval` gives its \
             loss and perplexity"
                .into(),
        ))
    }
}

/// `loss` (the token mean of the negative log-likelihood), `perplexity` and `tokens` of
/// per-sequence `[nll sum, tokens]` rows.
pub fn lm_metrics(rows: &[Vec<f32>]) -> BTreeMap<String, f64> {
    let (sum, n) = rows.iter().fold((0f64, 0f64), |(s, n), r| {
        (
            s + r.first().copied().unwrap_or(0.0) as f64,
            n + r.get(1).copied().unwrap_or(0.0) as f64,
        )
    });
    let loss = if n > 0.0 { sum / n } else { f64::NAN };
    BTreeMap::from([
        ("loss".to_string(), loss),
        ("perplexity".to_string(), loss.exp()),
        ("tokens".to_string(), n),
    ])
}

/// Each item's `[negative log-likelihood sum, counted tokens]` under `model`, computed
/// `batch_size` items at a time (sorted by length); `on_batch(n)` after each batch.
/// Only the per-row sums are kept, never a sequence's logits.
pub fn nll_rows(
    model: &dyn Model,
    encoder: &dyn InputEncoder,
    items: &[Features],
    labels: &[Vec<i64>],
    batch_size: usize,
    device: &Device,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    let mut out = vec![vec![0f32, 0f32]; items.len()];
    for idx in crate::data::batch::length_sorted_batches(items, batch_size) {
        let refs: Vec<&Features> = idx.iter().map(|&i| &items[i]).collect();
        let batch = encoder.collate(&refs, device)?;
        let mut ctx = Ctx::eval_with(crate::precision::Precision::F32);
        let logits = model.lm_logits(&mut ctx, &batch)?;
        let (rows, v) = logits.dims2()?;
        let s = rows / idx.len().max(1);
        let logits = logits.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let per = with_f32(&logits, |z| -> Result<Vec<(f32, f32)>> {
            let mut per = Vec::with_capacity(idx.len());
            for (b, &i) in idx.iter().enumerate() {
                let lab = &labels[i];
                let (mut sum, mut n) = (0f64, 0f32);
                for t in 0..lab.len().saturating_sub(1).min(s.saturating_sub(1)) {
                    let y = lab[t + 1];
                    if y == IGNORE_INDEX {
                        continue;
                    }
                    if y < 0 || y as usize >= v {
                        check_targets(&[y], v)?;
                    }
                    let r = b * s + t;
                    sum += row_nll(&z[r * v..(r + 1) * v], y as usize) as f64;
                    n += 1.0;
                }
                per.push((sum as f32, n));
            }
            Ok(per)
        })??;
        for (&i, (sum, n)) in idx.iter().zip(per) {
            out[i] = vec![sum, n];
        }
        on_batch(idx.len());
    }
    Ok(out)
}

/// Batches for a causal language model: token ids padded on the right with the model's
/// padding id ([`pad_id`]); the tokenizer has no truncation (packing cuts the text).
pub struct LmEncoder {
    lm: LmTokenizer,
    pad: u32,
    max_len: usize,
}

impl LmEncoder {
    /// The encoder of model directory `dir` for sequences of at most `block_size`.
    pub fn load(dir: &Path, block_size: usize) -> Result<LmEncoder> {
        let tok = crate::data::tokenizer::load_tokenizer(dir, block_size.max(4))?;
        let eos = eos_id(dir, &tok);
        let pad = pad_id(dir, eos, crate::data::batch::pad_id(&tok));
        let template = ChatTemplate::from_dir(dir)?;
        Ok(LmEncoder {
            lm: LmTokenizer::new(tok, eos, template)?,
            pad,
            max_len: block_size,
        })
    }

    /// The tokenizer with its EOS and chat template.
    pub fn lm(&self) -> &LmTokenizer {
        &self.lm
    }

    /// The padding id.
    pub fn pad(&self) -> u32 {
        self.pad
    }
}

/// A sequence as the trainer's item.
pub fn features(item: &LmItem) -> Features {
    Features {
        ids: item.ids.clone(),
        type_ids: vec![0; item.ids.len()],
        image: None,
    }
}

impl InputEncoder for LmEncoder {
    fn encode(&self, examples: &[Example]) -> Result<Vec<Features>> {
        examples
            .iter()
            .map(|e| {
                let row = LmRow {
                    id: e.id.clone(),
                    line: e.line,
                    content: LmContent::Text(e.text.clone()),
                };
                Ok(features(&self.lm.row_item(
                    &row,
                    self.max_len,
                    Path::new(""),
                )?))
            })
            .collect()
    }

    fn collate(&self, items: &[&Features], device: &Device) -> Result<Batch> {
        make_batch(items, self.pad, device)
    }

    fn max_len(&self) -> usize {
        self.max_len
    }

    fn tokenizer(&self) -> Option<&tokenizers::Tokenizer> {
        Some(&self.lm.tokenizer)
    }
}

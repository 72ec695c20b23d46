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

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use serde_json::json;

use crate::config::{OnBadRow, TrainConfig};
use crate::data::batch::{make_batch, Features};
use crate::data::labels::LabelMap;
use crate::data::lm::{
    eos_id, pad_id, read_lm_data, ChatTemplate, LmContent, LmData, LmFormat, LmItem, LmReadOptions,
    LmRow, LmTokenizer, IGNORE_INDEX,
};
use crate::data::reader::Example;
use crate::data::InputEncoder;
use crate::error::{Error, Result};
use crate::families::{self, Family, HeadSpec, HfConfig, Model};
use crate::kernels::par::{par_for, with_f32, Out, PAR_MIN};
use crate::loss::{LossConfig, LossKind};
use crate::nn::{Batch, Ctx};
use crate::tasks::{mismatch, Evaluation, TargetData, Task};
use crate::train::held_out::HeldOut;
use crate::train::log::Progress;
use crate::train::prepare::Prepared;

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

/// The next-token targets of labels `(batch, seq)`: row `b·seq + t` gets label
/// `(b, t + 1)`, the last position of each sequence [`IGNORE_INDEX`].
pub fn shifted_targets(labels: &Tensor) -> Result<Vec<i64>> {
    let (b, s) = labels.dims2()?;
    let l = labels.flatten_all()?.to_vec1::<i64>()?;
    let mut t = vec![IGNORE_INDEX; b * s];
    for r in 0..b {
        t[r * s..r * s + s - 1].copy_from_slice(&l[r * s + 1..r * s + s]);
    }
    Ok(t)
}

/// The negative log-likelihood of class `t` under logits `z`: `logsumexp(z) − z[t]`.
#[inline]
fn row_nll(z: &[f32], t: usize) -> f32 {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = z.iter().map(|&v| (v - max).exp()).sum();
    sum.ln() + max - z[t]
}

/// Checks that every counted target is a class of `vocab`.
fn check_targets(targets: &[i64], vocab: usize) -> Result<usize> {
    let mut n = 0;
    for &t in targets {
        if t == IGNORE_INDEX {
            continue;
        }
        if t < 0 || t as usize >= vocab {
            return Err(Error::Msg(format!(
                "token id {t} is outside the model's vocabulary of {vocab}: the tokenizer \
                 and the model do not match"
            )));
        }
        n += 1;
    }
    Ok(n)
}

/// The causal-LM loss of `logits` `(batch·seq, vocab)` against `labels` `(batch, seq)`
/// (i64, [`IGNORE_INDEX`] where not counted): the mean over counted positions of the
/// cross-entropy of row `b·seq + t` against label `(b, t + 1)`. Differentiable in
/// `logits`, fused (see the module documentation). No counted token gives 0.
pub fn lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let targets = shifted_targets(labels)?;
    let (rows, vocab) = logits.dims2()?;
    if rows != targets.len() {
        return Err(Error::Msg(format!(
            "internal: {rows} rows of logits for {} labels",
            targets.len()
        )));
    }
    let count = check_targets(&targets, vocab)?;
    if count == 0 {
        return Ok(logits.sum_all()?.affine(0.0, 0.0)?);
    }
    let logits = logits.to_dtype(candle_core::DType::F32)?.contiguous()?;
    if !logits.device().is_cpu() {
        return lm_loss_composed(&logits, labels);
    }
    Ok(logits.apply_op1(TokenNll { targets, count })?)
}

/// The reference composition of [`lm_loss`] from candle's differentiable operations
/// (log-softmax, gather, mask), for tests and non-CPU devices.
pub fn lm_loss_composed(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let targets = shifted_targets(labels)?;
    let count = check_targets(&targets, logits.dim(1)?)?;
    if count == 0 {
        return Ok(logits.sum_all()?.affine(0.0, 0.0)?);
    }
    let dev = logits.device();
    let idx: Vec<u32> = targets.iter().map(|&t| t.max(0) as u32).collect();
    let mask: Vec<f32> = targets
        .iter()
        .map(|&t| if t == IGNORE_INDEX { 0.0 } else { 1.0 })
        .collect();
    let n = targets.len();
    let lp = crate::kernels::fused::log_softmax_last(logits)?;
    let picked = lp
        .gather(&Tensor::from_vec(idx, (n, 1), dev)?, 1)?
        .squeeze(1)?;
    let m = Tensor::from_vec(mask, n, dev)?;
    Ok((picked.mul(&m)?.sum_all()?.neg()? / count as f64)?)
}

/// The fused token cross-entropy (see [`lm_loss`]).
struct TokenNll {
    targets: Vec<i64>,
    count: usize,
}

/// Rows per parallel part.
const NLL_ROWS: usize = 16;

impl CustomOp1 for TokenNll {
    fn name(&self) -> &'static str {
        "ferrotune-token-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let z = crate::kernels::par::f32_data(s, l)?;
        let v = l.dims()[1];
        let n = self.targets.len();
        let mut per = vec![0f32; n];
        let o = Out::new(&mut per);
        par_for(n.div_ceil(NLL_ROWS), n * v >= PAR_MIN, |i| {
            // Safety: part i is written by this task only.
            let part = unsafe { o.part(i * NLL_ROWS, NLL_ROWS) };
            for (k, slot) in part.iter_mut().enumerate() {
                let r = i * NLL_ROWS + k;
                let t = self.targets[r];
                *slot = if t == IGNORE_INDEX {
                    0.0
                } else {
                    row_nll(&z[r * v..(r + 1) * v], t as usize)
                };
            }
        });
        let total: f64 = per.iter().map(|&x| x as f64).sum();
        Ok((
            CpuStorage::F32(vec![(total / self.count as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? / self.count as f32;
        let (n, v) = x.dims2()?;
        let dx = with_f32(x, |z| {
            let mut dx = vec![0f32; n * v];
            let o = Out::new(&mut dx);
            par_for(n.div_ceil(NLL_ROWS), n * v >= PAR_MIN, |i| {
                // Safety: rows of part i are written by this task only.
                let part = unsafe { o.part(i * NLL_ROWS * v, NLL_ROWS * v) };
                for (k, d) in part.chunks_mut(v).enumerate() {
                    let r = i * NLL_ROWS + k;
                    let t = self.targets[r];
                    if t == IGNORE_INDEX {
                        continue; // already 0
                    }
                    let zr = &z[r * v..(r + 1) * v];
                    let max = zr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for (d, &zv) in d.iter_mut().zip(zr) {
                        let e = (zv - max).exp();
                        *d = e;
                        sum += e;
                    }
                    let scale = g / sum;
                    d.iter_mut().for_each(|d| *d *= scale);
                    d[t as usize] -= g;
                }
            });
            dx
        })?;
        Ok(Some(Tensor::from_vec(dx, (n, v), x.device())?))
    }
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

/// The block size of a run: `block_size`, else `min(1024, the model's positions)`; more
/// than the model's positions is an error naming the field.
pub fn block_size(cfg: &TrainConfig, family: &dyn Family, hf: &HfConfig) -> Result<usize> {
    let max = family.max_tokens(hf)?;
    match cfg.block_size {
        None => Ok(max.min(1024)),
        Some(b) if b > max => Err(Error::Config(format!(
            "`block_size` {b} exceeds the model's {max} positions (max_position_embeddings \
             in {})",
            hf.path.display()
        ))),
        Some(b) => Ok(b),
    }
}

fn read_options(cfg: &TrainConfig) -> LmReadOptions {
    LmReadOptions {
        text_column: cfg.text_column.clone(),
        file_extensions: cfg.file_extensions.clone(),
        encoding_errors: cfg.encoding_errors,
        skip_bad_rows: cfg.on_bad_row == OnBadRow::Skip,
    }
}

/// Splits rows into training and held-out parts with the seeded split every task uses
/// (by document or row, before packing).
fn split_rows(rows: Vec<LmRow>, fraction: f64, seed: u64) -> (Vec<LmRow>, Vec<LmRow>) {
    let as_examples: Vec<Example> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| Example {
            id: r.id.clone(),
            line: r.line,
            text: i.to_string(),
            text_pair: None,
            label: None,
        })
        .collect();
    let (t, e) =
        crate::data::split::stratified_split(as_examples, |_| String::new(), fraction, seed);
    let pick = |ex: Vec<Example>| -> Vec<LmRow> {
        ex.iter()
            .filter_map(|e| e.text.parse::<usize>().ok())
            .map(|i| rows[i].clone())
            .collect()
    };
    (pick(t), pick(e))
}

/// Everything before the first step of a causal-LM run (the counterpart of
/// [`crate::train::prepare::prepare_for`]): read and split the data, load the model with
/// its language-model head only, tokenize and pack.
pub fn prepare(
    cfg: &TrainConfig,
    device: &Device,
    progress: &mut dyn Progress,
    writes: bool,
) -> Result<Prepared> {
    if writes {
        crate::train::prepare::ensure_writable(&cfg.output_dir)?;
    }
    let opts = read_options(cfg);
    let mut notes = Vec::new();
    let mut skipped_rows = Vec::new();
    let mut read = |path: &Path| -> Result<LmData> {
        let d = read_lm_data(path, &opts)?;
        if !d.skipped.is_empty() {
            notes.push(format!(
                "{} row(s) of {} skipped (see skipped_rows.jsonl)",
                d.skipped.len(),
                path.display()
            ));
        }
        skipped_rows.extend(
            d.skipped
                .iter()
                .map(|s| json!({"file": path, "line": s.line, "reason": s.reason})),
        );
        Ok(d)
    };
    let train_data = read(&cfg.train_file)?;
    let eval_data = cfg.validation_file.as_deref().map(&mut read).transpose()?;
    let format = train_data.format;
    let mut train_rows = train_data.rows;
    if cfg.deduplicate {
        let mut seen = std::collections::HashSet::new();
        let before = train_rows.len();
        train_rows.retain(|r| seen.insert(r.content.clone_key()));
        if train_rows.len() < before {
            notes.push(format!(
                "{} duplicate row(s) dropped",
                before - train_rows.len()
            ));
        }
    }
    let p = cfg.output_dir.join("skipped_rows.jsonl");
    if writes {
        if skipped_rows.is_empty() {
            let _ = std::fs::remove_file(&p);
        } else {
            let text: String = skipped_rows.iter().map(|r| format!("{r}\n")).collect();
            crate::formats::write_whole(&p, text.as_bytes())?;
        }
    }
    let mut split = None;
    let (train_rows, eval_rows, eval_path) = match (&cfg.validation_file, eval_data) {
        (Some(vf), Some(ev)) => {
            if ev.format != format {
                return Err(Error::file(
                    vf,
                    format!(
                        "holds {} data but the training file holds {}",
                        ev.format.name(),
                        format.name()
                    ),
                ));
            }
            (train_rows, ev.rows, vf.clone())
        }
        _ => {
            let frac = cfg.validation_split.unwrap_or(0.2);
            let (t, e) = split_rows(train_rows, frac, cfg.seed);
            split = Some(json!({
                "seed": cfg.seed,
                "validation_split": cfg.validation_split,
                "train_file": cfg.train_file,
                "train": t.iter().map(|r| &r.id).collect::<Vec<_>>(),
                "eval": e.iter().map(|r| &r.id).collect::<Vec<_>>(),
            }));
            (t, e, cfg.train_file.clone())
        }
    };
    if train_rows.is_empty() {
        return Err(Error::file(
            &cfg.train_file,
            "no training documents or rows",
        ));
    }
    if eval_rows.is_empty() {
        return Err(Error::file(
            &eval_path,
            "no evaluation documents or rows (set `validation_split` higher, or give a \
             `validation_file`)",
        ));
    }

    let dir = &cfg.model_name_or_path;
    let hf = HfConfig::from_dir(dir)?;
    let family = families::family(&hf)?;
    let block = block_size(cfg, family, &hf)?;
    let encoder = LmEncoder::load(dir, block)?;
    let head = HeadSpec {
        num_labels: 0,
        pooling: None,
        hidden_dropout: cfg.hidden_dropout_prob,
        attention_dropout: cfg.attention_probs_dropout_prob,
        classifier_dropout: None,
    };
    let loaded = families::load_weights(&hf, family, dir, &head, cfg.seed, device)?;
    notes.extend(loaded.notes);

    progress.start("tokenize train", train_rows.len() as u64);
    let mut train_items = encoder
        .lm()
        .items(&train_rows, format, block, &cfg.train_file)?;
    progress.advance(train_rows.len() as u64);
    progress.finish();
    progress.start("tokenize eval", eval_rows.len() as u64);
    let mut eval_items = encoder.lm().items(&eval_rows, format, block, &eval_path)?;
    progress.advance(eval_rows.len() as u64);
    progress.finish();
    if let Some(n) = cfg.max_train_samples {
        train_items.truncate(n);
    }
    if let Some(n) = cfg.max_eval_samples {
        eval_items.truncate(n);
    }
    let empty = |path: &Path, what: &str| {
        Error::file(
            path,
            if format == LmFormat::Text {
                format!("no {what} block: its text is shorter than `block_size` ({block} tokens)")
            } else {
                format!("no {what} sequence")
            },
        )
    };
    if train_items.is_empty() {
        return Err(empty(&cfg.train_file, "training"));
    }
    if eval_items.is_empty() {
        return Err(empty(&eval_path, "evaluation"));
    }
    let counted: usize = train_items.iter().map(LmItem::counted).sum();
    if counted == 0 {
        return Err(Error::file(
            &cfg.train_file,
            "no token to learn: every completion or assistant turn was cut off by `block_size`",
        ));
    }
    notes.push(format!(
        "causal LM ({} data): {} training sequence(s), {} evaluation sequence(s) of at most {block} tokens; {counted} training tokens counted in the loss",
        format.name(),
        train_items.len(),
        eval_items.len()
    ));
    let held_out: Vec<HeldOut> = if format == LmFormat::Text {
        eval_items
            .iter()
            .enumerate()
            .map(|(i, it)| HeldOut {
                id: format!("block {i}"),
                line: 0,
                text: cut(&encoder
                    .lm()
                    .tokenizer
                    .decode(&it.ids, false)
                    .unwrap_or_default()),
                text_pair: None,
            })
            .collect()
    } else {
        eval_rows
            .iter()
            .take(eval_items.len())
            .map(|r| HeldOut {
                id: r.id.clone(),
                line: r.line,
                text: cut(&r.display()),
                text_pair: None,
            })
            .collect()
    };
    let train_ids: Vec<String> = if format == LmFormat::Text {
        (0..train_items.len())
            .map(|i| format!("block {i}"))
            .collect()
    } else {
        train_rows
            .iter()
            .take(train_items.len())
            .map(|r| r.id.clone())
            .collect()
    };
    let labels = LabelMap::from_labels(Vec::new());
    let train_y = TargetData::Tokens(train_items.iter().map(|i| i.labels.clone()).collect());
    let eval_y = TargetData::Tokens(eval_items.iter().map(|i| i.labels.clone()).collect());
    let loss = crate::train::prepare::loss_config(cfg, &labels, &train_y)?;
    loss.validate()?;
    if let Some(s) = split.filter(|_| writes) {
        let p = cfg.output_dir.join("split.json");
        crate::formats::write_whole(&p, s.to_string().as_bytes())?;
    }
    Ok(Prepared {
        cfg: cfg.clone(),
        hf,
        family,
        model: loaded.model,
        params: loaded.params,
        encoder: Box::new(encoder),
        labels,
        train: (train_items.iter().map(features).collect(), train_y),
        train_ids,
        eval: (eval_items.iter().map(features).collect(), eval_y),
        eval_rows: held_out,
        loss,
        notes,
    })
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(crate::train::held_out::TEXT_KEPT) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

impl LmContent {
    /// A key for deduplication.
    fn clone_key(&self) -> String {
        match self {
            LmContent::Text(t) => t.clone(),
            other => format!("{other:?}"),
        }
    }
}

/// `eval_predictions.jsonl` of a causal-LM run: per held-out sequence its id, text, mean
/// loss, perplexity and counted tokens.
pub fn predictions_jsonl(rows: &[HeldOut], nll: &[Vec<f32>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (r, z) in rows.iter().zip(nll) {
        let (sum, n) = (
            z.first().copied().unwrap_or(0.0),
            z.get(1).copied().unwrap_or(0.0),
        );
        let loss = if n > 0.0 { (sum / n) as f64 } else { f64::NAN };
        let line = json!({
            "id": r.id,
            "line": r.line,
            "text": r.text,
            "loss": loss,
            "perplexity": loss.exp(),
            "tokens": n,
        });
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// Whether the model directory's `config.json` names a causal language model
/// (`architectures` ending in `ForCausalLM` or `LMHeadModel`).
pub fn is_causal_lm(cfg: &HfConfig) -> bool {
    cfg.raw
        .get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .any(|n| n.ends_with("ForCausalLM") || n.ends_with("LMHeadModel"))
        })
}

/// Whether model directory `dir` holds a causal language model ([`is_causal_lm`]).
pub fn is_causal_lm_dir(dir: &Path) -> Result<bool> {
    Ok(is_causal_lm(&HfConfig::from_dir(dir)?))
}

/// `ferrotune eval` of a causal language model in `dir` on `data` (any layout of
/// [`crate::data::lm`]; no split): `loss`, `perplexity` and `tokens`. `block_size`
/// defaults as in training.
pub fn evaluate_dir(
    dir: &Path,
    data: &Path,
    block: Option<usize>,
    batch_size: usize,
    text_column: &str,
) -> Result<BTreeMap<String, f64>> {
    let hf = HfConfig::from_dir(dir)?;
    let family = families::family(&hf)?;
    let cfg = TrainConfig {
        block_size: block,
        ..TrainConfig::default()
    };
    let block = block_size(&cfg, family, &hf)?;
    let device = crate::nn::device();
    let encoder = LmEncoder::load(dir, block)?;
    let d = read_lm_data(
        data,
        &LmReadOptions {
            text_column: text_column.to_string(),
            file_extensions: vec!["txt".into()],
            encoding_errors: Default::default(),
            skip_bad_rows: false,
        },
    )?;
    let items = encoder.lm().items(&d.rows, d.format, block, data)?;
    if items.is_empty() {
        return Err(Error::file(
            data,
            format!("no block: the text is shorter than the block size ({block} tokens)"),
        ));
    }
    let loaded = families::load_weights(&hf, family, dir, &HeadSpec::new(0), 0, &device)?;
    let feats: Vec<Features> = items.iter().map(features).collect();
    let labels: Vec<Vec<i64>> = items.into_iter().map(|i| i.labels).collect();
    let rows = nll_rows(
        loaded.model.as_ref(),
        &encoder,
        &feats,
        &labels,
        batch_size,
        &device,
        |_| {},
    )?;
    Ok(lm_metrics(&rows))
}

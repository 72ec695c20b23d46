//! Preparing and evaluating a causal-LM run (the training side of
//! [`crate::tasks::causal_lm`], which holds the task, its loss and its encoder): the block
//! size, reading and splitting the documents, tokenized training and held-out data, the
//! held-out predictions file, and `ferrotune eval` on a language model.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use serde_json::json;

use crate::config::{OnBadRow, TrainConfig};
use crate::data::batch::Features;
use crate::data::labels::LabelMap;
use crate::data::lm::*;
use crate::data::reader::Example;
use crate::error::{Error, Result};
use crate::families::{self, Family, HeadSpec, HfConfig};
use crate::tasks::causal_lm::*;
use crate::tasks::TargetData;
use crate::train::held_out::HeldOut;
use crate::train::log::Progress;
use crate::train::prepare::Prepared;

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
/// the trainer, as [`crate::train::prepare::prepare_for`] is for the other tasks): read and split the data, load the model with
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
    // With `lora_r`, the model is built with adapters (see `nn::lora`).
    let lora = cfg.lora_spec(&hf.model_type, false)?;
    let loaded = crate::nn::lora::build(lora.as_ref(), || {
        families::load_weights(&hf, family, dir, &head, cfg.seed, device)
    })?;
    notes.extend(crate::train::prepare::lora_note(&loaded.params));
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

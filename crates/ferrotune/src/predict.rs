//! Inference: the one path that `ferrotune predict`, `ferrotune eval`, the trainer's
//! per-epoch evaluation (and later the server) all use.

use std::path::{Path, PathBuf};

use candle_core::Device;
use tokenizers::Tokenizer;

use crate::config::ProblemType;
use crate::data::batch::{length_sorted_batches, make_batch, pad_id, tokenize, Features};
use crate::data::reader::Example;
use crate::error::{Error, Result};
use crate::models::bert::{BertClassifier, Weights};
use crate::models::tokenizer::load_tokenizer;
use crate::models::{Ctx, HfConfig, Pooling};

/// Logits for `feats`, in input order, computed `batch_size` examples at a time with the
/// examples sorted by length so that each batch pads as little as possible.
pub fn infer_logits(
    model: &BertClassifier,
    feats: &[Features],
    batch_size: usize,
    pad: u32,
    device: &Device,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<Vec<f32>>> {
    let mut out = vec![Vec::new(); feats.len()];
    for idx in length_sorted_batches(feats, batch_size) {
        let refs: Vec<&Features> = idx.iter().map(|&i| &feats[i]).collect();
        let batch = make_batch(&refs, pad, device)?;
        let logits = model.forward(&mut Ctx::eval(), &batch)?.to_vec2::<f32>()?;
        for (i, row) in idx.iter().zip(logits) {
            out[*i] = row;
        }
        on_batch(idx.len());
    }
    Ok(out)
}

/// Softmax of one row of logits, computed in f64.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&z| (z as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| (x / s) as f32).collect()
}

/// What ferrotune adds to an exported `config.json` under the key `ferrotune`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExportInfo {
    /// Pooling the head was trained with.
    pub pooling: Pooling,
    /// Truncation length used in training.
    pub max_seq_length: usize,
    /// Text column of the training data (the default column for predict input).
    pub text_column: String,
    /// Second text column, for pair tasks.
    pub text_pair_column: Option<String>,
    /// Label column of the training data (used by `ferrotune eval`).
    pub label_column: String,
    /// Multi-label decision threshold.
    #[serde(default = "half")]
    pub threshold: f64,
    /// Multi-label separator in CSV/TSV label cells.
    #[serde(default)]
    pub label_separator: Option<String>,
}

fn half() -> f64 {
    0.5
}

/// A fine-tuned model loaded for inference from an exported directory.
pub struct Predictor {
    /// The model.
    pub model: BertClassifier,
    /// Its tokenizer (truncating to `info.max_seq_length`).
    pub tokenizer: Tokenizer,
    /// Label names, by id.
    pub labels: Vec<String>,
    /// Training-time settings read from `config.json`.
    pub info: ExportInfo,
    /// The task (`problem_type` of `config.json`; single-label when absent).
    pub problem_type: ProblemType,
    /// The directory it was loaded from.
    pub dir: PathBuf,
    /// Examples per forward pass.
    pub batch_size: usize,
    device: Device,
    pad: u32,
}

impl Predictor {
    /// Loads an exported model directory (`config.json` with `id2label`,
    /// `model.safetensors` with a classifier, a tokenizer).
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg = HfConfig::from_file(&cfg_path)?;
        let labels = cfg.labels().ok_or_else(|| {
            Error::at(
                &cfg_path,
                None,
                Some("id2label"),
                "missing: this is not a fine-tuned classification model",
            )
        })?;
        let info: ExportInfo = match cfg.raw.get("ferrotune") {
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| Error::at(&cfg_path, None, Some("ferrotune"), format!("{e}")))?,
            None => ExportInfo {
                pooling: Pooling::Pooler,
                max_seq_length: cfg.max_position_embeddings.min(512),
                text_column: "text".into(),
                text_pair_column: None,
                label_column: "label".into(),
                threshold: 0.5,
                label_separator: None,
            },
        };
        if info.max_seq_length > cfg.max_position_embeddings {
            return Err(Error::at(
                &cfg_path,
                None,
                Some("ferrotune.max_seq_length"),
                format!(
                    "{} is more than the model's max_position_embeddings {}",
                    info.max_seq_length, cfg.max_position_embeddings
                ),
            ));
        }
        let device = Device::Cpu;
        let st = dir.join("model.safetensors");
        if !st.exists() {
            return Err(Error::file(
                dir,
                "no model.safetensors in the model directory",
            ));
        }
        let loaded = BertClassifier::load(
            &cfg,
            Weights::Safetensors(&st),
            labels.len(),
            info.pooling,
            0,
            &device,
        )?;
        if loaded.new_head {
            return Err(Error::at(
                &st,
                None,
                Some("classifier.weight"),
                format!(
                    "missing or not of {} labels: not a fine-tuned model",
                    labels.len()
                ),
            ));
        }
        let tokenizer = load_tokenizer(dir, info.max_seq_length)?;
        let pad = pad_id(&tokenizer);
        let problem_type = match cfg.problem_type.as_deref() {
            None | Some("single_label_classification") => ProblemType::SingleLabelClassification,
            Some("multi_label_classification") => ProblemType::MultiLabelClassification,
            Some("regression") => ProblemType::Regression,
            Some(other) => {
                return Err(Error::at(
                    &cfg_path,
                    None,
                    Some("problem_type"),
                    format!("unknown problem type `{other}`"),
                ))
            }
        };
        Ok(Predictor {
            problem_type,
            model: loaded.model,
            tokenizer,
            labels,
            info,
            dir: dir.to_path_buf(),
            batch_size: 32,
            device,
            pad,
        })
    }

    /// The head's raw outputs (logits, or regression values) for each example, in input
    /// order.
    pub fn predict_logits(
        &self,
        examples: &[Example],
        on_batch: impl FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let feats = tokenize(&self.tokenizer, examples)?;
        self.predict_features(&feats, on_batch)
    }

    /// The head's raw outputs for already tokenized inputs, in input order: the one
    /// inference path. [`Predictor::predict_logits`] tokenizes, then calls this; the server
    /// tokenizes each request as it arrives, then calls this on each batch of requests.
    pub fn predict_features(
        &self,
        feats: &[Features],
        on_batch: impl FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        infer_logits(
            &self.model,
            feats,
            self.batch_size,
            self.pad,
            &self.device,
            on_batch,
        )
    }

    /// Outputs for each example, in input order: class probabilities (softmax) for
    /// single-label, per-label probabilities (sigmoid) for multi-label, values for
    /// regression.
    pub fn predict_probs(
        &self,
        examples: &[Example],
        on_batch: impl FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let logits = self.predict_logits(examples, on_batch)?;
        Ok(logits.iter().map(|l| self.activate(l)).collect())
    }

    /// Logits → outputs (see [`Predictor::predict_probs`]).
    pub fn activate(&self, logits: &[f32]) -> Vec<f32> {
        match self.problem_type {
            ProblemType::SingleLabelClassification => softmax(logits),
            ProblemType::MultiLabelClassification => {
                logits.iter().map(|&z| crate::task::sigmoid(z)).collect()
            }
            ProblemType::Regression => logits.to_vec(),
        }
    }

    /// Writes outputs atomically (temporary file, then rename) as JSONL, or CSV when `path`
    /// ends in `.csv`; see [`Predictor::format`].
    pub fn write(&self, path: &Path, outputs: &[Vec<f32>]) -> Result<()> {
        let bytes = self.format(outputs, is_csv(path))?;
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Outputs as JSONL, one line per input — single-label
    /// `{"label": "<top label>", "scores": {"<label>": p, ...}}`; multi-label
    /// `{"labels": [<labels with p ≥ threshold>], "scores": {...}}`; regression
    /// `{"value": v}` (one target) or `{"values": {"<name>": v, ...}}` — or as CSV with a
    /// column per label.
    pub fn format(&self, outputs: &[Vec<f32>], csv: bool) -> Result<Vec<u8>> {
        let labels = &self.labels;
        match self.problem_type {
            ProblemType::SingleLabelClassification => format_predictions(labels, outputs, csv),
            ProblemType::MultiLabelClassification | ProblemType::Regression if csv => {
                let mut out = Vec::new();
                let mut w = csv::Writer::from_writer(&mut out);
                let err = |e: csv::Error| Error::Msg(format!("csv: {e}"));
                w.write_record(labels).map_err(err)?;
                for o in outputs {
                    w.write_record(o.iter().map(|x| x.to_string()))
                        .map_err(err)?;
                }
                w.flush().map_err(|e| Error::Msg(format!("csv: {e}")))?;
                drop(w);
                Ok(out)
            }
            task => {
                let mut out = Vec::new();
                for o in outputs {
                    let named: serde_json::Map<String, serde_json::Value> = labels
                        .iter()
                        .zip(o)
                        .map(|(l, &x)| (l.clone(), serde_json::json!(x)))
                        .collect();
                    let line = match task {
                        ProblemType::MultiLabelClassification => {
                            let on: Vec<&String> = labels
                                .iter()
                                .zip(o)
                                .filter(|(_, &p)| p as f64 >= self.info.threshold)
                                .map(|(l, _)| l)
                                .collect();
                            serde_json::json!({"labels": on, "scores": named})
                        }
                        _ if o.len() == 1 => serde_json::json!({"value": o[0]}),
                        _ => serde_json::json!({"values": named}),
                    };
                    out.extend_from_slice(line.to_string().as_bytes());
                    out.push(b'\n');
                }
                Ok(out)
            }
        }
    }
}

/// True when `path` names a CSV file.
pub fn is_csv(path: &Path) -> bool {
    path.extension()
        .map(|e| e.eq_ignore_ascii_case("csv"))
        .unwrap_or(false)
}

/// The index of the largest value.
pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |acc, (i, &z)| {
                if z > acc.1 {
                    (i, z)
                } else {
                    acc
                }
            },
        )
        .0
}

/// Single-label predictions as JSONL (or CSV) bytes.
pub fn format_predictions(labels: &[String], probs: &[Vec<f32>], csv: bool) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    if csv {
        let mut w = csv::Writer::from_writer(&mut out);
        let mut header = vec!["label".to_string()];
        header.extend(labels.iter().cloned());
        w.write_record(&header)
            .map_err(|e| Error::Msg(format!("csv: {e}")))?;
        for p in probs {
            let mut rec = vec![labels[argmax(p)].clone()];
            rec.extend(p.iter().map(|x| x.to_string()));
            w.write_record(&rec)
                .map_err(|e| Error::Msg(format!("csv: {e}")))?;
        }
        w.flush().map_err(|e| Error::Msg(format!("csv: {e}")))?;
        drop(w);
    } else {
        for p in probs {
            let scores: serde_json::Map<String, serde_json::Value> = labels
                .iter()
                .zip(p)
                .map(|(l, &x)| (l.clone(), serde_json::json!(x)))
                .collect();
            let line = serde_json::json!({"label": labels[argmax(p)], "scores": scores});
            out.extend_from_slice(line.to_string().as_bytes());
            out.push(b'\n');
        }
    }
    Ok(out)
}

impl Predictor {
    /// Evaluates on labelled examples read from `path` (labels must be among the model's);
    /// the metrics are those of training's per-epoch evaluation, under the task's default
    /// loss.
    pub fn evaluate(
        &self,
        examples: &[Example],
        path: &Path,
        label_column: &str,
    ) -> Result<crate::task::Evaluation> {
        let map = crate::data::labels::LabelMap::from_labels(self.labels.clone());
        let sep = self.info.label_separator.as_deref();
        let targets = crate::task::encode_targets(
            self.problem_type,
            &map,
            examples,
            path,
            label_column,
            sep,
        )?;
        let logits = self.predict_logits(examples, |_| {})?;
        let cfg = crate::config::TrainConfig {
            problem_type: self.problem_type,
            ..Default::default()
        };
        let loss = crate::train::loss::LossConfig {
            kind: cfg.loss_kind(),
            ..Default::default()
        };
        crate::task::evaluate_outputs(
            self.problem_type,
            &logits,
            &targets,
            &loss,
            self.info.threshold,
        )
    }
}

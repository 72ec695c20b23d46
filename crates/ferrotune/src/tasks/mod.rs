//! Tasks: what differs between `problem_type`s — how labels become targets, the default
//! loss and the losses that fit, the metrics and which one picks the best epoch, how
//! outputs become predictions and how they are written. Everything else (model, trainer,
//! exporter) is shared: the trainer and predictor hold a `&dyn Task` and never match on
//! the problem type.
//!
//! One file per task: [`classify`] (single-label), [`multi_label`], [`regression`],
//! [`causal_lm`] (language-model fine-tuning). A new task is a new file, a [`ProblemType`]
//! variant and its line in [`ProblemType::task`].

pub mod causal_lm;
pub mod classify;
pub mod multi_label;
pub mod regression;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::labels::LabelMap;
use crate::data::reader::{Example, RawLabel};
use crate::error::{Error, Result};
use crate::eval::metrics::ClassificationReport;
use crate::loss::{LossConfig, LossKind, Targets};

/// The task, as Hugging Face's `problem_type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemType {
    /// One class per example (softmax).
    SingleLabelClassification,
    /// Any number of classes per example (one sigmoid per class).
    MultiLabelClassification,
    /// One or several real-valued targets.
    Regression,
    /// Next-token prediction (a recipe's `problem_type = "causal_lm"`; not a Hugging Face
    /// `problem_type`, so never written to an exported `config.json`).
    CausalLm,
}

impl ProblemType {
    /// The Hugging Face spelling.
    pub fn as_str(&self) -> &'static str {
        self.task().name()
    }

    /// The task's implementation.
    pub fn task(self) -> &'static dyn Task {
        match self {
            ProblemType::SingleLabelClassification => &classify::SingleLabel,
            ProblemType::MultiLabelClassification => &multi_label::MultiLabel,
            ProblemType::Regression => &regression::Regression,
            ProblemType::CausalLm => &causal_lm::CausalLm,
        }
    }

    /// Parses Hugging Face's spelling (`config.json`'s `problem_type`).
    pub fn parse(name: &str) -> Option<ProblemType> {
        [
            ProblemType::SingleLabelClassification,
            ProblemType::MultiLabelClassification,
            ProblemType::Regression,
            ProblemType::CausalLm,
        ]
        .into_iter()
        .find(|p| p.as_str() == name)
    }
}

/// The targets of a whole data set.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetData {
    /// One class id per example.
    Classes(Vec<u32>),
    /// A multi-hot row of `cols` values per example, row-major.
    Multi {
        /// The values (0 or 1).
        values: Vec<f32>,
        /// Labels per example.
        cols: usize,
    },
    /// `cols` regression targets per example, row-major.
    Values {
        /// The values.
        values: Vec<f32>,
        /// Targets per example.
        cols: usize,
    },
    /// Causal LM: per sequence, its token labels ([`crate::data::lm::IGNORE_INDEX`] where
    /// the loss does not count).
    Tokens(Vec<Vec<i64>>),
}

impl TargetData {
    /// Appends the targets of more examples (of the same task and width).
    pub fn extend(&mut self, more: TargetData) -> Result<()> {
        match (self, more) {
            (TargetData::Classes(a), TargetData::Classes(b)) => a.extend(b),
            (TargetData::Tokens(a), TargetData::Tokens(b)) => a.extend(b),
            (TargetData::Multi { values, cols }, TargetData::Multi { values: v, cols: c })
            | (TargetData::Values { values, cols }, TargetData::Values { values: v, cols: c })
                if *cols == c =>
            {
                values.extend(v)
            }
            _ => return Err(mismatch()),
        }
        Ok(())
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        match self {
            TargetData::Classes(c) => c.len(),
            TargetData::Tokens(t) => t.len(),
            TargetData::Multi { values, cols } | TargetData::Values { values, cols } => {
                values.len() / (*cols).max(1)
            }
        }
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The targets of examples `idx` only, in that order.
    pub fn keep(&self, idx: &[usize]) -> TargetData {
        let rows = |values: &[f32], cols: usize| -> Vec<f32> {
            idx.iter()
                .flat_map(|&i| values[i * cols..(i + 1) * cols].iter().copied())
                .collect()
        };
        match self {
            TargetData::Classes(c) => TargetData::Classes(idx.iter().map(|&i| c[i]).collect()),
            TargetData::Tokens(t) => {
                TargetData::Tokens(idx.iter().map(|&i| t[i].clone()).collect())
            }
            TargetData::Multi { values, cols } => TargetData::Multi {
                values: rows(values, *cols),
                cols: *cols,
            },
            TargetData::Values { values, cols } => TargetData::Values {
                values: rows(values, *cols),
                cols: *cols,
            },
        }
    }

    /// The targets of examples `idx`, as tensors for the loss.
    pub fn select(&self, idx: &[usize], device: &Device) -> Result<Targets> {
        let rows = |values: &[f32], cols: usize| -> Result<Tensor> {
            let mut v = Vec::with_capacity(idx.len() * cols);
            for &i in idx {
                v.extend_from_slice(&values[i * cols..(i + 1) * cols]);
            }
            Ok(Tensor::from_vec(v, (idx.len(), cols), device)?)
        };
        Ok(match self {
            TargetData::Classes(c) => {
                let v: Vec<u32> = idx.iter().map(|&i| c[i]).collect();
                Targets::Classes(Tensor::from_vec(v, idx.len(), device)?)
            }
            TargetData::Multi { values, cols } => Targets::Multi(rows(values, *cols)?),
            TargetData::Values { values, cols } => Targets::Values(rows(values, *cols)?),
            TargetData::Tokens(t) => {
                // Padded on the right to the longest, as the batch's ids are.
                let s = idx.iter().map(|&i| t[i].len()).max().unwrap_or(0).max(1);
                let mut v = vec![crate::data::lm::IGNORE_INDEX; idx.len() * s];
                for (r, &i) in idx.iter().enumerate() {
                    v[r * s..r * s + t[i].len()].copy_from_slice(&t[i]);
                }
                Targets::Tokens(Tensor::from_vec(v, (idx.len(), s), device)?)
            }
        })
    }

    /// What examples `idx` weigh in a mean over an accumulation window: their count, or
    /// for causal LM the tokens the loss counts (so that micro-batches weighted by their
    /// share give the token mean of the whole window).
    pub fn weight(&self, idx: &[usize]) -> f64 {
        match self {
            TargetData::Tokens(t) => idx
                .iter()
                .map(|&i| crate::data::lm::counted(&t[i]))
                .sum::<usize>() as f64,
            _ => idx.len() as f64,
        }
    }

    /// All targets, as tensors.
    pub fn all(&self, device: &Device) -> Result<Targets> {
        let idx: Vec<usize> = (0..self.len()).collect();
        self.select(&idx, device)
    }
}

/// Evaluation of a model's outputs against targets: metric name (without `eval_`) → value,
/// and for single-label classification the full report (confusion matrix, per class).
pub struct Evaluation {
    /// `loss`, `accuracy`, `macro_f1`, ... (see each task's `evaluate`).
    pub metrics: BTreeMap<String, f64>,
    /// The classification report (single-label only).
    pub report: Option<ClassificationReport>,
}

impl Evaluation {
    /// A metric by name (without `eval_`); NaN when absent.
    pub fn get(&self, name: &str) -> f64 {
        self.metrics.get(name).copied().unwrap_or(f64::NAN)
    }
}

/// What one task does (see the module documentation).
pub trait Task: Sync {
    /// Hugging Face's `problem_type` spelling.
    fn name(&self) -> &'static str;

    /// Whether the task trains a language model's next-token head
    /// ([`crate::families::Model::lm_logits`]) rather than a task head.
    fn language_model(&self) -> bool {
        false
    }

    /// The label names (classes, or regression target names) found in the training data.
    fn label_map(
        &self,
        train: &[Example],
        path: &Path,
        label_column: &str,
        separator: Option<&str>,
    ) -> Result<LabelMap>;

    /// The targets of `examples`; a label that does not fit the task (an unseen class, a
    /// non-numeric regression value) is an error naming the file, line and field.
    fn encode_targets(
        &self,
        labels: &LabelMap,
        examples: &[Example],
        path: &Path,
        field: &str,
        separator: Option<&str>,
    ) -> Result<TargetData>;

    /// The key a seeded split stratifies by (empty: no stratification).
    fn stratum(&self, e: &Example) -> String;

    /// The loss when the recipe names none.
    fn default_loss(&self) -> LossKind;

    /// Whether `loss` applies to this task's targets.
    fn fits(&self, loss: LossKind) -> bool;

    /// The metric that picks the best epoch when the recipe names none.
    fn default_metric(&self) -> &'static str;

    /// A metric name (without `eval_`, aliases accepted) → its canonical name and whether
    /// greater is better; `None` for a name this task does not compute. `loss` is every
    /// task's.
    fn metric(&self, name: &str) -> Option<(&'static str, bool)>;

    /// Metrics of `logits` `(N, C)` against `targets`, and the loss under `loss`.
    fn evaluate(
        &self,
        logits: &[Vec<f32>],
        targets: &TargetData,
        loss: &LossConfig,
        threshold: f64,
    ) -> Result<Evaluation>;

    /// The metrics printed after each evaluation.
    fn headline(&self) -> &'static [&'static str];

    /// Head outputs → what a user reads: probabilities (softmax or sigmoid) or values.
    fn activate(&self, logits: &[f32]) -> Vec<f32>;

    /// Activated outputs as JSONL (one line per input) or CSV bytes.
    fn format(
        &self,
        labels: &[String],
        outputs: &[Vec<f32>],
        threshold: f64,
        csv: bool,
    ) -> Result<Vec<u8>>;
}

/// The file and line an example came from (the file itself for the directory layout).
pub(crate) fn where_is(e: &Example, path: &Path) -> (PathBuf, Option<usize>) {
    if e.line == 0 {
        (path.join(&e.id), None)
    } else {
        (path.to_path_buf(), Some(e.line))
    }
}

/// The loss of `logits` against `targets` under `loss`, and the metrics map it starts.
pub(crate) fn loss_metric(
    logits: &[Vec<f32>],
    targets: &TargetData,
    loss: &LossConfig,
) -> Result<BTreeMap<String, f64>> {
    let device = Device::Cpu;
    let (n, c) = (logits.len(), logits.first().map(|r| r.len()).unwrap_or(0));
    let flat: Vec<f32> = logits.iter().flatten().copied().collect();
    let z = Tensor::from_vec(flat, (n, c), &device)?;
    let l = crate::loss::compute(loss, &z, &targets.all(&device)?)?.to_scalar::<f32>()?;
    Ok(BTreeMap::from([("loss".to_string(), l as f64)]))
}

/// The error for targets of another task than the one evaluating them.
pub(crate) fn mismatch() -> Error {
    Error::Msg("internal: targets do not match the problem type".into())
}

/// The logistic function.
pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
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

/// `{"<label>": x, ...}` for one row of outputs.
pub(crate) fn named(labels: &[String], row: &[f32]) -> serde_json::Map<String, serde_json::Value> {
    labels
        .iter()
        .zip(row)
        .map(|(l, &x)| (l.clone(), serde_json::json!(x)))
        .collect()
}

/// CSV bytes: `header`, then one record per row.
pub(crate) fn csv_bytes(
    header: &[String],
    rows: impl Iterator<Item = Vec<String>>,
) -> Result<Vec<u8>> {
    let err = |e: csv::Error| Error::Msg(format!("csv: {e}"));
    let mut out = Vec::new();
    let mut w = csv::Writer::from_writer(&mut out);
    w.write_record(header).map_err(err)?;
    for r in rows {
        w.write_record(&r).map_err(err)?;
    }
    w.flush().map_err(|e| Error::Msg(format!("csv: {e}")))?;
    drop(w);
    Ok(out)
}

/// JSONL bytes: one line per value.
pub(crate) fn jsonl_bytes(lines: impl Iterator<Item = serde_json::Value>) -> Vec<u8> {
    let mut out = Vec::new();
    for line in lines {
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// The raw label of an example as one string (a list joined by `,`), for stratifying.
pub(crate) fn label_text(e: &Example) -> String {
    match &e.label {
        Some(RawLabel::Text(t)) => t.clone(),
        Some(RawLabel::List(l)) => l.join(","),
        None => String::new(),
    }
}

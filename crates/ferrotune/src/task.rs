//! What differs between the three task types (`problem_type`): how labels become targets,
//! how many outputs the head has, how outputs become predictions, and which metrics are
//! computed. Everything else (model, trainer, exporter) is shared.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::config::ProblemType;
use crate::data::labels::LabelMap;
use crate::data::reader::{Example, RawLabel};
use crate::error::{Error, Result};
use crate::eval::metrics::{
    classification_report, multilabel_report, regression_report, ClassificationReport,
};
use crate::train::loss::{compute, LossConfig, Targets};

/// The targets of a whole data set.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetData {
    /// One class id per example.
    Classes(Vec<u32>),
    /// `cols` values per example, row-major: a multi-hot vector (multi-label) or the
    /// regression targets.
    Dense {
        /// The values.
        values: Vec<f32>,
        /// Values per example.
        cols: usize,
    },
}

impl TargetData {
    /// Number of examples.
    pub fn len(&self) -> usize {
        match self {
            TargetData::Classes(c) => c.len(),
            TargetData::Dense { values, cols } => values.len() / (*cols).max(1),
        }
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The targets of examples `idx`, as tensors for the loss.
    pub fn select(&self, idx: &[usize], task: ProblemType, device: &Device) -> Result<Targets> {
        Ok(match self {
            TargetData::Classes(c) => {
                let v: Vec<u32> = idx.iter().map(|&i| c[i]).collect();
                Targets::Classes(Tensor::from_vec(v, idx.len(), device)?)
            }
            TargetData::Dense { values, cols } => {
                let mut v = Vec::with_capacity(idx.len() * cols);
                for &i in idx {
                    v.extend_from_slice(&values[i * cols..(i + 1) * cols]);
                }
                let t = Tensor::from_vec(v, (idx.len(), *cols), device)?;
                match task {
                    ProblemType::Regression => Targets::Values(t),
                    _ => Targets::Multi(t),
                }
            }
        })
    }

    /// All targets, as tensors.
    pub fn all(&self, task: ProblemType, device: &Device) -> Result<Targets> {
        let idx: Vec<usize> = (0..self.len()).collect();
        self.select(&idx, task, device)
    }
}

/// The label names (classes, or regression target names) found in the training data.
pub fn label_map(
    task: ProblemType,
    train: &[Example],
    path: &Path,
    label_column: &str,
    separator: Option<&str>,
) -> Result<LabelMap> {
    match task {
        ProblemType::SingleLabelClassification => LabelMap::from_examples(train, path),
        ProblemType::MultiLabelClassification => {
            let split: Vec<Example> = train.iter().map(|e| split_labels(e, separator)).collect();
            LabelMap::from_examples(&split, path)
        }
        ProblemType::Regression => {
            let first = train.first().and_then(|e| e.label.as_ref());
            match first {
                Some(RawLabel::List(l)) => Ok(LabelMap::from_labels(
                    (0..l.len())
                        .map(|i| format!("{label_column}_{i}"))
                        .collect(),
                )),
                _ => Ok(LabelMap::from_labels(vec![label_column.to_string()])),
            }
        }
    }
}

/// A multi-label example whose text label holds several labels joined by `separator`.
fn split_labels(e: &Example, separator: Option<&str>) -> Example {
    match (&e.label, separator) {
        (Some(RawLabel::Text(t)), Some(sep)) => {
            let mut e = e.clone();
            e.label = Some(RawLabel::List(
                t.split(sep)
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            ));
            e
        }
        _ => e.clone(),
    }
}

fn where_is(e: &Example, path: &Path) -> (std::path::PathBuf, Option<usize>) {
    if e.line == 0 {
        (path.join(&e.id), None)
    } else {
        (path.to_path_buf(), Some(e.line))
    }
}

/// The targets of `examples`; a label that does not fit the task (an unseen class, a
/// non-numeric regression value) is an error naming the file, line and field.
pub fn encode_targets(
    task: ProblemType,
    labels: &LabelMap,
    examples: &[Example],
    path: &Path,
    field: &str,
    separator: Option<&str>,
) -> Result<TargetData> {
    match task {
        ProblemType::SingleLabelClassification => Ok(TargetData::Classes(
            examples
                .iter()
                .map(|e| Ok(labels.encode(e, path, field)? as u32))
                .collect::<Result<_>>()?,
        )),
        ProblemType::MultiLabelClassification => {
            let cols = labels.len();
            let mut values = vec![0f32; examples.len() * cols];
            for (i, e) in examples.iter().enumerate() {
                for id in labels.encode_multi(&split_labels(e, separator), path, field)? {
                    values[i * cols + id] = 1.0;
                }
            }
            Ok(TargetData::Dense { values, cols })
        }
        ProblemType::Regression => {
            let cols = labels.len();
            let mut values = Vec::with_capacity(examples.len() * cols);
            for e in examples {
                let raw: Vec<&str> = match &e.label {
                    Some(RawLabel::Text(t)) => vec![t.as_str()],
                    Some(RawLabel::List(l)) => l.iter().map(|s| s.as_str()).collect(),
                    None => vec![],
                };
                let (p, line) = where_is(e, path);
                if raw.len() != cols {
                    return Err(Error::at(
                        &p,
                        line,
                        Some(field),
                        format!("expected {cols} regression target(s), found {}", raw.len()),
                    ));
                }
                for r in raw {
                    let v: f32 = r
                        .trim()
                        .parse()
                        .ok()
                        .filter(|v: &f32| v.is_finite())
                        .ok_or_else(|| {
                            Error::at(
                                &p,
                                line,
                                Some(field),
                                format!("regression target `{r}` is not a number"),
                            )
                        })?;
                    values.push(v);
                }
            }
            Ok(TargetData::Dense { values, cols })
        }
    }
}

/// Evaluation of a model's outputs against targets: metric name (without `eval_`) → value,
/// and for single-label classification the full report (confusion matrix, per class).
pub struct Evaluation {
    /// `loss`, `accuracy`, `macro_f1`, ... (see [`evaluate_outputs`]).
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

/// Metrics of `logits` `(N, C)` against `targets`, and the loss under `loss`.
///
/// - single-label: `loss`, `accuracy`, `macro_f1`, `micro_f1`, `weighted_f1`,
///   `macro_precision`, `macro_recall`, `mcc`
/// - multi-label (sigmoid ≥ `threshold`): `loss`, `micro_f1`, `macro_f1`,
///   `subset_accuracy`, `micro_precision`, `micro_recall`
/// - regression (averaged over targets): `loss`, `mse`, `mae`, `rmse`, `r2`, `pearson`,
///   `spearman`
pub fn evaluate_outputs(
    task: ProblemType,
    logits: &[Vec<f32>],
    targets: &TargetData,
    loss: &LossConfig,
    threshold: f64,
) -> Result<Evaluation> {
    let device = Device::Cpu;
    let n = logits.len();
    let c = logits.first().map(|r| r.len()).unwrap_or(0);
    let mut m = BTreeMap::new();
    if n == 0 {
        return Ok(Evaluation {
            metrics: m,
            report: None,
        });
    }
    let flat: Vec<f32> = logits.iter().flatten().copied().collect();
    let z = Tensor::from_vec(flat, (n, c), &device)?;
    let l = compute(loss, &z, &targets.all(task, &device)?)?.to_scalar::<f32>()?;
    m.insert("loss".to_string(), l as f64);
    let mut report = None;
    match (task, targets) {
        (ProblemType::SingleLabelClassification, TargetData::Classes(y)) => {
            let preds: Vec<usize> = logits.iter().map(|r| crate::predict::argmax(r)).collect();
            let y: Vec<usize> = y.iter().map(|&v| v as usize).collect();
            let r = classification_report(&preds, &y, c);
            for (k, v) in [
                ("accuracy", r.accuracy),
                ("macro_f1", r.macro_f1),
                ("micro_f1", r.micro_f1),
                ("weighted_f1", r.weighted_f1),
                ("macro_precision", r.macro_precision),
                ("macro_recall", r.macro_recall),
                ("mcc", r.mcc),
            ] {
                m.insert(k.to_string(), v);
            }
            report = Some(r);
        }
        (ProblemType::MultiLabelClassification, TargetData::Dense { values, cols }) => {
            let preds: Vec<Vec<bool>> = logits
                .iter()
                .map(|r| r.iter().map(|&z| sigmoid(z) as f64 >= threshold).collect())
                .collect();
            let truth: Vec<Vec<bool>> = values
                .chunks(*cols)
                .map(|r| r.iter().map(|&v| v > 0.5).collect())
                .collect();
            let r = multilabel_report(&preds, &truth);
            for (k, v) in [
                ("micro_f1", r.micro_f1),
                ("macro_f1", r.macro_f1),
                ("subset_accuracy", r.subset_accuracy),
                ("micro_precision", r.micro_precision),
                ("micro_recall", r.micro_recall),
            ] {
                m.insert(k.to_string(), v);
            }
        }
        (ProblemType::Regression, TargetData::Dense { values, cols }) => {
            let mut acc: BTreeMap<&str, f64> = BTreeMap::new();
            for j in 0..*cols {
                let p: Vec<f64> = logits.iter().map(|r| r[j] as f64).collect();
                let t: Vec<f64> = values.chunks(*cols).map(|r| r[j] as f64).collect();
                let r = regression_report(&p, &t);
                for (k, v) in [
                    ("mse", r.mse),
                    ("mae", r.mae),
                    ("rmse", r.rmse),
                    ("r2", r.r2),
                    ("pearson", r.pearson),
                    ("spearman", r.spearman),
                ] {
                    *acc.entry(k).or_default() += v / *cols as f64;
                }
            }
            for (k, v) in acc {
                m.insert(k.to_string(), v);
            }
        }
        _ => {
            return Err(Error::Msg(
                "internal: targets do not match the problem type".into(),
            ))
        }
    }
    Ok(Evaluation { metrics: m, report })
}

/// The logistic function.
pub fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// The one-line summary printed after each evaluation.
pub fn headline(task: ProblemType) -> &'static [&'static str] {
    match task {
        ProblemType::SingleLabelClassification => &["loss", "accuracy", "macro_f1"],
        ProblemType::MultiLabelClassification => {
            &["loss", "micro_f1", "macro_f1", "subset_accuracy"]
        }
        ProblemType::Regression => &["loss", "mse", "r2", "spearman"],
    }
}

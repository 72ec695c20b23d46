//! Multi-label classification: any number of labels per example, one sigmoid per label,
//! predicted when its probability reaches `threshold`.

use std::path::Path;

use super::{
    csv_bytes, jsonl_bytes, label_text, loss_metric, mismatch, named, sigmoid, Evaluation,
    TargetData, Task,
};
use crate::data::labels::LabelMap;
use crate::data::reader::{Example, RawLabel};
use crate::error::Result;
use crate::eval::metrics::multilabel_report;
use crate::loss::{LossConfig, LossKind};

/// `multi_label_classification`.
pub struct MultiLabel;

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

impl Task for MultiLabel {
    fn name(&self) -> &'static str {
        "multi_label_classification"
    }

    fn label_map(
        &self,
        train: &[Example],
        path: &Path,
        _label_column: &str,
        separator: Option<&str>,
    ) -> Result<LabelMap> {
        let split: Vec<Example> = train.iter().map(|e| split_labels(e, separator)).collect();
        LabelMap::from_examples(&split, path)
    }

    fn encode_targets(
        &self,
        labels: &LabelMap,
        examples: &[Example],
        path: &Path,
        field: &str,
        separator: Option<&str>,
    ) -> Result<TargetData> {
        let cols = labels.len();
        let mut values = vec![0f32; examples.len() * cols];
        for (i, e) in examples.iter().enumerate() {
            for id in labels.encode_multi(&split_labels(e, separator), path, field)? {
                values[i * cols + id] = 1.0;
            }
        }
        Ok(TargetData::Multi { values, cols })
    }

    fn stratum(&self, e: &Example) -> String {
        label_text(e)
    }

    fn default_loss(&self) -> LossKind {
        LossKind::BinaryCrossEntropy
    }

    fn fits(&self, loss: LossKind) -> bool {
        matches!(loss, LossKind::BinaryCrossEntropy | LossKind::Focal)
    }

    fn default_metric(&self) -> &'static str {
        "micro_f1"
    }

    fn metric(&self, name: &str) -> Option<(&'static str, bool)> {
        match name {
            "loss" => Some(("loss", false)),
            "micro_f1" | "f1" => Some(("micro_f1", true)),
            "macro_f1" => Some(("macro_f1", true)),
            "subset_accuracy" | "accuracy" => Some(("subset_accuracy", true)),
            _ => None,
        }
    }

    /// `loss`, `micro_f1`, `macro_f1`, `subset_accuracy`, `micro_precision`,
    /// `micro_recall` (a label predicted when its sigmoid reaches `threshold`).
    fn evaluate(
        &self,
        logits: &[Vec<f32>],
        targets: &TargetData,
        loss: &LossConfig,
        threshold: f64,
    ) -> Result<Evaluation> {
        let TargetData::Multi { values, cols } = targets else {
            return Err(mismatch());
        };
        if logits.is_empty() {
            return Ok(Evaluation {
                metrics: Default::default(),
                report: None,
            });
        }
        let mut m = loss_metric(logits, targets, loss)?;
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
        Ok(Evaluation {
            metrics: m,
            report: None,
        })
    }

    fn headline(&self) -> &'static [&'static str] {
        &["loss", "micro_f1", "macro_f1", "subset_accuracy"]
    }

    fn activate(&self, logits: &[f32]) -> Vec<f32> {
        logits.iter().map(|&z| sigmoid(z)).collect()
    }

    /// `{"labels": [<labels with p ≥ threshold>], "scores": {...}}`, or CSV with a column
    /// per label.
    fn format(
        &self,
        labels: &[String],
        probs: &[Vec<f32>],
        threshold: f64,
        csv: bool,
    ) -> Result<Vec<u8>> {
        if csv {
            return csv_bytes(
                labels,
                probs
                    .iter()
                    .map(|o| o.iter().map(|x| x.to_string()).collect()),
            );
        }
        Ok(jsonl_bytes(probs.iter().map(|o| {
            let on: Vec<&String> = labels
                .iter()
                .zip(o)
                .filter(|(_, &p)| p as f64 >= threshold)
                .map(|(l, _)| l)
                .collect();
            serde_json::json!({"labels": on, "scores": named(labels, o)})
        })))
    }
}

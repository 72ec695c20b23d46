//! Single-label classification: one class per example, softmax over the classes.

use std::path::Path;

use super::{
    argmax, csv_bytes, jsonl_bytes, label_text, loss_metric, mismatch, named, Evaluation,
    TargetData, Task,
};
use crate::data::labels::LabelMap;
use crate::data::reader::Example;
use crate::error::Result;
use crate::eval::metrics::classification_report;
use crate::loss::{LossConfig, LossKind};

/// `single_label_classification`.
pub struct SingleLabel;

/// Softmax of one row of logits, computed in f64.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&z| (z as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| (x / s) as f32).collect()
}

impl Task for SingleLabel {
    fn name(&self) -> &'static str {
        "single_label_classification"
    }

    fn label_map(
        &self,
        train: &[Example],
        path: &Path,
        _label_column: &str,
        _separator: Option<&str>,
    ) -> Result<LabelMap> {
        LabelMap::from_examples(train, path)
    }

    fn encode_targets(
        &self,
        labels: &LabelMap,
        examples: &[Example],
        path: &Path,
        field: &str,
        _separator: Option<&str>,
    ) -> Result<TargetData> {
        Ok(TargetData::Classes(
            examples
                .iter()
                .map(|e| Ok(labels.encode(e, path, field)? as u32))
                .collect::<Result<_>>()?,
        ))
    }

    fn stratum(&self, e: &Example) -> String {
        label_text(e)
    }

    fn default_loss(&self) -> LossKind {
        LossKind::CrossEntropy
    }

    fn fits(&self, loss: LossKind) -> bool {
        matches!(loss, LossKind::CrossEntropy | LossKind::Focal)
    }

    fn default_metric(&self) -> &'static str {
        "accuracy"
    }

    fn metric(&self, name: &str) -> Option<(&'static str, bool)> {
        match name {
            "loss" => Some(("loss", false)),
            "accuracy" => Some(("accuracy", true)),
            "macro_f1" | "f1" => Some(("macro_f1", true)),
            "micro_f1" => Some(("micro_f1", true)),
            "weighted_f1" => Some(("weighted_f1", true)),
            "mcc" => Some(("mcc", true)),
            _ => None,
        }
    }

    /// `loss`, `accuracy`, `macro_f1`, `micro_f1`, `weighted_f1`, `macro_precision`,
    /// `macro_recall`, `mcc`, and the report (confusion matrix, per class).
    fn evaluate(
        &self,
        logits: &[Vec<f32>],
        targets: &TargetData,
        loss: &LossConfig,
        _threshold: f64,
    ) -> Result<Evaluation> {
        let TargetData::Classes(y) = targets else {
            return Err(mismatch());
        };
        if logits.is_empty() {
            return Ok(Evaluation {
                metrics: Default::default(),
                report: None,
            });
        }
        let mut m = loss_metric(logits, targets, loss)?;
        let c = logits[0].len();
        let preds: Vec<usize> = logits.iter().map(|r| argmax(r)).collect();
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
        Ok(Evaluation {
            metrics: m,
            report: Some(r),
        })
    }

    fn headline(&self) -> &'static [&'static str] {
        &["loss", "accuracy", "macro_f1"]
    }

    fn activate(&self, logits: &[f32]) -> Vec<f32> {
        softmax(logits)
    }

    /// `{"label": "<top label>", "scores": {"<label>": p, ...}}`, or CSV with the top
    /// label and a column per label.
    fn format(
        &self,
        labels: &[String],
        probs: &[Vec<f32>],
        _threshold: f64,
        csv: bool,
    ) -> Result<Vec<u8>> {
        if csv {
            let mut header = vec!["label".to_string()];
            header.extend(labels.iter().cloned());
            return csv_bytes(
                &header,
                probs.iter().map(|p| {
                    let mut rec = vec![labels[argmax(p)].clone()];
                    rec.extend(p.iter().map(|x| x.to_string()));
                    rec
                }),
            );
        }
        Ok(jsonl_bytes(probs.iter().map(
            |p| serde_json::json!({"label": labels[argmax(p)], "scores": named(labels, p)}),
        )))
    }
}

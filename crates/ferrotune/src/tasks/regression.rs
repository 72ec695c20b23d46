//! Regression: one or several real-valued targets per example, the head's outputs read
//! as they are.

use std::collections::BTreeMap;
use std::path::Path;

use super::{
    csv_bytes, jsonl_bytes, loss_metric, mismatch, named, where_is, Evaluation, TargetData, Task,
};
use crate::data::labels::LabelMap;
use crate::data::reader::{Example, RawLabel};
use crate::error::{Error, Result};
use crate::eval::metrics::regression_report;
use crate::loss::{LossConfig, LossKind};

/// `regression`.
pub struct Regression;

impl Task for Regression {
    fn name(&self) -> &'static str {
        "regression"
    }

    /// One target named after the label column, or `{column}_{i}` for a list of targets.
    fn label_map(
        &self,
        train: &[Example],
        _path: &Path,
        label_column: &str,
        _separator: Option<&str>,
    ) -> Result<LabelMap> {
        let first = train.first().and_then(|e| e.label.as_ref());
        Ok(match first {
            Some(RawLabel::List(l)) => LabelMap::from_labels(
                (0..l.len())
                    .map(|i| format!("{label_column}_{i}"))
                    .collect(),
            ),
            _ => LabelMap::from_labels(vec![label_column.to_string()]),
        })
    }

    fn encode_targets(
        &self,
        labels: &LabelMap,
        examples: &[Example],
        path: &Path,
        field: &str,
        _separator: Option<&str>,
    ) -> Result<TargetData> {
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
        Ok(TargetData::Values { values, cols })
    }

    /// Targets are not classes: no stratification.
    fn stratum(&self, _e: &Example) -> String {
        String::new()
    }

    fn default_loss(&self) -> LossKind {
        LossKind::Mse
    }

    fn fits(&self, loss: LossKind) -> bool {
        matches!(loss, LossKind::Mse | LossKind::SmoothL1 | LossKind::Huber)
    }

    fn default_metric(&self) -> &'static str {
        "mse"
    }

    fn metric(&self, name: &str) -> Option<(&'static str, bool)> {
        match name {
            "loss" => Some(("loss", false)),
            "mse" => Some(("mse", false)),
            "mae" => Some(("mae", false)),
            "rmse" => Some(("rmse", false)),
            "r2" => Some(("r2", true)),
            "pearson" => Some(("pearson", true)),
            "spearman" => Some(("spearman", true)),
            _ => None,
        }
    }

    /// `loss`, `mse`, `mae`, `rmse`, `r2`, `pearson`, `spearman`, averaged over targets.
    fn evaluate(
        &self,
        logits: &[Vec<f32>],
        targets: &TargetData,
        loss: &LossConfig,
        _threshold: f64,
    ) -> Result<Evaluation> {
        let TargetData::Values { values, cols } = targets else {
            return Err(mismatch());
        };
        if logits.is_empty() {
            return Ok(Evaluation {
                metrics: Default::default(),
                report: None,
            });
        }
        let mut m = loss_metric(logits, targets, loss)?;
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
        Ok(Evaluation {
            metrics: m,
            report: None,
        })
    }

    fn headline(&self) -> &'static [&'static str] {
        &["loss", "mse", "r2", "spearman"]
    }

    fn activate(&self, logits: &[f32]) -> Vec<f32> {
        logits.to_vec()
    }

    /// `{"value": v}` (one target) or `{"values": {"<name>": v, ...}}`, or CSV with a
    /// column per target.
    fn format(
        &self,
        labels: &[String],
        outputs: &[Vec<f32>],
        _threshold: f64,
        csv: bool,
    ) -> Result<Vec<u8>> {
        if csv {
            return csv_bytes(
                labels,
                outputs
                    .iter()
                    .map(|o| o.iter().map(|x| x.to_string()).collect()),
            );
        }
        Ok(jsonl_bytes(outputs.iter().map(|o| {
            if o.len() == 1 {
                serde_json::json!({"value": o[0]})
            } else {
                serde_json::json!({"values": named(labels, o)})
            }
        })))
    }
}

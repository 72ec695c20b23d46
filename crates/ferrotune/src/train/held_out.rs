//! `eval_predictions.jsonl`: what the exported (best) epoch predicted for every held-out
//! example, with the example's own loss, so that the worst predictions can be looked at
//! (`ferrotune report` shows the highest-loss ones, and for regression plots predicted
//! against true values).
//!
//! One line per evaluation example, in the evaluation set's order:
//! `{"id", "line", "text", ["text_pair",] "target", "predicted", "output", "loss"}` where
//! `target` and `predicted` are a class name (single-label), a list of class names
//! (multi-label) or a list of values (regression), `output` the probabilities or values,
//! and `loss` the run's loss on that example alone.

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::data::reader::Example;
use crate::error::Result;
use crate::loss::LossConfig;
use crate::tasks::{argmax, TargetData, Task};

/// Characters of an example's text kept for the file (a long document is cut, with `…`).
pub const TEXT_KEPT: usize = 600;

/// What is kept of a held-out example to show it later.
#[derive(Debug, Clone)]
pub struct HeldOut {
    /// `line N`, or the file for the directory layout.
    pub id: String,
    /// The 1-based line (0 for the directory layout).
    pub line: usize,
    /// The text, at most [`TEXT_KEPT`] characters.
    pub text: String,
    /// The second text of a pair, likewise cut.
    pub text_pair: Option<String>,
}

impl HeldOut {
    /// The parts of `e` worth showing.
    pub fn of(e: &Example) -> HeldOut {
        HeldOut {
            id: e.id.clone(),
            line: e.line,
            text: cut(&e.text),
            text_pair: e.text_pair.as_deref().map(cut),
        }
    }
}

fn cut(s: &str) -> String {
    match s.char_indices().nth(TEXT_KEPT) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The file's bytes for `rows` with their `logits` and `targets` (all in one order).
pub fn predictions_jsonl(
    task: &dyn Task,
    labels: &[String],
    threshold: f64,
    loss: &LossConfig,
    rows: &[HeldOut],
    logits: &[Vec<f32>],
    targets: &TargetData,
) -> Result<Vec<u8>> {
    let device = Device::Cpu;
    let mut out = Vec::new();
    for (i, (row, z)) in rows.iter().zip(logits).enumerate() {
        let output = task.activate(z);
        let t = Tensor::from_vec(z.clone(), (1, z.len()), &device)?;
        let l =
            crate::loss::compute(loss, &t, &targets.select(&[i], &device)?)?.to_scalar::<f32>()?;
        let names = |v: &[f32], min: f32| -> Vec<&str> {
            labels
                .iter()
                .zip(v)
                .filter(|(_, &x)| x >= min)
                .map(|(n, _)| n.as_str())
                .collect()
        };
        let (target, predicted) = match targets {
            TargetData::Classes(c) => {
                (json!(labels[c[i] as usize]), json!(labels[argmax(&output)]))
            }
            TargetData::Multi { values, cols } => (
                json!(names(&values[i * cols..(i + 1) * cols], 0.5)),
                json!(names(&output, threshold as f32)),
            ),
            TargetData::Values { values, cols } => {
                (json!(&values[i * cols..(i + 1) * cols]), json!(output))
            }
            // Causal LM writes its own file (`train::causal_lm::predictions_jsonl`).
            TargetData::Tokens(_) => return Err(crate::tasks::mismatch()),
        };
        let mut line = json!({
            "id": row.id,
            "line": row.line,
            "text": row.text,
            "target": target,
            "predicted": predicted,
            "output": output,
            "loss": l,
        });
        if let (Some(p), Value::Object(m)) = (&row.text_pair, &mut line) {
            m.insert("text_pair".into(), json!(p));
        }
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loss::LossKind;
    use crate::tasks::ProblemType;

    fn row(text: &str) -> HeldOut {
        HeldOut::of(&Example {
            id: "line 2".into(),
            line: 2,
            text: text.into(),
            text_pair: None,
            label: None,
        })
    }

    #[test]
    fn single_label_lines_carry_target_prediction_and_own_loss() {
        let task = ProblemType::SingleLabelClassification.task();
        let labels = vec!["a".to_string(), "b".to_string()];
        let loss = LossConfig {
            kind: LossKind::CrossEntropy,
            ..LossConfig::default()
        };
        let logits = vec![vec![2.0, 0.0], vec![0.0, 3.0]];
        let bytes = predictions_jsonl(
            task,
            &labels,
            0.5,
            &loss,
            &[row("x"), row("y")],
            &logits,
            &TargetData::Classes(vec![0, 0]),
        )
        .unwrap();
        let lines: Vec<Value> = String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["target"], "a");
        assert_eq!(lines[0]["predicted"], "a");
        assert_eq!(lines[1]["predicted"], "b");
        // -log softmax: ln(1 + e^-2) and ln(1 + e^3).
        let l0 = lines[0]["loss"].as_f64().unwrap();
        let l1 = lines[1]["loss"].as_f64().unwrap();
        assert!((l0 - (1.0f64 + (-2.0f64).exp()).ln()).abs() < 1e-5, "{l0}");
        assert!((l1 - (1.0f64 + 3.0f64.exp()).ln()).abs() < 1e-5, "{l1}");
    }

    #[test]
    fn long_texts_are_cut_on_a_character_boundary() {
        let long = "é".repeat(TEXT_KEPT + 10);
        let h = row(&long);
        assert_eq!(h.text.chars().count(), TEXT_KEPT + 1);
        assert!(h.text.ends_with('…'));
        assert_eq!(row("short").text, "short");
    }
}

//! The model card (`README.md`) of an exported model, in Hugging Face's format: YAML front
//! matter (`library_name`, `base_model`, `pipeline_tag`, `tags`, `model-index` with the
//! evaluation results), then the training settings, the per-epoch results and how to
//! load the model.

use std::collections::BTreeMap;
use std::fmt::Write;

/// What a card says about a fine-tuned model.
pub struct CardFacts<'a> {
    /// The model's name (the run directory's name).
    pub name: &'a str,
    /// The pretrained model it was fine-tuned from (its Hub id when its `config.json`
    /// names one, else its directory name).
    pub base_model: &'a str,
    /// Its `model_type` (`bert`, `roberta`, ...).
    pub model_type: &'a str,
    /// Hugging Face `problem_type`.
    pub problem_type: &'a str,
    /// Label names by id.
    pub labels: &'a [String],
    /// The training settings worth stating, in order (key, value as written in a recipe).
    pub settings: Vec<(&'static str, String)>,
    /// Evaluation metrics per epoch (1-based epoch, metric name without `eval_` → value).
    pub epochs: Vec<(usize, &'a BTreeMap<String, f64>)>,
    /// The epoch whose weights were exported.
    pub best_epoch: usize,
    /// The metric that chose it.
    pub best_metric: &'a str,
    /// The training data's name (its file or directory name): the `model-index`
    /// dataset, typed `local` (it is not a Hub dataset).
    pub dataset: &'a str,
    /// Examples trained on.
    pub train_examples: usize,
    /// Examples evaluated on.
    pub eval_examples: usize,
}

/// A YAML scalar: JSON strings are YAML double-quoted strings.
fn q(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

/// The card's text.
pub fn model_card(f: &CardFacts) -> String {
    let mut s = String::new();
    let best = f
        .epochs
        .iter()
        .find(|(e, _)| *e == f.best_epoch)
        .map(|(_, m)| *m);
    // Front matter.
    s.push_str("---\n");
    let _ = writeln!(s, "library_name: ferrotune");
    let _ = writeln!(s, "base_model: {}", q(f.base_model));
    let _ = writeln!(s, "pipeline_tag: text-classification");
    let _ = writeln!(s, "tags:");
    for t in [
        "ferrotune",
        "text-classification",
        f.model_type,
        f.problem_type,
    ] {
        let _ = writeln!(s, "- {}", q(t));
    }
    if let Some(m) = best {
        let _ = writeln!(s, "model-index:");
        let _ = writeln!(s, "- name: {}", q(f.name));
        let _ = writeln!(s, "  results:");
        let _ = writeln!(s, "  - task:");
        let _ = writeln!(s, "      type: text-classification");
        let _ = writeln!(s, "      name: Text Classification");
        let _ = writeln!(s, "    dataset:");
        let _ = writeln!(s, "      type: local");
        let _ = writeln!(s, "      name: {}", q(f.dataset));
        let _ = writeln!(s, "    metrics:");
        for (k, v) in m.iter().filter(|(_, v)| v.is_finite()) {
            let _ = writeln!(s, "    - type: {}", q(k));
            let _ = writeln!(s, "      value: {v}");
            let _ = writeln!(s, "      name: {}", q(&format!("eval {k}")));
        }
    }
    s.push_str("---\n\n");

    // Body.
    let _ = writeln!(s, "# {}\n", f.name);
    let _ = writeln!(
        s,
        "`{}` fine-tuned for {} with ferrotune, trained on {} examples and evaluated on {} \
         held-out ones; {} labels: {}.\n",
        f.base_model,
        f.problem_type.replace('_', " "),
        f.train_examples,
        f.eval_examples,
        f.labels.len(),
        f.labels
            .iter()
            .map(|l| format!("`{l}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(s, "## Training settings\n");
    s.push_str("| setting | value |\n|---|---|\n");
    for (k, v) in &f.settings {
        let _ = writeln!(s, "| `{k}` | {v} |");
    }
    let _ = writeln!(s, "\n## Results\n");
    let names: Vec<&String> = f
        .epochs
        .first()
        .map(|(_, m)| m.keys().collect())
        .unwrap_or_default();
    if !names.is_empty() {
        let _ = write!(s, "| epoch |");
        for n in &names {
            let _ = write!(s, " eval {n} |");
        }
        s.push_str("\n|---|");
        s.push_str(&"---|".repeat(names.len()));
        s.push('\n');
        for (e, m) in &f.epochs {
            let mark = if *e == f.best_epoch {
                " (exported)"
            } else {
                ""
            };
            let _ = write!(s, "| {e}{mark} |");
            for n in &names {
                let _ = write!(s, " {:.4} |", m.get(*n).copied().unwrap_or(f64::NAN));
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "\nThe exported weights are those of epoch {}, the best by eval {}.",
            f.best_epoch, f.best_metric
        );
    }
    let _ = writeln!(s, "\n## Use\n");
    s.push_str(
        "With transformers:\n\n```python\nfrom transformers import pipeline\n\n\
         classifier = pipeline(\"text-classification\", model=\"path/to/this/directory\")\n\
         print(classifier(\"some text\"))\n```\n\n\
         With ferrotune:\n\n```sh\nferrotune predict --model path/to/this/directory \
         --input texts.txt --output predictions.jsonl\n\
         ferrotune serve --model path/to/this/directory\n```\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_has_front_matter_results_and_usage() {
        let e1 = BTreeMap::from([("accuracy".to_string(), 0.9), ("loss".to_string(), 0.3)]);
        let e2 = BTreeMap::from([("accuracy".to_string(), 0.95), ("loss".to_string(), 0.2)]);
        let labels = vec!["neg".to_string(), "pos \"quoted\"".to_string()];
        let card = model_card(&CardFacts {
            name: "my-run",
            base_model: "sentence-transformers/all-MiniLM-L6-v2",
            model_type: "bert",
            problem_type: "single_label_classification",
            labels: &labels,
            settings: vec![("learning_rate", "2e-5".into())],
            epochs: vec![(1, &e1), (2, &e2)],
            best_epoch: 2,
            best_metric: "accuracy",
            dataset: "reviews.csv",
            train_examples: 100,
            eval_examples: 20,
        });
        let (front, body) = card
            .strip_prefix("---\n")
            .and_then(|c| c.split_once("\n---\n"))
            .unwrap();
        assert!(front.contains("library_name: ferrotune"));
        assert!(front.contains("base_model: \"sentence-transformers/all-MiniLM-L6-v2\""));
        assert!(front.contains("    - type: \"accuracy\"\n      value: 0.95"));
        assert!(front.contains("    dataset:\n      type: local\n      name: \"reviews.csv\""));
        assert!(
            body.contains("| 2 (exported) | 0.9500 | 0.2000 |"),
            "{body}"
        );
        assert!(body.contains("`pos \"quoted\"`"));
        assert!(body.contains("pipeline(\"text-classification\""));
    }
}

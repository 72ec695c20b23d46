//! `ferrotune report RUN_DIR`: one self-contained HTML page of a run (curves, metrics per
//! epoch, confusion matrix, per-class report, settings and timings, the held-out examples
//! the model got most wrong, predicted against true values for regression), and PNG files
//! of the same plots in `plots/` beside it.
//!
//! [`RunFiles::read`] reads what a run directory holds, tolerating what a run still
//! writing or killed leaves (a cut last line of `metrics.jsonl`, no summary yet): what
//! cannot be read is left out and said in [`RunFiles::notes`]. [`html`] lays the page out,
//! [`plots`] draws the charts (one drawing for both the inline SVG and the PNG), and
//! [`write_report`] does all of it atomically.
//!
//! This module reads files only; it imports nothing of the trainer, so any run directory
//! (a finished run, one in progress, one copied from elsewhere) can be reported.

pub mod html;
pub mod plots;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::eval::metrics::{classification_report, ClassificationReport};
use crate::formats::write_whole;

/// One training-loss line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainPoint {
    /// Optimisation step.
    pub step: f64,
    /// Mean training loss over the logging window.
    pub loss: f64,
    /// Learning rate of the base group.
    pub learning_rate: Option<f64>,
    /// Gradient norm before clipping.
    pub grad_norm: Option<f64>,
}

/// One evaluation (after an epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalPoint {
    /// The epoch.
    pub epoch: f64,
    /// The step it ran at.
    pub step: f64,
    /// Metric name without `eval_` → value.
    pub metrics: BTreeMap<String, f64>,
}

/// One line of `eval_predictions.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldOutPrediction {
    /// `line N` or a file.
    pub id: String,
    /// The (possibly cut) text.
    pub text: String,
    /// The true class, classes or values, as written.
    pub target: Value,
    /// The prediction, as written.
    pub predicted: Value,
    /// Probabilities or values.
    pub output: Vec<f64>,
    /// The run's loss on this example.
    pub loss: f64,
}

/// What a run directory holds, as far as it could be read.
#[derive(Debug, Default)]
pub struct RunFiles {
    /// The run directory.
    pub dir: PathBuf,
    /// The `run` line: model type, problem type, sizes, notes.
    pub start: Option<serde_json::Map<String, Value>>,
    /// Parameter groups at the start (name, learning rate, frozen, parameters).
    pub groups: Vec<Value>,
    /// Training-loss lines.
    pub train: Vec<TrainPoint>,
    /// Steps skipped as non-finite.
    pub skipped_steps: usize,
    /// Evaluations.
    pub evals: Vec<EvalPoint>,
    /// Throughput lines: step, examples/s, tokens/s.
    pub throughput: Vec<(f64, f64, f64)>,
    /// The `best` line: epoch, metric, value.
    pub best: Option<(f64, String, f64)>,
    /// The epoch early stopping ended the run after.
    pub early_stop: Option<f64>,
    /// `recipe.resolved.toml`.
    pub recipe: Option<String>,
    /// `train_summary.json` (present once a run finished).
    pub summary: Option<serde_json::Map<String, Value>>,
    /// Class names and the confusion matrix of the exported epoch.
    pub confusion: Option<(Vec<String>, Vec<Vec<u64>>)>,
    /// The exported epoch's held-out predictions.
    pub predictions: Vec<HeldOutPrediction>,
    /// What could not be read, for the page and the terminal.
    pub notes: Vec<String>,
}

impl RunFiles {
    /// Reads `dir`. Errors only when `dir` is not a run directory or its `metrics.jsonl`
    /// holds no line that can be read.
    pub fn read(dir: &Path) -> Result<RunFiles> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "no such directory"));
        }
        let metrics = dir.join("metrics.jsonl");
        if !metrics.is_file() {
            return Err(Error::file(
                dir,
                "not a ferrotune run: it has no metrics.jsonl (give the output_dir of `ferrotune train`)",
            ));
        }
        let mut run = RunFiles {
            dir: dir.to_path_buf(),
            ..RunFiles::default()
        };
        let text = read_text(&metrics)?;
        let mut read_lines = 0usize;
        let mut bad = Vec::new();
        let n_lines = text.lines().count();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(m)) => {
                    read_lines += 1;
                    run.take_metrics_line(m);
                }
                _ => bad.push(i + 1),
            }
        }
        let cut_last = !text.is_empty() && !text.ends_with('\n');
        for l in &bad {
            let why = if *l == n_lines && cut_last {
                "is cut short (the run was still writing it, or was stopped)"
            } else {
                "is not a JSON object"
            };
            run.notes
                .push(format!("{} line {l} {why}; skipped", metrics.display()));
        }
        if read_lines == 0 {
            return Err(Error::file(
                &metrics,
                "holds no metrics yet (the run stopped before logging anything); nothing to report",
            ));
        }
        run.read_optional_files();
        Ok(run)
    }

    fn take_metrics_line(&mut self, m: serde_json::Map<String, Value>) {
        let num = |k: &str| m.get(k).and_then(Value::as_f64);
        match m.get("split").and_then(Value::as_str).unwrap_or("") {
            "run" => self.start = Some(m),
            // The groups at the start: the first such line.
            "param_groups" if self.groups.is_empty() => {
                if let Some(Value::Array(g)) = m.get("groups") {
                    self.groups = g.clone();
                }
            }
            "train" if m.contains_key("skipped") => self.skipped_steps += 1,
            "train" => {
                if let (Some(step), Some(loss)) = (num("step"), num("loss")) {
                    self.train.push(TrainPoint {
                        step,
                        loss,
                        learning_rate: num("learning_rate"),
                        grad_norm: num("grad_norm"),
                    });
                }
            }
            "eval" => {
                let metrics = m
                    .iter()
                    .filter_map(|(k, v)| Some((k.strip_prefix("eval_")?.to_string(), v.as_f64()?)))
                    .collect();
                self.evals.push(EvalPoint {
                    epoch: num("epoch").unwrap_or(f64::NAN),
                    step: num("step").unwrap_or(f64::NAN),
                    metrics,
                });
            }
            "throughput" => {
                if let (Some(s), Some(e)) = (num("step"), num("examples_per_second")) {
                    self.throughput
                        .push((s, e, num("tokens_per_second").unwrap_or(f64::NAN)));
                }
            }
            "best" => {
                if let (Some(e), Some(v)) = (num("epoch"), num("value")) {
                    let metric = m.get("metric").and_then(Value::as_str).unwrap_or("?");
                    self.best = Some((e, metric.to_string(), v));
                }
            }
            "early_stop" => self.early_stop = num("epoch"),
            _ => {}
        }
    }

    /// The files beside `metrics.jsonl`; each may be absent (a run in progress) or
    /// unreadable (said in the notes).
    fn read_optional_files(&mut self) {
        let dir = self.dir.clone();
        let recipe = dir.join("recipe.resolved.toml");
        if recipe.is_file() {
            match read_text(&recipe) {
                Ok(t) => self.recipe = Some(t),
                Err(e) => self.notes.push(format!("{e}; settings left out")),
            }
        }
        let summary = dir.join("train_summary.json");
        if summary.is_file() {
            match read_text(&summary).map(|t| serde_json::from_str::<Value>(&t)) {
                Ok(Ok(Value::Object(m))) => self.summary = Some(m),
                Ok(_) => self.notes.push(format!(
                    "{} is not a JSON object; timings left out",
                    summary.display()
                )),
                Err(e) => self.notes.push(format!("{e}; timings left out")),
            }
        }
        let confusion = dir.join("confusion_matrix.csv");
        if confusion.is_file() {
            match read_text(&confusion)
                .map_err(|e| e.to_string())
                .and_then(|t| {
                    parse_confusion(&t).map_err(|why| format!("{}: {why}", confusion.display()))
                }) {
                Ok(c) => self.confusion = Some(c),
                Err(e) => self.notes.push(format!("{e}; confusion matrix left out")),
            }
        }
        let preds = dir.join("eval_predictions.jsonl");
        if preds.is_file() {
            match read_text(&preds) {
                Ok(t) => self.take_predictions(&preds, &t),
                Err(e) => self.notes.push(format!("{e}; held-out examples left out")),
            }
        }
    }

    fn take_predictions(&mut self, path: &Path, text: &str) {
        let mut bad = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let p = serde_json::from_str::<Value>(line).ok().and_then(|v| {
                // A causal language model's line: its perplexity and counted tokens.
                if let (None, Some(ppl)) = (v.get("predicted"), v.get("perplexity")) {
                    return Some(HeldOutPrediction {
                        id: v.get("id")?.as_str()?.to_string(),
                        text: v.get("text")?.as_str()?.to_string(),
                        target: Value::String(format!("{} tokens", v.get("tokens")?)),
                        predicted: Value::String(format!(
                            "perplexity {:.2}",
                            ppl.as_f64().unwrap_or(f64::NAN)
                        )),
                        output: Vec::new(),
                        loss: v.get("loss")?.as_f64().unwrap_or(f64::NAN),
                    });
                }
                Some(HeldOutPrediction {
                    id: v.get("id")?.as_str()?.to_string(),
                    text: v.get("text")?.as_str()?.to_string(),
                    target: v.get("target")?.clone(),
                    predicted: v.get("predicted")?.clone(),
                    output: v
                        .get("output")?
                        .as_array()?
                        .iter()
                        .map(|x| x.as_f64().unwrap_or(f64::NAN))
                        .collect(),
                    loss: v.get("loss")?.as_f64()?,
                })
            });
            match p {
                Some(p) => self.predictions.push(p),
                None => bad.push(i + 1),
            }
        }
        if let Some(first) = bad.first() {
            self.notes.push(format!(
                "{}: {} line(s) not in the expected form (first: line {first}); skipped",
                path.display(),
                bad.len()
            ));
        }
    }

    /// `problem_type` from the run line (or the recipe).
    pub fn problem_type(&self) -> Option<&str> {
        self.start
            .as_ref()
            .and_then(|m| m.get("problem_type"))
            .and_then(Value::as_str)
    }

    /// The per-class report of the confusion matrix.
    pub fn class_report(&self) -> Option<(&[String], ClassificationReport)> {
        let (names, m) = self.confusion.as_ref()?;
        let (mut preds, mut truth) = (Vec::new(), Vec::new());
        for (t, row) in m.iter().enumerate() {
            for (p, &n) in row.iter().enumerate() {
                for _ in 0..n {
                    preds.push(p);
                    truth.push(t);
                }
            }
        }
        Some((names, classification_report(&preds, &truth, names.len())))
    }

    /// The held-out examples with the highest loss, worst first.
    pub fn worst(&self, n: usize) -> Vec<&HeldOutPrediction> {
        let mut v: Vec<&HeldOutPrediction> = self.predictions.iter().collect();
        v.sort_by(|a, b| b.loss.total_cmp(&a.loss));
        v.truncate(n);
        v
    }
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `confusion_matrix.csv` as the trainer writes it: a header `,pred_A,pred_B,...` and one
/// row `true_A,n,n,...` per class.
pub fn parse_confusion(text: &str) -> std::result::Result<(Vec<String>, Vec<Vec<u64>>), String> {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut rows = r.records();
    let header = rows
        .next()
        .ok_or("empty")?
        .map_err(|e| format!("line 1: {e}"))?;
    let names: Vec<String> = header
        .iter()
        .skip(1)
        .map(|h| h.strip_prefix("pred_").unwrap_or(h).to_string())
        .collect();
    let mut m = Vec::new();
    for (i, rec) in rows.enumerate() {
        let rec = rec.map_err(|e| format!("line {}: {e}", i + 2))?;
        if rec.len() != names.len() + 1 {
            return Err(format!(
                "line {}: {} fields, expected {}",
                i + 2,
                rec.len(),
                names.len() + 1
            ));
        }
        let row: std::result::Result<Vec<u64>, String> = rec
            .iter()
            .skip(1)
            .enumerate()
            .map(|(j, f)| {
                f.trim()
                    .parse()
                    .map_err(|_| format!("line {}, column {}: `{f}` is not a count", i + 2, j + 2))
            })
            .collect();
        m.push(row?);
    }
    if m.len() != names.len() || names.is_empty() {
        return Err(format!("{} rows for {} classes", m.len(), names.len()));
    }
    Ok((names, m))
}

/// What [`write_report`] wrote.
#[derive(Debug)]
pub struct Written {
    /// The HTML file.
    pub html: PathBuf,
    /// The PNG files.
    pub pngs: Vec<PathBuf>,
    /// What could not be read (also shown at the top of the page).
    pub notes: Vec<String>,
}

/// Reads the run in `dir` and writes its report to `output` (default `dir/report.html`)
/// and the plots as PNG files to `plots/` beside it. Each file is written whole (a
/// temporary file renamed into place).
pub fn write_report(dir: &Path, output: Option<&Path>) -> Result<Written> {
    let run = RunFiles::read(dir)?;
    let html_path = output.map_or_else(|| dir.join("report.html"), Path::to_path_buf);
    let charts = plots::charts(&run);
    let page = html::page(&run, &charts)?;
    let plot_dir = html_path
        .parent()
        .map_or_else(|| PathBuf::from("plots"), |p| p.join("plots"));
    let mut pngs = Vec::new();
    if !charts.is_empty() {
        std::fs::create_dir_all(&plot_dir).map_err(|e| Error::io(&plot_dir, e))?;
        for c in &charts {
            let p = plot_dir.join(format!("{}.png", c.name));
            plots::write_png(c, &p)?;
            pngs.push(p);
        }
    }
    write_whole(&html_path, page.as_bytes())?;
    Ok(Written {
        html: html_path,
        pngs,
        notes: run.notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_csv_round_trips_through_the_parser() {
        let (names, m) =
            parse_confusion(",pred_a,\"pred_b,c\"\ntrue_a,3,1\n\"true_b,c\",0,2\n").unwrap();
        assert_eq!(names, ["a", "b,c"]);
        assert_eq!(m, vec![vec![3, 1], vec![0, 2]]);
        assert!(parse_confusion(",pred_a\ntrue_a,x\n")
            .unwrap_err()
            .contains("line 2, column 2"));
        assert!(parse_confusion(",pred_a,pred_b\ntrue_a,1,2\n")
            .unwrap_err()
            .contains("1 rows for 2 classes"));
    }

    /// A causal language model's held-out lines (perplexity and tokens, no class) are
    /// read without a note, worst loss first.
    #[test]
    fn language_model_predictions_are_read() {
        let mut run = RunFiles::default();
        let text = "{\"id\":\"a\",\"line\":2,\"text\":\"x\",\"loss\":2.0,\"perplexity\":7.389,\"tokens\":12.0}\n\
                    {\"id\":\"b\",\"line\":3,\"text\":\"y\",\"loss\":3.0,\"perplexity\":20.09,\"tokens\":5.0}\n";
        run.take_predictions(Path::new("eval_predictions.jsonl"), text);
        assert!(run.notes.is_empty(), "{:?}", run.notes);
        let worst = run.worst(1);
        assert_eq!(worst[0].id, "b");
        assert_eq!(worst[0].predicted, "perplexity 20.09");
        assert_eq!(worst[0].target, "5.0 tokens");
    }

    #[test]
    fn a_regression_run_gets_a_scatter_and_its_worst_examples_first() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        std::fs::write(
            d.join("metrics.jsonl"),
            concat!(
                "{\"split\":\"run\",\"problem_type\":\"regression\",\"labels\":[\"score\"]}\n",
                "{\"split\":\"train\",\"step\":1,\"loss\":2.0,\"learning_rate\":1e-4}\n",
                "{\"split\":\"train\",\"step\":2,\"skipped\":\"nan\",\"rows\":[]}\n",
                "{\"split\":\"eval\",\"epoch\":1,\"step\":2,\"eval_loss\":1.5,\"eval_mse\":1.5}\n",
                "not json\n",
            ),
        )
        .unwrap();
        let mut preds = String::new();
        for (i, (y, p)) in [(1.0, 1.1), (2.0, 4.0), (3.0, 2.9)].iter().enumerate() {
            let loss: f64 = (y - p) * (y - p);
            preds += &format!(
                "{{\"id\":\"line {}\",\"line\":{},\"text\":\"t{i}\",\"target\":[{y}],\
                 \"predicted\":[{p}],\"output\":[{p}],\"loss\":{loss}}}\n",
                i + 2,
                i + 2
            );
        }
        std::fs::write(d.join("eval_predictions.jsonl"), preds).unwrap();
        let run = RunFiles::read(d).unwrap();
        assert_eq!(run.skipped_steps, 1);
        assert_eq!(run.notes.len(), 1, "{:?}", run.notes);
        assert!(run.notes[0].contains("line 5 is not a JSON object"));
        let worst = run.worst(2);
        assert_eq!(worst[0].text, "t1");
        assert_eq!(worst.len(), 2);
        let charts = plots::charts(&run);
        let names: Vec<&str> = charts.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "loss",
                "learning_rate",
                "eval_metrics",
                "predicted_vs_true_0"
            ]
        );
        let w = write_report(d, None).unwrap();
        assert_eq!(w.pngs.len(), 4);
        let page = std::fs::read_to_string(&w.html).unwrap();
        assert!(page.contains("Predicted against true: score"));
        assert!(page.contains("This report is partial"));
        assert!(!d.join("report.html.tmp").exists());
    }
}

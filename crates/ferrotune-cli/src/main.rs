//! The `ferrotune` command: argument parsing and progress display over the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferrotune::data::reader::{read_examples, EncodingErrors, ReaderOptions};
use ferrotune::predict::Predictor;
use ferrotune::train::Progress;
use ferrotune::{Error, TrainConfig};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "ferrotune",
    version,
    about = "Fine-tune pretrained transformers on your own data"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune a model as a recipe describes.
    Train {
        /// The recipe (TOML).
        #[arg(long)]
        recipe: PathBuf,
        /// Override a recipe key: --set learning_rate=2e-5 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Where to write the run (overrides the recipe's output_dir).
        #[arg(long)]
        output_dir: Option<PathBuf>,
    },
    /// Evaluate an exported model on a labelled file.
    Eval {
        /// The exported model directory.
        #[arg(long)]
        model: PathBuf,
        /// Labelled data (CSV, TSV, JSONL or a directory per class).
        #[arg(long)]
        input: PathBuf,
        /// Text column (default: the one the model was trained with).
        #[arg(long)]
        text_column: Option<String>,
        /// Label column (default: the one the model was trained with).
        #[arg(long)]
        label_column: Option<String>,
    },
    /// Predict labels for a file of texts.
    Predict {
        /// The exported model directory.
        #[arg(long)]
        model: PathBuf,
        /// Texts (CSV, TSV, JSONL, or .txt with one text per line).
        #[arg(long)]
        input: PathBuf,
        /// Output file (JSONL, or CSV when it ends in .csv); standard output when absent.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Text column (default: the one the model was trained with).
        #[arg(long)]
        text_column: Option<String>,
    },
    /// Describe a model directory.
    Inspect {
        /// The model directory.
        #[arg(long)]
        model: PathBuf,
    },
}

/// Progress bars on a terminal (hidden otherwise), messages on standard output.
struct Bars {
    bar: Option<ProgressBar>,
    show: bool,
}

impl Progress for Bars {
    fn start(&mut self, name: &str, total: u64) {
        if !self.show {
            return;
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{msg:>16} [{bar:30}] {pos}/{len} {per_sec} eta {eta} ")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(name.to_string());
        self.bar = Some(bar);
    }
    fn advance(&mut self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
    fn message(&mut self, msg: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| println!("{msg}")),
            None => println!("{msg}"),
        }
    }
}

fn bars() -> Bars {
    Bars {
        bar: None,
        show: std::io::stderr().is_terminal(),
    }
}

/// glibc hands large freed buffers back to the OS and page-faults them in again on the
/// next step; keeping them in the heap removes that cost (see docs/DESIGN-NOTES.md).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn set_threads(n: Option<usize>) {
    if let Some(n) = n {
        // Read by rayon and candle when their thread pools start (not yet started here).
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

fn reader_for(text_column: String, label_column: Option<String>) -> ReaderOptions {
    ReaderOptions {
        text_column,
        text_pair_column: None,
        label_column,
        encoding_errors: EncodingErrors::Error,
    }
}

fn try_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Train {
            recipe,
            mut set,
            output_dir,
        } => {
            if let Some(d) = output_dir {
                set.push(format!("output_dir={}", toml_string(&d.to_string_lossy())));
            }
            let cfg = TrainConfig::load(&recipe, &set)?;
            set_threads(cfg.threads);
            ferrotune::train::train(&cfg, &mut bars())?;
        }
        Cmd::Eval {
            model,
            input,
            text_column,
            label_column,
        } => {
            let p = Predictor::load(&model)?;
            let label_column = label_column.unwrap_or_else(|| p.info.label_column.clone());
            let opts = reader_for(
                text_column.unwrap_or_else(|| p.info.text_column.clone()),
                Some(label_column.clone()),
            );
            let mut opts = opts;
            opts.text_pair_column = p.info.text_pair_column.clone();
            let ex = read_examples(&input, &opts)?;
            let r = p.evaluate(&ex, &input, &label_column)?;
            if let Some(report) = &r.report {
                println!("{}", report.per_class_table(&p.labels));
            }
            let mut line = serde_json::Map::new();
            line.insert("eval_examples".into(), ex.len().into());
            for (k, v) in &r.metrics {
                line.insert(format!("eval_{k}"), serde_json::json!(v));
            }
            println!("{}", serde_json::Value::Object(line));
        }
        Cmd::Predict {
            model,
            input,
            output,
            text_column,
        } => {
            let p = Predictor::load(&model)?;
            let mut opts = reader_for(
                text_column.unwrap_or_else(|| p.info.text_column.clone()),
                None,
            );
            opts.text_pair_column = p.info.text_pair_column.clone();
            let ex = read_examples(&input, &opts)?;
            let mut pb = bars();
            pb.start("predict", ex.len() as u64);
            let probs = p.predict_probs(&ex, |n| pb.advance(n as u64))?;
            pb.finish();
            match output {
                Some(path) => {
                    p.write(&path, &probs)?;
                    eprintln!("{} predictions written to {}", probs.len(), path.display());
                }
                None => {
                    let bytes = p.format(&probs, false)?;
                    use std::io::Write;
                    std::io::stdout()
                        .write_all(&bytes)
                        .context("writing to standard output")?;
                }
            }
        }
        Cmd::Inspect { model } => {
            let info = ferrotune::models::inspect(&model)?;
            println!("{info}");
        }
    }
    Ok(())
}

fn toml_string(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    match try_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            // 2: the user's input (recipe, data, model files) is at fault; 1: anything else.
            match e.downcast_ref::<Error>() {
                Some(Error::Input { .. } | Error::Config(_) | Error::Io { .. }) => {
                    ExitCode::from(2)
                }
                _ => ExitCode::from(1),
            }
        }
    }
}

//! The `ferrotune` command: argument parsing and progress display over the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ferrotune::data::reader::{open_examples, read_examples, EncodingErrors, ReaderOptions};
use ferrotune::formats::gguf::resolve_model;
use ferrotune::predict::{is_csv, Predictor};
use ferrotune::serve::ServeConfig;
use ferrotune::train::{Control, Progress};
use ferrotune::{Error, TrainConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// `ferrotune --version`: the version, whether this build trains over MPI, and whether it
/// is a debug build (whose timings are not ferrotune's speed; the bench scripts refuse
/// those).
const VERSION: &str = match (ferrotune::dist::MPI_BUILT_IN, ferrotune::DEBUG_BUILD) {
    (true, false) => concat!(env!("CARGO_PKG_VERSION"), " (mpi: built in)"),
    (true, true) => concat!(env!("CARGO_PKG_VERSION"), " (mpi: built in; debug build)"),
    (false, false) => concat!(
        env!("CARGO_PKG_VERSION"),
        " (mpi: not built in; cargo feature `mpi`)"
    ),
    (false, true) => concat!(
        env!("CARGO_PKG_VERSION"),
        " (mpi: not built in; cargo feature `mpi`; debug build)"
    ),
};

#[derive(Parser)]
#[command(
    name = "ferrotune",
    version = VERSION,
    about = "Fine-tune pretrained transformers on your own data"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// `--precision`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Precision {
    /// int8 for a quantized model (`ferrotune quantize`), f32 otherwise.
    Auto,
    /// 32-bit floats throughout.
    F32,
    /// int8 linear layers (dynamic quantization).
    Int8,
    /// bf16 mixed precision (only where the CPU has a bf16 dot product).
    Bf16,
}

/// `--encoding-errors`: what eval and predict do with bytes of the input that are not
/// valid UTF-8 (the recipe's `encoding_errors`).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Encoding {
    /// Stop with an error naming the file, line and column.
    Error,
    /// Replace each invalid sequence with U+FFFD (as training with
    /// `encoding_errors = "replace"` read it).
    Replace,
}

impl From<Encoding> for EncodingErrors {
    fn from(e: Encoding) -> Self {
        match e {
            Encoding::Error => EncodingErrors::Error,
            Encoding::Replace => EncodingErrors::Replace,
        }
    }
}

impl From<Precision> for ferrotune::precision::Precision {
    fn from(p: Precision) -> Self {
        use ferrotune::precision::Precision as P;
        match p {
            Precision::Auto => P::Auto,
            Precision::F32 => P::F32,
            Precision::Int8 => P::Int8,
            Precision::Bf16 => P::Bf16,
        }
    }
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
        /// Continue an interrupted run: `latest` (newest complete checkpoint of the run) or
        /// a checkpoint directory. The recipe and --set values must be the same.
        #[arg(long, value_name = "latest|DIR")]
        resume: Option<String>,
        /// Replace a previous run in the output directory (its checkpoints and model are
        /// removed first); without it such a directory is refused.
        #[arg(long)]
        overwrite_output_dir: bool,
    },
    /// Evaluate an exported model on a labelled file.
    Eval {
        /// The exported model directory (or a .gguf file, converted once into the cache).
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter directory (`adapter_config.json`,
        /// `adapter_model.safetensors`) applied to `--model` (then the base model).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Labelled data (CSV, TSV, JSONL or a directory per class).
        #[arg(long)]
        input: PathBuf,
        /// Text column (default: the one the model was trained with).
        #[arg(long)]
        text_column: Option<String>,
        /// Label column (default: the one the model was trained with).
        #[arg(long)]
        label_column: Option<String>,
        /// The CSV/TSV input has no header row: name columns by 0-based index
        /// (`--text-column 1`).
        #[arg(long)]
        no_header: bool,
        /// Bytes of the input that are not valid UTF-8: stop with an error naming the
        /// file and line, or replace them with U+FFFD (the recipe's `encoding_errors`).
        #[arg(long, value_enum, default_value_t = Encoding::Error)]
        encoding_errors: Encoding,
        /// Number format of the linear layers: auto (int8 for a quantized model, else f32),
        /// f32, int8 (weights quantized per output channel when loaded, activations per
        /// row; embeddings, norms, softmax stay f32), or bf16 (CPUs with avx512_bf16).
        #[arg(long, value_enum, default_value_t = Precision::Auto)]
        precision: Precision,
        /// A causal language model (`architectures` `…ForCausalLM`): tokens per block the
        /// text is packed into (default: min(1024, the model's positions)).
        #[arg(long)]
        block_size: Option<usize>,
    },
    /// Predict labels for a file of texts.
    Predict {
        /// The exported model directory (or a .gguf file, converted once into the cache).
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter directory (`adapter_config.json`,
        /// `adapter_model.safetensors`) applied to `--model` (then the base model).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Texts (CSV, TSV, JSONL, or .txt with one text per line).
        #[arg(long)]
        input: PathBuf,
        /// Output file (JSONL, or CSV when it ends in .csv); standard output when absent.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Text column (default: the one the model was trained with).
        #[arg(long)]
        text_column: Option<String>,
        /// The CSV/TSV input has no header row: name columns by 0-based index
        /// (`--text-column 1`).
        #[arg(long)]
        no_header: bool,
        /// Bytes of the input that are not valid UTF-8: stop with an error naming the
        /// file and line, or replace them with U+FFFD (the recipe's `encoding_errors`).
        #[arg(long, value_enum, default_value_t = Encoding::Error)]
        encoding_errors: Encoding,
        /// Inputs read, batched by length and written at a time (memory holds one chunk).
        #[arg(long, default_value_t = ferrotune::predict::STREAM_CHUNK)]
        chunk_size: usize,
        /// Number format of the linear layers: auto (int8 for a quantized model, else f32),
        /// f32, int8 (weights quantized per output channel when loaded, activations per
        /// row; embeddings, norms, softmax stay f32), or bf16 (CPUs with avx512_bf16).
        #[arg(long, value_enum, default_value_t = Precision::Auto)]
        precision: Precision,
    },
    /// Serve a model over HTTP: POST /predict (TEI's request shape), GET /health, /info,
    /// /metrics, /openapi.json. SIGTERM or Ctrl-C drains requests in flight, then exits.
    Serve {
        /// The exported model directory (or a .gguf file, converted once into the cache).
        #[arg(long)]
        model: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value_t = ServeConfig::default().host)]
        host: String,
        /// Port to listen on (0: any free port).
        #[arg(long, default_value_t = ServeConfig::default().port)]
        port: u16,
        /// Most tokens (before padding) in one batch.
        #[arg(long, default_value_t = ServeConfig::default().max_batch_tokens)]
        max_batch_tokens: usize,
        /// Most requests in one batch (1: no batching).
        #[arg(long, default_value_t = ServeConfig::default().max_batch_requests)]
        max_batch_requests: usize,
        /// How long a worker waits for more requests to fill a batch, in milliseconds.
        #[arg(long, default_value_t = 0)]
        batch_wait_ms: u64,
        /// Most inputs in one request (413 above).
        #[arg(long, default_value_t = ServeConfig::default().max_inputs_per_request)]
        max_inputs_per_request: usize,
        /// Most requests handled at once (429 above).
        #[arg(long, default_value_t = ServeConfig::default().max_concurrent_requests)]
        max_concurrent_requests: usize,
        /// A request not answered within this many milliseconds is a 503.
        #[arg(long, default_value_t = 30_000)]
        request_timeout_ms: u64,
        /// Largest request body in bytes (413 above).
        #[arg(long, default_value_t = ServeConfig::default().max_body_bytes)]
        max_body_bytes: usize,
        /// Image models: largest image in bytes, after base64 decoding (413 above).
        #[arg(long, default_value_t = ServeConfig::default().max_image_bytes)]
        max_image_bytes: usize,
        /// Image models: most pixels (width × height) in an image, read from its header
        /// before decoding (413 above; at most 67108864).
        #[arg(long, default_value_t = ServeConfig::default().max_image_pixels)]
        max_image_pixels: u64,
        /// Inference threads (each batch already uses every kernel thread).
        #[arg(long, default_value_t = ServeConfig::default().workers)]
        workers: usize,
        /// Kernel threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Number format of the linear layers (see `predict --precision`).
        #[arg(long, value_enum, default_value_t = Precision::Auto)]
        precision: Precision,
    },
    /// Time a training step or an inference pass of a random model of a known shape; the
    /// last line printed is JSON: {"median_ms", "min_ms", "gflops", "peak_rss_mb", ...}.
    Bench {
        /// `train` or `infer`.
        #[arg(value_parser = ["train", "infer"])]
        mode: String,
        /// `minilm-l6`, `bert-base` (BERT), `roberta-base`, `distilbert-base`,
        /// `mpnet-base`.
        #[arg(long, default_value = "minilm-l6")]
        preset: String,
        /// Sequences per batch.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Timed steps (after 2 warm-up steps).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// `f32`, `int8` (infer), `bf16` (CPUs with avx512_bf16) or `auto`.
        #[arg(long, default_value = "f32")]
        precision: String,
        /// Kernel threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Sentence embeddings from a model directory (pretrained or fine-tuned): one JSONL
    /// line `{"embedding": [...]}` per input, as sentence-transformers computes them.
    Embed {
        /// The model directory (or a .gguf file, converted once into the cache).
        #[arg(long)]
        model: PathBuf,
        /// Texts (CSV, TSV, JSONL, or .txt with one text per line).
        #[arg(long)]
        input: PathBuf,
        /// Output file (JSONL); standard output when absent.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Text column.
        #[arg(long, default_value = "text")]
        text_column: String,
        /// `mean` (over the non-padding tokens) or `cls` (the first token).
        #[arg(long, default_value = "mean")]
        pooling: String,
        /// Divide each embedding by its L2 norm.
        #[arg(long)]
        normalize: bool,
        /// Truncation length (default: the sentence-transformers config's, else the
        /// model's longest input, at most 512).
        #[arg(long)]
        max_length: Option<usize>,
    },
    /// Write a run's report: one self-contained HTML page (curves, metrics per epoch,
    /// confusion matrix, per-class report, worst held-out examples, settings and timings)
    /// and the plots as PNG files in plots/ beside it. `train` writes it at its end.
    Report {
        /// The run directory (a recipe's output_dir).
        run_dir: PathBuf,
        /// The HTML file to write (default RUN_DIR/report.html).
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Write an int8 copy of an exported model: every linear layer's weights as int8
    /// (per output channel, symmetric) with their f32 scales; embeddings, norms and biases
    /// stay f32. predict, eval and serve run it in int8.
    Quantize {
        /// The exported (f32) model directory.
        #[arg(long)]
        model: PathBuf,
        /// The directory to write (must not exist).
        #[arg(long)]
        output: PathBuf,
    },
    /// Describe a model directory.
    Inspect {
        /// The model directory (or a .gguf file, converted once into the cache).
        #[arg(long)]
        model: PathBuf,
    },
    /// Generate text with a decoder (Llama, GPT-2): the prompt's continuation, streamed to
    /// standard output as it is made (KV cache; greedy at temperature 0).
    Generate {
        /// The model directory (or GGUF file) of a decoder.
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter directory applied to `--model` (its base model).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The prompt.
        #[arg(long, conflicts_with = "input", required_unless_present = "input")]
        prompt: Option<String>,
        /// A file whose whole text is the prompt.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// 0: greedy; above: sample from softmax(logits / temperature).
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Nucleus sampling: the most likely tokens up to this probability mass.
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print only the generated text (no summary line on standard error).
        #[arg(long)]
        quiet: bool,
    },
    /// Convert a PyTorch weight file (pytorch_model.bin, .pth; zip or legacy format) to
    /// safetensors. Only tensors are read: a file that would run code is refused.
    Convert {
        /// The PyTorch file.
        #[arg(long)]
        input: PathBuf,
        /// The safetensors file to write.
        #[arg(long)]
        output: PathBuf,
    },
}

/// Progress bars on a terminal; otherwise (CI logs, files) a plain line on standard
/// error every 30 seconds of a phase. Messages on standard output.
struct Bars {
    bar: Option<ProgressBar>,
    show: bool,
    /// Without a terminal: the phase's name, total, count, start and last line's time.
    plain: Option<(String, u64, u64, std::time::Instant, std::time::Instant)>,
}

/// How often a phase's plain progress line is printed without a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(30);

impl Progress for Bars {
    fn start(&mut self, name: &str, total: u64) {
        if !self.show {
            let now = std::time::Instant::now();
            self.plain = Some((name.to_string(), total, 0, now, now));
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
        if let Some((name, total, done, started, last)) = &mut self.plain {
            *done += n;
            if last.elapsed() >= PLAIN_EVERY {
                *last = std::time::Instant::now();
                let rate = *done as f64 / started.elapsed().as_secs_f64().max(1e-9);
                let eta = total.saturating_sub(*done) as f64 / rate.max(1e-9);
                eprintln!("{name}: {done}/{total} examples, {rate:.1} examples/s, eta {eta:.0} s");
            }
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        self.plain = None;
    }
    fn message(&mut self, msg: &str) {
        if STDOUT_CLOSED.load(Ordering::SeqCst) {
            return;
        }
        let line: [&[u8]; 2] = [msg.as_bytes(), b"\n"];
        let written = match &self.bar {
            Some(b) => b.suspend(|| write_stdout(&line)),
            None => write_stdout(&line),
        };
        if written.is_err() {
            // The reader has gone (`ferrotune train ... | head -2`): stop as on Ctrl-C, so
            // the run checkpoints after this step and can be resumed.
            STDOUT_CLOSED.store(true, Ordering::SeqCst);
            if let Some(flag) = STOP.get() {
                flag.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// Set once a write to standard output failed (its reader closed the pipe).
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `parts` to standard output; `Err` when it is closed (Rust ignores SIGPIPE, so
/// a closed pipe is an error here, never a kill or a panic).
fn write_stdout(parts: &[&[u8]]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for p in parts {
        out.write_all(p)?;
    }
    out.flush()
}

/// Prints a command's result (with a final newline when it has none); a closed standard
/// output ends the command quietly (its reader wanted no more), as `head` users expect.
fn print_out(out: impl AsRef<[u8]>) -> anyhow::Result<()> {
    let bytes = out.as_ref();
    let newline: &[u8] = if bytes.is_empty() || bytes.ends_with(b"\n") {
        b""
    } else {
        b"\n"
    };
    match write_stdout(&[bytes, newline]) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("writing to standard output"))
        }
        _ => Ok(()),
    }
}

fn bars() -> Bars {
    Bars {
        bar: None,
        show: std::io::stderr().is_terminal(),
        plain: None,
    }
}

/// Fixes the thread count for rayon and candle (read when their pools start, not yet
/// started here). Without `n`, candle's default (the physical cores) is written down once:
/// candle asks for the count on every operation, and with the variable unset it parses
/// `/proc/cpuinfo` each time, ~7% of a MiniLM training step (measured with `perf`).
fn set_threads(n: Option<usize>) {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() && n.is_none() {
        return;
    }
    let n = n.unwrap_or_else(ferrotune::num_threads);
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}

fn reader_for(text_column: String, label_column: Option<String>) -> ReaderOptions {
    ReaderOptions {
        text_column,
        text_pair_column: None,
        label_column,
        encoding_errors: EncodingErrors::Error,
        ..Default::default()
    }
}

/// `ferrotune train`'s arguments.
struct TrainArgs {
    recipe: PathBuf,
    set: Vec<String>,
    output_dir: Option<PathBuf>,
    resume: Option<String>,
    overwrite_output_dir: bool,
}

/// `ferrotune train` as rank `world.rank()` of `world.size()` (one process, or one of the
/// ranks `mpirun` started): rank 0 alone shows progress and writes the run's files.
fn train_cmd(
    a: TrainArgs,
    world: ferrotune::dist::World,
    user_threads: bool,
) -> anyhow::Result<()> {
    let TrainArgs {
        recipe,
        mut set,
        output_dir,
        resume,
        overwrite_output_dir,
    } = a;
    if let Some(d) = &output_dir {
        set.push(format!("output_dir={}", toml_string(&d.to_string_lossy())));
    }
    let cfg = TrainConfig::load(&recipe, &set)?;
    match cfg.threads {
        // Ranks on one host share its cores (unless the launcher already bound each to
        // its own, which `num_threads` sees).
        None if world.is_distributed() && !user_threads => set_threads(Some(
            ferrotune::dist::threads_per_rank(ferrotune::num_threads()),
        )),
        t => set_threads(t),
    }
    let main = world.is_main();
    let control = Control {
        resume,
        stop: stop_on_signals(),
        overwrite_output_dir,
        world,
    };
    let mut silent = ferrotune::train::Silent;
    let mut shown = bars();
    let progress: &mut dyn Progress = if main { &mut shown } else { &mut silent };
    match ferrotune::train::train_with(&cfg, progress, &control) {
        Err(e @ Error::Interrupted { .. }) if STDOUT_CLOSED.load(Ordering::SeqCst) => {
            eprintln!("standard output was closed; {e}");
            Err(StdoutClosed.into())
        }
        Err(Error::Interrupted { .. }) if !main => Err(Interrupted.into()),
        Err(e @ Error::Interrupted { .. }) => {
            let mut again = format!("ferrotune train --recipe {}", recipe.display());
            for s in &set {
                if !s.starts_with("output_dir=") {
                    again.push_str(&format!(" --set '{s}'"));
                }
            }
            if let Some(d) = &output_dir {
                again.push_str(&format!(" --output-dir {}", d.display()));
            }
            if control.world.is_distributed() {
                again = format!("mpirun -n {} {again}", control.world.size());
            }
            eprintln!("{e}");
            eprintln!("to continue: {again} --resume latest");
            Err(Interrupted.into())
        }
        r => {
            r?;
            // The run is done; a report that cannot be written is worth a warning,
            // not a failed run (`ferrotune report` writes it again).
            if main {
                if let Err(e) = write_report(&cfg.output_dir, None) {
                    eprintln!("warning: the run's report was not written: {e}");
                }
            }
            Ok(())
        }
    }
}

fn try_main(cli: Cli) -> anyhow::Result<()> {
    // Threads the user chose for every command (RAYON_NUM_THREADS) are kept as they are.
    let user_threads = std::env::var_os("RAYON_NUM_THREADS").is_some();
    // The thread count, fixed before any pool starts (commands with `--threads` or a
    // recipe's `threads` override it below).
    set_threads(None);
    match cli.cmd {
        Cmd::Train {
            recipe,
            set,
            output_dir,
            resume,
            overwrite_output_dir,
        } => {
            let world = ferrotune::dist::World::from_launcher()?;
            let args = TrainArgs {
                recipe,
                set,
                output_dir,
                resume,
                overwrite_output_dir,
            };
            if !world.is_distributed() {
                return train_cmd(args, world, user_threads);
            }
            match train_cmd(args, world.clone(), user_threads) {
                Err(e)
                    if e.downcast_ref::<Interrupted>().is_none()
                        && e.downcast_ref::<StdoutClosed>().is_none() =>
                {
                    // One rank failed: say which, and end every rank now (the others
                    // may be waiting for it in a collective).
                    let bad = matches!(e.downcast_ref::<Error>(), Some(e) if e.is_bad_input());
                    eprintln!("error ({}): {e}", world.who());
                    world.comm().abort(if bad { 2 } else { 1 });
                }
                r => r?,
            }
        }
        Cmd::Report { run_dir, output } => write_report(&run_dir, output.as_deref())?,
        Cmd::Quantize { model, output } => {
            let q = ferrotune::quantize::quantize_model(&model, &output)?;
            let mb = |b: u64| b as f64 / 1e6;
            print_out(format!(
                "{}: {} linear layers in int8; non-embedding weights {:.1} MB ({:.2}x of {:.1} MB in f32), embeddings {:.1} MB (f32), model.safetensors {:.1} MB",
                output.display(),
                q.layers,
                mb(q.non_embedding_bytes),
                q.non_embedding_bytes as f64 / q.non_embedding_f32_bytes.max(1) as f64,
                mb(q.non_embedding_f32_bytes),
                mb(q.embedding_bytes),
                mb(q.file_bytes),
            ))?;
        }
        Cmd::Eval {
            model,
            adapter,
            input,
            text_column,
            label_column,
            no_header,
            encoding_errors,
            precision,
            block_size,
        } => {
            let model = resolve_model(&model)?;
            if ferrotune::train::causal_lm::is_causal_lm_dir(&model)? {
                // Loss and perplexity of the text, as the run's evaluation reports them.
                let m = ferrotune::train::causal_lm::evaluate_dir(
                    &model,
                    &input,
                    block_size,
                    8,
                    text_column.as_deref().unwrap_or("text"),
                )?;
                eprintln!(
                    "eval_loss {:.4} eval_perplexity {:.4}",
                    m["loss"], m["perplexity"]
                );
                let line: serde_json::Map<String, serde_json::Value> = m
                    .iter()
                    .map(|(k, v)| (format!("eval_{k}"), serde_json::json!(v)))
                    .collect();
                print_out(serde_json::Value::Object(line).to_string())?;
                return Ok(());
            }
            let mut p = Predictor::load_with_adapter(&model, adapter.as_deref())?.0;
            let why = p.set_precision(precision.into())?;
            if p.precision != ferrotune::precision::Precision::F32 {
                eprintln!("precision: {why}");
            }
            let mut opts = p.reader_options(true);
            if let Some(c) = text_column {
                opts.text_column = c;
            }
            if let Some(c) = label_column {
                opts.label_column = Some(c);
            }
            if no_header {
                opts.header = false;
            }
            opts.encoding_errors = encoding_errors.into();
            let label_column = opts.label_column.clone().unwrap_or_default();
            let mut rows = open_examples(&input, &opts)?;
            let stop = stop_on_signals();
            let mut meter = Meter::new("eval");
            let (r, end) = p.evaluate_stream(
                &mut rows,
                &label_column,
                |n| meter.advance(n),
                || stop.load(Ordering::SeqCst),
            )?;
            meter.finish();
            if end.stopped {
                eprintln!("interrupted after {} examples", end.rows);
                return Err(Interrupted.into());
            }
            for note in rows.notes() {
                eprintln!("{note}");
            }
            if let Some(report) = &r.report {
                print_out(report.per_class_table(&p.labels))?;
            }
            let mut line = serde_json::Map::new();
            line.insert("eval_examples".into(), end.rows.into());
            for (k, v) in &r.metrics {
                line.insert(format!("eval_{k}"), serde_json::json!(v));
            }
            print_out(serde_json::Value::Object(line).to_string())?;
        }
        Cmd::Predict {
            model,
            adapter,
            input,
            output,
            text_column,
            no_header,
            encoding_errors,
            chunk_size,
            precision,
        } => {
            let mut p =
                Predictor::load_with_adapter(&resolve_model(&model)?, adapter.as_deref())?.0;
            p.stream_chunk = chunk_size.max(1);
            let why = p.set_precision(precision.into())?;
            if p.precision != ferrotune::precision::Precision::F32 {
                eprintln!("precision: {why}");
            }
            let mut opts = p.reader_options(false);
            if let Some(c) = text_column {
                opts.text_column = c;
            }
            if no_header {
                opts.header = false;
            }
            opts.encoding_errors = encoding_errors.into();
            let mut rows = open_examples(&input, &opts)?;
            let stop = stop_on_signals();
            let stopped = || stop.load(Ordering::SeqCst) || STDOUT_CLOSED.load(Ordering::SeqCst);
            let mut meter = Meter::new("predict");
            match output {
                Some(path) => {
                    // Lines go to OUTPUT.partial as each chunk is done, so an interrupted
                    // run leaves every prediction made so far, each line whole; the file
                    // takes its name only once complete.
                    let partial = partial_path(&path);
                    let mut file =
                        std::fs::File::create(&partial).map_err(|e| Error::io(&partial, e))?;
                    let mut whole = 0u64;
                    let r = p.predict_stream(
                        &mut rows,
                        is_csv(&path),
                        |b| {
                            if let Err(e) = file.write_all(b) {
                                // A full disk may have taken part of the chunk: cut the
                                // file back to its last whole line.
                                let _ = file.set_len(whole);
                                return Err(Error::io(&partial, e));
                            }
                            whole += b.len() as u64;
                            Ok(())
                        },
                        |n| meter.advance(n),
                        stopped,
                    );
                    meter.finish();
                    let done = meter.count;
                    let kept = || {
                        if done > 0 {
                            eprintln!(
                                "the {done} predictions made before it are in {} (each line whole)",
                                partial.display()
                            );
                        } else {
                            let _ = std::fs::remove_file(&partial);
                        }
                    };
                    match r {
                        Err(e) => {
                            eprintln!("error: {e}");
                            kept();
                            return Err(Reported(e.is_bad_input()).into());
                        }
                        Ok(end) if end.stopped => {
                            eprintln!("interrupted");
                            kept();
                            return Err(Interrupted.into());
                        }
                        Ok(end) => {
                            file.sync_all().map_err(|e| Error::io(&partial, e))?;
                            drop(file);
                            std::fs::rename(&partial, &path).map_err(|e| Error::io(&path, e))?;
                            eprintln!(
                                "{} predictions written to {} ({})",
                                end.rows,
                                path.display(),
                                meter.rate()
                            );
                        }
                    }
                }
                None => {
                    let end = p.predict_stream(
                        &mut rows,
                        false,
                        |b| {
                            if !STDOUT_CLOSED.load(Ordering::SeqCst) && write_stdout(&[b]).is_err()
                            {
                                // The reader has gone (`ferrotune predict ... | head`).
                                STDOUT_CLOSED.store(true, Ordering::SeqCst);
                            }
                            Ok(())
                        },
                        |n| meter.advance(n),
                        stopped,
                    )?;
                    meter.finish();
                    if end.stopped && !STDOUT_CLOSED.load(Ordering::SeqCst) {
                        eprintln!("interrupted after {} predictions", end.rows);
                        return Err(Interrupted.into());
                    }
                }
            }
            for note in rows.notes() {
                eprintln!("{note}");
            }
        }
        Cmd::Serve {
            model,
            host,
            port,
            max_batch_tokens,
            max_batch_requests,
            batch_wait_ms,
            max_inputs_per_request,
            max_concurrent_requests,
            request_timeout_ms,
            max_body_bytes,
            max_image_bytes,
            max_image_pixels,
            workers,
            threads,
            precision,
        } => {
            set_threads(threads);
            let cfg = ServeConfig {
                precision: precision.into(),
                host,
                port,
                max_batch_tokens,
                max_batch_requests,
                max_inputs_per_request,
                max_concurrent_requests,
                request_timeout: Duration::from_millis(request_timeout_ms),
                max_body_bytes,
                workers,
                batch_wait: Duration::from_millis(batch_wait_ms),
                max_image_bytes,
                max_image_pixels,
            };
            ferrotune::serve::run(&resolve_model(&model)?, cfg)?;
        }
        Cmd::Bench {
            mode,
            preset,
            batch,
            seq,
            steps,
            precision,
            threads,
        } => {
            set_threads(threads);
            let spec = ferrotune::bench::BenchSpec {
                preset: preset.parse().map_err(anyhow::Error::msg)?,
                train: mode == "train",
                batch,
                seq,
                steps,
                precision,
            };
            let r = ferrotune::bench::run(&spec, |i, ms| {
                let kind = if i < 2 { "warm-up" } else { "step" };
                eprintln!("{kind} {i}: {ms:.1} ms");
            })?;
            print_out(serde_json::to_string(&r)?)?;
        }
        Cmd::Embed {
            model,
            input,
            output,
            text_column,
            pooling,
            normalize,
            max_length,
        } => {
            let pooling: ferrotune::nn::Pooling = pooling.parse().map_err(anyhow::Error::msg)?;
            if pooling == ferrotune::nn::Pooling::Pooler {
                anyhow::bail!("--pooling: expected mean or cls");
            }
            let device = ferrotune::nn::device();
            let model = resolve_model(&model)?;
            let (m, enc) = ferrotune::infer::load_embedder(&model, max_length, &device)?;
            let ex = read_examples(&input, &reader_for(text_column, None))?;
            use ferrotune::data::InputEncoder;
            let items = enc.encode(&ex)?;
            let emb =
                ferrotune::infer::embed(m.as_ref(), &enc, &items, pooling, normalize, 32, &device)?;
            let mut text = String::new();
            for e in &emb {
                text.push_str(&serde_json::json!({ "embedding": e }).to_string());
                text.push('\n');
            }
            match output {
                Some(path) => {
                    let tmp = path.with_extension("partial");
                    std::fs::write(&tmp, &text).map_err(|e| Error::io(&tmp, e))?;
                    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
                    eprintln!("{} embeddings written to {}", emb.len(), path.display());
                }
                None => print_out(&text)?,
            }
        }
        Cmd::Inspect { model } => {
            let info = ferrotune::artifact::inspect(&resolve_model(&model)?)?;
            print_out(&info)?;
        }
        Cmd::Generate {
            model,
            adapter,
            prompt,
            input,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            quiet,
        } => {
            let prompt = match (prompt, input) {
                (Some(p), _) => p,
                (None, Some(f)) => std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?,
                (None, None) => unreachable!("clap requires one"),
            };
            let model = ferrotune::formats::gguf::resolve_model(&model)?;
            let generator =
                ferrotune::generate::TextGenerator::load_with_adapter(&model, adapter.as_deref())?;
            let sampling = ferrotune::generate::Sampling {
                max_new_tokens,
                temperature,
                top_p,
                seed,
            };
            let start = std::time::Instant::now();
            let mut out = std::io::stdout().lock();
            let g = generator.run(&prompt, &sampling, |piece| {
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            })?;
            drop(out);
            if !quiet {
                let secs = start.elapsed().as_secs_f64();
                eprintln!(
                    "\n[{} prompt tokens, {} new, {:.1} tokens/s, stopped: {}]",
                    g.prompt_tokens,
                    g.ids.len(),
                    g.ids.len() as f64 / secs.max(1e-9),
                    g.finish.as_str()
                );
            }
        }
        Cmd::Convert { input, output } => {
            let n = ferrotune::formats::pickle::convert_to_safetensors(&input, &output)?;
            print_out(format!("{n} tensors written to {}", output.display()))?;
        }
    }
    Ok(())
}

/// Writes a run's report and says where, with anything that could not be read.
fn write_report(dir: &std::path::Path, output: Option<&std::path::Path>) -> anyhow::Result<()> {
    let w = ferrotune::report::write_report(dir, output)?;
    for n in &w.notes {
        eprintln!("note: {n}");
    }
    eprintln!(
        "report written to {}{}",
        w.html.display(),
        match w.pngs.first().and_then(|p| p.parent()) {
            Some(d) => format!(" ({} plots as PNG in {})", w.pngs.len(), d.display()),
            None => String::new(),
        }
    );
    Ok(())
}

/// An error already printed (with what it left behind); exit 2 when the input is at fault,
/// else 1.
#[derive(Debug)]
struct Reported(bool);
impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error reported")
    }
}
impl std::error::Error for Reported {}

/// `OUTPUT.partial`: where a streamed output is written until it is complete.
fn partial_path(path: &std::path::Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Progress of a stream whose length is not known: a spinner with the count and rate on
/// a terminal; otherwise a line on standard error every 10 seconds.
struct Meter {
    name: &'static str,
    count: usize,
    started: std::time::Instant,
    last_line: std::time::Instant,
    bar: Option<ProgressBar>,
}

impl Meter {
    fn new(name: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg} {pos} rows, {per_sec}, {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_message(name);
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        let now = std::time::Instant::now();
        Meter {
            name,
            count: 0,
            started: now,
            last_line: now,
            bar,
        }
    }

    fn advance(&mut self, n: usize) {
        self.count += n;
        match &self.bar {
            Some(b) => b.inc(n as u64),
            None if self.last_line.elapsed() >= Duration::from_secs(10) => {
                self.last_line = std::time::Instant::now();
                eprintln!("{}: {} rows, {}", self.name, self.count, self.rate());
            }
            None => {}
        }
    }

    fn rate(&self) -> String {
        let s = self.started.elapsed().as_secs_f64().max(1e-9);
        format!("{:.0} rows/s", self.count as f64 / s)
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// The run stopped on a signal after writing a checkpoint (exit 130, as shells do).
#[derive(Debug)]
struct Interrupted;
impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted")
    }
}
impl std::error::Error for Interrupted {}

/// Training stopped because standard output was closed, after writing a checkpoint
/// (exit 141, as a shell reports a process ended by SIGPIPE).
#[derive(Debug)]
struct StdoutClosed;
impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "standard output closed")
    }
}
impl std::error::Error for StdoutClosed {}

static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe. A second signal finds the default action
    // restored and ends the process at once.
    if let Some(flag) = STOP.get() {
        flag.store(true, Ordering::SeqCst);
    }
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
    }
}

/// Ctrl-C and SIGTERM ask the trainer to stop after the current step and checkpoint.
fn stop_on_signals() -> Arc<AtomicBool> {
    let flag = STOP
        .get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone();
    #[cfg(unix)]
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
    flag
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
    // Before any thread starts (ferrotune::malloc's documentation says why).
    ferrotune::malloc::keep_freed_memory();
    // A file-size limit (`ulimit -f`) then fails the write with EFBIG, reported with its
    // path like a full disk, instead of killing the process mid-write.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let cli = Cli::parse();
    match try_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Interrupted>().is_some() => ExitCode::from(130),
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => ExitCode::from(141),
        Err(e) => {
            if let Some(Reported(bad_input)) = e.downcast_ref::<Reported>() {
                return ExitCode::from(if *bad_input { 2 } else { 1 });
            }
            eprintln!("error: {e}");
            // 2: the user's input (recipe, data, model files) is at fault; 1: anything
            // else (a full disk, a denied permission, a bug).
            match e.downcast_ref::<Error>() {
                Some(e) if e.is_bad_input() => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}

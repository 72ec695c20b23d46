//! A fine-tuned model loaded from its exported directory, for `ferrotune predict`,
//! `ferrotune eval` and the server. Any family: the predictor holds the model, its input
//! encoder and its task as trait objects.

use std::path::{Path, PathBuf};

use candle_core::Device;
use tokenizers::Tokenizer;

use crate::artifact::ExportInfo;
use crate::data::batch::Features;
use crate::data::labels::LabelMap;
use crate::data::reader::{Example, Examples, ReaderOptions};
use crate::data::{encoder_for, ImageRecipe, InputEncoder};
use crate::error::{Error, Result};
use crate::families::{self, Family, HeadSpec, HfConfig, InputKind, Model};
use crate::infer::infer_logits;
use crate::loss::LossConfig;
use crate::nn::{GroupKind, ParamStore};
use crate::precision::{self, Precision, QUANTIZATION_CONFIG};
use crate::tasks::{Evaluation, ProblemType, TargetData, Task};

/// Examples read, encoded and inferred at a time by [`Predictor::predict_stream`] and
/// [`Predictor::evaluate_stream`]: enough to batch by length with little padding, few
/// enough that memory stays flat however long the input is.
pub const STREAM_CHUNK: usize = 4096;

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamEnd {
    /// Examples done (predicted and written, or evaluated).
    pub rows: usize,
    /// True when `stop` ended it before the input did.
    pub stopped: bool,
}

/// A fine-tuned model loaded for inference from an exported directory.
pub struct Predictor {
    /// The model.
    pub model: Box<dyn Model>,
    /// Its family.
    pub family: &'static dyn Family,
    /// Its input encoder (the tokenizer, truncating to `info.max_seq_length`).
    pub encoder: Box<dyn InputEncoder>,
    /// Label names, by id.
    pub labels: Vec<String>,
    /// Training-time settings read from `config.json`.
    pub info: ExportInfo,
    /// The task (`problem_type` of `config.json`; single-label when absent).
    pub problem_type: ProblemType,
    /// The directory it was loaded from.
    pub dir: PathBuf,
    /// Examples per forward pass.
    pub batch_size: usize,
    /// Examples per chunk of the streaming methods (default [`STREAM_CHUNK`]).
    pub stream_chunk: usize,
    /// The number format of the linear layers: f32, int8 (weights quantized per output
    /// channel at first use, activations per row; [`crate::kernels::int8`]) or bf16 (f32
    /// sums; [`crate::kernels::bf16`]). f32 by default, int8 for a quantized model; set it
    /// through [`Predictor::set_precision`], which checks what can run.
    pub precision: Precision,
    /// Loaded from a quantized directory (`ferrotune quantize`): int8 weights only, so
    /// int8 inference only.
    pub quantized: bool,
    device: Device,
}

impl Predictor {
    /// Loads an exported model directory (`config.json` with `id2label`,
    /// `model.safetensors` with a head, a tokenizer).
    pub fn load(dir: &Path) -> Result<Self> {
        Ok(Self::load_with_params(dir)?.0)
    }

    /// [`Predictor::load`], with the parameters as loaded (their export names, groups and
    /// which weights are linear layers').
    pub fn load_with_params(dir: &Path) -> Result<(Self, ParamStore)> {
        Self::load_with_adapter(dir, None)
    }

    /// [`Predictor::load_with_params`] of base model `dir` with the PEFT LoRA adapter
    /// directory `adapter` applied ([`crate::nn::lora::read_adapter`]): the labels and
    /// settings come from the adapter's `ferrotune_config.json` when it has one (ferrotune
    /// wrote it), else from `dir`'s `config.json`; the head from the adapter's modules to
    /// save. An adapter that does not fit the model is an error naming
    /// `adapter_model.safetensors` and the tensor.
    pub fn load_with_adapter(dir: &Path, adapter: Option<&Path>) -> Result<(Self, ParamStore)> {
        let side = adapter
            .map(|a| a.join(crate::export::ADAPTER_SIDE_CONFIG))
            .filter(|p| p.exists());
        let cfg_path = side.unwrap_or_else(|| dir.join("config.json"));
        let cfg = HfConfig::from_file(&cfg_path)?;
        let family = families::family(&cfg)?;
        let labels = cfg.labels().ok_or_else(|| {
            Error::at(
                &cfg_path,
                None,
                Some("id2label"),
                "missing: this is not a fine-tuned classification model",
            )
        })?;
        let max_tokens = family.max_tokens(&cfg)?;
        let info: ExportInfo = match cfg.raw.get("ferrotune") {
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| Error::at(&cfg_path, None, Some("ferrotune"), format!("{e}")))?,
            None => ExportInfo::defaults(family.poolings()[0], max_tokens.min(512)),
        };
        let images = family.input() == InputKind::Image;
        if !images && info.max_seq_length > max_tokens {
            return Err(Error::at(
                &cfg_path,
                None,
                Some("ferrotune.max_seq_length"),
                format!(
                    "{} is more than the model's {max_tokens} positions",
                    info.max_seq_length
                ),
            ));
        }
        let problem_type = match cfg.problem_type.as_deref() {
            None => ProblemType::SingleLabelClassification,
            Some(p) => ProblemType::parse(p).ok_or_else(|| {
                Error::at(
                    &cfg_path,
                    None,
                    Some("problem_type"),
                    format!("unknown problem type `{p}`"),
                )
            })?,
        };
        let device = crate::nn::device();
        let head = HeadSpec {
            pooling: Some(info.pooling),
            ..HeadSpec::new(labels.len())
        };
        let load = || families::load_weights(&cfg, family, dir, &head, 0, &device);
        // With an adapter, the head comes from its modules to save (checked there).
        let loaded = crate::nn::lora::load_with_adapter(adapter, &device, load)?;
        if loaded.new_head && adapter.is_none() {
            let head_tensor = loaded
                .params
                .params
                .iter()
                .find(|p| loaded.params.groups[p.group].kind == GroupKind::Head)
                .map(|p| p.name.clone())
                .unwrap_or_else(|| "classifier.weight".into());
            return Err(Error::at(
                dir.join("model.safetensors"),
                None,
                Some(&head_tensor),
                format!(
                    "missing or not of {} labels: not a fine-tuned model",
                    labels.len()
                ),
            ));
        }
        let quantized = loaded.params.int8_layers > 0;
        let says_quantized = cfg.raw.get(QUANTIZATION_CONFIG).is_some();
        if says_quantized != quantized {
            return Err(Error::at(
                &cfg_path,
                None,
                Some(QUANTIZATION_CONFIG),
                if quantized {
                    "missing, but model.safetensors holds int8 weights (a quantized model's \
                     config.json says how it was quantized)"
                } else {
                    "present, but model.safetensors holds no int8 weights"
                },
            ));
        }
        // An image model runs the evaluation pipeline it was trained with (or, for a
        // directory ferrotune did not write, its checkpoint's).
        let image = ImageRecipe {
            eval: info.image_eval.as_ref().map(|p| p.transforms.clone()),
            mean: info.image_eval.as_ref().map(|p| p.mean),
            std: info.image_eval.as_ref().map(|p| p.std),
            ..ImageRecipe::default()
        };
        let encoder = encoder_for(family, &cfg, dir, info.max_seq_length, &image)?;
        let predictor = Predictor {
            problem_type,
            model: loaded.model,
            family,
            encoder,
            labels,
            info,
            dir: dir.to_path_buf(),
            batch_size: 32,
            stream_chunk: STREAM_CHUNK,
            precision: if quantized {
                Precision::Int8
            } else {
                Precision::F32
            },
            quantized,
            device,
        };
        Ok((predictor, loaded.params))
    }

    /// Chooses the number format ([`precision::for_inference`]): sets
    /// [`Predictor::precision`] and returns what runs and why, or says why `requested`
    /// cannot run.
    pub fn set_precision(&mut self, requested: Precision) -> Result<String> {
        let (p, why) = precision::for_inference(requested, self.quantized, self.device.is_cpu())?;
        self.precision = p;
        Ok(why)
    }

    /// How to read input for this model: the columns, header and pair of its training
    /// data; labels from its label column when `labelled`.
    pub fn reader_options(&self, labelled: bool) -> ReaderOptions {
        ReaderOptions {
            text_column: self.info.text_column.clone(),
            text_pair_column: self.info.text_pair_column.clone(),
            label_column: labelled.then(|| self.info.label_column.clone()),
            header: self.info.header,
            column_names: self.info.column_names.clone(),
            file_extensions: if self.encoder.image_eval().is_some() {
                crate::data::image::IMAGE_EXTENSIONS
                    .iter()
                    .map(|e| e.to_string())
                    .collect()
            } else {
                ReaderOptions::default().file_extensions
            },
            image_paths: self.encoder.image_eval().is_some(),
            ..Default::default()
        }
    }

    /// Predicts for every example of `rows`, [`Predictor::stream_chunk`] at a time: each chunk is
    /// read, encoded, inferred in batches of similar length, formatted (JSONL, or CSV when
    /// `csv`) and handed to `write` as whole lines in input order (a CSV's header before
    /// the first), then `progress(n)` is called. Memory holds one chunk whatever the
    /// input's size. `stop()` is asked before each chunk; when it is true the stream ends
    /// there, everything before it written. An error in a row ends the stream with that
    /// error, the chunks before it written.
    pub fn predict_stream(
        &self,
        rows: &mut Examples,
        csv: bool,
        mut write: impl FnMut(&[u8]) -> Result<()>,
        mut progress: impl FnMut(usize),
        stop: impl Fn() -> bool,
    ) -> Result<StreamEnd> {
        let header = self.format(&[], csv)?;
        write(&header)?;
        let mut done = 0;
        loop {
            if stop() {
                return Ok(StreamEnd {
                    rows: done,
                    stopped: true,
                });
            }
            let chunk = rows.next_chunk(self.stream_chunk.max(1))?;
            if chunk.is_empty() {
                return Ok(StreamEnd {
                    rows: done,
                    stopped: false,
                });
            }
            let probs = self.predict_probs(&chunk, |_| {})?;
            let bytes = self.format(&probs, csv)?;
            // Each chunk's bytes start with the header (CSV): write it once.
            let body = bytes.strip_prefix(header.as_slice()).ok_or_else(|| {
                Error::Msg("internal: a chunk's CSV does not start with the header".into())
            })?;
            write(body)?;
            done += chunk.len();
            progress(chunk.len());
        }
    }

    /// Evaluates on the labelled examples of `rows` (see [`Predictor::evaluate`]),
    /// [`Predictor::stream_chunk`] at a time: memory holds one chunk of texts, and the outputs and
    /// targets of all (a few numbers per example). `progress(n)` after each chunk.
    pub fn evaluate_stream(
        &self,
        rows: &mut Examples,
        label_column: &str,
        mut progress: impl FnMut(usize),
        stop: impl Fn() -> bool,
    ) -> Result<(Evaluation, StreamEnd)> {
        let path = rows.path().to_path_buf();
        let mut logits = Vec::new();
        let mut targets: Option<TargetData> = None;
        let mut stopped = false;
        loop {
            if stop() {
                stopped = true;
                break;
            }
            let chunk = rows.next_chunk(self.stream_chunk.max(1))?;
            if chunk.is_empty() {
                break;
            }
            let t = self.targets(&chunk, &path, label_column)?;
            match &mut targets {
                Some(all) => all.extend(t)?,
                None => targets = Some(t),
            }
            logits.extend(self.predict_logits(&chunk, |_| {})?);
            progress(chunk.len());
        }
        let targets = targets.ok_or_else(|| Error::file(&path, "no examples evaluated"))?;
        let eval = self.score(&logits, &targets)?;
        Ok((
            eval,
            StreamEnd {
                rows: logits.len(),
                stopped,
            },
        ))
    }

    /// The task of [`Predictor::problem_type`].
    pub fn task(&self) -> &'static dyn Task {
        self.problem_type.task()
    }

    /// The tokenizer; an error for a model that reads images.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.encoder
            .tokenizer()
            .ok_or_else(|| Error::Msg(format!("{} reads images, not text", self.dir.display())))
    }

    /// The head's raw outputs (logits, or regression values) for each example, in input
    /// order.
    pub fn predict_logits(
        &self,
        examples: &[Example],
        on_batch: impl FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let feats = self.encoder.encode(examples)?;
        self.predict_features(&feats, on_batch)
    }

    /// The head's raw outputs for already encoded inputs, in input order: the one
    /// inference path. [`Predictor::predict_logits`] encodes, then calls this; the server
    /// encodes each request as it arrives, then calls this on each batch of requests.
    pub fn predict_features(
        &self,
        feats: &[Features],
        on_batch: impl FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        infer_logits(
            self.model.as_ref(),
            self.encoder.as_ref(),
            feats,
            self.batch_size,
            &self.device,
            self.precision,
            on_batch,
        )
    }

    /// Outputs for each example, in input order: class probabilities (softmax) for
    /// single-label, per-label probabilities (sigmoid) for multi-label, values for
    /// regression.
    pub fn predict_probs(
        &self,
        examples: &[Example],
        on_batch: impl FnMut(usize),
    ) -> Result<Vec<Vec<f32>>> {
        let logits = self.predict_logits(examples, on_batch)?;
        Ok(logits.iter().map(|l| self.activate(l)).collect())
    }

    /// Logits → outputs (see [`Predictor::predict_probs`]).
    pub fn activate(&self, logits: &[f32]) -> Vec<f32> {
        self.task().activate(logits)
    }

    /// Writes outputs atomically (temporary file, then rename) as JSONL, or CSV when `path`
    /// ends in `.csv`; see [`Predictor::format`].
    pub fn write(&self, path: &Path, outputs: &[Vec<f32>]) -> Result<()> {
        let bytes = self.format(outputs, is_csv(path))?;
        crate::formats::write_whole(path, &bytes)
    }

    /// Outputs as JSONL, one line per input — single-label
    /// `{"label": "<top label>", "scores": {"<label>": p, ...}}`; multi-label
    /// `{"labels": [<labels with p ≥ threshold>], "scores": {...}}`; regression
    /// `{"value": v}` (one target) or `{"values": {"<name>": v, ...}}` — or as CSV with a
    /// column per label.
    pub fn format(&self, outputs: &[Vec<f32>], csv: bool) -> Result<Vec<u8>> {
        self.task()
            .format(&self.labels, outputs, self.info.threshold, csv)
    }

    /// Evaluates on labelled examples read from `path` (labels must be among the model's);
    /// the metrics are those of training's per-epoch evaluation, under the task's default
    /// loss.
    pub fn evaluate(
        &self,
        examples: &[Example],
        path: &Path,
        label_column: &str,
    ) -> Result<Evaluation> {
        let targets = self.targets(examples, path, label_column)?;
        let logits = self.predict_logits(examples, |_| {})?;
        self.score(&logits, &targets)
    }

    /// The targets of labelled `examples` read from `path` (labels must be among the
    /// model's).
    fn targets(&self, examples: &[Example], path: &Path, label_column: &str) -> Result<TargetData> {
        let map = LabelMap::from_labels(self.labels.clone());
        let sep = self.info.label_separator.as_deref();
        self.task()
            .encode_targets(&map, examples, path, label_column, sep)
    }

    /// The metrics of `logits` against `targets`, under the task's default loss.
    fn score(&self, logits: &[Vec<f32>], targets: &TargetData) -> Result<Evaluation> {
        let task = self.task();
        let loss = LossConfig {
            kind: task.default_loss(),
            ..Default::default()
        };
        task.evaluate(logits, targets, &loss, self.info.threshold)
    }
}

/// True when `path` names a CSV file.
pub fn is_csv(path: &Path) -> bool {
    path.extension()
        .map(|e| e.eq_ignore_ascii_case("csv"))
        .unwrap_or(false)
}

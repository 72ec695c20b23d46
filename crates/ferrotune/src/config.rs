//! The training recipe: a TOML file plus `--set key=value` overrides, validated once.
//!
//! Key names follow Hugging Face `run_glue.py` / `TrainingArguments` where one exists
//! (`learning_rate`, `num_train_epochs`, `warmup_ratio`, ...). `per_device_train_batch_size`
//! may also be written `batch_size`. Unknown keys are errors (a typo must never be silently
//! ignored), and every error names the recipe file and the key. Relative paths in a recipe
//! are taken relative to the current directory, as `transformers` does.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::reader::EncodingErrors;
use crate::data::tokenizer::MIN_SEQ_LENGTH;
use crate::error::{Error, Result};
use crate::loss::LossKind;
use crate::nn::Pooling;
use crate::optim::schedule::SchedulerKind;
use crate::precision::Precision;
pub use crate::tasks::ProblemType;

/// Class weights for cross-entropy: explicit, one per class in label order, or
/// `"balanced"` (`n_examples / (n_classes · count(class))`, as scikit-learn).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClassWeights {
    /// One weight per class, in label order.
    List(Vec<f64>),
    /// `"balanced"`.
    Named(String),
}

/// Which parameters are frozen for the whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FreezeMode {
    /// Everything trains.
    None,
    /// The embeddings are frozen.
    Embeddings,
    /// Embeddings and every encoder layer are frozen: only the pooler and the head train
    /// (a linear probe).
    Backbone,
}

/// `lora_target_modules`: module names, or `"all-linear"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LoraTargets {
    /// Module names, each matched as the whole module name or its suffix after a dot
    /// (PEFT's `target_modules`).
    List(Vec<String>),
    /// `"all-linear"`: every linear layer but the output or classifier head.
    Named(String),
}

/// The optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// AdamW (decoupled weight decay).
    Adamw,
    /// SGD with optional momentum / Nesterov (weight decay as L2, as PyTorch).
    Sgd,
}

/// What to do with a data row that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadRow {
    /// Stop before training, naming the file, line and reason.
    Error,
    /// Leave the row out; each one goes to `OUTPUT_DIR/skipped_rows.jsonl` with its reason.
    Skip,
}

/// A column given by name, or by 0-based index as a TOML integer (kept as its digits).
struct NameOrIndex;

impl serde::de::Visitor<'_> for NameOrIndex {
    type Value = String;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a column name, or a 0-based column index")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<String, E> {
        u64::try_from(v)
            .map(|v| v.to_string())
            .map_err(|_| E::custom(format!("column index {v} is negative")))
    }
}

fn name_or_index<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    d.deserialize_any(NameOrIndex)
}

/// An optional [`name_or_index`] (the key is absent, or given).
fn opt_name_or_index<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<String>, D::Error> {
    struct Column(String);
    impl<'de> Deserialize<'de> for Column {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            name_or_index(d).map(Column)
        }
    }
    Option::<Column>::deserialize(d).map(|c| c.map(|c| c.0))
}

/// A list of strings, or one string (`report_to = "none"`).
fn string_or_list<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    match OneOrMany::deserialize(d) {
        Ok(OneOrMany::One(s)) => Ok(vec![s]),
        Ok(OneOrMany::Many(v)) => Ok(v),
        Err(_) => Err(serde::de::Error::custom(
            "expected a string or a list of strings",
        )),
    }
}

/// Every setting of a fine-tuning run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Directory of the pretrained model (`config.json`, `model.safetensors`, tokenizer),
    /// or a llama.cpp `.gguf` file, replaced on loading by the directory it converts to
    /// ([`crate::formats::gguf::resolve_model`]).
    pub model_name_or_path: PathBuf,
    /// Training data: a CSV, TSV or JSONL file, or a directory with one folder per class.
    pub train_file: PathBuf,
    /// Evaluation data, in the same format. Without it, `validation_split` is used.
    pub validation_file: Option<PathBuf>,
    /// Fraction of the training data held out (seeded and stratified) for evaluation when no
    /// `validation_file` is given.
    pub validation_split: Option<f64>,
    /// Column (CSV/TSV header or JSON key) holding the text; in a CSV/TSV file also a
    /// 0-based index (`1` or `"1"`) when no column has that name.
    #[serde(deserialize_with = "name_or_index")]
    pub text_column: String,
    /// Column holding the second text of a pair (sentence-pair tasks), if any.
    #[serde(deserialize_with = "opt_name_or_index")]
    pub text_pair_column: Option<String>,
    /// Column holding the label.
    #[serde(deserialize_with = "name_or_index")]
    pub label_column: String,
    /// Whether the first row of a CSV/TSV file names its columns (default `true`). With
    /// `false` the columns are named by 0-based index (`text_column = 1`), or by
    /// `column_names`.
    pub header: bool,
    /// Names for the columns of a CSV/TSV file, one per column (with a header they replace
    /// the header's names).
    pub column_names: Option<Vec<String>>,
    /// What to do with bytes that are not UTF-8: `error` (default) or `replace`.
    pub encoding_errors: EncodingErrors,
    /// Longer inputs are truncated to this many tokens (special tokens included).
    pub max_seq_length: usize,
    /// Image models: the side of the model's input in pixels (default: the checkpoint's
    /// `pretrained_cfg.input_size`).
    pub image_size: Option<usize>,
    /// Image models: the training transforms, torchvision's names and arguments
    /// (`[[train_transforms]] name = "RandomResizedCrop"`, `size = 64`); default timm's:
    /// `RandomResizedCrop(image_size)`, `RandomHorizontalFlip()`. `Normalize` follows.
    pub train_transforms: Option<Vec<crate::data::image::Transform>>,
    /// Image models: the evaluation transforms; default timm's:
    /// `Resize(image_size / crop_pct)`, `CenterCrop(image_size)`.
    pub eval_transforms: Option<Vec<crate::data::image::Transform>>,
    /// Image models: `Normalize`'s mean (default: the checkpoint's).
    pub image_mean: Option<[f32; 3]>,
    /// Image models: `Normalize`'s standard deviation (default: the checkpoint's).
    pub image_std: Option<[f32; 3]>,
    /// Training batch size (alias `batch_size`).
    #[serde(alias = "batch_size")]
    pub per_device_train_batch_size: usize,
    /// Evaluation batch size.
    pub per_device_eval_batch_size: usize,
    /// Peak learning rate of AdamW.
    pub learning_rate: f64,
    /// Number of passes over the training data.
    pub num_train_epochs: usize,
    /// Fraction of the optimisation steps used for linear warm-up.
    pub warmup_ratio: f64,
    /// Warm-up steps; when > 0 it takes precedence over `warmup_ratio` (as in transformers).
    pub warmup_steps: usize,
    /// Learning-rate schedule after warm-up.
    pub lr_scheduler_type: SchedulerKind,
    /// Decoupled weight decay (not applied to biases and LayerNorm weights).
    pub weight_decay: f64,
    /// AdamW β₁.
    pub adam_beta1: f64,
    /// AdamW β₂.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// Gradients are clipped to this global L2 norm (0 disables clipping).
    pub max_grad_norm: f64,
    /// Seed for the data split, shuffling, dropout and new weights.
    pub seed: u64,
    /// Batch training examples of similar length together (transformers'
    /// `group_by_length`): the shuffled examples are cut into mega-batches of up to 50
    /// batches, each sorted longest first, so dynamic padding pads less.
    pub group_by_length: bool,
    /// Use only the first N training examples (after the split).
    pub max_train_samples: Option<usize>,
    /// Use only the first N evaluation examples.
    pub max_eval_samples: Option<usize>,
    /// Where the run writes its model, metrics and resolved config.
    pub output_dir: PathBuf,
    /// Where metrics go besides `metrics.jsonl` (transformers' name): `["tensorboard"]`
    /// (the default; `"all"` is the same) or `"none"`. A string or a list.
    #[serde(deserialize_with = "string_or_list")]
    pub report_to: Vec<String>,
    /// TensorBoard's directory (default `OUTPUT_DIR/runs`).
    pub logging_dir: Option<PathBuf>,
    /// Sequence representation for the head: `pooler` (BERT's), `cls` or `mean`. Default:
    /// what the model family's transformers head reads (`pooler` for BERT, `cls` for
    /// RoBERTa, MPNet and DistilBERT).
    pub pooling: Option<Pooling>,
    /// Log the training loss every N optimisation steps.
    pub logging_steps: usize,
    /// Which evaluation metric picks the exported epoch (an `eval_` prefix is accepted).
    /// Default: `accuracy` (single-label), `micro_f1` (multi-label), `mse` (regression).
    pub metric_for_best_model: Option<String>,
    /// Override of the checkpoint's hidden dropout.
    pub hidden_dropout_prob: Option<f64>,
    /// Override of the checkpoint's attention dropout.
    pub attention_probs_dropout_prob: Option<f64>,
    /// Override of the classifier dropout.
    pub classifier_dropout: Option<f64>,
    /// Threads for the tensor kernels (default: all cores).
    pub threads: Option<usize>,
    /// Number format: `auto` (default; f32 until bf16 kernels exist, and the run's first
    /// line says why), `f32`, or `bf16` (refused where the CPU has no bf16 dot product:
    /// it would run slower than f32). `int8` is for inference only ([`crate::precision`]).
    pub precision: Precision,
    /// Write a checkpoint every N optimisation steps (one is always written at each
    /// epoch's end).
    pub save_steps: Option<usize>,
    /// Keep only the newest N checkpoints (default 2; 0 keeps all).
    pub save_total_limit: Option<usize>,
    /// A step whose loss or gradient norm is NaN or infinite is skipped; after this many
    /// in a row the run stops (the last good checkpoint stays).
    pub max_bad_steps: usize,
    /// `error` (default) or `skip` rows that cannot be used.
    pub on_bad_row: OnBadRow,
    /// Drop examples whose text (and text pair) repeats an earlier one, before splitting.
    pub deduplicate: bool,
    /// In a directory-per-class `train_file` / `validation_file`, the file extensions
    /// read as examples (default `["txt"]`); other files are skipped and counted.
    pub file_extensions: Vec<String>,
    /// The task (default `single_label_classification`).
    pub problem_type: ProblemType,
    /// The loss (default: `cross_entropy` for single-label, `binary_cross_entropy` for
    /// multi-label, `mse` for regression).
    pub loss: Option<LossKind>,
    /// Cross-entropy label smoothing ε in [0, 1).
    pub label_smoothing: f64,
    /// Cross-entropy class weights (a list in label order, or `"balanced"`).
    pub class_weights: Option<ClassWeights>,
    /// Binary cross-entropy weight of positives, one per label (or one for all).
    pub pos_weight: Option<Vec<f64>>,
    /// Focal loss γ ≥ 0 (0 gives cross-entropy).
    pub focal_gamma: f64,
    /// Focal loss α: for the binary / multi-label form the weight of positives in [0, 1].
    pub focal_alpha: Option<f64>,
    /// Smooth-L1 β ≥ 0.
    pub smooth_l1_beta: f64,
    /// Huber δ > 0.
    pub huber_delta: f64,
    /// Multi-label: a label is predicted when its probability is at least this.
    pub threshold: f64,
    /// Multi-label in CSV/TSV: the separator between labels in one cell (e.g. `";"`).
    pub label_separator: Option<String>,
    /// Coefficient of Σ|w| over the trainable weights, added to the loss.
    pub l1_penalty: f64,
    /// Coefficient of Σw² over the trainable weights, added to the loss (unlike
    /// `weight_decay`, which AdamW applies outside the gradient).
    pub l2_penalty: f64,
    /// Frozen for the whole run: `none`, `embeddings` or `backbone`.
    pub freeze: FreezeMode,
    /// Also freeze the first N encoder layers (and the embeddings).
    pub freeze_layers: usize,
    /// ULMFiT gradual unfreezing: start with the head alone, unfreeze one layer group per
    /// epoch (or every `unfreeze_every_steps`), from the top down.
    pub gradual_unfreeze: bool,
    /// With `gradual_unfreeze`, unfreeze every N optimisation steps instead of every epoch.
    pub unfreeze_every_steps: Option<usize>,
    /// Discriminative learning rates: the encoder layer `l` below the top gets
    /// `learning_rate × decay^l` (top layer l = 1), the embeddings `decay^(L+1)`; the pooler
    /// and head keep `learning_rate`. In (0, 1]; 1 disables.
    pub layerwise_lr_decay: f64,
    /// Learning rate of the pooler and head (default `learning_rate`).
    pub head_learning_rate: Option<f64>,
    /// `adamw` or `sgd`.
    pub optimizer: OptimizerKind,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD Nesterov momentum.
    pub nesterov: bool,
    /// Gradients of N batches are summed before each optimizer step (the same update as
    /// one batch N times larger).
    pub gradient_accumulation_steps: usize,
    /// Stop after this many evaluations without improvement of `metric_for_best_model`.
    pub early_stopping_patience: Option<usize>,
    /// Slanted triangular schedule: fraction of steps spent increasing.
    pub stlr_cut_frac: f64,
    /// Slanted triangular schedule: ratio of the peak to the lowest learning rate.
    pub stlr_ratio: f64,
    /// fastai's `fine_tune`: the first N epochs train only what is above the backbone
    /// (the head), the rest train every group (with `layerwise_lr_decay`'s rates).
    pub freeze_epochs: usize,
    /// Batch norms normalise with their running statistics in training and never update
    /// them (their scale and shift still train).
    pub freeze_bn: bool,
    /// LoRA rank (PEFT's `r`); 0 (the default) trains the whole model. With LoRA, only
    /// the adapters and `modules_to_save` train (see `docs/LORA.md`).
    pub lora_r: usize,
    /// LoRA's `lora_alpha`: the adapters' output is scaled by `lora_alpha / lora_r`.
    pub lora_alpha: f64,
    /// Dropout on the adapters' input.
    pub lora_dropout: f64,
    /// The linear layers that get adapters: names matched as PEFT does (the module name
    /// or its suffix after a dot), or `"all-linear"`; default: PEFT's for the model type.
    pub lora_target_modules: Option<LoraTargets>,
    /// Modules that train fully beside the adapters and are saved with them (a sequence
    /// classifier adds `classifier` and `score`, as PEFT).
    pub modules_to_save: Vec<String>,
    /// rsLoRA: scale by `lora_alpha / sqrt(lora_r)`.
    pub use_rslora: bool,
    /// QLoRA-style 4-bit base (bitsandbytes' `load_in_4bit` name): with LoRA, the frozen
    /// linear layers keep their weights as 4-bit Q4_1 blocks, dequantised inside each
    /// layer's GEMMs (see `docs/LORA.md`). Unset: on when the model is a GGUF file whose
    /// linear weights are Q4_1 (then nothing is lost: they are the file's own blocks), off
    /// otherwise. Set on a model of f32 weights, it quantises them (lossy, as QLoRA).
    pub load_in_4bit: Option<bool>,
    /// With LoRA, also export the merged model (`W + scale·B·A`) to `output_dir/model`
    /// beside the adapter in `output_dir/adapter`.
    pub merge_adapters: bool,
    /// An exponential moving average of the weights (timm's `--model-ema-decay`):
    /// evaluated after every epoch beside the model, picks the best epoch and is exported.
    pub model_ema_decay: Option<f64>,
    /// timm's EMA warm-up: the decay is `min(model_ema_decay, 1 − (1 + t)^(−2/3))` at
    /// update `t`, so early weights fade fast.
    pub model_ema_warmup: bool,
    /// timm's mixup: images and targets of a batch blended with its reverse by a weight
    /// drawn from Beta(α, α); 0 disables.
    pub mixup_alpha: f64,
    /// timm's CutMix: a box of the batch's reverse pasted in, its area drawn from
    /// Beta(α, α); 0 disables.
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed at all.
    pub mixup_prob: f64,
    /// With both mixup and CutMix on, probability of CutMix for a mixed batch.
    pub mixup_switch_prob: f64,
    /// CSV/JSONL data of images: the column holding each image's path (relative paths
    /// are taken from the data file's folder). Unset: the data is text (or images by
    /// layout: class folders, IDX files).
    pub image_column: Option<String>,
    /// `problem_type = "causal_lm"`: tokens per training sequence (run_clm's
    /// `block_size`): documents are packed into blocks of this many, prompt/completion
    /// rows and conversations truncated to it. Default `min(1024, the model's
    /// positions)`; more than the model's `max_position_embeddings` is refused.
    pub block_size: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model_name_or_path: PathBuf::new(),
            train_file: PathBuf::new(),
            validation_file: None,
            validation_split: None,
            text_column: "text".into(),
            text_pair_column: None,
            label_column: "label".into(),
            header: true,
            column_names: None,
            encoding_errors: EncodingErrors::Error,
            max_seq_length: 128,
            image_size: None,
            train_transforms: None,
            eval_transforms: None,
            image_mean: None,
            image_std: None,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 32,
            learning_rate: 5e-5,
            num_train_epochs: 3,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            lr_scheduler_type: SchedulerKind::Linear,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            group_by_length: false,
            max_train_samples: None,
            max_eval_samples: None,
            output_dir: PathBuf::from("runs/ferrotune"),
            report_to: vec!["tensorboard".into()],
            logging_dir: None,
            pooling: None,
            logging_steps: 50,
            metric_for_best_model: None,
            hidden_dropout_prob: None,
            attention_probs_dropout_prob: None,
            classifier_dropout: None,
            threads: None,
            precision: Precision::Auto,
            save_steps: None,
            save_total_limit: Some(2),
            max_bad_steps: 3,
            on_bad_row: OnBadRow::Error,
            deduplicate: false,
            file_extensions: vec!["txt".into()],
            problem_type: ProblemType::SingleLabelClassification,
            loss: None,
            label_smoothing: 0.0,
            class_weights: None,
            pos_weight: None,
            focal_gamma: 2.0,
            focal_alpha: None,
            smooth_l1_beta: 1.0,
            huber_delta: 1.0,
            threshold: 0.5,
            label_separator: None,
            l1_penalty: 0.0,
            l2_penalty: 0.0,
            freeze: FreezeMode::None,
            freeze_layers: 0,
            gradual_unfreeze: false,
            unfreeze_every_steps: None,
            layerwise_lr_decay: 1.0,
            head_learning_rate: None,
            optimizer: OptimizerKind::Adamw,
            momentum: 0.0,
            nesterov: false,
            gradient_accumulation_steps: 1,
            early_stopping_patience: None,
            stlr_cut_frac: 0.1,
            stlr_ratio: 32.0,
            freeze_epochs: 0,
            freeze_bn: false,
            lora_r: 0,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            lora_target_modules: None,
            modules_to_save: Vec::new(),
            use_rslora: false,
            load_in_4bit: None,
            merge_adapters: true,
            model_ema_decay: None,
            model_ema_warmup: false,
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            mixup_prob: 1.0,
            mixup_switch_prob: 0.5,
            image_column: None,
            block_size: None,
        }
    }
}

/// The keys a recipe may contain.
pub fn known_keys() -> Vec<String> {
    match serde_json::to_value(TrainConfig::default()) {
        Ok(serde_json::Value::Object(m)) => {
            let mut k: Vec<String> = m.keys().cloned().collect();
            k.push("batch_size".into());
            k
        }
        _ => Vec::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn suggestion(key: &str, known: &[String]) -> String {
    known
        .iter()
        .map(|k| (edit_distance(key, k), k))
        .min()
        .filter(|(d, _)| *d <= 3)
        .map(|(_, k)| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default()
}

/// The 1-based line of `text` where top-level `key` is set, if found.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .map(|rest| rest.trim_start().starts_with('='))
                .unwrap_or(false)
        })
        .map(|i| i + 1)
}

/// Parses one `--set key=value` override. The value is read as a TOML value (`2e-5`,
/// `true`, `"text"`, `[1, 2]`); anything that is not valid TOML is taken as a string.
pub fn parse_override(s: &str) -> Result<(String, toml::Value)> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| Error::Config(format!("--set `{s}`: expected key=value")))?;
    let k = k.trim().to_string();
    let v = v.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()));
    Ok((k, value))
}

impl TrainConfig {
    /// The LoRA settings of a recipe (`None` when `lora_r` is 0). Without
    /// `lora_target_modules`, PEFT's default for the model type; a sequence classifier
    /// (`seq_cls`) saves `classifier` and `score` as PEFT does.
    pub fn lora_spec(
        &self,
        model_type: &str,
        seq_cls: bool,
    ) -> Result<Option<crate::nn::lora::LoraSpec>> {
        if self.lora_r == 0 {
            return Ok(None);
        }
        let targets = match &self.lora_target_modules {
            Some(LoraTargets::List(l)) => crate::nn::lora::Targets::List(l.clone()),
            Some(LoraTargets::Named(_)) => crate::nn::lora::Targets::AllLinear,
            None => match crate::nn::lora::default_targets(model_type) {
                Some(t) => {
                    crate::nn::lora::Targets::List(t.iter().map(|s| s.to_string()).collect())
                }
                None => {
                    return Err(Error::Config(format!(
                        "`lora_target_modules` is required for model type `{model_type}` \
                         (no PEFT default): a list of module names, or \"all-linear\""
                    )))
                }
            },
        };
        let mut modules_to_save = self.modules_to_save.clone();
        if seq_cls {
            for m in crate::nn::lora::SEQ_CLS_MODULES {
                if !modules_to_save.iter().any(|s| s == m) {
                    modules_to_save.push(m.to_string());
                }
            }
        }
        Ok(Some(crate::nn::lora::LoraSpec {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
            modules_to_save,
            use_rslora: self.use_rslora,
            seed: self.seed,
            base_4bit: self.load_in_4bit == Some(true),
        }))
    }

    /// Reads a recipe file and applies `--set` overrides, then validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, path, overrides)
    }

    /// Like [`TrainConfig::load`], from the recipe's text (`path` names it in messages).
    pub fn from_toml_str(text: &str, path: &Path, overrides: &[String]) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            Error::at(path, line, None, e.message().to_string())
        })?;
        let known = known_keys();
        for key in table.keys() {
            if !known.contains(key) {
                return Err(Error::at(
                    path,
                    line_of_key(text, key),
                    Some(key),
                    format!("unknown recipe key{}", suggestion(key, &known)),
                ));
            }
        }
        // Keys whose value came from `--set`: their errors name `--set KEY`, not the file.
        let mut from_set: Vec<String> = Vec::new();
        for o in overrides {
            let (k, v) = parse_override(o)?;
            from_set.push(if k == "batch_size" {
                "per_device_train_batch_size".into()
            } else {
                k.clone()
            });
            from_set.push(k.clone());
            if !known.contains(&k) {
                return Err(Error::Config(format!(
                    "--set {k}: unknown recipe key{}",
                    suggestion(&k, &known)
                )));
            }
            if k == "batch_size" {
                table.remove("per_device_train_batch_size");
            }
            if k == "per_device_train_batch_size" {
                table.remove("batch_size");
            }
            table.insert(k, v);
        }
        let mut cfg = TrainConfig::default();
        // Deserialize key by key so that a wrong type names its key.
        for (k, v) in table {
            let mut one = toml::Table::new();
            one.insert(k.clone(), v);
            let partial: TrainConfig = toml::Value::Table(one).try_into().map_err(|e| {
                let msg = toml::de::Error::message(&e).to_string();
                if from_set.contains(&k) {
                    Error::Config(format!("--set `{k}`: {msg}"))
                } else {
                    Error::at(path, line_of_key(text, &k), Some(&k), msg)
                }
            })?;
            cfg.merge_key(&k, partial);
        }
        cfg.validate(path).map_err(|e| match e {
            Error::Input { loc, msg }
                if loc.field.as_ref().is_some_and(|f| from_set.contains(f)) =>
            {
                Error::Config(format!("--set `{}`: {msg}", loc.field.unwrap_or_default()))
            }
            e => e,
        })?;
        // A GGUF file stands for the Hugging Face directory it converts to (once, cached);
        // with LoRA, its Q4_1 linear weights stay 4-bit unless the recipe says otherwise.
        if cfg.load_in_4bit.is_none() {
            let gguf = &cfg.model_name_or_path;
            cfg.load_in_4bit = Some(
                cfg.lora_r > 0
                    && crate::formats::gguf::is_gguf(gguf)
                    && gguf.is_file()
                    && crate::formats::gguf::linear_weights_are_q4_1(gguf)?,
            );
        }
        cfg.model_name_or_path = crate::formats::gguf::resolve_model(&cfg.model_name_or_path)?;
        Ok(cfg)
    }

    /// Copies the field named `key` from `other`.
    fn merge_key(&mut self, key: &str, other: TrainConfig) {
        // Round-trip through JSON: the one place that maps key names to fields.
        if let (Ok(serde_json::Value::Object(mut mine)), Ok(serde_json::Value::Object(theirs))) =
            (serde_json::to_value(&*self), serde_json::to_value(&other))
        {
            let key = if key == "batch_size" {
                "per_device_train_batch_size"
            } else {
                key
            };
            if let Some(v) = theirs.get(key) {
                mine.insert(key.to_string(), v.clone());
            }
            if let Ok(cfg) = serde_json::from_value(serde_json::Value::Object(mine)) {
                *self = cfg;
            }
        }
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::at(path, None, Some(key), msg));
        if self.model_name_or_path.as_os_str().is_empty() {
            return bad("model_name_or_path", "is required".into());
        }
        if self.train_file.as_os_str().is_empty() {
            return bad("train_file", "is required".into());
        }
        self.validate_lora(path)?;
        if self.image_size == Some(0) {
            return bad("image_size", "must be at least 1".into());
        }
        if let Some(s) = self.image_std {
            if s.iter().any(|&v| v <= 0.0 || !v.is_finite()) {
                return bad("image_std", format!("must be positive, got {s:?}"));
            }
        }
        for r in &self.report_to {
            if !["tensorboard", "all", "none"].contains(&r.as_str()) {
                return bad(
                    "report_to",
                    format!("`{r}` is not one of tensorboard, all, none"),
                );
            }
        }
        match (&self.validation_file, self.validation_split) {
            (None, None) => {
                return bad(
                    "validation_split",
                    "set validation_file or validation_split (e.g. 0.2)".into(),
                )
            }
            (_, Some(f)) if !(f > 0.0 && f < 1.0) => {
                return bad("validation_split", format!("must be in (0, 1), got {f}"))
            }
            _ => {}
        }
        if self.max_seq_length < MIN_SEQ_LENGTH {
            return bad(
                "max_seq_length",
                format!(
                    "must be at least {MIN_SEQ_LENGTH} (room for [CLS], [SEP], [SEP] and one token)"
                ),
            );
        }
        if self.per_device_train_batch_size == 0 {
            return bad("per_device_train_batch_size", "must be at least 1".into());
        }
        if self.per_device_eval_batch_size == 0 {
            return bad("per_device_eval_batch_size", "must be at least 1".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(
                "learning_rate",
                format!("must be > 0, got {}", self.learning_rate),
            );
        }
        if self.num_train_epochs == 0 {
            return bad("num_train_epochs", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(
                "warmup_ratio",
                format!("must be in [0, 1), got {}", self.warmup_ratio),
            );
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad(
                "weight_decay",
                format!("must be >= 0, got {}", self.weight_decay),
            );
        }
        for (k, b) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                return bad(k, format!("must be in [0, 1), got {b}"));
            }
        }
        if self.adam_epsilon.is_nan() || self.adam_epsilon <= 0.0 {
            return bad("adam_epsilon", "must be > 0".into());
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm < 0.0 {
            return bad("max_grad_norm", "must be >= 0 (0 disables clipping)".into());
        }
        if self.logging_steps == 0 {
            return bad("logging_steps", "must be at least 1".into());
        }
        if self.threads == Some(0) {
            return bad("threads", "must be at least 1".into());
        }
        match crate::precision::for_training(self.precision) {
            Err(Error::Config(why)) => return bad("precision", why),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        for (k, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
            ("classifier_dropout", self.classifier_dropout),
        ] {
            if let Some(p) = p {
                if !(0.0..1.0).contains(&p) {
                    return bad(k, format!("must be in [0, 1), got {p}"));
                }
            }
        }
        let nonneg = |k: &str, v: f64| -> Result<()> {
            if v.is_nan() || v < 0.0 || v.is_infinite() {
                return Err(Error::at(
                    path,
                    None,
                    Some(k),
                    format!("must be >= 0, got {v}"),
                ));
            }
            Ok(())
        };
        nonneg("focal_gamma", self.focal_gamma)?;
        nonneg("smooth_l1_beta", self.smooth_l1_beta)?;
        nonneg("l1_penalty", self.l1_penalty)?;
        nonneg("l2_penalty", self.l2_penalty)?;
        nonneg("momentum", self.momentum)?;
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(
                "label_smoothing",
                format!("must be in [0, 1), got {}", self.label_smoothing),
            );
        }
        if self.huber_delta.is_nan() || self.huber_delta <= 0.0 {
            return bad(
                "huber_delta",
                format!("must be > 0, got {}", self.huber_delta),
            );
        }
        if let Some(a) = self.focal_alpha {
            if !(0.0..=1.0).contains(&a) {
                return bad("focal_alpha", format!("must be in [0, 1], got {a}"));
            }
        }
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            return bad(
                "threshold",
                format!("must be in (0, 1), got {}", self.threshold),
            );
        }
        if !(self.layerwise_lr_decay > 0.0 && self.layerwise_lr_decay <= 1.0) {
            return bad(
                "layerwise_lr_decay",
                format!("must be in (0, 1], got {}", self.layerwise_lr_decay),
            );
        }
        if let Some(h) = self.head_learning_rate {
            if h.is_nan() || h <= 0.0 {
                return bad("head_learning_rate", format!("must be > 0, got {h}"));
            }
        }
        if self.save_steps == Some(0) {
            return bad("save_steps", "must be at least 1".into());
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps", "must be at least 1".into());
        }
        if self.early_stopping_patience == Some(0) {
            return bad("early_stopping_patience", "must be at least 1".into());
        }
        if self.unfreeze_every_steps == Some(0) {
            return bad("unfreeze_every_steps", "must be at least 1".into());
        }
        if self.freeze_epochs > 0 && self.freeze_epochs >= self.num_train_epochs {
            return bad(
                "freeze_epochs",
                format!(
                    "must be less than num_train_epochs ({}): the epochs after them train \
                     the whole model",
                    self.num_train_epochs
                ),
            );
        }
        if let Some(d) = self.model_ema_decay {
            if !(0.0..1.0).contains(&d) {
                return bad("model_ema_decay", format!("must be in [0, 1), got {d}"));
            }
        }
        for (key, v) in [
            ("mixup_alpha", self.mixup_alpha),
            ("cutmix_alpha", self.cutmix_alpha),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(key, format!("must be >= 0, got {v}"));
            }
        }
        for (key, v) in [
            ("mixup_prob", self.mixup_prob),
            ("mixup_switch_prob", self.mixup_switch_prob),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(key, format!("must be in [0, 1], got {v}"));
            }
        }
        if self.mixing() && self.problem_type == ProblemType::Regression {
            return bad(
                "mixup_alpha",
                "mixup and CutMix blend class targets; they do not apply to regression".into(),
            );
        }
        if self.nesterov && (self.optimizer != OptimizerKind::Sgd || self.momentum <= 0.0) {
            return bad(
                "nesterov",
                "needs optimizer = \"sgd\" and momentum > 0".into(),
            );
        }
        if !(self.stlr_cut_frac > 0.0 && self.stlr_cut_frac < 1.0) {
            return bad(
                "stlr_cut_frac",
                format!("must be in (0, 1), got {}", self.stlr_cut_frac),
            );
        }
        if self.stlr_ratio.is_nan() || self.stlr_ratio < 1.0 {
            return bad(
                "stlr_ratio",
                format!("must be >= 1, got {}", self.stlr_ratio),
            );
        }
        if let Some(ClassWeights::Named(n)) = &self.class_weights {
            if n != "balanced" {
                return bad(
                    "class_weights",
                    format!("expected a list of numbers or \"balanced\", got \"{n}\""),
                );
            }
        }
        if let Some(ClassWeights::List(w)) = &self.class_weights {
            if w.iter().any(|x| x.is_nan() || *x < 0.0) {
                return bad("class_weights", "weights must be >= 0".into());
            }
        }
        if let Some(w) = &self.pos_weight {
            if w.is_empty() || w.iter().any(|x| x.is_nan() || *x < 0.0) {
                return bad(
                    "pos_weight",
                    "must be a non-empty list of numbers >= 0".into(),
                );
            }
        }
        if let Some(b) = self.block_size {
            if b < 2 {
                return bad(
                    "block_size",
                    format!("must be at least 2 (a token and the next), got {b}"),
                );
            }
        }
        if self.problem_type == ProblemType::CausalLm {
            // Features of classifiers that have no meaning for next-token prediction.
            let refused: [(&str, bool); 8] = [
                ("label_smoothing", self.label_smoothing != 0.0),
                ("class_weights", self.class_weights.is_some()),
                ("pos_weight", self.pos_weight.is_some()),
                ("focal_alpha", self.focal_alpha.is_some()),
                ("mixup_alpha", self.mixup_alpha > 0.0),
                ("cutmix_alpha", self.cutmix_alpha > 0.0),
                ("image_column", self.image_column.is_some()),
                ("text_pair_column", self.text_pair_column.is_some()),
            ];
            if let Some((key, _)) = refused.iter().find(|(_, on)| *on) {
                return bad(
                    key,
                    "does not apply to problem_type \"causal_lm\" (next-token \
                     cross-entropy over the text itself)"
                        .into(),
                );
            }
            if self.loss.is_some_and(|l| l != LossKind::CrossEntropy) {
                return bad(
                    "loss",
                    "problem_type \"causal_lm\" trains with cross_entropy only".into(),
                );
            }
        } else if self.block_size.is_some() {
            return bad(
                "block_size",
                "applies to problem_type = \"causal_lm\" only (classifiers read \
                 `max_seq_length`)"
                    .into(),
            );
        }
        let loss = self.loss_kind();
        let fits = self.problem_type.task().fits(loss);
        if !fits {
            return bad(
                "loss",
                format!(
                    "`{}` does not fit problem_type `{}`",
                    loss.name(),
                    self.problem_type.as_str()
                ),
            );
        }
        let single = self.problem_type == ProblemType::SingleLabelClassification;
        if self.class_weights.is_some() && !single {
            return bad(
                "class_weights",
                "only applies to single-label classification (cross_entropy, or focal as α)".into(),
            );
        }
        if self.focal_alpha.is_some()
            && !(loss == LossKind::Focal
                && self.problem_type == ProblemType::MultiLabelClassification)
        {
            return bad(
                "focal_alpha",
                "only applies to multi-label focal loss (for single-label focal, per-class α \
                 is `class_weights`)"
                    .into(),
            );
        }
        if self.label_smoothing != 0.0 && loss != LossKind::CrossEntropy {
            return bad(
                "label_smoothing",
                "only applies to loss = \"cross_entropy\"".into(),
            );
        }
        if self.pos_weight.is_some() && loss != LossKind::BinaryCrossEntropy {
            return bad(
                "pos_weight",
                "only applies to loss = \"binary_cross_entropy\"".into(),
            );
        }
        if self.best_metric().is_none() {
            return bad(
                "metric_for_best_model",
                format!(
                    "unknown metric `{}` for {} (classification: accuracy, macro_f1, \
                     micro_f1, weighted_f1, mcc; multi-label: micro_f1, macro_f1, \
                     subset_accuracy; regression: mse, mae, rmse, r2, pearson, spearman; \
                     any: loss)",
                    self.metric_for_best_model.as_deref().unwrap_or(""),
                    self.problem_type.as_str()
                ),
            );
        }
        Ok(())
    }

    /// The column a CSV/JSONL example's input comes from: `image_column` (image paths)
    /// when set, else `text_column`.
    pub fn input_column(&self) -> &str {
        self.image_column.as_deref().unwrap_or(&self.text_column)
    }

    /// Whether batches are mixed (mixup or CutMix on, with a chance above 0).
    pub fn mixing(&self) -> bool {
        (self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0) && self.mixup_prob > 0.0
    }

    /// The metric that picks the best epoch, without an `eval_` prefix, and whether greater
    /// is better. The names depend on the task.
    pub fn best_metric(&self) -> Option<(&'static str, bool)> {
        let task = self.problem_type.task();
        let m = self
            .metric_for_best_model
            .as_deref()
            .unwrap_or(task.default_metric())
            .trim_start_matches("eval_");
        task.metric(m)
    }

    /// The loss in use: `loss`, or the task's default.
    pub fn loss_kind(&self) -> LossKind {
        self.loss
            .unwrap_or_else(|| self.problem_type.task().default_loss())
    }

    /// Where TensorBoard event files go, or `None` when `report_to` leaves it out.
    pub fn tensorboard_dir(&self) -> Option<PathBuf> {
        let on = self
            .report_to
            .iter()
            .any(|r| r == "tensorboard" || r == "all");
        on.then(|| {
            self.logging_dir
                .clone()
                .unwrap_or_else(|| self.output_dir.join("runs"))
        })
    }

    /// Checks the LoRA keys; the error names the key.
    fn validate_lora(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::at(path, None, Some(key), msg));
        if self.lora_r == 0 {
            if !self.modules_to_save.is_empty() {
                return bad(
                    "modules_to_save",
                    "applies to LoRA: set lora_r (e.g. 8), or leave it out to train the \
                     whole model"
                        .into(),
                );
            }
            if self.lora_target_modules.is_some() {
                return bad(
                    "lora_target_modules",
                    "applies to LoRA: set lora_r (e.g. 8)".into(),
                );
            }
            if self.load_in_4bit == Some(true) {
                return bad(
                    "load_in_4bit",
                    "applies to LoRA (the 4-bit weights are frozen): set lora_r (e.g. 8)".into(),
                );
            }
            return Ok(());
        }
        if !(self.lora_alpha > 0.0 && self.lora_alpha.is_finite()) {
            return bad(
                "lora_alpha",
                format!("must be positive, got {}", self.lora_alpha),
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            );
        }
        match &self.lora_target_modules {
            Some(LoraTargets::Named(s)) if !s.eq_ignore_ascii_case("all-linear") => bad(
                "lora_target_modules",
                format!("`{s}`: expected a list of module names, or \"all-linear\""),
            ),
            Some(LoraTargets::List(l)) if l.is_empty() || l.iter().any(|s| s.is_empty()) => bad(
                "lora_target_modules",
                "expected a non-empty list of module names (e.g. [\"query\", \"value\"])".into(),
            ),
            _ => Ok(()),
        }
    }

    /// The resolved recipe as TOML (written to the output directory).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_set_value_names_set_not_the_file() {
        let p = Path::new("r.toml");
        let set = |kv: &str| {
            TrainConfig::from_toml_str(&base(), p, &[kv.to_string()])
                .unwrap_err()
                .to_string()
        };
        let e = set("learning_rate=-1");
        assert!(
            e.contains("--set `learning_rate`") && !e.contains("r.toml"),
            "{e}"
        );
        let e = set("learning_rate=\"abc\"");
        assert!(
            e.contains("--set `learning_rate`") && !e.contains("r.toml"),
            "{e}"
        );
        let e = set("validation_split=3");
        assert!(
            e.contains("--set `validation_split`") && e.contains("(0, 1)"),
            "{e}"
        );
        // A bad value in the file still names the file and line.
        let e = TrainConfig::from_toml_str(&format!("{}learning_rate = -1\n", base()), p, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.toml") && e.contains("learning_rate"), "{e}");
    }

    fn base() -> String {
        "model_name_or_path = \"m\"\ntrain_file = \"t.csv\"\nvalidation_split = 0.2\n".into()
    }

    #[test]
    fn reads_keys_and_overrides() {
        let text = base() + "learning_rate = 2e-5\nbatch_size = 16\n";
        let c = TrainConfig::from_toml_str(
            &text,
            Path::new("r.toml"),
            &["num_train_epochs=5".into(), "text_column=sentence".into()],
        )
        .unwrap();
        assert_eq!(c.learning_rate, 2e-5);
        assert_eq!(c.per_device_train_batch_size, 16);
        assert_eq!(c.num_train_epochs, 5);
        assert_eq!(c.text_column, "sentence");
        assert_eq!(c.max_seq_length, 128);
    }

    #[test]
    fn unknown_key_is_an_error_naming_file_line_and_key() {
        let text = base() + "learning_rat = 2e-5\n";
        let e = TrainConfig::from_toml_str(&text, Path::new("r.toml"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("r.toml:4: field `learning_rat`"), "{e}");
        assert!(e.contains("did you mean `learning_rate`"), "{e}");
        let e = TrainConfig::from_toml_str(&base(), Path::new("r.toml"), &["lr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--set lr: unknown recipe key"), "{e}");
    }

    #[test]
    fn wrong_type_and_bad_value_name_the_key() {
        let text = base() + "learning_rate = \"fast\"\n";
        let e = TrainConfig::from_toml_str(&text, Path::new("r.toml"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("r.toml:4: field `learning_rate`"), "{e}");
        let e =
            TrainConfig::from_toml_str(&base(), Path::new("r.toml"), &["warmup_ratio=1.5".into()])
                .unwrap_err()
                .to_string();
        assert!(e.contains("--set `warmup_ratio`: must be in [0, 1)"), "{e}");
        let e = TrainConfig::from_toml_str(&base(), Path::new("r.toml"), &["pooling=max".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--set `pooling`"), "{e}");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let text = base() + "seed = = 3\n";
        let e = TrainConfig::from_toml_str(&text, Path::new("r.toml"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("r.toml:4:"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    #[test]
    fn missing_required_keys() {
        let e = TrainConfig::from_toml_str("train_file = \"x\"\n", Path::new("r.toml"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("field `model_name_or_path`: is required"), "{e}");
    }
}

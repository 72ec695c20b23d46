//! Model families: one folder each, registered here by `config.json`'s `model_type`.
//!
//! A family knows its architecture — its `config.json` fields, its tensor names, its
//! embeddings and head — and nothing of data, training or serving. Everything above this
//! module (trainer, predictor, exporter, server, bench) holds a `&dyn Family` and a
//! `Box<dyn Model>`, never a concrete family. Adding a family is a new folder that
//! implements [`Family`] and [`Model`], plus its line in [`FAMILIES`]; `docs/FAMILIES.md`
//! walks through one.
//!
//! | `model_type` | folder | transformers class it loads and exports |
//! |---|---|---|
//! | `bert` | [`bert`] | `BertForSequenceClassification` |
//! | `roberta` | [`roberta`] | `RobertaForSequenceClassification` |
//! | `distilbert` | [`distilbert`] | `DistilBertForSequenceClassification` |
//! | `mpnet` | [`mpnet`] | `MPNetForSequenceClassification` |
//! | `efficientnet_lite0`, `tf_efficientnet_lite0` (timm `architecture`) | [`efficientnet`] | timm's model of that name |
//! | `resnet`; `resnet18`, `resnet50` (timm `architecture`) | [`resnet`] | `ResNetForImageClassification`; timm's model of that name |
//! | `gpt2` | [`gpt2`] | `GPT2LMHeadModel` (`num_labels = 0`), `GPT2ForSequenceClassification` |
//! | `llama` | [`llama`] | `LlamaForCausalLM` (`num_labels = 0`), `LlamaForSequenceClassification` |

pub mod bert;
pub mod config;
pub mod distilbert;
pub mod efficientnet;
pub mod encoder;
pub mod gpt2;
pub mod llama;
pub mod mpnet;
pub mod resnet;
pub mod roberta;

use std::path::Path;

use candle_core::{Device, Tensor};

pub use config::HfConfig;

use crate::error::{Error, Result};
use crate::nn::{Batch, Ctx, ParamStore, Pooling, Weights};

/// Every family ferrotune can load, by `model_type`.
pub static FAMILIES: &[&dyn Family] = &[
    &bert::Bert,
    &roberta::Roberta,
    &distilbert::DistilBert,
    &mpnet::MpNet,
    &efficientnet::EfficientNetLite,
    &resnet::ResNetFamily,
    &llama::Llama,
    &gpt2::Gpt2,
];

/// What a family's models read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// Text, through the model's tokenizer.
    Text,
    /// Images.
    Image,
}

/// How an image model's checkpoint expects its input (timm's `pretrained_cfg`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePreprocessing {
    /// `(height, width)` of the input.
    pub size: (usize, usize),
    /// Per-channel mean of pixels scaled to 0..1.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
    /// Fraction of the resized image the evaluation crop keeps.
    pub crop_pct: f64,
    /// Resize interpolation (`bicubic`, `bilinear`, `nearest`).
    pub interpolation: String,
}

/// The registered families whose models read text (what the text-only tests loop over).
pub fn text_families() -> Vec<&'static dyn Family> {
    FAMILIES
        .iter()
        .copied()
        .filter(|f| f.input() == InputKind::Text)
        .collect()
}

/// What the task asks of the model: the head, and the recipe's dropout overrides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadSpec {
    /// Outputs of the head (classes, labels or regression targets); 0 asks a decoder for
    /// its language-model head only ([`Model::lm_logits`]).
    pub num_labels: usize,
    /// How hidden states are pooled for the head; `None`: the family's default (what its
    /// transformers head reads).
    pub pooling: Option<Pooling>,
    /// Override of the checkpoint's hidden-state dropout.
    pub hidden_dropout: Option<f64>,
    /// Override of the checkpoint's attention-probability dropout.
    pub attention_dropout: Option<f64>,
    /// Override of the head's dropout.
    pub classifier_dropout: Option<f64>,
}

impl HeadSpec {
    /// A head of `num_labels` outputs with the family's defaults.
    pub fn new(num_labels: usize) -> HeadSpec {
        HeadSpec {
            num_labels,
            pooling: None,
            hidden_dropout: None,
            attention_dropout: None,
            classifier_dropout: None,
        }
    }
}

/// The dimensions of a transformer encoder, for writing any family's `config.json`
/// ([`Family::config_json`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelShape {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Feed-forward width.
    pub intermediate: usize,
    /// Longest input in tokens (families that offset positions by the padding id get
    /// that many more position embeddings).
    pub max_positions: usize,
    /// Standard deviation of random weights.
    pub initializer_range: f64,
}

impl ModelShape {
    /// A BERT-base-sized encoder (hidden 768, 12 layers, 12 heads, intermediate 3072, 512
    /// positions) with `vocab_size` tokens.
    pub const fn base(vocab_size: usize) -> ModelShape {
        ModelShape {
            vocab_size,
            hidden: 768,
            layers: 12,
            heads: 12,
            intermediate: 3072,
            max_positions: 512,
            initializer_range: 0.02,
        }
    }
}

/// A model built with a head.
pub struct Loaded {
    /// The model.
    pub model: Box<dyn Model>,
    /// Its parameters, in a fixed order, with their layer groups.
    pub params: ParamStore,
    /// True when the head was newly initialised (not in the checkpoint, or of another
    /// size).
    pub new_head: bool,
    /// Other things the user should know (a newly initialised pooler).
    pub notes: Vec<String>,
}

impl AsRef<ParamStore> for Loaded {
    fn as_ref(&self) -> &ParamStore {
        &self.params
    }
}

/// A model with its task head, ready to run.
pub trait Model: Send + Sync {
    /// Head outputs (logits or regression values), `(batch, num_labels)`.
    fn forward(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Tensor>;

    /// The backbone's last hidden states, `(batch, seq, hidden)` (sentence embeddings).
    fn hidden_states(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Tensor>;

    /// The pooling the head reads.
    fn pooling(&self) -> Pooling;

    /// Whether the last layer may run for the first token only when the head reads
    /// nothing else (on by default; off gives the full computation, for comparison).
    fn set_first_token_only(&mut self, on: bool);

    /// A language model's next-token logits at every position, `(batch·seq, vocab)`: row
    /// `b·seq + t` scores the token after token `t` of sequence `b`. A decoder built with
    /// `HeadSpec::num_labels == 0` has this head only; models without a language-model
    /// head refuse.
    fn lm_logits(&self, _ctx: &mut Ctx, _batch: &Batch) -> Result<Tensor> {
        Err(Error::Msg(
            "this model has no language-model head (it is not a decoder)".into(),
        ))
    }

    /// The final hidden rows `(batch·seq, hidden)` and the language-model head's weight
    /// `(vocab, hidden)` as this pass reads it (detached when frozen), when the head is
    /// exactly `h · Wᵀ` (no bias, no adapter, f32 weights): the trainer then runs the head
    /// fused with the loss ([`crate::loss::lm_head_loss`]) instead of
    /// [`Model::lm_logits`]. `None` (the default), decided before running anything: use
    /// `lm_logits`.
    fn lm_head_parts(&self, _ctx: &mut Ctx, _batch: &Batch) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// The model as a text generator (decoders), or `None`.
    fn generator(&self) -> Option<&dyn crate::nn::decoder::Generator> {
        None
    }
}

/// One model family (see the module documentation).
pub trait Family: Sync {
    /// `config.json`'s `model_type`.
    fn model_type(&self) -> &'static str;

    /// Other names in a config's `model_type` (or timm's `architecture`) this family
    /// loads (`tf_efficientnet_lite0` beside `efficientnet_lite0`).
    fn aliases(&self) -> &'static [&'static str] {
        &[]
    }

    /// What the family's models read.
    fn input(&self) -> InputKind {
        InputKind::Text
    }

    /// The keys of an exported `config.json` that name the architecture and the classes
    /// for the library that loads it (transformers: `architectures`; the exporter adds
    /// `id2label`, `label2id`, `num_labels` for every family), for a model loaded with
    /// `cfg` (a family read in several libraries' formats exports in the one it came in).
    fn export_keys(
        &self,
        cfg: &HfConfig,
        labels: &[String],
    ) -> serde_json::Map<String, serde_json::Value> {
        let _ = (cfg, labels);
        let mut m = serde_json::Map::new();
        m.insert(
            "architectures".into(),
            serde_json::json!([self.architecture()]),
        );
        m
    }

    /// An image family's input size and normalisation for `cfg`; `None` for text.
    fn image_preprocessing(&self, _cfg: &HfConfig) -> Result<Option<ImagePreprocessing>> {
        Ok(None)
    }

    /// The family's name for people (`BERT`).
    fn name(&self) -> &'static str;

    /// The transformers class an exported classifier is loaded as (`config.json`'s
    /// `architectures`).
    fn architecture(&self) -> &'static str;

    /// `tokenizer_class` written to an exported `tokenizer_config.json` that has none.
    fn tokenizer_class(&self) -> &'static str;

    /// Whether a checkpoint with these tensor names is of this family (for the error
    /// when `config.json` names one family and the weights are another's).
    fn claims(&self, tensor_names: &[&str]) -> bool;

    /// The poolings this family's head can read; the first is its default.
    fn poolings(&self) -> &'static [Pooling];

    /// The longest input the model takes, in tokens (checked against `config.json`).
    fn max_tokens(&self, cfg: &HfConfig) -> Result<usize>;

    /// One line of shape for `ferrotune inspect` (layers, widths, heads).
    fn describe(&self, cfg: &HfConfig) -> Result<String>;

    /// A pretrained `config.json` of this family with the dimensions of `shape` (random
    /// models for tests and benchmarks).
    fn config_json(&self, shape: &ModelShape) -> serde_json::Value;

    /// Named shapes of well-known checkpoints of this family, for `ferrotune bench
    /// --preset NAME` (`bert-base`, ...).
    fn presets(&self) -> &'static [(&'static str, ModelShape)] {
        &[]
    }

    /// Builds the model from `cfg` and `weights` with a head of `head`. A missing or
    /// mis-shaped backbone tensor is an error naming the file and the tensor; the head
    /// (and BERT's pooler) are initialised when the checkpoint lacks them. New weights are
    /// drawn from a generator seeded by `seed`.
    fn build(
        &self,
        cfg: &HfConfig,
        weights: &Weights,
        head: &HeadSpec,
        seed: u64,
        device: &Device,
    ) -> Result<Loaded>;
}

/// The class counts `cfg` declares, by field: `num_classes` (timm), `num_labels`, and the
/// lengths of `id2label` and `label_names`, those present. An error names a field of the
/// wrong type.
pub fn declared_classes(cfg: &HfConfig) -> Result<Vec<(&'static str, usize)>> {
    let mut out = Vec::new();
    for name in ["num_classes", "num_labels"] {
        match cfg.raw.get(name) {
            None | Some(serde_json::Value::Null) => {}
            Some(v) => out.push((
                name,
                v.as_u64().ok_or_else(|| {
                    Error::at(&cfg.path, None, Some(name), "expected a whole number")
                })? as usize,
            )),
        }
    }
    if let Some(m) = &cfg.id2label {
        out.push(("id2label", m.len()));
    }
    if let Some(serde_json::Value::Array(a)) = cfg.raw.get("label_names") {
        out.push(("label_names", a.len()));
    }
    Ok(out)
}

/// Checks that the classifier `tensor` of `weights` (one row per class) has as many
/// classes as `cfg` declares ([`declared_classes`]): a model file of another head than
/// its config says is an error naming both files and the field, not a silently new head.
pub fn check_classifier(cfg: &HfConfig, weights: &Weights, tensor: &str) -> Result<()> {
    let Weights::File {
        path,
        tensors,
        int8,
    } = weights
    else {
        return Ok(());
    };
    let rows = match (tensors.get(tensor), int8.get(tensor)) {
        (Some(t), _) => t.dims().first().copied(),
        (None, Some(q)) => q.shape.first().copied(),
        (None, None) => None,
    };
    let Some(rows) = rows else {
        return Ok(());
    };
    for (name, n) in declared_classes(cfg)? {
        if n != rows {
            return Err(Error::at(
                &cfg.path,
                None,
                Some(name),
                format!(
                    "says {n} classes, but the classifier `{tensor}` in {} has {rows}",
                    path.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The keys of a decoder's exported `config.json`: `architectures` (`lm` for a language
/// model, no `labels`; else `classifier`), and `pad_token_id` (the end-of-sequence id)
/// when `cfg` has none, since transformers' decoder classifiers find each sequence's last
/// token by the padding id and refuse batches without one.
pub fn decoder_export_keys(
    cfg: &HfConfig,
    labels: &[String],
    lm: &str,
    classifier: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    let arch = if labels.is_empty() { lm } else { classifier };
    m.insert("architectures".into(), serde_json::json!([arch]));
    if cfg.raw.get("pad_token_id").is_none_or(|v| v.is_null()) {
        let eos = cfg.raw.get("eos_token_id").and_then(|v| match v {
            serde_json::Value::Array(a) => a.first().cloned(),
            v => Some(v.clone()),
        });
        if let Some(eos) = eos.filter(|v| !v.is_null()) {
            m.insert("pad_token_id".into(), eos);
        }
    }
    m
}

/// The keys of a timm-format export's `config.json` for `labels`: `num_classes`,
/// `label_names`, and `model_args.num_classes` when the loaded config `cfg` records the
/// model's arguments (timm's `save_for_hf` does), so no stale class count stays behind.
pub fn timm_export_keys(
    cfg: &HfConfig,
    labels: &[String],
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("num_classes".into(), serde_json::json!(labels.len()));
    m.insert("label_names".into(), serde_json::json!(labels));
    if let Some(serde_json::Value::Object(args)) = cfg.raw.get("model_args") {
        if args.contains_key("num_classes") {
            let mut args = args.clone();
            args.insert("num_classes".into(), serde_json::json!(labels.len()));
            m.insert("model_args".into(), serde_json::Value::Object(args));
        }
    }
    m
}

/// An image model's preprocessing from timm's `pretrained_cfg` object `p` (of `cfg`'s
/// file): `base` with the `input_size`, `mean`, `std`, `crop_pct` and `interpolation` it
/// gives. Errors name the file and the field.
pub fn timm_preprocessing(
    cfg: &HfConfig,
    p: &serde_json::Value,
    base: ImagePreprocessing,
) -> Result<ImagePreprocessing> {
    let bad = |name: &str, what: &str| {
        Error::at(
            &cfg.path,
            None,
            Some(format!("pretrained_cfg.{name}").as_str()),
            format!("expected {what}"),
        )
    };
    let mut out = base;
    let triple = |name: &str| -> Result<Option<[f32; 3]>> {
        p.get(name)
            .map(|v| {
                serde_json::from_value::<[f32; 3]>(v.clone())
                    .map_err(|_| bad(name, "a list of 3 numbers"))
            })
            .transpose()
    };
    if let Some(m) = triple("mean")? {
        out.mean = m;
    }
    if let Some(s) = triple("std")? {
        if s.iter().any(|&s| s <= 0.0) {
            return Err(bad("std", "positive numbers"));
        }
        out.std = s;
    }
    if let Some(v) = p.get("input_size") {
        let a: [usize; 3] = serde_json::from_value(v.clone())
            .ok()
            .filter(|a: &[usize; 3]| a[0] == 3 && a[1] > 0 && a[2] > 0)
            .ok_or_else(|| bad("input_size", "[3, height, width]"))?;
        out.size = (a[1], a[2]);
    }
    if let Some(v) = p.get("crop_pct") {
        out.crop_pct = v
            .as_f64()
            .filter(|&v| v > 0.0 && v <= 1.0)
            .ok_or_else(|| bad("crop_pct", "a number in (0, 1]"))?;
    }
    if let Some(v) = p.get("interpolation") {
        out.interpolation = v
            .as_str()
            .ok_or_else(|| bad("interpolation", "a string"))?
            .to_string();
    }
    Ok(out)
}

/// The family registered for `model_type`, if any.
pub fn by_model_type(model_type: &str) -> Option<&'static dyn Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.model_type() == model_type || f.aliases().contains(&model_type))
}

/// The family of `cfg`'s `model_type`; an error listing the ones that exist otherwise.
pub fn family(cfg: &HfConfig) -> Result<&'static dyn Family> {
    by_model_type(&cfg.model_type).ok_or_else(|| {
        let known: Vec<&str> = FAMILIES.iter().map(|f| f.model_type()).collect();
        Error::at(
            &cfg.path,
            None,
            Some("model_type"),
            format!(
                "unsupported model type `{}` (supported: {})",
                cfg.model_type,
                known.join(", ")
            ),
        )
    })
}

/// Checks that `weights` look like `fam`'s: when they do not and another family claims
/// them, an error naming that family (a `config.json` of one family beside another's
/// weights).
pub fn check_weights(fam: &dyn Family, weights: &Weights) -> Result<()> {
    let Weights::File { path, .. } = weights else {
        return Ok(());
    };
    let names = weights.names();
    if names.is_empty() || fam.claims(&names) {
        return Ok(());
    }
    match FAMILIES.iter().find(|f| f.claims(&names)) {
        Some(other) => Err(Error::file(
            path,
            format!(
                "the tensor names are those of a {} checkpoint (model_type `{}`), but \
                 config.json says model_type `{}`",
                other.name(),
                other.model_type(),
                fam.model_type()
            ),
        )),
        None => Ok(()),
    }
}

/// The pooling of `head` for `fam`: the recipe's, which must be one the family's head
/// reads, or the family's default.
pub fn pooling(fam: &dyn Family, head: &HeadSpec) -> Result<Pooling> {
    let allowed = fam.poolings();
    match head.pooling {
        None => Ok(allowed[0]),
        Some(p) if allowed.contains(&p) => Ok(p),
        Some(p) => Err(Error::Config(format!(
            "pooling `{}` does not apply to {} (its head reads: {})",
            p.as_str(),
            fam.name(),
            allowed
                .iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The weight file of model directory `dir`: `model.safetensors`, else a PyTorch file
/// (`pytorch_model.bin`, or the one `.pth` file), read through the safe pickle reader.
pub fn weights_path(dir: &Path) -> Result<std::path::PathBuf> {
    let st = dir.join("model.safetensors");
    if st.exists() {
        return Ok(st);
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.exists() {
        return Ok(bin);
    }
    let pth: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pth"))
        .collect();
    match pth.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::file(
            dir,
            "no model.safetensors (or pytorch_model.bin, or a .pth file) in the model directory",
        )),
        _ => Err(Error::file(
            dir,
            "no model.safetensors, and several .pth files: keep one",
        )),
    }
}

/// The weights of file `path`: safetensors, or a PyTorch file (`.pth`, `.bin`, `.pt`)
/// through the safe pickle reader (no code in the file is run).
pub fn weights_file(path: &Path, device: &Device) -> Result<Weights> {
    let torch = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "pth" | "pt" | "bin"));
    if !torch {
        return Weights::safetensors(path, device);
    }
    let tensors = crate::formats::pickle::read_torch_file(path)?
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(device)?)))
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    Ok(Weights::File {
        path: path.to_path_buf(),
        tensors,
        int8: std::collections::HashMap::new(),
    })
}

/// A model read from directory `dir` (`config.json`, `model.safetensors`) with a head of
/// `head`: its config, family and the built model.
pub fn load(
    dir: &Path,
    head: &HeadSpec,
    seed: u64,
    device: &Device,
) -> Result<(HfConfig, &'static dyn Family, Loaded)> {
    let cfg = HfConfig::from_dir(dir)?;
    let fam = family(&cfg)?;
    let loaded = load_weights(&cfg, fam, dir, head, seed, device)?;
    Ok((cfg, fam, loaded))
}

/// The model of `cfg` (already read from `dir`, of family `fam`) built from
/// [`weights_path`]`(dir)`, after checking that the weights are that family's.
pub fn load_weights(
    cfg: &HfConfig,
    fam: &dyn Family,
    dir: &Path,
    head: &HeadSpec,
    seed: u64,
    device: &Device,
) -> Result<Loaded> {
    let weights = weights_file(&weights_path(dir)?, device)?;
    check_weights(fam, &weights)?;
    fam.build(cfg, &weights, head, seed, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A timm export gets the new class count everywhere the loaded config had one.
    #[test]
    fn timm_export_keys_leave_no_stale_class_count() {
        let labels: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let raw = serde_json::json!({
            "architecture": "resnet18",
            "num_classes": 1000,
            "model_args": {"num_classes": 1000, "layers": [2, 2, 2, 2]},
        });
        let serde_json::Value::Object(raw) = raw else {
            unreachable!()
        };
        let cfg = HfConfig::from_object(raw, Path::new("config.json")).unwrap();
        let m = timm_export_keys(&cfg, &labels);
        assert_eq!(m["num_classes"], 2);
        assert_eq!(m["label_names"], serde_json::json!(["a", "b"]));
        assert_eq!(m["model_args"]["num_classes"], 2);
        assert_eq!(m["model_args"]["layers"], serde_json::json!([2, 2, 2, 2]));
        for fam in FAMILIES.iter().filter(|f| f.input() == InputKind::Image) {
            let keys = fam.export_keys(&cfg, &labels);
            if keys.contains_key("num_classes") {
                assert_eq!(keys, m, "{}", fam.model_type());
            }
        }
    }
}

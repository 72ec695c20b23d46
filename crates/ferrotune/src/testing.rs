//! Tiny random models written in the real file formats, for tests and benchmarks.
//!
//! A test builds its own model directory (`config.json`, `model.safetensors`, and the
//! tokenizer files its family's transformers tokenizer reads: `vocab.txt`, or
//! `vocab.json` + `merges.txt` for RoBERTa's byte-level BPE) in a few milliseconds, for
//! any family, so unit tests need no downloaded assets and no network.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::json;

use crate::error::{Error, Result};
use crate::families::{self, HeadSpec, HfConfig, ModelShape};
use crate::nn::{GroupKind, Weights};

/// Words of the tiny vocabulary (after the special tokens).
pub const TINY_WORDS: &[&str] = &[
    "the", "a", "is", "was", "good", "great", "fine", "bad", "awful", "poor", "movie", "film",
    "plot", "acting", "very", "not", ".", ",", "!", "##s",
];

/// Shape of a random model.
#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    /// The family's `model_type` (`bert`, `roberta`, `distilbert`, `mpnet`).
    pub family: &'static str,
    /// Hidden width.
    pub hidden: usize,
    /// Encoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Feed-forward width.
    pub intermediate: usize,
    /// Longest input in tokens.
    pub max_positions: usize,
    /// Write backbone tensors with the family's prefix (`bert.`, as transformers'
    /// fine-tuned checkpoints do) rather than without (sentence-transformers).
    pub prefix: bool,
    /// Seed of the random weights.
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            family: "bert",
            hidden: 16,
            layers: 2,
            heads: 2,
            intermediate: 32,
            max_positions: 64,
            prefix: false,
            seed: 7,
        }
    }
}

impl TinySpec {
    /// The default tiny shape for `family`.
    pub fn of(family: &'static str) -> TinySpec {
        TinySpec {
            family,
            ..Default::default()
        }
    }
}

/// The `config.json` of a random model of `spec` with `vocab_size` tokens.
pub fn tiny_config(spec: &TinySpec, vocab_size: usize) -> Result<serde_json::Value> {
    let fam = families::by_model_type(spec.family)
        .ok_or_else(|| Error::Msg(format!("no family `{}`", spec.family)))?;
    Ok(fam.config_json(&ModelShape {
        vocab_size,
        hidden: spec.hidden,
        layers: spec.layers,
        heads: spec.heads,
        intermediate: spec.intermediate,
        max_positions: spec.max_positions,
        initializer_range: 0.2,
    }))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Writes the tokenizer files of `family`'s transformers tokenizer over the tiny
/// vocabulary; returns the vocabulary size.
fn write_tokenizer(dir: &Path, tokenizer_class: &str) -> Result<usize> {
    match tokenizer_class {
        "RobertaTokenizer" => write_bpe(dir),
        // Decoders: the same byte-level BPE as one `tokenizer.json` that adds no special
        // tokens (as GPT-2's and SmolLM2's), `</s>` its end of sequence.
        "PreTrainedTokenizerFast" => {
            let n = write_bpe(dir)?;
            let mut tok = crate::data::tokenizer::from_bpe_files(dir)?;
            tok.with_post_processor(None::<tokenizers::processors::PostProcessorWrapper>);
            let path = dir.join("tokenizer.json");
            tok.save(&path, false)
                .map_err(|e| Error::file(&path, format!("{e}")))?;
            for f in ["vocab.json", "merges.txt"] {
                std::fs::remove_file(dir.join(f)).map_err(|e| Error::io(dir.join(f), e))?;
            }
            let cfg = json!({
                "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
            });
            write(&dir.join("tokenizer_config.json"), &cfg.to_string())?;
            Ok(n)
        }
        "MPNetTokenizer" => {
            let mut vocab = vec!["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>"];
            vocab.extend_from_slice(TINY_WORDS);
            write(&dir.join("vocab.txt"), &(vocab.join("\n") + "\n"))?;
            let cfg = json!({
                "tokenizer_class": "MPNetTokenizer", "do_lower_case": true,
                "bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>",
                "sep_token": "</s>", "pad_token": "<pad>", "unk_token": "[UNK]",
                "mask_token": "<mask>",
            });
            write(&dir.join("tokenizer_config.json"), &cfg.to_string())?;
            Ok(vocab.len())
        }
        _ => {
            let mut vocab = vec!["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
            vocab.extend_from_slice(TINY_WORDS);
            write(&dir.join("vocab.txt"), &(vocab.join("\n") + "\n"))?;
            if tokenizer_class != "BertTokenizer" {
                let cfg = json!({"tokenizer_class": tokenizer_class, "do_lower_case": true});
                write(&dir.join("tokenizer_config.json"), &cfg.to_string())?;
            }
            Ok(vocab.len())
        }
    }
}

/// A byte-level BPE vocabulary (`vocab.json`, `merges.txt`): RoBERTa's special tokens, the
/// 256 byte symbols, and merges that make each tiny word one token (with and without the
/// leading-space symbol `Ġ`).
fn write_bpe(dir: &Path) -> Result<usize> {
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    let mut tokens: Vec<String> = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    tokens.extend(alphabet.iter().map(|c| c.to_string()));
    let mut merges = Vec::new();
    for w in TINY_WORDS
        .iter()
        .filter(|w| w.chars().all(char::is_alphabetic))
    {
        for start in ["", "Ġ"] {
            let mut cur = String::from(start);
            for (i, c) in w.chars().enumerate() {
                if i == 0 && start.is_empty() {
                    cur.push(c);
                    continue;
                }
                let next = format!("{cur}{c}");
                let merge = format!("{cur} {c}");
                if !merges.contains(&merge) {
                    merges.push(merge);
                }
                if !tokens.contains(&next) {
                    tokens.push(next.clone());
                }
                cur = next;
            }
        }
    }
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    write(
        &dir.join("vocab.json"),
        &serde_json::Value::Object(vocab).to_string(),
    )?;
    write(
        &dir.join("merges.txt"),
        &(String::from("#version: 0.2\n") + &merges.join("\n") + "\n"),
    )?;
    let cfg = json!({
        "tokenizer_class": "RobertaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "cls_token": "<s>", "sep_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "mask_token": "<mask>", "add_prefix_space": false,
    });
    write(&dir.join("tokenizer_config.json"), &cfg.to_string())?;
    Ok(tokens.len())
}

/// The prefix of a family's backbone tensors in transformers' task models (`bert.`,
/// `model.` for Llama, `transformer.` for GPT-2).
pub fn backbone_prefix(model_type: &str) -> String {
    match model_type {
        "llama" => "model.".into(),
        "gpt2" => "transformer.".into(),
        f => format!("{f}."),
    }
}

/// Writes a random pretrained model of `spec.family` (no task head) to `dir`:
/// `config.json`, `model.safetensors` and its tokenizer files.
pub fn write_tiny_model(dir: &Path, spec: &TinySpec) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let fam = families::by_model_type(spec.family)
        .ok_or_else(|| Error::Msg(format!("no family `{}`", spec.family)))?;
    let vocab_size = write_tokenizer(dir, fam.tokenizer_class())?;
    let cp = dir.join("config.json");
    write(&cp, &tiny_config(spec, vocab_size)?.to_string())?;
    let cfg = HfConfig::from_file(&cp)?;
    let device = crate::nn::device();
    let loaded = fam.build(
        &cfg,
        &Weights::Random,
        &HeadSpec::new(2),
        spec.seed,
        &device,
    )?;
    let prefix = backbone_prefix(fam.model_type());
    let groups = &loaded.params.groups;
    let mut exported = loaded.params.export_tensors()?;
    let tensors: HashMap<String, candle_core::Tensor> = loaded
        .params
        .params
        .iter()
        .filter(|p| groups[p.group].kind != GroupKind::Head)
        .map(|p| {
            let k = if spec.prefix {
                p.name.clone()
            } else {
                p.name.trim_start_matches(&prefix).to_string()
            };
            (
                k,
                exported
                    .remove(&p.name)
                    .expect("every parameter is exported"),
            )
        })
        .collect();
    let sp = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &sp).map_err(|e| Error::file(&sp, format!("{e}")))
}

/// Writes a random pretrained decoder (`llama`, `gpt2`) to `dir` as transformers saves a
/// causal language model: its `config.json` (the tiny shape of [`TinySpec::of`], then
/// changed by `edit`: grouped-query heads, untied head, rotary scaling...),
/// `model.safetensors` with the language-model head when it is not tied, and a byte-level
/// BPE `tokenizer.json`.
pub fn write_tiny_decoder(
    dir: &Path,
    family: &'static str,
    seed: u64,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let fam = families::by_model_type(family)
        .ok_or_else(|| Error::Msg(format!("no family `{family}`")))?;
    let vocab_size = write_tokenizer(dir, fam.tokenizer_class())?;
    let mut cfg = tiny_config(&TinySpec::of(family), vocab_size)?;
    edit(&mut cfg);
    let cp = dir.join("config.json");
    write(&cp, &cfg.to_string())?;
    let cfg = HfConfig::from_file(&cp)?;
    let loaded = fam.build(
        &cfg,
        &Weights::Random,
        &HeadSpec::new(0),
        seed,
        &crate::nn::device(),
    )?;
    let tensors: HashMap<String, Tensor> = loaded.params.export_tensors()?;
    let sp = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &sp).map_err(|e| Error::file(&sp, format!("{e}")))
}

/// Writes a small labelled sentiment CSV (`text,label`) of `n` rows, balanced, to `path`.
pub fn write_tiny_csv(path: &Path, n: usize) -> Result<()> {
    let good = ["good", "great", "fine"];
    let bad = ["bad", "awful", "poor"];
    let nouns = ["movie", "film", "plot", "acting"];
    let mut s = String::from("text,label\n");
    for i in 0..n {
        let pos = i % 2 == 0;
        let adj = if pos { good[i % 3] } else { bad[i % 3] };
        let noun = nouns[(i / 2) % 4];
        let very = if i % 3 == 0 { "very " } else { "" };
        s.push_str(&format!(
            "the {noun} was {very}{adj} .,{}\n",
            if pos { "pos" } else { "neg" }
        ));
    }
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}

/// A random 3-output model of `family` (a tiny one, [`TinySpec::of`]) and `problem_type`,
/// exported as `ferrotune train` would to `dir/model` (labels `neg`, `neu`, `pos`, inputs
/// up to `max_len` tokens), its pretrained base in `dir/base`. Returns `dir/model`.
pub fn write_tiny_classifier(
    dir: &Path,
    family: &'static str,
    problem_type: &str,
    max_len: usize,
) -> Result<std::path::PathBuf> {
    use crate::artifact::ExportInfo;
    use crate::export::{export_model, ExportSpec};
    let base = dir.join("base");
    write_tiny_model(&base, &TinySpec::of(family))?;
    let cfg = HfConfig::from_file(&base.join("config.json"))?;
    let family = families::family(&cfg)?;
    let loaded = family.build(
        &cfg,
        &Weights::Random,
        &HeadSpec::new(3),
        11,
        &candle_core::Device::Cpu,
    )?;
    let tok = crate::data::tokenizer::load_tokenizer(&base, max_len)?;
    let labels: Vec<String> = ["neg", "neu", "pos"].map(String::from).to_vec();
    let out = dir.join("model");
    export_model(
        &out,
        &ExportSpec {
            base: &cfg,
            family,
            source_dir: &base,
            params: &loaded.params,
            tokenizer: Some(&tok),
            labels: &labels,
            problem_type,
            info: ExportInfo::defaults(loaded.model.pooling(), max_len),
            card: None,
        },
    )?;
    Ok(out)
}

/// Writes a random pretrained EfficientNet-Lite0 (timm's `tf_efficientnet_lite0`
/// config.json, `model.safetensors` under timm's names, a 1000-class classifier) to `dir`.
pub fn write_tiny_image_model(dir: &Path) -> Result<()> {
    use crate::families::efficientnet::LiteConfig;
    let serde_json::Value::Object(raw) = LiteConfig::timm(true, 1000).to_json() else {
        return Err(Error::Msg("a config is an object".into()));
    };
    let cfg = crate::families::HfConfig::from_object(raw.clone(), &dir.join("config.json"))?;
    let fam = crate::families::family(&cfg)?;
    let loaded = fam.build(
        &cfg,
        &Weights::Random,
        &HeadSpec::new(1000),
        3,
        &candle_core::Device::Cpu,
    )?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::Value::Object(raw).to_string()).map_err(|e| Error::io(&p, e))?;
    crate::formats::safetensors::write_safetensors(
        &loaded.params.named_tensors()?,
        &dir.join("model.safetensors"),
    )
}

/// Side of [`write_tiny_image_classifier`]'s input.
pub const TINY_IMAGE_SIDE: usize = 16;

/// A random EfficientNet-Lite0 classifier of 3 labels (`a`, `b`, `c`) exported as
/// `ferrotune train` would to `dir/model` (timm's format, its evaluation pipeline a
/// resize to [`TINY_IMAGE_SIDE`]² so inference is fast), its pretrained base in
/// `dir/base`. Returns `dir/model`.
pub fn write_tiny_image_classifier(dir: &Path) -> Result<PathBuf> {
    use crate::artifact::ExportInfo;
    use crate::data::image::{Interpolation, Transform};
    use crate::data::{ImageEncoder, ImageRecipe, InputEncoder};
    use crate::export::{export_model, ExportSpec};
    let base = dir.join("base");
    write_tiny_image_model(&base)?;
    let cfg = HfConfig::from_file(&base.join("config.json"))?;
    let family = families::family(&cfg)?;
    let pre = family
        .image_preprocessing(&cfg)?
        .ok_or_else(|| Error::Msg("an EfficientNet reads images".into()))?;
    let encoder = ImageEncoder::for_recipe(
        &pre,
        &ImageRecipe {
            size: Some(TINY_IMAGE_SIDE),
            eval: Some(vec![Transform::Resize {
                size: None,
                height: Some(TINY_IMAGE_SIDE),
                width: Some(TINY_IMAGE_SIDE),
                interpolation: Interpolation::Bilinear,
            }]),
            ..ImageRecipe::default()
        },
    );
    let loaded = family.build(
        &cfg,
        &Weights::Random,
        &HeadSpec::new(3),
        13,
        &candle_core::Device::Cpu,
    )?;
    let labels: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let out = dir.join("model");
    export_model(
        &out,
        &ExportSpec {
            base: &cfg,
            family,
            source_dir: &base,
            params: &loaded.params,
            tokenizer: None,
            labels: &labels,
            problem_type: "single_label_classification",
            info: ExportInfo {
                image_eval: encoder.image_eval().cloned(),
                ..ExportInfo::defaults(loaded.model.pooling(), TINY_IMAGE_SIDE)
            },
            card: None,
        },
    )?;
    Ok(out)
}

/// Writes an IDX pair (`{prefix}-images-idx3-ubyte`, `{prefix}-labels-idx1-ubyte`) of
/// `n` `side × side` grayscale images of 3 classes a small network can tell apart: class
/// `k` is bright in horizontal band `k`, plus noise. Returns the images file.
pub fn write_tiny_idx(dir: &Path, prefix: &str, n: usize, side: usize) -> Result<PathBuf> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(n as u64 * 31 + side as u64);
    let mut imgs = Vec::new();
    imgs.extend(0x803u32.to_be_bytes());
    for d in [n, side, side] {
        imgs.extend((d as u32).to_be_bytes());
    }
    let mut labels = Vec::new();
    labels.extend(0x801u32.to_be_bytes());
    labels.extend((n as u32).to_be_bytes());
    for i in 0..n {
        let k = i % 3;
        labels.push(k as u8);
        for y in 0..side {
            for _ in 0..side {
                let band = y * 3 / side == k;
                let base = if band { 200 } else { 40 };
                imgs.push((base + rng.random_range(0..40)) as u8);
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let ip = dir.join(format!("{prefix}-images-idx3-ubyte"));
    let lp = dir.join(format!("{prefix}-labels-idx1-ubyte"));
    std::fs::write(&ip, imgs).map_err(|e| Error::io(&ip, e))?;
    std::fs::write(&lp, labels).map_err(|e| Error::io(&lp, e))?;
    Ok(ip)
}

/// The tiny ResNet of the tests: stages of 2, 1, 1, 1 blocks, widths 8, 8, 16, 16
/// (bottleneck: 16, 16, 32, 32, inner widths a quarter), timm's fixed 64-channel stem; in
/// transformers' format or timm's (`model_args` giving the stages).
pub fn tiny_resnet_config(bottleneck: bool, timm: bool) -> families::resnet::ResNetConfig {
    use families::resnet::{Convention, ResNetConfig};
    let mut c = ResNetConfig::transformers(bottleneck);
    c.depths = vec![2, 1, 1, 1];
    let e = if bottleneck { 2 } else { 1 };
    c.hidden_sizes = [8, 8, 16, 16].iter().map(|w| w * e).collect();
    if timm {
        c.convention = Convention::Timm;
    }
    c
}

/// Writes a random ResNet of configuration `c` with `classes` outputs to `dir`
/// (`config.json` and `model.safetensors` in `c`'s convention). Convolutions are drawn as
/// both libraries initialise them (Kaiming normal, fan-out), the classifier uniformly
/// within ±1/√fan-in; with `jitter`, the batch norms' scales, shifts and running
/// statistics are random too (so a test sees any mix-up of them), else PyTorch's 1, 0, 0, 1.
pub fn write_random_resnet(
    dir: &Path,
    c: &families::resnet::ResNetConfig,
    classes: usize,
    seed: u64,
    jitter: bool,
) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let serde_json::Value::Object(raw) = c.to_json(classes) else {
        return Err(Error::Msg("a config is an object".into()));
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cp = dir.join("config.json");
    write(&cp, &serde_json::Value::Object(raw.clone()).to_string())?;
    let cfg = HfConfig::from_object(raw, &cp)?;
    let device = candle_core::Device::Cpu;
    let loaded = families::resnet::model::build(
        &cfg,
        &Weights::Random,
        &HeadSpec::new(classes),
        seed,
        &device,
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    fn normal(rng: &mut rand_chacha::ChaCha8Rng, std: f64) -> f32 {
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
    }
    let features = c.hidden_sizes.last().copied().unwrap_or(1) as f32;
    let groups = &loaded.params.groups;
    let mut tensors = HashMap::new();
    for p in loaded.params.state() {
        let t = p.var.as_tensor();
        let dims = t.dims().to_vec();
        let n = t.elem_count();
        let leaf = p.name.rsplit('.').next().unwrap_or("");
        let head = groups[p.group].kind == GroupKind::Head;
        let v: Vec<f32> = if dims.len() == 4 {
            let std = (2.0 / (dims[0] * dims[2] * dims[3]) as f64).sqrt();
            (0..n).map(|_| normal(&mut rng, std)).collect()
        } else if head {
            let bound = 1.0 / features.sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        } else if jitter && matches!(leaf, "weight" | "running_var") {
            (0..n).map(|_| rng.random_range(0.6f32..1.4)).collect()
        } else if jitter {
            (0..n).map(|_| normal(&mut rng, 0.2)).collect()
        } else {
            t.flatten_all()?.to_vec1::<f32>()?
        };
        tensors.insert(p.name.clone(), Tensor::from_vec(v, dims, &device)?);
    }
    crate::formats::safetensors::write_safetensors(&tensors, &dir.join("model.safetensors"))
}

/// Writes the tiny ResNet ([`tiny_resnet_config`]) with random weights and batch-norm
/// statistics and `classes` outputs to `dir`, in timm's format or transformers'. The
/// same `seed` gives the same weights in either format.
pub fn write_tiny_resnet(
    dir: &Path,
    bottleneck: bool,
    timm: bool,
    classes: usize,
    seed: u64,
) -> Result<()> {
    write_random_resnet(
        dir,
        &tiny_resnet_config(bottleneck, timm),
        classes,
        seed,
        true,
    )
}

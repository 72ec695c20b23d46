//! Writes a fine-tuned model as a Hugging Face directory that
//! `transformers.AutoModelForSequenceClassification.from_pretrained` loads:
//! `config.json` (with the family's `architectures`, `id2label`, `label2id`, `num_labels`,
//! `problem_type`), `model.safetensors` under transformers' tensor names (the family's
//! backbone prefix, `bert.…`, and its head's, `classifier.…`), and the tokenizer files.
//!
//! The directory is written under a temporary name and renamed into place, so a crash never
//! leaves a half-written model.
//!
//! transformers' heads read a fixed pooling (BERT's pooler, the first token for the
//! others); a model trained with another `pooling` (`cls` or `mean` for BERT, `mean` for
//! the others) is exported all the same, but only ferrotune (which reads `config.json`'s
//! `ferrotune.pooling`) reproduces its predictions.

use std::path::Path;

use serde_json::{json, Map, Value};
use tokenizers::Tokenizer;

use crate::artifact::ExportInfo;
use crate::error::{Error, Result};
use crate::families::{Family, HfConfig};
use crate::nn::ParamStore;

/// Everything the exporter needs.
pub struct ExportSpec<'a> {
    /// The pretrained model's configuration (its raw JSON is carried over).
    pub base: &'a HfConfig,
    /// Its family (the architecture and tokenizer class written).
    pub family: &'a dyn Family,
    /// The pretrained model's directory (tokenizer side files are copied from it).
    pub source_dir: &'a Path,
    /// The trained parameters.
    pub params: &'a ParamStore,
    /// The tokenizer as used in training (`None` for an image model).
    pub tokenizer: Option<&'a Tokenizer>,
    /// Label names by id.
    pub labels: &'a [String],
    /// Hugging Face `problem_type`.
    pub problem_type: &'a str,
    /// Settings ferrotune needs to reproduce predictions.
    pub info: ExportInfo,
    /// The model card, written as `README.md` (see [`crate::card`]).
    pub card: Option<String>,
}

/// The `config.json` of the exported model.
pub fn export_config(spec: &ExportSpec) -> Value {
    let mut cfg: Map<String, Value> = spec.base.raw.clone();
    let id2label: Map<String, Value> = spec
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), json!(l)))
        .collect();
    let label2id: Map<String, Value> = spec
        .labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), json!(i)))
        .collect();
    cfg.extend(spec.family.export_keys(spec.base, spec.labels));
    // A causal language model (no labels: the family names its `…ForCausalLM` class) gets
    // no label keys, and no `problem_type`: transformers refuses one other than its three
    // classification values.
    if spec.problem_type != crate::tasks::causal_lm::NAME {
        cfg.insert("id2label".into(), Value::Object(id2label));
        cfg.insert("label2id".into(), Value::Object(label2id));
        cfg.insert("num_labels".into(), json!(spec.labels.len()));
        cfg.insert("problem_type".into(), json!(spec.problem_type));
    }
    // An image model: timm's `pretrained_cfg` says the input it was trained on.
    if let (Some(p), Some(Value::Object(pc))) =
        (&spec.info.image_eval, cfg.get_mut("pretrained_cfg"))
    {
        let (h, w) = p.out_size(1, 1);
        pc.insert("input_size".into(), json!([3, h, w]));
        pc.insert("mean".into(), json!(p.mean));
        pc.insert("std".into(), json!(p.std));
        pc.insert("num_classes".into(), json!(spec.labels.len()));
    }
    cfg.insert(
        "ferrotune".into(),
        serde_json::to_value(&spec.info).unwrap_or(Value::Null),
    );
    Value::Object(cfg)
}

/// The file of a LoRA adapter directory that holds the fine-tuned model's `config.json`
/// (labels, problem type, ferrotune's settings), for `--adapter`: PEFT reads only
/// `adapter_config.json`, and a `config.json` there would make transformers take the
/// directory for a full model.
pub const ADAPTER_SIDE_CONFIG: &str = "ferrotune_config.json";

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Writes the model directory `dir` (replacing any previous one).
pub fn export_model(dir: &Path, spec: &ExportSpec) -> Result<()> {
    let tmp = dir.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;

    let cfg = serde_json::to_string_pretty(&export_config(spec))
        .map_err(|e| Error::Msg(format!("cannot serialise config.json: {e}")))?;
    write(&tmp.join("config.json"), cfg.as_bytes())?;
    if let Some(card) = &spec.card {
        write(&tmp.join("README.md"), card.as_bytes())?;
    }

    // With LoRA, the adapters folded into their base weights: a full model.
    let st = tmp.join("model.safetensors");
    let mut tensors = crate::nn::lora::merged_tensors(spec.params)?;
    // GPT-2's Conv1D weights back in their `(in, out)` layout.
    for name in &spec.params.transposed {
        if let Some(t) = tensors.get_mut(name) {
            *t = t.t()?.contiguous()?;
        }
    }
    crate::formats::safetensors::write_safetensors(&tensors, &st)?;

    if let Some(tokenizer) = spec.tokenizer {
        write_tokenizer(&tmp, spec, tokenizer)?;
    }

    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    Ok(())
}

/// `tokenizer.json`, the side files of the pretrained model's tokenizer, and
/// `tokenizer_config.json` into `tmp`.
fn write_tokenizer(tmp: &Path, spec: &ExportSpec, tokenizer: &Tokenizer) -> Result<()> {
    let tok = tmp.join("tokenizer.json");
    tokenizer
        .save(&tok, false)
        .map_err(|e| match e.downcast::<std::io::Error>() {
            Ok(io) => Error::io(&tok, *io),
            Err(e) => Error::Msg(format!("{}: cannot write: {e}", tok.display())),
        })?;
    for side in [
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
    ] {
        let src = spec.source_dir.join(side);
        if src.exists() {
            std::fs::copy(&src, tmp.join(side)).map_err(|e| Error::io(&src, e))?;
        }
    }
    let mut tok_cfg: Map<String, Value> =
        std::fs::read_to_string(spec.source_dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
    tok_cfg.insert("model_max_length".into(), json!(spec.info.max_seq_length));
    tok_cfg
        .entry("tokenizer_class".to_string())
        .or_insert(json!(spec.family.tokenizer_class()));
    let tok_cfg = serde_json::to_string_pretty(&Value::Object(tok_cfg)).unwrap_or_default();
    write(&tmp.join("tokenizer_config.json"), tok_cfg.as_bytes())
}

//! `ferrotune quantize`: an exported f32 model directory → a directory whose linear layers
//! hold int8 weights only, for int8 inference (`predict`, `eval`, `serve`).
//!
//! Every linear layer's weight `W (out, in)` becomes `{name}` int8 (per output channel,
//! symmetric, in ±63 — the 7 bits the AVX2 kernel needs, [`crate::kernels::int8`]) and
//! `{name}_scale` f32 `(out)`, with `W ≈ scale[j] · q[j, k]`. Embeddings, layer norms and
//! biases stay f32. The weights are quantized exactly as int8 inference of the f32 model
//! quantizes them on the fly, so both give the same outputs (tested), and loading the
//! quantized directory makes no f32 copy of those weights.
//!
//! `config.json` gains `quantization_config` (`quant_method = "ferrotune-int8"`), which
//! `transformers` does not know: `from_pretrained` refuses the directory instead of
//! loading int8 numbers as if they were weights. Keep the f32 directory for that.
//!
//! The directory is written under a temporary name and renamed into place.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::formats::safetensors::{write_mixed_safetensors, F32View, I8Tensor, TensorView};
use crate::kernels::int8::{QWeight, W_MAX};
use crate::nn::builder::SCALE_SUFFIX;
use crate::nn::GroupKind;
use crate::precision::QUANTIZATION_CONFIG;
use crate::predict::Predictor;

/// `quantization_config.quant_method` of a quantized directory.
pub const QUANT_METHOD: &str = "ferrotune-int8";

/// What [`quantize_model`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// Linear layers quantized.
    pub layers: usize,
    /// Bytes of the non-embedding tensors in f32 (the model as it was).
    pub non_embedding_f32_bytes: u64,
    /// Bytes of the same tensors after quantization (int8 weights, f32 scales, biases
    /// and norms).
    pub non_embedding_bytes: u64,
    /// Bytes of the embedding tables (f32 in both).
    pub embedding_bytes: u64,
    /// Size of the written `model.safetensors`.
    pub file_bytes: u64,
}

/// Quantizes the fine-tuned model in `model` into the new directory `output`.
pub fn quantize_model(model: &Path, output: &Path) -> Result<Quantized> {
    if output.exists() {
        return Err(Error::file(
            output,
            "already exists: quantize writes a new directory (remove it or pick another)",
        ));
    }
    let (pred, params) = Predictor::load_with_params(model)?;
    if pred.quantized {
        return Err(Error::file(
            model.join("config.json"),
            "this model is quantized already",
        ));
    }
    drop(pred);
    let linear: HashSet<&str> = params.linear_weights.iter().map(|s| s.as_str()).collect();
    let mut f32_data: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut int8: Vec<(String, I8Tensor)> = Vec::new();
    let mut sums = Quantized {
        layers: 0,
        non_embedding_f32_bytes: 0,
        non_embedding_bytes: 0,
        embedding_bytes: 0,
        file_bytes: 0,
    };
    for p in &params.params {
        let t = p.var.as_tensor();
        let shape = t.dims().to_vec();
        let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let bytes = 4 * data.len() as u64;
        if params.groups[p.group].kind == GroupKind::Embeddings && !linear.contains(&*p.name) {
            sums.embedding_bytes += bytes;
            f32_data.push((p.name.clone(), shape, data));
            continue;
        }
        sums.non_embedding_f32_bytes += bytes;
        if linear.contains(&*p.name) {
            let &[out, inp] = shape.as_slice() else {
                return Err(Error::Msg(format!(
                    "internal: linear weight {} of shape {shape:?}",
                    p.name
                )));
            };
            let q = QWeight::quantize(&data, out, inp);
            sums.layers += 1;
            sums.non_embedding_bytes += (out * inp + 4 * out) as u64;
            f32_data.push((
                format!("{}{SCALE_SUFFIX}", p.name),
                vec![out],
                q.scales.clone(),
            ));
            int8.push((
                p.name.clone(),
                I8Tensor {
                    shape,
                    data: q.unpacked(),
                },
            ));
        } else {
            sums.non_embedding_bytes += bytes;
            f32_data.push((p.name.clone(), shape, data));
        }
    }
    drop(params);

    let tmp = output.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    for entry in std::fs::read_dir(model).map_err(|e| Error::io(model, e))? {
        let entry = entry.map_err(|e| Error::io(model, e))?;
        let name = entry.file_name();
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if !is_file || name == "config.json" || name == "model.safetensors" || name == "README.md" {
            continue;
        }
        std::fs::copy(entry.path(), tmp.join(&name)).map_err(|e| Error::io(entry.path(), e))?;
    }
    let cfg_path = model.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let mut cfg: Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&cfg_path, format!("invalid JSON: {e}")))?;
    if let Some(obj) = cfg.as_object_mut() {
        obj.insert(QUANTIZATION_CONFIG.into(), quantization_config(sums.layers));
    }
    let cfg = serde_json::to_string_pretty(&cfg).unwrap_or_default();
    crate::formats::write_whole(&tmp.join("config.json"), cfg.as_bytes())?;
    let card = model.join("README.md");
    if card.exists() {
        let mut text = std::fs::read_to_string(&card).map_err(|e| Error::io(&card, e))?;
        text.push_str(&card_note(&sums));
        crate::formats::write_whole(&tmp.join("README.md"), text.as_bytes())?;
    }

    let mut views: Vec<(String, TensorView)> = Vec::new();
    for (name, shape, data) in &f32_data {
        views.push((
            name.clone(),
            TensorView::F32(F32View {
                shape: shape.clone(),
                data,
            }),
        ));
    }
    for (name, t) in &int8 {
        views.push((name.clone(), TensorView::I8(t)));
    }
    let st = tmp.join("model.safetensors");
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("quantization".to_string(), QUANT_METHOD.to_string()),
    ]);
    write_mixed_safetensors(views, Some(meta), &st)?;
    sums.file_bytes = std::fs::metadata(&st).map_err(|e| Error::io(&st, e))?.len();
    std::fs::rename(&tmp, output).map_err(|e| Error::io(output, e))?;
    Ok(sums)
}

/// `config.json`'s `quantization_config` of a quantized directory.
fn quantization_config(layers: usize) -> Value {
    json!({
        "quant_method": QUANT_METHOD,
        "weights": format!("int8, symmetric, per output channel, in ±{W_MAX}"),
        "scale_suffix": SCALE_SUFFIX,
        "activations": "int8, dynamic, per row (at inference)",
        "not_quantized": "embeddings, layer norms, biases",
        "quantized_layers": layers,
    })
}

/// The paragraph added to the model card.
fn card_note(q: &Quantized) -> String {
    format!(
        "\n## Quantized\n\nThis directory was written by `ferrotune quantize`: the {} linear \
         layers hold int8 weights (per output channel, symmetric) and run with int8 \
         activations (`ferrotune predict|eval|serve`, which pick int8 for it). Non-embedding \
         weights: {:.1} MB instead of {:.1} MB in f32. transformers cannot load it; use the \
         f32 model it was made from.\n",
        q.layers,
        q.non_embedding_bytes as f64 / 1e6,
        q.non_embedding_f32_bytes as f64 / 1e6,
    )
}

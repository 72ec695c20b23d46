//! EfficientNet-Lite0's configuration, tensor names and model.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::error::{Error, Result};
use crate::families::{HeadSpec, HfConfig, Loaded, Model};
use crate::nn::conv::{positions, BatchNorm2d, BnAct, Conv2d, PadMode, PooledClassifier};
use crate::nn::{Batch, Builder, Ctx, GroupKind, Pooling, Weights};

/// The stages of EfficientNet-Lite0 (timm's `_gen_efficientnet_lite` at width and depth
/// 1.0): depthwise-separable or inverted residual, blocks, window, first stride,
/// expansion, output channels.
const STAGES: [(bool, usize, usize, usize, usize, usize); 7] = [
    (false, 1, 3, 1, 1, 16),
    (true, 2, 3, 2, 6, 24),
    (true, 2, 5, 2, 6, 40),
    (true, 3, 3, 2, 6, 80),
    (true, 3, 5, 1, 6, 112),
    (true, 4, 5, 2, 6, 192),
    (true, 1, 3, 1, 6, 320),
];
const STEM: usize = 32;
const FEATURES: usize = 1280;

/// What ferrotune reads of a timm `config.json` (and writes back).
#[derive(Debug, Clone, PartialEq)]
pub struct LiteConfig {
    /// timm's model name: `efficientnet_lite0` or `tf_efficientnet_lite0`.
    pub architecture: String,
    /// TensorFlow "same" padding (the `tf_` models).
    pub same_padding: bool,
    /// Batch norm epsilon (1e-3 for `tf_`, PyTorch's 1e-5 otherwise).
    pub bn_eps: f64,
    /// Batch norm momentum (0.01 for `tf_`, as TensorFlow's 0.99 decay; 0.1 otherwise).
    pub bn_momentum: f64,
    /// Classes of the pretrained classifier.
    pub num_classes: usize,
    /// Dropout before the classifier.
    pub drop_rate: f64,
    /// `[channels, height, width]` of the pretraining input.
    pub input_size: [usize; 3],
    /// Per-channel mean of the normalisation (of pixels scaled to 0..1).
    pub mean: [f64; 3],
    /// Per-channel standard deviation of the normalisation.
    pub std: [f64; 3],
    /// Fraction of the resized image the evaluation crop keeps.
    pub crop_pct: f64,
    /// Resize interpolation (`bicubic`, `bilinear`).
    pub interpolation: String,
}

impl LiteConfig {
    /// timm's pretrained configuration of `efficientnet_lite0` (`tf`: of
    /// `tf_efficientnet_lite0`), with `num_classes` classes.
    pub fn timm(tf: bool, num_classes: usize) -> LiteConfig {
        LiteConfig {
            architecture: if tf {
                "tf_efficientnet_lite0"
            } else {
                "efficientnet_lite0"
            }
            .into(),
            same_padding: tf,
            bn_eps: if tf { 1e-3 } else { 1e-5 },
            bn_momentum: if tf { 0.01 } else { 0.1 },
            num_classes,
            drop_rate: 0.2,
            input_size: [3, 224, 224],
            mean: if tf { [0.5; 3] } else { [0.485, 0.456, 0.406] },
            std: if tf { [0.5; 3] } else { [0.229, 0.224, 0.225] },
            crop_pct: if tf { 0.882 } else { 0.875 },
            interpolation: "bicubic".into(),
        }
    }

    /// The configuration of `cfg` (a timm hub `config.json`): the architecture's
    /// defaults, overridden by the file's `num_classes`, `drop_rate` and
    /// `pretrained_cfg` fields.
    pub fn from_config(cfg: &HfConfig) -> Result<LiteConfig> {
        let tf = cfg.model_type.starts_with("tf_");
        let raw = &cfg.raw;
        let field = |name: &str, what: &str| {
            Error::at(&cfg.path, None, Some(name), format!("expected {what}"))
        };
        let int = |v: Option<&serde_json::Value>, name: &str| -> Result<Option<usize>> {
            v.map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| field(name, "a whole number"))
            })
            .transpose()
        };
        let num_classes = int(raw.get("num_classes"), "num_classes")?.unwrap_or(1000);
        let mut c = LiteConfig::timm(tf, num_classes);
        if let Some(d) = raw.get("drop_rate") {
            c.drop_rate = d.as_f64().ok_or_else(|| field("drop_rate", "a number"))?;
        }
        if let Some(p) = raw.get("pretrained_cfg") {
            let triple = |name: &str| -> Result<Option<[f64; 3]>> {
                match p.get(name) {
                    None => Ok(None),
                    Some(v) => {
                        let f = format!("pretrained_cfg.{name}");
                        let a: Vec<f64> = serde_json::from_value(v.clone())
                            .map_err(|_| field(&f, "a list of 3 numbers"))?;
                        <[f64; 3]>::try_from(a)
                            .map(Some)
                            .map_err(|_| field(&f, "a list of 3 numbers"))
                    }
                }
            };
            if let Some(m) = triple("mean")? {
                c.mean = m;
            }
            if let Some(s) = triple("std")? {
                if s.iter().any(|&s| s <= 0.0) {
                    return Err(field("pretrained_cfg.std", "positive numbers"));
                }
                c.std = s;
            }
            if let Some(v) = p.get("input_size") {
                let a: Vec<usize> = serde_json::from_value(v.clone())
                    .map_err(|_| field("pretrained_cfg.input_size", "[channels, height, width]"))?;
                c.input_size = <[usize; 3]>::try_from(a)
                    .ok()
                    .filter(|a| a[0] == 3 && a[1] > 0 && a[2] > 0)
                    .ok_or_else(|| field("pretrained_cfg.input_size", "[3, height, width]"))?;
            }
            if let Some(v) = p.get("crop_pct") {
                c.crop_pct = v
                    .as_f64()
                    .filter(|&v| v > 0.0 && v <= 1.0)
                    .ok_or_else(|| field("pretrained_cfg.crop_pct", "a number in (0, 1]"))?;
            }
            if let Some(v) = p.get("interpolation") {
                c.interpolation = v
                    .as_str()
                    .ok_or_else(|| field("pretrained_cfg.interpolation", "a string"))?
                    .to_string();
            }
        }
        Ok(c)
    }

    /// timm's hub `config.json` for this configuration.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "architecture": self.architecture,
            "num_classes": self.num_classes,
            "num_features": FEATURES,
            "global_pool": "avg",
            "drop_rate": self.drop_rate,
            "pretrained_cfg": {
                "input_size": self.input_size,
                "interpolation": self.interpolation,
                "crop_pct": self.crop_pct,
                "crop_mode": "center",
                "mean": self.mean,
                "std": self.std,
                "num_classes": self.num_classes,
                "pool_size": [self.input_size[1].div_ceil(32), self.input_size[2].div_ceil(32)],
                "first_conv": "conv_stem",
                "classifier": "classifier"
            }
        })
    }
}

/// The timm name of an `efficientnet_pytorch` tensor name (`_blocks.3._depthwise_conv.weight`
/// → `blocks.2.0.conv_dw.weight`), for EfficientNet-Lite0's 16 blocks; `None` for a name
/// that is not one of its tensors.
pub fn timm_name(name: &str) -> Option<String> {
    let (module, leaf) = name.rsplit_once('.')?;
    if let Some(rest) = module.strip_prefix("_blocks.") {
        let (i, part) = rest.split_once('.')?;
        let mut i: usize = i.parse().ok()?;
        let mut stage = 0;
        while i >= STAGES.get(stage)?.1 {
            i -= STAGES[stage].1;
            stage += 1;
        }
        let part = match (stage == 0, part) {
            (true, "_depthwise_conv") => "conv_dw",
            (true, "_bn1") => "bn1",
            (true, "_project_conv") => "conv_pw",
            (true, "_bn2") => "bn2",
            (false, "_expand_conv") => "conv_pw",
            (false, "_bn0") => "bn1",
            (false, "_depthwise_conv") => "conv_dw",
            (false, "_bn1") => "bn2",
            (false, "_project_conv") => "conv_pwl",
            (false, "_bn2") => "bn3",
            _ => return None,
        };
        return Some(format!("blocks.{stage}.{i}.{part}.{leaf}"));
    }
    let module = match module {
        "_conv_stem" => "conv_stem",
        "_bn0" => "bn1",
        "_conv_head" => "conv_head",
        "_bn1" => "bn2",
        "_fc" => "classifier",
        _ => return None,
    };
    Some(format!("{module}.{leaf}"))
}

/// `weights` under timm's names when they carry `efficientnet_pytorch`'s.
fn renamed(weights: &Weights) -> Option<Weights> {
    let Weights::File { path, tensors, .. } = weights else {
        return None;
    };
    if !tensors.contains_key("_conv_stem.weight") {
        return None;
    }
    let tensors: HashMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(k, v)| timm_name(k).map(|n| (n, v.clone())))
        .collect();
    Some(Weights::File {
        path: path.clone(),
        tensors,
        int8: HashMap::new(),
    })
}

enum Block {
    /// Stage 0: depthwise → BN → ReLU6 → pointwise → BN.
    Separable {
        dw: Conv2d,
        bn1: BatchNorm2d,
        pw: Conv2d,
        bn2: BatchNorm2d,
        skip: bool,
    },
    /// Expand → BN → ReLU6 → depthwise → BN → ReLU6 → project → BN (+ input).
    Inverted {
        pw: Conv2d,
        bn1: BatchNorm2d,
        dw: Conv2d,
        bn2: BatchNorm2d,
        pwl: Conv2d,
        bn3: BatchNorm2d,
        skip: bool,
    },
}

impl Block {
    fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let (y, skip) = match self {
            Block::Separable {
                dw,
                bn1,
                pw,
                bn2,
                skip,
            } => {
                let h = bn1.forward_act(ctx, &dw.forward(ctx, x)?, BnAct::Relu6)?;
                (bn2.forward(ctx, &pw.forward(ctx, &h)?)?, *skip)
            }
            Block::Inverted {
                pw,
                bn1,
                dw,
                bn2,
                pwl,
                bn3,
                skip,
            } => {
                let h = bn1.forward_act(ctx, &pw.forward(ctx, x)?, BnAct::Relu6)?;
                let h = bn2.forward_act(ctx, &dw.forward(ctx, &h)?, BnAct::Relu6)?;
                (bn3.forward(ctx, &pwl.forward(ctx, &h)?)?, *skip)
            }
        };
        Ok(if skip { (y + x)? } else { y })
    }
}

/// EfficientNet-Lite0 with a classifier of the task's size.
pub struct EfficientNetLite0 {
    stem: Conv2d,
    bn1: BatchNorm2d,
    blocks: Vec<Block>,
    conv_head: Conv2d,
    bn2: BatchNorm2d,
    head: PooledClassifier,
}

impl EfficientNetLite0 {
    /// The last feature map, `(batch, h/32, w/32, 1280)`.
    fn features(&self, ctx: &Ctx, batch: &Batch) -> Result<Tensor> {
        let x = &batch.pixels()?.pixels;
        let c = x.dims().last().copied().unwrap_or(0);
        if x.rank() != 4 || c != 3 {
            return Err(Error::Msg(format!(
                "EfficientNet-Lite0 takes (batch, height, width, 3) pixels, given {:?}",
                x.dims()
            )));
        }
        let mut h = self
            .bn1
            .forward_act(ctx, &self.stem.forward(ctx, x)?, BnAct::Relu6)?;
        for b in &self.blocks {
            h = b.forward(ctx, &h)?;
        }
        self.bn2
            .forward_act(ctx, &self.conv_head.forward(ctx, &h)?, BnAct::Relu6)
    }
}

impl Model for EfficientNetLite0 {
    fn forward(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Tensor> {
        let f = self.features(ctx, batch)?;
        self.head.forward(ctx, &f)
    }

    /// The last feature map as `(batch, positions, 1280)`.
    fn hidden_states(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Tensor> {
        positions(&self.features(ctx, batch)?)
    }

    fn pooling(&self) -> Pooling {
        Pooling::Mean
    }

    fn set_first_token_only(&mut self, _on: bool) {}
}

/// Builds EfficientNet-Lite0 from `weights` (timm's or `efficientnet_pytorch`'s names)
/// with a classifier of `head.num_labels` outputs: the checkpoint's when it has that
/// size, else a new one. A checkpoint classifier of another size than the config
/// declares is an error.
pub fn build(
    cfg: &HfConfig,
    weights: &Weights,
    head: &HeadSpec,
    seed: u64,
    device: &Device,
) -> Result<Loaded> {
    let c = LiteConfig::from_config(cfg)?;
    let renamed = renamed(weights);
    let weights = renamed.as_ref().unwrap_or(weights);
    crate::families::check_classifier(cfg, weights, "classifier.weight")?;
    let mut b = Builder::new(weights, "", "conv_stem.weight", 0.02, seed, device);
    let pad = |k: usize| {
        if c.same_padding {
            PadMode::Same
        } else {
            PadMode::Symmetric(k / 2)
        }
    };
    let (eps, mom) = (c.bn_eps, c.bn_momentum);
    let g = b.group(GroupKind::Embeddings);
    let stem = Conv2d::build(&mut b, "conv_stem", 3, STEM, 3, 2, pad(3), false, g)?;
    let bn1 = BatchNorm2d::build(&mut b, "bn1", STEM, eps, mom, g)?;
    let mut blocks = Vec::new();
    let mut inp = STEM;
    for (s, &(inverted, repeats, k, stride, expand, out)) in STAGES.iter().enumerate() {
        let g = b.group(GroupKind::Layer(s));
        for i in 0..repeats {
            let stride = if i == 0 { stride } else { 1 };
            let skip = stride == 1 && inp == out;
            let n = |part: &str| format!("blocks.{s}.{i}.{part}");
            blocks.push(if inverted {
                let mid = inp * expand;
                Block::Inverted {
                    pw: Conv2d::build(&mut b, &n("conv_pw"), inp, mid, 1, 1, pad(1), false, g)?,
                    bn1: BatchNorm2d::build(&mut b, &n("bn1"), mid, eps, mom, g)?,
                    dw: Conv2d::build(&mut b, &n("conv_dw"), mid, mid, k, stride, pad(k), true, g)?,
                    bn2: BatchNorm2d::build(&mut b, &n("bn2"), mid, eps, mom, g)?,
                    pwl: Conv2d::build(&mut b, &n("conv_pwl"), mid, out, 1, 1, pad(1), false, g)?,
                    bn3: BatchNorm2d::build(&mut b, &n("bn3"), out, eps, mom, g)?,
                    skip,
                }
            } else {
                Block::Separable {
                    dw: Conv2d::build(&mut b, &n("conv_dw"), inp, inp, k, stride, pad(k), true, g)?,
                    bn1: BatchNorm2d::build(&mut b, &n("bn1"), inp, eps, mom, g)?,
                    pw: Conv2d::build(&mut b, &n("conv_pw"), inp, out, 1, 1, pad(1), false, g)?,
                    bn2: BatchNorm2d::build(&mut b, &n("bn2"), out, eps, mom, g)?,
                    skip,
                }
            });
            inp = out;
        }
    }
    let g = b.group(GroupKind::Layer(STAGES.len()));
    let conv_head = Conv2d::build(&mut b, "conv_head", inp, FEATURES, 1, 1, pad(1), false, g)?;
    let bn2 = BatchNorm2d::build(&mut b, "bn2", FEATURES, eps, mom, g)?;
    let g = b.group(GroupKind::Head);
    let (classifier, new_head) =
        b.optional_linear("classifier", "classifier", head.num_labels, FEATURES, g)?;
    let model = EfficientNetLite0 {
        stem,
        bn1,
        blocks,
        conv_head,
        bn2,
        head: PooledClassifier {
            linear: classifier,
            drop_rate: head.classifier_dropout.unwrap_or(c.drop_rate),
        },
    };
    Ok(Loaded {
        model: Box::new(model),
        params: b.finish(),
        new_head,
        notes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 16 blocks of `efficientnet_pytorch` land in timm's stages, with timm's part
    /// names (stage 0 has no expansion).
    #[test]
    fn efficientnet_pytorch_names_become_timms() {
        let cases = [
            ("_conv_stem.weight", "conv_stem.weight"),
            ("_bn0.running_var", "bn1.running_var"),
            (
                "_blocks.0._depthwise_conv.weight",
                "blocks.0.0.conv_dw.weight",
            ),
            ("_blocks.0._bn2.bias", "blocks.0.0.bn2.bias"),
            ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
            ("_blocks.2._bn0.weight", "blocks.1.1.bn1.weight"),
            (
                "_blocks.7._project_conv.weight",
                "blocks.3.2.conv_pwl.weight",
            ),
            (
                "_blocks.14._bn1.running_mean",
                "blocks.5.3.bn2.running_mean",
            ),
            ("_blocks.15._bn2.weight", "blocks.6.0.bn3.weight"),
            ("_conv_head.weight", "conv_head.weight"),
            ("_bn1.bias", "bn2.bias"),
            ("_fc.weight", "classifier.weight"),
        ];
        for (a, b) in cases {
            assert_eq!(timm_name(a).as_deref(), Some(b), "{a}");
        }
        assert_eq!(timm_name("_blocks.16._bn0.weight"), None);
        assert_eq!(timm_name("_blocks.0._bn0.weight"), None);
        assert_eq!(
            timm_name("_bn0.num_batches_tracked").as_deref(),
            Some("bn1.num_batches_tracked")
        );
    }
}

//! ResNet's configuration (transformers' or timm's), its tensor names in both
//! conventions, and the model.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde_json::json;

use crate::error::{Error, Result};
use crate::families::{HeadSpec, HfConfig, ImagePreprocessing, Loaded, Model};
use crate::nn::conv::{
    add_relu, max_pool, positions, BatchNorm2d, BnAct, Conv2d, PadMode, PooledClassifier,
};
use crate::nn::{Batch, Builder, Ctx, GroupKind, Pooling, Weights};

/// PyTorch's `BatchNorm2d` defaults, which both libraries' ResNets keep.
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;
/// A bottleneck block's output is 4× its inner width (both libraries).
const EXPANSION: usize = 4;

/// The timm architectures ferrotune loads: name, bottleneck blocks, blocks per stage.
pub const TIMM_ARCHITECTURES: [(&str, bool, [usize; 4]); 2] = [
    ("resnet18", false, [2, 2, 2, 2]),
    ("resnet50", true, [3, 4, 6, 3]),
];

/// Which library's file format (config keys and tensor names) a model came in; it is
/// exported in the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convention {
    /// transformers' `ResNetForImageClassification` (`model_type: "resnet"`).
    Transformers,
    /// timm's (and torchvision's) `ResNet` (`architecture: "resnet18"`).
    Timm,
}

/// What ferrotune reads of a ResNet `config.json`, in either convention.
#[derive(Debug, Clone, PartialEq)]
pub struct ResNetConfig {
    /// The file format.
    pub convention: Convention,
    /// Bottleneck blocks (1×1, 3×3, 1×1) rather than basic ones (3×3, 3×3).
    pub bottleneck: bool,
    /// Output channels of the stem.
    pub embedding_size: usize,
    /// Blocks per stage.
    pub depths: Vec<usize>,
    /// Output channels per stage (a bottleneck's inner width is a quarter of it).
    pub hidden_sizes: Vec<usize>,
    /// The first stage halves the resolution too (transformers' option; off in both
    /// libraries' ResNets).
    pub downsample_in_first_stage: bool,
    /// A bottleneck strides in its first 1×1 convolution rather than its 3×3 (ResNet v1
    /// as published; off in both libraries' ResNets, which are "v1.5").
    pub downsample_in_bottleneck: bool,
    /// Dropout before the classifier (timm's `drop_rate`; transformers has none).
    pub drop_rate: f64,
    /// Input size and normalisation.
    pub preprocessing: ImagePreprocessing,
}

fn field(cfg: &HfConfig, name: &str, what: &str) -> Error {
    Error::at(&cfg.path, None, Some(name), format!("expected {what}"))
}

fn usize_list(cfg: &HfConfig, v: &serde_json::Value, name: &str) -> Result<Vec<usize>> {
    let list: Vec<usize> = serde_json::from_value(v.clone())
        .map_err(|_| field(cfg, name, "a list of whole numbers"))?;
    if list.is_empty() || list.contains(&0) {
        return Err(field(
            cfg,
            name,
            "a non-empty list of positive whole numbers",
        ));
    }
    Ok(list)
}

impl ResNetConfig {
    /// transformers' `ResNetConfig` defaults of ResNet-18 (`bottleneck = false`) or
    /// ResNet-50.
    pub fn transformers(bottleneck: bool) -> ResNetConfig {
        let (depths, hidden_sizes) = if bottleneck {
            (vec![3, 4, 6, 3], vec![256, 512, 1024, 2048])
        } else {
            (vec![2, 2, 2, 2], vec![64, 128, 256, 512])
        };
        ResNetConfig {
            convention: Convention::Transformers,
            bottleneck,
            embedding_size: 64,
            depths,
            hidden_sizes,
            downsample_in_first_stage: false,
            downsample_in_bottleneck: false,
            drop_rate: 0.0,
            preprocessing: ImagePreprocessing {
                size: (224, 224),
                mean: [0.485, 0.456, 0.406],
                std: [0.229, 0.224, 0.225],
                crop_pct: 0.875,
                interpolation: "bilinear".into(),
            },
        }
    }

    /// timm's `resnet18` or `resnet50` with its pretrained configuration (the
    /// `a1_in1k` weights': bicubic, crop 0.95).
    pub fn timm(architecture: &str) -> Option<ResNetConfig> {
        let &(_, bottleneck, depths) = TIMM_ARCHITECTURES
            .iter()
            .find(|(n, ..)| *n == architecture)?;
        let mut c = ResNetConfig::transformers(bottleneck);
        c.convention = Convention::Timm;
        c.depths = depths.to_vec();
        c.preprocessing.crop_pct = 0.95;
        c.preprocessing.interpolation = "bicubic".into();
        Some(c)
    }

    /// The timm architecture these dimensions are (`resnet18`, `resnet50`), or the
    /// closest by block type when `model_args` change them.
    pub fn timm_architecture(&self) -> &'static str {
        if self.bottleneck {
            "resnet50"
        } else {
            "resnet18"
        }
    }

    /// The configuration of `cfg`: transformers' keys when `model_type` is `resnet`,
    /// else timm's (`architecture`, `model_args`, `pretrained_cfg`).
    pub fn from_config(cfg: &HfConfig) -> Result<ResNetConfig> {
        let c = if cfg.model_type == "resnet" {
            Self::from_transformers(cfg)?
        } else {
            Self::from_timm(cfg)?
        };
        if c.depths.len() != c.hidden_sizes.len() {
            let name = match c.convention {
                Convention::Transformers => "hidden_sizes",
                Convention::Timm => "model_args.channels",
            };
            return Err(field(
                cfg,
                name,
                "as many entries as there are stages (`depths`)",
            ));
        }
        if c.bottleneck && c.hidden_sizes.iter().any(|h| h % EXPANSION != 0) {
            return Err(field(
                cfg,
                "hidden_sizes",
                "multiples of 4 for bottleneck blocks (their inner width is a quarter)",
            ));
        }
        Ok(c)
    }

    fn from_transformers(cfg: &HfConfig) -> Result<ResNetConfig> {
        let raw = &cfg.raw;
        let bottleneck = match raw.get("layer_type").map(|v| v.as_str()) {
            None => true,
            Some(Some("bottleneck")) => true,
            Some(Some("basic")) => false,
            Some(_) => return Err(field(cfg, "layer_type", "`basic` or `bottleneck`")),
        };
        let mut c = ResNetConfig::transformers(bottleneck);
        if let Some(v) = raw.get("depths") {
            c.depths = usize_list(cfg, v, "depths")?;
        }
        if let Some(v) = raw.get("hidden_sizes") {
            c.hidden_sizes = usize_list(cfg, v, "hidden_sizes")?;
        }
        if let Some(v) = raw.get("embedding_size") {
            c.embedding_size = v
                .as_u64()
                .filter(|&n| n > 0)
                .ok_or_else(|| field(cfg, "embedding_size", "a positive whole number"))?
                as usize;
        }
        match raw.get("hidden_act").map(|v| v.as_str()) {
            None | Some(Some("relu")) => {}
            Some(_) => {
                return Err(field(
                    cfg,
                    "hidden_act",
                    "`relu` (the only activation ferrotune's ResNet has)",
                ))
            }
        }
        if let Some(v) = raw.get("num_channels") {
            if v.as_u64() != Some(3) {
                return Err(field(cfg, "num_channels", "3 (RGB input)"));
            }
        }
        for (name, slot) in [
            (
                "downsample_in_first_stage",
                &mut c.downsample_in_first_stage,
            ),
            ("downsample_in_bottleneck", &mut c.downsample_in_bottleneck),
        ] {
            if let Some(v) = raw.get(name) {
                *slot = v
                    .as_bool()
                    .ok_or_else(|| field(cfg, name, "true or false"))?;
            }
        }
        c.preprocessing = read_preprocessor(cfg, c.preprocessing)?;
        Ok(c)
    }

    fn from_timm(cfg: &HfConfig) -> Result<ResNetConfig> {
        let raw = &cfg.raw;
        let mut c = ResNetConfig::timm(&cfg.model_type).ok_or_else(|| {
            let known: Vec<&str> = TIMM_ARCHITECTURES.iter().map(|a| a.0).collect();
            field(cfg, "architecture", &format!("one of {}", known.join(", ")))
        })?;
        if let Some(d) = raw.get("drop_rate") {
            c.drop_rate = d
                .as_f64()
                .filter(|d| (0.0..1.0).contains(d))
                .ok_or_else(|| field(cfg, "drop_rate", "a number in [0, 1)"))?;
        }
        // timm's `create_model(**model_args)`: the stage sizes may be given.
        if let Some(args) = raw.get("model_args") {
            let args = args
                .as_object()
                .ok_or_else(|| field(cfg, "model_args", "an object"))?;
            for (k, v) in args {
                match k.as_str() {
                    "layers" => c.depths = usize_list(cfg, v, "model_args.layers")?,
                    "channels" => {
                        let widths = usize_list(cfg, v, "model_args.channels")?;
                        let e = if c.bottleneck { EXPANSION } else { 1 };
                        c.hidden_sizes = widths.iter().map(|w| w * e).collect();
                    }
                    // What timm's `save_for_hf` records; the top-level keys say the same.
                    "num_classes" => {}
                    "in_chans" if v.as_u64() == Some(3) => {}
                    "global_pool" if v.as_str() == Some("avg") => {}
                    "drop_rate" => {
                        c.drop_rate =
                            v.as_f64()
                                .filter(|d| (0.0..1.0).contains(d))
                                .ok_or_else(|| {
                                    field(cfg, "model_args.drop_rate", "a number in [0, 1)")
                                })?
                    }
                    other => {
                        return Err(field(
                            cfg,
                            &format!("model_args.{other}"),
                            "only `layers` and `channels` of timm's ResNet arguments, with \
                             `in_chans` 3 and `global_pool` \"avg\" (ferrotune's ResNet has \
                             timm's default stem, blocks and pooling)",
                        ))
                    }
                }
            }
        }
        if let Some(p) = raw.get("pretrained_cfg") {
            c.preprocessing = crate::families::timm_preprocessing(cfg, p, c.preprocessing)?;
        }
        Ok(c)
    }

    /// The `config.json` of this configuration in its convention, with `num_classes`
    /// classes (`class_0`, ...).
    pub fn to_json(&self, num_classes: usize) -> serde_json::Value {
        let p = &self.preprocessing;
        match self.convention {
            Convention::Transformers => {
                let id2label: serde_json::Map<String, serde_json::Value> = (0..num_classes)
                    .map(|i| (i.to_string(), json!(format!("class_{i}"))))
                    .collect();
                let label2id: serde_json::Map<String, serde_json::Value> = (0..num_classes)
                    .map(|i| (format!("class_{i}"), json!(i)))
                    .collect();
                json!({
                    "model_type": "resnet",
                    "architectures": ["ResNetForImageClassification"],
                    "layer_type": if self.bottleneck { "bottleneck" } else { "basic" },
                    "depths": self.depths,
                    "hidden_sizes": self.hidden_sizes,
                    "embedding_size": self.embedding_size,
                    "hidden_act": "relu",
                    "num_channels": 3,
                    "downsample_in_first_stage": self.downsample_in_first_stage,
                    "downsample_in_bottleneck": self.downsample_in_bottleneck,
                    "id2label": id2label,
                    "label2id": label2id,
                })
            }
            Convention::Timm => {
                let e = if self.bottleneck { EXPANSION } else { 1 };
                let mut v = json!({
                    "architecture": self.timm_architecture(),
                    "num_classes": num_classes,
                    "num_features": self.hidden_sizes.last().copied().unwrap_or(0),
                    "global_pool": "avg",
                    "pretrained_cfg": {
                        "input_size": [3, p.size.0, p.size.1],
                        "interpolation": p.interpolation,
                        "crop_pct": p.crop_pct,
                        "crop_mode": "center",
                        "mean": p.mean,
                        "std": p.std,
                        "num_classes": num_classes,
                        "pool_size": [p.size.0.div_ceil(32), p.size.1.div_ceil(32)],
                        "first_conv": "conv1",
                        "classifier": "fc"
                    }
                });
                let standard = ResNetConfig::timm(self.timm_architecture());
                if standard
                    .is_none_or(|s| s.depths != self.depths || s.hidden_sizes != self.hidden_sizes)
                {
                    v["model_args"] = json!({
                        "layers": self.depths,
                        "channels": self.hidden_sizes.iter().map(|h| h / e).collect::<Vec<_>>(),
                    });
                }
                if self.drop_rate > 0.0 {
                    v["drop_rate"] = json!(self.drop_rate);
                }
                v
            }
        }
    }

    /// The stride of block `i` of stage `s`.
    fn stride(&self, s: usize, i: usize) -> usize {
        if i > 0 || (s == 0 && !self.downsample_in_first_stage) {
            1
        } else {
            2
        }
    }

    /// The module names (without `.weight`) of the stem, of every block's convolutions
    /// and batch norms, shortcuts, and the classifier, in this convention and in the
    /// other: `(ours, theirs)`. transformers' backbone names carry `resnet.`.
    pub fn module_names(&self) -> Vec<(String, String)> {
        let mut hf: Vec<String> = vec![
            "resnet.embedder.embedder.convolution".into(),
            "resnet.embedder.embedder.normalization".into(),
        ];
        let mut timm: Vec<String> = vec!["conv1".into(), "bn1".into()];
        let convs = if self.bottleneck { 3 } else { 2 };
        let mut inp = self.embedding_size;
        for (s, (&depth, &out)) in self.depths.iter().zip(&self.hidden_sizes).enumerate() {
            for i in 0..depth {
                let at = format!("resnet.encoder.stages.{s}.layers.{i}");
                for j in 0..convs {
                    hf.push(format!("{at}.layer.{j}.convolution"));
                    hf.push(format!("{at}.layer.{j}.normalization"));
                    timm.push(format!("layer{}.{i}.conv{}", s + 1, j + 1));
                    timm.push(format!("layer{}.{i}.bn{}", s + 1, j + 1));
                }
                if self.shortcut(inp, out, s, i) {
                    hf.push(format!("{at}.shortcut.convolution"));
                    hf.push(format!("{at}.shortcut.normalization"));
                    timm.push(format!("layer{}.{i}.downsample.0", s + 1));
                    timm.push(format!("layer{}.{i}.downsample.1", s + 1));
                }
                inp = out;
            }
        }
        hf.push("classifier.1".into());
        timm.push("fc".into());
        match self.convention {
            Convention::Transformers => hf.into_iter().zip(timm).collect(),
            Convention::Timm => timm.into_iter().zip(hf).collect(),
        }
    }

    fn shortcut(&self, inp: usize, out: usize, s: usize, i: usize) -> bool {
        inp != out || self.stride(s, i) != 1
    }

    /// The checkpoint name of the classifier's weight in this convention.
    pub fn classifier_weight(&self) -> &'static str {
        match self.convention {
            Convention::Transformers => "classifier.1.weight",
            Convention::Timm => "fc.weight",
        }
    }
}

/// The normalisation and input size from transformers' `preprocessor_config.json` beside
/// `cfg`'s file, when there is one (`image_mean`, `image_std`, `crop_pct`, `size`,
/// `resample`); `base` otherwise.
fn read_preprocessor(cfg: &HfConfig, base: ImagePreprocessing) -> Result<ImagePreprocessing> {
    let Some(path) = cfg
        .path
        .parent()
        .map(|d| d.join("preprocessor_config.json"))
    else {
        return Ok(base);
    };
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(base);
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::at(&path, Some(e.line()), None, format!("invalid JSON: {e}")))?;
    let bad =
        |name: &str, what: &str| Error::at(&path, None, Some(name), format!("expected {what}"));
    let mut p = base;
    let triple = |name: &str| -> Result<Option<[f32; 3]>> {
        v.get(name)
            .map(|x| {
                serde_json::from_value::<[f32; 3]>(x.clone())
                    .map_err(|_| bad(name, "a list of 3 numbers"))
            })
            .transpose()
    };
    if let Some(m) = triple("image_mean")? {
        p.mean = m;
    }
    if let Some(s) = triple("image_std")? {
        if s.iter().any(|&s| s <= 0.0) {
            return Err(bad("image_std", "positive numbers"));
        }
        p.std = s;
    }
    if let Some(c) = v.get("crop_pct").filter(|c| !c.is_null()) {
        p.crop_pct = c
            .as_f64()
            .filter(|&c| c > 0.0 && c <= 1.0)
            .ok_or_else(|| bad("crop_pct", "a number in (0, 1]"))?;
    }
    if let Some(size) = v.get("size") {
        let side = size
            .get("shortest_edge")
            .or_else(|| size.get("height"))
            .unwrap_or(size)
            .as_u64()
            .filter(|&n| n > 0)
            .ok_or_else(|| bad("size", "a positive size (`shortest_edge` or `height`)"))?;
        p.size = (side as usize, side as usize);
    }
    if let Some(r) = v.get("resample") {
        // PIL's numbering, as transformers writes it.
        p.interpolation = match r.as_u64() {
            Some(0) => "nearest",
            Some(2) => "bilinear",
            Some(3) => "bicubic",
            _ => return Err(bad("resample", "0 (nearest), 2 (bilinear) or 3 (bicubic)")),
        }
        .into();
    }
    Ok(p)
}

/// `weights` under this convention's names when they carry the other's (a transformers
/// config beside timm's tensors, or the reverse); `None` when they need no renaming.
fn renamed(c: &ResNetConfig, weights: &Weights) -> Option<Weights> {
    let Weights::File { path, tensors, .. } = weights else {
        return None;
    };
    let names = c.module_names();
    let (ours, theirs) = &names[0];
    let has = |m: &str| {
        tensors.contains_key(&format!("{m}.weight"))
            || m.strip_prefix("resnet.")
                .is_some_and(|m| tensors.contains_key(&format!("{m}.weight")))
    };
    if has(ours) || !has(theirs) {
        return None;
    }
    let map: HashMap<&str, &str> = names
        .iter()
        .flat_map(|(o, t)| {
            let short = t.strip_prefix("resnet.").map(|s| (s, o.as_str()));
            [(t.as_str(), o.as_str())].into_iter().chain(short)
        })
        .collect();
    let tensors = tensors
        .iter()
        .filter_map(|(k, v)| {
            let (module, leaf) = k.rsplit_once('.')?;
            map.get(module).map(|m| (format!("{m}.{leaf}"), v.clone()))
        })
        .collect();
    Some(Weights::File {
        path: path.clone(),
        tensors,
        int8: HashMap::new(),
    })
}

/// One residual block: basic (3×3, 3×3) or bottleneck (1×1, 3×3, 1×1), each convolution
/// followed by batch norm, ReLU after all but the last; the input (or its 1×1 projection
/// when the shape changes) is added, then ReLU.
struct Block {
    convs: Vec<(Conv2d, BatchNorm2d)>,
    shortcut: Option<(Conv2d, BatchNorm2d)>,
}

impl Block {
    fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut h = x.clone();
        for (j, (conv, bn)) in self.convs.iter().enumerate() {
            let act = if j == last { BnAct::None } else { BnAct::Relu };
            h = bn.forward_act(ctx, &conv.forward(ctx, &h)?, act)?;
        }
        let skip = match &self.shortcut {
            Some((conv, bn)) => bn.forward(ctx, &conv.forward(ctx, x)?)?,
            None => x.clone(),
        };
        add_relu(&h, &skip)
    }
}

/// A ResNet with a classifier of the task's size.
pub struct ResNet {
    stem: Conv2d,
    stem_bn: BatchNorm2d,
    blocks: Vec<Block>,
    head: PooledClassifier,
}

impl ResNet {
    /// The last feature map, `(batch, h/32, w/32, hidden_sizes[-1])`.
    fn features(&self, ctx: &Ctx, batch: &Batch) -> Result<Tensor> {
        let x = &batch.pixels()?.pixels;
        let c = x.dims().last().copied().unwrap_or(0);
        if x.rank() != 4 || c != 3 {
            return Err(Error::Msg(format!(
                "ResNet takes (batch, height, width, 3) pixels, given {:?}",
                x.dims()
            )));
        }
        let h = self
            .stem_bn
            .forward_act(ctx, &self.stem.forward(ctx, x)?, BnAct::Relu)?;
        let mut h = max_pool(&h, 3, 2, 1)?;
        for b in &self.blocks {
            h = b.forward(ctx, &h)?;
        }
        Ok(h)
    }
}

impl Model for ResNet {
    fn forward(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Tensor> {
        let f = self.features(ctx, batch)?;
        self.head.forward(ctx, &f)
    }

    /// The last feature map as `(batch, positions, channels)`.
    fn hidden_states(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Tensor> {
        positions(&self.features(ctx, batch)?)
    }

    fn pooling(&self) -> Pooling {
        Pooling::Mean
    }

    fn set_first_token_only(&mut self, _on: bool) {}
}

fn bn(b: &mut Builder, name: &str, channels: usize, group: usize) -> Result<BatchNorm2d> {
    BatchNorm2d::build(b, name, channels, BN_EPS, BN_MOMENTUM, group)
}

/// Builds a ResNet from `weights` (under either convention's names; exported under
/// `cfg`'s) with a classifier of `head.num_labels` outputs: the checkpoint's when it
/// has that size, else a new one. A checkpoint classifier of another size than the
/// config declares is an error.
pub fn build(
    cfg: &HfConfig,
    weights: &Weights,
    head: &HeadSpec,
    seed: u64,
    device: &Device,
) -> Result<Loaded> {
    let c = ResNetConfig::from_config(cfg)?;
    let renamed = renamed(&c, weights);
    let weights = renamed.as_ref().unwrap_or(weights);
    crate::families::check_classifier(cfg, weights, c.classifier_weight())?;
    let names = c.module_names();
    let mut names = names.iter().map(|(ours, _)| {
        // transformers' backbone names go through the builder's `resnet.` prefix.
        ours.strip_prefix("resnet.").unwrap_or(ours).to_string()
    });
    let mut next = || names.next().expect("a name per module");
    let mut b = match c.convention {
        Convention::Transformers => Builder::new(
            weights,
            "resnet.",
            "embedder.embedder.convolution.weight",
            0.02,
            seed,
            device,
        ),
        Convention::Timm => Builder::new(weights, "", "conv1.weight", 0.02, seed, device),
    };
    let sym = PadMode::Symmetric;
    let g = b.group(GroupKind::Embeddings);
    let emb = c.embedding_size;
    let stem = Conv2d::build(&mut b, &next(), 3, emb, 7, 2, sym(3), false, g)?;
    let stem_bn = bn(&mut b, &next(), emb, g)?;
    let mut blocks = Vec::new();
    let mut inp = emb;
    for (s, (&depth, &out)) in c.depths.iter().zip(&c.hidden_sizes).enumerate() {
        let g = b.group(GroupKind::Layer(s));
        for i in 0..depth {
            let stride = c.stride(s, i);
            // (in, out, window, stride) of each convolution.
            let shapes: Vec<(usize, usize, usize, usize)> = if c.bottleneck {
                let mid = out / EXPANSION;
                let (s1, s3) = if c.downsample_in_bottleneck {
                    (stride, 1)
                } else {
                    (1, stride)
                };
                vec![(inp, mid, 1, s1), (mid, mid, 3, s3), (mid, out, 1, 1)]
            } else {
                vec![(inp, out, 3, stride), (out, out, 3, 1)]
            };
            let mut convs = Vec::new();
            for (ci, co, k, st) in shapes {
                let conv = Conv2d::build(&mut b, &next(), ci, co, k, st, sym(k / 2), false, g)?;
                convs.push((conv, bn(&mut b, &next(), co, g)?));
            }
            let shortcut = if c.shortcut(inp, out, s, i) {
                let conv = Conv2d::build(&mut b, &next(), inp, out, 1, stride, sym(0), false, g)?;
                Some((conv, bn(&mut b, &next(), out, g)?))
            } else {
                None
            };
            blocks.push(Block { convs, shortcut });
            inp = out;
        }
    }
    let g = b.group(GroupKind::Head);
    let fc = next();
    let (classifier, new_head) = b.optional_linear(&fc, &fc, head.num_labels, inp, g)?;
    let model = ResNet {
        stem,
        stem_bn,
        blocks,
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

/// `tensors` (under `c`'s convention's names) under the other convention's names: the
/// same model in the other library's format.
pub fn other_names(c: &ResNetConfig, tensors: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let map: HashMap<String, String> = c.module_names().into_iter().collect();
    tensors
        .iter()
        .filter_map(|(k, v)| {
            let (module, leaf) = k.rsplit_once('.')?;
            map.get(module).map(|m| (format!("{m}.{leaf}"), v.clone()))
        })
        .collect()
}

//! Logits of an image model, for `scripts/check-image-parity`: one JSON line per image,
//! `{"input", "top1", "logits"}`.
//!
//! `cargo run --release --example image_logits -- MODEL [--pixels FILE] [IMAGE ...]`
//!
//! MODEL is a model directory of an image family (`config.json`, `model.safetensors`:
//! timm's EfficientNet-Lite0 or ResNet, transformers' ResNet) or a PyTorch weight file of
//! EfficientNet-Lite0 (read as `tf_efficientnet_lite0` with 1000 classes). Images go
//! through the checkpoint's evaluation pipeline; `--pixels` reads already-normalised
//! input instead: the safetensors tensor `pixels`, `(n, 3, h, w)` as PyTorch holds it.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use ferrotune::data::{ImageEncoder, InputEncoder};
use ferrotune::families::{self, efficientnet, HeadSpec, HfConfig};
use ferrotune::nn::{Batch, Ctx, PixelBatch};

fn main() -> ferrotune::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(model) = args.first().map(PathBuf::from) else {
        eprintln!("usage: image_logits MODEL [--pixels FILE] [IMAGE ...]");
        std::process::exit(2);
    };
    let device = ferrotune::nn::device();
    let (cfg, weights) = if model.is_dir() {
        let cfg = HfConfig::from_dir(&model)?;
        let w = families::weights_file(&model.join("model.safetensors"), &device)?;
        (cfg, w)
    } else {
        let serde_json::Value::Object(raw) = efficientnet::LiteConfig::timm(true, 1000).to_json()
        else {
            unreachable!("a config is an object")
        };
        let cfg = HfConfig::from_object(raw, &model)?;
        (cfg, families::weights_file(&model, &device)?)
    };
    let fam = families::family(&cfg)?;
    // The classifier's size, as the config declares it (timm's default: 1000).
    let classes = families::declared_classes(&cfg)?
        .first()
        .map_or(1000, |&(_, n)| n);
    let loaded = fam.build(&cfg, &weights, &HeadSpec::new(classes), 0, &device)?;
    let pre = fam
        .image_preprocessing(&cfg)?
        .ok_or_else(|| ferrotune::Error::Config("not an image model".into()))?;
    let encoder = ImageEncoder::timm(&pre);
    let mut inputs: Vec<(String, Batch)> = Vec::new();
    let mut rest = args[1..].iter();
    while let Some(a) = rest.next() {
        if a == "--pixels" {
            let p = rest.next().expect("--pixels FILE");
            let t = ferrotune::formats::safetensors::read_safetensors(Path::new(p), &device)?;
            let x = t
                .get("pixels")
                .ok_or_else(|| ferrotune::Error::Config(format!("{p}: no tensor `pixels`")))?;
            for i in 0..x.dim(0)? {
                let one = x.narrow(0, i, 1)?.permute((0, 2, 3, 1))?.contiguous()?;
                inputs.push((
                    format!("{p}#{i}"),
                    Batch::Pixels(PixelBatch { pixels: one }),
                ));
            }
        } else {
            let ex = ferrotune::data::Example {
                id: a.clone(),
                line: 0,
                text: a.clone(),
                text_pair: None,
                label: None,
            };
            let feats = encoder.encode(&[ex])?;
            inputs.push((a.clone(), encoder.collate(&[&feats[0]], &device)?));
        }
    }
    for (name, batch) in inputs {
        let logits: Tensor = loaded.model.forward(&mut Ctx::eval(), &batch)?;
        let v = logits.flatten_all()?.to_vec1::<f32>()?;
        let top1 = v
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        println!(
            "{}",
            serde_json::json!({"input": name, "top1": top1, "logits": v})
        );
    }
    Ok(())
}

//! Writes a randomly initialised ResNet-18 or ResNet-50 (no pretrained weights are
//! available offline), in timm's format or transformers', for `recipes/fashion-mnist-resnet18.toml`
//! and `scripts/check-resnet-parity`.
//!
//! `cargo run --release --example random_resnet -- resnet18|resnet50 DIR [--transformers] [--classes N] [--seed S]`
//!
//! Convolutions are Kaiming-normal (fan-out) and the classifier uniform within ±1/√fan-in,
//! as both libraries initialise them; batch norms start at scale 1, shift 0, running
//! mean 0 and variance 1. Default: timm's format, 1000 classes, seed 0.

use std::path::PathBuf;

use ferrotune::families::resnet::{Convention, ResNetConfig};
use ferrotune::testing::write_random_resnet;

fn main() -> ferrotune::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || -> ! {
        eprintln!(
            "usage: random_resnet resnet18|resnet50 DIR [--transformers] [--classes N] [--seed S]"
        );
        std::process::exit(2)
    };
    let (Some(arch), Some(dir)) = (args.first(), args.get(1)) else {
        usage()
    };
    let Some(mut c) = ResNetConfig::timm(arch) else {
        usage()
    };
    let (mut classes, mut seed) = (1000usize, 0u64);
    let mut rest = args[2..].iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--transformers" => {
                c = ResNetConfig {
                    convention: Convention::Transformers,
                    ..ResNetConfig::transformers(c.bottleneck)
                }
            }
            "--classes" => {
                classes = rest
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--seed" => {
                seed = rest
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            _ => usage(),
        }
    }
    let dir = PathBuf::from(dir);
    write_random_resnet(&dir, &c, classes, seed, false)?;
    println!("{}", dir.display());
    Ok(())
}

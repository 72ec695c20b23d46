//! Writes a tiny random pretrained model of a family, in transformers' file formats, and a
//! small labelled CSV beside it — the inputs of `scripts/check-family-parity`.
//!
//! `cargo run --release --example tiny_model -- FAMILY DIR` writes `DIR/base/`
//! (`config.json`, `model.safetensors`, tokenizer files) and `DIR/train.csv`.

use std::path::PathBuf;

use ferrotune::testing::{write_tiny_csv, write_tiny_model, TinySpec};

fn main() -> ferrotune::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(family), Some(dir)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: tiny_model FAMILY DIR");
        std::process::exit(2);
    };
    let family = ferrotune::families::by_model_type(family)
        .ok_or_else(|| ferrotune::Error::Config(format!("no family `{family}`")))?;
    let dir = PathBuf::from(dir);
    let spec = TinySpec {
        hidden: 32,
        heads: 4,
        intermediate: 64,
        ..TinySpec::of(family.model_type())
    };
    write_tiny_model(&dir.join("base"), &spec)?;
    write_tiny_csv(&dir.join("train.csv"), 96)?;
    println!("{}", dir.join("base").display());
    Ok(())
}

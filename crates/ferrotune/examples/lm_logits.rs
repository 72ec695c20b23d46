//! Logits of a decoder, for `scripts/check-decoder-parity`: JSON on stdout.
//!
//! `cargo run --release --example lm_logits -- MODEL IDS.json [--classify N] [--adapter DIR]`
//!
//! MODEL is a decoder's model directory (or a GGUF file). IDS.json is `{"ids": [[...], ...],
//! "mask": [[1, 1, 0, ...], ...] | null}` (sequences of one length; the mask marks padding).
//! Without `--classify`: the language model's next-token logits, `(batch·seq, vocab)`.
//! With `--classify N`: the sequence classifier of N labels (its `score` from the
//! checkpoint), `(batch, N)`. With `--adapter DIR`: the model with that PEFT LoRA adapter
//! (and its saved modules) on it.

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use ferrotune::families::{self, HeadSpec};
use ferrotune::nn::{Batch, Ctx, TokenBatch};

fn main() -> ferrotune::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: lm_logits MODEL IDS.json [--classify N] [--adapter DIR]");
        std::process::exit(2);
    }
    let model = ferrotune::formats::gguf::resolve_model(&PathBuf::from(&args[0]))?;
    let input: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&args[1]).map_err(|e| ferrotune::Error::io(&args[1], e))?,
    )
    .map_err(|e| ferrotune::Error::Config(format!("{}: {e}", args[1])))?;
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let classify: usize = flag("--classify").map_or(0, |n| n.parse().expect("--classify N"));
    let adapter = flag("--adapter").map(PathBuf::from);
    let ids: Vec<Vec<u32>> = serde_json::from_value(input["ids"].clone())
        .map_err(|e| ferrotune::Error::Config(format!("ids: {e}")))?;
    let (b, s) = (ids.len(), ids[0].len());
    let mask: Vec<Vec<f32>> = match &input["mask"] {
        serde_json::Value::Null => vec![vec![1.0; s]; b],
        m => serde_json::from_value(m.clone())
            .map_err(|e| ferrotune::Error::Config(format!("mask: {e}")))?,
    };
    let device = ferrotune::nn::device();
    let head = HeadSpec::new(classify);
    let cfg = families::HfConfig::from_dir(&model)?;
    let fam = families::family(&cfg)?;
    let loaded = ferrotune::nn::lora::load_with_adapter(adapter.as_deref(), &device, || {
        families::load_weights(&cfg, fam, &model, &head, 0, &device)
    })?;
    let flat: Vec<u32> = ids.concat();
    let t = TokenBatch {
        input_ids: Tensor::from_vec(flat, (b, s), &device)?,
        token_type_ids: Tensor::zeros((b, s), DType::U32, &device)?,
        attention_mask: Tensor::from_vec(mask.concat(), (b, s), &device)?,
    };
    let batch = Batch::Tokens(t);
    let mut ctx = Ctx::eval();
    let out = if classify > 0 {
        loaded.model.forward(&mut ctx, &batch)?
    } else {
        loaded.model.lm_logits(&mut ctx, &batch)?
    };
    let rows = out.to_vec2::<f32>()?;
    println!(
        "{}",
        serde_json::to_string(&rows).expect("floats serialise")
    );
    Ok(())
}

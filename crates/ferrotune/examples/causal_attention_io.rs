//! Runs the fused causal attention on tensors from a safetensors file, for
//! scripts/check-causal-attention-parity (transformers' eager and SDPA attention).
//!
//! Usage: `causal_attention_io IN OUT HEADS KV_HEADS`. IN holds `qkv` `(batch·seq,
//! (heads + 2·kv_heads)·head_dim)`, `key_bias` `(batch, seq)` and `up` `(batch·seq,
//! heads·head_dim)`; OUT gets `y` ([`causal_attention`]'s output), `dqkv` (the gradient of
//! `Σ y·up` in `qkv`) and `decode` ([`decode_attention`] of each sequence's last position
//! over the whole sequence as its cache).

use candle_core::{Device, Tensor, Var};
use ferrotune::kernels::decode::{causal_attention, decode_attention};
use std::collections::HashMap;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        return Err("usage: causal_attention_io IN OUT HEADS KV_HEADS".into());
    }
    let (heads, kv): (usize, usize) = (args[3].parse()?, args[4].parse()?);
    let t = candle_core::safetensors::load(&args[1], &Device::Cpu)?;
    let get = |name: &str| -> Res<Tensor> {
        Ok(t.get(name)
            .ok_or_else(|| format!("{}: no tensor `{name}`", args[1]))?
            .clone())
    };
    let (qkv, kb, up) = (
        Var::from_tensor(&get("qkv")?)?,
        get("key_bias")?,
        get("up")?,
    );
    let (batch, seq) = kb.dims2()?;
    let y = causal_attention(&qkv, &kb, None, heads, kv)?;
    let dqkv = (&y * &up)?
        .sum_all()?
        .backward()?
        .get(&qkv)
        .ok_or("no gradient")?
        .clone();
    let hid = up.dim(1)?;
    let kvc = kv * (hid / heads);
    let cols = |c: usize, w: usize| -> Res<Tensor> {
        Ok(qkv.as_tensor().narrow(1, c, w)?.reshape((batch, seq, w))?)
    };
    let q = cols(0, hid)?.narrow(1, seq - 1, 1)?.reshape((batch, hid))?;
    let decode = decode_attention(&q, &cols(hid, kvc)?, &cols(hid + kvc, kvc)?, &kb, heads, kv)?;
    let out: HashMap<String, Tensor> = [("y", y), ("dqkv", dqkv), ("decode", decode)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let tmp = format!("{}.tmp", args[2]);
    candle_core::safetensors::save(&out, &tmp)?;
    std::fs::rename(&tmp, &args[2])?;
    Ok(())
}

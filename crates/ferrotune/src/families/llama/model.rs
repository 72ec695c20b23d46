//! Llama as transformers builds it (`LlamaForCausalLM`, `LlamaForSequenceClassification`):
//! token embeddings → pre-norm layers (RMS norm → grouped-query attention with rotary
//! positions → residual; RMS norm → SwiGLU feed-forward → residual) → RMS norm → the
//! language-model head (tied to the embeddings, or `lm_head`) or the `score` head read at
//! the last non-padding token.

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::families::{pooling, HeadSpec, HfConfig, Loaded, Model};
use crate::kernels::{grad_sink, linear, swiglu};
use crate::nn::decoder::{self, Generator, KvCache, LayerCache, Rope};
use crate::nn::layers::{add_lora_deltas, forward_stacked_4bit, Embedding, Linear, RmsNorm};
use crate::nn::{Batch, Builder, Ctx, GroupKind, Pooling, TokenBatch, Weights};

use super::Llama;

/// The fields of a Llama `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); the query heads when absent.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; `hidden_size / num_attention_heads` when absent.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Longest sequence.
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    /// RMS norm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Rotary base (transformers 4.x spelling; 5.x writes `rope_parameters`).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Rotary scaling (4.x spelling).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Rotary base and scaling (5.x spelling).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// The language-model head is the embedding table.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Q/K/V/O projections have biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// Feed-forward projections have biases.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Dropout on attention probabilities.
    #[serde(default)]
    pub attention_dropout: f64,
    /// Feed-forward activation (`silu`).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Standard deviation of new weights.
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    /// The padding id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// The end-of-sequence id(s).
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_positions() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}
fn default_init() -> f64 {
    0.02
}

impl LlamaConfig {
    /// Reads and checks the config; errors name the file and field.
    pub fn read(cfg: &HfConfig) -> Result<LlamaConfig> {
        let c: LlamaConfig = cfg.parse()?;
        let at = |field: &str, msg: String| Error::at(&cfg.path, None, Some(field), msg);
        for (field, v) in [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
            ("max_position_embeddings", c.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(at(field, "must be at least 1".into()));
            }
        }
        let kv = c.kv_heads();
        if kv == 0 || !c.num_attention_heads.is_multiple_of(kv) {
            return Err(at(
                "num_key_value_heads",
                format!(
                    "{kv} does not divide num_attention_heads {}",
                    c.num_attention_heads
                ),
            ));
        }
        if c.head_dim.is_none() && !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(at(
                "num_attention_heads",
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    c.hidden_size, c.num_attention_heads
                ),
            ));
        }
        if !c.head_dim().is_multiple_of(2) {
            return Err(at(
                "head_dim",
                "rotary embeddings need an even head width".into(),
            ));
        }
        if c.hidden_act != "silu" {
            return Err(at(
                "hidden_act",
                format!("`{}` is not supported (Llama uses silu)", c.hidden_act),
            ));
        }
        c.rope(cfg)?;
        Ok(c)
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The rotary embedding of this config: base `rope_theta` (or `rope_parameters`'),
    /// scaled as `rope_scaling` says. Scalings other than `default`, `linear` and `llama3`
    /// are an error naming the field.
    pub fn rope(&self, cfg: &HfConfig) -> Result<Rope> {
        let params = self.rope_parameters.as_ref().filter(|v| v.is_object());
        let theta = self
            .rope_theta
            .or_else(|| params.and_then(|p| p.get("rope_theta")?.as_f64()))
            .unwrap_or(10000.0);
        let (field, scaling) = match (&self.rope_scaling, params) {
            (Some(s), _) if !s.is_null() => ("rope_scaling", Some(s)),
            (_, Some(p)) => ("rope_parameters", Some(p)),
            _ => ("rope_scaling", None),
        };
        let rope = Rope::new(self.head_dim(), theta);
        let Some(s) = scaling else {
            return Ok(rope);
        };
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let num = |k: &str| -> Result<f64> {
            s.get(k).and_then(|v| v.as_f64()).ok_or_else(|| {
                Error::at(
                    &cfg.path,
                    None,
                    Some(field),
                    format!("`{kind}` scaling needs a number `{k}`"),
                )
            })
        };
        match kind {
            "default" => Ok(rope),
            "linear" => Ok(rope.with_linear_factor(num("factor")? as f32)),
            "llama3" => {
                let factor = num("factor")?;
                let low = num("low_freq_factor")?;
                let high = num("high_freq_factor")?;
                let old = num("original_max_position_embeddings")?;
                let (low_wl, high_wl) = (old / low, old / high);
                let inv: Vec<f32> = rope
                    .inv_freq()
                    .iter()
                    .map(|&f| {
                        let f = f as f64;
                        let wl = 2.0 * std::f64::consts::PI / f;
                        let v = if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            f / factor
                        } else {
                            let smooth = (old / wl - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        };
                        v as f32
                    })
                    .collect();
                Ok(rope.with_inv_freq(inv))
            }
            other => Err(Error::at(
                &cfg.path,
                None,
                Some(field),
                format!("rotary scaling `{other}` is not supported (supported: default, linear, llama3)"),
            )),
        }
    }
}

/// One decoder layer.
struct Layer {
    ln1: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// How a layer's attention runs: over the whole (padded) sequences, or for new tokens
/// against a cache.
enum Attend<'a> {
    Full { mask: &'a Tensor },
    Cached(&'a mut LayerCache),
}

/// Llama with its head (see the module documentation).
pub struct LlamaModel {
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// The untied language-model head; `None`: the embedding table.
    lm_head: Option<Linear>,
    /// The classification head (`num_labels > 0`).
    score: Option<Linear>,
    rope: Rope,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    max_positions: usize,
    attention_dropout: f64,
    classifier_dropout: f64,
}

impl Layer {
    /// The query, key and value projections side by side, `(tokens, (heads + 2·kv)·dh)`,
    /// from one GEMM over the concatenated weights.
    fn qkv(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        if !ctx.fused() || ctx.low_precision() {
            let parts = [&self.q, &self.k, &self.v].map(|l| l.forward(ctx, x));
            let [q, k, v] = parts;
            return Ok(Tensor::cat(&[q?, k?, v?], 1)?);
        }
        let lins = [&self.q, &self.k, &self.v];
        if let Some(y) = forward_stacked_4bit(ctx, &lins, x)? {
            return Ok(y);
        }
        let ws = lins.map(|l| ctx.w(&l.w, l.group));
        let bs = lins.map(|l| ctx.w(&l.b, l.group));
        let w = grad_sink::concat(&ws.each_ref())?;
        let b = grad_sink::concat(&bs.each_ref())?;
        let base = linear::linear_mixed(x, &w, &b, ctx.bf16 && ctx.train)?;
        add_lora_deltas(ctx, base, &lins, x)
    }
}

impl LlamaModel {
    /// `x` `(batch·seq, hidden)` through one layer.
    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        ctx: &mut Ctx,
        l: &Layer,
        x: &Tensor,
        (b, _): (usize, usize),
        cos: &Tensor,
        sin: &Tensor,
        attend: Attend,
    ) -> Result<Tensor> {
        let (nh, kvh, dh) = (self.heads, self.kv_heads, self.head_dim);
        let h = l.ln1.forward(ctx, x)?;
        let qkv = l.qkv(ctx, &h)?;
        let qkv = self
            .rope
            .apply_qkv(ctx.fused(), &qkv, b, nh, kvh, cos, sin)?;
        let a = match attend {
            Attend::Full { mask } => {
                decoder::causal_attention(ctx, &qkv, mask, nh, kvh, self.attention_dropout)?
            }
            Attend::Cached(cache) => {
                let [q, k, v] = decoder::split_qkv(&qkv, nh, kvh, dh)?;
                decoder::cached_attention(&q, &k, &v.contiguous()?, nh, kvh, cache)?
            }
        };
        let x = (x + l.o.forward(ctx, &a)?)?;
        let h = l.ln2.forward(ctx, &x)?;
        let g = l.gate.forward(ctx, &h)?;
        let u = l.up.forward(ctx, &h)?;
        let gu = if ctx.fused() {
            swiglu::silu_mul(&g, &u)?
        } else {
            swiglu::silu_mul_composed(&g, &u)?
        };
        let m = l.down.forward(ctx, &gu)?;
        Ok((x + m)?)
    }

    /// The final-normed hidden states `(batch·seq, hidden)` of `t`.
    fn hidden(&self, ctx: &mut Ctx, t: &TokenBatch) -> Result<Tensor> {
        let (b, s) = t.input_ids.dims2()?;
        if s > self.max_positions {
            return Err(Error::Msg(format!(
                "sequence of {s} tokens is longer than the model's {} positions",
                self.max_positions
            )));
        }
        let mut x = self.embed.forward(ctx, &t.input_ids)?;
        let (cos, sin) = self.rope.tables(0, s, x.device())?;
        for l in &self.layers {
            let attend = Attend::Full {
                mask: &t.attention_mask,
            };
            x = self.layer(ctx, l, &x, (b, s), &cos, &sin, attend)?;
        }
        self.norm.forward(ctx, &x)
    }

    /// Next-token logits of normed hidden rows `(n, hidden)`: `(n, vocab)`.
    fn lm_head(&self, ctx: &Ctx, h: &Tensor) -> Result<Tensor> {
        match &self.lm_head {
            Some(l) => l.forward(ctx, h),
            None => {
                let w = ctx.w(&self.embed.table, self.embed.group);
                Ok(h.matmul(&w.t()?)?)
            }
        }
    }
}

impl Model for LlamaModel {
    fn forward(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Tensor> {
        let score = self.score.as_ref().ok_or_else(|| {
            Error::Msg("this Llama was built as a language model (no classification head)".into())
        })?;
        let t = batch.tokens()?;
        let hidden = self.hidden(ctx, t)?;
        let pooled = decoder::last_token_rows(&hidden, &t.attention_mask)?;
        let pooled = ctx.dropout(&pooled, self.classifier_dropout)?;
        score.forward(ctx, &pooled)
    }

    fn hidden_states(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Tensor> {
        let t = batch.tokens()?;
        let (b, s) = t.input_ids.dims2()?;
        let h = self.hidden(ctx, t)?;
        let w = h.dim(1)?;
        Ok(h.reshape((b, s, w))?)
    }

    fn pooling(&self) -> Pooling {
        Pooling::Last
    }

    fn set_first_token_only(&mut self, _on: bool) {}

    fn lm_logits(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Tensor> {
        let h = self.hidden(ctx, batch.tokens()?)?;
        self.lm_head(ctx, &h)
    }

    fn lm_head_parts(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Option<(Tensor, Tensor)>> {
        let Some(w) = decoder::plain_lm_head(ctx, self.lm_head.as_ref(), &self.embed) else {
            return Ok(None);
        };
        Ok(Some((self.hidden(ctx, batch.tokens()?)?, w)))
    }

    fn generator(&self) -> Option<&dyn Generator> {
        Some(self)
    }
}

impl Generator for LlamaModel {
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    fn step(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let n = ids.len();
        if n == 0 {
            return Err(Error::Msg("generation step with no tokens".into()));
        }
        if cache.len + n > self.max_positions {
            return Err(Error::Msg(format!(
                "{} tokens exceed the model's {} positions",
                cache.len + n,
                self.max_positions
            )));
        }
        let mut ctx = Ctx::eval();
        let dev = self.embed.table.device();
        let ids_t = Tensor::from_vec(ids.to_vec(), (1, n), dev)?;
        let mut x = self.embed.forward(&ctx, &ids_t)?;
        let (cos, sin) = self.rope.tables(cache.len, n, dev)?;
        for (l, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = self.layer(&mut ctx, l, &x, (1, n), &cos, &sin, Attend::Cached(c))?;
        }
        cache.len += n;
        let last = self.norm.forward(&ctx, &x.narrow(0, n - 1, 1)?)?;
        Ok(self.lm_head(&ctx, &last)?.flatten_all()?.to_vec1()?)
    }

    fn max_positions(&self) -> usize {
        self.max_positions
    }
}

/// Builds Llama (see [`crate::families::Family::build`]): with `head.num_labels == 0` the
/// language model, else the sequence classifier.
pub fn build(
    cfg: &HfConfig,
    weights: &Weights,
    head: &HeadSpec,
    seed: u64,
    device: &Device,
) -> Result<Loaded> {
    let c = LlamaConfig::read(cfg)?;
    let rope = c.rope(cfg)?;
    let _ = pooling(&Llama, head)?;
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (nh, kvh, dh) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
    let mut b = Builder::new(
        weights,
        "model.",
        "embed_tokens.weight",
        c.initializer_range,
        seed,
        device,
    );
    let eg = b.group(GroupKind::Embeddings);
    let embed = b.embedding("embed_tokens", c.vocab_size, h, eg)?;
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for n in 0..c.num_hidden_layers {
        let g = b.group(GroupKind::Layer(n));
        let p = format!("layers.{n}");
        let mut lin = |name: &str, out: usize, inp: usize, bias: bool| {
            let full = format!("{p}.{name}");
            if bias {
                b.linear(&full, out, inp, g)
            } else {
                b.linear_no_bias(&full, out, inp, g)
            }
        };
        let ab = c.attention_bias;
        let q = lin("self_attn.q_proj", nh * dh, h, ab)?;
        let k = lin("self_attn.k_proj", kvh * dh, h, ab)?;
        let v = lin("self_attn.v_proj", kvh * dh, h, ab)?;
        let o = lin("self_attn.o_proj", h, nh * dh, ab)?;
        let mb = c.mlp_bias;
        let gate = lin("mlp.gate_proj", i, h, mb)?;
        let up = lin("mlp.up_proj", i, h, mb)?;
        let down = lin("mlp.down_proj", h, i, mb)?;
        layers.push(Layer {
            ln1: b.rms_norm(&format!("{p}.input_layernorm"), h, c.rms_norm_eps, g)?,
            q,
            k,
            v,
            o,
            ln2: b.rms_norm(
                &format!("{p}.post_attention_layernorm"),
                h,
                c.rms_norm_eps,
                g,
            )?,
            gate,
            up,
            down,
        });
    }
    let pg = b.group(GroupKind::Pooler);
    let norm = b.rms_norm("norm", h, c.rms_norm_eps, pg)?;
    let hg = b.group(GroupKind::Head);
    let (mut lm_head, mut score, mut new_head) = (None, None, false);
    if head.num_labels == 0 {
        if !c.tie_word_embeddings {
            if !matches!(weights, Weights::Random) && !weights.has("lm_head.weight") {
                let path = match weights {
                    Weights::File { path, .. } => path.clone(),
                    Weights::Random => unreachable!(),
                };
                return Err(Error::at(
                    &path,
                    None,
                    Some("lm_head.weight"),
                    "missing, and config.json says tie_word_embeddings = false",
                ));
            }
            let (l, new) = b.optional_linear_no_bias("lm_head", "lm_head", c.vocab_size, h, hg)?;
            new_head = new;
            lm_head = Some(l);
        }
    } else {
        let (l, new) = b.optional_linear_no_bias("score", "score", head.num_labels, h, hg)?;
        new_head = new;
        score = Some(l);
    }
    let model = LlamaModel {
        embed,
        layers,
        norm,
        lm_head,
        score,
        rope,
        heads: nh,
        kv_heads: kvh,
        head_dim: dh,
        max_positions: c.max_position_embeddings,
        attention_dropout: head.attention_dropout.unwrap_or(c.attention_dropout),
        classifier_dropout: head.classifier_dropout.unwrap_or(0.0),
    };
    Ok(Loaded {
        model: Box::new(model),
        params: b.finish(),
        new_head,
        notes: Vec::new(),
    })
}

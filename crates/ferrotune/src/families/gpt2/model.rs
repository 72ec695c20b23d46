//! GPT-2 as transformers builds it (`GPT2LMHeadModel`, `GPT2ForSequenceClassification`):
//! token + learned position embeddings → dropout → pre-norm blocks (layer norm → causal
//! attention over the fused `c_attn` projection → `c_proj` → dropout → residual; layer
//! norm → `c_fc` → `gelu_new` → `c_proj` → dropout → residual) → `ln_f` → the language-model
//! head tied to the token embeddings, or the `score` head read at the last non-padding
//! token. The `Conv1D` weights (`(in, out)` in the checkpoint) are held transposed, as
//! linear layers, and exported back in GPT-2's layout.

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::families::{pooling, HeadSpec, HfConfig, Loaded, Model};
use crate::nn::decoder::{self, Generator, KvCache, LayerCache};
use crate::nn::layers::{Activation, Embedding, LayerNorm, Linear};
use crate::nn::{Batch, Builder, Ctx, GroupKind, Pooling, TokenBatch, Weights};

use super::Gpt2;

/// The fields of a GPT-2 `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Positions.
    #[serde(default = "default_positions")]
    pub n_positions: usize,
    /// Hidden width.
    pub n_embd: usize,
    /// Layers.
    pub n_layer: usize,
    /// Heads.
    pub n_head: usize,
    /// Feed-forward width; `4·n_embd` when absent.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// Feed-forward activation.
    #[serde(default = "default_act")]
    pub activation_function: String,
    /// Dropout after each residual branch.
    #[serde(default = "default_dropout")]
    pub resid_pdrop: f64,
    /// Dropout on the embeddings.
    #[serde(default = "default_dropout")]
    pub embd_pdrop: f64,
    /// Dropout on attention probabilities.
    #[serde(default = "default_dropout")]
    pub attn_pdrop: f64,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Standard deviation of new weights.
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    /// Scores divided by `sqrt(head_dim)`.
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
    /// Scores also divided by the layer index (not supported).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// The language-model head is the token embedding table.
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    /// The padding id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_positions() -> usize {
    1024
}
fn default_act() -> String {
    "gelu_new".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_eps() -> f64 {
    1e-5
}
fn default_init() -> f64 {
    0.02
}
fn yes() -> bool {
    true
}

impl Gpt2Config {
    /// Reads and checks the config; errors name the file and field.
    pub fn read(cfg: &HfConfig) -> Result<Gpt2Config> {
        let c: Gpt2Config = cfg.parse()?;
        let at = |field: &str, msg: String| Error::at(&cfg.path, None, Some(field), msg);
        for (field, v) in [
            ("vocab_size", c.vocab_size),
            ("n_positions", c.n_positions),
            ("n_embd", c.n_embd),
            ("n_layer", c.n_layer),
            ("n_head", c.n_head),
        ] {
            if v == 0 {
                return Err(at(field, "must be at least 1".into()));
            }
        }
        if !c.n_embd.is_multiple_of(c.n_head) {
            return Err(at(
                "n_head",
                format!(
                    "n_embd {} is not divisible by n_head {}",
                    c.n_embd, c.n_head
                ),
            ));
        }
        Activation::parse(&c.activation_function)
            .map_err(|e| at("activation_function", e.to_string()))?;
        if c.scale_attn_by_inverse_layer_idx {
            return Err(at(
                "scale_attn_by_inverse_layer_idx",
                "scaling attention by the layer index is not supported".into(),
            ));
        }
        if !c.scale_attn_weights {
            return Err(at(
                "scale_attn_weights",
                "unscaled attention scores are not supported".into(),
            ));
        }
        Ok(c)
    }

    /// Feed-forward width.
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

struct Block {
    ln1: LayerNorm,
    attn: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc: Linear,
    out: Linear,
}

/// GPT-2 with its head (see the module documentation).
pub struct Gpt2Model {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Option<Linear>,
    score: Option<Linear>,
    heads: usize,
    act: Activation,
    embd_drop: f64,
    resid_drop: f64,
    attn_drop: f64,
    classifier_dropout: f64,
}

impl Gpt2Model {
    /// The embeddings of `ids` `(b, s)` at positions `start..`: `(b·s, hidden)`.
    fn embed(&self, ctx: &mut Ctx, ids: &Tensor, start: usize) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        if start + s > self.wpe.rows() {
            return Err(Error::Msg(format!(
                "{} tokens exceed the model's {} positions",
                start + s,
                self.wpe.rows()
            )));
        }
        let x = self.wte.forward(ctx, ids)?;
        let h = x.dim(1)?;
        let pos = ctx.w(&self.wpe.table, self.wpe.group).narrow(0, start, s)?;
        let x = x
            .reshape((b, s, h))?
            .broadcast_add(&pos)?
            .reshape((b * s, h))?;
        ctx.dropout(&x, self.embd_drop)
    }

    fn block(
        &self,
        ctx: &mut Ctx,
        k: &Block,
        x: &Tensor,
        attend: Option<&Tensor>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let nh = self.heads;
        let h = x.dim(1)?;
        let qkv = k.attn.forward(ctx, &k.ln1.forward(ctx, x)?)?;
        let a = match (attend, cache) {
            (_, Some(c)) => {
                let [q, keys, values] =
                    decoder::split_qkv(&qkv, nh, nh, h / nh)?.map(|t| t.contiguous());
                decoder::cached_attention(&q?, &keys?, &values?, nh, nh, c)?
            }
            (Some(mask), None) => {
                decoder::causal_attention(ctx, &qkv, mask, nh, nh, self.attn_drop)?
            }
            (None, None) => unreachable!("a mask or a cache"),
        };
        let a = k.proj.forward(ctx, &a)?;
        let x = (x + ctx.dropout(&a, self.resid_drop)?)?;
        let m = k.fc.forward_act(ctx, &k.ln2.forward(ctx, &x)?, self.act)?;
        let m = k.out.forward(ctx, &m)?;
        Ok((x + ctx.dropout(&m, self.resid_drop)?)?)
    }

    fn hidden(&self, ctx: &mut Ctx, t: &TokenBatch) -> Result<Tensor> {
        let mut x = self.embed(ctx, &t.input_ids, 0)?;
        for k in &self.blocks {
            x = self.block(ctx, k, &x, Some(&t.attention_mask), None)?;
        }
        self.ln_f.forward(ctx, &x)
    }

    fn lm_head(&self, ctx: &Ctx, h: &Tensor) -> Result<Tensor> {
        match &self.lm_head {
            Some(l) => l.forward(ctx, h),
            None => {
                let w = ctx.w(&self.wte.table, self.wte.group);
                Ok(h.matmul(&w.t()?)?)
            }
        }
    }
}

impl Model for Gpt2Model {
    fn forward(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Tensor> {
        let score = self.score.as_ref().ok_or_else(|| {
            Error::Msg("this GPT-2 was built as a language model (no classification head)".into())
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
        let Some(w) = decoder::plain_lm_head(ctx, self.lm_head.as_ref(), &self.wte) else {
            return Ok(None);
        };
        Ok(Some((self.hidden(ctx, batch.tokens()?)?, w)))
    }

    fn generator(&self) -> Option<&dyn Generator> {
        Some(self)
    }
}

impl Generator for Gpt2Model {
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.blocks.len())
    }

    fn step(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let n = ids.len();
        if n == 0 {
            return Err(Error::Msg("generation step with no tokens".into()));
        }
        let mut ctx = Ctx::eval();
        let dev = self.wte.table.device();
        let ids_t = Tensor::from_vec(ids.to_vec(), (1, n), dev)?;
        let mut x = self.embed(&mut ctx, &ids_t, cache.len)?;
        for (k, c) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = self.block(&mut ctx, k, &x, None, Some(c))?;
        }
        cache.len += n;
        let last = self.ln_f.forward(&ctx, &x.narrow(0, n - 1, 1)?)?;
        Ok(self.lm_head(&ctx, &last)?.flatten_all()?.to_vec1()?)
    }

    fn max_positions(&self) -> usize {
        self.wpe.rows()
    }
}

/// Builds GPT-2 (see [`crate::families::Family::build`]): with `head.num_labels == 0` the
/// language model, else the sequence classifier.
pub fn build(
    cfg: &HfConfig,
    weights: &Weights,
    head: &HeadSpec,
    seed: u64,
    device: &Device,
) -> Result<Loaded> {
    let c = Gpt2Config::read(cfg)?;
    let _ = pooling(&Gpt2, head)?;
    let (h, inner, eps) = (c.n_embd, c.inner(), c.layer_norm_epsilon);
    let mut b = Builder::new(
        weights,
        "transformer.",
        "wte.weight",
        c.initializer_range,
        seed,
        device,
    );
    let eg = b.group(GroupKind::Embeddings);
    let wte = b.embedding("wte", c.vocab_size, h, eg)?;
    let wpe = b.embedding("wpe", c.n_positions, h, eg)?;
    let mut blocks = Vec::with_capacity(c.n_layer);
    for i in 0..c.n_layer {
        let g = b.group(GroupKind::Layer(i));
        let n = |s: &str| format!("h.{i}.{s}");
        blocks.push(Block {
            ln1: b.layer_norm(&n("ln_1"), h, eps, g)?,
            attn: b.linear_transposed(&n("attn.c_attn"), 3 * h, h, g)?,
            proj: b.linear_transposed(&n("attn.c_proj"), h, h, g)?,
            ln2: b.layer_norm(&n("ln_2"), h, eps, g)?,
            fc: b.linear_transposed(&n("mlp.c_fc"), inner, h, g)?,
            out: b.linear_transposed(&n("mlp.c_proj"), h, inner, g)?,
        });
    }
    let pg = b.group(GroupKind::Pooler);
    let ln_f = b.layer_norm("ln_f", h, eps, pg)?;
    let hg = b.group(GroupKind::Head);
    let (mut lm_head, mut score, mut new_head) = (None, None, false);
    if head.num_labels == 0 {
        if !c.tie_word_embeddings {
            let (l, new) = b.optional_linear_no_bias("lm_head", "lm_head", c.vocab_size, h, hg)?;
            new_head = new;
            lm_head = Some(l);
        }
    } else {
        let (l, new) = b.optional_linear_no_bias("score", "score", head.num_labels, h, hg)?;
        new_head = new;
        score = Some(l);
    }
    let drop = head.hidden_dropout.unwrap_or(c.resid_pdrop);
    let model = Gpt2Model {
        wte,
        wpe,
        blocks,
        ln_f,
        lm_head,
        score,
        heads: c.n_head,
        act: Activation::parse(&c.activation_function)?,
        embd_drop: head.hidden_dropout.unwrap_or(c.embd_pdrop),
        resid_drop: drop,
        attn_drop: head.attention_dropout.unwrap_or(c.attn_pdrop),
        // transformers' GPT2ForSequenceClassification has no dropout before `score`.
        classifier_dropout: head.classifier_dropout.unwrap_or(0.0),
    };
    Ok(Loaded {
        model: Box::new(model),
        params: b.finish(),
        new_head,
        notes: Vec::new(),
    })
}

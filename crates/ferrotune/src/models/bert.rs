//! A BERT encoder with a sequence-classification head, written on candle's differentiable
//! operations.
//!
//! Why our own model code rather than `candle-transformers`' `BertModel`: that one has no
//! pooler, no dropout, and uses candle's fast layer norm and softmax, which have no backward
//! pass and cut the gradient graph silently (see `docs/DESIGN-NOTES.md`). Every operation
//! here is differentiable, and a test checks that every trainable tensor receives a gradient.
//!
//! Semantics follow Hugging Face's `BertForSequenceClassification`:
//! embeddings (word + position + token type) → layer norm → dropout → N × (self-attention →
//! dropout → add & norm → GELU feed-forward → dropout → add & norm) → pooling → dropout →
//! linear classifier.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::models::config::HfConfig;
use crate::models::params::{Param, ParamStore};
use crate::models::{attention, embedding, fused, grad_sink, linear};

/// How the sequence representation fed to the classifier is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// BERT's pooler: dense + tanh on the `[CLS]` hidden state (what transformers does).
    Pooler,
    /// The `[CLS]` hidden state itself.
    Cls,
    /// The mean of the hidden states of the non-padding tokens.
    Mean,
}

impl std::str::FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pooler" => Ok(Pooling::Pooler),
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            _ => Err(format!(
                "unknown pooling `{s}` (expected pooler, cls or mean)"
            )),
        }
    }
}

impl Pooling {
    /// The recipe spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Pooling::Pooler => "pooler",
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
        }
    }
}

/// Per-forward state: training or inference, which parameter groups are frozen, and the
/// random generator for dropout (seeded by the trainer, so runs are reproducible).
pub struct Ctx<'a> {
    /// Dropout active.
    pub train: bool,
    /// `frozen[g]`: parameters of group `g` get no gradient (see [`ParamStore::groups`]).
    pub frozen: &'a [bool],
    /// Dropout's random generator (needed when `train`).
    pub rng: Option<&'a mut ChaCha8Rng>,
}

impl Ctx<'_> {
    /// Whether to use the fused operations ([`fused`], [`linear`], [`attention`]), in
    /// training and inference alike. `FERROTUNE_NO_FUSED=1` turns them off (see
    /// [`fused::enabled`]): the model then runs the composition of candle operations they
    /// are tested against.
    pub fn fused(&self) -> bool {
        fused::enabled()
    }

    /// An inference context: no dropout, nothing tracked for gradients.
    pub fn eval() -> Ctx<'static> {
        Ctx {
            train: false,
            frozen: &[],
            rng: None,
        }
    }

    fn w(&self, v: &Var, group: usize) -> Tensor {
        if !self.train || self.frozen.get(group).copied().unwrap_or(false) {
            v.as_tensor().detach()
        } else {
            v.as_tensor().clone()
        }
    }

    /// Inverted dropout with probability `p`; its mask is seeded from the context's
    /// generator ([`fused::dropout`]).
    fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        match self.dropout_seed(p) {
            Some((p, seed)) => fused::dropout(x, p, seed),
            None => Ok(x.clone()),
        }
    }

    /// `(p, seed)` for a dropout with probability `p` (one draw from the context's
    /// generator), or `None` when there is no dropout (inference, or `p = 0`).
    fn dropout_seed(&mut self, p: f64) -> Option<(f32, u64)> {
        if !self.train || p <= 0.0 {
            return None;
        }
        let rng = self.rng.as_deref_mut()?;
        Some((p as f32, rng.random::<u64>()))
    }
}

/// A linear layer `y = x Wᵀ + b` on 2-D input.
struct Linear {
    w: Var,
    b: Var,
    group: usize,
}

impl Linear {
    fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let w = ctx.w(&self.w, self.group);
        let b = ctx.w(&self.b, self.group);
        if ctx.fused() {
            linear::linear(x, &w, &b)
        } else {
            linear::linear_composed(x, &w, &b)
        }
    }

    /// `gelu(forward(x))` (exact GELU) as one fused op.
    fn forward_gelu(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let w = ctx.w(&self.w, self.group);
        let b = ctx.w(&self.b, self.group);
        linear::linear_gelu(x, &w, &b)
    }
}

/// Layer norm over the last dimension ([`fused::layer_norm`]: one pass forward, one
/// backward).
struct LayerNorm {
    g: Var,
    b: Var,
    eps: f64,
    group: usize,
}

impl LayerNorm {
    fn forward(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let g = ctx.w(&self.g, self.group);
        let b = ctx.w(&self.b, self.group);
        if ctx.fused() {
            fused::layer_norm(x, &g, &b, self.eps)
        } else {
            fused::layer_norm_composed(x, &g, &b, self.eps)
        }
    }

    /// `LayerNorm(dropout(h) + r)` with dropout probability `p`: one fused operation
    /// ([`fused::residual_layer_norm`]), or the composition of the three.
    fn forward_residual(&self, ctx: &mut Ctx, h: &Tensor, r: &Tensor, p: f64) -> Result<Tensor> {
        if ctx.fused() {
            let g = ctx.w(&self.g, self.group);
            let b = ctx.w(&self.b, self.group);
            let drop = ctx.dropout_seed(p);
            return fused::residual_layer_norm(h, r, &g, &b, self.eps, drop);
        }
        let h = ctx.dropout(h, p)?;
        self.forward(ctx, &(h + r)?)
    }
}

/// Row 0 of each sequence of `t` `(batch·seq, hidden)`: `(batch, hidden)`.
fn first_rows(t: &Tensor, batch: usize, seq: usize) -> Result<Tensor> {
    let h = t.dim(1)?;
    Ok(t.reshape((batch, seq, h))?
        .narrow(1, 0, 1)?
        .contiguous()?
        .reshape((batch, h))?)
}

/// Softmax over the last dimension, composed of differentiable operations (the row
/// maximum detached); [`fused::softmax_last`] is the fused form used in training.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    fused::softmax_last_composed(x)
}

/// Log-softmax over the last dimension (maximum detached, as in [`softmax_last`]).
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let d = x.broadcast_sub(&max)?;
    let lse = d.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(d.broadcast_sub(&lse)?)
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln1: LayerNorm,
    inter: Linear,
    out: Linear,
    ln2: LayerNorm,
}

impl Layer {
    /// The query, key and value projections side by side, `(tokens, 3·hidden)`, from one
    /// GEMM over the concatenated weights (the input is read once; the weights, a few
    /// hundred KiB, are concatenated per forward pass).
    fn qkv(&self, ctx: &Ctx, x: &Tensor) -> Result<Tensor> {
        let ws = [&self.q, &self.k, &self.v].map(|l| ctx.w(&l.w, l.group));
        let bs = [&self.q, &self.k, &self.v].map(|l| ctx.w(&l.b, l.group));
        // With a gradient sink on, the concatenations' gradients go to the three
        // parameters' own buffers.
        let w = grad_sink::concat(&ws.each_ref())?;
        let b = grad_sink::concat(&bs.each_ref())?;
        linear::linear(x, &w, &b)
    }
}

/// One batch of token ids, ready for the model.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `(batch, seq)` u32 token ids.
    pub input_ids: Tensor,
    /// `(batch, seq)` u32 segment ids.
    pub token_type_ids: Tensor,
    /// `(batch, seq)` f32: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
}

/// BERT with a classification (or regression) head.
pub struct BertClassifier {
    cfg: HfConfig,
    pooling: Pooling,
    num_labels: usize,
    classifier_dropout: f64,
    word: Var,
    pos: Var,
    tok_type: Var,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
    pooler: Option<Linear>,
    classifier: Linear,
    /// Whether [`BertClassifier::forward`] runs the last layer after attention for the
    /// `[CLS]` row only, when the pooling reads nothing else (see [`Self::forward`]).
    first_token_last_layer: bool,
}

/// How the checkpoint's tensor names map to ours: HF fine-tuned checkpoints prefix the
/// backbone with `bert.`, sentence-transformers checkpoints do not.
#[derive(Debug, Clone)]
pub struct Naming {
    /// `"bert."` or `""`.
    pub prefix: String,
}

/// The result of loading a checkpoint.
pub struct Loaded {
    /// The model.
    pub model: BertClassifier,
    /// Its parameters, in a fixed order, with their groups.
    pub params: ParamStore,
    /// True when the classifier was newly initialised (not found in the checkpoint, or of
    /// another size).
    pub new_head: bool,
    /// True when the pooler was newly initialised.
    pub new_pooler: bool,
}

/// Where the weights come from.
pub enum Weights<'a> {
    /// A safetensors file (its path, for messages, and its bytes).
    Safetensors(&'a Path),
    /// Random weights (tests and benchmarks).
    Random,
}

fn normal(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    // Box–Muller: two uniforms give one normal sample (the second is dropped for clarity).
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(1e-300);
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

struct Builder<'a> {
    file: Option<&'a Path>,
    tensors: HashMap<String, Tensor>,
    naming: Naming,
    store: ParamStore,
    rng: ChaCha8Rng,
    init_std: f64,
    device: Device,
}

impl Builder<'_> {
    /// A backbone tensor that must be in the checkpoint (or random when there is none).
    fn need(&mut self, name: &str, shape: &[usize], group: usize) -> Result<Var> {
        let t = match self.file {
            None => self.random(name, shape)?,
            Some(file) => {
                let full = format!("{}{}", self.naming.prefix, name);
                let t = self.tensors.get(&full).ok_or_else(|| {
                    Error::at(
                        file,
                        None,
                        Some(&full),
                        "tensor is missing from the checkpoint",
                    )
                })?;
                if t.dims() != shape {
                    return Err(Error::at(
                        file,
                        None,
                        Some(&full),
                        format!("tensor has shape {:?}, expected {:?}", t.dims(), shape),
                    ));
                }
                t.to_dtype(DType::F32)?.to_device(&self.device)?
            }
        };
        self.push(format!("bert.{name}"), t, group)
    }

    /// A tensor that is loaded when present with the right shape, else initialised as
    /// transformers does (normal(0, initializer_range) weights, zero biases).
    /// Returns the variable and whether it was newly initialised.
    fn optional(
        &mut self,
        ckpt_name: &str,
        export_name: &str,
        shape: &[usize],
        group: usize,
    ) -> Result<(Var, bool)> {
        let found = self
            .tensors
            .get(ckpt_name)
            .filter(|t| t.dims() == shape)
            .cloned();
        let (t, new) = match found {
            Some(t) => (t.to_dtype(DType::F32)?.to_device(&self.device)?, false),
            None => (self.random(export_name, shape)?, true),
        };
        Ok((self.push(export_name.to_string(), t, group)?, new))
    }

    fn random(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data = if name.ends_with(".bias") {
            vec![0f32; n]
        } else if name.contains("LayerNorm") {
            vec![1f32; n]
        } else {
            normal(&mut self.rng, n, self.init_std)
        };
        Ok(Tensor::from_vec(data, shape, &self.device)?)
    }

    fn push(&mut self, name: String, t: Tensor, group: usize) -> Result<Var> {
        let var = Var::from_tensor(&t)?;
        let no_decay = name.ends_with(".bias") || name.contains("LayerNorm");
        self.store.params.push(Param {
            name,
            var: var.clone(),
            group,
            no_decay,
        });
        Ok(var)
    }

    fn linear(&mut self, name: &str, out: usize, inp: usize, group: usize) -> Result<Linear> {
        Ok(Linear {
            w: self.need(&format!("{name}.weight"), &[out, inp], group)?,
            b: self.need(&format!("{name}.bias"), &[out], group)?,
            group,
        })
    }

    fn layer_norm(&mut self, name: &str, n: usize, eps: f64, group: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            g: self.need(&format!("{name}.weight"), &[n], group)?,
            b: self.need(&format!("{name}.bias"), &[n], group)?,
            eps,
            group,
        })
    }
}

/// Reads a safetensors file into named tensors, with errors naming the file.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        Error::file(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })
}

impl BertClassifier {
    /// Builds the model from `cfg`, taking the weights from a safetensors checkpoint (or
    /// random ones). A missing or mis-shaped backbone tensor is an error naming the file and
    /// the tensor; the pooler and classifier are created when the checkpoint lacks them.
    pub fn load(
        cfg: &HfConfig,
        weights: Weights,
        num_labels: usize,
        pooling: Pooling,
        seed: u64,
        device: &Device,
    ) -> Result<Loaded> {
        use rand::SeedableRng;
        let (file, tensors) = match weights {
            Weights::Safetensors(p) => (Some(p), read_safetensors(p, device)?),
            Weights::Random => (None, HashMap::new()),
        };
        let prefix = if tensors.contains_key("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let h = cfg.hidden_size;
        let l = cfg.num_hidden_layers;
        let mut b = Builder {
            file,
            tensors,
            naming: Naming {
                prefix: prefix.to_string(),
            },
            store: ParamStore::new(l),
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_4ead),
            init_std: cfg.initializer_range,
            device: device.clone(),
        };
        let emb = ParamStore::EMBEDDINGS;
        let word = b.need(
            "embeddings.word_embeddings.weight",
            &[cfg.vocab_size, h],
            emb,
        )?;
        let pos = b.need(
            "embeddings.position_embeddings.weight",
            &[cfg.max_position_embeddings, h],
            emb,
        )?;
        let tok_type = b.need(
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size, h],
            emb,
        )?;
        let emb_ln = b.layer_norm("embeddings.LayerNorm", h, cfg.layer_norm_eps, emb)?;
        let mut layers = Vec::with_capacity(l);
        for i in 0..l {
            let g = ParamStore::layer_group(i);
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                q: b.linear(&format!("{p}.attention.self.query"), h, h, g)?,
                k: b.linear(&format!("{p}.attention.self.key"), h, h, g)?,
                v: b.linear(&format!("{p}.attention.self.value"), h, h, g)?,
                o: b.linear(&format!("{p}.attention.output.dense"), h, h, g)?,
                ln1: b.layer_norm(
                    &format!("{p}.attention.output.LayerNorm"),
                    h,
                    cfg.layer_norm_eps,
                    g,
                )?,
                inter: b.linear(
                    &format!("{p}.intermediate.dense"),
                    cfg.intermediate_size,
                    h,
                    g,
                )?,
                out: b.linear(&format!("{p}.output.dense"), h, cfg.intermediate_size, g)?,
                ln2: b.layer_norm(&format!("{p}.output.LayerNorm"), h, cfg.layer_norm_eps, g)?,
            });
        }
        let mut new_pooler = false;
        let pooler = if pooling == Pooling::Pooler {
            let g = b.store.pooler_group();
            let pw = format!("{prefix}pooler.dense.weight");
            let pb = format!("{prefix}pooler.dense.bias");
            let (w, n1) = b.optional(&pw, "bert.pooler.dense.weight", &[h, h], g)?;
            let (bias, n2) = b.optional(&pb, "bert.pooler.dense.bias", &[h], g)?;
            new_pooler = n1 || n2;
            Some(Linear {
                w,
                b: bias,
                group: g,
            })
        } else {
            None
        };
        let g = b.store.head_group();
        let (cw, n1) = b.optional(
            "classifier.weight",
            "classifier.weight",
            &[num_labels, h],
            g,
        )?;
        let (cb, n2) = b.optional("classifier.bias", "classifier.bias", &[num_labels], g)?;
        let classifier = Linear {
            w: cw,
            b: cb,
            group: g,
        };
        let classifier_dropout = cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout_prob);
        let model = BertClassifier {
            cfg: cfg.clone(),
            pooling,
            num_labels,
            classifier_dropout,
            word,
            pos,
            tok_type,
            emb_ln,
            layers,
            pooler,
            classifier,
            first_token_last_layer: true,
        };
        Ok(Loaded {
            model,
            params: b.store,
            new_head: n1 || n2,
            new_pooler,
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &HfConfig {
        &self.cfg
    }

    /// The pooling in use.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Number of outputs of the head.
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// Overrides the dropout rates (recipe keys `hidden_dropout_prob`,
    /// `attention_probs_dropout_prob`, `classifier_dropout`).
    pub fn set_dropout(&mut self, hidden: Option<f64>, attention: Option<f64>, cls: Option<f64>) {
        if let Some(p) = hidden {
            self.cfg.hidden_dropout_prob = p;
        }
        if let Some(p) = attention {
            self.cfg.attention_probs_dropout_prob = p;
        }
        if let Some(p) = cls {
            self.classifier_dropout = p;
        }
    }

    /// Whether [`Self::forward`] may compute the last layer's output for the `[CLS]` token
    /// only, when the pooling is `pooler` or `cls` (on by default; off gives the full
    /// computation, for comparison: same values, more work).
    pub fn set_first_token_last_layer(&mut self, on: bool) {
        self.first_token_last_layer = on;
    }

    /// The last hidden state, `(batch, seq, hidden)`.
    pub fn encode(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Tensor> {
        self.encode_layers(ctx, batch, false)
    }

    /// The last hidden state: `(batch, seq, hidden)`, or `(batch, 1, hidden)` (the `[CLS]`
    /// row) when `first_only`. Attention mixes tokens; everything after it in a layer (output
    /// projection, residual, layer norm, feed-forward) works on each token's row alone, so
    /// the last layer's `[CLS]` row needs the other rows only up to its attention: with
    /// `first_only` the rest of that layer runs on one row per sequence instead of `seq`,
    /// and its attention computes the `[CLS]` query's scores only.
    fn encode_layers(&self, ctx: &mut Ctx, batch: &Batch, first_only: bool) -> Result<Tensor> {
        let (bsz, seq) = batch.input_ids.dims2()?;
        let h = self.cfg.hidden_size;
        if seq > self.cfg.max_position_embeddings {
            return Err(Error::Msg(format!(
                "sequence of {seq} tokens is longer than the model's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let emb = ParamStore::EMBEDDINGS;
        let ids = batch.input_ids.flatten_all()?;
        let tt = batch.token_type_ids.flatten_all()?;
        let lookup = |table: Tensor, ids: &Tensor| -> Result<Tensor> {
            if ctx.fused() {
                embedding::embedding(&table, ids)
            } else {
                Ok(table.embedding(ids)?)
            }
        };
        let word = lookup(ctx.w(&self.word, emb), &ids)?;
        let tt = lookup(ctx.w(&self.tok_type, emb), &tt)?;
        let pos = ctx.w(&self.pos, emb).narrow(0, 0, seq)?;
        let x = (word + tt)?.reshape((bsz, seq, h))?.broadcast_add(&pos)?;
        let x = x.reshape((bsz * seq, h))?;
        let x = self.emb_ln.forward(ctx, &x)?;
        let mut x = ctx.dropout(&x, self.cfg.hidden_dropout_prob)?;

        // Additive mask: 0 for tokens, the most negative f32 for padding (as transformers).
        let key_bias =
            ((batch.attention_mask.ones_like()? - &batch.attention_mask)? * f32::MIN as f64)?;
        let bias = key_bias.reshape((bsz, 1, 1, seq))?;
        let nh = self.cfg.num_attention_heads;
        let dh = h / nh;
        let scale = 1.0 / (dh as f64).sqrt();
        let p_attn = self.cfg.attention_probs_dropout_prob;
        let last = self.layers.len().saturating_sub(1);
        let mut rows = seq;
        for (i, layer) in self.layers.iter().enumerate() {
            let first = first_only && i == last && seq > 1;
            let attn = if ctx.fused() {
                let qkv = layer.qkv(ctx, &x)?;
                let drop = ctx.dropout_seed(p_attn);
                if first {
                    // One row per sequence (the `[CLS]` query's).
                    attention::attention_first_query(&qkv, &key_bias, drop, nh)?
                } else {
                    attention::attention(&qkv, &key_bias, drop, nh)?
                }
            } else {
                // The composed reference (`FERROTUNE_NO_FUSED=1`).
                let heads = |t: Tensor| -> Result<Tensor> {
                    Ok(t.reshape((bsz, seq, nh, dh))?
                        .transpose(1, 2)?
                        .contiguous()?)
                };
                let q = heads(layer.q.forward(ctx, &x)?)?;
                let k = heads(layer.k.forward(ctx, &x)?)?;
                let v = heads(layer.v.forward(ctx, &x)?)?;
                let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
                let probs = softmax_last(&scores)?;
                let probs = match ctx.dropout_seed(p_attn) {
                    Some((p, seed)) => {
                        let mask = fused::dropout_mask(&[bsz, nh, seq, seq], seq * seq, p, seed)?;
                        (probs * mask.to_device(x.device())?)?
                    }
                    None => probs,
                };
                let attn = probs
                    .matmul(&v)?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((bsz * seq, h))?;
                if first {
                    first_rows(&attn, bsz, seq)?
                } else {
                    attn
                }
            };
            let residual = if first {
                rows = 1;
                first_rows(&x, bsz, seq)?
            } else {
                x
            };
            let attn = layer.o.forward(ctx, &attn)?;
            let x1 =
                layer
                    .ln1
                    .forward_residual(ctx, &attn, &residual, self.cfg.hidden_dropout_prob)?;
            let inter = match self.cfg.hidden_act.as_str() {
                "gelu_new" => layer.inter.forward(ctx, &x1)?.gelu()?,
                "relu" => layer.inter.forward(ctx, &x1)?.relu()?,
                // The exact GELU inside the linear op ([`linear::linear_gelu`]).
                _ if ctx.fused() => layer.inter.forward_gelu(ctx, &x1)?,
                _ => layer.inter.forward(ctx, &x1)?.gelu_erf()?,
            };
            let out = layer.out.forward(ctx, &inter)?;
            x = layer
                .ln2
                .forward_residual(ctx, &out, &x1, self.cfg.hidden_dropout_prob)?;
        }
        Ok(x.reshape((bsz, rows, h))?)
    }

    /// The pooled sequence representation, `(batch, hidden)`.
    pub fn pool(&self, ctx: &mut Ctx, batch: &Batch, hidden: &Tensor) -> Result<Tensor> {
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        match (&self.pooling, &self.pooler) {
            (Pooling::Pooler, Some(p)) => Ok(p.forward(ctx, &cls)?.tanh()?),
            (Pooling::Mean, _) => {
                let m = batch.attention_mask.unsqueeze(2)?;
                let sum = hidden.broadcast_mul(&m)?.sum(1)?;
                let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
                Ok(sum.broadcast_div(&count)?)
            }
            _ => Ok(cls),
        }
    }

    /// Logits `(batch, num_labels)`.
    ///
    /// With `pooler` or `cls` pooling only the last layer's `[CLS]` row reaches the head,
    /// so after the last attention that layer runs on that row alone (unless turned off by
    /// [`Self::set_first_token_last_layer`]): the same logits and gradients as the full
    /// layer (tested), without the `seq - 1` rows' output projection and feed-forward —
    /// about 12% of a MiniLM-L6 step's multiply-adds (128 tokens), 6% of bert-base's.
    pub fn forward(&self, ctx: &mut Ctx, batch: &Batch) -> Result<Tensor> {
        let first_only = self.first_token_last_layer && self.pooling != Pooling::Mean;
        let hidden = self.encode_layers(ctx, batch, first_only)?;
        let pooled = self.pool(ctx, batch, &hidden)?;
        let pooled = ctx.dropout(&pooled, self.classifier_dropout)?;
        self.classifier.forward(ctx, &pooled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batch::make_batch;
    use crate::data::batch::Features;
    use crate::testing::{write_tiny_model, TinySpec};
    use crate::train::loss::{LossConfig, Targets};
    use crate::train::trainer::{loss_and_grads, loss_and_grads_into};
    use rand::SeedableRng;

    fn batch() -> Batch {
        let a = Features {
            ids: vec![2, 5, 15, 8, 9, 3],
            type_ids: vec![0; 6],
        };
        let b = Features {
            ids: vec![2, 12, 3],
            type_ids: vec![0; 3],
        };
        make_batch(&[&a, &b], 0, &Device::Cpu).unwrap()
    }

    fn train_ctx<'a>(frozen: &'a [bool], rng: &'a mut ChaCha8Rng) -> Ctx<'a> {
        Ctx {
            train: true,
            frozen,
            rng: Some(rng),
        }
    }

    /// The gradient tests' setup: the tiny model with the pooler (its directory kept alive),
    /// targets for `batch()`, and no group frozen.
    fn gradient_setup() -> (tempfile::TempDir, Loaded, Targets, Vec<bool>) {
        let t = tempfile::tempdir().unwrap();
        write_tiny_model(t.path(), &TinySpec::default()).unwrap();
        let l = load(t.path(), Pooling::Pooler).unwrap();
        let y = Targets::Classes(Tensor::new(&[0u32, 2], &Device::Cpu).unwrap());
        let frozen = vec![false; l.params.num_groups()];
        (t, l, y, frozen)
    }

    fn load(dir: &Path, pooling: Pooling) -> Result<Loaded> {
        let cfg = HfConfig::from_dir(dir)?;
        BertClassifier::load(
            &cfg,
            Weights::Safetensors(&dir.join("model.safetensors")),
            3,
            pooling,
            1,
            &Device::Cpu,
        )
    }

    #[test]
    fn loads_with_and_without_bert_prefix_identically() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        write_tiny_model(&a, &TinySpec::default()).unwrap();
        write_tiny_model(
            &b,
            &TinySpec {
                prefix: true,
                ..Default::default()
            },
        )
        .unwrap();
        let la = load(&a, Pooling::Mean).unwrap();
        let lb = load(&b, Pooling::Mean).unwrap();
        let ha = la.model.encode(&mut Ctx::eval(), &batch()).unwrap();
        let hb = lb.model.encode(&mut Ctx::eval(), &batch()).unwrap();
        let d = (ha - hb).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        assert!(la.new_head);
    }

    #[test]
    fn padding_does_not_change_the_output() {
        let t = tempfile::tempdir().unwrap();
        write_tiny_model(t.path(), &TinySpec::default()).unwrap();
        for pooling in [Pooling::Pooler, Pooling::Cls, Pooling::Mean] {
            let m = load(t.path(), pooling).unwrap().model;
            let short = Features {
                ids: vec![2, 12, 3],
                type_ids: vec![0; 3],
            };
            let alone = make_batch(&[&short], 0, &Device::Cpu).unwrap();
            let alone = m.forward(&mut Ctx::eval(), &alone).unwrap();
            let padded = m.forward(&mut Ctx::eval(), &batch()).unwrap();
            let d = (alone.get(0).unwrap() - padded.get(1).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-5, "{pooling:?}: {d}");
        }
    }

    /// With the fused layers, every weight matrix, linear bias, encoder layer norm and
    /// embedding table gets its gradient from the gradient sink, not from candle's store
    /// (the point of the sink: the values are the same either way, so only this test
    /// notices if the sink stops being used).
    #[test]
    fn weight_gradients_go_through_the_sink() {
        let (_t, l, y, frozen) = gradient_setup();
        let tensors: Vec<_> = l
            .params
            .params
            .iter()
            .map(|p| Some(p.var.as_tensor()))
            .collect();
        let sink = grad_sink::GradSink::new(&tensors, vec![None; tensors.len()], false);
        let (_, sink) = fused::with_enabled(true, || {
            sink.run(|| {
                let mut rng = ChaCha8Rng::seed_from_u64(7);
                let logits = l
                    .model
                    .forward(&mut train_ctx(&frozen, &mut rng), &batch())
                    .unwrap();
                let loss =
                    crate::train::loss::compute(&LossConfig::default(), &logits, &y).unwrap();
                loss.backward().unwrap()
            })
        });
        let (_, wrote) = sink.into_parts();
        for (p, wrote) in l.params.params.iter().zip(wrote) {
            // Position embeddings are a slice of their table (candle's narrow), small.
            let matrix = p.var.rank() == 2 && !p.name.contains("position_embeddings");
            let linear_bias = p.name.ends_with(".bias") && !p.name.contains("LayerNorm");
            // The encoder layers' norms (fused with their residual sum), not the embeddings'.
            let layer_norm = p.name.contains("LayerNorm") && p.name.contains("layer.");
            if matrix || linear_bias || layer_norm {
                assert!(wrote, "{} did not go through the sink", p.name);
            }
        }
    }

    /// Gradient buffers kept from an earlier step are overwritten (the fused layers write
    /// weight gradients into them directly, see `grad_sink`), and added to when
    /// accumulating; with the fused layers on and off alike.
    #[test]
    fn gradient_buffers_are_overwritten_then_accumulated() {
        let (_t, l, y, frozen) = gradient_setup();
        for on in [true, false] {
            fused::with_enabled(on, || {
                let step = |out: &mut [Option<Vec<f32>>], add: bool| {
                    let mut rng = ChaCha8Rng::seed_from_u64(7);
                    let ctx = train_ctx(&frozen, &mut rng);
                    let cfg = LossConfig::default();
                    loss_and_grads_into(
                        &l.model,
                        &l.params,
                        &batch(),
                        &y,
                        &cfg,
                        1.0,
                        ctx,
                        out,
                        add,
                    )
                    .unwrap();
                };
                let mut want = vec![None; l.params.params.len()];
                step(&mut want, false);
                // Stale buffers of the right size, and one missing.
                let mut out: Vec<_> = want
                    .iter()
                    .map(|g| g.as_ref().map(|g| vec![1e3f32; g.len()]))
                    .collect();
                out[0] = None;
                step(&mut out, false);
                step(&mut out, false);
                let close = |a: &[Option<Vec<f32>>], k: f32| {
                    for ((p, a), b) in l.params.params.iter().zip(a).zip(&want) {
                        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                        let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                        let d = a
                            .iter()
                            .zip(b)
                            .fold(0f32, |m, (x, y)| m.max((x - k * y).abs()));
                        assert!(d < 1e-5 * scale, "fused {on}, {}: {d}", p.name);
                    }
                };
                close(&out, 1.0);
                step(&mut out, true);
                close(&out, 2.0);
            })
        }
    }

    /// The fused model (fused QKV projection, attention, linear layers with
    /// the intermediate GELU inside, embeddings, layer norm; the gradient sink)
    /// computes the same loss and gradients as the composition of candle operations, in
    /// training (same dropout masks: same seed) with padding, and the same logits at
    /// inference.
    #[test]
    fn fused_and_composed_models_agree() {
        let (_t, l, y, _) = gradient_setup();
        let run = |on: bool| fused::with_enabled(on, || training_step(&l, &y, 7));
        let (fused, composed) = (run(true), run(false));
        assert_steps_agree(
            &l.params,
            &fused,
            &composed,
            1e-5,
            1e-4,
            "fused vs composed",
        );
    }

    /// Loss, every gradient (nothing frozen, dropout seeded by `seed`) and the inference
    /// logits of one step of `l` on `batch()`.
    fn training_step(l: &Loaded, y: &Targets, seed: u64) -> (f32, Vec<Option<Vec<f32>>>, Vec<f32>) {
        let frozen = vec![false; l.params.num_groups()];
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (loss, grads) = loss_and_grads(
            &l.model,
            &l.params,
            &batch(),
            y,
            &LossConfig::default(),
            1.0,
            train_ctx(&frozen, &mut rng),
        )
        .unwrap();
        let logits = l.model.forward(&mut Ctx::eval(), &batch()).unwrap();
        let logits = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (loss, grads, logits)
    }

    /// Two [`training_step`]s agree: loss and logits within `tol`, every gradient within
    /// `grad_tol` relative to its largest element.
    fn assert_steps_agree(
        params: &ParamStore,
        (al, ag, ao): &(f32, Vec<Option<Vec<f32>>>, Vec<f32>),
        (bl, bg, bo): &(f32, Vec<Option<Vec<f32>>>, Vec<f32>),
        tol: f32,
        grad_tol: f32,
        what: &str,
    ) {
        assert!((al - bl).abs() < tol, "{what}: loss {al} vs {bl}");
        for (a, b) in ao.iter().zip(bo) {
            assert!((a - b).abs() < tol, "{what}: logits {ao:?} vs {bo:?}");
        }
        for ((p, a), b) in params.params.iter().zip(ag).zip(bg) {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                d < grad_tol * scale,
                "{what} {}: {d} (largest {scale})",
                p.name
            );
        }
    }

    /// The last layer run for the `[CLS]` row only gives the full layer's logits, loss and
    /// every gradient (dropout off: its masks depend on the tensor's shape), with padding,
    /// for both poolings that read `[CLS]`.
    #[test]
    fn first_token_last_layer_matches_the_full_layer() {
        let t = tempfile::tempdir().unwrap();
        write_tiny_model(t.path(), &TinySpec::default()).unwrap();
        let y = Targets::Classes(Tensor::new(&[0u32, 2], &Device::Cpu).unwrap());
        for pooling in [Pooling::Pooler, Pooling::Cls] {
            let run = |first_only: bool| {
                let mut l = load(t.path(), pooling).unwrap();
                l.model.set_dropout(Some(0.0), Some(0.0), Some(0.0));
                l.model.set_first_token_last_layer(first_only);
                (training_step(&l, &y, 3), l.params)
            };
            let ((first, params), (full, _)) = (run(true), run(false));
            let what = format!("{pooling:?}, first token vs full layer");
            assert_steps_agree(&params, &first, &full, 1e-5, 1e-5, &what);
        }
    }

    #[test]
    fn every_trainable_tensor_gets_a_gradient_and_frozen_ones_none() {
        let t = tempfile::tempdir().unwrap();
        write_tiny_model(t.path(), &TinySpec::default()).unwrap();
        for pooling in [Pooling::Pooler, Pooling::Mean] {
            let l = load(t.path(), pooling).unwrap();
            let y = Targets::Classes(Tensor::new(&[0u32, 2], &Device::Cpu).unwrap());
            let lc = LossConfig::default();
            let mut rng = ChaCha8Rng::seed_from_u64(0);
            // Nothing frozen: every tensor gets a non-zero gradient.
            let frozen = vec![false; l.params.num_groups()];
            let (_, grads) = loss_and_grads(
                &l.model,
                &l.params,
                &batch(),
                &y,
                &lc,
                1.0,
                train_ctx(&frozen, &mut rng),
            )
            .unwrap();
            for (p, g) in l.params.params.iter().zip(&grads) {
                let g = g
                    .as_ref()
                    .unwrap_or_else(|| panic!("{} got no gradient", p.name));
                assert!(
                    g.iter().any(|&x| x != 0.0),
                    "{} has a zero gradient",
                    p.name
                );
            }
            // Embeddings and the first layer frozen: they get none, the rest do.
            let mut frozen = vec![false; l.params.num_groups()];
            frozen[0] = true;
            frozen[1] = true;
            let (_, grads) = loss_and_grads(
                &l.model,
                &l.params,
                &batch(),
                &y,
                &lc,
                1.0,
                train_ctx(&frozen, &mut rng),
            )
            .unwrap();
            for (p, g) in l.params.params.iter().zip(&grads) {
                if p.group <= 1 {
                    assert!(g.is_none(), "{} is frozen but got a gradient", p.name);
                } else {
                    assert!(g.as_ref().unwrap().iter().any(|&x| x != 0.0), "{}", p.name);
                }
            }
        }
    }

    #[test]
    fn missing_and_misshaped_tensors_are_named() {
        let t = tempfile::tempdir().unwrap();
        write_tiny_model(t.path(), &TinySpec::default()).unwrap();
        let st = t.path().join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
        let name = "encoder.layer.1.attention.self.key.weight";
        let w = tensors.remove(name).unwrap();
        candle_core::safetensors::save(&tensors, &st).unwrap();
        let e = load(t.path(), Pooling::Cls).err().unwrap().to_string();
        assert!(e.contains("model.safetensors") && e.contains(name), "{e}");
        assert!(e.contains("missing"), "{e}");
        tensors.insert(name.to_string(), w.narrow(0, 0, 8).unwrap());
        candle_core::safetensors::save(&tensors, &st).unwrap();
        let e = load(t.path(), Pooling::Cls).err().unwrap().to_string();
        assert!(
            e.contains(name) && e.contains("shape [8, 16], expected [16, 16]"),
            "{e}"
        );
    }

    #[test]
    fn truncated_safetensors_is_an_error_naming_the_file() {
        let t = tempfile::tempdir().unwrap();
        write_tiny_model(t.path(), &TinySpec::default()).unwrap();
        let st = t.path().join("model.safetensors");
        let bytes = std::fs::read(&st).unwrap();
        std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
        let e = load(t.path(), Pooling::Cls).err().unwrap().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("truncated"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn dropout_is_seeded_and_only_in_training() {
        let t = tempfile::tempdir().unwrap();
        write_tiny_model(t.path(), &TinySpec::default()).unwrap();
        let m = load(t.path(), Pooling::Cls).unwrap().model;
        let run = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut ctx = Ctx {
                train: true,
                frozen: &[],
                rng: Some(&mut rng),
            };
            m.forward(&mut ctx, &batch())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        let e1 = m
            .forward(&mut Ctx::eval(), &batch())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_ne!(run(1), e1);
    }
}

//! MPNet with a sequence-classification head, as transformers'
//! `MPNetForSequenceClassification`: word + position embeddings (positions numbered from
//! the padding index, as RoBERTa; no token types) → layer norm → dropout → BERT-style
//! post-norm layers whose attention scores get a learned relative position bias (one
//! table of `relative_attention_num_buckets` × heads, shared by every layer) → the
//! first token → dropout → dense → tanh → dropout → out_proj.

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::families::encoder::{dropout, Embed, EncoderClassifier};
use crate::families::{pooling, HeadSpec, HfConfig, Loaded};
use crate::nn::encoder::{Encoder, EncoderConfig, LayerNames};
use crate::nn::head::{ClassificationHead, Dense};
use crate::nn::layers::{positions_after_padding, Activation, Embedding, LayerNorm};
use crate::nn::{Builder, Ctx, GroupKind, Init, TokenBatch, Weights};

use super::MpNet;

/// transformers' names for an MPNet layer's tensors.
pub const LAYER_NAMES: LayerNames = LayerNames {
    layer: "encoder.layer",
    q: "attention.attn.q",
    k: "attention.attn.k",
    v: "attention.attn.v",
    o: "attention.attn.o",
    ln1: "attention.LayerNorm",
    inter: "intermediate.dense",
    out: "output.dense",
    ln2: "output.LayerNorm",
};

/// MPNet's fields beyond the shared encoder's.
#[derive(Debug, Clone, Deserialize)]
pub struct MpNetExtra {
    /// Buckets of relative positions.
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
}

fn default_buckets() -> usize {
    32
}

/// The farthest relative position with a bucket of its own scale (transformers'
/// `max_distance`, fixed at 128 for MPNet).
const MAX_DISTANCE: i64 = 128;

/// The bucket of relative position `rel` (key position − query position), as
/// transformers' `MPNetEncoder.relative_position_bucket` computes it: half the buckets
/// for each direction; within one, exact buckets for distances below a quarter of the
/// buckets, then logarithmically larger ones up to `MAX_DISTANCE`. The logarithm runs in
/// f32, as PyTorch's does (a test checks every distance up to 600 against transformers').
pub fn relative_position_bucket(rel: i64, num_buckets: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let n = -rel;
    let mut ret = if n < 0 { half } else { 0 };
    let n = n.abs();
    let max_exact = half / 2;
    if n < max_exact {
        ret += n;
    } else {
        let ratio = ((n as f32) / (max_exact as f32)).ln()
            / ((MAX_DISTANCE as f64 / max_exact as f64).ln() as f32);
        let large = max_exact + (ratio * (half - max_exact) as f32) as i64;
        ret += large.min(half - 1);
    }
    ret as usize
}

/// MPNet's embeddings, and the relative position bias every layer's attention adds.
struct Embeddings {
    word: Embedding,
    pos: Embedding,
    ln: LayerNorm,
    dropout: f64,
    pad: u32,
    /// `(buckets, heads)`.
    relative_bias: Embedding,
    buckets: usize,
    heads: usize,
}

impl Embed for Embeddings {
    fn forward(&self, ctx: &mut Ctx, t: &TokenBatch) -> Result<Tensor> {
        let ids = &t.input_ids;
        let seq = ids.dim(1)?;
        let longest = self.pos.rows().saturating_sub(self.pad as usize + 1);
        if seq > longest {
            return Err(Error::Msg(format!(
                "sequence of {seq} tokens is longer than the model's {longest} positions"
            )));
        }
        let word = self.word.forward(ctx, ids)?;
        let pos = self
            .pos
            .forward(ctx, &positions_after_padding(ids, self.pad)?)?;
        let x = self.ln.forward(ctx, &(word + pos)?)?;
        ctx.dropout(&x, self.dropout)
    }

    /// `(heads, seq, seq)`: `bias[h, i, j]` is the table's entry for the bucket of
    /// `j − i`, head `h` (looked up through the embedding op, so its gradient reaches the
    /// table).
    fn position_bias(&self, ctx: &Ctx, seq: usize, device: &Device) -> Result<Option<Tensor>> {
        let ids: Vec<u32> = (0..seq * seq)
            .map(|k| {
                let (i, j) = ((k / seq) as i64, (k % seq) as i64);
                relative_position_bucket(j - i, self.buckets) as u32
            })
            .collect();
        let ids = Tensor::from_vec(ids, seq * seq, device)?;
        let v = self.relative_bias.forward(ctx, &ids)?; // (seq·seq, heads)
        Ok(Some(
            v.reshape((seq, seq, self.heads))?
                .permute((2, 0, 1))?
                .contiguous()?,
        ))
    }
}

/// Builds MPNet (see [`crate::families::Family::build`]).
pub fn build(
    cfg: &HfConfig,
    weights: &Weights,
    head: &HeadSpec,
    seed: u64,
    device: &Device,
) -> Result<Loaded> {
    let ec: EncoderConfig = cfg.parse()?;
    ec.validate(&cfg.path)?;
    let extra: MpNetExtra = cfg.parse()?;
    let buckets = extra.relative_attention_num_buckets;
    if buckets < 4 {
        return Err(Error::at(
            &cfg.path,
            None,
            Some("relative_attention_num_buckets"),
            "must be at least 4",
        ));
    }
    let pooling = pooling(&MpNet, head)?;
    let (h, heads) = (ec.hidden_size, ec.num_attention_heads);
    let drop = dropout(&ec, head, true);
    let init = ec.initializer_range;
    let probe = "embeddings.word_embeddings.weight";
    let mut b = Builder::new(weights, "mpnet.", probe, init, seed, device);
    let emb = b.group(GroupKind::Embeddings);
    let embeddings = Embeddings {
        word: b.embedding("embeddings.word_embeddings", ec.vocab_size, h, emb)?,
        pos: b.embedding(
            "embeddings.position_embeddings",
            ec.max_position_embeddings,
            h,
            emb,
        )?,
        ln: b.layer_norm("embeddings.LayerNorm", h, ec.layer_norm_eps, emb)?,
        dropout: drop.hidden,
        pad: ec.pad_token_id.unwrap_or(1),
        // The relative position bias belongs with the embeddings (below every layer,
        // shared by all of them); no weight decay, as transformers' Trainer skips every
        // tensor whose name contains "bias".
        relative_bias: Embedding {
            table: b.need(
                "encoder.relative_attention_bias.weight",
                &[buckets, heads],
                emb,
                Init::Normal,
                true,
            )?,
            group: emb,
        },
        buckets,
        heads,
    };
    let encoder = Encoder::build(&mut b, &ec, &LAYER_NAMES, drop)?;
    let hg = b.group(GroupKind::Head);
    let (dense, n1) = b.optional_linear("classifier.dense", "classifier.dense", h, h, hg)?;
    let n = head.num_labels;
    let (out, n2) = b.optional_linear("classifier.out_proj", "classifier.out_proj", n, h, hg)?;
    let head = ClassificationHead {
        dropout_first: true,
        dense: Some(Dense {
            linear: dense,
            act: Activation::Tanh,
        }),
        classifier: out,
        // transformers' MPNet head uses `hidden_dropout_prob`.
        dropout: head.classifier_dropout.unwrap_or(ec.hidden_dropout_prob),
    };
    let model = EncoderClassifier {
        embeddings: Box::new(embeddings),
        encoder,
        pooling,
        head,
        first_token_last_layer: true,
    };
    Ok(model.loaded(b.finish(), n1 || n2, Vec::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every relative position from −600 to 600 falls in the bucket transformers'
    /// `MPNetEncoder.relative_position_bucket(torch.arange(-600, 601), 32, 128)` gives
    /// (transformers 5.24, PyTorch 2.15), written as runs: `(first position, bucket)`.
    #[test]
    fn buckets_equal_transformers() {
        let runs: [(i64, usize); 31] = [
            (-600, 15),
            (-90, 14),
            (-63, 13),
            (-45, 12),
            (-31, 11),
            (-22, 10),
            (-15, 9),
            (-11, 8),
            (-7, 7),
            (-6, 6),
            (-5, 5),
            (-4, 4),
            (-3, 3),
            (-2, 2),
            (-1, 1),
            (0, 0),
            (1, 17),
            (2, 18),
            (3, 19),
            (4, 20),
            (5, 21),
            (6, 22),
            (7, 23),
            (8, 24),
            (12, 25),
            (16, 26),
            (23, 27),
            (32, 28),
            (46, 29),
            (64, 30),
            (91, 31),
        ];
        for rel in -600..=600i64 {
            let want = runs
                .iter()
                .rev()
                .find(|(start, _)| *start <= rel)
                .unwrap()
                .1;
            assert_eq!(relative_position_bucket(rel, 32), want, "position {rel}");
        }
    }
}

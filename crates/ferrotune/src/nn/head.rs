//! Sequence-classification heads: pooling the encoder's hidden states into one vector per
//! sequence, then the layers that turn it into logits. The heads of transformers' encoder
//! families are three arrangements of the same parts, all built here:
//!
//! | family | `pooling` | head |
//! |---|---|---|
//! | BERT | `pooler` | `tanh(pooler(h[CLS]))` → dropout → classifier |
//! | BERT | `cls`, `mean` | pooled → dropout → classifier |
//! | RoBERTa, MPNet | `cls`, `mean` | dropout → dense → tanh → dropout → out_proj |
//! | DistilBERT | `cls`, `mean` | `relu(pre_classifier(pooled))` → dropout → classifier |

use candle_core::Tensor;

use crate::error::Result;
use crate::nn::layers::{Activation, Linear};
use crate::nn::Ctx;

/// How the sequence representation fed to the head is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// BERT's pooler: dense + tanh on the `[CLS]` hidden state (what transformers does).
    Pooler,
    /// The first (`[CLS]` / `<s>`) hidden state itself.
    Cls,
    /// The mean of the hidden states of the non-padding tokens.
    Mean,
    /// The last non-padding token's hidden state (decoders' classifiers, as transformers'
    /// `LlamaForSequenceClassification`).
    Last,
}

impl std::str::FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pooler" => Ok(Pooling::Pooler),
            "cls" => Ok(Pooling::Cls),
            "mean" => Ok(Pooling::Mean),
            "last" => Ok(Pooling::Last),
            _ => Err(format!(
                "unknown pooling `{s}` (expected pooler, cls, mean or last)"
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
            Pooling::Last => "last",
        }
    }

    /// True when only the first token's hidden state is read (so the last layer may run
    /// for that row alone).
    pub fn reads_first_token_only(self) -> bool {
        matches!(self, Pooling::Pooler | Pooling::Cls)
    }

    /// The pooled representation `(batch, hidden)` of `hidden` `(batch, seq, hidden)` (or
    /// `(batch, 1, hidden)` when only the first row was computed) under padding mask
    /// `attention_mask` `(batch, seq)`. `Pooler` gives the first row: the pooler's dense
    /// layer belongs to the head.
    pub fn pool(self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        match self {
            Pooling::Mean => {
                let m = attention_mask.unsqueeze(2)?;
                let sum = hidden.broadcast_mul(&m)?.sum(1)?;
                let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
                Ok(sum.broadcast_div(&count)?)
            }
            Pooling::Pooler | Pooling::Cls => Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?),
            Pooling::Last => {
                let (b, s, h) = hidden.dims3()?;
                crate::nn::decoder::last_token_rows(&hidden.reshape((b * s, h))?, attention_mask)
            }
        }
    }
}

/// A dense layer with its activation inside a head.
pub struct Dense {
    /// The layer.
    pub linear: Linear,
    /// Its activation.
    pub act: Activation,
}

/// A classification (or regression) head (see the module documentation).
pub struct ClassificationHead {
    /// Dropout before `dense` (RoBERTa, MPNet).
    pub dropout_first: bool,
    /// The dense layer between pooling and classifier, if any.
    pub dense: Option<Dense>,
    /// The output layer, `(num_labels, hidden)`.
    pub classifier: Linear,
    /// The head's dropout probability.
    pub dropout: f64,
}

impl ClassificationHead {
    /// Logits `(batch, num_labels)` from the pooled representation `(batch, hidden)`.
    pub fn forward(&self, ctx: &mut Ctx, pooled: &Tensor) -> Result<Tensor> {
        let mut x = pooled.clone();
        if self.dropout_first {
            x = ctx.dropout(&x, self.dropout)?;
        }
        if let Some(d) = &self.dense {
            x = d.act.apply(&d.linear.forward(ctx, &x)?)?;
        }
        let x = ctx.dropout(&x, self.dropout)?;
        self.classifier.forward(ctx, &x)
    }
}

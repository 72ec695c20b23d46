//! What a model takes as input: one batch, already padded and on the device.

use candle_core::Tensor;

use crate::error::Result;

/// A batch of token sequences, padded to the longest of them.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// `(batch, seq)` u32 token ids.
    pub input_ids: Tensor,
    /// `(batch, seq)` u32 segment ids (zeros for families without token types).
    pub token_type_ids: Tensor,
    /// `(batch, seq)` f32: 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
}

/// One batch of model input. Text families take [`Batch::Tokens`]; image families will
/// take pixels, in a variant of their own.
#[derive(Debug, Clone)]
pub enum Batch {
    /// Token ids with their segments and padding mask.
    Tokens(TokenBatch),
}

impl Batch {
    /// The token batch, or an error for a model that reads tokens given something else.
    pub fn tokens(&self) -> Result<&TokenBatch> {
        match self {
            Batch::Tokens(t) => Ok(t),
        }
    }

    /// Number of examples.
    pub fn len(&self) -> Result<usize> {
        match self {
            Batch::Tokens(t) => Ok(t.input_ids.dim(0)?),
        }
    }

    /// True when the batch holds no example.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

impl From<TokenBatch> for Batch {
    fn from(t: TokenBatch) -> Batch {
        Batch::Tokens(t)
    }
}

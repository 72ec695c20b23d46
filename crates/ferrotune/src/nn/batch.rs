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

/// A batch of images, transformed and normalised, channels last.
#[derive(Debug, Clone)]
pub struct PixelBatch {
    /// `(batch, height, width, channels)` f32.
    pub pixels: Tensor,
}

/// One batch of model input. Text families take [`Batch::Tokens`], image families
/// [`Batch::Pixels`].
#[derive(Debug, Clone)]
pub enum Batch {
    /// Token ids with their segments and padding mask.
    Tokens(TokenBatch),
    /// Images.
    Pixels(PixelBatch),
}

impl Batch {
    /// The token batch, or an error for a model that reads tokens given something else.
    pub fn tokens(&self) -> Result<&TokenBatch> {
        match self {
            Batch::Tokens(t) => Ok(t),
            Batch::Pixels(_) => Err(crate::error::Error::Msg(
                "this model reads text, and was given images".into(),
            )),
        }
    }

    /// The image batch, or an error for a model that reads images given something else.
    pub fn pixels(&self) -> Result<&PixelBatch> {
        match self {
            Batch::Pixels(p) => Ok(p),
            Batch::Tokens(_) => Err(crate::error::Error::Msg(
                "this model reads images, and was given text".into(),
            )),
        }
    }

    /// Number of examples.
    pub fn len(&self) -> Result<usize> {
        match self {
            Batch::Tokens(t) => Ok(t.input_ids.dim(0)?),
            Batch::Pixels(p) => Ok(p.pixels.dim(0)?),
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

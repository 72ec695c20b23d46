//! The input encoder: what turns examples into a model's input. The trainer, predictor
//! and server hold a `Box<dyn InputEncoder>` and never a tokenizer of their own, so a
//! family with another kind of input (pictures) brings its own encoder.

use candle_core::Device;
use tokenizers::Tokenizer;

use crate::data::batch::{make_batch, pad_id, tokenize, Features};
use crate::data::reader::Example;
use crate::data::tokenizer::load_tokenizer;
use crate::error::Result;
use crate::nn::Batch;

/// Examples in, batches out.
pub trait InputEncoder: Send + Sync {
    /// The items of `examples`, in order (tokenized once, up front).
    fn encode(&self, examples: &[Example]) -> Result<Vec<Features>>;

    /// One batch of `items`, padded to the longest (dynamic padding).
    fn collate(&self, items: &[&Features], device: &Device) -> Result<Batch>;

    /// An item's cost (its tokens), for length grouping and the server's batches.
    fn cost(&self, item: &Features) -> usize {
        item.ids.len()
    }

    /// The longest input, in tokens.
    fn max_len(&self) -> usize;

    /// The tokenizer, for the export and for telling a client its input's length.
    fn tokenizer(&self) -> &Tokenizer;
}

/// Text through a Hugging Face tokenizer: every text family's encoder.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    pad: u32,
    max_len: usize,
}

impl TextEncoder {
    /// The tokenizer of model directory `dir`, truncating to `max_len` tokens.
    pub fn load(dir: &std::path::Path, max_len: usize) -> Result<TextEncoder> {
        Ok(TextEncoder::new(load_tokenizer(dir, max_len)?, max_len))
    }

    /// An encoder over `tokenizer` (already truncating to `max_len`).
    pub fn new(tokenizer: Tokenizer, max_len: usize) -> TextEncoder {
        TextEncoder {
            pad: pad_id(&tokenizer),
            tokenizer,
            max_len,
        }
    }

    /// The padding id.
    pub fn pad(&self) -> u32 {
        self.pad
    }
}

impl InputEncoder for TextEncoder {
    fn encode(&self, examples: &[Example]) -> Result<Vec<Features>> {
        tokenize(&self.tokenizer, examples)
    }

    fn collate(&self, items: &[&Features], device: &Device) -> Result<Batch> {
        make_batch(items, self.pad, device)
    }

    fn max_len(&self) -> usize {
        self.max_len
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

//! Tokenization and batching: examples become token ids once, then each batch is padded
//! to its own longest sequence (dynamic padding), not to `max_seq_length`.

use candle_core::{Device, Tensor};
use tokenizers::{EncodeInput, Tokenizer};

use crate::data::reader::Example;
use crate::error::{Error, Result};
use crate::models::Batch;

/// One tokenized example (unpadded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    /// Token ids, special tokens included, truncated to the tokenizer's maximum.
    pub ids: Vec<u32>,
    /// Segment ids.
    pub type_ids: Vec<u32>,
}

/// Tokenizes the texts (and text pairs) of `examples`.
pub fn tokenize(tok: &Tokenizer, examples: &[Example]) -> Result<Vec<Features>> {
    let inputs: Vec<EncodeInput> = examples
        .iter()
        .map(|e| match &e.text_pair {
            Some(p) => (e.text.as_str(), p.as_str()).into(),
            None => e.text.as_str().into(),
        })
        .collect();
    let enc = tok
        .encode_batch(inputs, true)
        .map_err(|e| Error::Msg(format!("tokenization failed: {e}")))?;
    Ok(enc
        .into_iter()
        .map(|e| Features {
            ids: e.get_ids().to_vec(),
            type_ids: e.get_type_ids().to_vec(),
        })
        .collect())
}

/// The id used for padding: the tokenizer's `[PAD]`, else `<pad>`, else 0.
pub fn pad_id(tok: &Tokenizer) -> u32 {
    tok.token_to_id("[PAD]")
        .or_else(|| tok.token_to_id("<pad>"))
        .unwrap_or(0)
}

/// Pads `feats` to the longest of them and builds the model's input tensors.
pub fn make_batch(feats: &[&Features], pad: u32, device: &Device) -> Result<Batch> {
    let b = feats.len();
    let s = feats.iter().map(|f| f.ids.len()).max().unwrap_or(0).max(1);
    let mut ids = vec![pad; b * s];
    let mut types = vec![0u32; b * s];
    let mut mask = vec![0f32; b * s];
    for (i, f) in feats.iter().enumerate() {
        let row = i * s;
        ids[row..row + f.ids.len()].copy_from_slice(&f.ids);
        types[row..row + f.type_ids.len()].copy_from_slice(&f.type_ids);
        mask[row..row + f.ids.len()].fill(1.0);
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, s), device)?,
        token_type_ids: Tensor::from_vec(types, (b, s), device)?,
        attention_mask: Tensor::from_vec(mask, (b, s), device)?,
    })
}

/// Batches of indices for inference: examples sorted by length (so each batch pads
/// little), `batch_size` at a time. The caller puts results back in input order.
pub fn length_sorted_batches(feats: &[Features], batch_size: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..feats.len()).collect();
    order.sort_by_key(|&i| (feats[i].ids.len(), i));
    order
        .chunks(batch_size.max(1))
        .map(|c| c.to_vec())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_to_longest_in_batch() {
        let a = Features {
            ids: vec![101, 7, 102],
            type_ids: vec![0, 0, 0],
        };
        let b = Features {
            ids: vec![101, 102],
            type_ids: vec![0, 0],
        };
        let batch = make_batch(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(batch.input_ids.dims(), &[2, 3]);
        assert_eq!(
            batch.input_ids.to_vec2::<u32>().unwrap(),
            vec![vec![101, 7, 102], vec![101, 102, 0]]
        );
        assert_eq!(
            batch.attention_mask.to_vec2::<f32>().unwrap(),
            vec![vec![1., 1., 1.], vec![1., 1., 0.]]
        );
        let order = length_sorted_batches(&[a, b], 1);
        assert_eq!(order, vec![vec![1], vec![0]]);
    }
}

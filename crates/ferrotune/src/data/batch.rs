//! Tokenization and batching: examples become token ids once, then each batch is padded
//! to its own longest sequence (dynamic padding), not to `max_seq_length`.

use candle_core::{Device, Tensor};
use tokenizers::{EncodeInput, Encoding, Tokenizer};

use crate::data::reader::Example;
use crate::error::{Error, Result};
use crate::nn::{Batch, TokenBatch};

/// One tokenized example (unpadded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    /// Token ids, special tokens included, truncated to the tokenizer's maximum.
    pub ids: Vec<u32>,
    /// Segment ids.
    pub type_ids: Vec<u32>,
    /// The decoded image, for image models (no tokens then).
    pub image: Option<crate::data::image::Image>,
}

/// Tokenizes the texts (and text pairs) of `examples`.
pub fn tokenize(tok: &Tokenizer, examples: &[Example]) -> Result<Vec<Features>> {
    let texts: Vec<(&str, Option<&str>)> = examples
        .iter()
        .map(|e| (e.text.as_str(), e.text_pair.as_deref()))
        .collect();
    let enc =
        encode_clipped(tok, &texts).map_err(|e| Error::Msg(format!("tokenization failed: {e}")))?;
    Ok(enc
        .into_iter()
        .map(|e| Features {
            ids: e.get_ids().to_vec(),
            type_ids: e.get_type_ids().to_vec(),
            image: None,
        })
        .collect())
}

/// Characters of a text tokenized per token kept, at most: a longer text is cut there
/// (back to a space) before tokenizing, so that a 50 MB line costs what its first tokens
/// cost, not gigabytes of offsets for tokens that truncation then drops.
pub const CHARS_PER_TOKEN: usize = 64;

/// Characters per token of the first, short clip that [`encode_clipped`] tries: English
/// text averages 4-5 per token (MiniLM's WordPiece on BBC News: 4.7, spaces counted), so
/// this prefix nearly always holds more tokens than truncation keeps, and one encoding of
/// it replaces one of the whole text (a BBC article, 2.2 kB on average, took 1.6 ms to
/// tokenize whole, ~5% of a 2-core server's CPU under load).
pub const SHORT_CHARS_PER_TOKEN: usize = 8;

/// Bytes between the end of the last token kept and the cut of a short prefix, at least,
/// for the prefix's encoding to stand for the whole text's.
const CUT_MARGIN: usize = 128;

/// `text` cut to what `max_tokens` tokens can need (see [`CHARS_PER_TOKEN`]), at the last
/// whitespace before the cut when there is one in its second half.
pub fn clip_text(text: &str, max_tokens: usize) -> &str {
    let cap = max_tokens.saturating_mul(CHARS_PER_TOKEN).max(1024);
    if text.len() <= cap {
        return text; // bytes bound chars
    }
    let end = text.char_indices().nth(cap).map_or(text.len(), |(i, _)| i);
    let cut = &text[..end];
    match cut.rfind(char::is_whitespace) {
        Some(i) if i > end / 2 => &cut[..i],
        _ => cut,
    }
}

/// The first `max_tokens · SHORT_CHARS_PER_TOKEN` characters of `text`, ended before the
/// last whitespace in them, when `text` is longer and that whitespace is in their second
/// half; else `None`. Cut between words, a word-local tokenizer (WordPiece, byte-level
/// BPE: their pre-tokenizers split at whitespace first) gives the prefix's tokens as the
/// first tokens of the whole text.
fn short_clip(text: &str, max_tokens: usize) -> Option<&str> {
    let cap = max_tokens.saturating_mul(SHORT_CHARS_PER_TOKEN);
    if text.len() <= cap {
        return None; // bytes bound chars
    }
    let (end, _) = text.char_indices().nth(cap)?;
    match text[..end].rfind(char::is_whitespace) {
        Some(i) if i > end / 2 => Some(&text[..i]),
        _ => None,
    }
}

/// True when `e`, the truncated encoding of `prefix` (from [`short_clip`]), is the whole
/// text's: truncation cut it (the prefix holds more tokens than are kept) and the kept
/// tokens end [`CUT_MARGIN`] bytes before the cut, so they are the whole text's first ones
/// (the margin keeps the cut's neighbourhood out of them, for a tokenizer whose pieces
/// could reach across whitespace).
fn stands_for_whole(e: &Encoding, prefix: &str) -> bool {
    let kept_end = e.get_offsets().iter().map(|o| o.1).max().unwrap_or(0);
    !e.get_overflowing().is_empty() && kept_end + CUT_MARGIN <= prefix.len()
}

/// Encodes `(text, text pair)` inputs with `tok`'s truncation, clipping long texts first.
/// The result is the same as encoding the whole texts:
/// - a single text first tries a short prefix cut between words ([`short_clip`]); its
///   encoding is kept when truncation cut it (tokens to spare past the budget), else the
///   text goes on as below;
/// - a text is clipped ([`clip_text`]) only when its clipped part alone still fills the
///   token budget (so truncation, pair truncation included, keeps the same tokens); a text
///   of long runs of spaces or symbols is encoded whole.
pub fn encode_clipped(
    tok: &Tokenizer,
    texts: &[(&str, Option<&str>)],
) -> tokenizers::Result<Vec<Encoding>> {
    let Some(max) = tok.get_truncation().map(|t| t.max_length) else {
        let inputs: Vec<EncodeInput> = texts.iter().map(|&t| input(t)).collect();
        return tok.encode_batch(inputs, true);
    };
    let side = |t: &str| -> tokenizers::Result<bool> {
        let c = clip_text(t, max);
        Ok(c.len() < t.len() && tok.encode(c, false)?.get_ids().len() >= max)
    };
    let mut done: Vec<Option<Encoding>> = Vec::with_capacity(texts.len());
    let mut inputs: Vec<EncodeInput> = Vec::new();
    for &(a, b) in texts {
        if let (Some(c), None) = (short_clip(a, max), b) {
            let e = tok.encode(c, true)?;
            if stands_for_whole(&e, c) {
                done.push(Some(e));
                continue;
            }
        }
        let a = if side(a)? { clip_text(a, max) } else { a };
        let b = match b {
            Some(b) if side(b)? => Some(clip_text(b, max)),
            b => b,
        };
        inputs.push(input((a, b)));
        done.push(None);
    }
    let mut rest = tok.encode_batch(inputs, true)?.into_iter();
    done.into_iter()
        .map(|d| match d {
            Some(e) => Ok(e),
            None => rest
                .next()
                .ok_or_else(|| "tokenizer: fewer encodings than inputs".into()),
        })
        .collect()
}

fn input<'a>((a, b): (&'a str, Option<&'a str>)) -> EncodeInput<'a> {
    match b {
        Some(b) => (a, b).into(),
        None => a.into(),
    }
}

/// The id used for padding: the tokenizer's `[PAD]`, else `<pad>`, else 0.
pub fn pad_id(tok: &Tokenizer) -> u32 {
    tok.token_to_id("[PAD]")
        .or_else(|| tok.token_to_id("<pad>"))
        .unwrap_or(0)
}

/// The order of transformers' `LengthGroupedSampler` (`group_by_length`), from an already
/// shuffled `order`: cut into mega-batches of `m · batch_size` examples, with
/// `m = min(n / (4 · batch_size), 50)` (at least 1), each sorted by length, longest first
/// (stable), and the longest example of all moved to the very first place (so a run that
/// runs out of memory does so at once). `lengths[i]` is example `i`'s token count.
pub fn group_by_length(order: &[usize], lengths: &[usize], batch_size: usize) -> Vec<usize> {
    let bs = batch_size.max(1);
    let mult = (order.len() / (bs * 4)).clamp(1, 50);
    let mut megas: Vec<Vec<usize>> = order
        .chunks(mult * bs)
        .map(|c| {
            let mut v = c.to_vec();
            v.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            v
        })
        .collect();
    // First index of the largest head (as torch.argmax: the first maximum).
    let longest = (0..megas.len()).fold(0, |best, k| {
        if lengths[megas[k][0]] > lengths[megas[best][0]] {
            k
        } else {
            best
        }
    });
    if longest != 0 {
        let (a, b) = (megas[0][0], megas[longest][0]);
        megas[0][0] = b;
        megas[longest][0] = a;
    }
    megas.concat()
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
    Ok(Batch::Tokens(TokenBatch {
        input_ids: Tensor::from_vec(ids, (b, s), device)?,
        token_type_ids: Tensor::from_vec(types, (b, s), device)?,
        attention_mask: Tensor::from_vec(mask, (b, s), device)?,
    }))
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

    /// The tokenizers of tiny BERT and RoBERTa models (WordPiece, byte-level BPE) written
    /// under `t`, truncating to `max` tokens, with their family names.
    fn tiny_tokenizers(t: &std::path::Path, max: usize) -> Vec<(&'static str, Tokenizer)> {
        ["bert", "roberta"]
            .into_iter()
            .map(|family| {
                let dir = t.join(family);
                let spec = crate::testing::TinySpec::of(family);
                crate::testing::write_tiny_model(&dir, &spec).unwrap();
                let tok = crate::data::tokenizer::load_tokenizer(&dir, max).unwrap();
                (family, tok)
            })
            .collect()
    }

    #[test]
    fn clipping_long_texts_changes_no_token() {
        let t = tempfile::tempdir().unwrap();
        let max = 16;
        for (family, tok) in tiny_tokenizers(t.path(), max) {
            // Long enough to be clipped (over 1024 characters), short enough for the
            // reference: tokenizers' pair truncation makes every overflow combination.
            let words = "the film was good and the plot was fine . ".repeat(100);
            let spaces = format!("good{}fine film", " ".repeat(1500));
            let long_word = format!("{} good film", "x".repeat(3000));
            // Long words (few per short prefix) and other whitespace between words.
            let long_words = "supercalifragilistic expialidocious ".repeat(60);
            let lines = "good\tfilm\nthe plot,\r\nfine!  ".repeat(120);
            let cases: Vec<(&str, Option<&str>)> = vec![
                (&words, None),
                (&long_words, None),
                (&lines, None),
                (&spaces, None),
                (&long_word, None),
                ("good film", Some(&words)),
                (&words, Some(&spaces)),
                ("short", None),
            ];
            assert!(clip_text(&words, max).len() < words.len());
            let got = encode_clipped(&tok, &cases).unwrap();
            for (i, &(a, b)) in cases.iter().enumerate() {
                let whole = tok.encode(input((a, b)), true).unwrap();
                assert_eq!(got[i].get_ids(), whole.get_ids(), "{family} case {i}");
                assert_eq!(
                    got[i].get_type_ids(),
                    whole.get_type_ids(),
                    "{family} case {i}"
                );
            }
        }
    }

    #[test]
    fn a_short_prefix_stands_for_a_long_text_when_its_tokens_reach_past_the_budget() {
        let t = tempfile::tempdir().unwrap();
        let max = 64;
        for (family, tok) in tiny_tokenizers(t.path(), max) {
            let words = "the film was good and the plot was fine . ".repeat(40);
            // The short prefix is taken for this text: truncated, the kept tokens end
            // more than CUT_MARGIN bytes before the cut.
            let c = short_clip(&words, max).unwrap();
            let e = tok.encode(c, true).unwrap();
            let kept_end = e.get_offsets().iter().map(|o| o.1).max().unwrap();
            assert!(!e.get_overflowing().is_empty(), "{family}");
            assert!(
                kept_end + CUT_MARGIN <= c.len(),
                "{family}: {kept_end} of {}",
                c.len()
            );
            assert!(stands_for_whole(&e, c), "{family}");
            // Taken or not, the tokens are the whole text's.
            let few_words = "supercalifragilistic expialidocious ".repeat(30);
            for text in [&words, &few_words] {
                let got = encode_clipped(&tok, &[(text.as_str(), None)]).unwrap();
                let whole = tok.encode(text.as_str(), true).unwrap();
                assert_eq!(got[0].get_ids(), whole.get_ids(), "{family}");
                assert_eq!(got[0].get_type_ids(), whole.get_type_ids(), "{family}");
            }
        }
    }

    #[test]
    fn pads_to_longest_in_batch() {
        let a = Features {
            ids: vec![101, 7, 102],
            type_ids: vec![0, 0, 0],
            image: None,
        };
        let b = Features {
            ids: vec![101, 102],
            type_ids: vec![0, 0],
            image: None,
        };
        let batch = make_batch(&[&a, &b], 0, &Device::Cpu).unwrap();
        let batch = batch.tokens().unwrap();
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

    /// The order is a permutation, sorted longest first within each mega-batch, the
    /// longest example first of all; small inputs form one mega-batch.
    #[test]
    fn group_by_length_sorts_within_mega_batches() {
        let n = 1000;
        let lengths: Vec<usize> = (0..n).map(|i| (i * 7919) % 257 + 3).collect();
        let order: Vec<usize> = (0..n).map(|i| (i * 613) % n).collect();
        let g = group_by_length(&order, &lengths, 4);
        let mut sorted = g.clone();
        sorted.sort();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        // m = min(1000 / 16, 50) = 50: mega-batches of 200.
        let longest = lengths.iter().max().unwrap();
        assert_eq!(lengths[g[0]], *longest);
        for (k, mega) in g.chunks(200).enumerate() {
            let l: Vec<usize> = mega.iter().map(|&i| lengths[i]).collect();
            // Sorted descending after the head (the heads of the first mega-batch and of
            // the one holding the longest example are swapped).
            assert!(l[1..].windows(2).all(|w| w[0] >= w[1]), "mega-batch {k}");
            let mut want: Vec<usize> = order[k * 200..(k + 1) * 200].to_vec();
            want.sort();
            let mut got = mega.to_vec();
            got.sort();
            if k != 0 {
                // Mega-batches other than the first and the one that gave up its head
                // hold exactly their slice of the shuffled order.
                let gave = order[k * 200..(k + 1) * 200].contains(&g[0]);
                if !gave {
                    assert_eq!(got, want, "mega-batch {k}");
                }
            }
        }
        assert_eq!(group_by_length(&[2, 0, 1], &[5, 9, 7], 8), vec![1, 2, 0]);
        assert!(group_by_length(&[], &[], 8).is_empty());
    }
}

//! Loading the tokenizer of a pretrained model directory.
//!
//! `tokenizer.json` is used when present (byte-for-byte the tokenization Python's
//! `tokenizers` gives); otherwise a BERT WordPiece tokenizer is built from `vocab.txt`.
//! Any padding or truncation baked into the file is replaced: ferrotune truncates to the
//! recipe's `max_seq_length` and pads each batch itself (dynamic padding).

use std::path::Path;

use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{Error, Result};

/// Loads the tokenizer of model directory `dir`, truncating to `max_len` tokens.
///
/// `max_len` must be at least [`crate::config::MIN_SEQ_LENGTH`]: with less room than the
/// special tokens need, `tokenizers` returns the sequence untruncated.
pub fn load_tokenizer(dir: &Path, max_len: usize) -> Result<Tokenizer> {
    let json = dir.join("tokenizer.json");
    if max_len < crate::config::MIN_SEQ_LENGTH {
        return Err(Error::file(
            dir,
            format!(
                "maximum sequence length {max_len} is too short: at least {} is needed",
                crate::config::MIN_SEQ_LENGTH
            ),
        ));
    }
    let mut tok = if json.exists() {
        Tokenizer::from_file(&json).map_err(|e| Error::file(&json, format!("{e}")))?
    } else {
        let vocab = dir.join("vocab.txt");
        if !vocab.exists() {
            return Err(Error::file(
                dir,
                "neither tokenizer.json nor vocab.txt found in the model directory",
            ));
        }
        from_vocab(&vocab, lower_case(dir))?
    };
    tok.with_padding(None);
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| Error::file(&json, format!("cannot set truncation: {e}")))?;
    Ok(tok)
}

/// `do_lower_case` from `tokenizer_config.json` (default true, as for uncased BERT).
fn lower_case(dir: &Path) -> bool {
    let path = dir.join("tokenizer_config.json");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v.get("do_lower_case").and_then(|b| b.as_bool()))
        .unwrap_or(true)
}

/// A BERT tokenizer (normaliser, pre-tokenizer, WordPiece, `[CLS] … [SEP]`) from `vocab.txt`.
pub fn from_vocab(vocab: &Path, lowercase: bool) -> Result<Tokenizer> {
    let wp = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| Error::file(vocab, format!("cannot read vocabulary: {e}")))?;
    let mut tok = Tokenizer::new(wp);
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| Error::file(vocab, format!("vocabulary has no `{t}` token")))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    tok.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    Ok(tok)
}

//! Loading the tokenizer of a pretrained model directory.
//!
//! `tokenizer.json` is used when present (byte-for-byte the tokenization Python's
//! `tokenizers` gives). Otherwise one is built from the slow tokenizer's files: a byte-level
//! BPE from `vocab.json` + `merges.txt` (RoBERTa, GPT-2), or a WordPiece from `vocab.txt`
//! (BERT, DistilBERT, MPNet), whose special tokens and template (`[CLS] A [SEP]` or
//! `<s> A </s>`) come from `tokenizer_config.json`.
//! Any padding or truncation baked into the file is replaced: ferrotune truncates to the
//! recipe's `max_seq_length` and pads each batch itself (dynamic padding).

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{Error, Result};

/// The shortest truncation length (`max_seq_length`): a text pair needs three special
/// tokens and one token of text. Below it the tokenizer would not truncate at all (found
/// by fuzzing).
pub const MIN_SEQ_LENGTH: usize = 4;

/// Loads the tokenizer of model directory `dir`, truncating to `max_len` tokens.
///
/// `max_len` must be at least [`MIN_SEQ_LENGTH`]: with less room than the special tokens
/// need, `tokenizers` returns the sequence untruncated.
pub fn load_tokenizer(dir: &Path, max_len: usize) -> Result<Tokenizer> {
    let json = dir.join("tokenizer.json");
    if max_len < MIN_SEQ_LENGTH {
        return Err(Error::file(
            dir,
            format!(
                "maximum sequence length {max_len} is too short: at least {MIN_SEQ_LENGTH} is needed"
            ),
        ));
    }
    let mut tok = if json.exists() {
        Tokenizer::from_file(&json).map_err(|e| Error::file(&json, format!("{e}")))?
    } else if dir.join("vocab.json").exists() && dir.join("merges.txt").exists() {
        from_bpe_files(dir)?
    } else {
        let vocab = dir.join("vocab.txt");
        if !vocab.exists() {
            return Err(Error::file(
                dir,
                "no tokenizer in the model directory (tokenizer.json, vocab.json + merges.txt, \
                 or vocab.txt)",
            ));
        }
        let settings = TokenizerSettings::read(dir);
        from_vocab_with(&vocab, &settings)?
    };
    tok.with_padding(None);
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        ..Default::default()
    }))
    .map_err(|e| Error::file(&json, format!("cannot set truncation: {e}")))?;
    Ok(tok)
}

/// What `tokenizer_config.json` says about a slow tokenizer.
struct TokenizerSettings {
    /// `do_lower_case` (default true, as for uncased BERT).
    lowercase: bool,
    /// `cls_token` (default `[CLS]`).
    cls: String,
    /// `sep_token` (default `[SEP]`).
    sep: String,
    /// `unk_token` (default `[UNK]`).
    unk: String,
    /// The RoBERTa-style template `<s> A </s></s> B </s>` (MPNet's and RoBERTa's
    /// tokenizer classes) rather than BERT's `[CLS] A [SEP] B [SEP]`.
    roberta_template: bool,
}

impl TokenizerSettings {
    fn read(dir: &Path) -> Self {
        let v: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        // A special token is a string, or an object with its `content`.
        let token = |k: &str, d: &str| -> String {
            match v.get(k) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or(d)
                    .to_string(),
                None => d.to_string(),
            }
        };
        let class = v
            .get("tokenizer_class")
            .and_then(|c| c.as_str())
            .unwrap_or("");
        TokenizerSettings {
            lowercase: v
                .get("do_lower_case")
                .and_then(|b| b.as_bool())
                .unwrap_or(true),
            cls: token("cls_token", "[CLS]"),
            sep: token("sep_token", "[SEP]"),
            unk: token("unk_token", "[UNK]"),
            roberta_template: class.starts_with("MPNet") || class.starts_with("Roberta"),
        }
    }
}

/// A BERT tokenizer (normaliser, pre-tokenizer, WordPiece, `[CLS] … [SEP]`) from `vocab.txt`.
pub fn from_vocab(vocab: &Path, lowercase: bool) -> Result<Tokenizer> {
    from_vocab_with(
        vocab,
        &TokenizerSettings {
            lowercase,
            cls: "[CLS]".into(),
            sep: "[SEP]".into(),
            unk: "[UNK]".into(),
            roberta_template: false,
        },
    )
}

/// A WordPiece tokenizer from `vocab.txt` with the special tokens and template of `s`.
fn from_vocab_with(vocab: &Path, s: &TokenizerSettings) -> Result<Tokenizer> {
    let wp = WordPiece::from_file(&vocab.to_string_lossy())
        .unk_token(s.unk.clone())
        .build()
        .map_err(|e| Error::file(vocab, format!("cannot read vocabulary: {e}")))?;
    let mut tok = Tokenizer::new(wp);
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| Error::file(vocab, format!("vocabulary has no `{t}` token")))
    };
    let (cls, sep) = (id(&s.cls)?, id(&s.sep)?);
    tok.with_normalizer(Some(BertNormalizer::new(true, true, None, s.lowercase)));
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    if s.roberta_template {
        tok.with_post_processor(Some(RobertaProcessing::new(
            (s.sep.clone(), sep),
            (s.cls.clone(), cls),
        )));
    } else {
        tok.with_post_processor(Some(BertProcessing::new(
            (s.sep.clone(), sep),
            (s.cls.clone(), cls),
        )));
    }
    Ok(tok)
}

/// A byte-level BPE tokenizer (RoBERTa's) from `vocab.json` and `merges.txt`, with the
/// template `<s> A </s></s> B </s>`.
pub fn from_bpe_files(dir: &Path) -> Result<Tokenizer> {
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .build()
        .map_err(|e| Error::file(&vocab, format!("cannot read the BPE vocabulary: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| Error::file(&vocab, format!("vocabulary has no `{t}` token")))
    };
    let (cls, sep) = (id("<s>")?, id("</s>")?);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.with_post_processor(Some(
        RobertaProcessing::new(("</s>".into(), sep), ("<s>".into(), cls)).add_prefix_space(false),
    ));
    Ok(tok)
}

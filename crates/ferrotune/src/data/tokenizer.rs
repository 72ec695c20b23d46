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

/// The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata (llama.cpp's
/// keys), the part [`from_gguf_vocab`] needs.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) is the one supported.
    pub model: String,
    /// `tokenizer.ggml.pre`: how text is split before BPE (`smollm`, `llama-bpe`, `qwen2`, ...).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: the vocabulary, by id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, by id (1 normal, 3 control, 4 user-defined); may be empty.
    pub token_types: Vec<i64>,
    /// `tokenizer.ggml.merges`: `"left right"`, best first.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.add_bos_token` (default false): BOS is put before every text.
    pub add_bos: Option<u32>,
    /// `tokenizer.ggml.add_eos_token` (default false): EOS is put after every text.
    pub add_eos: Option<u32>,
}

/// llama.cpp's GGML token type of a control token (`<|im_start|>`): a special added token.
const GGUF_CONTROL: i64 = 3;
/// llama.cpp's GGML token type of a user-defined token (`<think>`): an added, non-special
/// token, always matched whole.
const GGUF_USER_DEFINED: i64 = 4;

/// The regex llama.cpp splits text with before BPE, for the `tokenizer.ggml.pre` values
/// that are not GPT-2's own split (transformers' table for GGUF files, which is
/// llama.cpp's). `None`: GPT-2's regex (`gpt2`, `default`, anything unknown).
fn gguf_split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            Some(LLAMA3)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2),
        _ => None,
    }
}

/// Whether llama.cpp splits every digit off before GPT-2's regex for this
/// `tokenizer.ggml.pre` (its `\p{N}` rule): StarCoder's and SmolLM's tokenizers, whose
/// `tokenizer.json` has a `Digits(individual_digits)` pre-tokenizer for it.
fn gguf_splits_digits(pre: &str) -> bool {
    matches!(
        pre,
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
    )
}

/// GPT-2's map from bytes to the printable characters byte-level BPE vocabularies spell
/// them with (`Ġ` for a space).
fn gpt2_byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        out[b as usize] = if printable {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("256..=323 are characters")
        };
    }
    out
}

/// A byte-level BPE tokenizer from a GGUF file's vocabulary (`path` names the file in
/// errors): the vocabulary and merges as the file lists them, its control tokens as
/// special added tokens and its user-defined ones as added tokens, the split llama.cpp
/// uses for `tokenizer.ggml.pre`, and BOS/EOS added where the file says so. The ids equal
/// those `transformers` gives (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`).
pub fn from_gguf_vocab(v: &GgufVocab, path: &Path) -> Result<Tokenizer> {
    use tokenizers::pre_tokenizers::digits::Digits;
    use tokenizers::pre_tokenizers::sequence::Sequence;
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, SplitDelimiterBehavior};

    if v.model != "gpt2" {
        return Err(Error::at(
            path,
            None,
            Some("tokenizer.ggml.model"),
            format!(
                "tokenizer `{}` is not supported (supported: gpt2, byte-level BPE)",
                v.model
            ),
        ));
    }
    // Tokens are spelled in GPT-2's byte alphabet; one that is not (a control token
    // written in plain UTF-8) is respelled from its bytes, as transformers does.
    let chars = gpt2_byte_chars();
    let alphabet: std::collections::HashSet<char> = chars.iter().copied().collect();
    let spell = |t: &str| -> String {
        if t.chars().all(|c| alphabet.contains(&c)) {
            t.to_string()
        } else {
            t.bytes().map(|b| chars[b as usize]).collect()
        }
    };
    let vocab: tokenizers::models::bpe::Vocab = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (spell(t), i as u32))
        .collect();
    let mut merges = Vec::with_capacity(v.merges.len());
    for (i, m) in v.merges.iter().enumerate() {
        let Some((a, b)) = m.split_once(' ') else {
            return Err(Error::at(
                path,
                None,
                Some("tokenizer.ggml.merges"),
                format!("merge {i} `{m}` is not two tokens separated by a space"),
            ));
        };
        merges.push((a.to_string(), b.to_string()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| {
            Error::at(
                path,
                None,
                Some("tokenizer.ggml.merges"),
                format!("not a valid BPE vocabulary: {e}"),
            )
        })?;
    let mut tok = Tokenizer::new(bpe);
    let pre = v.pre.as_deref().unwrap_or("default");
    let byte_level = ByteLevel::new(false, true, true);
    if let Some(re) = gguf_split_regex(pre) {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| Error::Msg(format!("internal: the split regex of `{pre}`: {e}")))?;
        tok.with_pre_tokenizer(Some(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])));
    } else if gguf_splits_digits(pre) {
        tok.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            byte_level.into(),
        ])));
    } else {
        tok.with_pre_tokenizer(Some(byte_level));
    }
    tok.with_decoder(Some(ByteLevel::default()));

    let typed = |want: i64| -> Vec<&String> {
        v.tokens
            .iter()
            .zip(&v.token_types)
            .filter(|(_, &ty)| ty == want)
            .map(|(t, _)| t)
            .collect()
    };
    let control: Vec<AddedToken> = typed(GGUF_CONTROL)
        .into_iter()
        // A control token outside the byte alphabet is a llama.cpp mislabel that no
        // text can produce (transformers skips them too).
        .filter(|t| t.chars().all(|c| alphabet.contains(&c)))
        .map(|t| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    tok.add_special_tokens(&control);
    let user: Vec<AddedToken> = typed(GGUF_USER_DEFINED)
        .into_iter()
        .map(|t| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    tok.add_tokens(&user);

    if v.add_bos.is_some() || v.add_eos.is_some() {
        let name = |id: u32, key: &str| -> Result<String> {
            v.tokens.get(id as usize).cloned().ok_or_else(|| {
                Error::at(
                    path,
                    None,
                    Some(key),
                    format!("token id {id} is outside the vocabulary"),
                )
            })
        };
        let bos = v
            .add_bos
            .map(|id| Ok::<_, Error>((name(id, "tokenizer.ggml.bos_token_id")?, id)))
            .transpose()?;
        let eos = v
            .add_eos
            .map(|id| Ok::<_, Error>((name(id, "tokenizer.ggml.eos_token_id")?, id)))
            .transpose()?;
        let wrap = |seq: &str| -> String {
            let mut parts = Vec::new();
            if let Some((b, _)) = &bos {
                parts.push(b.clone());
            }
            parts.push(seq.to_string());
            if let Some((e, _)) = &eos {
                parts.push(e.clone());
            }
            parts.join(" ")
        };
        let single = wrap("$A");
        let pair = format!("{} {}", single, wrap("$B:1"));
        let specials: Vec<(String, u32)> = bos.iter().chain(eos.iter()).cloned().collect();
        let tp = TemplateProcessing::builder()
            .try_single(single.as_str())
            .and_then(|b| b.try_pair(pair.as_str()))
            .map_err(|e| Error::Msg(format!("internal: BOS/EOS template: {e}")))?
            .special_tokens(specials)
            .build()
            .map_err(|e| Error::file(path, format!("BOS/EOS template: {e}")))?;
        tok.with_post_processor(Some(tp));
    }
    Ok(tok)
}

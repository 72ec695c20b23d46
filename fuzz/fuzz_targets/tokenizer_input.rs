//! Text on its way into the model: any bytes (lossily decoded, as
//! `encoding_errors = "replace"` does), as a single text or a pair, through the BERT
//! tokenizer loaded from a real-format `tokenizer.json` with truncation, then padded into
//! a batch. First byte: the maximum length (4-67) and whether the input is a pair (split at
//! the first NUL byte).
#![no_main]

mod common;

use std::sync::OnceLock;

use candle_core::Device;
use ferrotune::data::batch::{make_batch, pad_id, tokenize};
use ferrotune::data::reader::Example;
use ferrotune::data::tokenizer::{from_vocab, load_tokenizer};
use libfuzzer_sys::fuzz_target;
use tokenizers::Tokenizer;

/// One tokenizer per maximum length, loaded from a tokenizer.json written once.
fn tokenizer(max_len: usize) -> &'static Tokenizer {
    static TOKS: OnceLock<Vec<Tokenizer>> = OnceLock::new();
    let toks = TOKS.get_or_init(|| {
        let dir = common::scratch().join("model");
        ferrotune::testing::write_tiny_model(&dir, &Default::default()).unwrap();
        let tok = from_vocab(&dir.join("vocab.txt"), true).unwrap();
        tok.save(dir.join("tokenizer.json"), false).unwrap();
        (4..=67).map(|n| load_tokenizer(&dir, n).unwrap()).collect()
    });
    &toks[max_len - 4]
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let max_len = (sel as usize % 64) + 4;
    let text = String::from_utf8_lossy(body).into_owned();
    let (text, pair) = match (sel & 64 != 0, text.split_once('\0')) {
        (true, Some((a, b))) => (a.to_string(), Some(b.to_string())),
        _ => (text, None),
    };
    let ex = Example {
        id: "line 1".into(),
        line: 1,
        text,
        text_pair: pair,
        label: None,
    };
    let tok = tokenizer(max_len);
    // A pair that cannot be truncated to the length is an error, never a panic.
    let Ok(feats) = tokenize(tok, std::slice::from_ref(&ex)) else {
        return;
    };
    let f = &feats[0];
    assert!(
        f.ids.len() <= max_len,
        "{} tokens over {max_len}",
        f.ids.len()
    );
    assert_eq!(f.ids.len(), f.type_ids.len());
    let b = make_batch(&[f], pad_id(tok), &Device::Cpu).unwrap();
    let b = b.tokens().unwrap();
    assert_eq!(b.input_ids.dims()[1], f.ids.len().max(1));
});

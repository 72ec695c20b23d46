//! The JSON Lines reader. First byte: bit 0 the encoding mode, bit 1 a pair column,
//! bit 2 skipping bad rows. The rest is the file.
#![no_main]

mod common;

use ferrotune::data::reader::{
    read_examples, read_examples_skipping, EncodingErrors, ReaderOptions,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let path = common::file("input.jsonl", body);
    let opts = ReaderOptions {
        text_column: "text".into(),
        text_pair_column: (sel & 2 != 0).then(|| "pair".into()),
        label_column: Some("label".into()),
        encoding_errors: if sel & 1 != 0 {
            EncodingErrors::Replace
        } else {
            EncodingErrors::Error
        },
        ..Default::default()
    };
    if sel & 4 != 0 {
        match read_examples_skipping(&path, &opts) {
            Ok((_, skipped)) => {
                for s in &skipped {
                    assert!(!s.reason.contains('\n'), "{:?}", s.reason);
                }
            }
            Err(e) => common::check_error(&e, &path),
        }
    } else {
        match read_examples(&path, &opts) {
            Ok(ex) => assert!(!ex.is_empty(), "an empty read must be an error"),
            Err(e) => common::check_error(&e, &path),
        }
    }
});

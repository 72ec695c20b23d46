//! The CSV and TSV readers (and the `.txt` prediction input), with and without
//! `on_bad_row = "skip"`. First byte: bits 0-1 the format (csv, tsv, txt), bit 2 the
//! encoding mode, bit 3 a pair column, bit 4 skipping. The rest is the file.
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
    let ext = match sel & 3 {
        0 | 3 => "csv",
        1 => "tsv",
        _ => "txt",
    };
    let path = common::file(&format!("input.{ext}"), body);
    // Bit 5: a file without a header, columns by index.
    let headerless = sel & 32 != 0;
    let name = |named: &str, index: &str| if headerless { index.into() } else { named.into() };
    let opts = ReaderOptions {
        text_column: name("text", "0"),
        text_pair_column: (sel & 8 != 0 && ext != "txt").then(|| name("pair", "2")),
        label_column: (ext != "txt").then(|| name("label", "1")),
        header: !headerless,
        encoding_errors: if sel & 4 != 0 {
            EncodingErrors::Replace
        } else {
            EncodingErrors::Error
        },
        file_extensions: vec!["txt".into()],
        column_names: None,
        image_paths: false,
    };
    if sel & 16 != 0 {
        match read_examples_skipping(&path, &opts) {
            Ok((ex, skipped)) => {
                for s in &skipped {
                    assert!(!s.reason.contains('\n'), "{:?}", s.reason);
                    assert!(s.line >= 1);
                }
                // Line numbers count LFs; records split by a lone CR may share one.
                let last = 1 + body.iter().filter(|&&b| b == b'\n').count();
                assert!(ex.iter().all(|e| e.line >= 1 && e.line <= last));
            }
            Err(e) => common::check_error(&e, &path),
        }
    } else {
        match read_examples(&path, &opts) {
            Ok(ex) => {
                assert!(!ex.is_empty(), "an empty read must be an error");
                for w in ex.windows(2) {
                    assert!(w[0].line <= w[1].line, "lines out of order");
                }
            }
            Err(e) => common::check_error(&e, &path),
        }
    }
});

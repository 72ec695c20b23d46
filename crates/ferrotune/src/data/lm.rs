//! Causal-language-model data: documents packed into blocks, prompt/completion pairs and
//! chat conversations, each turned into token ids and the labels the loss counts.
//!
//! Three layouts, chosen by what the data is (as TRL's `SFTTrainer` tells its dataset
//! formats apart):
//!
//! * **Plain text** — a `.txt` file (one document per non-empty line, as `datasets`'
//!   `text` loader), a folder of `.txt` files (recursively, in sorted order; one document
//!   per file), or CSV/TSV/JSONL rows with `text_column`. Each document is tokenized with
//!   the tokenizer's special tokens (its BOS, if it adds one) and followed by EOS; the
//!   documents are concatenated and cut into blocks of `block_size` tokens, the remainder
//!   dropped (transformers' `run_clm.py` `group_texts`). Every token is a label.
//! * **Prompt / completion** — JSONL rows `{"prompt": ..., "completion": ...}`: the
//!   prompt tokenized with special tokens, the completion without, then EOS; only the
//!   completion's tokens (and that EOS) are labels (TRL's `completion_only_loss`).
//! * **Conversations** — JSONL rows `{"messages": [{"role": ..., "content": ...}, ...]}`
//!   rendered with the model's `chat_template` (`tokenizer_config.json`, Jinja, through
//!   [`minijinja`]); only the assistant turns' tokens are labels (TRL's
//!   `assistant_only_loss`). A turn's tokens are found by rendering the conversation up
//!   to it: the text the assistant message adds to the rendering is its span.
//!
//! Prompt/completion rows and conversations are not packed: each is one sequence,
//! truncated to `block_size` and padded per batch (on the right).
//!
//! A label is the token itself; the shift to "the token after" is the loss's
//! ([`crate::tasks::causal_lm`]). Positions that do not count hold [`IGNORE_INDEX`].

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::data::reader::{open_examples, EncodingErrors, ReaderOptions, SkippedRow};
use crate::error::{Error, Result};

/// The label of a position the loss does not count (PyTorch's `ignore_index`).
pub use crate::loss::IGNORE_INDEX;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

/// What one row of causal-LM data holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LmContent {
    /// A document of plain text.
    Text(String),
    /// A prompt and the completion the model learns.
    PromptCompletion {
        /// Not counted in the loss.
        prompt: String,
        /// Counted in the loss.
        completion: String,
    },
    /// A conversation (assistant turns counted in the loss).
    Messages(Vec<Message>),
}

/// One row (document, pair or conversation) and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LmRow {
    /// `line N`, or the file's path relative to the folder read.
    pub id: String,
    /// The 1-based line (0 for a whole file).
    pub line: usize,
    /// The content.
    pub content: LmContent,
}

impl LmRow {
    /// The row's text for people (the prompt and completion, the conversation's turns).
    pub fn display(&self) -> String {
        match &self.content {
            LmContent::Text(t) => t.clone(),
            LmContent::PromptCompletion { prompt, completion } => format!("{prompt}{completion}"),
            LmContent::Messages(m) => m
                .iter()
                .map(|m| format!("{}: {}", m.role, m.content))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// The layout of a data set (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmFormat {
    /// Documents, packed.
    Text,
    /// Prompt/completion rows.
    PromptCompletion,
    /// Conversations.
    Messages,
}

impl LmFormat {
    /// The name used in messages (`text`, `prompt/completion`, `messages`).
    pub fn name(self) -> &'static str {
        match self {
            LmFormat::Text => "text",
            LmFormat::PromptCompletion => "prompt/completion",
            LmFormat::Messages => "messages",
        }
    }
}

/// How to read causal-LM data.
#[derive(Debug, Clone)]
pub struct LmReadOptions {
    /// The column of CSV/TSV/JSONL documents.
    pub text_column: String,
    /// The extensions of a folder's documents (without the dot).
    pub file_extensions: Vec<String>,
    /// What to do with bytes that are not UTF-8.
    pub encoding_errors: EncodingErrors,
    /// Leave out rows that cannot be read (`on_bad_row = "skip"`) instead of stopping.
    pub skip_bad_rows: bool,
}

/// Rows read from a data set, its layout, and the rows left out.
#[derive(Debug, Clone)]
pub struct LmData {
    /// The layout.
    pub format: LmFormat,
    /// The rows, in file order.
    pub rows: Vec<LmRow>,
    /// Rows left out under `skip_bad_rows`.
    pub skipped: Vec<SkippedRow>,
}

/// Reads causal-LM data from `path` (see the module documentation for the layouts).
pub fn read_lm_data(path: &Path, opts: &LmReadOptions) -> Result<LmData> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    let data = if meta.is_dir() {
        read_folder(path, opts)?
    } else if matches!(ext.as_str(), "jsonl" | "ndjson" | "json") {
        read_jsonl(path, opts)?
    } else {
        let ropts = ReaderOptions {
            text_column: opts.text_column.clone(),
            text_pair_column: None,
            label_column: None,
            encoding_errors: opts.encoding_errors,
            file_extensions: opts.file_extensions.clone(),
            header: true,
            column_names: None,
            image_paths: false,
        };
        let mut ex = open_examples(path, &ropts)?;
        if opts.skip_bad_rows {
            ex = ex.skip_bad_rows();
        }
        let rows: Vec<LmRow> = ex
            .by_ref()
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .filter(|e| !(ext == "txt" && e.text.trim().is_empty()))
            .map(|e| LmRow {
                id: e.id,
                line: e.line,
                content: LmContent::Text(e.text),
            })
            .collect();
        LmData {
            format: LmFormat::Text,
            rows,
            skipped: ex.skipped().to_vec(),
        }
    };
    if data.rows.is_empty() {
        return Err(Error::file(path, "no documents or rows to train on"));
    }
    Ok(data)
}

/// Reads `bytes` of `path` as UTF-8 under `errors`.
fn utf8(path: &Path, bytes: Vec<u8>, errors: EncodingErrors) -> Result<String> {
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) if errors == EncodingErrors::Error => {
            let at = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            Err(Error::at(
                path,
                Some(line),
                None,
                "not valid UTF-8 (set `encoding_errors = \"replace\"` to read it anyway)",
            ))
        }
        Err(e) => Ok(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

/// A folder of documents: every file with one of the extensions, recursively, sorted by
/// path; one document each.
fn read_folder(dir: &Path, opts: &LmReadOptions) -> Result<LmData> {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let p = entry.map_err(|e| Error::io(&d, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                opts.file_extensions
                    .iter()
                    .any(|x| x.trim_start_matches('.').eq_ignore_ascii_case(e))
            }) {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut rows = Vec::with_capacity(files.len());
    for f in files {
        let bytes = std::fs::read(&f).map_err(|e| Error::io(&f, e))?;
        let text = utf8(&f, bytes, opts.encoding_errors)?;
        if text.trim().is_empty() {
            continue;
        }
        let id = f
            .strip_prefix(dir)
            .unwrap_or(&f)
            .to_string_lossy()
            .replace('\\', "/");
        rows.push(LmRow {
            id,
            line: 0,
            content: LmContent::Text(text),
        });
    }
    Ok(LmData {
        format: LmFormat::Text,
        rows,
        skipped: Vec::new(),
    })
}

/// JSONL: the first row's keys choose the layout (`messages`, else `prompt`, else
/// `text_column`); every row must then be of that layout.
fn read_jsonl(path: &Path, opts: &LmReadOptions) -> Result<LmData> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = utf8(path, bytes, opts.encoding_errors)?;
    let mut format = None;
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.trim_start_matches('\u{feff}').trim();
        if raw.is_empty() {
            continue;
        }
        let parsed: std::result::Result<Value, Error> = serde_json::from_str(raw)
            .map_err(|e| Error::at(path, Some(line), None, format!("not valid JSON: {e}")));
        let row = parsed.and_then(|v| {
            let f = *format.get_or_insert_with(|| detect(&v));
            jsonl_row(path, line, &v, f, &opts.text_column)
        });
        match row {
            Ok(content) => rows.push(LmRow {
                id: format!("line {line}"),
                line,
                content,
            }),
            Err(e) if opts.skip_bad_rows => skipped.push(SkippedRow {
                line,
                reason: e.to_string(),
            }),
            Err(e) => return Err(e),
        }
    }
    Ok(LmData {
        format: format.unwrap_or(LmFormat::Text),
        rows,
        skipped,
    })
}

/// The layout a JSON row announces.
fn detect(v: &Value) -> LmFormat {
    if v.get("messages").is_some() {
        LmFormat::Messages
    } else if v.get("prompt").is_some() {
        LmFormat::PromptCompletion
    } else {
        LmFormat::Text
    }
}

/// One JSONL row of layout `format`; a missing or mistyped field is an error naming the
/// file, line and field.
fn jsonl_row(
    path: &Path,
    line: usize,
    v: &Value,
    format: LmFormat,
    text_column: &str,
) -> Result<LmContent> {
    let bad = |field: &str, msg: &str| Error::at(path, Some(line), Some(field), msg);
    if !v.is_object() {
        return Err(Error::at(path, Some(line), None, "expected a JSON object"));
    }
    let string = |field: &str| -> Result<String> {
        match v.get(field) {
            None | Some(Value::Null) => Err(bad(
                field,
                &format!(
                    "missing (the file's rows are of the {} layout)",
                    format.name()
                ),
            )),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(bad(field, "expected a string")),
        }
    };
    Ok(match format {
        LmFormat::Text => LmContent::Text(string(text_column)?),
        LmFormat::PromptCompletion => LmContent::PromptCompletion {
            prompt: string("prompt")?,
            completion: string("completion")?,
        },
        LmFormat::Messages => {
            let list = match v.get("messages") {
                Some(Value::Array(a)) if !a.is_empty() => a,
                Some(Value::Array(_)) => return Err(bad("messages", "empty conversation")),
                None | Some(Value::Null) => {
                    return Err(bad(
                        "messages",
                        "missing (the file's rows are conversations)",
                    ))
                }
                Some(_) => return Err(bad("messages", "expected a list of {role, content}")),
            };
            let mut out = Vec::with_capacity(list.len());
            for (k, m) in list.iter().enumerate() {
                let field = |name: &str| -> Result<String> {
                    let f = format!("messages[{k}].{name}");
                    match m.get(name) {
                        Some(Value::String(s)) => Ok(s.clone()),
                        None | Some(Value::Null) => Err(bad(&f, "missing")),
                        Some(_) => Err(bad(&f, "expected a string")),
                    }
                };
                out.push(Message {
                    role: field("role")?,
                    content: field("content")?,
                });
            }
            if !out.iter().any(|m| m.role == "assistant") {
                return Err(bad(
                    "messages",
                    "no assistant turn: nothing to learn from this conversation",
                ));
            }
            LmContent::Messages(out)
        }
    })
}

/// One sequence for the model: token ids and, per position, the token itself when the
/// loss counts it, else [`IGNORE_INDEX`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LmItem {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Labels, as long as `ids`.
    pub labels: Vec<i64>,
}

impl LmItem {
    /// A sequence whose every token is a label.
    pub fn all(ids: Vec<u32>) -> LmItem {
        let labels = ids.iter().map(|&i| i as i64).collect();
        LmItem { ids, labels }
    }

    /// Positions the loss counts: tokens after the first whose label is not ignored (the
    /// first token is predicted from nothing).
    pub fn counted(&self) -> usize {
        counted(&self.labels)
    }
}

/// Labels after the first that are not [`IGNORE_INDEX`].
pub fn counted(labels: &[i64]) -> usize {
    labels
        .iter()
        .skip(1)
        .filter(|&&l| l != IGNORE_INDEX)
        .count()
}

/// A model's chat template (`tokenizer_config.json`'s `chat_template`), rendered as
/// transformers' `apply_chat_template` does: Jinja with `trim_blocks` and `lstrip_blocks`,
/// `raise_exception`, Python's string methods, and `bos_token` / `eos_token` set.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

impl ChatTemplate {
    /// A template from its Jinja source; `origin` names it in errors.
    pub fn new(source: &str, bos: &str, eos: &str, origin: &Path) -> Result<ChatTemplate> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat_template", source.to_string())
            .map_err(|e| {
                Error::at(
                    origin,
                    None,
                    Some("chat_template"),
                    format!("not a valid Jinja template: {e}"),
                )
            })?;
        Ok(ChatTemplate {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// The template of model directory `dir`, if its `tokenizer_config.json` has one (a
    /// string, or a list of `{name, template}` of which `default` is taken).
    pub fn from_dir(dir: &Path) -> Result<Option<ChatTemplate>> {
        let p = dir.join("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&p) else {
            return Ok(None);
        };
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&p, format!("not valid JSON: {e}")))?;
        let source = match v.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .ok_or_else(|| {
                    Error::at(
                        &p,
                        None,
                        Some("chat_template"),
                        "a list without a `default` template",
                    )
                })?
                .to_string(),
            Some(_) => {
                return Err(Error::at(
                    &p,
                    None,
                    Some("chat_template"),
                    "expected a string",
                ))
            }
        };
        let token = |name: &str| -> String {
            match v.get(name) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                _ => String::new(),
            }
        };
        ChatTemplate::new(&source, &token("bos_token"), &token("eos_token"), &p).map(Some)
    }

    /// `messages` rendered; with `add_generation_prompt`, followed by what opens the
    /// assistant's reply.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self
            .env
            .get_template("chat_template")
            .map_err(|e| Error::Msg(format!("chat_template: {e}")))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| Error::Msg(format!("chat_template: {e}")))
    }

    /// The rendered conversation and the byte spans of its assistant turns: each turn's
    /// span is what rendering the conversation through it adds to rendering it up to it
    /// with the generation prompt. A template under which a conversation's renderings are
    /// not prefixes of each other is an error.
    pub fn render_with_spans(
        &self,
        messages: &[Message],
    ) -> Result<(String, Vec<std::ops::Range<usize>>)> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(Error::Msg(
                    "chat_template: the rendering of a conversation does not begin with that \
                     of its first turns, so the assistant turns cannot be told apart"
                        .into(),
                ));
            }
            spans.push(before.len()..through.len());
        }
        Ok((full, spans))
    }
}

/// Turns rows into sequences with a model's tokenizer.
pub struct LmTokenizer {
    /// The tokenizer (no truncation, no padding).
    pub tokenizer: Tokenizer,
    /// The end-of-sequence id appended after each document and completion.
    pub eos: Option<u32>,
    /// The chat template, for conversations.
    pub template: Option<ChatTemplate>,
}

impl LmTokenizer {
    /// Over `tokenizer` (its truncation and padding turned off).
    pub fn new(
        mut tokenizer: Tokenizer,
        eos: Option<u32>,
        template: Option<ChatTemplate>,
    ) -> Result<Self> {
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Msg(format!("tokenizer: {e}")))?;
        Ok(LmTokenizer {
            tokenizer,
            eos,
            template,
        })
    }

    fn ids(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, special)
            .map_err(|e| Error::Msg(format!("tokenization failed: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Documents tokenized (special tokens, then EOS), concatenated, and cut into blocks
    /// of `block_size`; the remainder is dropped.
    pub fn pack<'a>(
        &self,
        docs: impl IntoIterator<Item = &'a str>,
        block_size: usize,
    ) -> Result<Vec<LmItem>> {
        let mut stream = Vec::new();
        for d in docs {
            stream.extend(self.ids(d, true)?);
            stream.extend(self.eos);
        }
        Ok(stream
            .chunks_exact(block_size.max(1))
            .map(|c| LmItem::all(c.to_vec()))
            .collect())
    }

    /// A prompt (special tokens, not counted) and its completion (counted, then EOS),
    /// truncated to `block_size`.
    pub fn prompt_completion(
        &self,
        prompt: &str,
        completion: &str,
        block_size: usize,
    ) -> Result<LmItem> {
        let p = self.ids(prompt, true)?;
        let mut c = self.ids(completion, false)?;
        c.extend(self.eos);
        let mut labels = vec![IGNORE_INDEX; p.len()];
        labels.extend(c.iter().map(|&i| i as i64));
        let mut ids = p;
        ids.extend(c);
        ids.truncate(block_size);
        labels.truncate(block_size);
        Ok(LmItem { ids, labels })
    }

    /// A conversation through the chat template: the assistant turns' tokens counted,
    /// truncated to `block_size`.
    pub fn chat(&self, messages: &[Message], block_size: usize) -> Result<LmItem> {
        let t = self.template.as_ref().ok_or_else(|| {
            Error::Msg(
                "the data holds conversations (`messages`) but the model's \
                 tokenizer_config.json has no `chat_template`"
                    .into(),
            )
        })?;
        let (text, spans) = t.render_with_spans(messages)?;
        // The template writes the special tokens itself (apply_chat_template tokenizes
        // with add_special_tokens=False).
        let enc = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| Error::Msg(format!("tokenization failed: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        let mut labels: Vec<i64> = ids
            .iter()
            .zip(enc.get_offsets())
            .map(|(&id, &(start, end))| {
                let inside = spans
                    .iter()
                    .any(|s| start >= s.start && start < s.end && end <= s.end.max(start + 1));
                if inside {
                    id as i64
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        ids.truncate(block_size);
        labels.truncate(block_size);
        Ok(LmItem { ids, labels })
    }

    /// The sequences of `rows` of layout `format`: packed blocks for text, one sequence
    /// per row otherwise. A row that fails (a template error) is an error naming its file
    /// and line.
    pub fn items(
        &self,
        rows: &[LmRow],
        format: LmFormat,
        block_size: usize,
        path: &Path,
    ) -> Result<Vec<LmItem>> {
        if format == LmFormat::Text {
            let docs = rows.iter().filter_map(|r| match &r.content {
                LmContent::Text(t) => Some(t.as_str()),
                _ => None,
            });
            return self.pack(docs, block_size);
        }
        rows.iter()
            .map(|r| self.row_item(r, block_size, path))
            .collect()
    }

    /// One prompt/completion row or conversation as a sequence.
    pub fn row_item(&self, r: &LmRow, block_size: usize, path: &Path) -> Result<LmItem> {
        let at = |e: Error| {
            let loc = if r.line == 0 {
                path.join(&r.id)
            } else {
                path.to_path_buf()
            };
            Error::at(loc, (r.line > 0).then_some(r.line), None, e.to_string())
        };
        match &r.content {
            LmContent::Text(t) => Ok(LmItem::all(
                self.ids(t, true)
                    .map_err(at)?
                    .into_iter()
                    .take(block_size)
                    .collect(),
            )),
            LmContent::PromptCompletion { prompt, completion } => self
                .prompt_completion(prompt, completion, block_size)
                .map_err(at),
            LmContent::Messages(m) => self.chat(m, block_size).map_err(at),
        }
    }
}

/// The end-of-sequence id of a model directory: `tokenizer_config.json`'s `eos_token`
/// looked up in `tok`, else `config.json`'s `eos_token_id` (the first, when a list).
pub fn eos_id(dir: &Path, tok: &Tokenizer) -> Option<u32> {
    let read = |name: &str| -> Option<Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).ok()?).ok()
    };
    let from_tok = read("tokenizer_config.json").and_then(|v| {
        let t = match v.get("eos_token")? {
            Value::String(s) => s.clone(),
            Value::Object(o) => o.get("content")?.as_str()?.to_string(),
            _ => return None,
        };
        tok.token_to_id(&t)
    });
    from_tok.or_else(|| {
        let v = read("config.json")?;
        match v.get("eos_token_id")? {
            Value::Number(n) => n.as_u64().map(|n| n as u32),
            Value::Array(a) => a.first()?.as_u64().map(|n| n as u32),
            _ => None,
        }
    })
}

/// The padding id of a model directory: `config.json`'s `pad_token_id`, else the EOS id,
/// else `fallback`. Padding is on the right and its labels are ignored, so its value
/// changes no loss; it is what a model exported for generation expects.
pub fn pad_id(dir: &Path, eos: Option<u32>, fallback: u32) -> u32 {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("pad_token_id").and_then(Value::as_u64))
        .map(|n| n as u32)
        .or(eos)
        .unwrap_or(fallback)
}

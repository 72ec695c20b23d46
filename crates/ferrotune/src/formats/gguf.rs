//! GGUF files (llama.cpp's format): a Llama-architecture GGUF turned into a Hugging Face
//! model directory, so that it loads wherever such a directory loads.
//!
//! candle reads the file ([`candle_core::quantized::gguf_file`]) and dequantises its
//! tensors ([`QTensor::dequantize`]); [`to_hf_dir`] writes what `transformers` would have:
//!
//! - `config.json`: a `LlamaForCausalLM` config from the `llama.*` metadata;
//! - `model.safetensors`: every tensor in f32 under its transformers name, `q_proj` and
//!   `k_proj` with llama.cpp's rotary row order undone (its converter interleaves the two
//!   halves of each head's rows; see [`unpermute_rows`]);
//! - `tokenizer.json`, `tokenizer_config.json` (chat template, special tokens) and
//!   `generation_config.json`, from the `tokenizer.*` metadata
//!   ([`crate::data::tokenizer::from_gguf_vocab`]).
//!
//! [`resolve_model`] is where the rest of ferrotune meets this: a model path that is a
//! `.gguf` file becomes a directory converted once into the cache.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use serde_json::json;

use crate::data::tokenizer::{from_gguf_vocab, GgufVocab};
use crate::error::{Error, Result};

/// The GGUF tensor types candle reads and dequantises (what a [`to_hf_dir`] error lists).
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K";

/// The architectures [`to_hf_dir`] converts (`general.architecture`).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// GGML's name of tensor type `id` (ggml.h's `ggml_type`), or `type <id>` for one it
/// does not name.
pub fn ggml_type_name(id: u32) -> String {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES
        .get(id as usize)
        .map_or_else(|| format!("type {id}"), |s| s.to_string())
}

/// GGML's name of a type candle knows.
fn dtype_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Whether candle can read and dequantise tensors of type `t` (it parses Q8_1 and Q8_K
/// headers but has no reader for their blocks).
fn dequantisable(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::Q8_1 | GgmlDType::Q8K)
}

/// `path`'s error: unsupported tensor type.
fn unsupported_type(path: &Path, tensor: &str, ty: &str) -> Error {
    Error::file(
        path,
        format!("tensor {tensor}: GGUF type {ty} is not supported (supported: {SUPPORTED_TYPES})"),
    )
}

/// An open GGUF file: candle's parsed header and a reader for its tensors.
struct Gguf {
    path: PathBuf,
    content: Content,
    reader: RefCell<BufReader<File>>,
}

impl Gguf {
    /// Opens and parses `path`; every failure is a one-line error naming it.
    fn open(path: &Path) -> Result<Gguf> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 4];
        if len < 8 || reader.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(Error::file(
                path,
                "not a GGUF file (it does not start with the bytes `GGUF`)",
            ));
        }
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| Error::io(path, e))?;
        let content = match Content::read(&mut reader) {
            Ok(c) => c,
            Err(e) => {
                let msg = e.to_string();
                if msg.contains("unknown dtype") {
                    // candle stopped right after the tensor's type field: name it.
                    let at = reader.stream_position().unwrap_or(0);
                    return Err(match tensor_before(path, at) {
                        Some((name, id)) => unsupported_type(path, &name, &ggml_type_name(id)),
                        None => Error::file(
                            path,
                            format!("a tensor has a GGUF type candle cannot read ({msg}; supported: {SUPPORTED_TYPES})"),
                        ),
                    });
                }
                let why = if msg.contains("failed to fill whole buffer")
                    || msg.contains("exceeds remaining")
                    || msg.contains("remaining")
                {
                    format!("truncated GGUF header ({msg})")
                } else {
                    format!("not a readable GGUF file: {msg}")
                };
                return Err(Error::file(path, why));
            }
        };
        // Every tensor's data must lie inside the file (a truncated download fails here,
        // before anything is written).
        for (name, info) in &content.tensor_infos {
            let block = info.ggml_dtype.block_size();
            let elems = info.shape.elem_count();
            if !elems.is_multiple_of(block) {
                return Err(Error::file(
                    path,
                    format!(
                        "tensor {name}: {elems} elements are not whole blocks of {block} ({})",
                        dtype_name(info.ggml_dtype)
                    ),
                ));
            }
            let bytes = (elems / block) as u64 * info.ggml_dtype.type_size() as u64;
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > len {
                return Err(Error::file(
                    path,
                    format!(
                        "tensor {name}: its data ends at byte {end}, past the end of the file ({len} bytes): truncated?"
                    ),
                ));
            }
        }
        Ok(Gguf {
            path: path.to_path_buf(),
            content,
            reader: RefCell::new(reader),
        })
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// Metadata `key` as an unsigned integer; an error naming the key when absent or not one.
    fn uint(&self, key: &str) -> Result<u64> {
        self.opt_uint(key)?.ok_or_else(|| {
            Error::at(
                &self.path,
                None,
                Some(key),
                "missing from the GGUF metadata",
            )
        })
    }

    fn opt_uint(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.meta(key) else {
            return Ok(None);
        };
        let n = match *v {
            Value::U8(x) => Some(x as u64),
            Value::U16(x) => Some(x as u64),
            Value::U32(x) => Some(x as u64),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| {
            Error::at(
                &self.path,
                None,
                Some(key),
                format!("expected a non-negative integer, found {}", describe(v)),
            )
        })
    }

    /// Metadata `key` as a number; a value stored as f32 is given as its shortest decimal
    /// (1e-5, not 9.999999747378752e-6), as the Hugging Face config it came from said.
    fn opt_float(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.meta(key) else {
            return Ok(None);
        };
        let x = match *v {
            Value::F32(x) => format!("{x}").parse::<f64>().ok(),
            Value::F64(x) => Some(x),
            _ => self.opt_uint(key).ok().flatten().map(|n| n as f64),
        };
        x.filter(|x| x.is_finite()).map(Some).ok_or_else(|| {
            Error::at(
                &self.path,
                None,
                Some(key),
                format!("expected a number, found {}", describe(v)),
            )
        })
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Error::at(
                &self.path,
                None,
                Some(key),
                format!("expected a string, found {}", describe(v)),
            )),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.meta(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Error::at(
                &self.path,
                None,
                Some(key),
                format!("expected a boolean, found {}", describe(v)),
            )),
        }
    }

    fn str_array(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(v) = self.meta(key) else {
            return Ok(None);
        };
        let bad = |what: String| Error::at(&self.path, None, Some(key), what);
        let Value::Array(items) = v else {
            return Err(bad(format!(
                "expected an array of strings, found {}",
                describe(v)
            )));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::String(s) => Ok(s.clone()),
                x => Err(bad(format!(
                    "item {i}: expected a string, found {}",
                    describe(x)
                ))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.meta(key) else {
            return Ok(None);
        };
        let bad = |what: String| Error::at(&self.path, None, Some(key), what);
        let Value::Array(items) = v else {
            return Err(bad(format!(
                "expected an array of integers, found {}",
                describe(v)
            )));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, x)| match *x {
                Value::I32(n) => Ok(n as i64),
                Value::U32(n) => Ok(n as i64),
                Value::I64(n) => Ok(n),
                Value::U8(n) => Ok(n as i64),
                Value::I8(n) => Ok(n as i64),
                Value::U16(n) => Ok(n as i64),
                Value::I16(n) => Ok(n as i64),
                _ => Err(bad(format!(
                    "item {i}: expected an integer, found {}",
                    describe(x)
                ))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// The tensor `name`'s shape (row-major, as in transformers), or an error naming it.
    fn shape(&self, name: &str) -> Result<&[usize]> {
        self.content
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims())
            .ok_or_else(|| {
                Error::file(
                    &self.path,
                    format!("tensor {name} is missing (a Llama model has it)"),
                )
            })
    }

    /// Tensor `name` dequantised to f32, row-major.
    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = &self.content.tensor_infos[name];
        if !dequantisable(info.ggml_dtype) {
            return Err(unsupported_type(
                &self.path,
                name,
                dtype_name(info.ggml_dtype),
            ));
        }
        let at = |e: candle_core::Error| {
            Error::file(
                &self.path,
                format!("tensor {name}: {}", e.to_string().trim()),
            )
        };
        let mut reader = self.reader.borrow_mut();
        let q: QTensor = info
            .read(&mut *reader, self.content.tensor_data_offset, &Device::Cpu)
            .map_err(at)?;
        let t = q.dequantize(&Device::Cpu).map_err(at)?;
        t.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(at)
    }
}

/// A metadata value's type, for messages.
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string `{}`", s.chars().take(40).collect::<String>()),
        Value::Array(a) => format!("an array of {} items", a.len()),
        v => format!("{v:?}"),
    }
}

/// The name and type id of the tensor whose header ends at byte `end` of `path` (just
/// after its type field, where candle stops on a type it does not know). Tensor headers
/// are `name (u64 length + bytes), n_dims (u32), dims (n_dims × u64), type (u32)`
/// (GGUF v2 and v3; v1 has u32 lengths and dims); this reads that backwards, trying each
/// dimension count. `None` when nothing there fits.
fn tensor_before(path: &Path, end: u64) -> Option<(String, u32)> {
    let bytes = std::fs::read(path).ok()?;
    let end = usize::try_from(end).ok()?;
    if end < 4 || end > bytes.len() {
        return None;
    }
    let u32_at = |i: usize| Some(u32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?));
    let version = u32_at(4)?;
    let (len_size, dim_size) = if version == 1 { (4, 4) } else { (8, 8) };
    let ty = u32_at(end - 4)?;
    for n_dims in 1..=4usize {
        let dims_start = (end - 4).checked_sub(n_dims * dim_size)?;
        let n_at = dims_start.checked_sub(4)?;
        if u32_at(n_at)? as usize != n_dims {
            continue;
        }
        // The name runs up to n_at; its length prefix sits just before it.
        for name_len in 1..=n_at.min(65_536) {
            let Some(len_at) = n_at.checked_sub(name_len + len_size) else {
                break;
            };
            let len = if len_size == 8 {
                u64::from_le_bytes(bytes[len_at..len_at + 8].try_into().ok()?)
            } else {
                u32_at(len_at)? as u64
            };
            if len == name_len as u64 {
                let name = String::from_utf8_lossy(&bytes[n_at - name_len..n_at]).into_owned();
                return Some((name, ty));
            }
        }
    }
    None
}

/// Undoes llama.cpp's reordering of a q or k projection's rows (`convert_hf_to_gguf.py`'s
/// `permute`, reversed as transformers' `_reverse_permute_weights` does): within each of
/// `n_head` heads, GGUF row `2j + t` is transformers' row `t·half + j` (`half` = half the
/// head's rows). `w` is `rows × cols`, row-major; works for a bias too (`cols` = 1).
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let head = rows / n_head;
    let half = head / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for j in 0..half {
            for t in 0..2 {
                let src = (h * head + 2 * j + t) * cols;
                let dst = (h * head + t * half + j) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// One tensor of the output: where it comes from and how.
struct Planned {
    /// The GGUF tensor.
    src: String,
    /// The shape (transformers' order).
    shape: Vec<usize>,
    /// For q/k projections: the number of heads whose rows llama.cpp interleaved.
    unpermute: Option<usize>,
}

/// A tensor of the output file, dequantised when safetensors writes it (one at a time, so
/// that the whole f32 model is never in memory at once).
struct Lazy<'a> {
    gguf: &'a Gguf,
    plan: &'a Planned,
    /// The first error met (safetensors' `View::data` cannot return one).
    failed: &'a RefCell<Option<Error>>,
}

impl safetensors::View for Lazy<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.plan.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let n = self.plan.shape.iter().product::<usize>();
        let values = self.gguf.read_f32(&self.plan.src).and_then(|v| {
            if v.len() != n {
                return Err(Error::file(
                    &self.gguf.path,
                    format!("tensor {}: {} values, expected {n}", self.plan.src, v.len()),
                ));
            }
            Ok(match self.plan.unpermute {
                Some(heads) => {
                    let rows = self.plan.shape[0];
                    unpermute_rows(&v, rows, n / rows.max(1), heads)
                }
                None => v,
            })
        });
        let values = values.unwrap_or_else(|e| {
            self.failed.borrow_mut().get_or_insert(e);
            vec![0f32; n]
        });
        const _: () = assert!(cfg!(target_endian = "little"));
        std::borrow::Cow::Owned(values.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.plan.shape.iter().product::<usize>() * 4
    }
}

/// Converts the Llama-architecture GGUF file `gguf` into a Hugging Face model directory
/// `out` (which must not exist): `config.json`, `model.safetensors` (f32),
/// `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`. The directory is
/// written under a temporary name beside `out` and renamed into place, so `out` is whole
/// or absent. Errors (not a GGUF file, truncated, another architecture, a tensor type
/// candle cannot dequantise, missing metadata) are one line naming the file.
pub fn to_hf_dir(gguf: &Path, out: &Path) -> Result<()> {
    let g = Gguf::open(gguf)?;
    let arch = g
        .opt_str("general.architecture")?
        .ok_or_else(|| {
            Error::at(
                gguf,
                None,
                Some("general.architecture"),
                "missing from the GGUF metadata",
            )
        })?
        .to_string();
    if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(Error::at(
            gguf,
            None,
            Some("general.architecture"),
            format!(
                "architecture `{arch}` is not supported (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            ),
        ));
    }
    // Every tensor's type first: the error names the first unsupported one (by name, so
    // the message does not depend on hash order).
    let mut names: Vec<&String> = g.content.tensor_infos.keys().collect();
    names.sort();
    for name in &names {
        let t = g.content.tensor_infos[*name].ggml_dtype;
        if !dequantisable(t) {
            return Err(unsupported_type(gguf, name, dtype_name(t)));
        }
    }

    let (config, plan) = llama_config_and_plan(&g, &arch)?;
    let tok = tokenizer_files(&g, &config)?;

    if out.exists() {
        return Err(Error::file(out, "already exists; not overwritten"));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let stem = out
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = TempDir(parent.join(format!(".{stem}.tmp-{}-{nanos}", std::process::id())));
    std::fs::create_dir(&tmp.0).map_err(|e| Error::io(&tmp.0, e))?;
    let dir = tmp.0.as_path();

    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        let text = serde_json::to_string_pretty(v).map_err(|e| Error::Msg(e.to_string()))?;
        std::fs::write(dir.join(name), text + "\n").map_err(|e| Error::io(dir.join(name), e))
    };
    write_json("config.json", &config)?;
    write_json("tokenizer_config.json", &tok.config)?;
    write_json("generation_config.json", &tok.generation)?;
    let tok_path = dir.join("tokenizer.json");
    tok.tokenizer
        .save(&tok_path, false)
        .map_err(|e| Error::Msg(format!("{}: cannot write: {e}", tok_path.display())))?;

    let failed = RefCell::new(None);
    let views: Vec<(String, Lazy<'_>)> = plan
        .iter()
        .map(|(name, p)| {
            (
                name.clone(),
                Lazy {
                    gguf: &g,
                    plan: p,
                    failed: &failed,
                },
            )
        })
        .collect();
    let st = dir.join("model.safetensors");
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "ferrotune_source".to_string(),
            format!(
                "GGUF {}",
                gguf.file_name().unwrap_or_default().to_string_lossy()
            ),
        ),
    ]);
    safetensors::serialize_to_file(views, Some(meta), &st).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => Error::io(&st, io),
        e => Error::Msg(format!("{}: cannot write: {e}", st.display())),
    })?;
    if let Some(e) = failed.into_inner() {
        return Err(e);
    }
    // safetensors writes through a private temporary file (mode 0600); the model is as
    // readable as the other files.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&st, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(&st, e))?;
    }

    if let Err(e) = std::fs::rename(dir, out) {
        return Err(if out.exists() {
            Error::file(out, "already exists; not overwritten")
        } else {
            Error::io(out, e)
        });
    }
    std::mem::forget(tmp);
    Ok(())
}

/// A directory being written: removed (with what is in it) unless forgotten.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// transformers' `config.json` for a Llama GGUF, and the output tensors by name.
fn llama_config_and_plan(
    g: &Gguf,
    arch: &str,
) -> Result<(serde_json::Value, Vec<(String, Planned)>)> {
    let key = |k: &str| format!("{arch}.{k}");
    let as_usize = |k: &str| -> Result<usize> {
        let n = g.uint(&key(k))?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::at(&g.path, None, Some(&key(k)), format!("{n} is not a size")))
    };
    let hidden = as_usize("embedding_length")?;
    let layers = as_usize("block_count")?;
    let ffn = as_usize("feed_forward_length")?;
    let heads = as_usize("attention.head_count")?;
    let kv_heads = match g.opt_uint(&key("attention.head_count_kv"))? {
        Some(n) => n as usize,
        None => heads,
    };
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::at(
            &g.path,
            None,
            Some(&key("attention.head_count_kv")),
            format!("{kv_heads} key/value heads do not divide {heads} attention heads"),
        ));
    }
    let head_dim = match g.opt_uint(&key("attention.key_length"))? {
        Some(n) => n as usize,
        None => hidden / heads,
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(Error::file(
            &g.path,
            format!("head size {head_dim} is not even: rotary embeddings need pairs"),
        ));
    }
    let ctx = g.uint(&key("context_length"))?;
    let eps = g
        .opt_float(&key("attention.layer_norm_rms_epsilon"))?
        .unwrap_or(1e-5);
    let theta = g.opt_float(&key("rope.freq_base"))?.unwrap_or(10_000.0);
    let embed = g.shape("token_embd.weight")?;
    if embed.len() != 2 || embed[1] != hidden {
        return Err(Error::file(
            &g.path,
            format!("tensor token_embd.weight has shape {embed:?}, expected [vocab, {hidden}]"),
        ));
    }
    let vocab = match g.opt_uint(&key("vocab_size"))? {
        Some(n) => n as usize,
        None => embed[0],
    };
    if embed[0] != vocab {
        return Err(Error::file(
            &g.path,
            format!(
                "tensor token_embd.weight has {} rows, the metadata says {vocab} tokens",
                embed[0]
            ),
        ));
    }
    let tied = !g.content.tensor_infos.contains_key("output.weight");

    // The tensors, with the shape each must have.
    let (q_rows, kv_rows) = (heads * head_dim, kv_heads * head_dim);
    let mut plan: Vec<(String, Planned, Vec<usize>)> = Vec::new();
    let mut add = |hf: String, src: String, shape: Vec<usize>, unpermute: Option<usize>| {
        plan.push((
            hf,
            Planned {
                src,
                shape: shape.clone(),
                unpermute,
            },
            shape,
        ));
    };
    add(
        "model.embed_tokens.weight".into(),
        "token_embd.weight".into(),
        vec![vocab, hidden],
        None,
    );
    add(
        "model.norm.weight".into(),
        "output_norm.weight".into(),
        vec![hidden],
        None,
    );
    if !tied {
        add(
            "lm_head.weight".into(),
            "output.weight".into(),
            vec![vocab, hidden],
            None,
        );
    }
    let mut attention_bias = false;
    for i in 0..layers {
        let b = |s: &str| format!("blk.{i}.{s}");
        let m = |s: &str| format!("model.layers.{i}.{s}");
        for (gg, hf, rows, perm) in [
            ("attn_q", "self_attn.q_proj", q_rows, Some(heads)),
            ("attn_k", "self_attn.k_proj", kv_rows, Some(kv_heads)),
            ("attn_v", "self_attn.v_proj", kv_rows, None),
        ] {
            add(
                m(&format!("{hf}.weight")),
                b(&format!("{gg}.weight")),
                vec![rows, hidden],
                perm,
            );
            let bias = b(&format!("{gg}.bias"));
            if g.content.tensor_infos.contains_key(&bias) {
                attention_bias = true;
                add(m(&format!("{hf}.bias")), bias, vec![rows], perm);
            }
        }
        add(
            m("self_attn.o_proj.weight"),
            b("attn_output.weight"),
            vec![hidden, q_rows],
            None,
        );
        let o_bias = b("attn_output.bias");
        if g.content.tensor_infos.contains_key(&o_bias) {
            add(m("self_attn.o_proj.bias"), o_bias, vec![hidden], None);
        }
        add(
            m("mlp.gate_proj.weight"),
            b("ffn_gate.weight"),
            vec![ffn, hidden],
            None,
        );
        add(
            m("mlp.up_proj.weight"),
            b("ffn_up.weight"),
            vec![ffn, hidden],
            None,
        );
        add(
            m("mlp.down_proj.weight"),
            b("ffn_down.weight"),
            vec![hidden, ffn],
            None,
        );
        add(
            m("input_layernorm.weight"),
            b("attn_norm.weight"),
            vec![hidden],
            None,
        );
        add(
            m("post_attention_layernorm.weight"),
            b("ffn_norm.weight"),
            vec![hidden],
            None,
        );
    }
    for (_, p, want) in &plan {
        let got = g.shape(&p.src)?;
        if got != want.as_slice() {
            return Err(Error::file(
                &g.path,
                format!(
                    "tensor {} has shape {got:?}, expected {want:?} from the metadata",
                    p.src
                ),
            ));
        }
    }
    // A tensor this converter would drop is an error, not a silently different model.
    let used: std::collections::HashSet<&str> =
        plan.iter().map(|(_, p, _)| p.src.as_str()).collect();
    let mut extra: Vec<&String> = g
        .content
        .tensor_infos
        .keys()
        .filter(|n| !used.contains(n.as_str()))
        .collect();
    extra.sort();
    if let Some(name) = extra.first() {
        let why = if name.as_str() == "rope_freqs.weight" {
            " (Llama 3.1-style rope scaling factors are not supported)"
        } else {
            ""
        };
        return Err(Error::file(
            &g.path,
            format!("tensor {name} is not part of a {layers}-layer Llama model{why}"),
        ));
    }

    let mut config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "max_position_embeddings": ctx,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "attention_bias": attention_bias,
        "mlp_bias": false,
        "torch_dtype": "float32",
        "bos_token_id": g.opt_uint("tokenizer.ggml.bos_token_id")?,
        "eos_token_id": g.opt_uint("tokenizer.ggml.eos_token_id")?,
        "pad_token_id": g.opt_uint("tokenizer.ggml.padding_token_id")?,
    });
    if let Some(kind) = g.opt_str(&key("rope.scaling.type"))? {
        if kind != "none" {
            let mut rs = json!({ "rope_type": kind, "type": kind });
            if let Some(f) = g.opt_float(&key("rope.scaling.factor"))? {
                rs["factor"] = json!(f);
            }
            if let Some(n) = g.opt_uint(&key("rope.scaling.original_context_length"))? {
                rs["original_max_position_embeddings"] = json!(n);
            }
            config["rope_scaling"] = rs;
        }
    }
    Ok((config, plan.into_iter().map(|(n, p, _)| (n, p)).collect()))
}

/// The tokenizer files of a GGUF.
struct TokenizerFiles {
    tokenizer: tokenizers::Tokenizer,
    config: serde_json::Value,
    generation: serde_json::Value,
}

/// The tokenizer, `tokenizer_config.json` and `generation_config.json` from the metadata.
fn tokenizer_files(g: &Gguf, config: &serde_json::Value) -> Result<TokenizerFiles> {
    let missing = |k: &str| Error::at(&g.path, None, Some(k), "missing from the GGUF metadata");
    let model = g
        .opt_str("tokenizer.ggml.model")?
        .ok_or_else(|| missing("tokenizer.ggml.model"))?
        .to_string();
    let tokens = g
        .str_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| missing("tokenizer.ggml.tokens"))?;
    let token_types = g
        .int_array("tokenizer.ggml.token_type")?
        .unwrap_or_default();
    if !token_types.is_empty() && token_types.len() != tokens.len() {
        return Err(Error::at(
            &g.path,
            None,
            Some("tokenizer.ggml.token_type"),
            format!("{} types for {} tokens", token_types.len(), tokens.len()),
        ));
    }
    let merges = if model == "gpt2" {
        g.str_array("tokenizer.ggml.merges")?
            .ok_or_else(|| missing("tokenizer.ggml.merges"))?
    } else {
        Vec::new()
    };
    let id = |k: &str| -> Result<Option<u32>> {
        match g.opt_uint(k)? {
            None => Ok(None),
            Some(n) if (n as usize) < tokens.len() => Ok(Some(n as u32)),
            Some(n) => Err(Error::at(
                &g.path,
                None,
                Some(k),
                format!(
                    "token id {n} is outside the {}-token vocabulary",
                    tokens.len()
                ),
            )),
        }
    };
    let (bos, eos, unk, pad) = (
        id("tokenizer.ggml.bos_token_id")?,
        id("tokenizer.ggml.eos_token_id")?,
        id("tokenizer.ggml.unknown_token_id")?,
        id("tokenizer.ggml.padding_token_id")?,
    );
    let add_bos = g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let vocab = GgufVocab {
        model,
        pre: g.opt_str("tokenizer.ggml.pre")?.map(str::to_string),
        tokens,
        token_types,
        merges,
        add_bos: bos.filter(|_| add_bos),
        add_eos: eos.filter(|_| add_eos),
    };
    let tokenizer = from_gguf_vocab(&vocab, &g.path)?;
    let name = |i: Option<u32>| i.map(|i| vocab.tokens[i as usize].clone());
    let mut tc = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(bos),
        "eos_token": name(eos),
        "unk_token": name(unk),
        "pad_token": name(pad),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": false,
        "model_max_length": config["max_position_embeddings"],
    });
    if let Some(t) = g.opt_str("tokenizer.chat_template")? {
        tc["chat_template"] = json!(t);
    }
    let generation = json!({
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    });
    Ok(TokenizerFiles {
        tokenizer,
        config: tc,
        generation,
    })
}

/// The folder converted GGUF files are cached in: `$FERROTUNE_CACHE/gguf`, else
/// `~/.cache/ferrotune/gguf`.
pub fn cache_dir() -> PathBuf {
    let root = std::env::var_os("FERROTUNE_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ferrotune")))
        .unwrap_or_else(|| std::env::temp_dir().join("ferrotune-cache"));
    root.join("gguf")
}

/// Whether every linear weight of the layers (`blk.*` tensors of two dimensions) of GGUF
/// file `path` is Q4_1, the blocks [`crate::kernels::q4`] keeps: then a LoRA run keeps
/// them 4-bit by default, losing nothing.
pub fn linear_weights_are_q4_1(path: &Path) -> Result<bool> {
    let g = Gguf::open(path)?;
    let mut linear = g
        .content
        .tensor_infos
        .iter()
        .filter(|(name, info)| name.starts_with("blk.") && info.shape.dims().len() == 2)
        .peekable();
    if linear.peek().is_none() {
        return Ok(false);
    }
    Ok(linear.all(|(_, info)| info.ggml_dtype == GgmlDType::Q4_1))
}

/// Whether `path` names a GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The model directory a model path stands for: a `.gguf` file is converted once (by
/// [`to_hf_dir`]) into `<cache>/<file stem>-<hash of its size and modification time>`
/// under [`cache_dir`] and that directory is returned, reused while the file is
/// unchanged; any other path (a Hugging Face model directory) is returned as it is.
pub fn resolve_model(path: &Path) -> Result<PathBuf> {
    if !is_gguf(path) || path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let stem = path
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let key = {
        use sha2::Digest;
        let h = sha2::Sha256::digest(format!("{}:{mtime}:{stem}", meta.len()));
        h.iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let out = cache_dir().join(format!("{stem}-{key}"));
    // The directory is renamed into place whole: present means complete.
    if out.join("config.json").is_file() {
        return Ok(out);
    }
    match to_hf_dir(path, &out) {
        Ok(()) => Ok(out),
        // Another process converted it meanwhile.
        Err(_) if out.join("config.json").is_file() => Ok(out),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's `permute` (convert_hf_to_gguf.py), for the test: HF row `t·half + j`
    /// of each head becomes row `2j + t`.
    fn permute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let (head, half) = (rows / n_head, rows / n_head / 2);
        let mut out = vec![0f32; w.len()];
        for h in 0..n_head {
            for t in 0..2 {
                for j in 0..half {
                    let src = (h * head + t * half + j) * cols;
                    let dst = (h * head + 2 * j + t) * cols;
                    out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_undoes_llama_cpp_permute() {
        let (rows, cols, heads) = (24, 3, 3);
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let p = permute_rows(&w, rows, cols, heads);
        assert_ne!(p, w);
        // Head 0, half 4: GGUF rows 0..8 are HF rows 0,4,1,5,2,6,3,7.
        let firsts: Vec<f32> = (0..8).map(|r| p[r * cols] / cols as f32).collect();
        assert_eq!(firsts, [0., 4., 1., 5., 2., 6., 3., 7.]);
        assert_eq!(unpermute_rows(&p, rows, cols, heads), w);
        // A bias (one column).
        let b: Vec<f32> = (0..rows).map(|i| i as f32).collect();
        assert_eq!(
            unpermute_rows(&permute_rows(&b, rows, 1, heads), rows, 1, heads),
            b
        );
    }

    #[test]
    fn type_names_follow_ggml() {
        assert_eq!(ggml_type_name(3), "Q4_1");
        assert_eq!(ggml_type_name(16), "IQ2_XXS");
        assert_eq!(ggml_type_name(30), "BF16");
        assert_eq!(ggml_type_name(99), "type 99");
    }

    #[test]
    fn resolve_model_leaves_other_paths_alone() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(resolve_model(d.path()).unwrap(), d.path());
        let p = Path::new("no/such/model");
        assert_eq!(resolve_model(p).unwrap(), p);
        let e = resolve_model(Path::new("no/such/model.gguf")).unwrap_err();
        assert!(e.is_bad_input(), "{e}");
        assert!(e.to_string().contains("no/such/model.gguf"), "{e}");
    }
}

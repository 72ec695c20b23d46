//! Reading PyTorch weight files (`pytorch_model.bin`, `*.pth`, `*.pt`) without running code.
//!
//! # The formats
//!
//! `torch.save` writes one of two containers:
//!
//! - **zip** (PyTorch 1.6 and later; starts with `PK`): an uncompressed zip with one top
//!   folder (usually `archive/`, but any name) holding `data.pkl`, the pickled object, and
//!   `data/<key>`, the raw little-endian bytes of each storage. A `byteorder` record, when
//!   present, says `little`.
//! - **legacy** (`_use_new_zipfile_serialization=False`, and everything before 1.6): five
//!   things one after another in one file: a pickled magic number
//!   (`0x1950a86a20f9469cfc6c`), a pickled protocol version (1001), a pickled
//!   `sys_info` dict (`little_endian`, type sizes), the pickled object itself, then a
//!   pickled list of storage keys, followed, for each key in that order, by the storage:
//!   its element count as a little-endian `u64`, then the elements' raw bytes.
//!
//! In both, the pickled object (a state dict: an `OrderedDict` or `dict` of name →
//! tensor, possibly nested as `{"state_dict": {...}}` or `{"model": {...}}`) refers to
//! storages through *persistent ids* (`('storage', torch.FloatStorage, key, location,
//! numel[, view])`) and rebuilds each tensor by calling
//! `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`. A
//! tensor is a **strided view** of its storage: transposed or permuted tensors (for
//! example weights converted from TensorFlow) keep their storage in the original order,
//! and only the strides say where each element is. [`read_torch_file`] honours offset,
//! size and stride and copies each tensor into a fresh contiguous candle tensor.
//!
//! # Why this is safe
//!
//! A pickle is a program: `GLOBAL` names any Python callable and `REDUCE` calls it, so
//! `torch.load` on an untrusted file (without `weights_only=True`) can run anything. This
//! module never runs anything. It is a small stack machine over the pickle opcodes that
//! PyTorch emits, building inert values (numbers, strings, tuples, lists, dicts). A
//! `GLOBAL` is accepted only when it names one of the few callables that rebuild
//! tensors (`torch._utils._rebuild_tensor_v2`, `_rebuild_tensor`, `_rebuild_parameter`,
//! `_rebuild_parameter_with_state`, `torch._tensor._rebuild_from_type_v2` with
//! `torch.Tensor` / `torch.nn.parameter.Parameter`), `collections.OrderedDict`, and the
//! `torch.*Storage` types; every other global (`os.system`, `builtins.eval`,
//! `subprocess.Popen`, the nested loader `torch.storage._load_from_bytes`, a model
//! class, ...) stops the read at once with an error naming it. `REDUCE`, `NEWOBJ` and
//! `BUILD` are interpreted symbolically for these callables only (a rebuild call
//! becomes a tensor record; `OrderedDict()` becomes an empty dict). Opcodes that could
//! name a callable indirectly (`INST`, `OBJ`, the `copyreg` extension registry) are
//! refused too.
//!
//! Malformed input is an error, never a panic: every length, offset, size and stride is
//! checked (with overflow-checked arithmetic) against the bytes actually present, so a
//! declared length can never trigger a large allocation. The interpreter keeps all
//! values in one flat arena (no recursion while reading, none when freeing; reference
//! cycles are harmless). A memo reference costs two bytes of input but can point at a
//! large value, so whatever the interpreter copies out of values it already holds (call
//! arguments, a tensor's size and stride, the state dict's names) is counted, and a
//! pickle that copies more than 16 times its own size is refused: memory stays linear
//! in the input. Tensors are materialised against a budget of
//! [`UNPACK_BUDGET_FACTOR`] times the file size (at least [`UNPACK_BUDGET_MIN`] bytes),
//! which only tensors repeating their storage's elements (a stride of 0, or one tensor
//! under many names) could approach. A state dict that names a tensor twice is refused
//! (`torch.save` never writes one).
//!
//! # Types
//!
//! float32, float64, float16, bfloat16, int64, int32, int16 and uint8 map to the candle
//! dtype of the same name; bool becomes `u8` (0 or 1), as candle has no bool. int8,
//! complex and quantised tensors are refused with an error naming the tensor.

use std::cell::Cell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Tensors may take at most this many times the file's size once unpacked (see the
/// module documentation); with [`UNPACK_BUDGET_MIN`], whichever is larger.
pub const UNPACK_BUDGET_FACTOR: u64 = 8;

/// The least unpacking budget, in bytes, however small the file.
pub const UNPACK_BUDGET_MIN: u64 = 256 << 20;

/// The pickled magic number that opens a legacy torch file.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// The protocol version a legacy torch file records after its magic number.
const LEGACY_PROTOCOL_VERSION: i64 = 1001;

/// The most dimensions a tensor may have (PyTorch's own limit is lower).
const MAX_DIMS: usize = 64;

/// The longest storage key accepted (PyTorch writes short decimal numbers).
const MAX_KEY_LEN: usize = 256;

/// The interpreter may copy at most this many times the pickle's size (plus 1 MiB) from
/// values it has already built; see `Unpickler::charge`.
const COPY_FACTOR: u64 = 16;

/// Reads the state dict in a PyTorch weight file (zip or legacy format) as named,
/// contiguous CPU tensors, in the order of the state dict.
///
/// The state dict is the file's top-level dict of tensors, or else the first such dict
/// found inside it (breadth first, e.g. under `"state_dict"` or `"model"`). No code in
/// the file is run: see the module documentation for what is accepted. Errors name the
/// file, and the tensor or the refused global where there is one.
pub fn read_torch_file(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if cfg!(target_endian = "big") {
        return Err(Error::file(
            path,
            "reading torch files needs a little-endian machine",
        ));
    }
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = [0u8; 4];
    let n = read_up_to(&mut f, &mut head).map_err(|e| Error::io(path, e))?;
    let budget = file_len
        .saturating_mul(UNPACK_BUDGET_FACTOR)
        .max(UNPACK_BUDGET_MIN);
    if n == 4 && head == *b"PK\x03\x04" {
        drop(f);
        read_zip(path, file_len, budget)
    } else {
        drop(f);
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        read_legacy(path, &data, budget)
    }
}

/// Converts a PyTorch weight file to a safetensors file (metadata `format: pt`), and
/// returns the number of tensors written.
///
/// The output is written under a temporary name beside `output` and renamed into place,
/// so an interrupted conversion never leaves a partial file at `output`; on Unix it is
/// made readable by all (mode 0644), like other model files.
pub fn convert_to_safetensors(input: &Path, output: &Path) -> Result<usize> {
    let tensors = read_torch_file(input)?;
    let name = output
        .file_name()
        .ok_or_else(|| Error::file(output, "the output must be a file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = output.with_file_name(tmp_name);
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let data = tensors.iter().map(|(k, t)| (k.as_str(), t));
    if let Err(e) = safetensors::serialize_to_file(data, Some(metadata), &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::file(
            output,
            format!("cannot write safetensors: {e}"),
        ));
    }
    // The safetensors writer creates its file owner-only (0600); a weight file is
    // normally readable by all, as `File::create` would make it under the usual umask.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let perms = std::fs::Permissions::from_mode(0o644);
        if let Err(e) = std::fs::set_permissions(&tmp, perms) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(output, e));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, output) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(output, e));
    }
    Ok(tensors.len())
}

/// Reads into `buf` until it is full or the reader ends; returns the bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------
// Containers
// ---------------------------------------------------------------------------------------

/// The zip container: `<dir>/data.pkl` plus `<dir>/data/<key>` per storage.
fn read_zip(path: &Path, file_len: u64, budget: u64) -> Result<Vec<(String, Tensor)>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(f))
        .map_err(|e| Error::file(path, format!("not a readable zip archive: {e}")))?;
    let mut pkl_names = Vec::new();
    for name in zip.file_names() {
        let name = name.map_err(|e| Error::file(path, format!("bad zip entry name: {e}")))?;
        if let Some(dir) = name.strip_suffix("/data.pkl") {
            if !dir.is_empty() && !dir.contains('/') {
                pkl_names.push(dir.to_string());
            }
        }
    }
    let prefix = match pkl_names.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(Error::file(
                path,
                "a zip file but not a torch checkpoint: no <folder>/data.pkl inside",
            ))
        }
        many => {
            return Err(Error::file(
                path,
                format!(
                    "a zip file with {} data.pkl records; expected one",
                    many.len()
                ),
            ))
        }
    };
    if let Some(order) = read_zip_entry(path, &mut zip, &format!("{prefix}/byteorder"), file_len)? {
        if order.trim_ascii() != b"little" {
            return Err(Error::file(
                path,
                format!(
                    "big-endian torch files are not supported (byteorder `{}`)",
                    String::from_utf8_lossy(&order).escape_debug()
                ),
            ));
        }
    }
    let pkl = read_zip_entry(path, &mut zip, &format!("{prefix}/data.pkl"), file_len)?
        .ok_or_else(|| Error::file(path, "cannot read data.pkl"))?;
    let mut up = Unpickler::new(path, &pkl);
    let root = up.load()?;
    let records = up.find_state_dict(root)?;

    // Read only the storages the state dict uses.
    let mut storages: Vec<Option<Vec<u8>>> = vec![None; up.storages.len()];
    for (_, rec) in &records {
        let i = rec.storage.index;
        if storages[i].is_some() {
            continue;
        }
        let key = &up.storages[i].key;
        if key.contains(['/', '\\']) || key.contains("..") {
            return Err(Error::file(
                path,
                format!("invalid storage key `{}`", shown(key)),
            ));
        }
        let entry = format!("{prefix}/data/{key}");
        let bytes = read_zip_entry(path, &mut zip, &entry, file_len)?.ok_or_else(|| {
            Error::file(
                path,
                format!("storage `{key}` is missing (no {entry} in the zip)"),
            )
        })?;
        storages[i] = Some(bytes);
    }
    let views: Vec<Option<&[u8]>> = storages.iter().map(|b| b.as_deref()).collect();
    materialise_all(path, &records, &up.storages, &views, budget)
}

/// Reads one zip entry whole (`None` when absent), at most `limit` bytes.
fn read_zip_entry<R: Read + std::io::Seek>(
    path: &Path,
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    limit: u64,
) -> Result<Option<Vec<u8>>> {
    let mut entry = match zip.by_name(name) {
        Ok(e) => e,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(Error::file(path, format!("zip entry {name}: {e}"))),
    };
    let declared = entry.size();
    if declared > limit {
        return Err(Error::file(
            path,
            format!("zip entry {name} declares {declared} bytes, more than the file's {limit}"),
        ));
    }
    let mut buf = Vec::with_capacity(declared as usize);
    entry
        .by_ref()
        .take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| Error::file(path, format!("zip entry {name}: {e}")))?;
    if buf.len() as u64 != declared {
        return Err(Error::file(
            path,
            format!(
                "zip entry {name}: read {} bytes, the archive declares {declared}",
                buf.len()
            ),
        ));
    }
    Ok(Some(buf))
}

/// The legacy container: five pickles, then the storages' bytes.
fn read_legacy(path: &Path, data: &[u8], budget: u64) -> Result<Vec<(String, Tensor)>> {
    if data.len() > 262 && &data[257..262] == b"ustar" {
        return Err(Error::file(
            path,
            "a tar-format torch file (PyTorch before 0.4): not supported; re-save it with a recent PyTorch",
        ));
    }
    if data.first() != Some(&0x80) {
        return Err(Error::file(
            path,
            "not a PyTorch weight file (neither a zip archive nor a pickle)",
        ));
    }
    let mut up = Unpickler::new(path, data);
    let magic = up.load()?;
    if !matches!(up.get(magic), Obj::BigInt(b) if b[..] == LEGACY_MAGIC) {
        return Err(Error::file(
            path,
            "a pickle, but not a PyTorch weight file (no torch magic number)",
        ));
    }
    let version = up.load()?;
    match up.get(version) {
        Obj::Int(LEGACY_PROTOCOL_VERSION) => {}
        Obj::Int(v) => {
            return Err(Error::file(
                path,
                format!("unsupported torch file protocol version {v} (expected 1001)"),
            ))
        }
        _ => {
            return Err(Error::file(
                path,
                "malformed torch file: no protocol version",
            ))
        }
    }
    let sys_info = up.load()?;
    if let Some(v) = up.dict_get(sys_info, "little_endian") {
        if !matches!(up.get(v), Obj::Bool(true)) {
            return Err(Error::file(
                path,
                "the file was written on a big-endian machine: not supported",
            ));
        }
    }
    let root = up.load()?;
    let keys_id = up.load()?;
    let (Obj::List(keys) | Obj::Tuple(keys)) = up.get(keys_id) else {
        return Err(Error::file(
            path,
            "malformed torch file: no list of storage keys after the pickled object",
        ));
    };
    let mut pos = up.pos;
    let mut storages: Vec<Option<&[u8]>> = vec![None; up.storages.len()];
    for &key_id in keys {
        let Obj::Str(key) = up.get(key_id) else {
            return Err(Error::file(
                path,
                "malformed torch file: a storage key is not a string",
            ));
        };
        let i = up.storage_index(key_id).ok_or_else(|| {
            Error::file(
                path,
                format!(
                    "malformed torch file: storage `{}` is listed but never used",
                    shown(key)
                ),
            )
        })?;
        if storages[i].is_some() {
            return Err(Error::file(
                path,
                format!(
                    "malformed torch file: storage `{}` is listed twice",
                    shown(key)
                ),
            ));
        }
        let elem = up.storages[i].elem;
        let count_bytes = data.get(pos..pos + 8).ok_or_else(|| {
            Error::file(
                path,
                format!("truncated: the file ends before storage `{key}` (byte {pos})"),
            )
        })?;
        let count = u64::from_le_bytes(count_bytes.try_into().expect("8 bytes"));
        pos += 8;
        let remaining = (data.len() - pos) as u64;
        let nbytes = count
            .checked_mul(elem.size() as u64)
            .filter(|&n| n <= remaining)
            .ok_or_else(|| {
                Error::file(
                    path,
                    format!(
                        "truncated or corrupt: storage `{key}` declares {count} {} elements, but only {remaining} bytes remain",
                        elem.name()
                    ),
                )
            })? as usize;
        storages[i] = Some(&data[pos..pos + nbytes]);
        pos += nbytes;
    }
    let records = up.find_state_dict(root)?;
    materialise_all(path, &records, &up.storages, &storages, budget)
}

// ---------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------

/// The element type of a torch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Elem {
    /// From a `torch.<Name>Storage` global; `None` for an unknown or unsupported one.
    fn from_storage_name(name: &str) -> Option<Elem> {
        Some(match name {
            "FloatStorage" => Elem::F32,
            "DoubleStorage" => Elem::F64,
            "HalfStorage" => Elem::F16,
            "BFloat16Storage" => Elem::BF16,
            "LongStorage" => Elem::I64,
            "IntStorage" => Elem::I32,
            "ShortStorage" => Elem::I16,
            "CharStorage" => Elem::I8,
            "ByteStorage" | "UntypedStorage" => Elem::U8,
            "BoolStorage" => Elem::Bool,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Elem::F64 | Elem::I64 => 8,
            Elem::F32 | Elem::I32 => 4,
            Elem::F16 | Elem::BF16 | Elem::I16 => 2,
            Elem::I8 | Elem::U8 | Elem::Bool => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Elem::F32 => "float32",
            Elem::F64 => "float64",
            Elem::F16 => "float16",
            Elem::BF16 => "bfloat16",
            Elem::I64 => "int64",
            Elem::I32 => "int32",
            Elem::I16 => "int16",
            Elem::I8 => "int8",
            Elem::U8 => "uint8",
            Elem::Bool => "bool",
        }
    }

    /// The candle dtype holding these elements (bool as 0/1 bytes), if any.
    fn dtype(self) -> Option<DType> {
        Some(match self {
            Elem::F32 => DType::F32,
            Elem::F64 => DType::F64,
            Elem::F16 => DType::F16,
            Elem::BF16 => DType::BF16,
            Elem::I64 => DType::I64,
            Elem::I32 => DType::I32,
            Elem::I16 => DType::I16,
            Elem::U8 | Elem::Bool => DType::U8,
            Elem::I8 => return None,
        })
    }
}

/// A storage as the file names it: its key (usually a decimal number) and the element
/// type of its first use, which sizes a legacy file's storage records.
#[derive(Debug)]
struct StorageInfo {
    key: String,
    elem: Elem,
}

/// A storage as a persistent id names it: the storage (an index into the unpickler's
/// `storages`), an element type, and (for legacy views) an element offset and length
/// within that storage.
#[derive(Debug, Clone, Copy)]
struct StorageRef {
    index: usize,
    elem: Elem,
    /// In elements of `elem`.
    offset: usize,
    /// Declared length in elements (a view's length; else the storage's).
    numel: usize,
}

/// What `_rebuild_tensor_v2(storage, storage_offset, size, stride, ...)` describes.
#[derive(Debug, Clone)]
struct TensorRec {
    storage: StorageRef,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// Builds every record's tensor, charging the bytes against the budget.
fn materialise_all(
    path: &Path,
    records: &[(String, TensorRec)],
    infos: &[StorageInfo],
    storages: &[Option<&[u8]>],
    budget: u64,
) -> Result<Vec<(String, Tensor)>> {
    let mut spent: u64 = 0;
    let mut out = Vec::with_capacity(records.len());
    for (name, rec) in records {
        let key = &infos[rec.storage.index].key;
        let bytes = storages[rec.storage.index].ok_or_else(|| {
            Error::at(
                path,
                None,
                Some(name),
                format!("its storage `{key}` is missing from the file"),
            )
        })?;
        let t = materialise(path, name, key, rec, bytes, budget, &mut spent)?;
        out.push((name.clone(), t));
    }
    Ok(out)
}

/// Copies the strided view `rec` of `storage` into a contiguous tensor.
fn materialise(
    path: &Path,
    name: &str,
    key: &str,
    rec: &TensorRec,
    storage: &[u8],
    budget: u64,
    spent: &mut u64,
) -> Result<Tensor> {
    let bad = |msg: String| Error::at(path, None, Some(name), msg);
    let elem = rec.storage.elem;
    let dtype = elem.dtype().ok_or_else(|| {
        bad(format!(
            "{} tensors are not supported (candle has no such type)",
            elem.name()
        ))
    })?;
    let es = elem.size();
    // The storage (or legacy view) this tensor indexes, in elements.
    let view_end = rec
        .storage
        .offset
        .checked_add(rec.storage.numel)
        .and_then(|e| e.checked_mul(es))
        .filter(|&e| e <= storage.len())
        .ok_or_else(|| {
            bad(format!(
                "storage `{}` holds {} bytes, fewer than its declared {} {} elements (offset {})",
                key,
                storage.len(),
                rec.storage.numel,
                elem.name(),
                rec.storage.offset
            ))
        })?;
    let src = &storage[rec.storage.offset * es..view_end];
    let avail = rec.storage.numel;

    let numel = rec
        .size
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("size {:?} overflows", rec.size)))?;
    if numel > 0 {
        // The furthest element the view touches must lie inside the storage.
        let last = rec
            .size
            .iter()
            .zip(&rec.stride)
            .try_fold(rec.offset, |acc, (&d, &s)| {
                (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
            });
        if !matches!(last, Some(l) if l < avail) {
            return Err(bad(format!(
                "offset {}, size {:?} and stride {:?} reach past its storage of {} elements",
                rec.offset, rec.size, rec.stride, avail
            )));
        }
    }
    let nbytes = numel
        .checked_mul(es)
        .ok_or_else(|| bad(format!("size {:?} overflows", rec.size)))?;
    *spent = spent.saturating_add(nbytes as u64);
    if *spent > budget {
        return Err(bad(format!(
            "the tensors would take more than {budget} bytes once unpacked; refusing (a stride-0 tensor repeating its storage?)"
        )));
    }

    let mut buf = Vec::with_capacity(nbytes);
    if numel > 0 {
        gather(src, es, rec.offset, &rec.size, &rec.stride, &mut buf);
    }
    debug_assert_eq!(buf.len(), nbytes);
    if elem == Elem::Bool && buf.iter().any(|&b| b > 1) {
        return Err(bad("a bool tensor holds values other than 0 and 1".into()));
    }
    Tensor::from_raw_buffer(&buf, dtype, &rec.size, &Device::Cpu).map_err(|e| bad(e.to_string()))
}

/// Appends the elements of the strided view (`offset`, `size`, `stride`, in elements
/// of `es` bytes) of `src` to `out` in row-major order. The caller has checked that
/// every index lies inside `src`.
fn gather(
    src: &[u8],
    es: usize,
    offset: usize,
    size: &[usize],
    stride: &[usize],
    out: &mut Vec<u8>,
) {
    let nd = size.len();
    if nd == 0 {
        out.extend_from_slice(&src[offset * es..(offset + 1) * es]);
        return;
    }
    // Row-major contiguous (dimensions of size 1 may have any stride): one copy.
    let mut expect = 1;
    let mut contiguous = true;
    for d in (0..nd).rev() {
        if size[d] != 1 && stride[d] != expect {
            contiguous = false;
            break;
        }
        expect *= size[d];
    }
    if contiguous {
        let n: usize = size.iter().product();
        out.extend_from_slice(&src[offset * es..(offset + n) * es]);
        return;
    }
    let (inner, inner_stride) = (size[nd - 1], stride[nd - 1]);
    let mut idx = vec![0usize; nd - 1];
    loop {
        let base = offset + idx.iter().zip(stride).map(|(&i, &s)| i * s).sum::<usize>();
        if inner_stride == 1 {
            out.extend_from_slice(&src[base * es..(base + inner) * es]);
        } else {
            for j in 0..inner {
                let at = (base + j * inner_stride) * es;
                out.extend_from_slice(&src[at..at + es]);
            }
        }
        // Odometer over the outer dimensions.
        let mut d = nd - 1;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The restricted unpickler
// ---------------------------------------------------------------------------------------

/// An index into the unpickler's arena.
type Id = usize;

/// The allow-listed callables; applying one is interpreted, never executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Callable {
    /// `torch._utils._rebuild_tensor_v2`
    RebuildTensorV2,
    /// `torch._utils._rebuild_tensor`
    RebuildTensor,
    /// `torch._utils._rebuild_parameter`
    RebuildParameter,
    /// `torch._utils._rebuild_parameter_with_state`
    RebuildParameterWithState,
    /// `torch._tensor._rebuild_from_type_v2`
    RebuildFromTypeV2,
    /// `torch.Tensor` or `torch.nn.parameter.Parameter`, only as `_rebuild_from_type_v2`'s type.
    TensorType,
    /// `collections.OrderedDict`
    OrderedDict,
}

/// A value of the interpreted pickle. Containers hold arena ids, so there is no
/// recursion anywhere and cycles cost nothing.
#[derive(Debug)]
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too wide for `i64`: its little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    /// A float (its value is never needed).
    Float,
    Str(String),
    /// A bytes object (its contents are never needed).
    Bytes,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    /// Items in insertion order. Repeated keys are kept as they come: they only matter in
    /// the state dict, where they are refused.
    Dict(Vec<(Id, Id)>),
    Callable(Callable),
    StorageType(Elem),
    Storage(StorageRef),
    Tensor(Box<TensorRec>),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "a bool",
            Obj::Int(_) | Obj::BigInt(_) => "an int",
            Obj::Float => "a float",
            Obj::Str(_) => "a string",
            Obj::Bytes => "bytes",
            Obj::Tuple(_) => "a tuple",
            Obj::List(_) => "a list",
            Obj::Dict(_) => "a dict",
            Obj::Callable(_) => "a callable",
            Obj::StorageType(_) => "a storage type",
            Obj::Storage(_) => "a storage",
            Obj::Tensor(_) => "a tensor",
        }
    }
}

/// Pickle opcodes (protocol 0-5 names).
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const BINFLOAT: u8 = b'G';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINUNICODE: u8 = b'X';
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const INST: u8 = b'i';
    pub const LONG_BINGET: u8 = b'j';
    pub const EMPTY_LIST: u8 = b']';
    pub const OBJ: u8 = b'o';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const SETITEMS: u8 = b'u';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const EMPTY_DICT: u8 = b'}';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const EXT1: u8 = 0x82;
    pub const EXT2: u8 = 0x83;
    pub const EXT4: u8 = 0x84;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
}

/// The interpreter: reads pickles one after another from `data`.
struct Unpickler<'a> {
    path: &'a Path,
    data: &'a [u8],
    /// Where the next pickle starts (after `load`, just past its STOP).
    pos: usize,
    /// Where the opcode being run starts, for messages.
    op_pos: usize,
    arena: Vec<Obj>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    /// Every storage a persistent id has named, in order of first use.
    storages: Vec<StorageInfo>,
    /// `storages` by key.
    storage_by_key: HashMap<String, usize>,
    /// `storages` by the arena id of a key already looked up.
    storage_by_id: HashMap<Id, usize>,
    /// Bytes copied from built values so far (see `charge`).
    copied: Cell<u64>,
}

/// The arena ids of values that are shared rather than allocated per opcode.
const NONE_ID: Id = 0;
const TRUE_ID: Id = 1;
const FALSE_ID: Id = 2;
const EMPTY_TUPLE_ID: Id = 3;

impl<'a> Unpickler<'a> {
    fn new(path: &'a Path, data: &'a [u8]) -> Self {
        Unpickler {
            path,
            data,
            pos: 0,
            op_pos: 0,
            arena: vec![
                Obj::None,
                Obj::Bool(true),
                Obj::Bool(false),
                Obj::Tuple(Vec::new()),
            ],
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            storages: Vec::new(),
            storage_by_key: HashMap::new(),
            storage_by_id: HashMap::new(),
            copied: Cell::new(0),
        }
    }

    fn get(&self, id: Id) -> &Obj {
        &self.arena[id]
    }

    fn alloc(&mut self, obj: Obj) -> Id {
        self.arena.push(obj);
        self.arena.len() - 1
    }

    fn push(&mut self, obj: Obj) {
        let id = self.alloc(obj);
        self.stack.push(id);
    }

    /// A malformed-pickle error at the current opcode.
    fn malformed(&self, what: impl std::fmt::Display) -> Error {
        Error::file(
            self.path,
            format!("malformed pickle at byte {}: {what}", self.op_pos),
        )
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8]> {
        let left = self.data.len() - self.pos;
        if n > left as u64 {
            return Err(Error::file(
                self.path,
                format!(
                    "truncated or corrupt pickle at byte {}: needs {n} bytes, {left} remain",
                    self.op_pos
                ),
            ));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// A newline-terminated ASCII line (the text form of GLOBAL's operands).
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| {
            Error::file(
                self.path,
                format!(
                    "truncated pickle at byte {}: unterminated line",
                    self.op_pos
                ),
            )
        })?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| self.malformed("non-UTF-8 name"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn utf8(&self, b: &[u8]) -> Result<String> {
        String::from_utf8(b.to_vec()).map_err(|_| self.malformed("a string is not valid UTF-8"))
    }

    fn pop(&mut self) -> Result<Id> {
        match self.stack.pop() {
            Some(id) if self.marks.last().is_none_or(|&m| self.stack.len() >= m) => Ok(id),
            _ => Err(self.malformed("stack underflow")),
        }
    }

    fn top(&self) -> Result<Id> {
        match self.stack.last() {
            Some(&id) if self.marks.last().is_none_or(|&m| self.stack.len() > m) => Ok(id),
            _ => Err(self.malformed("stack underflow")),
        }
    }

    /// Pops everything above the last MARK, and the mark.
    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.malformed("no MARK to pop to"))?;
        Ok(self.stack.split_off(m))
    }

    /// Runs one pickle (from `self.pos` to its STOP) and returns the value it builds.
    fn load(&mut self) -> Result<Id> {
        self.stack.clear();
        self.marks.clear();
        self.memo.clear();
        loop {
            self.op_pos = self.pos;
            if self.pos >= self.data.len() {
                return Err(Error::file(
                    self.path,
                    format!(
                        "truncated: the pickle ends at byte {} without STOP",
                        self.pos
                    ),
                ));
            }
            let code = self.u8()?;
            match code {
                op::PROTO => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(self.malformed(format!("unknown pickle protocol {v}")));
                    }
                }
                op::FRAME => {
                    self.u64()?;
                }
                op::STOP => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                op::MARK => self.marks.push(self.stack.len()),
                op::POP => {
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.pop_mark()?;
                    } else {
                        self.pop()?;
                    }
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let v = self.top()?;
                    self.stack.push(v);
                }
                op::NONE => self.stack.push(NONE_ID),
                op::NEWTRUE => self.stack.push(TRUE_ID),
                op::NEWFALSE => self.stack.push(FALSE_ID),
                op::BININT => {
                    let v = self.u32()? as i32;
                    self.push(Obj::Int(v.into()));
                }
                op::BININT1 => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v.into()));
                }
                op::BININT2 => {
                    let v = self.u16()?;
                    self.push(Obj::Int(v.into()));
                }
                op::LONG1 => {
                    let n = self.u8()?;
                    let b = self.take(n.into())?;
                    self.push(long_from_bytes(b));
                }
                op::LONG4 => {
                    let n = self.u32()? as i32;
                    if n < 0 {
                        return Err(self.malformed("negative LONG4 length"));
                    }
                    let b = self.take(n as u64)?;
                    self.push(long_from_bytes(b));
                }
                op::BINFLOAT => {
                    self.take(8)?;
                    self.push(Obj::Float);
                }
                op::BINUNICODE => {
                    let n = self.u32()?;
                    let b = self.take(n.into())?;
                    let s = self.utf8(b)?;
                    self.push(Obj::Str(s));
                }
                op::SHORT_BINUNICODE => {
                    let n = self.u8()?;
                    let b = self.take(n.into())?;
                    let s = self.utf8(b)?;
                    self.push(Obj::Str(s));
                }
                op::BINUNICODE8 => {
                    let n = self.u64()?;
                    let b = self.take(n)?;
                    let s = self.utf8(b)?;
                    self.push(Obj::Str(s));
                }
                // Python 2 `str` (old legacy files): read as text, like torch.load's
                // default `encoding="utf-8"`.
                op::BINSTRING => {
                    let n = self.u32()? as i32;
                    if n < 0 {
                        return Err(self.malformed("negative BINSTRING length"));
                    }
                    let b = self.take(n as u64)?;
                    let s = self.utf8(b)?;
                    self.push(Obj::Str(s));
                }
                op::SHORT_BINSTRING => {
                    let n = self.u8()?;
                    let b = self.take(n.into())?;
                    let s = self.utf8(b)?;
                    self.push(Obj::Str(s));
                }
                op::BINBYTES => {
                    let n = self.u32()?;
                    self.take(n.into())?;
                    self.push(Obj::Bytes);
                }
                op::SHORT_BINBYTES => {
                    let n = self.u8()?;
                    self.take(n.into())?;
                    self.push(Obj::Bytes);
                }
                op::BINBYTES8 => {
                    let n = self.u64()?;
                    self.take(n)?;
                    self.push(Obj::Bytes);
                }
                op::EMPTY_TUPLE => self.stack.push(EMPTY_TUPLE_ID),
                op::EMPTY_LIST => self.push(Obj::List(Vec::new())),
                op::EMPTY_DICT => self.push(Obj::Dict(Vec::new())),
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items));
                }
                op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                    let n = (code - op::TUPLE1 + 1) as usize;
                    let mut items = vec![0; n];
                    for slot in items.iter_mut().rev() {
                        *slot = self.pop()?;
                    }
                    self.push(Obj::Tuple(items));
                }
                op::BINPUT => {
                    let i = self.u8()?;
                    self.memo_put(i.into())?;
                }
                op::LONG_BINPUT => {
                    let i = self.u32()?;
                    self.memo_put(i.into())?;
                }
                op::MEMOIZE => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?;
                }
                op::BINGET => {
                    let i = self.u8()?;
                    self.memo_get(i.into())?;
                }
                op::LONG_BINGET => {
                    let i = self.u32()?;
                    self.memo_get(i.into())?;
                }
                op::APPEND => {
                    let v = self.pop()?;
                    let list = self.top()?;
                    self.append(list, vec![v])?;
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    self.append(list, items)?;
                }
                op::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.set_items(d, vec![k, v])?;
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    let d = self.top()?;
                    self.set_items(d, items)?;
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let obj = self.global(module, name)?;
                    self.push(obj);
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Obj::Str(m), Obj::Str(n)) = (self.get(module), self.get(name)) else {
                        return Err(self.malformed("STACK_GLOBAL operands are not strings"));
                    };
                    let obj = self.global(m, n)?;
                    self.push(obj);
                }
                op::INST => {
                    // Names a class and calls it: refuse the global, or else the opcode.
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                    return Err(self.malformed("INST is not supported"));
                }
                op::OBJ => return Err(self.malformed("OBJ is not supported")),
                op::EXT1 | op::EXT2 | op::EXT4 => {
                    return Err(Error::file(
                        self.path,
                        "refused to load: the pickle names a callable through the copyreg extension registry (only tensor rebuilding is allowed)",
                    ))
                }
                op::REDUCE => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let Obj::Callable(c) = *self.get(f) else {
                        return Err(self.malformed(format!("REDUCE calls {}", self.get(f).kind())));
                    };
                    let Obj::Tuple(args) = self.get(args) else {
                        return Err(self.malformed("REDUCE arguments are not a tuple"));
                    };
                    let args = args.clone();
                    self.charge(args.len() * 8)?;
                    let obj = self.apply(c, &args)?;
                    self.stack.push(obj);
                }
                op::NEWOBJ => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    match (self.get(cls), self.get(args)) {
                        (Obj::Callable(Callable::OrderedDict), Obj::Tuple(a)) if a.is_empty() => {
                            self.push(Obj::Dict(Vec::new()))
                        }
                        _ => return Err(self.malformed("NEWOBJ is only supported for OrderedDict")),
                    }
                }
                op::NEWOBJ_EX => return Err(self.malformed("NEWOBJ_EX is not supported")),
                op::BUILD => {
                    // `obj.__setstate__(state)`: for a dict (an OrderedDict's attributes,
                    // e.g. a state dict's `_metadata`) or a tensor, the state is dropped.
                    let _state = self.pop()?;
                    let obj = self.top()?;
                    match self.get(obj) {
                        Obj::Dict(_) | Obj::Tensor(_) => {}
                        o => return Err(self.malformed(format!("BUILD on {}", o.kind()))),
                    }
                }
                op::BINPERSID => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(pid)?;
                    self.push(Obj::Storage(storage));
                }
                other => {
                    return Err(self.malformed(format!(
                        "unsupported pickle opcode 0x{other:02x} ({:?})",
                        other as char
                    )))
                }
            }
        }
    }

    fn memo_put(&mut self, i: u64) -> Result<()> {
        let v = self.top()?;
        self.memo.insert(i, v);
        Ok(())
    }

    fn memo_get(&mut self, i: u64) -> Result<()> {
        let v = *self
            .memo
            .get(&i)
            .ok_or_else(|| self.malformed(format!("memo entry {i} was never stored")))?;
        self.stack.push(v);
        Ok(())
    }

    fn append(&mut self, list: Id, items: Vec<Id>) -> Result<()> {
        match &mut self.arena[list] {
            Obj::List(l) => {
                l.extend(items);
                Ok(())
            }
            o => {
                let kind = o.kind();
                Err(self.malformed(format!("APPEND to {kind}")))
            }
        }
    }

    fn set_items(&mut self, dict: Id, items: Vec<Id>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed("SETITEMS with an odd number of items"));
        }
        match &mut self.arena[dict] {
            Obj::Dict(d) => {
                d.extend(items.chunks(2).map(|kv| (kv[0], kv[1])));
                Ok(())
            }
            o => {
                let kind = o.kind();
                Err(self.malformed(format!("SETITEM on {kind}")))
            }
        }
    }

    /// Counts `n` bytes copied from values already built (rather than read from the
    /// input), refusing once they pass [`COPY_FACTOR`] times the input: memo references
    /// cost two bytes each, so copying what they point to must be paid for.
    fn charge(&self, n: usize) -> Result<()> {
        let total = self.copied.get().saturating_add(n as u64);
        self.copied.set(total);
        let limit = (self.data.len() as u64).saturating_mul(COPY_FACTOR) + (1 << 20);
        if total > limit {
            return Err(Error::file(
                self.path,
                format!("malformed pickle: it copies more than {limit} bytes of its own values"),
            ));
        }
        Ok(())
    }

    /// The allow-list: what a GLOBAL may name. Anything else is refused here, before it
    /// could be called.
    fn global(&self, module: &str, name: &str) -> Result<Obj> {
        let c = match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") => Callable::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor") => Callable::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Callable::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => {
                Callable::RebuildParameterWithState
            }
            ("torch._tensor", "_rebuild_from_type_v2") => Callable::RebuildFromTypeV2,
            ("torch", "Tensor") | ("torch._tensor", "Tensor") | ("torch.nn.parameter", "Parameter") => {
                Callable::TensorType
            }
            ("collections", "OrderedDict") => Callable::OrderedDict,
            ("torch" | "torch.storage", n) if n.ends_with("Storage") => {
                return match Elem::from_storage_name(n) {
                    Some(e) => Ok(Obj::StorageType(e)),
                    None => Err(Error::file(
                        self.path,
                        format!(
                            "unsupported tensor type {module}.{} (supported: float32, float64, float16, bfloat16, int64, int32, int16, uint8, bool)",
                            shown(n)
                        ),
                    )),
                };
            }
            ("torch.storage", "_load_from_bytes") => {
                return Err(Error::file(
                    self.path,
                    "refused to load: the pickle calls torch.storage._load_from_bytes (a nested torch.load; only tensor rebuilding is allowed)",
                ))
            }
            _ => {
                return Err(Error::file(
                    self.path,
                    format!(
                        "refused to load: the pickle calls {}.{} (only tensor rebuilding is allowed)",
                        shown(module),
                        shown(name)
                    ),
                ))
            }
        };
        Ok(Obj::Callable(c))
    }

    /// Interprets `c(*args)` for an allow-listed callable; returns the result's id.
    fn apply(&mut self, c: Callable, args: &[Id]) -> Result<Id> {
        match c {
            Callable::OrderedDict => {
                let mut d = Vec::new();
                match args {
                    [] => {}
                    [items] => {
                        let (Obj::List(pairs) | Obj::Tuple(pairs)) = self.get(*items) else {
                            return Err(self.malformed("OrderedDict(...) of a non-list"));
                        };
                        self.charge(pairs.len() * 16)?;
                        for &p in pairs {
                            match self.get(p) {
                                Obj::Tuple(kv) | Obj::List(kv) if kv.len() == 2 => {
                                    d.push((kv[0], kv[1]))
                                }
                                _ => return Err(self.malformed("OrderedDict item is not a pair")),
                            }
                        }
                    }
                    _ => return Err(self.malformed("OrderedDict(...) with several arguments")),
                }
                Ok(self.alloc(Obj::Dict(d)))
            }
            Callable::RebuildTensorV2 | Callable::RebuildTensor => {
                let ok_len = match c {
                    Callable::RebuildTensorV2 => (6..=7).contains(&args.len()),
                    _ => args.len() == 4,
                };
                if !ok_len {
                    return Err(
                        self.malformed(format!("tensor rebuild with {} arguments", args.len()))
                    );
                }
                let Obj::Storage(storage) = *self.get(args[0]) else {
                    return Err(self.malformed("tensor rebuild without a storage"));
                };
                let offset = self.usize_of(args[1], "storage offset")?;
                let size = self.dims(args[2], "size")?;
                let stride = self.dims(args[3], "stride")?;
                if size.len() != stride.len() {
                    return Err(
                        self.malformed(format!("tensor of size {size:?} with stride {stride:?}"))
                    );
                }
                Ok(self.alloc(Obj::Tensor(Box::new(TensorRec {
                    storage,
                    offset,
                    size,
                    stride,
                }))))
            }
            Callable::RebuildParameter | Callable::RebuildParameterWithState => {
                // (data, requires_grad, backward_hooks[, state]): the tensor itself.
                let n = if c == Callable::RebuildParameter {
                    3
                } else {
                    4
                };
                match args.first() {
                    Some(&t) if args.len() == n && matches!(self.get(t), Obj::Tensor(_)) => Ok(t),
                    _ => Err(self.malformed("parameter rebuild without a tensor")),
                }
            }
            Callable::RebuildFromTypeV2 => {
                // (func, new_type, args, state): a tensor of type torch.Tensor or Parameter.
                let [func, ty, fargs, _state] = args else {
                    return Err(self.malformed("_rebuild_from_type_v2 needs 4 arguments"));
                };
                let (Obj::Callable(f), Obj::Callable(Callable::TensorType), Obj::Tuple(fargs)) =
                    (self.get(*func), self.get(*ty), self.get(*fargs))
                else {
                    return Err(self.malformed("_rebuild_from_type_v2 of something not a tensor"));
                };
                let f = *f;
                // Only a tensor rebuild, so this recursion is one level deep.
                if !matches!(
                    f,
                    Callable::RebuildTensorV2
                        | Callable::RebuildTensor
                        | Callable::RebuildParameter
                        | Callable::RebuildParameterWithState
                ) {
                    return Err(self.malformed("_rebuild_from_type_v2 of something not a tensor"));
                }
                let fargs = fargs.clone();
                self.charge(fargs.len() * 8)?;
                self.apply(f, &fargs)
            }
            Callable::TensorType => Err(self.malformed("constructing a tensor type directly")),
        }
    }

    fn usize_of(&self, id: Id, what: &str) -> Result<usize> {
        match self.get(id) {
            Obj::Int(v) => usize::try_from(*v)
                .map_err(|_| self.malformed(format!("negative tensor {what} {v}"))),
            o => Err(self.malformed(format!("tensor {what} is {}", o.kind()))),
        }
    }

    fn dims(&self, id: Id, what: &str) -> Result<Vec<usize>> {
        let Obj::Tuple(items) = self.get(id) else {
            return Err(self.malformed(format!("tensor {what} is not a tuple")));
        };
        if items.len() > MAX_DIMS {
            return Err(self.malformed(format!(
                "tensor {what} has {} dimensions (at most {MAX_DIMS})",
                items.len()
            )));
        }
        self.charge(items.len() * 8)?;
        items.iter().map(|&i| self.usize_of(i, what)).collect()
    }

    /// `('storage', torch.XStorage, key, location, numel[, (view_key, offset, size)])`.
    fn persistent_load(&mut self, pid: Id) -> Result<StorageRef> {
        let Obj::Tuple(t) = self.get(pid) else {
            return Err(self.malformed("persistent id is not a tuple"));
        };
        if t.len() < 5 || !matches!(self.get(t[0]), Obj::Str(s) if s == "storage") {
            return Err(self.malformed("persistent id is not a ('storage', ...) record"));
        }
        let (type_id, key_id, numel_id, view) = (t[1], t[2], t[4], t.get(5).copied());
        let Obj::StorageType(elem) = *self.get(type_id) else {
            return Err(self.malformed("persistent id without a storage type"));
        };
        let numel = self.usize_of(numel_id, "storage size")?;
        let (offset, numel) = match view.map(|v| self.get(v)) {
            None | Some(Obj::None) => (0, numel),
            Some(Obj::Tuple(view)) if view.len() == 3 => {
                let off = self.usize_of(view[1], "storage view offset")?;
                let len = self.usize_of(view[2], "storage view size")?;
                if off.checked_add(len).is_none_or(|end| end > numel) {
                    return Err(self.malformed(format!(
                        "storage view [{off}, +{len}) outside its storage of {numel} elements"
                    )));
                }
                (off, len)
            }
            Some(_) => return Err(self.malformed("malformed storage view record")),
        };
        let index = match self.storage_index(key_id) {
            Some(i) => i,
            None => {
                let key = match self.get(key_id) {
                    Obj::Str(s) if !s.is_empty() && s.len() <= MAX_KEY_LEN => s.clone(),
                    Obj::Str(s) => {
                        return Err(self.malformed(format!(
                            "a storage key of {} bytes (1 to {MAX_KEY_LEN})",
                            s.len()
                        )))
                    }
                    Obj::Int(i) => i.to_string(),
                    _ => return Err(self.malformed("storage key is not a string")),
                };
                let i = self.storages.len();
                self.storage_by_key.insert(key.clone(), i);
                self.storages.push(StorageInfo { key, elem });
                i
            }
        };
        self.storage_by_id.insert(key_id, index);
        Ok(StorageRef {
            index,
            elem,
            offset,
            numel,
        })
    }

    /// The storage a key (an arena string or int) names, if a persistent id named it.
    /// The same key object is looked up by id, so a key reused through the memo is
    /// never hashed again.
    fn storage_index(&self, key_id: Id) -> Option<usize> {
        if let Some(&i) = self.storage_by_id.get(&key_id) {
            return Some(i);
        }
        match self.get(key_id) {
            Obj::Str(s) if s.len() <= MAX_KEY_LEN => self.storage_by_key.get(s).copied(),
            Obj::Int(i) => self.storage_by_key.get(&i.to_string()).copied(),
            _ => None,
        }
    }

    /// The value of string key `key` in dict `id`, if `id` is a dict holding it.
    fn dict_get(&self, id: Id, key: &str) -> Option<Id> {
        let Obj::Dict(d) = self.get(id) else {
            return None;
        };
        d.iter()
            .rev()
            .find(|&&(k, _)| matches!(self.get(k), Obj::Str(s) if s == key))
            .map(|&(_, v)| v)
    }

    /// The state dict: `root` if it is a non-empty dict of string → tensor, else the
    /// first such dict found breadth-first below it. Each value is visited once.
    fn find_state_dict(&self, root: Id) -> Result<Vec<(String, TensorRec)>> {
        let mut queue = VecDeque::from([root]);
        let mut seen = HashSet::from([root]);
        while let Some(id) = queue.pop_front() {
            let children: &[Id] = match self.get(id) {
                Obj::Dict(d) => {
                    let is_state_dict = !d.is_empty()
                        && d.iter().all(|&(k, v)| {
                            matches!(self.get(k), Obj::Str(_))
                                && matches!(self.get(v), Obj::Tensor(_))
                        });
                    if is_state_dict {
                        return self.state_dict_records(d);
                    }
                    for &(_, v) in d {
                        if seen.insert(v) {
                            queue.push_back(v);
                        }
                    }
                    continue;
                }
                Obj::List(l) | Obj::Tuple(l) => l,
                _ => continue,
            };
            for &c in children {
                if seen.insert(c) {
                    queue.push_back(c);
                }
            }
        }
        let what = match self.get(root) {
            Obj::Tensor(_) => "a single tensor",
            o => o.kind(),
        };
        Err(Error::file(
            self.path,
            format!("no state dict (a dict of name → tensor) in the file; it holds {what}"),
        ))
    }

    /// The (name, tensor) records of a dict of string → tensor. A repeated name (which
    /// `torch.save` never writes) is refused rather than resolved.
    fn state_dict_records(&self, d: &[(Id, Id)]) -> Result<Vec<(String, TensorRec)>> {
        let mut names = HashSet::with_capacity(d.len());
        let mut out = Vec::with_capacity(d.len());
        for &(k, v) in d {
            let (Obj::Str(name), Obj::Tensor(t)) = (self.get(k), self.get(v)) else {
                unreachable!("checked by find_state_dict");
            };
            if !names.insert(name.as_str()) {
                return Err(Error::file(
                    self.path,
                    format!("the state dict names tensor `{}` twice", shown(name)),
                ));
            }
            self.charge(name.len() + 64 + 16 * t.size.len())?;
            out.push((name.clone(), (**t).clone()));
        }
        Ok(out)
    }
}

/// A pickle LONG (little-endian two's complement) as an `Obj`.
fn long_from_bytes(b: &[u8]) -> Obj {
    if b.is_empty() {
        return Obj::Int(0);
    }
    if b.len() > 8 {
        return Obj::BigInt(b.to_vec());
    }
    let fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
    let mut full = [fill; 8];
    full[..b.len()].copy_from_slice(b);
    Obj::Int(i64::from_le_bytes(full))
}

/// A name from the file made safe for a one-line message.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(100).flat_map(char::escape_debug).collect();
    if s.chars().count() > 100 {
        out.push('…');
    }
    out
}

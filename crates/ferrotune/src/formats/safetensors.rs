//! safetensors files: the tensors of a checkpoint, or only its header (names and shapes),
//! with errors that name the file.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// Reads a safetensors file into named tensors, with errors naming the file.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        Error::file(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    })
}

/// An int8 tensor (candle has no int8 type): its shape and elements, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct I8Tensor {
    /// The shape.
    pub shape: Vec<usize>,
    /// The elements.
    pub data: Vec<i8>,
}

/// Reads a safetensors file that may hold int8 tensors (a quantized model): those come
/// back as [`I8Tensor`]s, every other tensor as a candle tensor. Errors name the file.
pub fn read_safetensors_with_i8(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, HashMap<String, I8Tensor>)> {
    use candle_core::safetensors::Load;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: String| {
        Error::file(
            path,
            format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        )
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let (mut tensors, mut int8) = (HashMap::new(), HashMap::new());
    for (name, view) in st.tensors() {
        if view.dtype() == safetensors::Dtype::I8 {
            let data = view.data().iter().map(|&b| b as i8).collect();
            int8.insert(
                name,
                I8Tensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        } else {
            let t = view
                .load(device)
                .map_err(|e| Error::at(path, None, Some(&name), format!("cannot read: {e}")))?;
            tensors.insert(name, t);
        }
    }
    Ok((tensors, int8))
}

/// Reads the header of a safetensors file: tensor names and shapes, without the data,
/// sorted by name.
pub fn safetensors_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| Error::file(path, "too short to be a safetensors file"))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || n + 8 > len {
        return Err(Error::file(
            path,
            format!("invalid safetensors header length {n} (file of {len} bytes)"),
        ));
    }
    let mut buf = vec![0u8; n as usize];
    f.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value = serde_json::from_slice(&buf)
        .map_err(|e| Error::file(path, format!("invalid safetensors header: {e}")))?;
    let mut out = Vec::new();
    if let Some(m) = v.as_object() {
        for (k, t) in m {
            if k == "__metadata__" {
                continue;
            }
            let shape = t
                .get("shape")
                .and_then(|s| s.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d.as_u64())
                        .map(|d| d as usize)
                        .collect()
                })
                .unwrap_or_default();
            out.push((k.clone(), shape));
        }
    }
    out.sort();
    Ok(out)
}

/// One f32 tensor to write, its data borrowed.
pub struct F32View<'a> {
    /// The shape.
    pub shape: Vec<usize>,
    /// The elements, row-major.
    pub data: &'a [f32],
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        // safetensors is little-endian, as are the machines ferrotune builds for.
        const _: () = assert!(cfg!(target_endian = "little"));
        // Safety: any f32 bit pattern is 4 valid bytes; the slice outlives the borrow.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(self.data.as_ptr().cast::<u8>(), self.data.len() * 4)
        })
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// One tensor to write, f32 or int8, its data borrowed.
pub enum TensorView<'a> {
    /// f32 elements.
    F32(F32View<'a>),
    /// int8 elements and the shape.
    I8(&'a I8Tensor),
}

impl safetensors::View for TensorView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self {
            TensorView::F32(_) => safetensors::Dtype::F32,
            TensorView::I8(_) => safetensors::Dtype::I8,
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            TensorView::F32(v) => &v.shape,
            TensorView::I8(t) => &t.shape,
        }
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            TensorView::F32(v) => v.data(),
            // Safety: i8 and u8 have the same size and any bit pattern is valid.
            TensorView::I8(t) => std::borrow::Cow::Borrowed(unsafe {
                std::slice::from_raw_parts(t.data.as_ptr().cast::<u8>(), t.data.len())
            }),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            TensorView::F32(v) => v.data_len(),
            TensorView::I8(t) => t.data.len(),
        }
    }
}

/// Writes f32 and int8 tensors to `path` as safetensors (with `metadata` in the header),
/// errors as [`write_f32_safetensors`].
pub fn write_mixed_safetensors(
    tensors: Vec<(String, TensorView<'_>)>,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    safetensors::serialize_to_file(tensors, metadata, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => Error::io(path, io),
        e => Error::Msg(format!("{}: cannot write: {e}", path.display())),
    })
}

/// Writes borrowed f32 tensors to `path` as safetensors: no copy of the data is made
/// (candle's `save` copies each tensor, and a checkpoint's optimizer state had to become
/// tensors first: ~3x the model's size in passing). A failed write (a full disk, a denied
/// permission) is an [`Error::Io`] naming `path`, never an input error.
pub fn write_f32_safetensors(tensors: Vec<(String, F32View<'_>)>, path: &Path) -> Result<()> {
    safetensors::serialize_to_file(tensors, None, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => Error::io(path, io),
        e => Error::Msg(format!("{}: cannot write: {e}", path.display())),
    })
}

/// Writes `tensors` to `path` as safetensors; f32 CPU tensors without a copy (see
/// [`write_f32_safetensors`]), others through candle. I/O errors as there.
pub fn write_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let all_f32 = tensors
        .values()
        .all(|t| t.dtype() == candle_core::DType::F32 && t.device().is_cpu());
    if !all_f32 {
        return candle_core::safetensors::save(tensors, path).map_err(|e| match io_error(e) {
            Ok(io) => Error::io(path, io),
            Err(e) => Error::Msg(format!("{}: cannot write: {e}", path.display())),
        });
    }
    let tensors: Vec<(&String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n, t.contiguous()?)))
        .collect::<Result<_>>()?;
    let guards: Vec<_> = tensors
        .iter()
        .map(|(_, t)| t.storage_and_layout())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, t), (storage, layout)) in tensors.iter().zip(&guards) {
        let candle_core::Storage::Cpu(cpu) = &**storage else {
            return Err(Error::Msg(
                "internal: a CPU tensor without CPU storage".into(),
            ));
        };
        let data = crate::kernels::par::f32_data(cpu, layout)?;
        views.push((
            name.to_string(),
            F32View {
                shape: t.dims().to_vec(),
                data,
            },
        ));
    }
    write_f32_safetensors(views, path)
}

/// The I/O error inside a candle error, if that is what it is.
fn io_error(e: candle_core::Error) -> std::result::Result<std::io::Error, candle_core::Error> {
    use candle_core::Error as E;
    match e {
        E::Io(io) | E::SafeTensor(safetensors::SafeTensorError::IoError(io)) => Ok(io),
        E::WithBacktrace { inner, .. } | E::WithPath { inner, .. } | E::Context { inner, .. } => {
            io_error(*inner)
        }
        e => Err(e),
    }
}

//! File formats: weights, read as data only, and TensorBoard's event files.
//!
//! - [`safetensors`]: Hugging Face's safetensors files (and their headers alone).
//! - [`pickle`]: PyTorch weight files (`.bin`, `.pth`) through an unpickler that can only
//!   rebuild tensors: no code in the file ever runs.
//! - [`tfevents`]: TensorBoard event files (written; read back for checks).

pub mod pickle;
pub mod safetensors;
pub mod tfevents;

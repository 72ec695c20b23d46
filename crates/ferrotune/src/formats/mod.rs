//! Weight file formats, read as data only.
//!
//! - [`safetensors`]: Hugging Face's safetensors files (and their headers alone).
//! - [`pickle`]: PyTorch weight files (`.bin`, `.pth`) through an unpickler that can only
//!   rebuild tensors: no code in the file ever runs.

pub mod pickle;
pub mod safetensors;

//! Layers and the machinery every model family builds on.
//!
//! - [`ctx`]: the per-forward context (training or inference, frozen groups, dropout).
//! - [`batch`]: the model input.
//! - [`layers`]: linear, layer norm, RMS norm, embedding, activations.
//! - [`conv`]: convolution, batch norm, ReLU6, pooling (image models, channels last).
//! - [`decoder`]: rotary embeddings, causal attention and the KV cache of decoder families.
//! - [`encoder`]: the post-layer-norm transformer encoder of BERT-style families.
//! - [`head`]: pooling and the sequence-classification heads.
//! - [`builder`]: loading a model's parameters by name from a checkpoint (or at random).
//! - [`params`]: the parameters and their layer groups.

pub mod batch;
pub mod builder;
pub mod conv;
pub mod ctx;
pub mod decoder;
pub mod encoder;
pub mod head;
pub mod layers;
pub mod params;

pub use batch::{Batch, PixelBatch, TokenBatch};
pub use builder::{Builder, Init, Weights};
pub use ctx::Ctx;
pub use head::Pooling;
pub use params::{Group, GroupKind, Param, ParamStore};

/// The device models run on. One place to choose it: the CPU today; a GPU build will pick
/// CUDA here.
pub fn device() -> candle_core::Device {
    candle_core::Device::Cpu
}

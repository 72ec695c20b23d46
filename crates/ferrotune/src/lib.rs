//! # ferrotune
//!
//! Fine-tune pretrained transformer models on your own labelled data, evaluate them, export
//! them in the Hugging Face format and predict with them — in Rust, with no Python.
//!
//! The path of data, one module per stage (imports point down this list, never up):
//!
//! 1. [`config`] — the recipe (TOML + `--set` overrides), validated once.
//! 2. [`data`] — readers (CSV, TSV, JSONL, directory per class), labels, the seeded
//!    stratified split, and the input encoder (tokenizer, dynamically padded batches).
//! 3. [`tasks`] — what each `problem_type` means: targets, default loss, metrics, output.
//! 4. [`families`] — model families (BERT, RoBERTa, DistilBERT, MPNet, EfficientNet,
//!    ResNet, Llama), one folder each, registered by `config.json`'s `model_type`.
//! 5. [`nn`] — layers families share (linear, layer norm, the transformer encoder,
//!    classification heads), the parameter store with its layer groups, the weight loader.
//! 6. [`kernels`] — CPU kernels with forward and backward passes.
//! 7. [`loss`], [`optim`] — losses; AdamW, SGD and learning-rate schedules.
//! 8. [`train`] — the training loop, one step, checkpoints, parameter groups.
//! 9. [`eval`] — metrics.
//! 10. [`infer`], [`predict`] — inference for any family; a fine-tuned model loaded from
//!     its exported directory ([`artifact`]); [`generate`] — text from a decoder.
//! 11. [`export`] — the Hugging Face directory written at the end of a run;
//!     [`quantize`] — an exported model's int8 copy.
//! 12. `serve` (cargo feature `serve`) — the HTTP inference server over [`predict`].
//! 13. [`report`] — the HTML report and PNG plots of a run directory (files only).
//! 14. [`formats`] — safetensors and PyTorch pickle files, read as data only.
//! 15. [`precision`] — f32, bf16, int8 or auto: what runs on this CPU (used by 1, 8, 10).
//! 16. [`malloc`] — allocator settings a long-running process makes first (the CLI does).
#![warn(missing_docs)]

pub mod artifact;
pub mod bench;
pub mod card;
pub mod config;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
pub mod export;
pub mod families;
pub mod formats;
pub mod generate;
pub mod infer;
pub mod kernels;
pub mod loss;
pub mod malloc;
pub mod nn;
pub mod optim;
pub mod precision;
pub mod predict;
pub mod quantize;
pub mod report;
#[cfg(feature = "serve")]
pub mod serve;
pub mod tasks;
pub mod testing;
pub mod train;

pub use config::TrainConfig;
pub use error::{Error, Result};

/// True for a debug build (`cargo build` without `--release`): this crate is then compiled
/// at `opt-level = 1` with its assertions, so a timing from it says nothing about
/// ferrotune's speed (a SmolLM2 LoRA step ran at 112-128 tokens/s in one against ~150 in
/// the release build on the same 2 cores, docs/DECODERS.md). `ferrotune --version` and a
/// run's start message say so, and the bench scripts refuse to compare one.
pub const DEBUG_BUILD: bool = cfg!(debug_assertions);

/// `"release"` or `"debug"` ([`DEBUG_BUILD`]), written into every run's log and every
/// `ferrotune bench` result.
pub const BUILD_PROFILE: &str = if DEBUG_BUILD { "debug" } else { "release" };

/// The number of threads the kernels use: `RAYON_NUM_THREADS` when set, else the physical
/// cores. Read it once and set `RAYON_NUM_THREADS` to it before the first operation (as the
/// CLI does): candle re-reads the count on every operation, parsing `/proc/cpuinfo` each
/// time when the variable is unset.
pub fn num_threads() -> usize {
    candle_core::utils::get_num_threads()
}

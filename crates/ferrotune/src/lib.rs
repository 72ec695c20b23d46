//! # ferrotune
//!
//! Fine-tune pretrained transformer models on your own labelled data, evaluate them, export
//! them in the Hugging Face format and predict with them — in Rust, with no Python.
//!
//! The path of data, one module per stage:
//!
//! 1. [`config`] — the recipe (TOML + `--set` overrides), validated once.
//! 2. [`data`] — readers (CSV, TSV, JSONL, directory per class), labels, the seeded
//!    stratified split, tokenization and dynamically padded batches.
//! 3. [`models`] — the Hugging Face `config.json`, the tokenizer, BERT with a classification
//!    head, and the parameter store with its layer groups.
//! 4. [`train`] — loss, AdamW, learning-rate schedule and the training loop.
//! 5. [`eval`] — metrics.
//! 6. [`export`] — the Hugging Face directory written at the end of a run.
//! 7. [`predict`] — inference on an exported model.
//! 8. `serve` (cargo feature `serve`) — the HTTP inference server over [`predict`].
#![warn(missing_docs)]

pub mod bench;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod models;
pub mod predict;
#[cfg(feature = "serve")]
pub mod serve;
pub mod task;
pub mod testing;
pub mod train;

pub use config::TrainConfig;
pub use error::{Error, Result};

/// The number of threads the kernels use: `RAYON_NUM_THREADS` when set, else the physical
/// cores. Read it once and set `RAYON_NUM_THREADS` to it before the first operation (as the
/// CLI does): candle re-reads the count on every operation, parsing `/proc/cpuinfo` each
/// time when the variable is unset.
pub fn num_threads() -> usize {
    candle_core::utils::get_num_threads()
}

//! Reading users' labelled data, mapping labels to ids, splitting it, and encoding it as
//! model input.
//!
//! Data goes through these stages:
//!
//! 1. [`reader`]: [`read_examples`] turns a data set on disk into a list of [`Example`]s
//!    (text, optional text pair, optional raw label, and where each came from). The
//!    format is chosen by what the path is: a directory with one subdirectory per class,
//!    or a `.csv`, `.tsv`, `.jsonl`/`.ndjson`/`.json` (one object per line) or `.txt`
//!    (one text per line, no labels) file. Every problem with the input is reported as
//!    one line naming the file and, where there is one, the line and the column.
//! 2. [`labels`]: [`LabelMap`] is the fixed, sorted list of classes found in the
//!    training data; it turns raw labels into class ids (single- or multi-label) and
//!    rejects labels the training data does not contain.
//! 3. [`split`]: [`stratified_split`] carves a deterministic, per-class held-out set out
//!    of the training examples when the user has no separate evaluation file. Its hash
//!    ([`split_key`]) is documented so that the same split can be reproduced outside Rust.
//! 4. [`encoder`]: the [`InputEncoder`] that turns examples into model input —
//!    [`TextEncoder`]: the model's tokenizer ([`tokenizer`]), tokenization once up front
//!    and batches padded to their own longest sequence ([`batch`]).
//!
//! [`image`] decodes images and IDX files and runs torchvision-style transforms;
//! [`mixup`] blends training batches of images (timm's mixup and CutMix).

pub mod batch;
pub mod encoder;
pub mod image;
pub mod labels;
pub mod lm;
pub mod mixup;
pub mod reader;
pub mod split;
pub mod tokenizer;

pub use encoder::{encoder_for, ImageEncoder, ImageRecipe, InputEncoder, TextEncoder};
pub use labels::LabelMap;
pub use reader::{read_examples, EncodingErrors, Example, RawLabel, ReaderOptions};
pub use split::{fmix64, fnv1a64, split_key, stratified_split};

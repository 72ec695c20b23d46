//! Training: everything before the first step ([`prepare`]), the loop ([`trainer`]), one
//! step's arithmetic ([`step`]), per-group learning rates and freezing ([`groups`]),
//! checkpoints ([`checkpoint`]), what a run reports ([`log`]) and the held-out predictions it
//! leaves ([`held_out`]); a causal-LM run's data and evaluation ([`causal_lm`]). Losses are in
//! [`crate::loss`], the optimizers and schedules in [`crate::optim`].

pub mod causal_lm;
pub mod checkpoint;
pub mod ema;
pub mod groups;
pub mod held_out;
pub mod log;
pub mod prepare;
pub mod step;
pub mod trainer;

pub use checkpoint::EpochMetrics;
pub use log::{Progress, Silent};
pub use trainer::{train, train_with, Control, TrainSummary};

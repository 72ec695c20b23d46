//! Training: the loop ([`trainer`]), losses ([`loss`]), the optimizer ([`optim`]) and
//! learning-rate schedules ([`schedule`]).

pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use trainer::{train, train_with, Control, Progress, Silent, TrainSummary};

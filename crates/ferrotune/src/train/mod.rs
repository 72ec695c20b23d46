//! Training: the loop ([`trainer`]), losses ([`loss`]), the optimizer ([`optim`]) and
//! learning-rate schedules ([`schedule`]).

pub mod loss;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use trainer::{train, Progress, Silent, TrainSummary};

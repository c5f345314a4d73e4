//! Prefix-tuning training: data, optimisers, the training loop with checkpoints, the loss
//! picture.

pub mod data;
pub mod optim;
pub mod plot;
pub mod trainer;

pub use trainer::{train, Length, StepInfo, TrainConfig, TrainReport};

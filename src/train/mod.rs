//! Training and evaluation data.

pub mod data;

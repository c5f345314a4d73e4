//! GPT-2 as Hugging Face transformers defines it: config, weights, tokenizer, the forward
//! pass with prefix K/V, the manual backward to the prefix, and greedy generation.

pub mod config;
pub mod generate;
pub mod model;
pub mod oracle;
pub mod paged;
pub mod random;
pub mod tokenizer;
pub mod weights;

pub use config::Gpt2Config;
pub use model::{Activations, Batch, Gpt2, Gradients, KvCache, LossSum};

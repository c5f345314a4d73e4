//! The Llama family (model types `llama`, `qwen2`, `mistral`) as Hugging Face transformers
//! defines it: config, weights, the forward pass with prefix K/V (RMSNorm, rotary positions
//! on the new keys and queries, never on the prefix, grouped-query attention, the SwiGLU
//! MLP), and the manual backward to the prefix. [`Llama`] implements the model seam
//! [`crate::lm::PrefixLm`], the serving step included (`paged.rs`); docs/ARCHITECTURE.md §11
//! has the facts it relies on.

pub mod config;
pub mod model;
pub mod oracle;
pub mod paged;
pub mod random;
pub mod weights;

pub use config::LlamaConfig;
pub use model::{Activations, GradScratch, Llama};

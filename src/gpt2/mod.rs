//! GPT-2 as Hugging Face transformers defines it: config, weights, the forward pass with
//! prefix K/V, and the manual backward to the prefix. [`Gpt2`] implements the model seam
//! [`crate::lm::PrefixLm`].

pub mod config;
pub mod model;
pub mod oracle;
pub mod paged;
pub mod random;
pub mod weights;

pub use config::Gpt2Config;
pub use model::{Activations, Gpt2, Gradients};

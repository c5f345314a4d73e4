//! The prefix of prefix-tuning: the MLP reparameterisation that produces it during training
//! ([`encoder`]) and the PEFT adapter files that store it afterwards ([`adapter`]).

pub mod adapter;
pub mod encoder;

pub use adapter::{AdapterConfig, PrefixAdapter};
pub use encoder::PrefixEncoder;

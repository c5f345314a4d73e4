//! # prefix-attn
//!
//! Fused **prefix attention** (the attention of prefix-tuning, Li & Liang 2021): every layer
//! of a frozen transformer attends over `[prefix K/V ; sequence K/V]`, and this crate computes
//! that without materialising the concatenation, forward and backward.
//!
//! - [`tensor`]: tensor handles and strided views (read GPT-2's fused `qkv` in place).
//! - [`simd`]: the vectorisable elementwise math (`exp`, `tanh`, GELU) of the CPU paths.
//! - [`attn`]: the attention contract, its argument types, the fused CPU implementation and
//!   the f64 oracle.
//! - [`device`]: the backend interface that the model and the attention API run on.
//! - [`lm`]: the model seam (what training and decoding need of a model family), with the
//!   batch, loss, KV cache, generation; [`gpt2`] is the one family today.
//! - [`engine`]: continuous batching over a paged KV cache, many adapters in one batch;
//!   [`server`]: the OpenAI-compatible HTTP server over it.
//! - [`prefix`], [`train`]: the prefix encoder and PEFT adapters, and the training loop.
//! - `candle` (feature `candle`): the attention as a candle op with its backward.
//!
//! ```
//! use prefix_attn::attn::{AttnFwdArgs, AttnFwdOut};
//! use prefix_attn::device::{backend, Device};
//! use prefix_attn::tensor::{DType, Tensor};
//!
//! # fn main() -> prefix_attn::Result<()> {
//! // GPT-2-like fused qkv [B=2, T=3, 3, H=2, D=4] and a prefix table [NP=1, P=2, H=2, D=4].
//! let vals: Vec<f32> = (0..2 * 3 * 3 * 2 * 4).map(|i| (i as f32 * 0.37).sin()).collect();
//! let qkv = Tensor::from_f32(&[2, 3, 3, 2, 4], &vals, DType::F16)?;
//! let pre: Vec<f32> = (0..2 * 2 * 4).map(|i| (i as f32 * 0.11).cos()).collect();
//! let k_pre = Tensor::from_f32(&[1, 2, 2, 4], &pre, DType::F16)?;
//! let v_pre = k_pre.clone();
//! let qkv_v = qkv.view();
//! let args = AttnFwdArgs::new(qkv_v.select(2, 0)?, qkv_v.select(2, 1)?, qkv_v.select(2, 2)?)
//!     .prefix(k_pre.view(), v_pre.view())
//!     .causal(true);
//! let mut o = Tensor::zeros(&[2, 3, 2, 4], DType::F16)?;
//! let mut lse = Tensor::zeros(&[2, 2, 3], DType::F32)?;
//! let cpu = backend(Device::Cpu)?;
//! cpu.attn_fwd(&args, AttnFwdOut { o: o.view_mut(), lse: Some(lse.view_mut()) })?;
//! assert!(lse.to_f32_vec().iter().all(|x| x.is_finite()));
//! # Ok(())
//! # }
//! ```

pub mod attn;
pub mod bench;
#[cfg(feature = "candle")]
pub mod candle;
pub mod capi;
pub mod demo;
pub mod device;
pub mod engine;
pub mod error;
pub mod gpt2;
pub mod hf;
pub mod io;
pub mod llama;
pub mod lm;
pub mod prefix;
pub mod rng;
pub mod server;
pub mod simd;
pub mod tensor;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};

//! The CPU backend: plain Rust, the reference every other backend is checked against.

use super::{Backend, Device};
use crate::attn::{cpu, AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads};
use crate::error::{Error, Result};
use crate::tensor::{DType, Location, Tensor};

/// The CPU backend (multi-threaded through rayon).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        Tensor::zeros(shape, dtype)
    }
    fn upload(&self, host: &Tensor) -> Result<Tensor> {
        Ok(host.clone())
    }
    fn download(&self, t: &Tensor) -> Result<Tensor> {
        if t.location() != Location::Host {
            return Err(Error::device(
                "tensor",
                format!(
                    "lives on {}, the cpu backend reads host tensors",
                    t.location()
                ),
            ));
        }
        Ok(t.clone())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn attn_fwd(&self, args: &AttnFwdArgs, out: AttnFwdOut) -> Result<()> {
        cpu::forward(args, out)
    }
    fn attn_bwd(&self, args: &AttnBwdArgs, grads: AttnGrads) -> Result<()> {
        cpu::backward(args, grads)
    }
}

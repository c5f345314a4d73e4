//! Where work runs: the backend interface and its devices.
//!
//! The GPT-2 model and the attention API are written once against [`Backend`]. The `cpu`
//! backend is plain Rust and is the reference; `emu` (the CUDA kernels run on the CPU by the
//! emulator) and `cuda` (the kernels on a GPU, through cudarc) implement the same trait.

pub mod cpu;

use crate::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads};
use crate::error::{Error, Result};
use crate::tensor::{DType, Location, Tensor};
use std::fmt;
use std::str::FromStr;

/// A device that work can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// Plain Rust on the host (the reference).
    Cpu,
    /// The CUDA kernels compiled for the host and run by the CPU emulator (a test instrument).
    Emu,
    /// A CUDA GPU, by ordinal.
    Cuda(usize),
}

impl Device {
    /// Where this device's tensors live.
    pub fn location(self) -> Location {
        match self {
            Device::Cpu | Device::Emu => Location::Host,
            Device::Cuda(i) => Location::Cuda(i),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Emu => f.write_str("emu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "emu" => Ok(Device::Emu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| {
                    Error::device(
                        "device",
                        format!("{s:?}, expected cpu, emu, cuda or cuda:N"),
                    )
                }),
        }
    }
}

/// The operations the model and the attention API need from a device. Every method checks
/// its arguments (shapes, dtypes, devices) and returns an error rather than panicking.
pub trait Backend: Send + Sync {
    /// The device this backend runs on.
    fn device(&self) -> Device;

    /// A zero-filled tensor in this device's memory.
    fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor>;

    /// A copy of a host tensor in this device's memory.
    fn upload(&self, host: &Tensor) -> Result<Tensor>;

    /// A host copy of a tensor of this device.
    fn download(&self, t: &Tensor) -> Result<Tensor>;

    /// Waits until all queued work has finished.
    fn synchronize(&self) -> Result<()>;

    /// Prefix attention forward (see [`crate::attn`] for the contract).
    fn attn_fwd(&self, args: &AttnFwdArgs, out: AttnFwdOut) -> Result<()>;

    /// Prefix attention backward (see [`crate::attn`] for the contract).
    fn attn_bwd(&self, args: &AttnBwdArgs, grads: AttnGrads) -> Result<()>;
}

/// The backend for `device`. Devices whose backend is not part of this build say so.
pub fn backend(device: Device) -> Result<Box<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Box::new(cpu::CpuBackend)),
        Device::Emu | Device::Cuda(_) => Err(Error::Unsupported(format!(
            "device {device}: this build has the cpu backend only (the emulated and CUDA \
             kernels are not built yet)"
        ))),
    }
}

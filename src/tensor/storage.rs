//! Storage: where a tensor's bytes live ([`Location`]; 16-byte aligned host memory, or a
//! device allocation behind [`DeviceMemory`]) and the owned, contiguous [`Tensor`] that holds
//! them and hands out views of itself.

use super::dtype::{check_dtype, convert, read_row_f32, DType, Element};
use super::layout::Layout;
use super::view::{RawView, TensorView, TensorViewMut};
use crate::error::{Error, Result};
use half::{bf16, f16};
use std::fmt;

/// Where a buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// Host memory (used by the `cpu` and `emu` devices).
    Host,
    /// Memory of the CUDA device with this ordinal.
    Cuda(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Host => f.write_str("host"),
            Location::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// 16-byte aligned chunk so that host buffers satisfy vector loads and `cp.async` checks.
#[derive(Clone, Copy, Default)]
#[repr(C, align(16))]
struct Chunk([u8; 16]);

/// Host memory, 16-byte aligned.
#[derive(Clone)]
struct HostBuffer {
    chunks: Vec<Chunk>,
    len: usize,
}

impl HostBuffer {
    fn zeroed(len: usize) -> HostBuffer {
        HostBuffer {
            chunks: vec![Chunk::default(); len.div_ceil(16)],
            len,
        }
    }
    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<Chunk, u8>(&self.chunks)[..self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<Chunk, u8>(&mut self.chunks)[..self.len]
    }
}

// SAFETY: Chunk is a plain byte array with no padding.
unsafe impl bytemuck::Zeroable for Chunk {}
unsafe impl bytemuck::Pod for Chunk {}

/// Device memory owned by a [`Tensor`] (a CUDA allocation, from the `cuda` device). The
/// memory is freed when the tensor is dropped.
pub trait DeviceMemory: Send + Sync {
    /// Device address of the first byte (at least 16-byte aligned).
    fn addr(&self) -> u64;
    /// Size in bytes.
    fn len(&self) -> usize;
    /// Whether the allocation is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The device it lives on.
    fn location(&self) -> Location;
    /// Copies the whole allocation to `out` (`out.len() == self.len()`), waiting for the
    /// device work queued before.
    fn read(&self, out: &mut [u8]) -> Result<()>;
    /// A new allocation on the same device holding the same bytes.
    fn duplicate(&self) -> Result<Box<dyn DeviceMemory>>;
}

/// Where a tensor's elements are stored.
enum Storage {
    Host(HostBuffer),
    Device(Box<dyn DeviceMemory>),
}

/// An owned, contiguous tensor, in host memory or in a device's memory.
pub struct Tensor {
    buf: Storage,
    dtype: DType,
    layout: Layout,
}

impl Clone for Tensor {
    /// A deep copy. Copying a device tensor needs the device: if that fails (out of memory),
    /// the clone is a host tensor of NaNs of the same shape, so the failure cannot pass
    /// unnoticed; use [`Tensor::try_clone`] to see the error.
    fn clone(&self) -> Tensor {
        self.try_clone().unwrap_or_else(|_| {
            let mut t = Tensor::zeros(self.dims(), self.dtype).unwrap_or(Tensor {
                buf: Storage::Host(HostBuffer::zeroed(0)),
                dtype: self.dtype,
                layout: self.layout,
            });
            let _ = t.view_mut().fill(f32::NAN);
            t
        })
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({} {:?} on {})",
            self.dtype,
            self.dims(),
            self.location()
        )
    }
}

impl Tensor {
    /// A zero-filled host tensor.
    pub fn zeros(shape: &[usize], dtype: DType) -> Result<Tensor> {
        let layout = Layout::contiguous(shape)?;
        let bytes = layout
            .numel()
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::shape("tensor", "a size that fits in memory", shape))?;
        Ok(Tensor {
            buf: Storage::Host(HostBuffer::zeroed(bytes)),
            dtype,
            layout,
        })
    }

    /// A tensor over device memory `mem` (contiguous, `shape` and `dtype` must fit in it).
    pub fn from_device(
        mem: Box<dyn DeviceMemory>,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        let layout = Layout::contiguous(shape)?;
        let need = layout.numel() * dtype.size();
        if need > mem.len() {
            return Err(Error::shape(
                "device tensor",
                format!("at most {} bytes of {dtype}", mem.len()),
                shape,
            ));
        }
        if mem.location() == Location::Host {
            return Err(Error::device("device tensor", "the memory is host memory"));
        }
        Ok(Tensor {
            buf: Storage::Device(mem),
            dtype,
            layout,
        })
    }

    /// A deep copy (host or device); errors when the device cannot allocate.
    pub fn try_clone(&self) -> Result<Tensor> {
        let buf = match &self.buf {
            Storage::Host(h) => Storage::Host(h.clone()),
            Storage::Device(d) => Storage::Device(d.duplicate()?),
        };
        Ok(Tensor {
            buf,
            dtype: self.dtype,
            layout: self.layout,
        })
    }

    fn host(&self, what: &str) -> Result<&HostBuffer> {
        match &self.buf {
            Storage::Host(h) => Ok(h),
            Storage::Device(d) => Err(not_on_host(what, d.location())),
        }
    }

    fn host_mut(&mut self, what: &str) -> Result<&mut HostBuffer> {
        match &mut self.buf {
            Storage::Host(h) => Ok(h),
            Storage::Device(d) => Err(not_on_host(what, d.location())),
        }
    }

    /// The bytes of a host tensor.
    pub fn host_bytes(&self) -> Result<&[u8]> {
        let n = self.numel() * self.dtype.size();
        Ok(&self.host("host_bytes")?.bytes()[..n])
    }

    /// The bytes of a host tensor, writable.
    pub fn host_bytes_mut(&mut self) -> Result<&mut [u8]> {
        let n = self.numel() * self.dtype.size();
        Ok(&mut self.host_mut("host_bytes_mut")?.bytes_mut()[..n])
    }

    /// The raw bytes, copied from the device when needed.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        match &self.buf {
            Storage::Host(h) => Ok(h.bytes().to_vec()),
            Storage::Device(d) => {
                let mut v = vec![0u8; d.len()];
                d.read(&mut v)?;
                v.truncate(self.numel() * self.dtype.size());
                Ok(v)
            }
        }
    }

    /// A host tensor holding `data` (row-major) with the element type of `T`.
    pub fn from_slice<T: Element>(shape: &[usize], data: &[T]) -> Result<Tensor> {
        let mut t = Tensor::zeros(shape, T::DTYPE)?;
        if data.len() != t.numel() {
            return Err(Error::shape(
                "data",
                format!("{} values for shape {shape:?}", t.numel()),
                &[data.len()],
            ));
        }
        t.host_mut("from_slice")?
            .bytes_mut()
            .copy_from_slice(bytemuck::cast_slice(data));
        Ok(t)
    }

    /// A host tensor of `dtype` holding `data` converted from f32 (rounded to nearest).
    pub fn from_f32(shape: &[usize], data: &[f32], dtype: DType) -> Result<Tensor> {
        match dtype {
            DType::F32 => Tensor::from_slice(shape, data),
            DType::F16 => Tensor::from_slice(shape, &convert::<f16>(data)),
            DType::BF16 => Tensor::from_slice(shape, &convert::<bf16>(data)),
            DType::I32 => Tensor::from_slice(shape, &convert::<i32>(data)),
        }
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Shape, outermost first.
    pub fn dims(&self) -> &[usize] {
        self.layout.dims()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.layout.numel()
    }
    /// Where the storage lives.
    pub fn location(&self) -> Location {
        match &self.buf {
            Storage::Host(_) => Location::Host,
            Storage::Device(d) => d.location(),
        }
    }
    /// Size of the storage in bytes.
    pub fn size_in_bytes(&self) -> usize {
        match &self.buf {
            Storage::Host(h) => h.len,
            Storage::Device(d) => d.len(),
        }
    }

    /// The elements as a typed slice; errors when `T` is not the tensor's dtype or the
    /// tensor is not in host memory.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        check_dtype("tensor", self.dtype, T::DTYPE)?;
        Ok(bytemuck::cast_slice(self.host("tensor")?.bytes()))
    }
    /// The elements as a mutable typed slice; errors when `T` is not the tensor's dtype or
    /// the tensor is not in host memory.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        check_dtype("tensor", self.dtype, T::DTYPE)?;
        Ok(bytemuck::cast_slice_mut(
            self.host_mut("tensor")?.bytes_mut(),
        ))
    }

    /// The elements converted to f32. A device tensor is copied to the host first; if that
    /// copy fails, every element is NaN (so the failure cannot pass unnoticed; use
    /// [`Tensor::try_to_f32_vec`] to see the error).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.try_to_f32_vec()
            .unwrap_or_else(|_| vec![f32::NAN; self.numel()])
    }

    /// The elements converted to f32 (copied from the device when needed).
    pub fn try_to_f32_vec(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.numel()];
        match &self.buf {
            Storage::Host(h) => read_row_f32(self.dtype, h.bytes(), 0, &mut out),
            Storage::Device(_) => read_row_f32(self.dtype, &self.to_bytes()?, 0, &mut out),
        }
        Ok(out)
    }

    /// A copy converted to `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        Tensor::from_f32(self.dims(), &self.to_f32_vec(), dtype)
    }

    /// The same elements with another shape of the same size.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        self.layout = self.layout.reshape(shape)?;
        Ok(self)
    }

    fn addr(&self) -> u64 {
        match &self.buf {
            Storage::Host(h) => h.bytes().as_ptr() as u64,
            Storage::Device(d) => d.addr(),
        }
    }

    /// A read view of the whole tensor.
    pub fn view(&self) -> TensorView<'_> {
        TensorView::from_raw(RawView {
            addr: self.addr(),
            cap: self.numel(),
            location: self.location(),
            dtype: self.dtype,
            layout: self.layout,
        })
    }
    /// A write view of the whole tensor.
    pub fn view_mut(&mut self) -> TensorViewMut<'_> {
        let numel = self.numel();
        let location = self.location();
        let addr = match &mut self.buf {
            Storage::Host(h) => h.bytes_mut().as_mut_ptr() as u64,
            Storage::Device(d) => d.addr(),
        };
        TensorViewMut::from_raw(RawView {
            addr,
            cap: numel,
            location,
            dtype: self.dtype,
            layout: self.layout,
        })
    }
}

/// The error of a host access (`what`) to a tensor whose storage is on device `loc`.
fn not_on_host(what: &str, loc: Location) -> Error {
    Error::device(
        what,
        format!("the tensor is on {loc}; download it to the host first (Backend::download)"),
    )
}

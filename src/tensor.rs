//! Tensor handles: owned tensors and borrowed strided views.
//!
//! A [`Tensor`] owns its storage (host memory today; device buffers are added by the device
//! backends) and is always contiguous. Kernels and backend operations take borrowed views:
//! [`TensorView`] (read) and [`TensorViewMut`] (write), which carry a dtype, a shape and
//! explicit element strides for every dimension. Views are how GPT-2's fused `qkv` buffer
//! `[B, T, 3, H, D]` is read in place as `q`, `k`, `v` (`select(2, i)`), and how one PEFT
//! prefix tensor `[P, L, 2, H, D]` provides every layer's `k_pre`/`v_pre`.
//!
//! Safety model: a view is created from a borrow of its tensor, so Rust's borrow rules keep
//! readers and writers apart. A mutable view can be split into disjoint mutable views
//! ([`TensorViewMut::unbind`]), the strided analogue of `split_at_mut`; every access then
//! touches only the view's own elements, one contiguous row at a time. Every view's
//! addressable range is checked against its buffer when the view is made, so no index that
//! passes the layout can leave the buffer.

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::fmt;
use std::marker::PhantomData;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// 32-bit signed integer (token ids, labels, lengths).
    I32,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        !matches!(self, DType::I32)
    }
    /// Lower-case name as used in safetensors files and messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
        }
    }
    /// Rounds an f32 to the nearest value representable in this type (round to nearest even).
    pub fn round_f32(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::BF16 => bf16::from_f32(x).to_f32(),
            DType::I32 => x.round(),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Rust types that can be elements of a tensor.
pub trait Element: bytemuck::Pod + Copy + Send + Sync + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// Converts to f32 (exact for every type but large i32).
    fn to_f32(self) -> f32;
    /// Converts from f32, rounding to nearest.
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(x: f32) -> Self {
        x.round() as i32
    }
}

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

/// The most dimensions a tensor may have (GPT-2's `qkv` view `[B, T, 3, H, D]` has five).
pub const MAX_RANK: usize = 6;

/// Shape, element strides and element offset of a view. The last dimension of every view
/// that a kernel reads must have stride 1; other strides are free (and may be 0 for a
/// broadcast read).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    rank: usize,
    dims: [usize; MAX_RANK],
    strides: [usize; MAX_RANK],
    offset: usize,
}

impl fmt::Debug for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} strides {:?} offset {}",
            self.dims(),
            self.strides(),
            self.offset
        )
    }
}

impl Layout {
    /// A row-major contiguous layout of `shape`.
    pub fn contiguous(shape: &[usize]) -> Result<Layout> {
        if shape.len() > MAX_RANK {
            return Err(Error::shape(
                "tensor",
                format!("at most {MAX_RANK} dimensions"),
                shape,
            ));
        }
        let mut strides = vec![0usize; shape.len()];
        let mut s = 1usize;
        for d in (0..shape.len()).rev() {
            strides[d] = s;
            s = s
                .checked_mul(shape[d])
                .ok_or_else(|| Error::shape("tensor", "a size that fits in usize", shape))?;
        }
        Layout::new(shape, &strides, 0)
    }

    /// A layout with explicit strides (in elements) and offset.
    pub fn new(shape: &[usize], strides: &[usize], offset: usize) -> Result<Layout> {
        if shape.len() > MAX_RANK || shape.len() != strides.len() {
            return Err(Error::shape(
                "tensor",
                format!(
                    "at most {MAX_RANK} dimensions and one stride per dimension (got {} strides)",
                    strides.len()
                ),
                shape,
            ));
        }
        let mut l = Layout {
            rank: shape.len(),
            dims: [0; MAX_RANK],
            strides: [0; MAX_RANK],
            offset,
        };
        l.dims[..shape.len()].copy_from_slice(shape);
        l.strides[..shape.len()].copy_from_slice(strides);
        l.checked_span()
            .ok_or_else(|| Error::shape("tensor", "a size that fits in usize", shape))?;
        Ok(l)
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Sizes of the dimensions, outermost first.
    pub fn dims(&self) -> &[usize] {
        &self.dims[..self.rank]
    }
    /// Element strides of the dimensions.
    pub fn strides(&self) -> &[usize] {
        &self.strides[..self.rank]
    }
    /// Element offset of the first element.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims().iter().product()
    }

    fn checked_span(&self) -> Option<usize> {
        let numel = self
            .dims()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))?;
        if numel == 0 {
            return Some(self.offset);
        }
        let mut last = self.offset;
        for d in 0..self.rank {
            last = last.checked_add((self.dims[d] - 1).checked_mul(self.strides[d])?)?;
        }
        last.checked_add(1)
    }

    /// One past the largest element index this layout can address (its offset when empty).
    pub fn span(&self) -> usize {
        // Checked at construction; every derived layout addresses a subset.
        self.checked_span().unwrap_or(usize::MAX)
    }

    /// Whether the layout is row-major contiguous.
    pub fn is_contiguous(&self) -> bool {
        let mut s = 1;
        for d in (0..self.rank).rev() {
            if self.dims[d] != 1 && self.strides[d] != s {
                return false;
            }
            s *= self.dims[d];
        }
        true
    }

    /// Element index of the multi-index `idx` (one entry per dimension).
    pub fn index(&self, idx: &[usize]) -> usize {
        debug_assert_eq!(idx.len(), self.rank);
        self.offset
            + idx
                .iter()
                .zip(self.strides())
                .map(|(i, s)| i * s)
                .sum::<usize>()
    }

    fn check_dim(&self, what: &str, dim: usize) -> Result<()> {
        if dim >= self.rank {
            return Err(Error::index(
                what,
                format!("dimension {dim} of a rank-{} tensor", self.rank),
            ));
        }
        Ok(())
    }

    /// The layout of `narrow(dim, start, len)`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Layout> {
        self.check_dim("narrow", dim)?;
        if start.checked_add(len).is_none_or(|e| e > self.dims[dim]) {
            return Err(Error::index(
                "narrow",
                format!(
                    "range {start}..{} of dimension {dim} with size {}",
                    start.saturating_add(len),
                    self.dims[dim]
                ),
            ));
        }
        let mut l = *self;
        l.offset += start * self.strides[dim];
        l.dims[dim] = len;
        Ok(l)
    }

    /// The layout of `select(dim, index)`: dimension `dim` removed at `index`.
    pub fn select(&self, dim: usize, index: usize) -> Result<Layout> {
        self.check_dim("select", dim)?;
        if index >= self.dims[dim] {
            return Err(Error::index(
                "select",
                format!(
                    "index {index} of dimension {dim} with size {}",
                    self.dims[dim]
                ),
            ));
        }
        let mut l = *self;
        l.offset += index * self.strides[dim];
        for d in dim..self.rank - 1 {
            l.dims[d] = self.dims[d + 1];
            l.strides[d] = self.strides[d + 1];
        }
        l.rank -= 1;
        l.dims[l.rank] = 0;
        l.strides[l.rank] = 0;
        Ok(l)
    }

    /// The layout with a new dimension of size 1 inserted before `dim`.
    pub fn unsqueeze(&self, dim: usize) -> Result<Layout> {
        if dim > self.rank || self.rank == MAX_RANK {
            return Err(Error::index(
                "unsqueeze",
                format!("dimension {dim} of a rank-{} tensor", self.rank),
            ));
        }
        let mut l = *self;
        for d in (dim..self.rank).rev() {
            l.dims[d + 1] = self.dims[d];
            l.strides[d + 1] = self.strides[d];
        }
        l.dims[dim] = 1;
        l.strides[dim] = if dim < self.rank {
            self.dims[dim] * self.strides[dim]
        } else {
            1
        };
        l.rank += 1;
        Ok(l)
    }

    /// The layout of a contiguous tensor seen with another shape of the same size.
    pub fn reshape(&self, shape: &[usize]) -> Result<Layout> {
        if !self.is_contiguous() {
            return Err(Error::layout(
                "reshape",
                format!("needs a contiguous view, got {self:?}"),
            ));
        }
        if shape.iter().product::<usize>() != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("{} elements like {:?}", self.numel(), self.dims()),
                shape,
            ));
        }
        let mut l = Layout::contiguous(shape)?;
        l.offset = self.offset;
        Ok(l)
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
            Storage::Device(d) => Err(Error::device(
                what,
                format!(
                    "the tensor is on {}; download it to the host first (Backend::download)",
                    d.location()
                ),
            )),
        }
    }

    fn host_mut(&mut self, what: &str) -> Result<&mut HostBuffer> {
        match &mut self.buf {
            Storage::Host(h) => Ok(h),
            Storage::Device(d) => Err(Error::device(
                what,
                format!(
                    "the tensor is on {}; download it to the host first (Backend::download)",
                    d.location()
                ),
            )),
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
        TensorView {
            raw: RawView {
                addr: self.addr(),
                cap: self.numel(),
                location: self.location(),
                dtype: self.dtype,
                layout: self.layout,
            },
            _borrow: PhantomData,
        }
    }
    /// A write view of the whole tensor.
    pub fn view_mut(&mut self) -> TensorViewMut<'_> {
        let numel = self.numel();
        let location = self.location();
        let addr = match &mut self.buf {
            Storage::Host(h) => h.bytes_mut().as_mut_ptr() as u64,
            Storage::Device(d) => d.addr(),
        };
        TensorViewMut {
            raw: RawView {
                addr,
                cap: numel,
                location,
                dtype: self.dtype,
                layout: self.layout,
            },
            _borrow: PhantomData,
        }
    }
}

fn convert<T: Element>(data: &[f32]) -> Vec<T> {
    data.iter().map(|&x| T::from_f32(x)).collect()
}

pub(crate) fn check_dtype(arg: &str, got: DType, expected: DType) -> Result<()> {
    if got != expected {
        return Err(Error::DType {
            arg: arg.to_string(),
            expected: expected.name().to_string(),
            got: got.name().to_string(),
        });
    }
    Ok(())
}

/// Reads `out.len()` contiguous elements of type `dtype` starting at element `elem` of `bytes`.
fn read_row_f32(dtype: DType, bytes: &[u8], elem: usize, out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let n = out.len();
    let b = &bytes[elem * dtype.size()..(elem + n) * dtype.size()];
    match dtype {
        DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(b) {
            Ok(src) => out.copy_from_slice(src),
            Err(_) => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        },
        DType::F16 => match bytemuck::try_cast_slice::<u8, f16>(b) {
            Ok(src) => src.convert_to_f32_slice(out),
            Err(_) => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        },
        DType::BF16 => match bytemuck::try_cast_slice::<u8, bf16>(b) {
            Ok(src) => src.convert_to_f32_slice(out),
            Err(_) => {
                for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        },
        DType::I32 => {
            for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                *o = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32;
            }
        }
    }
}

/// The untyped description shared by both view kinds.
#[derive(Clone, Copy, Debug)]
struct RawView {
    /// Address of element 0 of the buffer (host pointer or device address).
    addr: u64,
    /// Number of elements in the buffer from `addr`.
    cap: usize,
    location: Location,
    dtype: DType,
    layout: Layout,
}

impl RawView {
    fn with_layout(&self, what: &str, layout: Layout) -> Result<RawView> {
        if layout.numel() > 0 && layout.span() > self.cap {
            return Err(Error::layout(
                what,
                format!(
                    "layout {layout:?} reaches element {} of a buffer of {} elements",
                    layout.span() - 1,
                    self.cap
                ),
            ));
        }
        Ok(RawView { layout, ..*self })
    }

    fn check_row(&self, elem: usize, n: usize) {
        // Callers derive `elem` from the layout, which was checked against `cap`.
        assert!(elem + n <= self.cap, "row {elem}+{n} outside buffer");
        assert_eq!(
            self.location,
            Location::Host,
            "host access to a device view"
        );
    }

    /// Host bytes of one contiguous row.
    ///
    /// # Safety
    /// The view must be a host view whose buffer outlives the returned slice, and no one
    /// may write these elements while the slice lives.
    unsafe fn row_bytes<'a>(&self, elem: usize, n: usize) -> &'a [u8] {
        self.check_row(elem, n);
        let sz = self.dtype.size();
        std::slice::from_raw_parts((self.addr as usize as *const u8).add(elem * sz), n * sz)
    }

    /// Mutable host bytes of one contiguous row.
    ///
    /// # Safety
    /// As `row_bytes`, and no other reference to these elements may exist.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row_bytes_mut<'a>(&self, elem: usize, n: usize) -> &'a mut [u8] {
        self.check_row(elem, n);
        let sz = self.dtype.size();
        std::slice::from_raw_parts_mut((self.addr as usize as *mut u8).add(elem * sz), n * sz)
    }
}

/// A borrowed, strided, read-only view of tensor elements on some device.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    raw: RawView,
    _borrow: PhantomData<&'a [u8]>,
}

// SAFETY: a view is a shared borrow of plain data, like `&[T]`.
unsafe impl Send for TensorView<'_> {}
unsafe impl Sync for TensorView<'_> {}

impl fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TensorView({} {:?} on {})",
            self.raw.dtype, self.raw.layout, self.raw.location
        )
    }
}

/// A borrowed, strided, writable view of tensor elements on some device.
pub struct TensorViewMut<'a> {
    raw: RawView,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: a mutable view is an exclusive borrow of plain data, like `&mut [T]`.
unsafe impl Send for TensorViewMut<'_> {}
unsafe impl Sync for TensorViewMut<'_> {}

impl fmt::Debug for TensorViewMut<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TensorViewMut({} {:?} on {})",
            self.raw.dtype, self.raw.layout, self.raw.location
        )
    }
}

macro_rules! view_accessors {
    () => {
        /// Element type.
        pub fn dtype(&self) -> DType {
            self.raw.dtype
        }
        /// Shape, outermost first.
        pub fn dims(&self) -> &[usize] {
            self.raw.layout.dims()
        }
        /// Element strides.
        pub fn strides(&self) -> &[usize] {
            self.raw.layout.strides()
        }
        /// Shape, strides and offset.
        pub fn layout(&self) -> Layout {
            self.raw.layout
        }
        /// Number of elements.
        pub fn numel(&self) -> usize {
            self.raw.layout.numel()
        }
        /// Where the elements live.
        pub fn location(&self) -> Location {
            self.raw.location
        }
        /// Number of elements in the underlying buffer from [`Self::base_addr`].
        pub fn buffer_len(&self) -> usize {
            self.raw.cap
        }
        /// Device address (or host pointer) of element 0 of the underlying buffer; element
        /// `i` of the view is at `base_addr() + layout().index(i) * dtype().size()`.
        pub fn base_addr(&self) -> u64 {
            self.raw.addr
        }
    };
}

impl<'a> TensorView<'a> {
    view_accessors!();

    /// A view of foreign memory (an inference engine's own buffers).
    ///
    /// # Safety
    /// `addr` must point to `cap` elements of `dtype` at `location` that stay valid and
    /// unwritten (except through this crate's outputs that do not overlap) for `'a`.
    pub unsafe fn from_raw_parts(
        addr: u64,
        cap: usize,
        location: Location,
        dtype: DType,
        layout: Layout,
    ) -> Result<TensorView<'a>> {
        let base = RawView {
            addr,
            cap,
            location,
            dtype,
            layout: Layout::contiguous(&[cap])?,
        };
        Ok(TensorView {
            raw: base.with_layout("from_raw_parts", layout)?,
            _borrow: PhantomData,
        })
    }

    fn derive(&self, what: &str, layout: Result<Layout>) -> Result<TensorView<'a>> {
        Ok(TensorView {
            raw: self.raw.with_layout(what, layout?)?,
            _borrow: PhantomData,
        })
    }

    /// The view with dimension `dim` removed at `index`.
    pub fn select(&self, dim: usize, index: usize) -> Result<TensorView<'a>> {
        self.derive("select", self.raw.layout.select(dim, index))
    }
    /// The view restricted to `start..start+len` along `dim`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<TensorView<'a>> {
        self.derive("narrow", self.raw.layout.narrow(dim, start, len))
    }
    /// The view with a new dimension of size 1 before `dim`.
    pub fn unsqueeze(&self, dim: usize) -> Result<TensorView<'a>> {
        self.derive("unsqueeze", self.raw.layout.unsqueeze(dim))
    }
    /// A contiguous view seen with another shape of the same size.
    pub fn reshape(&self, shape: &[usize]) -> Result<TensorView<'a>> {
        self.derive("reshape", self.raw.layout.reshape(shape))
    }
    /// The same buffer seen through an explicit layout (checked against the buffer).
    pub fn as_strided(
        &self,
        shape: &[usize],
        strides: &[usize],
        offset: usize,
    ) -> Result<TensorView<'a>> {
        self.derive("as_strided", Layout::new(shape, strides, offset))
    }

    /// One contiguous host row of `T` starting at element index `elem` (from
    /// [`Layout::index`]). Errors when the dtype differs or the view is not on the host.
    pub fn host_row<T: Element>(&self, elem: usize, n: usize) -> Result<&'a [T]> {
        check_dtype("host_row", self.raw.dtype, T::DTYPE)?;
        self.check_host("host_row")?;
        self.check_elem("host_row", elem, n)?;
        // SAFETY: host view borrowed for 'a; shared borrows exclude writers. Alignment holds
        // because buffers are 16-aligned and `elem` counts whole elements.
        bytemuck::try_cast_slice(unsafe { self.raw.row_bytes(elem, n) }).map_err(|e| {
            Error::layout(
                "host_row",
                format!("cannot view the bytes as {}: {e}", T::DTYPE),
            )
        })
    }

    /// All elements of a contiguous host view as one typed slice.
    pub fn contiguous_slice<T: Element>(&self) -> Result<&'a [T]> {
        if !self.raw.layout.is_contiguous() {
            return Err(Error::layout(
                "contiguous_slice",
                format!("needs a contiguous view, got {:?}", self.raw.layout),
            ));
        }
        self.host_row(self.raw.layout.offset(), self.numel())
    }

    /// Reads `out.len()` contiguous host elements from element index `elem`, as f32.
    pub fn read_f32(&self, elem: usize, out: &mut [f32]) -> Result<()> {
        self.check_host("read_f32")?;
        self.check_elem("read_f32", elem, out.len())?;
        // SAFETY: as in `host_row`.
        let bytes = unsafe { self.raw.row_bytes(elem, out.len()) };
        read_row_f32(self.raw.dtype, bytes, 0, out);
        Ok(())
    }

    /// Copies every element, in row-major order of the view, into `out` as f32.
    pub fn gather_f32(&self, out: &mut [f32]) -> Result<()> {
        if out.len() != self.numel() {
            return Err(Error::shape(
                "gather_f32 output",
                format!("{} elements", self.numel()),
                &[out.len()],
            ));
        }
        self.for_each_row(|row, elem| self.read_f32(elem, &mut out[row.clone()]))
    }

    /// Element at a multi-index, as f64 (host views only; slow, for references and tests).
    pub fn get_f64(&self, idx: &[usize]) -> Result<f64> {
        if idx.len() != self.raw.layout.rank() || idx.iter().zip(self.dims()).any(|(i, d)| i >= d) {
            return Err(Error::index(
                "get_f64",
                format!("index {idx:?} of shape {:?}", self.dims()),
            ));
        }
        let mut x = [0f32];
        self.read_f32(self.raw.layout.index(idx), &mut x)?;
        Ok(x[0] as f64)
    }

    fn for_each_row(
        &self,
        mut f: impl FnMut(std::ops::Range<usize>, usize) -> Result<()>,
    ) -> Result<()> {
        let l = self.raw.layout;
        if l.numel() == 0 {
            return Ok(());
        }
        if l.rank() == 0 {
            return f(0..1, l.offset());
        }
        let inner = l.dims()[l.rank() - 1];
        if l.strides()[l.rank() - 1] != 1 && inner > 1 {
            return Err(Error::layout(
                "view",
                format!("last dimension must be contiguous (stride 1), got {l:?}"),
            ));
        }
        let outer = &l.dims()[..l.rank() - 1];
        let mut idx = vec![0usize; l.rank()];
        for r in 0..l.numel() / inner {
            f(r * inner..(r + 1) * inner, l.index(&idx))?;
            for d in (0..outer.len()).rev() {
                idx[d] += 1;
                if idx[d] < outer[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(())
    }

    fn check_host(&self, what: &str) -> Result<()> {
        if self.raw.location != Location::Host {
            return Err(Error::device(
                what,
                format!("needs a host view, this one is on {}", self.raw.location),
            ));
        }
        Ok(())
    }
    fn check_elem(&self, what: &str, elem: usize, n: usize) -> Result<()> {
        if elem < self.raw.layout.offset() || elem.checked_add(n).is_none_or(|e| e > self.raw.cap) {
            return Err(Error::index(
                what,
                format!(
                    "elements {elem}..{} outside the view's buffer of {}",
                    elem.saturating_add(n),
                    self.raw.cap
                ),
            ));
        }
        Ok(())
    }
}

impl<'a> TensorViewMut<'a> {
    view_accessors!();

    /// A writable view of foreign memory.
    ///
    /// # Safety
    /// As [`TensorView::from_raw_parts`], and nothing else may read or write the elements of
    /// `layout` for `'a`.
    pub unsafe fn from_raw_parts(
        addr: u64,
        cap: usize,
        location: Location,
        dtype: DType,
        layout: Layout,
    ) -> Result<TensorViewMut<'a>> {
        let v = TensorView::from_raw_parts(addr, cap, location, dtype, layout)?;
        Ok(TensorViewMut {
            raw: v.raw,
            _borrow: PhantomData,
        })
    }

    /// A read view of the same elements, borrowing this one.
    pub fn as_view(&self) -> TensorView<'_> {
        TensorView {
            raw: self.raw,
            _borrow: PhantomData,
        }
    }
    /// A shorter-lived mutable view of the same elements.
    pub fn reborrow(&mut self) -> TensorViewMut<'_> {
        TensorViewMut {
            raw: self.raw,
            _borrow: PhantomData,
        }
    }

    fn derive(self, what: &str, layout: Result<Layout>) -> Result<TensorViewMut<'a>> {
        Ok(TensorViewMut {
            raw: self.raw.with_layout(what, layout?)?,
            _borrow: PhantomData,
        })
    }

    /// The view with dimension `dim` removed at `index`.
    pub fn select(self, dim: usize, index: usize) -> Result<TensorViewMut<'a>> {
        let l = self.raw.layout.select(dim, index);
        self.derive("select", l)
    }
    /// The view restricted to `start..start+len` along `dim`.
    pub fn narrow(self, dim: usize, start: usize, len: usize) -> Result<TensorViewMut<'a>> {
        let l = self.raw.layout.narrow(dim, start, len);
        self.derive("narrow", l)
    }
    /// The view with a new dimension of size 1 before `dim`.
    pub fn unsqueeze(self, dim: usize) -> Result<TensorViewMut<'a>> {
        let l = self.raw.layout.unsqueeze(dim);
        self.derive("unsqueeze", l)
    }
    /// A contiguous view seen with another shape of the same size.
    pub fn reshape(self, shape: &[usize]) -> Result<TensorViewMut<'a>> {
        let l = self.raw.layout.reshape(shape);
        self.derive("reshape", l)
    }

    /// Splits the view along `dim` (not the last, contiguous one) into `dims()[dim]` disjoint
    /// views — e.g. a `dqkv [B, T, 3, H, D]` gradient buffer into `dq`, `dk`, `dv`.
    pub fn unbind(self, dim: usize) -> Result<Vec<TensorViewMut<'a>>> {
        let l = self.raw.layout;
        if dim + 1 >= l.rank() {
            return Err(Error::index(
                "unbind",
                format!(
                    "dimension {dim} of {:?}: only outer dimensions can be split",
                    l.dims()
                ),
            ));
        }
        // Disjointness needs distinct slices along `dim` not to overlap: a zero stride
        // (broadcast) along `dim` would alias.
        if l.strides()[dim] == 0 && l.dims()[dim] > 1 && l.numel() > 0 {
            return Err(Error::layout(
                "unbind",
                "dimension with stride 0 cannot be split into writable views",
            ));
        }
        (0..l.dims()[dim])
            .map(|i| {
                Ok(TensorViewMut {
                    raw: self.raw.with_layout("unbind", l.select(dim, i)?)?,
                    _borrow: PhantomData,
                })
            })
            .collect()
    }

    /// Writes `vals` (converted from f32, rounded to nearest) to contiguous host elements
    /// starting at element index `elem`.
    pub fn write_f32(&mut self, elem: usize, vals: &[f32]) -> Result<()> {
        self.as_view().check_host("write_f32")?;
        self.as_view().check_elem("write_f32", elem, vals.len())?;
        // SAFETY: exclusive borrow of a host view; rows of one view never overlap those of a
        // sibling from `unbind`.
        let bytes = unsafe { self.raw.row_bytes_mut(elem, vals.len()) };
        write_row_f32(self.raw.dtype, bytes, vals);
        Ok(())
    }

    /// All elements of a contiguous host view as one mutable typed slice. A contiguous view
    /// covers exactly its own elements, so no sibling view can overlap the slice.
    pub fn contiguous_slice_mut<T: Element>(&mut self) -> Result<&mut [T]> {
        let v = self.as_view();
        if !v.raw.layout.is_contiguous() {
            return Err(Error::layout(
                "contiguous_slice_mut",
                format!("needs a contiguous view, got {:?}", v.raw.layout),
            ));
        }
        check_dtype("contiguous_slice_mut", v.raw.dtype, T::DTYPE)?;
        v.check_host("contiguous_slice_mut")?;
        let (off, n) = (v.raw.layout.offset(), v.numel());
        v.check_elem("contiguous_slice_mut", off, n)?;
        // SAFETY: exclusive borrow; the range is the view's own elements (see above).
        let bytes = unsafe { self.raw.row_bytes_mut(off, n) };
        bytemuck::try_cast_slice_mut(bytes).map_err(|e| {
            Error::layout(
                "contiguous_slice_mut",
                format!("cannot view the bytes as {}: {e}", T::DTYPE),
            )
        })
    }

    /// Fills every element of the view with `x`.
    pub fn fill(&mut self, x: f32) -> Result<()> {
        let n = *self.dims().last().unwrap_or(&1);
        let row = vec![x; n];
        let raw = self.raw;
        TensorView {
            raw,
            _borrow: PhantomData,
        }
        .for_each_row(|_, elem| self.write_f32(elem, &row))
    }

    /// Writes `data` (row-major over the view's shape) into the view.
    pub fn scatter_f32(&mut self, data: &[f32]) -> Result<()> {
        if data.len() != self.numel() {
            return Err(Error::shape(
                "scatter_f32 input",
                format!("{} elements", self.numel()),
                &[data.len()],
            ));
        }
        let raw = self.raw;
        TensorView {
            raw,
            _borrow: PhantomData,
        }
        .for_each_row(|rows, elem| self.write_f32(elem, &data[rows]))
    }

    /// A raw writer that the CPU kernels share between threads; see [`RowWriter`].
    pub(crate) fn row_writer(&mut self) -> Result<RowWriter<'_>> {
        self.as_view().check_host("row_writer")?;
        Ok(RowWriter {
            raw: self.raw,
            _borrow: PhantomData,
        })
    }
}

fn write_row_f32(dtype: DType, bytes: &mut [u8], vals: &[f32]) {
    use half::slice::HalfFloatSliceExt;
    match dtype {
        DType::F32 => match bytemuck::try_cast_slice_mut::<u8, f32>(bytes) {
            Ok(dst) => dst.copy_from_slice(vals),
            Err(_) => {
                for (c, v) in bytes.chunks_exact_mut(4).zip(vals) {
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
        },
        DType::F16 => match bytemuck::try_cast_slice_mut::<u8, f16>(bytes) {
            Ok(dst) => dst.convert_from_f32_slice(vals),
            Err(_) => {
                for (c, v) in bytes.chunks_exact_mut(2).zip(vals) {
                    c.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
                }
            }
        },
        DType::BF16 => match bytemuck::try_cast_slice_mut::<u8, bf16>(bytes) {
            Ok(dst) => dst.convert_from_f32_slice(vals),
            Err(_) => {
                for (c, v) in bytes.chunks_exact_mut(2).zip(vals) {
                    c.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
                }
            }
        },
        DType::I32 => {
            for (c, v) in bytes.chunks_exact_mut(4).zip(vals) {
                c.copy_from_slice(&(v.round() as i32).to_le_bytes());
            }
        }
    }
}

/// A shared handle through which several threads write *disjoint rows* of one host view.
/// The CPU kernels partition the rows between tasks; the handle checks bounds, the caller
/// guarantees disjointness.
#[derive(Clone, Copy)]
pub(crate) struct RowWriter<'a> {
    raw: RawView,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: see the type's doc: writers of distinct rows do not overlap.
unsafe impl Send for RowWriter<'_> {}
unsafe impl Sync for RowWriter<'_> {}

impl RowWriter<'_> {
    /// Element index of a multi-index of the view.
    pub(crate) fn index(&self, idx: &[usize]) -> usize {
        self.raw.layout.index(idx)
    }
    /// Writes one row.
    ///
    /// # Safety
    /// No other thread may access elements `elem..elem + vals.len()` during the call.
    pub(crate) unsafe fn write_row(&self, elem: usize, vals: &[f32]) {
        let bytes = self.raw.row_bytes_mut(elem, vals.len());
        write_row_f32(self.raw.dtype, bytes, vals);
    }
}

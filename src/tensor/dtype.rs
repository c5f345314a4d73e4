//! Element types: [`DType`], the Rust types that are tensor elements ([`Element`]), and the
//! conversion of contiguous rows of elements (raw little-endian bytes) to and from f32, which
//! the owned tensors and the views share.

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::fmt;

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

pub(super) fn convert<T: Element>(data: &[f32]) -> Vec<T> {
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
pub(super) fn read_row_f32(dtype: DType, bytes: &[u8], elem: usize, out: &mut [f32]) {
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

/// Writes `vals` as contiguous elements of type `dtype` into `bytes` (rounded to nearest).
pub(super) fn write_row_f32(dtype: DType, bytes: &mut [u8], vals: &[f32]) {
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

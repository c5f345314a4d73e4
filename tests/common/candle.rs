//! Candle tensors beside the crate's host tensors, for the candle op's tests (feature
//! `candle`): the same bits both ways, and random inputs.

use candle_core::Tensor as CTensor;
use half::{bf16, f16};
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};

/// A candle CPU tensor with the bits of a host tensor.
pub fn to_candle(t: &Tensor) -> CTensor {
    let dims = t.dims().to_vec();
    let cpu = &candle_core::Device::Cpu;
    match t.dtype() {
        DType::F32 => CTensor::from_slice(t.as_slice::<f32>().unwrap(), dims, cpu),
        DType::F16 => CTensor::from_slice(t.as_slice::<f16>().unwrap(), dims, cpu),
        DType::BF16 => CTensor::from_slice(t.as_slice::<bf16>().unwrap(), dims, cpu),
        DType::I32 => unreachable!("float inputs only"),
    }
    .unwrap()
}

/// A candle tensor's elements as f32, row-major over its shape (copied to the host).
pub fn f32s(t: &CTensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_device(&candle_core::Device::Cpu)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// A candle tensor's elements as f64.
pub fn f64s(t: &CTensor) -> Vec<f64> {
    f32s(t).into_iter().map(f64::from).collect()
}

/// A candle tensor's element bits (after widening to f32, which is exact).
pub fn bits(t: &CTensor) -> Vec<u32> {
    f32s(t).iter().map(|x| x.to_bits()).collect()
}

/// Normal values plus 0.1, in `dtype`: never all zeros, and the mean keeps scores away from
/// ties.
pub fn random(rng: &mut Rng, dims: &[usize], dtype: DType) -> Tensor {
    let n = dims.iter().product();
    let vals: Vec<f32> = rng.normal_vec(n, 1.0).iter().map(|x| x + 0.1).collect();
    Tensor::from_f32(dims, &vals, dtype).unwrap()
}

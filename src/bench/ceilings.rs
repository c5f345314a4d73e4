//! The roofline ceilings that `bench attn` reports beside its timings, measured on the spot:
//! a large matmul (FLOP/s) and a large copy (bytes/s), on the CPU or on a GPU.

use super::median_ms;
use crate::device::cuda::CudaBackend;
use crate::device::{cpu::CpuBackend, Backend, MatmulOpts};
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// Ceilings measured on the spot: a large matmul (FLOP/s) and a large copy (bytes/s).
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    /// FLOP/s of a 1024³ f32 matmul through the CPU backend (8192³ fp16 through cuBLAS on a
    /// GPU).
    pub flops: f64,
    /// Bytes/s of a 256 MiB copy (1 GiB device-to-device on a GPU; read + write counted).
    pub bytes: f64,
}

/// Measures the CPU ceilings.
pub fn cpu_ceilings() -> Result<Ceilings> {
    let n = 1024;
    let be = CpuBackend;
    let a = Tensor::from_f32(&[n, n], &Rng::new(1).normal_vec(n * n, 1.0), DType::F32)?;
    let mut c = Tensor::zeros(&[n, n], DType::F32)?;
    let ms = median_ms(
        || {
            be.matmul(
                &a.view(),
                &a.view(),
                None,
                &mut c.view_mut(),
                MatmulOpts::default(),
            )
        },
        5,
    )?;
    let flops = 2.0 * (n * n * n) as f64 / (ms / 1e3);
    let len = 64 << 20; // f32 elements: 256 MiB
    let src = vec![1.0f32; len];
    let mut dst = vec![0.0f32; len];
    let ms = median_ms(
        || {
            dst.copy_from_slice(&src);
            Ok(())
        },
        5,
    )?;
    std::hint::black_box(&dst);
    Ok(Ceilings {
        flops,
        bytes: 2.0 * (len * 4) as f64 / (ms / 1e3),
    })
}

/// Median device time of 5 calls of `f` after a warm-up one (CUDA events).
fn device_median_ms(be: &dyn Backend, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let mut times = vec![];
    for i in 0..6 {
        let ms = be.time_ms(f)?;
        if i > 0 {
            times.push(ms);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

/// The GPU ceilings: the FLOP/s of a large fp16 cuBLAS matmul (8192 × 8192 × 8192, fp32
/// accumulation) and the bytes/s of a 1 GiB device-to-device copy (read + write counted);
/// medians of 5 after a warm-up.
pub fn cuda_ceilings(be: &CudaBackend) -> Result<Ceilings> {
    let n = 8192usize;
    let host = Tensor::from_f32(&[n, n], &Rng::new(3).normal_vec(n * n, 1.0), DType::F16)?;
    let a = be.upload(&host)?;
    drop(host);
    let mut c = be.zeros(&[n, n], DType::F16)?;
    let ms = device_median_ms(be, &mut || {
        be.matmul(
            &a.view(),
            &a.view(),
            None,
            &mut c.view_mut(),
            MatmulOpts::nt(),
        )
    })?;
    let flops = 2.0 * (n * n * n) as f64 / (ms / 1e3);
    drop((a, c));
    let bytes = 1usize << 30;
    let src = be.zeros(&[bytes / 2], DType::F16)?;
    let mut dst = be.zeros(&[bytes / 2], DType::F16)?;
    let ms = device_median_ms(be, &mut || be.memcpy(&src.view(), &mut dst.view_mut()))?;
    Ok(Ceilings {
        flops,
        bytes: 2.0 * bytes as f64 / (ms / 1e3),
    })
}

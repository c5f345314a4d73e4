//! Times the cpu backend's products at decode shapes (few rows against GPT-2-small weights)
//! three ways, back to back in one process: `CpuBackend::matmul` with the small-M fast path
//! off (the `gemm` crate) and on (weights read in place), and `CpuBackend::matmul_packed`
//! (weights packed by `pack_weight`, as the engine multiplies them):
//!   cargo bench --bench matmul
//! Prints the best time of each path and the speed-ups. Not a test: it asserts nothing
//! except that the paths agree to f32 rounding.

use prefix_attn::device::cpu::{set_packed_weights, set_small_m_fast_path, CpuBackend};
use prefix_attn::device::{Backend, MatmulOpts};
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};
use std::time::Instant;

fn random(rng: &mut Rng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; a number among the arguments sets the repetitions.
    let reps: usize = std::env::args()
        .skip(1)
        .find_map(|s| s.parse().ok())
        .unwrap_or(7);
    let cpu = CpuBackend;
    let mut rng = Rng::new(1);
    // (name, K, N, b transposed)
    let shapes = [
        ("768x2304", 768, 2304, false),
        ("768x3072", 768, 3072, false),
        ("3072x768", 3072, 768, false),
        ("head 768x50257T", 768, 50257, true),
    ];
    println!(
        "threads {}, weights rotated over >= 64 MiB of copies",
        rayon::current_num_threads()
    );
    set_packed_weights(true);
    println!(
        "{:>18} {:>4} {:>9} {:>9} {:>9} {:>7} {:>7} {:>8} {:>8}",
        "shape", "M", "gemm ms", "fast ms", "pack ms", "fast/g", "pack/f", "pack GF/s", "pack GB/s"
    );
    for &(name, k, n, nt) in &shapes {
        let bdims = if nt { [n, k] } else { [k, n] };
        // Several copies of the weights, used in turn, so that (like a model's many weight
        // matrices in a decode step) none is still in the 32 MiB L3 cache when it is used.
        let copies = (64 << 20) / (4 * n * k) + 1;
        let bs: Vec<Tensor> = (0..copies)
            .map(|_| Tensor::from_f32(&bdims, &random(&mut rng, n * k), DType::F32).unwrap())
            .collect();
        let packed: Vec<_> = bs
            .iter()
            .map(|b| {
                cpu.pack_weight(&b.view(), nt, name)
                    .unwrap()
                    .expect("packing needs AVX-512F")
            })
            .collect();
        let bias = Tensor::from_f32(&[n], &random(&mut rng, n), DType::F32).unwrap();
        for m in [1usize, 2, 4, 8, 16, 32, 64, 128] {
            let a = Tensor::from_f32(&[m, k], &random(&mut rng, m * k), DType::F32).unwrap();
            let opts = if nt {
                MatmulOpts::nt()
            } else {
                MatmulOpts::default()
            };
            let mut outs = [
                Tensor::zeros(&[m, n], DType::F32).unwrap(),
                Tensor::zeros(&[m, n], DType::F32).unwrap(),
                Tensor::zeros(&[m, n], DType::F32).unwrap(),
            ];
            let mut times = [Vec::new(), Vec::new(), Vec::new()];
            // The timed reps, then one more with the same copy for every path (compared below).
            for rep in 0..=reps {
                for (p, out) in outs.iter_mut().enumerate() {
                    let c = if rep == reps {
                        0
                    } else {
                        (rep * 3 + p + 1) % copies
                    };
                    set_small_m_fast_path(p == 1);
                    let t = Instant::now();
                    if p == 2 {
                        cpu.matmul_packed(
                            &a.view(),
                            &packed[c],
                            Some(&bias.view()),
                            &mut out.view_mut(),
                            false,
                        )
                    } else {
                        cpu.matmul(
                            &a.view(),
                            &bs[c].view(),
                            Some(&bias.view()),
                            &mut out.view_mut(),
                            opts,
                        )
                    }
                    .unwrap();
                    if rep < reps {
                        times[p].push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
            }
            // The fastest run: the least disturbed by other processes on a shared machine.
            let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
            let (tg, tf, tp) = (best(&times[0]), best(&times[1]), best(&times[2]));
            let g = outs[0].to_f32_vec();
            for other in &outs[1..] {
                let err = g
                    .iter()
                    .zip(&other.to_f32_vec())
                    .map(|(x, y)| (x - y).abs() / (1.0 + x.abs()))
                    .fold(0.0f32, f32::max);
                assert!(err < 1e-4, "paths disagree: {err}");
            }
            let flops = 2.0 * (m * n * k) as f64;
            let bytes = 4.0 * (n * k + m * k + m * n) as f64;
            println!(
                "{:>18} {:>4} {:>9.3} {:>9.3} {:>9.3} {:>6.2}x {:>6.2}x {:>8.1} {:>8.1}",
                name,
                m,
                tg,
                tf,
                tp,
                tg / tf,
                tf / tp,
                flops / tp / 1e6,
                bytes / tp / 1e6
            );
        }
    }
    set_small_m_fast_path(true);
}

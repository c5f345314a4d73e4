//! Fused prefix attention against the naive concat, forward and backward, on the named shapes
//! of docs/ARCHITECTURE.md §6: on the CPU always (the long shapes CPU-scaled), and on a CUDA device when
//! one is usable (full shapes, CUDA-event times of single calls, inputs rotated through
//! 256 MiB so that L2 does not hold them). Never on the emulator. Run with
//! `cargo bench --bench attn`; the ratio fused/naive is the figure that matters.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prefix_attn::attn::testing::{FwdBuffers, GradBuffers, RandomProblem};
use prefix_attn::attn::{cpu, shapes};
use prefix_attn::bench::{naive::NaiveConcat, shape_spec};
use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::DType;
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("attn-cpu");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for shape in shapes::SHAPES.map(|s| s.cpu_scaled()) {
        let pb =
            RandomProblem::new(shape_spec(shape, DType::F16), &mut Rng::new(0)).expect("problem");
        let args = pb.args().expect("args");
        // The naive method's expanded buffers, allocated once outside the timed calls.
        let mut nc =
            NaiveConcat::new(&CpuBackend, &args.check().expect("problem")).expect("naive buffers");
        g.throughput(Throughput::Elements(shape.fwd_flops() as u64));
        let mut f = FwdBuffers::poisoned(&pb.spec).expect("buffers");
        g.bench_function(BenchmarkId::new("fwd-fused", shape.name), |b| {
            b.iter(|| cpu::forward(&args, f.out()).expect("fused forward"))
        });
        g.bench_function(BenchmarkId::new("fwd-naive", shape.name), |b| {
            b.iter(|| {
                nc.forward(&CpuBackend, &args, f.out())
                    .expect("naive forward")
            })
        });
        cpu::forward(&args, f.out()).expect("forward");
        let mut gr = GradBuffers::poisoned(&pb.spec).expect("buffers");
        let bargs = pb.bwd_args(&f.o, &f.lse, false).expect("args");
        g.bench_function(BenchmarkId::new("bwd-fused", shape.name), |b| {
            b.iter(|| cpu::backward(&bargs, gr.grads(true, false)).expect("fused backward"))
        });
        g.bench_function(BenchmarkId::new("bwd-naive", shape.name), |b| {
            b.iter(|| {
                nc.backward(&CpuBackend, &bargs, gr.grads(true, false))
                    .expect("naive backward")
            })
        });
    }
    g.finish();
}

fn bench_cuda(c: &mut Criterion) {
    use prefix_attn::bench::{AttnMethod, DeviceAttnBench};
    use prefix_attn::device::cuda::{device_count, CudaBackend};
    let be = match device_count() {
        0 => None,
        _ => CudaBackend::new(0).ok(),
    };
    let Some(be) = be else {
        println!("attn-cuda: skipped (no usable CUDA device)");
        return;
    };
    println!("attn-cuda on {}", be.describe());
    let mut g = c.benchmark_group("attn-cuda");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for shape in shapes::SHAPES {
        let mut bench = DeviceAttnBench::new(&be, shape, 256 << 20).expect("device buffers");
        g.throughput(Throughput::Elements(shape.fwd_flops() as u64));
        for (id, m) in [
            ("fwd-fused", AttnMethod::FusedFwd),
            ("fwd-naive", AttnMethod::NaiveFwd),
            ("bwd-fused", AttnMethod::FusedBwd),
            ("bwd-naive", AttnMethod::NaiveBwd),
        ] {
            g.bench_function(BenchmarkId::new(id, shape.name), |b| {
                // All `iters` calls back to back between two events (host work overlapped).
                b.iter_custom(|iters| {
                    let per_call = bench.time(m, 0, iters as usize).expect("device run");
                    Duration::from_secs_f64(per_call * iters as f64 / 1e3)
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench, bench_cuda);
criterion_main!(benches);

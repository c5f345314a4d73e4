//! Fused prefix attention against the naive concat on the CPU, forward and forward+backward,
//! on the named shapes of DESIGN.md §6 (the long ones CPU-scaled). Run with
//! `cargo bench --bench attn`; the ratio fused/naive is the figure that matters.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use prefix_attn::attn::testing::{FwdBuffers, GradBuffers, ProblemSpec, RandomProblem};
use prefix_attn::attn::{cpu, naive, shapes};
use prefix_attn::rng::Rng;
use prefix_attn::tensor::DType;
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("attn-cpu");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for shape in shapes::SHAPES.map(|s| s.cpu_scaled()) {
        let mut spec = ProblemSpec::new(
            shape.batch,
            shape.tq,
            shape.tk,
            shape.heads_q,
            shape.heads_kv,
            shape.head_dim,
            shape.prefix_len,
            shape.causal,
        );
        spec.dtype = DType::F16;
        let pb = RandomProblem::new(spec, &mut Rng::new(0)).expect("problem");
        let args = pb.args().expect("args");
        g.throughput(Throughput::Elements(shape.fwd_flops() as u64));
        let mut f = FwdBuffers::poisoned(&pb.spec).expect("buffers");
        g.bench_function(BenchmarkId::new("fwd-fused", shape.name), |b| {
            b.iter(|| cpu::forward(&args, f.out()).expect("fused forward"))
        });
        g.bench_function(BenchmarkId::new("fwd-naive", shape.name), |b| {
            b.iter(|| naive::forward(&args, f.out()).expect("naive forward"))
        });
        cpu::forward(&args, f.out()).expect("forward");
        let mut gr = GradBuffers::poisoned(&pb.spec).expect("buffers");
        let bargs = pb.bwd_args(&f.o, &f.lse, false).expect("args");
        g.bench_function(BenchmarkId::new("bwd-fused", shape.name), |b| {
            b.iter(|| cpu::backward(&bargs, gr.grads(true, false)).expect("fused backward"))
        });
        g.bench_function(BenchmarkId::new("bwd-naive", shape.name), |b| {
            b.iter(|| naive::backward(&bargs, gr.grads(true, false)).expect("naive backward"))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

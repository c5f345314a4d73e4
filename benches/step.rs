//! One full prefix-tuning training step (encoder forward, model forward and backward, encoder
//! backward, AdamW) on random-weight models, as `prefix-attn bench step` times it:
//! `cargo bench --bench step`. `scripts/bench-step-compare.sh` compares with PyTorch + PEFT.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prefix_attn::bench::StepBench;
use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::gpt2::random::{random_model, small_config};
use prefix_attn::lm::Batch;
use prefix_attn::prefix::encoder::{EncoderDims, PrefixEncoder};
use prefix_attn::rng::Rng;
use prefix_attn::train::optim::{Optimizer, OptimizerKind};
use prefix_attn::train::trainer::Stepper;
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let be = CpuBackend;
    let mut g = c.benchmark_group("train-step-cpu");
    g.sample_size(10).warm_up_time(Duration::from_secs(1));
    for shape in ["tiny", "gpt2-small"] {
        let s = StepBench::named(shape).expect("shape");
        let cfg = if shape == "tiny" {
            small_config(3, 4, 16, 503, 128)
        } else {
            small_config(12, 12, 64, 50257, 1024)
        };
        let model = random_model(&cfg, 0, 0.02, &be).expect("model");
        let dims = EncoderDims {
            prefix_len: s.prefix_len,
            token_dim: cfg.n_embd,
            hidden: s.mid_dim,
            num_layers: cfg.n_layer,
            projection: true,
        };
        let enc = PrefixEncoder::init(dims, 0, &be).expect("encoder");
        let adamw = OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let opt = Optimizer::new(adamw, &dims.shapes(), &be).expect("optimizer");
        let mut stepper = Stepper::new(&model, enc, opt, &be).expect("stepper");
        let mut rng = Rng::new(1);
        let ids: Vec<Vec<u32>> = (0..s.batch)
            .map(|_| {
                (0..s.seq)
                    .map(|_| rng.below(cfg.vocab_size as u64) as u32)
                    .collect()
            })
            .collect();
        let labels: Vec<Vec<i32>> = ids
            .iter()
            .map(|v| v.iter().map(|&x| x as i32).collect())
            .collect();
        let pairs: Vec<(&[u32], &[i32])> = ids
            .iter()
            .zip(&labels)
            .map(|(a, b)| (a.as_slice(), b.as_slice()))
            .collect();
        let batch = Batch::new(&pairs).expect("batch");
        g.throughput(Throughput::Elements((s.batch * s.seq) as u64));
        if shape == "gpt2-small" {
            g.measurement_time(Duration::from_secs(15));
        }
        g.bench_function(shape, |b| {
            b.iter(|| stepper.step(&be, &batch, 5e-5).expect("step"))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

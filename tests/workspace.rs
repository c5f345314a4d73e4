//! The grow-only workspace: training steps (and evaluations) over batches whose shapes change
//! reuse buffers allocated for the largest batch seen, and give bit-identical results to a
//! fresh, exactly sized allocation for every step.

use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::device::emu::EmuBackend;
use prefix_attn::device::Backend;
use prefix_attn::gpt2::random::{random_model, small_config};
use prefix_attn::lm::{Batch, LossSum, PrefixLm};
use prefix_attn::prefix::encoder::{EncoderDims, PrefixEncoder};
use prefix_attn::rng::Rng;
use prefix_attn::tensor::Tensor;
use prefix_attn::train::data::Example;
use prefix_attn::train::optim::{Optimizer, OptimizerKind};
use prefix_attn::train::trainer::{evaluate, Stepper};

/// A random example of `len` tokens whose first `prompt` labels are not counted.
fn example(rng: &mut Rng, vocab: usize, len: usize, prompt: usize) -> Example {
    let input_ids: Vec<u32> = (0..len).map(|_| rng.below(vocab as u64) as u32).collect();
    let labels = input_ids
        .iter()
        .enumerate()
        .map(|(t, &id)| if t < prompt { -100 } else { id as i32 })
        .collect();
    Example { input_ids, labels }
}

/// Batches of changing sizes and lengths: the largest comes first, so every later batch
/// runs in buffers whose tails hold an earlier batch's values.
fn batches(rng: &mut Rng, vocab: usize) -> Vec<Vec<Example>> {
    // (sequences, [longest, others]) per batch.
    let shapes: [(usize, usize); 6] = [(3, 11), (1, 4), (2, 7), (3, 11), (2, 3), (1, 9)];
    shapes
        .iter()
        .map(|&(b, t)| {
            (0..b)
                .map(|i| {
                    let len = if i == 0 {
                        t
                    } else {
                        2 + rng.below(t as u64 - 1) as usize
                    };
                    let prompt = rng.below(len as u64 / 2 + 1) as usize;
                    example(rng, vocab, len, prompt)
                })
                .collect()
        })
        .collect()
}

fn to_batch(examples: &[Example]) -> Batch {
    let pairs: Vec<(&[u32], &[i32])> = examples
        .iter()
        .map(|e| (e.input_ids.as_slice(), e.labels.as_slice()))
        .collect();
    Batch::new(&pairs).unwrap()
}

fn bits(be: &dyn Backend, enc: &PrefixEncoder) -> Vec<Vec<u32>> {
    enc.params
        .iter()
        .map(|p| {
            be.download(p)
                .unwrap()
                .to_f32_vec()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

fn run(be: &dyn Backend, head_dim: usize) {
    let cfg = small_config(2, 2, head_dim, 61, 32);
    let model = random_model(&cfg, 7, 0.05, be).unwrap();
    run_model(be, &model);
}

/// A Llama-family model: GQA (2 query heads over 1 KV head), rotary positions, RMSNorm.
fn run_llama(be: &dyn Backend, head_dim: usize) {
    use prefix_attn::llama::random;
    let cfg = random::small_config("qwen2", 2, 2, 1, head_dim, 61, 32);
    let model = random::random_model(&cfg, 7, 0.05, be).unwrap();
    run_model(be, &model);
}

fn run_model(be: &dyn Backend, lm: &dyn PrefixLm) {
    let vocab = lm.geometry().vocab_size;
    let dims = EncoderDims::for_model(&lm.geometry(), 3, 16, true);
    let adamw = OptimizerKind::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let new_stepper = |enc: PrefixEncoder, opt: Optimizer| Stepper::new(lm, enc, opt, be).unwrap();
    let enc = || PrefixEncoder::init(dims, 11, be).unwrap();
    let opt = || Optimizer::new(adamw, &dims.shapes(), be).unwrap();
    let mut rng = Rng::new(0x5eed);
    let data = batches(&mut rng, vocab);
    let eval_sets: Vec<Vec<Example>> = [[12, 3, 8], [5, 2, 9]]
        .iter()
        .map(|lens| {
            lens.iter()
                .map(|&len| example(&mut rng, vocab, len, 1))
                .collect()
        })
        .collect();

    // One stepper for the whole run: its workspace grows to the first batch and is reused.
    let mut reused = new_stepper(enc(), opt());
    // A fresh stepper (fresh, exactly sized buffers) for every step, handed the encoder and
    // optimiser state of the previous one.
    let mut fresh = Some(new_stepper(enc(), opt()));
    for (i, examples) in data.iter().enumerate() {
        let batch = to_batch(examples);
        let lr = 1e-2;
        let a = reused.step(be, &batch, lr).unwrap();
        let Stepper { enc, opt, .. } = fresh.take().unwrap();
        let mut f = new_stepper(enc, opt);
        let b = f.step(be, &batch, lr).unwrap();
        assert!(a.count > 0 && a.sum.is_finite(), "step {i}: {a:?}");
        assert_eq!(
            a.sum.to_bits(),
            b.sum.to_bits(),
            "step {i}: loss {a:?} vs {b:?}"
        );
        assert_eq!(a.count, b.count, "step {i}");
        assert_eq!(
            bits(be, &reused.enc),
            bits(be, &f.enc),
            "step {i}: encoder after the update"
        );
        fresh = Some(f);
    }
    // Evaluations in the stepper's kept workspace (one sequence per chunk, lengths
    // changing, the longest first), against a fresh workspace for every sequence, summed in
    // the same order.
    let f = fresh.as_mut().unwrap();
    let pre = Tensor::from_f32(
        &[dims.prefix_len, dims.out_dim()],
        &f.prefix(be).unwrap(),
        lm.dtype(),
    )
    .unwrap();
    let pre = be.upload(&pre).unwrap();
    for (i, set) in eval_sets.iter().enumerate() {
        let a = reused.evaluate(be, set, 1).unwrap();
        let mut want = LossSum { sum: 0.0, count: 0 };
        for e in set {
            let l = evaluate(lm, be, Some(&pre), std::slice::from_ref(e), 1).unwrap();
            want.sum += l.sum;
            want.count += l.count;
        }
        assert!(a.count > 0 && a.sum.is_finite(), "eval {i}: {a:?}");
        assert_eq!(a.count, want.count, "eval {i}");
        assert_eq!(
            a.sum.to_bits(),
            want.sum.to_bits(),
            "eval {i}: {a:?} vs {want:?}"
        );
    }
}

#[test]
fn varying_batches_in_a_grown_workspace_match_fresh_buffers_cpu() {
    run(&CpuBackend, 8);
}

#[test]
fn varying_batches_in_a_grown_workspace_match_fresh_buffers_emu() {
    // fp16 with the logit gradient written over the logits; the kernels take head dim 64.
    run(&EmuBackend, 64);
}

#[test]
fn llama_varying_batches_in_a_grown_workspace_match_fresh_buffers_cpu() {
    run_llama(&CpuBackend, 8);
}

#[test]
fn llama_varying_batches_in_a_grown_workspace_match_fresh_buffers_emu() {
    run_llama(&EmuBackend, 64);
}

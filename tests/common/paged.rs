//! The paged serving step with adapters of different lengths, for any model family.

use prefix_attn::device::Backend;
use prefix_attn::lm::paged::{KvShape, PagedKv, PagedSeq, PrefixMode, PrefixTable};
use prefix_attn::lm::PrefixLm;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::Tensor;

/// Adapters of different lengths in one prefix table: the paged step's logits (prompts over
/// 16 tokens through the prefill path, shorter ones and the next token through the decode
/// kernel) equal the contiguous-cache decoder's with each adapter's own prefix tensor.
/// `base` is a `[5, L·2·Hkv·D]` prefix (f32 values); the adapters are noisy copies of its
/// first 5 and 3 rows, and the shorter adapter's slot first holds a longer one, so its rows
/// past 3 are stale and must be masked. The model needs a context of 32 positions at least.
pub fn adapters_of_different_lengths(model: &dyn PrefixLm, be: &dyn Backend, base: &[f32]) {
    let g = model.geometry();
    let width = g.prefix_width();
    assert_eq!(base.len(), 5 * width, "base is [5, L*2*Hkv*D]");
    let mut rng = Rng::new(7);
    let mut noisy = |rows: usize| {
        let v: Vec<f32> = base[..rows * width]
            .iter()
            .map(|&x| x + 0.5 * rng.normal() as f32)
            .collect();
        be.upload(&Tensor::from_f32(&[rows, width], &v, model.dtype()).unwrap())
            .unwrap()
    };
    let (long, short, stale) = (noisy(5), noisy(3), noisy(5));
    let mut table = PrefixTable::new(be, KvShape::of(&g), model.dtype(), 2, 5).unwrap();
    table.write(be, 0, "long", &long).unwrap();
    table.write(be, 1, "stale", &stale).unwrap();
    table.write(be, 1, "short", &short).unwrap();
    assert_eq!((table.slot_len(0), table.slot_len(1)), (5, 3));
    let mut kv = PagedKv::new(be, KvShape::of(&g), model.dtype(), 64, 4).unwrap();
    let v = g.vocab_size as u64;
    // (adapter slot, prompt length): two prefill lengths and two decode-kernel lengths.
    let cases = [
        (Some(0u32), 20usize),
        (Some(1), 19),
        (None, 18),
        (Some(1), 6),
        (Some(0), 5),
    ];
    let mut tokens: Vec<Vec<u32>> = cases
        .iter()
        .map(|&(_, n)| (0..n).map(|_| rng.below(v) as u32).collect())
        .collect();
    let pages: Vec<Vec<u32>> = (0..cases.len() as u32)
        .map(|i| (i * 8..i * 8 + 8).collect())
        .collect();
    let prefix_of = |slot: Option<u32>| slot.map(|s| if s == 0 { &long } else { &short });
    let mut cached = vec![0; cases.len()];
    for round in 0..2 {
        let seqs: Vec<PagedSeq> = (0..cases.len())
            .map(|i| PagedSeq {
                tokens: &tokens[i],
                cached: cached[i],
                pages: &pages[i],
                adapter: cases[i].0,
            })
            .collect();
        let got = model
            .step_paged(be, &seqs, &mut kv, &table, PrefixMode::Table)
            .unwrap();
        for (i, &(slot, _)) in cases.iter().enumerate() {
            let mut cache = model.new_cache(be, 64).unwrap();
            let want = model
                .decode(be, &tokens[i], prefix_of(slot), &mut cache)
                .unwrap();
            let err = got[i]
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(
                err <= 1e-5 * scale.max(1.0),
                "round {round}, case {i}: {err}"
            );
        }
        for i in 0..cases.len() {
            cached[i] = tokens[i].len();
            let next = rng.below(v) as u32;
            tokens[i].push(next);
        }
    }
}

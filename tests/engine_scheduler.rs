//! The continuous-batching scheduler against direct, one-request-at-a-time decoding, over a
//! toy model whose "keys and values" are the token ids themselves, written into the pages the
//! scheduler hands out and read back from them: a page handed out twice, a copy-on-write
//! skipped or a wrong block-table row changes what the model sees, hence the tokens.

use prefix_attn::engine::beam::log_softmax;
use prefix_attn::engine::sampling::argmax;
use prefix_attn::engine::scheduler::{
    Completion, Decoding, FinishReason, PagedSeq, Request, Scheduler, SchedulerConfig, StepModel,
};
use prefix_attn::engine::{BeamParams, BeamSearch, PageCopy, Sampler, SamplingParams};
use prefix_attn::rng::Rng;
use prefix_attn::Error;

const VOCAB: usize = 13;
const CTX: usize = 40;

/// Next-token logits as a fixed random function of (adapter, tokens).
fn toy_logits(adapter: Option<u32>, tokens: &[u32]) -> Vec<f32> {
    let mut h: u64 = adapter.map_or(7, |a| a as u64 * 1_000_003 + 11);
    for &t in tokens {
        h = h.wrapping_mul(0x100_0000_01b3).wrapping_add(t as u64 + 1);
    }
    let mut rng = Rng::new(h);
    (0..VOCAB).map(|_| (rng.normal() * 2.5) as f32).collect()
}

struct PagedToy {
    page_size: usize,
    /// (token, position) per cache row, `None` = never written.
    rows: Vec<Option<(u32, usize)>>,
    calls: usize,
    max_seqs: usize,
}

impl PagedToy {
    fn new(num_pages: usize, page_size: usize) -> PagedToy {
        PagedToy {
            page_size,
            rows: vec![None; num_pages * page_size],
            calls: 0,
            max_seqs: 0,
        }
    }
}

impl StepModel for PagedToy {
    fn vocab_size(&self) -> usize {
        VOCAB
    }
    fn context_len(&self, adapter: Option<u32>) -> prefix_attn::Result<usize> {
        match adapter {
            Some(a) if a >= 8 => Err(Error::index("adapter", format!("slot {a} is empty"))),
            Some(a) => Ok(CTX - a as usize), // adapters of different prefix lengths
            None => Ok(CTX),
        }
    }
    fn copy_pages(&mut self, copies: &[PageCopy]) -> prefix_attn::Result<()> {
        for c in copies {
            for r in 0..c.rows {
                self.rows[c.dst as usize * self.page_size + r] =
                    self.rows[c.src as usize * self.page_size + r];
            }
        }
        Ok(())
    }
    fn step(&mut self, seqs: &[PagedSeq]) -> prefix_attn::Result<Vec<Vec<f32>>> {
        self.calls += 1;
        self.max_seqs = self.max_seqs.max(seqs.len());
        let ps = self.page_size;
        let mut out = Vec::new();
        for s in seqs {
            assert!(s.cached < s.tokens.len());
            for pos in s.cached..s.tokens.len() {
                self.rows[s.pages[pos / ps] as usize * ps + pos % ps] = Some((s.tokens[pos], pos));
            }
            let seen: Vec<u32> = (0..s.tokens.len())
                .map(
                    |pos| match self.rows[s.pages[pos / ps] as usize * ps + pos % ps] {
                        Some((t, p)) if p == pos => t,
                        _ => u32::MAX, // a row someone else wrote or nobody did
                    },
                )
                .collect();
            out.push(toy_logits(s.adapter, &seen));
        }
        Ok(out)
    }
}

/// Direct decoding of one request from the toy function (no pages, no scheduler).
fn reference(req: &Request) -> (Vec<u32>, FinishReason) {
    let ctx = CTX - req.adapter.map_or(0, |a| a as usize);
    let max_new = req.max_new_tokens.min(ctx - req.prompt.len() + 1);
    match &req.decoding {
        Decoding::Beam {
            num_beams,
            length_penalty,
        } => {
            let mut bs = BeamSearch::new(BeamParams {
                num_beams: *num_beams,
                length_penalty: *length_penalty,
                max_new_tokens: max_new,
                stop_ids: req.stop_ids.clone(),
            })
            .unwrap();
            while !bs.is_done() {
                let rows: Vec<Vec<f64>> = bs
                    .running()
                    .iter()
                    .map(|b| {
                        let seq: Vec<u32> = req.prompt.iter().chain(&b.tokens).copied().collect();
                        log_softmax(&toy_logits(req.adapter, &seq))
                    })
                    .collect();
                bs.step(&rows, |_| false).unwrap();
            }
            let (ids, stopped) = bs.best();
            let f = if stopped {
                FinishReason::Stop
            } else {
                FinishReason::Length
            };
            (ids.to_vec(), f)
        }
        d => {
            let mut sampler = match d {
                Decoding::Sample(p) => Some(Sampler::new(*p).unwrap()),
                _ => None,
            };
            let mut seq = req.prompt.clone();
            let mut out = Vec::new();
            loop {
                let l = toy_logits(req.adapter, &seq);
                let t = match &mut sampler {
                    Some(s) => s.next(&l),
                    None => argmax(&l),
                };
                out.push(t);
                seq.push(t);
                if req.stop_ids.contains(&t) {
                    return (out, FinishReason::Stop);
                }
                if out.len() >= max_new {
                    return (out, FinishReason::Length);
                }
            }
        }
    }
}

fn random_requests(rng: &mut Rng, n: usize) -> Vec<Request> {
    (0..n)
        .map(|i| {
            let len = 1 + rng.below(12) as usize;
            let decoding = match i % 3 {
                0 => Decoding::Greedy,
                1 => Decoding::Sample(SamplingParams {
                    temperature: 0.9,
                    top_k: Some(8),
                    top_p: 0.95,
                    seed: rng.next_u64(),
                }),
                _ => Decoding::Beam {
                    num_beams: 2 + rng.below(3) as usize,
                    length_penalty: [0.5, 1.0, 2.0][rng.below(3) as usize],
                },
            };
            Request {
                prompt: (0..len).map(|_| rng.below(VOCAB as u64) as u32).collect(),
                adapter: [None, Some(0), Some(3), Some(5)][rng.below(4) as usize],
                max_new_tokens: 1 + rng.below(20) as usize,
                stop_ids: if rng.below(2) == 0 { vec![4] } else { vec![] },
                decoding,
            }
        })
        .collect()
}

fn run_all(reqs: &[Request], cfg: SchedulerConfig) -> (Vec<Completion>, Scheduler, PagedToy) {
    let mut model = PagedToy::new(cfg.num_pages, cfg.page_size);
    let mut s = Scheduler::new(cfg).unwrap();
    let ids: Vec<u64> = reqs
        .iter()
        .map(|r| s.submit(&model, r.clone(), None).unwrap())
        .collect();
    let mut done = s.run_to_completion(&mut model).unwrap();
    done.sort_by_key(|c| ids.iter().position(|&i| i == c.id).unwrap());
    (done, s, model)
}

#[test]
fn batched_mixed_requests_equal_direct_decoding() {
    let mut rng = Rng::new(20261202);
    let reqs = random_requests(&mut rng, 24);
    let cfg = SchedulerConfig {
        num_pages: 256,
        page_size: 4,
        max_batch: 64,
    };
    let (done, s, model) = run_all(&reqs, cfg);
    assert_eq!(done.len(), reqs.len());
    for (r, c) in reqs.iter().zip(&done) {
        let (ids, finish) = reference(r);
        assert_eq!((&c.ids, c.finish), (&ids, finish), "{r:?}");
    }
    assert!(
        model.max_seqs > 10,
        "requests were batched ({} at most)",
        model.max_seqs
    );
    assert_eq!(s.pool().used_pages(), 0, "every page came back");
    assert!(done.iter().all(|c| c.preemptions == 0));
}

#[test]
fn preemption_under_page_pressure_changes_no_result() {
    let mut rng = Rng::new(77);
    let reqs = random_requests(&mut rng, 16);
    let tight = SchedulerConfig {
        num_pages: 48,
        page_size: 2,
        max_batch: 32,
    };
    let (done, s, _) = run_all(&reqs, tight);
    let preempted: usize = done.iter().map(|c| c.preemptions).sum();
    assert!(preempted > 0, "the pool was meant to run short");
    for (r, c) in reqs.iter().zip(&done) {
        let (ids, finish) = reference(r);
        assert_eq!((&c.ids, c.finish), (&ids, finish), "{r:?}");
    }
    assert_eq!(s.pool().used_pages(), 0);
}

#[test]
fn one_page_size_one_batch_slot_still_serves() {
    let mut rng = Rng::new(5);
    let reqs: Vec<Request> = random_requests(&mut rng, 6)
        .into_iter()
        .filter(|r| !matches!(r.decoding, Decoding::Beam { .. }))
        .collect();
    let cfg = SchedulerConfig {
        num_pages: 64,
        page_size: 1,
        max_batch: 1,
    };
    let (done, _, model) = run_all(&reqs, cfg);
    assert_eq!(model.max_seqs, 1);
    for (r, c) in reqs.iter().zip(&done) {
        assert_eq!(c.ids, reference(r).0);
    }
}

#[test]
fn requests_that_can_never_run_are_refused_with_the_reason() {
    let model = PagedToy::new(4, 4);
    let mut s = Scheduler::new(SchedulerConfig {
        num_pages: 4,
        page_size: 4,
        max_batch: 4,
    })
    .unwrap();
    let base = Request {
        prompt: vec![1, 2, 3],
        adapter: None,
        max_new_tokens: 4,
        stop_ids: vec![],
        decoding: Decoding::Greedy,
    };
    let cases = [
        (
            Request {
                prompt: vec![],
                ..base.clone()
            },
            "at least one token",
        ),
        (
            Request {
                prompt: vec![1, 99],
                ..base.clone()
            },
            "outside the vocabulary",
        ),
        (
            Request {
                prompt: vec![1; 41],
                ..base.clone()
            },
            "do not fit the context",
        ),
        (
            Request {
                adapter: Some(9),
                ..base.clone()
            },
            "slot 9 is empty",
        ),
        (
            Request {
                max_new_tokens: 30,
                ..base.clone()
            },
            "pages needed",
        ),
        (
            Request {
                decoding: Decoding::Beam {
                    num_beams: 5,
                    length_penalty: 1.0,
                },
                max_new_tokens: 1,
                ..base.clone()
            },
            "pages needed",
        ),
        (
            Request {
                decoding: Decoding::Sample(SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                }),
                ..base.clone()
            },
            "top_p",
        ),
    ];
    for (r, want) in cases {
        let e = s.submit(&model, r, None).unwrap_err().to_string();
        assert!(e.contains(want), "{e} (wanted {want})");
    }
    assert!(s.is_idle());
}

#[test]
fn cancel_frees_pages_and_stop_conditions_end_requests() {
    let mut model = PagedToy::new(64, 4);
    let mut s = Scheduler::new(SchedulerConfig {
        num_pages: 64,
        page_size: 4,
        max_batch: 8,
    })
    .unwrap();
    let req = Request {
        prompt: vec![1, 2, 3, 4, 5],
        adapter: Some(1),
        max_new_tokens: 30,
        stop_ids: vec![],
        decoding: Decoding::Greedy,
    };
    let a = s.submit(&model, req.clone(), None).unwrap();
    let b = s
        .submit(
            &model,
            req.clone(),
            Some(Box::new(|t: &[u32]| t.len() == 3)),
        )
        .unwrap();
    s.step(&mut model).unwrap();
    assert!(s.pool().used_pages() > 0);
    assert!(s.cancel(a));
    assert!(!s.cancel(a));
    let rest = s.run_to_completion(&mut model).unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].id, b);
    assert_eq!(rest[0].finish, FinishReason::Stop);
    assert_eq!(rest[0].ids, reference(&req).0[..3].to_vec());
    assert_eq!(s.pool().used_pages(), 0);
    // max_new_tokens = 0 finishes without a model call.
    let calls = model.calls;
    s.submit(
        &model,
        Request {
            max_new_tokens: 0,
            ..req
        },
        None,
    )
    .unwrap();
    let z = s.step(&mut model).unwrap();
    assert_eq!(
        (z[0].ids.len(), z[0].finish, model.calls),
        (0, FinishReason::Length, calls)
    );
}

//! Beam search as transformers' `generate(num_beams=…)` defines it (its vectorised
//! implementation of version 5, `early_stopping=False`), for one request, one step at a time so
//! that the engine can batch the beams of many requests.
//!
//! Each step every running beam's next-token log-probabilities are added to its score; the
//! `K = max(2, 1 + #stop ids) · num_beams` best continuations over all beams are kept. Those
//! among the first `num_beams` that end (a stop id, or the length limit) become finished
//! hypotheses scored `sum_logprobs / generated_len ^ length_penalty`, merged with the earlier
//! ones (the best `num_beams` stay); the best `num_beams` continuations that did not end run on.
//! The search stops when no continuation can run on, or when every finished slot is filled and
//! the best running beam, scored at its current length, cannot beat the worst of them.

use crate::error::{Error, Result};

/// Penalty transformers adds to a score to take it out of a ranking (kept as a number rather
/// than −∞ so that the ranking stays the same as theirs where it matters).
const OUT: f64 = -1.0e9;

/// Beam-search settings of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct BeamParams {
    /// Beams kept (≥ 1; 1 is greedy).
    pub num_beams: usize,
    /// Exponent of the generated length dividing a finished hypothesis' log-probability.
    pub length_penalty: f64,
    /// At most this many new tokens.
    pub max_new_tokens: usize,
    /// Token ids that end a hypothesis (it keeps the id).
    pub stop_ids: Vec<u32>,
}

/// A running beam: its new tokens and summed log-probability.
#[derive(Clone, Debug, PartialEq)]
pub struct Beam {
    /// Generated tokens (the prompt excluded).
    pub tokens: Vec<u32>,
    /// Sum of the tokens' log-probabilities.
    pub score: f64,
}

#[derive(Clone, Debug)]
struct Slot {
    tokens: Vec<u32>,
    score: f64,
    finished: bool,
}

/// The state of one request's beam search.
#[derive(Clone, Debug)]
pub struct BeamSearch {
    params: BeamParams,
    running: Vec<Beam>,
    slots: Vec<Slot>,
    improvement_possible: bool,
    done: bool,
}

/// What one step did to the running beams: new beam `i` continues old beam `parent[i]`
/// (the engine forks that beam's cache) with token `token[i]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BeamStep {
    /// Old beam each new beam continues.
    pub parent: Vec<usize>,
    /// Token each new beam appended (already in its `tokens`).
    pub token: Vec<u32>,
}

/// Ranking order of transformers' `topk`: higher score first, then lower index.
fn ranked(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// `log_softmax` of one row of logits, in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + logits
        .iter()
        .map(|&x| (x as f64 - m).exp())
        .sum::<f64>()
        .ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

impl BeamSearch {
    /// A search whose beams all start from the prompt (only beam 0 counts at the first step,
    /// as in transformers).
    pub fn new(params: BeamParams) -> Result<BeamSearch> {
        if params.num_beams == 0 {
            return Err(Error::index("num_beams", "0: expected at least 1"));
        }
        if !params.length_penalty.is_finite() {
            return Err(Error::index(
                "length_penalty",
                format!("{}: expected a finite number", params.length_penalty),
            ));
        }
        let n = params.num_beams;
        let running = (0..n)
            .map(|i| Beam {
                tokens: Vec::new(),
                score: if i == 0 { 0.0 } else { OUT },
            })
            .collect();
        let slots = (0..n)
            .map(|_| Slot {
                tokens: Vec::new(),
                score: OUT,
                finished: false,
            })
            .collect();
        let done = params.max_new_tokens == 0;
        Ok(BeamSearch {
            params,
            running,
            slots,
            improvement_possible: true,
            done,
        })
    }

    /// The settings.
    pub fn params(&self) -> &BeamParams {
        &self.params
    }
    /// The beams the next step scores (`num_beams` of them, best first).
    pub fn running(&self) -> &[Beam] {
        &self.running
    }
    /// Whether the search has ended.
    pub fn is_done(&self) -> bool {
        self.done
    }
    /// Tokens generated so far by every running beam.
    pub fn generated_len(&self) -> usize {
        self.running[0].tokens.len()
    }

    /// One step. `log_probs[i]` is running beam `i`'s next-token log-probabilities (`[vocab]`,
    /// e.g. [`log_softmax`] of its logits); `is_stop(tokens)` says whether a continuation ends
    /// there besides the stop ids (stop strings). Returns how the new beams descend from the old.
    pub fn step(
        &mut self,
        log_probs: &[Vec<f64>],
        is_stop: impl Fn(&[u32]) -> bool,
    ) -> Result<BeamStep> {
        let n = self.params.num_beams;
        if self.done {
            return Err(Error::index("beam search", "step after the search ended"));
        }
        if log_probs.len() != n {
            return Err(Error::index(
                "log_probs",
                format!("{} rows, expected one per beam ({n})", log_probs.len()),
            ));
        }
        let vocab = log_probs[0].len();
        if vocab == 0 || log_probs.iter().any(|r| r.len() != vocab) {
            return Err(Error::index("log_probs", "rows of unequal or zero length"));
        }
        let keep = (2usize.max(1 + self.params.stop_ids.len()) * n).min(n * vocab);
        let acc: Vec<f64> = (0..n * vocab)
            .map(|j| self.running[j / vocab].score + log_probs[j / vocab][j % vocab])
            .collect();
        let top = ranked(&acc, keep);
        let gen_len = self.generated_len() + 1;
        let at_limit = gen_len >= self.params.max_new_tokens;
        let cands: Vec<(usize, u32, Vec<u32>, f64, bool)> = top
            .iter()
            .map(|&j| {
                let (parent, tok) = (j / vocab, (j % vocab) as u32);
                let mut tokens = self.running[parent].tokens.clone();
                tokens.push(tok);
                let hits = at_limit || self.params.stop_ids.contains(&tok) || is_stop(&tokens);
                (parent, tok, tokens, acc[j], hits)
            })
            .collect();

        // The continuations that run on.
        let run_scores: Vec<f64> = cands
            .iter()
            .map(|c| c.3 + if c.4 { OUT } else { 0.0 })
            .collect();
        let next = ranked(&run_scores, n);

        // The finished hypotheses: only the first num_beams continuations may finish.
        let norm = (gen_len as f64).powf(self.params.length_penalty);
        let mut merged: Vec<Slot> = std::mem::take(&mut self.slots);
        for (rank, c) in cands.iter().enumerate() {
            let just_finished = c.4 && rank < n;
            let mut s = c.3 / norm;
            if !self.improvement_possible {
                s += OUT;
            }
            if !just_finished {
                s += OUT;
            }
            merged.push(Slot {
                tokens: c.2.clone(),
                score: s,
                finished: just_finished,
            });
        }
        let scores: Vec<f64> = merged.iter().map(|s| s.score).collect();
        self.slots = ranked(&scores, n)
            .into_iter()
            .map(|i| merged[i].clone())
            .collect();

        let step = BeamStep {
            parent: next.iter().map(|&i| cands[i].0).collect(),
            token: next.iter().map(|&i| cands[i].1).collect(),
        };
        self.running = next
            .iter()
            .map(|&i| Beam {
                tokens: cands[i].2.clone(),
                score: run_scores[i],
            })
            .collect();

        // Can a running beam still beat the worst finished hypothesis?
        let best_possible =
            self.running[0].score / (gen_len as f64).powf(self.params.length_penalty);
        let worst = self
            .slots
            .iter()
            .map(|s| s.score)
            .fold(f64::INFINITY, f64::min);
        let beatable = self
            .slots
            .iter()
            .any(|s| best_possible > if s.finished { worst } else { OUT });
        self.improvement_possible &= beatable;
        let all_end = cands.iter().all(|c| c.4);
        self.done = !self.improvement_possible || all_end;
        Ok(step)
    }

    /// The best hypothesis: its new tokens and whether it ended on a stop (rather than the
    /// length limit). Before the end, the best finished one so far (or the best running beam).
    pub fn best(&self) -> (&[u32], bool) {
        let s = &self.slots[0];
        if s.finished {
            let stopped = s.tokens.len() < self.params.max_new_tokens
                || s.tokens
                    .last()
                    .is_some_and(|t| self.params.stop_ids.contains(t));
            (&s.tokens, stopped)
        } else {
            (&self.running[0].tokens, false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// A toy model: the next-token log-probabilities are a fixed random function of the
    /// sequence so far.
    fn toy(tokens: &[u32], vocab: usize, seed: u64) -> Vec<f64> {
        let mut h = seed;
        for &t in tokens {
            h = h.wrapping_mul(0x100_0000_01b3).wrapping_add(t as u64 + 1);
        }
        let mut rng = Rng::new(h);
        let logits: Vec<f32> = (0..vocab).map(|_| (rng.normal() * 2.0) as f32).collect();
        log_softmax(&logits)
    }

    fn run(p: BeamParams, vocab: usize, seed: u64) -> (Vec<u32>, bool) {
        let mut bs = BeamSearch::new(p).unwrap();
        while !bs.is_done() {
            let lp: Vec<Vec<f64>> = bs
                .running()
                .iter()
                .map(|b| toy(&b.tokens, vocab, seed))
                .collect();
            bs.step(&lp, |_| false).unwrap();
        }
        let (t, s) = bs.best();
        (t.to_vec(), s)
    }

    /// Exhaustive search over every sequence of at most `max_new` tokens: the best score
    /// (`sum log p / len^lp`) among sequences that end (a stop id or the length limit).
    fn exhaustive(vocab: usize, max_new: usize, stop: u32, lp: f64, seed: u64) -> (Vec<u32>, f64) {
        let mut best = (Vec::new(), f64::NEG_INFINITY);
        let mut stack = vec![(Vec::<u32>::new(), 0.0f64)];
        while let Some((seq, s)) = stack.pop() {
            let lps = toy(&seq, vocab, seed);
            for (t, &l) in lps.iter().enumerate() {
                let mut n = seq.clone();
                n.push(t as u32);
                let sc = s + l;
                if t as u32 == stop || n.len() == max_new {
                    let v = sc / (n.len() as f64).powf(lp);
                    if v > best.1 {
                        best = (n, v);
                    }
                } else {
                    stack.push((n, sc));
                }
            }
        }
        best
    }

    fn params(num_beams: usize, lp: f64, max_new: usize, stop: Vec<u32>) -> BeamParams {
        BeamParams {
            num_beams,
            length_penalty: lp,
            max_new_tokens: max_new,
            stop_ids: stop,
        }
    }

    #[test]
    fn one_beam_is_greedy() {
        for seed in 0..20 {
            let (ids, _) = run(params(1, 1.0, 7, vec![]), 13, seed);
            let mut seq = Vec::new();
            for _ in 0..7 {
                let lp = toy(&seq, 13, seed);
                let best = ranked(&lp, 1)[0] as u32;
                seq.push(best);
            }
            assert_eq!(ids, seq, "seed {seed}");
        }
    }

    /// With as many beams as the whole tree is wide, beam search is exhaustive search.
    #[test]
    fn wide_beams_find_the_exhaustive_optimum() {
        for seed in 0..10 {
            let (vocab, max_new, stop) = (4, 3, 2);
            for lp in [0.0, 1.0, 2.0] {
                let (want, _) = exhaustive(vocab, max_new, stop, lp, seed);
                let (got, stopped) = run(params(64, lp, max_new, vec![stop]), vocab, seed);
                assert_eq!(got, want, "seed {seed} lp {lp}");
                assert_eq!(stopped, got.last() == Some(&stop));
            }
        }
    }

    #[test]
    fn bad_settings_and_misuse_are_errors() {
        assert!(BeamSearch::new(params(0, 1.0, 4, vec![])).is_err());
        assert!(BeamSearch::new(params(2, f64::NAN, 4, vec![])).is_err());
        let mut bs = BeamSearch::new(params(2, 1.0, 1, vec![])).unwrap();
        assert!(
            bs.step(&[vec![0.0; 5]], |_| false).is_err(),
            "one row for two beams"
        );
        bs.step(&[vec![-1.0; 5], vec![-1.0; 5]], |_| false).unwrap();
        assert!(bs.is_done());
        assert!(bs.step(&[vec![-1.0; 5], vec![-1.0; 5]], |_| false).is_err());
    }
}

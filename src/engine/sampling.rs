//! Choosing the next token from a row of logits: greedy, or sampling with temperature, top-k
//! and top-p as transformers' logits warpers define them (applied in that order), from a
//! generator that belongs to the request alone — so a seeded request draws the same tokens
//! whatever else shares its batch.

use crate::error::{Error, Result};
use crate::rng::Rng;

/// How one request picks its tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (the OpenAI convention).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (`1`: all).
    pub top_p: f32,
    /// The request's seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges (`temperature ≥ 0` and finite, `top_k ≥ 1`, `0 < top_p ≤ 1`).
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::index(
                "temperature",
                format!(
                    "{}: expected a finite number ≥ 0 (0 = greedy)",
                    self.temperature
                ),
            ));
        }
        if self.top_k == Some(0) {
            return Err(Error::index("top_k", "0: expected at least 1"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::index(
                "top_p",
                format!("{}: expected a number in (0, 1]", self.top_p),
            ));
        }
        Ok(())
    }

    /// Whether the next token is the arg-max (no randomness).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// The seed of request `index` of a run seeded with `run_seed`, for requests that bring no
/// seed of their own: distinct per request, and independent of batch composition.
pub fn request_seed(run_seed: u64, index: u64) -> u64 {
    // One SplitMix64 round over the pair: neighbouring indices give unrelated streams.
    let mut z = run_seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub use crate::lm::generate::argmax;

/// The distribution sampling draws from: `softmax(logits / temperature)` restricted by top-k
/// then top-p, renormalised; zeros where a token was filtered out. `temperature > 0`.
///
/// Top-k keeps every token whose logit is at least the k-th largest (ties at the border are
/// kept, as transformers does); top-p sorts ascending and drops the tokens whose cumulative
/// probability is `≤ 1 − top_p`, always keeping the most likely one.
pub fn filtered_probs(logits: &[f32], params: &SamplingParams) -> Vec<f64> {
    let t = params.temperature as f64;
    let mut scores: Vec<f64> = logits.iter().map(|&x| x as f64 / t).collect();
    if let Some(k) = params.top_k {
        let k = k.min(scores.len());
        if k < scores.len() {
            let mut sorted = scores.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[k - 1];
            for s in scores.iter_mut() {
                if *s < kth {
                    *s = f64::NEG_INFINITY;
                }
            }
        }
    }
    if params.top_p < 1.0 {
        let probs = softmax(&scores);
        let mut order: Vec<usize> = (0..scores.len()).collect();
        // Ascending, as transformers sorts; equal scores keep index order.
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        let threshold = 1.0 - params.top_p as f64;
        let mut cum = 0.0;
        let last = order.len() - 1;
        for (rank, &i) in order.iter().enumerate() {
            cum += probs[i];
            if cum <= threshold && rank != last {
                scores[i] = f64::NEG_INFINITY;
            }
        }
    }
    softmax(&scores)
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|&v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// One request's token chooser: its parameters and its own generator.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// A sampler seeded with `params.seed`; errors on out-of-range parameters.
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.check()?;
        Ok(Sampler {
            params,
            rng: Rng::new(params.seed),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token from one row of logits (`[vocab]`). Greedy takes the arg-max and draws
    /// nothing; sampling draws one uniform number per token.
    pub fn next(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let probs = filtered_probs(logits, &self.params);
        let u = self.rng.uniform();
        let mut cum = 0.0;
        let mut last_nonzero = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                cum += p;
                last_nonzero = i;
                if u < cum {
                    return i as u32;
                }
            }
        }
        // Rounding left the sum a hair under 1 and u above it: the last possible token.
        last_nonzero as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_logits(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| (rng.normal() * 2.0) as f32).collect()
    }

    #[test]
    fn parameters_out_of_range_are_errors() {
        let bad = [
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                top_k: Some(0),
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
        ];
        for p in bad {
            assert!(Sampler::new(p).is_err(), "{p:?}");
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut rng = Rng::new(7);
        for seed in 0..50 {
            let logits = random_logits(&mut rng, 97);
            let mut s = Sampler::new(SamplingParams {
                temperature: 0.8,
                top_k: Some(1),
                top_p: 1.0,
                seed,
            })
            .unwrap();
            assert_eq!(s.next(&logits), argmax(&logits));
        }
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let mut rng = Rng::new(11);
        let rows: Vec<Vec<f32>> = (0..64).map(|_| random_logits(&mut rng, 50)).collect();
        let p = SamplingParams {
            temperature: 1.3,
            top_k: Some(20),
            top_p: 0.95,
            seed: 1234,
        };
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p).unwrap();
            rows.iter().map(|r| s.next(r)).collect::<Vec<u32>>()
        };
        assert_eq!(draw(p), draw(p));
        assert_ne!(draw(p), draw(SamplingParams { seed: 1235, ..p }));
    }

    /// The empirical frequencies of many draws match the filtered distribution (a chi-square
    /// test at a threshold a correct sampler exceeds with probability ~1e-6).
    #[test]
    fn draws_follow_the_filtered_distribution() {
        let mut rng = Rng::new(3);
        let logits = random_logits(&mut rng, 12);
        let p = SamplingParams {
            temperature: 0.7,
            top_k: Some(8),
            top_p: 0.9,
            seed: 99,
        };
        let probs = filtered_probs(&logits, &p);
        let mut s = Sampler::new(p).unwrap();
        let n = 200_000;
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.next(&logits) as usize] += 1;
        }
        let mut chi2 = 0.0;
        let mut dof = 0;
        for (c, &q) in counts.iter().zip(&probs) {
            if q == 0.0 {
                assert_eq!(*c, 0, "a filtered token was drawn");
            } else {
                let e = q * n as f64;
                chi2 += (*c as f64 - e).powi(2) / e;
                dof += 1;
            }
        }
        // chi-square with ≤ 7 degrees of freedom: P(chi2 > 40) < 1e-6.
        assert!(dof >= 2 && chi2 < 40.0, "chi2 = {chi2} over {dof} tokens");
    }

    #[test]
    fn request_seeds_differ() {
        let s: std::collections::HashSet<u64> = (0..1000).map(|i| request_seed(5, i)).collect();
        assert_eq!(s.len(), 1000);
        assert_ne!(request_seed(5, 0), request_seed(6, 0));
    }
}

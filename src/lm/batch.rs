//! A right-padded batch of token sequences with their next-token targets, and the summed
//! loss of a forward pass over it: the same for every model family.

use crate::error::{Error, Result};

/// The label value that is not counted.
pub const IGNORE: i32 = -100;

/// A right-padded batch of token sequences.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Token ids `[B, T]` (padding = 0).
    pub ids: Vec<i32>,
    /// Next-token targets `[B, T]`: `targets[b, t]` is the label of token `t + 1` (HF's
    /// in-model shift), `-100` where nothing is counted.
    pub targets: Vec<i32>,
    /// Valid tokens of each sequence.
    pub lens: Vec<usize>,
    /// `B`.
    pub batch_size: usize,
    /// `T` (the longest sequence).
    pub seq_len: usize,
}

impl Batch {
    /// Builds a batch from `(input_ids, labels)` pairs (labels aligned with the inputs, as
    /// Hugging Face expects them; `-100` ignored).
    pub fn new(examples: &[(&[u32], &[i32])]) -> Result<Batch> {
        let batch_size = examples.len();
        let seq_len = examples.iter().map(|e| e.0.len()).max().unwrap_or(0);
        if batch_size == 0 || seq_len == 0 {
            return Err(Error::index(
                "batch",
                "needs at least one non-empty sequence",
            ));
        }
        let mut ids = vec![0i32; batch_size * seq_len];
        let mut targets = vec![IGNORE; batch_size * seq_len];
        let mut lens = Vec::with_capacity(batch_size);
        for (b, (inp, lab)) in examples.iter().enumerate() {
            if inp.len() != lab.len() {
                return Err(Error::shape(
                    "labels",
                    format!("{} labels, one per input id", inp.len()),
                    &[lab.len()],
                ));
            }
            if inp.is_empty() {
                return Err(Error::index("batch", format!("sequence {b} is empty")));
            }
            for (t, &id) in inp.iter().enumerate() {
                ids[b * seq_len + t] = i32::try_from(id)
                    .map_err(|_| Error::index("input_ids", format!("token id {id} too large")))?;
                if t + 1 < inp.len() {
                    targets[b * seq_len + t] = lab[t + 1];
                }
            }
            lens.push(inp.len());
        }
        Ok(Batch {
            ids,
            targets,
            lens,
            batch_size,
            seq_len,
        })
    }

    /// Number of counted targets.
    pub fn count(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }
}

/// Loss of a forward pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossSum {
    /// Sum of the token losses (nats).
    pub sum: f64,
    /// Number of counted targets.
    pub count: usize,
}

impl LossSum {
    /// Token-weighted mean loss.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

//! Greedy decoding with a KV cache that keeps the prefix: every step attends over the prefix
//! table and the cached keys of the earlier tokens (the reference stack's cached `generate`
//! silently drops the prefix; this does not).

use super::model::{Activations, Batch, Gpt2, KvCache, IGNORE};
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Greedy continuation of `prompt`: at most `max_new_tokens` new tokens, stopping after
/// `eos` if it is produced. Returns the new tokens only.
pub fn greedy(
    model: &Gpt2,
    be: &dyn Backend,
    prefix: Option<&Tensor>,
    prompt: &[u32],
    max_new_tokens: usize,
    eos: Option<u32>,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::index("prompt", "needs at least one token"));
    }
    let p = match prefix {
        Some(t) => model.check_prefix(t)?,
        None => 0,
    };
    let npos = model.config.n_positions;
    // The last generated token is never fed back, so the cache needs prompt + new - 1.
    let need = prompt.len() + max_new_tokens.saturating_sub(1);
    if p + need > npos {
        return Err(Error::index(
            "max_new_tokens",
            format!(
                "prompt of {} tokens + {max_new_tokens} new tokens after a prefix of {p} exceed \
                 n_positions = {npos}",
                prompt.len()
            ),
        ));
    }
    let mut cache = KvCache::new(model, be, need.max(1))?;
    let mut out = Vec::with_capacity(max_new_tokens);
    let step = |tokens: &[u32], cache: &mut KvCache| -> Result<u32> {
        let labels = vec![IGNORE; tokens.len()];
        let batch = Batch::new(&[(tokens, &labels)])?;
        let mut acts = Activations::new(model, be, 1, tokens.len(), false)?;
        model.forward(be, &batch, prefix, &mut acts, Some(cache))?;
        let logits = be.download(&acts.logits)?.to_f32_vec();
        let v = model.config.vocab_size;
        Ok(argmax(&logits[(tokens.len() - 1) * v..tokens.len() * v]))
    };
    if max_new_tokens == 0 {
        return Ok(out);
    }
    let mut next = step(prompt, &mut cache)?;
    loop {
        out.push(next);
        if Some(next) == eos || out.len() == max_new_tokens {
            return Ok(out);
        }
        next = step(&[next], &mut cache)?;
    }
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

//! Greedy decoding with a KV cache that keeps the prefix: every step attends over the prefix
//! table and the cached keys of the earlier tokens (the reference stack's cached `generate`
//! silently drops the prefix; this does not).

use super::PrefixLm;
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Why a generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The EOS token was produced (it is the last id).
    Eos,
    /// `max_new_tokens` were produced.
    Length,
    /// The context (`n_positions`, the prefix included) is full.
    Context,
}

impl Finish {
    /// `"eos"`, `"length"` or `"context"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Length => "length",
            Finish::Context => "context",
        }
    }
}

/// A greedy continuation and why it stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// The new tokens (ending with EOS when `finish` is [`Finish::Eos`]).
    pub ids: Vec<u32>,
    /// Why it stopped.
    pub finish: Finish,
}

/// Greedy continuation of `prompt`: at most `max_new_tokens` new tokens, stopping after
/// `eos` if it is produced, and when the context is full (a token predicted at the last
/// position is the last one). Returns the new tokens ([`Generation::ids`]) and why it
/// stopped.
pub fn greedy_until(
    model: &dyn PrefixLm,
    be: &dyn Backend,
    prefix: Option<&Tensor>,
    prompt: &[u32],
    max_new_tokens: usize,
    eos: Option<u32>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::index("prompt", "needs at least one token"));
    }
    let p = match prefix {
        Some(t) => model.check_prefix(t)?,
        None => 0,
    };
    let npos = model.geometry().max_positions;
    if p + prompt.len() > npos {
        return Err(Error::index(
            "prompt",
            format!(
                "{} tokens after a prefix of {p} exceed n_positions = {npos} (at most {} fit)",
                prompt.len(),
                npos - p
            ),
        ));
    }
    // The last generated token is never fed back, so the context holds at most
    // `npos - p - prompt` fed tokens after the prompt: `npos - p - prompt + 1` new ones.
    let room = npos - p - prompt.len() + 1;
    let (limit, finish_at_limit) = if max_new_tokens > room {
        (room, Finish::Context)
    } else {
        (max_new_tokens, Finish::Length)
    };
    let need = prompt.len() + limit.saturating_sub(1);
    let mut out = Vec::with_capacity(limit);
    if limit == 0 {
        return Ok(Generation {
            ids: out,
            finish: finish_at_limit,
        });
    }
    let mut cache = model.new_cache(be, need.max(1))?;
    let step = |tokens: &[u32], cache: &mut super::KvCache| -> Result<u32> {
        Ok(argmax(&model.decode(be, tokens, prefix, cache)?))
    };
    let mut next = step(prompt, &mut cache)?;
    loop {
        out.push(next);
        if Some(next) == eos {
            return Ok(Generation {
                ids: out,
                finish: Finish::Eos,
            });
        }
        if out.len() == limit {
            return Ok(Generation {
                ids: out,
                finish: finish_at_limit,
            });
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

//! The named problem shapes of docs/ARCHITECTURE.md §6, used by every benchmark and goal.

use super::AttnProblem;
use crate::tensor::{DType, Location};

/// One named attention shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamedShape {
    /// Name used on the command line and in reports.
    pub name: &'static str,
    /// Batch size `B`.
    pub batch: usize,
    /// Query heads `Hq`.
    pub heads_q: usize,
    /// Key/value heads `Hkv`.
    pub heads_kv: usize,
    /// Query rows `Tq`.
    pub tq: usize,
    /// Sequence keys `Tk`.
    pub tk: usize,
    /// Prefix length `P`.
    pub prefix_len: usize,
    /// Head dimension `D`.
    pub head_dim: usize,
    /// Causal masking.
    pub causal: bool,
}

/// The four shapes, at full size.
pub const SHAPES: [NamedShape; 4] = [
    NamedShape {
        name: "gpt2-train",
        batch: 8,
        heads_q: 12,
        heads_kv: 12,
        tq: 128,
        tk: 128,
        prefix_len: 10,
        head_dim: 64,
        causal: true,
    },
    NamedShape {
        name: "gpt2-long-prefix",
        batch: 8,
        heads_q: 12,
        heads_kv: 12,
        tq: 512,
        tk: 512,
        prefix_len: 200,
        head_dim: 64,
        causal: true,
    },
    NamedShape {
        name: "llm-long",
        batch: 4,
        heads_q: 16,
        heads_kv: 4,
        tq: 4096,
        tk: 4096,
        prefix_len: 64,
        head_dim: 128,
        causal: true,
    },
    NamedShape {
        name: "decode",
        batch: 64,
        heads_q: 32,
        heads_kv: 8,
        tq: 1,
        tk: 2048,
        prefix_len: 64,
        head_dim: 128,
        causal: true,
    },
];

/// Looks a shape up by name.
pub fn by_name(name: &str) -> Option<NamedShape> {
    SHAPES.iter().copied().find(|s| s.name == name)
}

impl NamedShape {
    /// The attention problem of this shape (one prefix shared by the batch, no padding).
    pub fn problem(self, dtype: DType) -> AttnProblem {
        AttnProblem {
            batch: self.batch,
            tq: self.tq,
            tk: self.tk,
            heads_q: self.heads_q,
            heads_kv: self.heads_kv,
            head_dim: self.head_dim,
            prefix_len: self.prefix_len,
            num_prefixes: 1,
            causal: self.causal,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            dtype,
            location: Location::Host,
            prefix_of: vec![Some(0); self.batch],
            lens_q: vec![self.tq; self.batch],
            lens_k: vec![self.tk; self.batch],
            meta_on_host: true,
        }
    }

    /// Forward FLOPs counted as in docs/ARCHITECTURE.md §6: `4 * D` per visible (query, key) pair.
    pub fn fwd_flops(self) -> f64 {
        4.0 * self.head_dim as f64 * self.problem(DType::F16).visible_pairs() as f64
    }

    /// The version a CPU can run in benchmark time: `llm-long` and `decode` shrink to
    /// `B = 1` and at most 512 keys; the GPT-2 shapes stay as they are.
    pub fn cpu_scaled(self) -> NamedShape {
        match self.name {
            "llm-long" => NamedShape {
                batch: 1,
                tq: 512,
                tk: 512,
                ..self
            },
            "decode" => NamedShape {
                batch: 1,
                tk: 512,
                ..self
            },
            _ => self,
        }
    }
}

//! The per-layer key/value cache of one sequence for incremental decoding.

use super::Geometry;
use crate::device::Backend;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// Per-layer keys and values of earlier tokens, for incremental decoding. The prefix is not
/// copied in: every step attends over the prefix table and this cache.
#[derive(Debug)]
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Tokens already in the cache.
    pub len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for one sequence of up to `capacity` tokens: per layer, keys and values
    /// `[1, capacity, Hkv, D]` in `dtype`. Keys are stored as the model attends over them
    /// (a rotary family stores them rotated).
    pub fn new(
        geometry: &Geometry,
        dtype: DType,
        backend: &dyn Backend,
        capacity: usize,
    ) -> Result<KvCache> {
        let dims = [1, capacity, geometry.kv_heads, geometry.head_dim];
        let mk = || -> Result<Vec<Tensor>> {
            (0..geometry.layers)
                .map(|_| backend.zeros(&dims, dtype))
                .collect()
        };
        Ok(KvCache {
            k: mk()?,
            v: mk()?,
            len: 0,
            capacity,
        })
    }

    /// Tokens the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Layer `l`'s keys and values `[1, capacity, Hkv, D]`, for the model to append to and
    /// attend over.
    pub fn layer_mut(&mut self, l: usize) -> Result<(&mut Tensor, &mut Tensor)> {
        let layers = self.k.len();
        match (self.k.get_mut(l), self.v.get_mut(l)) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => Err(crate::error::Error::index(
                "cache",
                format!("layer {l} of {layers}"),
            )),
        }
    }
}

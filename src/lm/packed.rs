//! A model's packed weights: the backend's copies of its frozen matmul weights in the layout
//! the backend multiplies fastest ([`crate::device::Backend::pack_weight`]), made once when
//! the model starts serving ([`crate::lm::PrefixLm::prepare_inference`]) and used by every
//! product against those weights from then on.
//!
//! On the cpu backend (AVX-512) a packed weight streams from memory while the kernel
//! computes, and every output element is one sum in one order whatever the batch: decoding
//! is faster, and a request's logits are the same bits alone or batched with others. The
//! copies cost the weights' memory again; training never makes them (docs/ARCHITECTURE.md,
//! "Packed weights").

use crate::device::packed::PackedWeight;
use crate::device::{Backend, MatmulOpts};
use crate::error::Result;
use crate::tensor::{DType, Location, Tensor, TensorView, TensorViewMut};
use std::collections::HashMap;
use std::sync::OnceLock;

/// One packed copy and how it was packed.
struct Entry {
    /// Packed from `[N, K]` (a torch `Linear`): it serves products with `b` transposed.
    trans: bool,
    packed: PackedWeight,
}

/// The packed copies of a model's weights, keyed by the host memory of the tensor each was
/// made from (a model's tensors own their buffers, which do not move). Empty until
/// [`PackedWeights::prepare`]; a weight without a copy is multiplied in place.
#[derive(Default)]
pub struct PackedWeights {
    map: OnceLock<HashMap<(usize, usize), Entry>>,
}

impl std::fmt::Debug for PackedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedWeights({} weights, {} bytes)",
            self.len(),
            self.bytes()
        )
    }
}

/// The key of a host f32 tensor: its buffer's address and length.
fn key(w: &Tensor) -> Option<(usize, usize)> {
    if w.location() != Location::Host || w.dtype() != DType::F32 {
        return None;
    }
    let s = w.view().contiguous_slice::<f32>().ok()?;
    Some((s.as_ptr() as usize, s.len()))
}

impl PackedWeights {
    /// No packed copies.
    pub fn new() -> PackedWeights {
        PackedWeights::default()
    }

    /// Packs `weights` (each a tensor, whether it is a `[N, K]` torch `Linear`, and its name
    /// for errors) on `be`, the first time only; returns the bytes the copies take (0 where
    /// the backend packs nothing). Later calls return the same figure and pack nothing.
    pub fn prepare(&self, be: &dyn Backend, weights: &[(&Tensor, bool, String)]) -> Result<usize> {
        if self.map.get().is_none() {
            let mut map = HashMap::new();
            for (w, trans, name) in weights {
                let Some(k) = key(w) else { continue };
                if let Some(packed) = be.pack_weight(&w.view(), *trans, name)? {
                    map.insert(
                        k,
                        Entry {
                            trans: *trans,
                            packed,
                        },
                    );
                }
            }
            // Two threads preparing at once both pack; one result is kept.
            let _ = self.map.set(map);
        }
        Ok(self.bytes())
    }

    /// How many weights have packed copies.
    pub fn len(&self) -> usize {
        self.map.get().map_or(0, HashMap::len)
    }

    /// Whether no weight has a packed copy.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the packed copies take.
    pub fn bytes(&self) -> usize {
        self.map
            .get()
            .map_or(0, |m| m.values().map(|e| e.packed.bytes()).sum())
    }

    /// Drops every packed copy (for a model whose weights are about to change: a copy does
    /// not follow its tensor). [`PackedWeights::prepare`] packs again.
    pub fn clear(&mut self) {
        self.map = OnceLock::new();
    }

    /// `out = a · op(w) (+ bias) (+ out)`, as [`Backend::matmul`] with `opts`, through `w`'s
    /// packed copy when it has one that serves these options (`a` not transposed, `alpha`
    /// 1, `b` transposed as it was packed), otherwise through [`Backend::matmul`].
    pub fn matmul(
        &self,
        be: &dyn Backend,
        a: &TensorView,
        w: &Tensor,
        bias: Option<&TensorView>,
        out: &mut TensorViewMut,
        opts: MatmulOpts,
    ) -> Result<()> {
        if let Some(map) = self.map.get().filter(|m| !m.is_empty()) {
            let entry = key(w).and_then(|k| map.get(&k));
            if let Some(e) = entry {
                if e.trans == opts.trans_b && !opts.trans_a && opts.alpha == 1.0 {
                    return be.matmul_packed(a, &e.packed, bias, out, opts.accumulate);
                }
            }
        }
        be.matmul(a, &w.view(), bias, out, opts)
    }
}

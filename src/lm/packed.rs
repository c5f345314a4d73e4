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

/// What [`PackedWeights::prepare`] (and so [`crate::lm::PrefixLm::prepare_inference`]) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackReport {
    /// Weights that have a packed copy.
    pub weights: usize,
    /// Bytes the copies take.
    pub bytes: usize,
    /// Why nothing was packed although the backend packs (the memory it would take), if so.
    pub skipped: Option<String>,
}

impl std::fmt::Display for PackReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.skipped, self.weights) {
            (Some(why), _) => write!(f, "weights not packed: {why}"),
            (None, 0) => write!(
                f,
                "weights multiplied in place (packing is off, or this backend packs none)"
            ),
            (None, n) => write!(
                f,
                "{n} weights packed for decoding ({:.1} MB)",
                self.bytes as f64 / 1e6
            ),
        }
    }
}

/// The copies and the report of the preparation that made them.
struct Packs {
    map: HashMap<(usize, usize), Entry>,
    report: PackReport,
}

/// The packed copies of a model's weights, keyed by the host memory of the tensor each was
/// made from (a model's tensors own their buffers, which do not move). Empty until
/// [`PackedWeights::prepare`]; a weight without a copy is multiplied in place.
#[derive(Default)]
pub struct PackedWeights {
    packs: OnceLock<Packs>,
}

/// Memory the copies must leave free: an eighth of what is available, at least 512 MiB.
fn reserve(available: u64) -> u64 {
    (available / 8).max(512 << 20)
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
    /// for errors) on `be`, the first time only, and says what it did; later calls pack
    /// nothing and return the same report. Nothing is packed where the backend packs nothing
    /// ([`Backend::packs_weights`]), or when the copies would leave less than an eighth of the
    /// memory available now (at least 512 MiB) free: the model is then multiplied in place,
    /// slower but within memory, and the report says why.
    pub fn prepare(
        &self,
        be: &dyn Backend,
        weights: &[(&Tensor, bool, String)],
    ) -> Result<PackReport> {
        self.prepare_within(be, weights, crate::io::memory_available())
    }

    /// [`PackedWeights::prepare`] with the memory available given (`None`: unknown, no limit).
    pub fn prepare_within(
        &self,
        be: &dyn Backend,
        weights: &[(&Tensor, bool, String)],
        available: Option<u64>,
    ) -> Result<PackReport> {
        if let Some(p) = self.packs.get() {
            return Ok(p.report.clone());
        }
        let mut map = HashMap::new();
        let mut report = PackReport::default();
        let eligible: Vec<_> = weights
            .iter()
            .filter_map(|(w, trans, name)| Some((key(w)?, *w, *trans, name)))
            .collect();
        let need: u64 = eligible
            .iter()
            .map(|(_, w, trans, _)| {
                let d = w.dims();
                let (k, n) = match (d, trans) {
                    ([r, c], false) => (*r, *c),
                    ([r, c], true) => (*c, *r),
                    _ => (0, 0),
                };
                PackedWeight::bytes_for(k, n) as u64
            })
            .sum();
        match available {
            _ if !be.packs_weights() || eligible.is_empty() => {}
            Some(avail) if need.saturating_add(reserve(avail)) > avail => {
                report.skipped = Some(format!(
                    "the copies would take {:.1} MB of the {:.1} MB available and leave less \
                     than {:.1} MB free (PREFIX_ATTN_CPU_PACKED=0 skips them without asking)",
                    need as f64 / 1e6,
                    avail as f64 / 1e6,
                    reserve(avail) as f64 / 1e6
                ));
            }
            _ => {
                for (k, w, trans, name) in eligible {
                    if let Some(packed) = be.pack_weight(&w.view(), trans, name)? {
                        report.weights += 1;
                        report.bytes += packed.bytes();
                        map.insert(k, Entry { trans, packed });
                    }
                }
            }
        }
        // Two threads preparing at once both pack; one result is kept.
        let _ = self.packs.set(Packs { map, report });
        Ok(self
            .packs
            .get()
            .map(|p| p.report.clone())
            .unwrap_or_default())
    }

    /// How many weights have packed copies.
    pub fn len(&self) -> usize {
        self.packs.get().map_or(0, |p| p.map.len())
    }

    /// Whether no weight has a packed copy.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the packed copies take.
    pub fn bytes(&self) -> usize {
        self.packs.get().map_or(0, |p| p.report.bytes)
    }

    /// Drops every packed copy (for a model whose weights are about to change: a copy does
    /// not follow its tensor). [`PackedWeights::prepare`] packs again.
    pub fn clear(&mut self) {
        self.packs = OnceLock::new();
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
        if let Some(map) = self.packs.get().map(|p| &p.map).filter(|m| !m.is_empty()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::cpu::CpuBackend;
    use crate::rng::Rng;

    fn random(rng: &mut Rng, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_f32(shape, &rng.normal_vec(n, 1.0), DType::F32).unwrap()
    }

    fn product(
        be: &dyn Backend,
        packs: &PackedWeights,
        a: &Tensor,
        w: &Tensor,
        opts: MatmulOpts,
    ) -> (Vec<f32>, Vec<f32>) {
        let n = if opts.trans_b {
            w.dims()[0]
        } else {
            w.dims()[1]
        };
        let m = a.dims()[usize::from(opts.trans_a)];
        let mut via = Tensor::zeros(&[m, n], DType::F32).unwrap();
        let mut plain = via.clone();
        packs
            .matmul(be, &a.view(), w, None, &mut via.view_mut(), opts)
            .unwrap();
        be.matmul(&a.view(), &w.view(), None, &mut plain.view_mut(), opts)
            .unwrap();
        (via.to_f32_vec(), plain.to_f32_vec())
    }

    #[test]
    fn packs_within_memory_and_routes_only_matching_products() {
        let be = CpuBackend;
        if !be.packs_weights() {
            eprintln!("this CPU packs no weights (no AVX-512F): nothing to test");
            return;
        }
        let mut rng = Rng::new(5);
        // A [K, N] = [96, 70] weight and a torch Linear [N, K] = [50, 96].
        let (w_kn, w_nk) = (random(&mut rng, &[96, 70]), random(&mut rng, &[50, 96]));
        let a = random(&mut rng, &[9, 96]);
        let list = [
            (&w_kn, false, "w_kn".to_string()),
            (&w_nk, true, "w_nk".to_string()),
        ];
        let need = PackedWeight::bytes_for(96, 70) + PackedWeight::bytes_for(96, 50);

        // Too little memory: nothing packed, the report says why, products go in place.
        let tight = PackedWeights::new();
        let r = tight.prepare_within(&be, &list, Some(300 << 20)).unwrap();
        assert_eq!((r.weights, r.bytes, tight.len()), (0, 0, 0));
        let why = r.skipped.clone().unwrap();
        assert!(why.contains("MB available"), "{why}");
        assert!(r.to_string().starts_with("weights not packed"), "{r}");
        let (via, plain) = product(&be, &tight, &a, &w_kn, MatmulOpts::default());
        assert_eq!(via, plain);

        // Enough: both packed, once; a second call packs nothing and says the same.
        let packs = PackedWeights::new();
        let r = packs.prepare_within(&be, &list, Some(64 << 30)).unwrap();
        assert_eq!((r.weights, r.bytes, r.skipped.clone()), (2, need, None));
        assert_eq!(packs.prepare_within(&be, &list, Some(1)).unwrap(), r);
        assert!(r.to_string().contains("2 weights packed"), "{r}");

        // Through the copies: the same product to f32 rounding.
        for (w, opts) in [(&w_kn, MatmulOpts::default()), (&w_nk, MatmulOpts::nt())] {
            let (via, plain) = product(&be, &packs, &a, w, opts);
            for (x, y) in via.iter().zip(&plain) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
            }
        }
        // Options a copy does not serve go to `Backend::matmul` itself: the same bits.
        let at = random(&mut rng, &[96, 9]);
        for (a, w, opts) in [
            (
                &a,
                &w_kn,
                MatmulOpts {
                    alpha: 0.5,
                    ..MatmulOpts::default()
                },
            ),
            (&at, &w_kn, MatmulOpts::tn()),
        ] {
            let (via, plain) = product(&be, &packs, a, w, opts);
            assert_eq!(via, plain);
        }
        // A tensor that was not packed (same values, another buffer) goes in place too.
        let copy = w_kn.clone();
        let (via, plain) = product(&be, &packs, &a, &copy, MatmulOpts::default());
        assert_eq!(via, plain);
    }
}

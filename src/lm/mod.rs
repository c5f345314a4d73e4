//! The model seam: what the trainer, the prefix code, the benchmarks, the demo and the
//! command line need of a frozen language model with prefix K/V, whatever its family.
//!
//! A family (GPT-2 in `src/gpt2/`; Llama, Qwen2 and Mistral in `src/llama/`) implements
//! [`PrefixLm`]: the geometry of its prefix ([`Geometry`]), the summed token loss of a batch
//! given the per-layer prefix K/V and the gradient of that sum with respect to the prefix
//! (training), and the logits of new tokens over a [`KvCache`] that keeps the prefix out of
//! the cache (decoding). [`load`] picks the
//! family of a Hugging Face folder by `config.json`'s `model_type`. Everything here is
//! model-independent: the batch, the loss, the cache, greedy generation and the workspace.
//!
//! The prefix is one tensor `[P, L·2·Hkv·D]` in the model's dtype, laid out as PEFT lays out
//! `prompt_embeddings`: `[P][layer][key, value][kv head][head dim]`. Prefix keys enter
//! attention as they are: a family with rotary positions rotates new keys before they are
//! cached and never the prefix (docs/ARCHITECTURE.md §3).

mod batch;
mod cache;
pub mod generate;
pub mod head;
pub mod packed;
pub mod paged;

pub use batch::{Batch, LossSum, IGNORE};
pub use cache::KvCache;
pub use packed::{PackReport, PackedWeights};

use crate::device::{Backend, Device};
use crate::error::{Error, Result};
use crate::io::SafetensorsFile;
use crate::tensor::{DType, Tensor};
use std::any::Any;
use std::path::Path;

/// Writes one frozen weight, given by stored name and expected shape, as f32 into the
/// buffer it is handed (exactly the weight's elements).
pub type WeightSource<'a> = dyn FnMut(&str, &[usize], &mut [f32]) -> Result<()> + 'a;

/// One frozen weight of `shape` in `dtype` on `backend`, written by `get`. An f32 weight is
/// written in place into the host tensor that becomes the weight (on the cpu backend, without
/// a copy); other dtypes pass through one f32 buffer of this weight's size.
pub fn frozen_weight(
    backend: &dyn Backend,
    dtype: DType,
    name: &str,
    shape: &[usize],
    get: &mut WeightSource,
) -> Result<Tensor> {
    let host = if dtype == DType::F32 {
        let mut t = Tensor::zeros(shape, DType::F32)?;
        get(name, shape, t.view_mut().contiguous_slice_mut::<f32>()?)?;
        t
    } else {
        let mut data = vec![0f32; shape.iter().product()];
        get(name, shape, &mut data)?;
        Tensor::from_f32(shape, &data, dtype)?
    };
    backend.upload_owned(host)
}

/// Reads tensor `stored` of `file` into `out`, refusing a shape other than the `shape`
/// config.json implies (the error names the file, the tensor and both shapes).
pub fn read_weight(
    file: &SafetensorsFile,
    stored: &str,
    shape: &[usize],
    out: &mut [f32],
) -> Result<()> {
    let got = file.shape(stored)?;
    if got != shape {
        return Err(Error::Format {
            path: file.path().to_path_buf(),
            msg: format!("tensor {stored:?} has shape {got:?}, config.json implies {shape:?}"),
        });
    }
    file.f32_into(stored, out)?;
    Ok(())
}

/// The shape of a model as its prefix sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Layers `L`.
    pub layers: usize,
    /// Query heads `Hq`.
    pub heads: usize,
    /// Key/value heads `Hkv` (`Hq` is a multiple of it; GPT-2: `Hkv = Hq`).
    pub kv_heads: usize,
    /// Head dimension `D`.
    pub head_dim: usize,
    /// Positions the model takes, the prefix included.
    pub max_positions: usize,
    /// Vocabulary size `V`.
    pub vocab_size: usize,
}

impl Geometry {
    /// The width of one layer's keys (or values) per position, `Hkv · D`: PEFT's
    /// `token_dim` (for GPT-2 the model width).
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The width of a prefix row, `L · 2 · Hkv · D`.
    pub fn prefix_width(&self) -> usize {
        self.layers * 2 * self.kv_width()
    }
}

/// Buffers a model keeps between calls (activations and their gradients), allocated for the
/// largest batch seen and reused for smaller ones: a step never reallocates or zero-fills
/// because its longest example changed. Opaque to its users; each family keeps its own type
/// inside.
#[derive(Default)]
pub struct Workspace {
    inner: Option<Box<dyn Any + Send>>,
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace")
            .field("allocated", &self.inner.is_some())
            .finish()
    }
}

impl Workspace {
    /// An empty workspace: the first call that uses it allocates.
    pub fn new() -> Workspace {
        Workspace::default()
    }

    /// The family's buffers of type `T`: the ones held when `keep` accepts them, else (none
    /// held, another type, or too small) new ones from `make`, the old ones freed first.
    pub fn get<T: Any + Send>(
        &mut self,
        keep: impl FnOnce(&T) -> bool,
        make: impl FnOnce() -> Result<T>,
    ) -> Result<&mut T> {
        let fits = self
            .inner
            .as_ref()
            .and_then(|b| b.downcast_ref::<T>())
            .is_some_and(keep);
        if !fits {
            self.inner = None; // free the old buffers before allocating new ones
            self.inner = Some(Box::new(make()?));
        }
        self.inner
            .as_mut()
            .and_then(|b| b.downcast_mut::<T>())
            .ok_or_else(|| Error::index("workspace", "holds buffers of another model"))
    }

    /// Frees the buffers.
    pub fn clear(&mut self) {
        self.inner = None;
    }
}

/// A frozen causal language model that attends over a prefix K/V in every layer.
///
/// Training calls [`PrefixLm::loss`] and [`PrefixLm::loss_and_grad`] with a [`Workspace`]
/// they keep between calls; decoding calls [`PrefixLm::decode`] with a [`KvCache`].
pub trait PrefixLm: std::fmt::Debug + Send + Sync {
    /// `config.json`'s `model_type` of this family (`"gpt2"`).
    fn model_type(&self) -> &'static str;

    /// The prefix geometry.
    fn geometry(&self) -> Geometry;

    /// The compute dtype of weights and activations; the prefix comes in it.
    fn dtype(&self) -> DType;

    /// The end-of-sequence token the config names, if any.
    fn eos_token_id(&self) -> Option<u32>;

    /// The summed token loss of `batch` (real tokens at positions `P ..`, P the prefix
    /// length, 0 without a prefix) with an optional prefix `[P, L·2·Hkv·D]`.
    fn loss(
        &self,
        be: &dyn Backend,
        batch: &Batch,
        prefix: Option<&Tensor>,
        ws: &mut Workspace,
    ) -> Result<LossSum>;

    /// [`PrefixLm::loss`] with a prefix, and the gradient of that sum with respect to the
    /// prefix written to `d_prefix [P, L·2·Hkv·D]` (f32) when the sum is finite and counts
    /// tokens (otherwise `d_prefix` is left as it was). Only activation gradients are
    /// computed: the model is frozen.
    fn loss_and_grad(
        &self,
        be: &dyn Backend,
        batch: &Batch,
        prefix: &Tensor,
        ws: &mut Workspace,
        d_prefix: &mut Tensor,
    ) -> Result<LossSum>;

    /// Feeds `tokens` of one sequence after the `cache.len` tokens in `cache` (prefill: the
    /// prompt into an empty cache; a decode step: one token), appends their keys and values
    /// to the cache, and returns the logits `[V]` of the last one.
    fn decode(
        &self,
        be: &dyn Backend,
        tokens: &[u32],
        prefix: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Vec<f32>>;

    /// One step of the serving engine: feeds every sequence's uncached tokens (a prompt, or
    /// one token), writes their keys and values into their pages of `kv`, attends over each
    /// one's prefix slot (or none) in `prefixes` and its cached keys, and returns each
    /// sequence's last-position logits `[V]`, in order. With
    /// [`PrefixMode::CopiedIntoCache`](paged::PrefixMode) (the naive method, for benchmarks) a
    /// sequence with an adapter starts with `P` placeholder tokens whose cache rows receive a
    /// copy of its prefix instead.
    fn step_paged(
        &self,
        be: &dyn Backend,
        seqs: &[paged::PagedSeq],
        kv: &mut paged::PagedKv,
        prefixes: &paged::PrefixTable,
        mode: paged::PrefixMode,
    ) -> Result<Vec<Vec<f32>>>;

    /// Makes the backend's packed copies of the frozen matmul weights ([`PackedWeights`]),
    /// once; every later product against them (decoding, and training if it follows) goes
    /// through them. Says what it did ([`PackReport`]): nothing where the backend packs
    /// nothing (emu, cuda, a CPU without AVX-512, or packing turned off) or where the copies
    /// would not fit in the memory available. The serving engine calls it; training does not.
    fn prepare_inference(&self, be: &dyn Backend) -> Result<PackReport>;

    /// Checks that a prefix tensor is `[P, L·2·Hkv·D]` (any dtype); returns `P`.
    fn check_prefix_shape(&self, prefix: &Tensor) -> Result<usize> {
        let width = self.geometry().prefix_width();
        let d = prefix.dims();
        if d.len() != 2 || d[1] != width {
            return Err(Error::shape(
                "prefix",
                format!("[P, L*2*Hkv*D = {width}]"),
                d,
            ));
        }
        Ok(d[0])
    }

    /// An empty cache for one sequence of up to `capacity` tokens in this model's geometry.
    fn new_cache(&self, be: &dyn Backend, capacity: usize) -> Result<KvCache> {
        KvCache::new(&self.geometry(), self.dtype(), be, capacity)
    }

    /// Checks that a prefix tensor `[P, L·2·Hkv·D]` in the model's dtype fits; returns `P`.
    fn check_prefix(&self, prefix: &Tensor) -> Result<usize> {
        let p = self.check_prefix_shape(prefix)?;
        if prefix.dtype() != self.dtype() {
            return Err(Error::DType {
                arg: "prefix".into(),
                expected: self.dtype().name().into(),
                got: prefix.dtype().name().into(),
            });
        }
        Ok(p)
    }
}

/// The compute dtype of a model on `backend`: f32 on the cpu device (the reference), f16 on
/// the kernel devices (emu, cuda): weights are converted once at load.
pub fn dtype_for(backend: &dyn Backend) -> DType {
    match backend.device() {
        Device::Cpu => DType::F32,
        _ => DType::F16,
    }
}

/// The model types [`load`] knows.
pub const MODEL_TYPES: [&str; 4] = ["gpt2", "llama", "qwen2", "mistral"];

/// The families [`load`] can build, by `model_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Gpt2,
    /// Llama, Qwen2, Mistral (`src/llama/`).
    Llama,
}

/// The family of a model folder, from `config.json`'s `model_type` (a config without one is
/// read as GPT-2, as transformers' oldest GPT-2 configs are).
fn family(dir: &Path) -> Result<Family> {
    let path = dir.join("config.json");
    let value: serde_json::Value =
        serde_json::from_str(&crate::io::read_text(&path)?).map_err(|e| Error::Format {
            path: path.clone(),
            msg: format!("not a model config (config.json): {e}"),
        })?;
    // The model type first: another architecture's config lacks the family's fields, and
    // "missing field n_positions" would hide what is really wrong.
    match value.get("model_type") {
        None | Some(serde_json::Value::Null) => Ok(Family::Gpt2),
        Some(serde_json::Value::String(t)) if t == "gpt2" => Ok(Family::Gpt2),
        Some(serde_json::Value::String(t))
            if crate::llama::config::LLAMA_MODEL_TYPES.contains(&t.as_str()) =>
        {
            Ok(Family::Llama)
        }
        Some(t) => Err(Error::Format {
            path,
            msg: format!("model_type {t} is not supported (known model types: {MODEL_TYPES:?})"),
        }),
    }
}

/// Loads a Hugging Face model folder on `backend` in [`dtype_for`]'s dtype, choosing the
/// family by `config.json`'s `model_type`.
pub fn load(dir: &Path, backend: &dyn Backend) -> Result<Box<dyn PrefixLm>> {
    match family(dir)? {
        Family::Gpt2 => Ok(Box::new(crate::gpt2::Gpt2::load(dir, backend)?)),
        Family::Llama => Ok(Box::new(crate::llama::Llama::load(dir, backend)?)),
    }
}

/// The geometry of a model folder from its `config.json` alone (checked as [`load`] checks
/// it), without reading the weights.
pub fn geometry(dir: &Path) -> Result<Geometry> {
    let path = dir.join("config.json");
    match family(dir)? {
        Family::Gpt2 => Ok(crate::gpt2::Gpt2Config::load(&path)?.geometry()),
        Family::Llama => Ok(crate::llama::LlamaConfig::load(&path)?.geometry()),
    }
}

//! A frozen model, its paged cache and its prefix table as the scheduler's [`StepModel`].

use super::adapters::AdapterSlots;
use super::pages::PageCopy;
use super::scheduler::{PagedSeq, StepModel};
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::lm::paged::{KvShape, PagedKv, PrefixMode, PrefixTable};
use crate::lm::{PackReport, PrefixLm};
use crate::tensor::Tensor;

/// A model behind the seam with a paged K/V cache and a prefix table of adapters.
pub struct ModelStep<'a> {
    model: &'a dyn PrefixLm,
    be: &'a dyn Backend,
    kv: PagedKv,
    prefixes: PrefixTable,
    slots: AdapterSlots,
    mode: PrefixMode,
    packing: PackReport,
}

impl<'a> ModelStep<'a> {
    /// A cache of `num_pages` pages of `page_size` tokens and a prefix table of `capacity`
    /// adapters of `prefix_len` virtual tokens each.
    ///
    /// It first has the model pack its weights for `be` ([`PrefixLm::prepare_inference`]):
    /// on the cpu backend that is a copy of the matmul weights, their size again in memory,
    /// made only if it leaves enough of the memory available free (`PREFIX_ATTN_CPU_PACKED=0`
    /// turns it off; [`ModelStep::packing`] says what happened).
    pub fn new(
        model: &'a dyn PrefixLm,
        be: &'a dyn Backend,
        num_pages: usize,
        page_size: usize,
        capacity: usize,
        prefix_len: usize,
    ) -> Result<ModelStep<'a>> {
        let shape = KvShape::of(&model.geometry());
        let p = prefix_len.max(1);
        // Every product of a step then streams packed weights (the cpu backend; a no-op on
        // the kernel devices).
        let packing = model.prepare_inference(be)?;
        Ok(ModelStep {
            model,
            be,
            kv: PagedKv::new(be, shape, model.dtype(), num_pages, page_size)?,
            prefixes: PrefixTable::new(be, shape, model.dtype(), capacity, p)?,
            slots: AdapterSlots::new(capacity, p)?,
            mode: PrefixMode::Table,
            packing,
        })
    }

    /// What packing the model's weights did (a server prints it at start).
    pub fn packing(&self) -> &PackReport {
        &self.packing
    }

    /// Switches to the naive method (each sequence's cache holds a copy of its prefix; its
    /// prompt must start with `P` placeholder tokens), for benchmarks.
    pub fn with_prefix_mode(mut self, mode: PrefixMode) -> Self {
        self.mode = mode;
        self
    }

    /// Loads an adapter's prefix `[P, L·2·Hkv·D]` (host or device, any float dtype) under
    /// `name`, evicting the least recently used idle adapter when the table is full; returns
    /// its slot.
    pub fn add_adapter(&mut self, name: &str, prefix: &Tensor) -> Result<u32> {
        let p = self.model.check_prefix_shape(prefix)?;
        if p == 0 || p > self.prefixes.prefix_len() {
            return Err(Error::index(
                &format!("adapter {name:?}"),
                format!(
                    "{p} virtual tokens; the prefix table takes adapters of 1..={} (its P)",
                    self.prefixes.prefix_len()
                ),
            ));
        }
        let host = self.be.download(prefix)?;
        let conv = Tensor::from_f32(host.dims(), &host.to_f32_vec(), self.model.dtype())?;
        let dev = self.be.upload(&conv)?;
        let placed = self.slots.insert(name, p)?;
        self.prefixes.write(self.be, placed.slot, name, &dev)?;
        Ok(placed.slot)
    }

    /// Unloads adapter `name` (an error if it is not loaded or a running request holds it);
    /// its slot is free for the next adapter.
    pub fn remove_adapter(&mut self, name: &str) -> Result<u32> {
        self.slots.remove(name)
    }

    /// The most virtual tokens an adapter of the prefix table may have (its `P`; shorter
    /// adapters are served beside longer ones, their missing rows masked).
    pub fn prefix_len(&self) -> usize {
        self.prefixes.prefix_len()
    }

    /// Which adapter is in which slot.
    pub fn slots(&self) -> &AdapterSlots {
        &self.slots
    }
    /// Mutable slot book-keeping (requests acquire and release their adapter).
    pub fn slots_mut(&mut self) -> &mut AdapterSlots {
        &mut self.slots
    }
}

impl StepModel for ModelStep<'_> {
    fn vocab_size(&self) -> usize {
        self.model.geometry().vocab_size
    }
    fn context_len(&self, adapter: Option<u32>) -> Result<usize> {
        let n = self.model.geometry().max_positions;
        match adapter {
            None => Ok(n),
            Some(slot) => {
                let p = self.slots.prefix_len(slot).ok_or_else(|| {
                    Error::index("adapter", format!("prefix-table slot {slot} is empty"))
                })?;
                // Copied into the cache, the prefix is part of the sequence's own tokens.
                Ok(match self.mode {
                    PrefixMode::Table => n.saturating_sub(p),
                    PrefixMode::CopiedIntoCache => n,
                })
            }
        }
    }
    fn copy_pages(&mut self, copies: &[PageCopy]) -> Result<()> {
        self.kv.copy_pages(self.be, copies)
    }
    fn step(&mut self, seqs: &[PagedSeq]) -> Result<Vec<Vec<f32>>> {
        self.model
            .step_paged(self.be, seqs, &mut self.kv, &self.prefixes, self.mode)
    }
}

/// Runs `reqs` to completion in one continuous batch and returns their completions in
/// request order; `stops[i]` (if given) is request `i`'s own stop condition (stop strings).
/// The scheduler gets `cfg`; every request must fit (see
/// [`SchedulerConfig::for_requests`](super::scheduler::SchedulerConfig::for_requests)).
pub fn run_batch(
    step: &mut ModelStep,
    reqs: Vec<super::scheduler::Request>,
    mut stops: Vec<Option<super::scheduler::StopFn>>,
    cfg: super::scheduler::SchedulerConfig,
) -> Result<Vec<super::scheduler::Completion>> {
    let mut s = super::scheduler::Scheduler::new(cfg)?;
    stops.resize_with(reqs.len(), || None);
    let ids: Vec<u64> = reqs
        .into_iter()
        .zip(stops)
        .enumerate()
        .map(|(i, (r, stop))| {
            s.submit(step, r, stop)
                .map_err(|e| Error::index(&format!("request {i}"), e.to_string()))
        })
        .collect::<Result<_>>()?;
    let mut done = s.run_to_completion(step)?;
    // ids are handed out in submission order: sorting by id restores it.
    done.sort_by_key(|c| c.id);
    debug_assert!(done.iter().map(|c| c.id).eq(ids.iter().copied()));
    Ok(done)
}

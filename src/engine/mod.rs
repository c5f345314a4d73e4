//! Serving many prefix adapters over one frozen model: the paged KV cache's page allocator,
//! per-request token choice (greedy, seeded sampling) and beam search. Each piece is plain
//! bookkeeping over host data, tested on its own; the batching loop drives them.

pub mod adapters;
pub mod beam;
pub mod bench;
pub mod jsonl;
pub mod model;
pub mod pages;
pub mod sampling;
pub mod scheduler;
pub mod text;

pub use adapters::{AdapterSlots, Placed};
pub use beam::{BeamParams, BeamSearch, BeamStep};
pub use pages::{PageCopy, PagePool, SeqPages};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::{
    Completion, Decoding, FinishReason, Request, Scheduler, SchedulerConfig, StepModel,
};

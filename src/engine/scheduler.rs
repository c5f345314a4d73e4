//! Continuous batching over a paged KV cache: every [`Scheduler::step`] admits waiting
//! requests while pages last, feeds every running sequence its uncached tokens (the whole
//! prompt for a newly admitted one, one token for the others) in one model call, picks each
//! request's next token (greedy, seeded sampling, or a beam-search step) and retires the
//! finished ones.
//!
//! Prefill and decode are one operation here: a sequence holds its tokens (prompt and
//! generated) and how many of them the cache already holds; a step feeds the rest and reads
//! the logits of the last one. A request preempted when pages run out gives its pages back and
//! keeps its tokens, its sampler and its beam state; when readmitted its tokens are fed again
//! (recomputation), so its result does not depend on having been preempted.
//!
//! The model is behind [`StepModel`]; the scheduler never looks at keys or values.

use super::beam::{log_softmax, BeamParams, BeamSearch};
use super::pages::{PageCopy, PagePool, SeqPages};
use super::sampling::{argmax, Sampler, SamplingParams};
use crate::error::{Error, Result};
pub use crate::lm::paged::PagedSeq;
use std::collections::VecDeque;

/// How a request picks its tokens.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoding {
    /// The most likely token.
    Greedy,
    /// Sampling with its own seeded generator.
    Sample(SamplingParams),
    /// Beam search (transformers' definition, `early_stopping=False`).
    Beam {
        /// Beams kept.
        num_beams: usize,
        /// Exponent of the generated length dividing a hypothesis' log-probability.
        length_penalty: f64,
    },
}

/// One generation request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// The prefix-table slot of its adapter, or `None` for the bare model.
    pub adapter: Option<u32>,
    /// At most this many new tokens (fewer if the context fills up first).
    pub max_new_tokens: usize,
    /// Ids that end the generation (the id is kept in the output).
    pub stop_ids: Vec<u32>,
    /// How the tokens are chosen.
    pub decoding: Decoding,
}

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop id (or a stop condition of the caller) ended it.
    Stop,
    /// `max_new_tokens` or the context length.
    Length,
}

impl FinishReason {
    /// `"stop"` or `"length"`, as the OpenAI API names them.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A finished request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The id [`Scheduler::submit`] returned.
    pub id: u64,
    /// The new tokens.
    pub ids: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// How often it was preempted and recomputed.
    pub preemptions: usize,
}

/// What the scheduler needs from a model.
pub trait StepModel {
    /// Logit row length.
    fn vocab_size(&self) -> usize;
    /// Tokens a sequence with this adapter can hold (the context minus the prefix length);
    /// an error if the adapter slot is empty.
    fn context_len(&self, adapter: Option<u32>) -> Result<usize>;
    /// Copies the first `rows` rows of page `src` to page `dst` in every layer's K/V cache
    /// (copy-on-write of a page shared by beams).
    fn copy_pages(&mut self, copies: &[PageCopy]) -> Result<()>;
    /// Runs the sequences, writes their fed tokens' keys and values into their pages, and
    /// returns each one's last-position logits (`[vocab]`), in order.
    fn step(&mut self, seqs: &[PagedSeq]) -> Result<Vec<Vec<f32>>>;
}

/// A caller's stop condition over a request's generated tokens (e.g. stop strings).
pub type StopFn = Box<dyn Fn(&[u32]) -> bool + Send>;

struct Seq {
    tokens: Vec<u32>,
    cached: usize,
    pages: SeqPages,
}

enum State {
    Single {
        seq: Seq,
        sampler: Option<Sampler>,
    },
    Beams {
        search: BeamSearch,
        /// Beam `i`'s sequence, or one shared sequence before the first step.
        seqs: Vec<Seq>,
    },
}

struct Active {
    id: u64,
    prompt_len: usize,
    adapter: Option<u32>,
    max_new: usize,
    stop_ids: Vec<u32>,
    stop: Option<StopFn>,
    state: State,
    preemptions: usize,
}

impl Active {
    fn seqs(&self) -> Vec<&Seq> {
        match &self.state {
            State::Single { seq, .. } => vec![seq],
            State::Beams { seqs, .. } => seqs.iter().collect(),
        }
    }
    fn seqs_mut(&mut self) -> Vec<&mut Seq> {
        match &mut self.state {
            State::Single { seq, .. } => vec![seq],
            State::Beams { seqs, .. } => seqs.iter_mut().collect(),
        }
    }
    fn take_pages(&mut self, pool: &mut PagePool) {
        for s in self.seqs_mut() {
            pool.release(std::mem::take(&mut s.pages));
            s.cached = 0;
        }
    }
    /// Pages its sequences need when fed in full (an upper bound: beams sharing pages need
    /// fewer).
    fn pages_alone(&self, pool: &PagePool) -> usize {
        self.seqs()
            .iter()
            .map(|s| pool.pages_for(s.tokens.len()))
            .sum()
    }
}

/// Settings of a [`Scheduler`].
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Pages of the KV cache.
    pub num_pages: usize,
    /// Tokens per page (a power of two).
    pub page_size: usize,
    /// At most this many sequences (beams count one each) in a step.
    pub max_batch: usize,
}

impl SchedulerConfig {
    /// A pool large enough for `reqs` all running at once (no preemption), pages of
    /// `page_size`, every sequence in one batch; `extra_per_seq` positions per sequence on top
    /// of its prompt and new tokens (a copied prefix).
    pub fn for_requests(reqs: &[Request], page_size: usize, extra_per_seq: usize) -> Self {
        let mut pages = 0;
        let mut seqs = 0;
        for r in reqs {
            let n = match r.decoding {
                Decoding::Beam { num_beams, .. } => num_beams,
                _ => 1,
            };
            let len = extra_per_seq + r.prompt.len() + r.max_new_tokens;
            // A beam's private copy of a shared partial page is one more page.
            pages += n * (len.div_ceil(page_size.max(1)) + 1);
            seqs += n;
        }
        SchedulerConfig {
            num_pages: pages.max(1),
            page_size,
            max_batch: seqs.max(1),
        }
    }
}

/// The continuous-batching loop's state.
pub struct Scheduler {
    pool: PagePool,
    max_batch: usize,
    waiting: VecDeque<Active>,
    running: Vec<Active>,
    next_id: u64,
}

impl Scheduler {
    /// An idle scheduler with an empty page pool.
    pub fn new(cfg: SchedulerConfig) -> Result<Scheduler> {
        if cfg.max_batch == 0 {
            return Err(Error::index("max_batch", "0: expected at least 1"));
        }
        Ok(Scheduler {
            pool: PagePool::new(cfg.num_pages, cfg.page_size)?,
            max_batch: cfg.max_batch,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 0,
        })
    }

    /// The page pool (for metrics: pages in use).
    pub fn pool(&self) -> &PagePool {
        &self.pool
    }
    /// Requests waiting for admission.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
    /// Requests running.
    pub fn running(&self) -> usize {
        self.running.len()
    }
    /// Sequences running (a beam-search request counts its beams): the batch of the next step.
    pub fn running_seqs(&self) -> usize {
        self.running.iter().map(|a| a.seqs().len()).sum()
    }
    /// The tokens request `id` has generated so far, for streaming: `None` for a beam search
    /// (its best hypothesis is known only at the end) and for a request not running or
    /// waiting. A preempted request keeps its tokens, so this never shrinks.
    pub fn generated(&self, id: u64) -> Option<&[u32]> {
        let a = self
            .running
            .iter()
            .find(|a| a.id == id)
            .or_else(|| self.waiting.iter().find(|a| a.id == id))?;
        match &a.state {
            State::Single { seq, .. } => Some(&seq.tokens[a.prompt_len..]),
            State::Beams { .. } => None,
        }
    }
    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Queues a request; returns its id. Errors (naming the field) when it can never run: an
    /// empty prompt, a prompt that does not fit the context, bad sampling or beam settings, or
    /// more pages than the pool has even when it runs alone.
    pub fn submit(
        &mut self,
        model: &dyn StepModel,
        req: Request,
        stop: Option<StopFn>,
    ) -> Result<u64> {
        if req.prompt.is_empty() {
            return Err(Error::index("prompt", "needs at least one token"));
        }
        let vocab = model.vocab_size();
        if let Some(&t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::index(
                "prompt",
                format!("token id {t} is outside the vocabulary (size {vocab})"),
            ));
        }
        let ctx = model.context_len(req.adapter)?;
        if req.prompt.len() > ctx {
            return Err(Error::index(
                "prompt",
                format!(
                    "{} tokens do not fit the context ({ctx} tokens after the prefix)",
                    req.prompt.len()
                ),
            ));
        }
        // The last new token is never fed back: the context holds prompt + max_new - 1.
        let max_new = req.max_new_tokens.min(ctx - req.prompt.len() + 1);
        let longest = req.prompt.len() + max_new.saturating_sub(1);
        let (state, copies) = match &req.decoding {
            Decoding::Greedy => (None, 1),
            Decoding::Sample(p) => (Some(Sampler::new(*p)?), 1),
            Decoding::Beam { num_beams, .. } => (None, *num_beams),
        };
        let worst = copies * self.pool.pages_for(longest.max(1));
        if worst > self.pool.num_pages() {
            return Err(Error::OutOfPages {
                needed: worst,
                free: self.pool.free_pages(),
                total: self.pool.num_pages(),
            });
        }
        if copies > self.max_batch {
            return Err(Error::index(
                "num_beams",
                format!(
                    "{copies} beams exceed the batch limit of {}",
                    self.max_batch
                ),
            ));
        }
        let seq = Seq {
            tokens: req.prompt.clone(),
            cached: 0,
            pages: SeqPages::default(),
        };
        let state = match req.decoding {
            Decoding::Beam {
                num_beams,
                length_penalty,
            } => State::Beams {
                search: BeamSearch::new(BeamParams {
                    num_beams,
                    length_penalty,
                    max_new_tokens: max_new,
                    stop_ids: req.stop_ids.clone(),
                })?,
                seqs: vec![seq],
            },
            _ => State::Single {
                seq,
                sampler: state,
            },
        };
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Active {
            id,
            prompt_len: req.prompt.len(),
            adapter: req.adapter,
            max_new,
            stop_ids: req.stop_ids,
            stop,
            state,
            preemptions: 0,
        });
        Ok(id)
    }

    /// Drops a queued or running request (a client went away), freeing its pages. Returns
    /// whether it was there.
    pub fn cancel(&mut self, id: u64) -> bool {
        if let Some(i) = self.waiting.iter().position(|a| a.id == id) {
            if let Some(mut a) = self.waiting.remove(i) {
                a.take_pages(&mut self.pool);
            }
            return true;
        }
        if let Some(i) = self.running.iter().position(|a| a.id == id) {
            let mut a = self.running.remove(i);
            a.take_pages(&mut self.pool);
            return true;
        }
        false
    }

    /// One engine step; returns the requests that finished in it. A request that finishes
    /// with no new token (`max_new_tokens = 0`) finishes here without a model call.
    pub fn step(&mut self, model: &mut dyn StepModel) -> Result<Vec<Completion>> {
        let mut done = Vec::new();
        self.admit(&mut done);
        let copies = self.reserve()?;
        if self.running.is_empty() {
            return Ok(done);
        }
        if !copies.is_empty() {
            model.copy_pages(&copies)?;
        }
        let steps: Vec<PagedSeq> = self
            .running
            .iter()
            .flat_map(|a| {
                a.seqs().into_iter().map(move |s| PagedSeq {
                    tokens: &s.tokens,
                    cached: s.cached,
                    pages: s.pages.pages(),
                    adapter: a.adapter,
                })
            })
            .collect();
        let n_seqs = steps.len();
        let logits = model.step(&steps)?;
        drop(steps);
        if logits.len() != n_seqs {
            return Err(Error::index(
                "StepModel::step",
                format!("{} logit rows for {n_seqs} sequences", logits.len()),
            ));
        }
        let mut rows = logits.into_iter();
        let mut still = Vec::with_capacity(self.running.len());
        for mut a in std::mem::take(&mut self.running) {
            for s in a.seqs_mut() {
                s.cached = s.tokens.len();
            }
            let n = a.seqs().len();
            let mine: Vec<Vec<f32>> = rows.by_ref().take(n).collect();
            match self.advance(&mut a, mine)? {
                Some(c) => {
                    a.take_pages(&mut self.pool);
                    done.push(c);
                }
                None => still.push(a),
            }
        }
        self.running = still;
        Ok(done)
    }

    /// Runs steps until every submitted request has finished; returns them in finishing order.
    pub fn run_to_completion(&mut self, model: &mut dyn StepModel) -> Result<Vec<Completion>> {
        let mut all = Vec::new();
        while !self.is_idle() {
            all.extend(self.step(model)?);
        }
        Ok(all)
    }

    fn admit(&mut self, done: &mut Vec<Completion>) {
        let mut batch: usize = self.running.iter().map(|a| a.seqs().len()).sum();
        // Pages the running requests need for this step's growth come first.
        let mut budget = self.pool.free_pages();
        for a in &self.running {
            for s in a.seqs() {
                budget = budget.saturating_sub(self.pool.pages_needed(&s.pages, s.tokens.len()));
            }
        }
        while let Some(a) = self.waiting.front() {
            if a.max_new == 0 {
                let a = self.waiting.pop_front().expect("front exists");
                done.push(Completion {
                    id: a.id,
                    ids: Vec::new(),
                    finish: FinishReason::Length,
                    preemptions: a.preemptions,
                });
                continue;
            }
            let seqs = a.seqs().len();
            let need = a.pages_alone(&self.pool);
            // The first request always gets in when nothing runs (submit checked it fits).
            let fits =
                self.running.is_empty() || (batch + seqs <= self.max_batch && need <= budget);
            if !fits {
                break;
            }
            batch += seqs;
            budget = budget.saturating_sub(need);
            let a = self.waiting.pop_front().expect("front exists");
            self.running.push(a);
        }
    }

    /// Gives every running sequence room for its tokens, preempting the most recently
    /// admitted requests while pages are short. Returns the page copies to perform.
    fn reserve(&mut self) -> Result<Vec<PageCopy>> {
        let mut copies = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let mut ok = true;
            for s in self.running[i].seqs_mut() {
                match self.pool.reserve(&mut s.pages, s.tokens.len()) {
                    Ok(c) => copies.extend(c),
                    Err(Error::OutOfPages { .. }) => {
                        ok = false;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if ok {
                i += 1;
                continue;
            }
            // Preempt the youngest request (possibly this one, unless it is the only one
            // left, which submit() guaranteed fits alone).
            let victim = self.running.len() - 1;
            if victim == 0 && i == 0 {
                return Err(Error::OutOfPages {
                    needed: self.running[0].pages_alone(&self.pool),
                    free: self.pool.free_pages(),
                    total: self.pool.num_pages(),
                });
            }
            let mut v = self.running.remove(victim);
            v.take_pages(&mut self.pool);
            v.preemptions += 1;
            // A copy into a page of the victim is moot now; drop copies whose target was freed.
            copies.retain(|c| self.pool.ref_count(c.dst) > 0);
            self.waiting.push_front(v);
            // Retry the same request (or stop if it was the victim).
        }
        Ok(copies)
    }

    fn advance(&mut self, a: &mut Active, logits: Vec<Vec<f32>>) -> Result<Option<Completion>> {
        match &mut a.state {
            State::Single { seq, sampler } => {
                let row = &logits[0];
                let tok = match sampler {
                    Some(s) => s.next(row),
                    None => argmax(row),
                };
                seq.tokens.push(tok);
                let generated = &seq.tokens[a.prompt_len..];
                let stopped =
                    a.stop_ids.contains(&tok) || a.stop.as_ref().is_some_and(|f| f(generated));
                let finish = if stopped {
                    Some(FinishReason::Stop)
                } else if generated.len() >= a.max_new {
                    Some(FinishReason::Length)
                } else {
                    None
                };
                Ok(finish.map(|finish| Completion {
                    id: a.id,
                    ids: generated.to_vec(),
                    finish,
                    preemptions: a.preemptions,
                }))
            }
            State::Beams { search, seqs } => {
                let nb = search.params().num_beams;
                let rows: Vec<Vec<f64>> = logits.iter().map(|l| log_softmax(l)).collect();
                // Before the first step every beam is the prompt: one sequence, its row for all.
                let rows: Vec<Vec<f64>> = if rows.len() == nb {
                    rows
                } else {
                    vec![rows[0].clone(); nb]
                };
                let stop = a.stop.as_ref();
                let st = search.step(&rows, |t| stop.is_some_and(|f| f(t)))?;
                if search.is_done() {
                    let (ids, stopped) = search.best();
                    return Ok(Some(Completion {
                        id: a.id,
                        ids: ids.to_vec(),
                        finish: if stopped {
                            FinishReason::Stop
                        } else {
                            FinishReason::Length
                        },
                        preemptions: a.preemptions,
                    }));
                }
                let mut next = Vec::with_capacity(nb);
                for (&p, &tok) in st.parent.iter().zip(&st.token) {
                    let parent = &seqs[p.min(seqs.len() - 1)];
                    let mut tokens = parent.tokens.clone();
                    tokens.push(tok);
                    next.push(Seq {
                        tokens,
                        cached: parent.cached,
                        pages: self.pool.fork(&parent.pages),
                    });
                }
                for s in std::mem::replace(seqs, next) {
                    self.pool.release(s.pages);
                }
                Ok(None)
            }
        }
    }
}

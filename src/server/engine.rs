//! The engine thread: it owns the backend, the frozen model, the paged KV cache, the device
//! prefix table and the [`Scheduler`], and runs continuous batching for the HTTP handlers.
//!
//! Handlers send [`Cmd`]s over a channel; the thread handles every pending command, then runs
//! one engine step, and sends each choice its new tokens (for streaming) and its completion
//! over the choice's own event channel. A choice whose event receiver is gone (its client
//! disconnected and the handler was dropped) is cancelled before the next step and its pages
//! are freed. When nothing runs, the thread sleeps on the command channel.
//!
//! Adapters are read from their folders on first use and placed in the prefix table, the
//! least recently used idle one evicted when the table is full; a request holds its adapter's
//! slot from submission to its end, so a slot in use is never evicted. A request whose adapter
//! is not in the table while every slot is in use waits (its handler waiting for the reply)
//! until a slot is given back, then is submitted; requests behind it whose adapters are in the
//! table go ahead meanwhile (as vLLM skips LoRA requests over its `max_loras`). The HTTP
//! layer's bound on sequences in flight bounds this wait queue too.

use super::metrics::{EngineGauges, Metrics};
use super::registry::Registry;
use crate::device::Backend;
use crate::engine::model::ModelStep;
use crate::engine::scheduler::{Decoding, FinishReason, Request, Scheduler, SchedulerConfig};
use crate::engine::text::stop_fn;
use crate::error::{Error, Result};
use crate::lm::{self, PrefixLm};
use crate::prefix::{AdapterConfig, PrefixAdapter};
use crate::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use tokio::sync::{mpsc as events, oneshot};

/// Makes the backend on the engine thread (a CUDA context belongs to the thread that made it).
pub type BackendFactory = Box<dyn FnOnce() -> Result<Box<dyn Backend>> + Send>;

/// How the engine is set up.
pub struct EngineConfig {
    /// Hugging Face model folder.
    pub model_dir: PathBuf,
    /// The backend to run on.
    pub backend: BackendFactory,
    /// At most this many sequences in a step.
    pub max_batch: usize,
    /// KV-cache pages (`None`: room for `max_batch` sequences of 128 tokens, and at least one
    /// full context).
    pub num_pages: Option<usize>,
    /// Tokens per page.
    pub page_size: usize,
    /// Slots of the device prefix table.
    pub adapter_slots: usize,
    /// Virtual tokens of every adapter served (`None`: the first adapter's).
    pub prefix_len: Option<usize>,
    /// Adapters placed in the prefix table at start.
    pub preload: Vec<String>,
    /// A pause after every engine step (zero in use; tests use it to keep a request running
    /// long enough to act on it, like a slower model would).
    pub step_delay: std::time::Duration,
}

/// What the handlers need to know of the model, reported once it is loaded.
#[derive(Clone)]
pub struct ModelInfo {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Positions of the model's context.
    pub max_positions: usize,
    /// Virtual tokens of every adapter (the prefix table's rows).
    pub prefix_len: usize,
    /// End-of-sequence id.
    pub eos: Option<u32>,
    /// The model folder's tokenizer.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// KV-cache pages.
    pub num_pages: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Sequences per step.
    pub max_batch: usize,
    /// The backend, in words.
    pub device: String,
    /// What packing the weights did, in words ([`crate::lm::PackReport`]).
    pub packing: String,
}

impl ModelInfo {
    /// Tokens a sequence can hold: the context, less the prefix for an adapter.
    pub fn context(&self, with_adapter: bool) -> usize {
        if with_adapter {
            self.max_positions.saturating_sub(self.prefix_len)
        } else {
            self.max_positions
        }
    }
}

/// One choice (completion) of a request.
pub struct Choice {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// At most this many new tokens.
    pub max_new_tokens: usize,
    /// Greedy, sampling or beam search.
    pub decoding: Decoding,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Whether its tokens are sent as they are generated.
    pub stream: bool,
}

/// What a choice hears from the engine.
#[derive(Debug)]
pub enum Event {
    /// New tokens of a streamed choice.
    Tokens {
        /// The choice's position in its request.
        choice: usize,
        /// The tokens generated since the last event.
        ids: Vec<u32>,
    },
    /// The choice finished.
    Done {
        /// The choice's position in its request.
        choice: usize,
        /// All its generated tokens.
        ids: Vec<u32>,
        /// Why it ended.
        finish: FinishReason,
    },
    /// The engine gave up on the request (a failed step, or shutdown).
    Failed {
        /// What happened.
        message: String,
    },
}

/// Why the engine did not take a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The request cannot run as given (400); `param` names the field.
    Invalid {
        /// The request field at fault, if one is.
        param: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// No such adapter (404).
    NotFound(String),
    /// Not now: every prefix-table slot is held and nothing runs that could give one back
    /// (429).
    Busy(String),
    /// The server is shutting down (503).
    Unavailable(String),
    /// The adapter exists already, or is in use (409).
    Conflict(String),
    /// The server failed (500).
    Internal(String),
}

/// A command to the engine thread.
pub enum Cmd {
    /// Queue a request's choices (all or none).
    Submit {
        /// Adapter name, or `None` for the bare model.
        adapter: Option<String>,
        /// The choices, in order.
        choices: Vec<Choice>,
        /// Where the choices' events go.
        events: events::UnboundedSender<Event>,
        /// Accepted or why not.
        reply: oneshot::Sender<std::result::Result<(), Refusal>>,
    },
    /// Register adapter `name` at `dir` and place it in the prefix table.
    Load {
        /// Its name.
        name: String,
        /// Its folder.
        dir: PathBuf,
        /// Done or why not.
        reply: oneshot::Sender<std::result::Result<(), Refusal>>,
    },
    /// Forget adapter `name`.
    Unload {
        /// Its name.
        name: String,
        /// Done or why not.
        reply: oneshot::Sender<std::result::Result<(), Refusal>>,
    },
    /// Cancel everything queued or running (the shutdown grace period ran out).
    CancelAll,
    /// Stop the thread.
    Shutdown,
}

/// The handlers' side of the engine thread.
pub struct EngineHandle {
    tx: Mutex<mpsc::Sender<Cmd>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl EngineHandle {
    /// Sends a command; `false` if the engine thread has ended.
    pub fn send(&self, cmd: Cmd) -> bool {
        lock(&self.tx).send(cmd).is_ok()
    }

    /// Stops the thread and waits for it.
    pub fn shutdown(&self) {
        self.send(Cmd::Shutdown);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the engine thread: loads the model on it and returns once it is ready (or the
/// loading error).
pub fn start(
    cfg: EngineConfig,
    registry: Arc<Mutex<Registry>>,
    metrics: Arc<Metrics>,
) -> Result<(EngineHandle, ModelInfo)> {
    let (tx, rx) = mpsc::channel::<Cmd>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<ModelInfo>>();
    let thread = std::thread::Builder::new()
        .name("prefix-attn-engine".into())
        .spawn(move || run_thread(cfg, registry, metrics, rx, ready_tx))
        .map_err(|e| Error::Unsupported(format!("cannot start the engine thread: {e}")))?;
    let info = ready_rx.recv().unwrap_or_else(|_| {
        Err(Error::Unsupported(
            "the engine thread ended while loading".into(),
        ))
    })?;
    Ok((
        EngineHandle {
            tx: Mutex::new(tx),
            thread: Mutex::new(Some(thread)),
        },
        info,
    ))
}

fn run_thread(
    cfg: EngineConfig,
    registry: Arc<Mutex<Registry>>,
    metrics: Arc<Metrics>,
    rx: mpsc::Receiver<Cmd>,
    ready: mpsc::Sender<Result<ModelInfo>>,
) {
    let mut cfg = cfg;
    let factory = std::mem::replace(
        &mut cfg.backend,
        Box::new(|| Err(Error::Unsupported("the backend was made already".into()))),
    );
    let be = match factory() {
        Ok(be) => be,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let model = match lm::load(&cfg.model_dir, be.as_ref()) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let engine = Engine::new(&cfg, model.as_ref(), be.as_ref(), registry, metrics);
    match engine {
        Ok((mut engine, info)) => {
            let _ = ready.send(Ok(info));
            engine.run(&rx);
        }
        Err(e) => {
            let _ = ready.send(Err(e));
        }
    }
}

struct Track {
    choice: usize,
    events: events::UnboundedSender<Event>,
    slot: Option<u32>,
    stream: bool,
    /// Generated tokens already counted (and sent, when streaming).
    reported: usize,
}

/// A submission waiting for a prefix-table slot for its adapter.
struct Pending {
    adapter: String,
    choices: Vec<Choice>,
    events: events::UnboundedSender<Event>,
    reply: oneshot::Sender<std::result::Result<(), Refusal>>,
}

struct Engine<'a> {
    model: &'a dyn PrefixLm,
    be: &'a dyn Backend,
    step: ModelStep<'a>,
    sched: Scheduler,
    registry: Arc<Mutex<Registry>>,
    metrics: Arc<Metrics>,
    tokenizer: Option<Arc<Tokenizer>>,
    eos: Option<u32>,
    tracks: HashMap<u64, Track>,
    /// Submissions waiting for a slot, oldest first.
    pending: std::collections::VecDeque<Pending>,
    step_delay: std::time::Duration,
}

impl<'a> Engine<'a> {
    fn new(
        cfg: &EngineConfig,
        model: &'a dyn PrefixLm,
        be: &'a dyn Backend,
        registry: Arc<Mutex<Registry>>,
        metrics: Arc<Metrics>,
    ) -> Result<(Engine<'a>, ModelInfo)> {
        let g = model.geometry();
        let tokenizer = Tokenizer::for_model(&cfg.model_dir, g.vocab_size)?.map(Arc::new);
        let eos = model
            .eos_token_id()
            .or_else(|| tokenizer.as_ref().and_then(|t| t.token_id("<|endoftext|>")));
        // The prefix table's rows: given, or the longest adapter known at start (its config
        // says; an unreadable one is skipped here and reported when a request names it).
        let prefix_len = match cfg.prefix_len {
            Some(p) => p,
            None => {
                let reg = lock(&registry);
                cfg.preload
                    .iter()
                    .cloned()
                    .chain(reg.names())
                    .filter_map(|n| reg.resolve(&n))
                    .filter_map(|dir| AdapterConfig::read(&dir).ok())
                    .map(|c| c.num_virtual_tokens)
                    .max()
                    .unwrap_or(1)
            }
        };
        if prefix_len >= g.max_positions {
            return Err(Error::index(
                "--prefix-len",
                format!(
                    "{prefix_len} virtual tokens leave no position of the context ({})",
                    g.max_positions
                ),
            ));
        }
        let page_size = cfg.page_size;
        let context_pages = g.max_positions.div_ceil(page_size) + 1;
        let num_pages = cfg
            .num_pages
            .unwrap_or_else(|| (cfg.max_batch * 128usize.div_ceil(page_size)).max(context_pages));
        let sched = Scheduler::new(SchedulerConfig {
            num_pages,
            page_size,
            max_batch: cfg.max_batch,
        })?;
        let step = ModelStep::new(
            model,
            be,
            num_pages,
            page_size,
            cfg.adapter_slots,
            prefix_len,
        )?;
        let info = ModelInfo {
            vocab_size: g.vocab_size,
            max_positions: g.max_positions,
            prefix_len,
            eos,
            tokenizer: tokenizer.clone(),
            num_pages,
            page_size,
            max_batch: cfg.max_batch,
            device: format!("{:?}", be.device()),
            packing: step.packing().to_string(),
        };
        let mut engine = Engine {
            model,
            be,
            step,
            sched,
            registry,
            metrics,
            tokenizer,
            eos,
            tracks: HashMap::new(),
            pending: Default::default(),
            step_delay: cfg.step_delay,
        };
        for name in &cfg.preload {
            engine
                .ensure_loaded(name)
                .map_err(|r| Error::index(&format!("--adapter {name}"), refusal_text(&r)))?;
        }
        engine.report(None);
        Ok((engine, info))
    }

    fn run(&mut self, rx: &mpsc::Receiver<Cmd>) {
        loop {
            loop {
                let cmd = if self.sched.is_idle() && self.pending.is_empty() {
                    match rx.recv() {
                        Ok(c) => c,
                        Err(_) => return,
                    }
                } else {
                    match rx.try_recv() {
                        Ok(c) => c,
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => return,
                    }
                };
                if !self.handle(cmd) {
                    self.cancel_all("the server is shutting down");
                    return;
                }
            }
            self.reap_cancelled();
            self.admit_pending();
            if self.sched.is_idle() {
                self.report(None);
                continue;
            }
            match self.sched.step(&mut self.step) {
                Ok(done) => self.after_step(done),
                Err(e) => self.fail_all(&format!("the engine step failed: {e}")),
            }
            if !self.step_delay.is_zero() {
                std::thread::sleep(self.step_delay);
            }
        }
    }

    /// Handles a command; `false` to stop.
    fn handle(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Submit {
                adapter,
                choices,
                events,
                reply,
            } => {
                match adapter {
                    Some(name) if self.must_wait(&name) => self.pending.push_back(Pending {
                        adapter: name,
                        choices,
                        events,
                        reply,
                    }),
                    adapter => {
                        let r = self.submit(adapter.as_deref(), choices, events);
                        let _ = reply.send(r);
                    }
                }
                self.report(None);
            }
            Cmd::Load { name, dir, reply } => {
                let _ = reply.send(self.load(&name, dir));
                self.report(None);
            }
            Cmd::Unload { name, reply } => {
                let _ = reply.send(self.unload(&name));
                self.report(None);
            }
            Cmd::CancelAll => {
                self.cancel_all("the server is shutting down: the grace period ended");
                self.report(None);
            }
            Cmd::Shutdown => return false,
        }
        true
    }

    fn submit(
        &mut self,
        adapter: Option<&str>,
        choices: Vec<Choice>,
        events: events::UnboundedSender<Event>,
    ) -> std::result::Result<(), Refusal> {
        if let Some(name) = adapter {
            self.ensure_loaded(name)?;
        }
        let mut taken: Vec<u64> = Vec::new();
        for (i, c) in choices.into_iter().enumerate() {
            let slot = match adapter {
                Some(name) => Some(self.step.slots_mut().acquire(name).map_err(internal)?),
                None => None,
            };
            let stop = self.tokenizer.as_ref().and_then(|t| stop_fn(t, &c.stop));
            let prompt_len = c.prompt.len();
            let req = Request {
                prompt: c.prompt,
                adapter: slot,
                max_new_tokens: c.max_new_tokens,
                stop_ids: self.eos.into_iter().collect(),
                decoding: c.decoding,
            };
            match self.sched.submit(&self.step, req, stop) {
                Ok(id) => {
                    self.metrics.prompt_tokens(prompt_len);
                    self.tracks.insert(
                        id,
                        Track {
                            choice: i,
                            events: events.clone(),
                            slot,
                            stream: c.stream,
                            reported: 0,
                        },
                    );
                    taken.push(id);
                }
                Err(e) => {
                    if let Some(s) = slot {
                        self.step.slots_mut().release(s);
                    }
                    for id in taken {
                        self.drop_choice(id);
                    }
                    return Err(submit_refusal(e));
                }
            }
        }
        Ok(())
    }

    /// Whether a submission for adapter `name` must wait for a slot: the adapter exists, is
    /// not in the table, and every slot is held by a request (some of which will end).
    fn must_wait(&self, name: &str) -> bool {
        let slots = self.step.slots();
        slots.slot(name).is_none()
            && !slots.has_room()
            && !self.sched.is_idle()
            && lock(&self.registry).resolve(name).is_some()
    }

    /// Submits the waiting submissions whose adapter is in the table or can be placed now,
    /// oldest first; drops those whose client is gone. One that still cannot get a slot
    /// while nothing runs (nothing will give one back) is refused with 429.
    fn admit_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let waiting = std::mem::take(&mut self.pending);
        for p in waiting {
            if p.reply.is_closed() || p.events.is_closed() {
                for _ in &p.choices {
                    self.metrics.cancelled();
                }
                continue;
            }
            if self.must_wait(&p.adapter) {
                self.pending.push_back(p);
                continue;
            }
            let r = self.submit(Some(&p.adapter), p.choices, p.events);
            let _ = p.reply.send(r);
        }
        self.report(None);
    }

    /// Places adapter `name` in the prefix table (reading its folder) unless it is there.
    fn ensure_loaded(&mut self, name: &str) -> std::result::Result<u32, Refusal> {
        if let Some(slot) = self.step.slots().slot(name) {
            return Ok(slot);
        }
        let dir = lock(&self.registry)
            .resolve(name)
            .ok_or_else(|| Refusal::NotFound(format!("the model `{name}` does not exist")))?;
        if !self.step.slots().has_room() {
            return Err(Refusal::Busy(format!(
                "every one of the {} prefix-table slots holds an adapter in use; retry when \
                 requests finish (or start the server with more --max-adapters)",
                self.step.slots().capacity()
            )));
        }
        let prefix = PrefixAdapter::load_for(&dir, self.model, self.be).map_err(|e| {
            Refusal::Internal(format!(
                "adapter `{name}` ({}) cannot be loaded: {e}",
                dir.display()
            ))
        })?;
        let full = self.step.slots().len() == self.step.slots().capacity();
        let slot = self
            .step
            .add_adapter(name, &prefix)
            .map_err(|e| Refusal::Invalid {
                param: Some("model".into()),
                message: format!("adapter `{name}` ({}): {e}", dir.display()),
            })?;
        self.metrics.adapter_loaded(full);
        Ok(slot)
    }

    fn load(&mut self, name: &str, dir: PathBuf) -> std::result::Result<(), Refusal> {
        if lock(&self.registry).resolve(name).is_some() {
            return Err(Refusal::Conflict(format!(
                "an adapter named `{name}` exists already; DELETE it first"
            )));
        }
        // Read and check it before it is registered.
        let prefix =
            PrefixAdapter::load_for(&dir, self.model, self.be).map_err(|e| Refusal::Invalid {
                param: Some("path".into()),
                message: format!("adapter `{name}`: {e}"),
            })?;
        let p = prefix.dims()[0];
        let want = self.step.prefix_len();
        if p > want {
            return Err(Refusal::Invalid {
                param: Some("path".into()),
                message: format!(
                    "adapter `{name}` ({}) has {p} virtual tokens; this server's prefix table \
                     takes adapters of at most {want} (--prefix-len)",
                    dir.display()
                ),
            });
        }
        lock(&self.registry).insert(name, &dir);
        if self.step.slots().has_room() {
            let full = self.step.slots().len() == self.step.slots().capacity();
            self.step
                .add_adapter(name, &prefix)
                .map_err(|e| Refusal::Internal(e.to_string()))?;
            self.metrics.adapter_loaded(full);
        }
        Ok(())
    }

    fn unload(&mut self, name: &str) -> std::result::Result<(), Refusal> {
        if lock(&self.registry).resolve(name).is_none() {
            return Err(Refusal::NotFound(format!(
                "the model `{name}` does not exist"
            )));
        }
        if self.step.slots().slot(name).is_some() {
            self.step
                .remove_adapter(name)
                .map_err(|e| Refusal::Conflict(e.to_string()))?;
        }
        lock(&self.registry).remove(name);
        Ok(())
    }

    /// Forgets a choice: out of the scheduler, its slot released.
    fn drop_choice(&mut self, id: u64) -> Option<Track> {
        self.sched.cancel(id);
        let t = self.tracks.remove(&id)?;
        if let Some(s) = t.slot {
            self.step.slots_mut().release(s);
        }
        Some(t)
    }

    fn reap_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        if gone.is_empty() {
            return;
        }
        for id in gone {
            self.drop_choice(id);
            self.metrics.cancelled();
        }
        self.report(None);
    }

    fn cancel_all(&mut self, why: &str) {
        for p in std::mem::take(&mut self.pending) {
            for _ in &p.choices {
                self.metrics.cancelled();
            }
            let _ = p.reply.send(Err(Refusal::Unavailable(why.to_string())));
        }
        let ids: Vec<u64> = self.tracks.keys().copied().collect();
        for id in ids {
            if let Some(t) = self.drop_choice(id) {
                self.metrics.cancelled();
                let _ = t.events.send(Event::Failed {
                    message: why.to_string(),
                });
            }
        }
    }

    fn fail_all(&mut self, why: &str) {
        eprintln!("prefix-attn serve: {why}");
        let ids: Vec<u64> = self.tracks.keys().copied().collect();
        for id in ids {
            if let Some(t) = self.drop_choice(id) {
                let _ = t.events.send(Event::Failed {
                    message: why.to_string(),
                });
            }
        }
        self.report(None);
    }

    fn after_step(&mut self, done: Vec<crate::engine::Completion>) {
        let mut tokens = 0;
        // The events go out after the metrics count this step, so a client that reads
        // /metrics after its answer sees the step that produced it.
        let mut events = Vec::new();
        for c in done {
            let Some(t) = self.tracks.remove(&c.id) else {
                continue;
            };
            tokens += c.ids.len().saturating_sub(t.reported);
            if let Some(s) = t.slot {
                self.step.slots_mut().release(s);
            }
            self.metrics.finished(c.finish.as_str());
            events.push((
                t.events,
                Event::Done {
                    choice: t.choice,
                    ids: c.ids,
                    finish: c.finish,
                },
            ));
        }
        for (&id, t) in self.tracks.iter_mut() {
            let Some(g) = self.sched.generated(id) else {
                continue;
            };
            if g.len() > t.reported {
                tokens += g.len() - t.reported;
                if t.stream {
                    events.push((
                        t.events.clone(),
                        Event::Tokens {
                            choice: t.choice,
                            ids: g[t.reported..].to_vec(),
                        },
                    ));
                }
                t.reported = g.len();
            }
        }
        self.report(Some(tokens));
        for (tx, e) in events {
            let _ = tx.send(e);
        }
    }

    /// Publishes the gauges (and a step's token count).
    fn report(&self, step_tokens: Option<usize>) {
        let slots = self.step.slots();
        let g = EngineGauges {
            waiting: self.sched.waiting()
                + self.pending.iter().map(|p| p.choices.len()).sum::<usize>(),
            running: self.sched.running(),
            batch_size: self.sched.running_seqs(),
            pages_in_use: self.sched.pool().used_pages(),
            pages_total: self.sched.pool().num_pages(),
            adapters_loaded: slots.len(),
            adapter_slots: slots.capacity(),
        };
        match step_tokens {
            Some(n) => self.metrics.step(n, g),
            None => self.metrics.gauges(g),
        }
    }
}

fn internal(e: Error) -> Refusal {
    Refusal::Internal(e.to_string())
}

/// A scheduler refusal as the request field it is about.
fn submit_refusal(e: Error) -> Refusal {
    match e {
        Error::Index { arg, msg } => Refusal::Invalid {
            message: format!("{arg}: {msg}"),
            param: Some(arg),
        },
        Error::OutOfPages { needed, total, .. } => Refusal::Invalid {
            param: Some("max_tokens".into()),
            message: format!(
                "the prompt and max_tokens need {needed} KV-cache pages; the server has \
                 {total} (--num-pages)"
            ),
        },
        e => Refusal::Invalid {
            param: None,
            message: e.to_string(),
        },
    }
}

/// A refusal's message.
pub fn refusal_text(r: &Refusal) -> String {
    match r {
        Refusal::Invalid { message, .. }
        | Refusal::NotFound(message)
        | Refusal::Busy(message)
        | Refusal::Unavailable(message)
        | Refusal::Conflict(message)
        | Refusal::Internal(message) => message.clone(),
    }
}

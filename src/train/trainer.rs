//! The prefix-tuning training loop: prefixes on a frozen model (through PEFT's MLP or
//! trained directly), with checkpoints that make a resumed run end with exactly the adapter
//! of an uninterrupted one.
//!
//! Every step: the encoder computes the prefix once; the model's forward gives the summed
//! token loss of each micro-batch and its backward the prefix gradient of that sum (summed
//! over the micro-batches of a step); the encoder's backward scales it by `1 / tokens` (the
//! mean loss over the whole step, docs/ARCHITECTURE.md §2) and the optimiser updates the encoder.
//!
//! What a run leaves in its output folder, and what it refuses to touch, is decided before
//! anything is written ([`train`]): a folder that holds anything but one of our runs is
//! never written into, and a resume checks the content (size and SHA-256) of every file the
//! run reads against what its checkpoint recorded.

use super::data::{batch_of, load_jsonl_stats, DataLimits, DataStats, Example, Truncation};
use super::optim::{Optimizer, OptimizerKind, Schedule};
use super::plot::write_loss_svg;
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::hf::WeightFiles;
use crate::io::{digest_file, write_atomic, write_safetensors_f32_meta, SafetensorsFile};
use crate::lm::{Batch, LossSum, PrefixLm, Workspace};
use crate::prefix::encoder::{EncoderActs, EncoderDims, PrefixEncoder};
use crate::prefix::{AdapterConfig, PrefixAdapter};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};
use crate::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How long to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    /// A number of optimiser steps.
    Steps(usize),
    /// A number of passes over the data.
    Epochs(usize),
}

/// A request to stop a run between two steps, set from another thread or a signal handler.
/// The run then writes a checkpoint (atomically) and returns with
/// [`TrainReport::interrupted`] set; `--resume` continues it.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicUsize>);

/// The value an [`Interrupt`] holds when it was requested by the program, not a signal.
const REQUESTED: usize = usize::MAX;

impl Interrupt {
    /// A flag that nothing has set yet.
    pub fn new() -> Interrupt {
        Interrupt::default()
    }

    /// Asks the run to stop after its current step.
    pub fn request(&self) {
        let _ = self
            .0
            .compare_exchange(0, REQUESTED, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst) != 0
    }

    /// The signal that asked for the stop, if it was one.
    pub fn signal(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 | REQUESTED => None,
            s => i32::try_from(s).ok(),
        }
    }

    /// A flag set by SIGINT (Ctrl-C) and SIGTERM. A second signal while the first is being
    /// handled ends the process at once with status `128 + signal` (the last checkpoint is
    /// intact: every file is written atomically). A signal the process was started with
    /// ignored (`nohup`, a background job of a script) stays ignored.
    #[cfg(unix)]
    pub fn on_signals() -> Result<Interrupt> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let flag = Interrupt::new();
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM] {
            if signal_ignored(sig) {
                continue;
            }
            let io = |e: std::io::Error| Error::Io {
                path: PathBuf::from(format!("<signal {sig}>")),
                source: e,
            };
            // Registered first, so it runs before `armed` is set by the same signal: only a
            // second signal finds it set.
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, armed.clone())
                .map_err(io)?;
            signal_hook::flag::register(sig, armed.clone()).map_err(io)?;
            signal_hook::flag::register_usize(sig, flag.0.clone(), sig as usize).map_err(io)?;
        }
        Ok(flag)
    }
}

/// Whether `sig` is ignored (`SIG_IGN`) in this process.
#[cfg(unix)]
fn signal_ignored(sig: i32) -> bool {
    // SAFETY: sigaction with a null new action only reads the current disposition into
    // `old`, a plain C struct that zero-initialisation makes valid.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

/// Everything a training run is configured with. [`TrainConfig::new`] gives the defaults of
/// the command line.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Model folder.
    pub model: PathBuf,
    /// JSONL training data.
    pub data: PathBuf,
    /// Output folder.
    pub out: PathBuf,
    /// Initial encoder weights (PEFT names); otherwise a seeded initialisation.
    pub init: Option<PathBuf>,
    /// Prefix length `P`.
    pub prefix_len: usize,
    /// MLP width `E` (with the projection).
    pub mid_dim: usize,
    /// Whether the prefix is reparameterised by the MLP (PEFT `prefix_projection=True`, the
    /// paper's method); false trains the prefix `[P, L·2·C]` itself (PEFT's default).
    pub prefix_projection: bool,
    /// Steps or epochs.
    pub length: Length,
    /// Sequences per micro-batch (per step without accumulation).
    pub batch_size: usize,
    /// Micro-batches per optimiser step: one step then equals one batch of
    /// `batch_size · grad_accum` sequences (same data order, same token-weighted mean).
    pub grad_accum: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Warm-up steps.
    pub warmup_steps: usize,
    /// Optimiser.
    pub optimizer: OptimizerKind,
    /// Seed of the initialisation and the data order.
    pub seed: u64,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_every: usize,
    /// Log file (default `OUT/log.jsonl`).
    pub log: Option<PathBuf>,
    /// Continue from the checkpoint in `out`.
    pub resume: bool,
    /// Longest example (default and at most `n_positions - P`).
    pub max_length: Option<usize>,
    /// What to do with longer examples.
    pub truncation: Truncation,
    /// Held-out data evaluated during training.
    pub eval_data: Option<PathBuf>,
    /// Evaluate every this many steps (and at the end); 0: only at the end.
    pub eval_every: usize,
    /// `base_model_name_or_path` for the adapter's config (default: `model` as given).
    pub base_model_name: Option<String>,
    /// Checked between steps: when set, the run writes a checkpoint and returns.
    pub interrupt: Option<Interrupt>,
}

impl TrainConfig {
    /// The command line's defaults: P = 10, an MLP of 512, 5 epochs of batch 10, AdamW at
    /// 5e-5 (weight decay 0) with a linear decay, a checkpoint every 100 steps.
    pub fn new(model: PathBuf, data: PathBuf, out: PathBuf) -> TrainConfig {
        TrainConfig {
            model,
            data,
            out,
            init: None,
            prefix_len: 10,
            mid_dim: 512,
            prefix_projection: true,
            length: Length::Epochs(5),
            batch_size: 10,
            grad_accum: 1,
            lr: 5e-5,
            schedule: Schedule::Linear,
            warmup_steps: 0,
            optimizer: OptimizerKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            seed: 0,
            save_every: 100,
            log: None,
            resume: false,
            max_length: None,
            truncation: Truncation::Error,
            eval_data: None,
            eval_every: 100,
            base_model_name: None,
            interrupt: None,
        }
    }
}

/// What a run says before its first step.
#[derive(Clone, Debug)]
pub struct RunStart {
    /// Steps already done (non-zero when resuming).
    pub step: usize,
    /// Total steps of the run.
    pub total: usize,
    /// Whether this continues a checkpoint.
    pub resumed: bool,
    /// The training data as loaded.
    pub data: DataStats,
    /// The evaluation data as loaded, if any.
    pub eval_data: Option<DataStats>,
    /// The longest example allowed.
    pub max_length: usize,
}

/// What one step reports.
#[derive(Clone, Copy, Debug)]
pub struct StepInfo {
    /// 1-based step.
    pub step: usize,
    /// Total steps of the run.
    pub total: usize,
    /// Loss of this step's batch before its update.
    pub loss: f64,
    /// Learning rate of its update.
    pub lr: f64,
    /// Counted tokens of the batch.
    pub tokens: usize,
    /// Training throughput since the run (or resume) started, tokens per second.
    pub tokens_per_s: f64,
    /// The step this invocation started from (0, or the checkpoint's step on a resume).
    pub start_step: usize,
}

/// One evaluation on the held-out data.
#[derive(Clone, Copy, Debug)]
pub struct EvalInfo {
    /// After this step.
    pub step: usize,
    /// Token-weighted mean loss.
    pub loss: f64,
    /// Counted tokens.
    pub tokens: usize,
    /// Whether it is the best so far (its adapter was written to `best/`).
    pub best: bool,
}

/// What a caller sees of a run: its start, every step (returning whether to go on), every
/// evaluation. A closure `FnMut(&StepInfo) -> bool` is an observer of steps only.
pub trait TrainObserver {
    /// Before the first step.
    fn start(&mut self, _start: &RunStart) {}
    /// After each step; `false` stops the run as a killed process would (nothing more is
    /// written).
    fn step(&mut self, info: &StepInfo) -> bool;
    /// After each evaluation.
    fn eval(&mut self, _info: &EvalInfo) {}
}

impl<F: FnMut(&StepInfo) -> bool> TrainObserver for F {
    fn step(&mut self, info: &StepInfo) -> bool {
        self(info)
    }
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct TrainReport {
    /// Steps done in total.
    pub steps: usize,
    /// Total steps of the run.
    pub total: usize,
    /// Steps done by this invocation.
    pub steps_run: usize,
    /// Loss of the first step's batch.
    pub first_loss: f64,
    /// Loss of the last step's batch.
    pub last_loss: f64,
    /// Per-step losses, from step 1.
    pub losses: Vec<f64>,
    /// `(step, loss)` of every evaluation.
    pub eval_losses: Vec<(usize, f64)>,
    /// The best evaluation `(step, loss)`, whose adapter is in `best/`.
    pub best_eval: Option<(usize, f64)>,
    /// Output folder.
    pub out: PathBuf,
    /// Whether the run reached its last step (false: stopped by the caller or interrupted).
    pub completed: bool,
    /// Whether it stopped at an [`Interrupt`] (a checkpoint of `steps` was then written).
    pub interrupted: bool,
    /// The signal behind the interrupt, if it was one.
    pub signal: Option<i32>,
    /// The step of the checkpoint in the folder when the run returned.
    pub checkpoint_step: Option<usize>,
}

/// File names inside the output folder.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
/// The encoder weights with PEFT names.
pub const ENCODER: &str = "prefix_encoder.safetensors";
/// The loss picture.
pub const LOSS_SVG: &str = "loss.svg";
/// The default log.
pub const LOG: &str = "log.jsonl";
/// What marks a folder as a run of this crate, with the run's settings and input files.
pub const RUN_MARKER: &str = "run.json";
/// The subfolder holding the adapter of the best evaluation.
pub const BEST: &str = "best";
/// Every name a run writes in its folder.
pub const RUN_FILES: [&str; 8] = [
    RUN_MARKER,
    CHECKPOINT,
    LOG,
    LOSS_SVG,
    ENCODER,
    "adapter_config.json",
    "adapter_model.safetensors",
    BEST,
];

const CHECKPOINT_FORMAT: &str = "prefix-attn checkpoint 2";
const RUN_FORMAT: &str = "prefix-attn run 1";

/// The data order: a fresh permutation every epoch, drawn from the run's RNG.
#[derive(Clone, Debug, PartialEq)]
struct DataOrder {
    rng: Rng,
    order: Vec<usize>,
    pos: usize,
}

impl DataOrder {
    /// Indices of the next batch. A batch size of at least the data size takes every example.
    fn next(&mut self, n: usize, batch_size: usize) -> Vec<usize> {
        if batch_size >= n {
            return (0..n).collect();
        }
        if self.pos == 0 || self.order.len() != n {
            self.order = (0..n).collect();
            self.rng.shuffle(&mut self.order);
            self.pos = 0;
        }
        let end = (self.pos + batch_size).min(n);
        let idx = self.order[self.pos..end].to_vec();
        self.pos = if end == n { 0 } else { end };
        idx
    }
}

/// The settings that identify a run: a resume must match them.
fn run_settings(cfg: &TrainConfig, total: usize, max_length: usize) -> Value {
    json!({
        "prefix_len": cfg.prefix_len,
        "prefix_projection": cfg.prefix_projection,
        "mid_dim": if cfg.prefix_projection { Value::from(cfg.mid_dim) } else { Value::Null },
        "total_steps": total,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "lr": cfg.lr,
        "schedule": format!("{:?}", cfg.schedule),
        "warmup_steps": cfg.warmup_steps,
        "optimizer": format!("{:?}", cfg.optimizer),
        "seed": cfg.seed,
        "max_length": max_length,
        "truncate": format!("{:?}", cfg.truncation),
        "eval_every": if cfg.eval_data.is_some() { Value::from(cfg.eval_every) } else { Value::Null },
    })
}

/// One input file of a run: which flag it came from, where it was, what it held.
fn file_entry(what: &str, path: &Path) -> Result<Value> {
    let d = digest_file(path)?;
    let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(json!({
        "what": what,
        "path": abs.to_string_lossy(),
        "size": d.size,
        "sha256": d.sha256,
    }))
}

/// The files a model folder's load reads: config, weights, tokenizer. (Weights that cannot
/// be found are left out: loading the model then says what is missing.)
pub fn model_files(dir: &Path) -> Vec<PathBuf> {
    let mut v = vec![dir.join("config.json")];
    if let Ok(w) = WeightFiles::find(dir) {
        v.extend(w.paths());
    }
    v.extend(Tokenizer::files(dir));
    v
}

/// Size and SHA-256 of every input of the run.
fn run_files(cfg: &TrainConfig) -> Result<Vec<Value>> {
    let mut v = vec![file_entry("--data", &cfg.data)?];
    if let Some(e) = &cfg.eval_data {
        v.push(file_entry("--eval-data", e)?);
    }
    if let Some(i) = &cfg.init {
        v.push(file_entry("--init", i)?);
    }
    for f in model_files(&cfg.model) {
        let name = f
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        v.push(file_entry(&format!("--model {name}"), &f)?);
    }
    Ok(v)
}

/// Compares the settings a checkpoint recorded with the current ones.
fn check_settings(path: &Path, run: &Value, settings: &Value) -> Result<()> {
    let bad = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    let old_settings = run.get("settings").cloned().unwrap_or(Value::Null);
    if &old_settings != settings {
        let diffs: Vec<String> = settings
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| old_settings.get(k.as_str()) != Some(v))
            .map(|(k, v)| {
                format!(
                    "{k}: checkpoint {} vs now {v}",
                    old_settings.get(k.as_str()).unwrap_or(&Value::Null)
                )
            })
            .collect();
        return Err(bad(format!(
            "belongs to a run with other settings ({}); resume with the same settings or use another --out",
            diffs.join("; ")
        )));
    }
    Ok(())
}

/// The run metadata of a checkpoint (its header only), checked to be of this format.
fn checkpoint_run(path: &Path) -> Result<Value> {
    let meta = crate::io::safetensors_metadata(path)?;
    let bad = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    match meta.get("format").map(String::as_str) {
        Some(CHECKPOINT_FORMAT) => {}
        Some(f) if f.starts_with("prefix-attn checkpoint") => {
            return Err(bad(format!(
                "written by an older prefix-attn ({f:?}) that recorded no content hashes of its files; it cannot be checked, so start a new run in another --out"
            )))
        }
        _ => return Err(bad("not a prefix-attn checkpoint (no format metadata)".into())),
    }
    serde_json::from_str(meta.get("run").map_or("", String::as_str))
        .map_err(|_| bad("not a prefix-attn checkpoint (no run metadata)".into()))
}

/// Compares the input files (size and SHA-256) a checkpoint recorded with the current ones.
fn check_files(path: &Path, run: &Value, files: &[Value]) -> Result<()> {
    let old: Vec<Value> = run
        .get("files")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let what = |v: &Value| {
        v.get("what")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let short = |h: Option<&str>| h.unwrap_or("").chars().take(12).collect::<String>();
    let mut problems = vec![];
    for f in files {
        let w = what(f);
        match old.iter().find(|o| what(o) == w) {
            None => problems.push(format!(
                "{w} {} is new: the run started without it",
                f["path"].as_str().unwrap_or("")
            )),
            Some(o) => {
                let (os, ns) = (o["size"].as_u64(), f["size"].as_u64());
                let (oh, nh) = (o["sha256"].as_str(), f["sha256"].as_str());
                if os != ns || oh != nh {
                    let how = if os != ns {
                        format!("size {} -> {} bytes", os.unwrap_or(0), ns.unwrap_or(0))
                    } else {
                        format!("same size, sha256 {}… -> {}…", short(oh), short(nh))
                    };
                    problems.push(format!(
                        "{w} changed since the checkpoint ({how}; checkpoint: {}, now: {})",
                        o["path"].as_str().unwrap_or("?"),
                        f["path"].as_str().unwrap_or("?")
                    ));
                }
            }
        }
    }
    for o in &old {
        let w = what(o);
        if !files.iter().any(|f| what(f) == w) {
            problems.push(format!(
                "{w} {} is missing now: the run started with it",
                o["path"].as_str().unwrap_or("")
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Format {
            path: path.to_path_buf(),
            msg: format!(
                "cannot resume: {}. Resume with the files the run started with, or start a new run in another --out",
                problems.join("; ")
            ),
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
struct State {
    step: usize,
    order: DataOrder,
    losses: Vec<f64>,
    evals: Vec<(usize, f64)>,
    best: Option<(usize, f64)>,
}

fn save_checkpoint(
    path: &Path,
    run: &Value,
    state: &State,
    enc: &PrefixEncoder,
    opt: &Optimizer,
    be: &dyn Backend,
) -> Result<()> {
    let host = |t: &crate::tensor::Tensor| be.download(t).map(|t| t.to_f32_vec());
    let mut names = vec![];
    let mut data = vec![];
    let shapes = enc.dims.shapes();
    for (i, n) in enc.dims.param_names().iter().enumerate() {
        names.push((format!("param.{n}"), shapes[i].clone()));
        data.push(host(&enc.params[i])?);
        if !opt.m.is_empty() {
            names.push((format!("m.{n}"), shapes[i].clone()));
            data.push(host(&opt.m[i])?);
            names.push((format!("v.{n}"), shapes[i].clone()));
            data.push(host(&opt.v[i])?);
        }
    }
    let entries: Vec<(&str, Vec<usize>, &[f32])> = names
        .iter()
        .zip(&data)
        .map(|((n, s), d)| (n.as_str(), s.clone(), d.as_slice()))
        .collect();
    let st = json!({
        "step": state.step,
        "optimizer_step": opt.step,
        "rng": state.order.rng.state,
        "order": state.order.order,
        "pos": state.order.pos,
        "losses": state.losses,
        "evals": state.evals,
        "best": state.best,
    });
    let mut meta = HashMap::new();
    meta.insert("run".to_string(), run.to_string());
    meta.insert("state".to_string(), st.to_string());
    meta.insert("format".to_string(), CHECKPOINT_FORMAT.to_string());
    write_safetensors_f32_meta(path, &entries, Some(meta))
}

fn load_checkpoint(
    path: &Path,
    settings: &Value,
    files: &[Value],
    enc: &mut PrefixEncoder,
    opt: &mut Optimizer,
    be: &dyn Backend,
) -> Result<State> {
    let file = SafetensorsFile::open(path)?;
    let meta = file.metadata()?;
    let bad = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    let run = checkpoint_run(path)?;
    check_settings(path, &run, settings)?;
    check_files(path, &run, files)?;
    let st: Value = serde_json::from_str(meta.get("state").map_or("", String::as_str))
        .map_err(|_| bad("checkpoint state is missing or malformed".into()))?;
    let num = |k: &str| {
        st.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("state field {k:?} missing")))
    };
    let field = |k: &str| st.get(k).cloned().unwrap_or(Value::Null);
    let malformed = |k: &str| bad(format!("state field {k:?} malformed"));
    let rng: Vec<u64> = serde_json::from_value(field("rng")).map_err(|_| malformed("rng"))?;
    let order: Vec<usize> =
        serde_json::from_value(field("order")).map_err(|_| malformed("order"))?;
    let losses: Vec<f64> =
        serde_json::from_value(field("losses")).map_err(|_| malformed("losses"))?;
    let evals: Vec<(usize, f64)> =
        serde_json::from_value(field("evals")).map_err(|_| malformed("evals"))?;
    let best: Option<(usize, f64)> =
        serde_json::from_value(field("best")).map_err(|_| malformed("best"))?;
    let rng: [u64; 4] = rng
        .try_into()
        .map_err(|_| bad("state field \"rng\" must hold 4 numbers".into()))?;
    let shapes = enc.dims.shapes();
    let load = |name: String, shape: &[usize]| -> Result<crate::tensor::Tensor> {
        let (got, data) = file.f32(&name)?;
        if got != shape {
            return Err(bad(format!(
                "tensor {name:?} has shape {got:?}, expected {shape:?}"
            )));
        }
        be.upload(&crate::tensor::Tensor::from_f32(
            shape,
            &data,
            crate::tensor::DType::F32,
        )?)
    };
    for (i, n) in enc.dims.param_names().iter().enumerate() {
        enc.params[i] = load(format!("param.{n}"), &shapes[i])?;
        if !opt.m.is_empty() {
            opt.m[i] = load(format!("m.{n}"), &shapes[i])?;
            opt.v[i] = load(format!("v.{n}"), &shapes[i])?;
        }
    }
    opt.step = num("optimizer_step")?;
    let step = num("step")? as usize;
    if losses.len() != step {
        return Err(bad(format!(
            "{} losses recorded for {step} steps",
            losses.len()
        )));
    }
    Ok(State {
        step,
        order: DataOrder {
            rng: Rng { state: rng },
            order,
            pos: num("pos")? as usize,
        },
        losses,
        evals,
        best,
    })
}

/// Rewrites the log keeping only steps `1..=step` (the lines a killed run wrote after its
/// last checkpoint are replayed by the resumed run).
fn truncate_log(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(_) => return Ok(()),
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_u64))
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}

/// Whether `text` reads as a log this crate wrote (every line a JSON object with a step).
fn is_our_log(text: &str) -> bool {
    text.lines().filter(|l| !l.trim().is_empty()).all(|l| {
        serde_json::from_str::<Value>(l)
            .ok()
            .is_some_and(|v| v.get("step").and_then(Value::as_u64).is_some())
    })
}

/// Whether `dir` holds a run of this crate: its marker, or (runs from before the marker) a
/// checkpoint of ours.
fn is_our_run(dir: &Path) -> bool {
    let marker = std::fs::read_to_string(dir.join(RUN_MARKER))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("format").and_then(Value::as_str).map(String::from));
    if marker.is_some_and(|f| f.starts_with("prefix-attn run")) {
        return true;
    }
    crate::io::safetensors_metadata(&dir.join(CHECKPOINT)).is_ok_and(|m| {
        m.get("format")
            .is_some_and(|f| f.starts_with("prefix-attn checkpoint"))
    })
}

fn canonical(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

/// A path's canonical form, for a file that may not exist yet (its folder canonicalised).
fn canonical_target(p: &Path) -> Option<PathBuf> {
    canonical(p).or_else(|| {
        let parent = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Some(canonical(parent)?.join(p.file_name()?))
    })
}

/// Decides, before anything is written, whether `cfg.out` may be used: never a file, never
/// the model folder, never a folder holding anything but one of our runs, never a file that
/// is also an input; on a resume, a folder with a checkpoint. Returns whether the folder
/// already holds a run.
fn check_out(cfg: &TrainConfig, log_path: &Path) -> Result<()> {
    let out = &cfg.out;
    let err = |msg: String| Error::Format {
        path: out.clone(),
        msg,
    };
    if out.exists() && !out.is_dir() {
        return Err(err(
            "--out names a file; it must be a folder (new, empty, or one of our runs)".into(),
        ));
    }
    if let (Some(o), Some(m)) = (canonical(out), canonical(&cfg.model)) {
        if o == m {
            return Err(err(
                "--out is the model folder (--model): a run never writes beside the model's own files; choose another folder"
                    .into(),
            ));
        }
    }
    // No input may be a file the run writes.
    let mut outputs: Vec<(PathBuf, String)> = RUN_FILES
        .iter()
        .filter_map(|f| Some((canonical_target(&out.join(f))?, format!("--out {f}"))))
        .collect();
    if let Some(l) = canonical_target(log_path) {
        outputs.push((l, "--log".into()));
    }
    let mut inputs: Vec<(PathBuf, String)> = vec![(cfg.data.clone(), "--data".into())];
    if let Some(e) = &cfg.eval_data {
        inputs.push((e.clone(), "--eval-data".into()));
    }
    if let Some(i) = &cfg.init {
        inputs.push((i.clone(), "--init".into()));
    }
    for (input, flag) in &inputs {
        let Some(ci) = canonical(input) else { continue };
        for (o, what) in &outputs {
            if &ci == o || ci.starts_with(o) {
                return Err(Error::Format {
                    path: input.clone(),
                    msg: format!(
                        "{flag} is also a file the run writes ({what}); keep inputs outside the output folder"
                    ),
                });
            }
        }
    }
    let entries: Vec<String> = match std::fs::read_dir(out) {
        Ok(d) => d
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    };
    let ours = is_our_run(out);
    if !entries.is_empty() && !ours {
        let mut shown: Vec<&String> = entries.iter().collect();
        shown.sort();
        shown.truncate(3);
        return Err(err(format!(
            "--out holds {} files or folders that are not a prefix-attn run (e.g. {}); a run writes only into a new or empty folder, or one of its own runs: choose another --out",
            entries.len(),
            shown.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
        )));
    }
    if cfg.resume {
        if !out.join(CHECKPOINT).exists() {
            return Err(Error::Format {
                path: out.join(CHECKPOINT),
                msg: "--resume: no checkpoint to resume from (nothing was written)".into(),
            });
        }
    } else {
        for f in [CHECKPOINT, "adapter_config.json", ENCODER] {
            if out.join(f).exists() {
                return Err(err(format!(
                    "already holds a run ({f}); pass --resume to continue it, or choose another --out"
                )));
            }
        }
        // A log outside the folder that exists: never replaced by a new run.
        let inside = canonical_target(log_path)
            .zip(canonical_target(&out.join(LOG)))
            .is_some_and(|(a, b)| a == b);
        if !inside && log_path.exists() {
            let text = std::fs::read_to_string(log_path).unwrap_or_default();
            let what = if is_our_log(&text) {
                "holds the log of another run"
            } else {
                "exists and is not a prefix-attn log"
            };
            return Err(Error::Format {
                path: log_path.to_path_buf(),
                msg: format!("--log {what}; a new run does not replace it: remove it or choose another --log"),
            });
        }
    }
    Ok(())
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Token-weighted mean loss of `examples` with `prefix` (in the model's dtype), in chunks of
/// `batch_size` sequences.
pub fn evaluate(
    model: &dyn PrefixLm,
    be: &dyn Backend,
    prefix: Option<&Tensor>,
    examples: &[Example],
    batch_size: usize,
) -> Result<LossSum> {
    evaluate_in(
        model,
        be,
        prefix,
        examples,
        batch_size,
        &mut Workspace::new(),
    )
}

/// [`evaluate`] in a workspace kept by the caller (grown to the largest chunk, reused).
pub fn evaluate_in(
    model: &dyn PrefixLm,
    be: &dyn Backend,
    prefix: Option<&Tensor>,
    examples: &[Example],
    batch_size: usize,
    ws: &mut Workspace,
) -> Result<LossSum> {
    if batch_size == 0 {
        return Err(Error::index("--batch-size", "must be at least 1"));
    }
    let mut total = LossSum { sum: 0.0, count: 0 };
    for chunk in examples.chunks(batch_size) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = batch_of(&refs)?;
        let l = model.loss(be, &batch, prefix, ws)?;
        total.sum += l.sum;
        total.count += l.count;
    }
    Ok(total)
}

/// Runs (or resumes) a training run; `on_step` sees every step and returns whether to go
/// on. Stopping early behaves like a killed process: nothing more is written, and the run
/// can be resumed from its last checkpoint.
pub fn train(
    cfg: &TrainConfig,
    be: &dyn Backend,
    on_step: &mut dyn FnMut(&StepInfo) -> bool,
) -> Result<TrainReport> {
    train_observed(cfg, be, &mut { on_step })
}

/// [`train`] with an observer of the run's start, steps and evaluations.
pub fn train_observed(
    cfg: &TrainConfig,
    be: &dyn Backend,
    observer: &mut dyn TrainObserver,
) -> Result<TrainReport> {
    if cfg.batch_size == 0 {
        return Err(Error::index("--batch-size", "must be at least 1"));
    }
    if cfg.grad_accum == 0 {
        return Err(Error::index("--grad-accum", "must be at least 1"));
    }
    if cfg.prefix_len == 0 {
        return Err(Error::index("--prefix-len", "must be at least 1"));
    }
    if cfg.prefix_projection && cfg.mid_dim == 0 {
        return Err(Error::index(
            "--mid-dim",
            "must be at least 1 (or --no-prefix-projection for no MLP)",
        ));
    }
    if !(cfg.lr.is_finite() && cfg.lr >= 0.0) {
        return Err(Error::index(
            "--lr",
            format!("{}, expected a non-negative number", cfg.lr),
        ));
    }
    if cfg.max_length == Some(0) {
        return Err(Error::index("--max-length", "must be at least 1"));
    }
    let log_path = cfg.log.clone().unwrap_or_else(|| cfg.out.join(LOG));
    check_out(cfg, &log_path)?;
    let ckpt = cfg.out.join(CHECKPOINT);
    // The inputs' content first: on a resume, a changed file is named before it is read.
    let files = run_files(cfg)?;
    if cfg.resume {
        check_files(&ckpt, &checkpoint_run(&ckpt)?, &files)?;
    }

    let model = crate::lm::load(&cfg.model, be)?;
    let g = model.geometry();
    if cfg.prefix_len >= g.max_positions {
        return Err(Error::index(
            "--prefix-len",
            format!(
                "{} leaves no position of n_positions = {}",
                cfg.prefix_len, g.max_positions
            ),
        ));
    }
    let limits = DataLimits::for_model(&g, cfg.prefix_len, cfg.max_length, cfg.truncation)?;
    let max_length = limits.max_len;
    let tokenizer = Tokenizer::for_model(&cfg.model, g.vocab_size)?;
    let eos = model
        .eos_token_id()
        .or_else(|| tokenizer.as_ref().and_then(|t| t.token_id("<|endoftext|>")));
    let (examples, data_stats) = load_jsonl_stats(&cfg.data, tokenizer.as_ref(), eos, limits)?;
    let (eval_examples, eval_stats) = match &cfg.eval_data {
        Some(p) => {
            let (e, s) = load_jsonl_stats(p, tokenizer.as_ref(), eos, limits)?;
            (e, Some(s))
        }
        None => (vec![], None),
    };
    let n = examples.len();
    let step_size = cfg.batch_size * cfg.grad_accum;
    let steps_per_epoch = n.div_ceil(step_size);
    let total = match cfg.length {
        Length::Steps(s) => s,
        Length::Epochs(e) => e * steps_per_epoch,
    };
    let dims = EncoderDims::for_model(&g, cfg.prefix_len, cfg.mid_dim, cfg.prefix_projection);
    // A resume takes its encoder from the checkpoint (the init file was checked above).
    let mut enc = match (&cfg.init, cfg.resume) {
        (_, true) => PrefixEncoder::zeros(dims, be)?,
        (Some(p), false) => PrefixEncoder::load(p, dims, be)?,
        (None, false) => PrefixEncoder::init(dims, cfg.seed, be)?,
    };
    let mut opt = Optimizer::new(cfg.optimizer, &dims.shapes(), be)?;
    let settings = run_settings(cfg, total, max_length);
    let run = json!({"settings": settings, "files": files});

    let mut state = if cfg.resume {
        let st = load_checkpoint(&ckpt, &settings, &files, &mut enc, &mut opt, be)?;
        truncate_log(&log_path, st.step)?;
        st
    } else {
        std::fs::create_dir_all(&cfg.out).map_err(io_err(&cfg.out))?;
        let marker = json!({
            "format": RUN_FORMAT,
            "what": "a prefix-tuning run of prefix-attn: settings and the size and SHA-256 of every input",
            "run": run,
        });
        write_atomic(
            &cfg.out.join(RUN_MARKER),
            serde_json::to_string_pretty(&marker)
                .unwrap_or_default()
                .as_bytes(),
        )?;
        // What an earlier attempt of this run (stopped before its first checkpoint) left.
        let _ = std::fs::remove_file(&log_path);
        let _ = std::fs::remove_file(cfg.out.join(LOSS_SVG));
        let best = cfg.out.join(BEST);
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "eval.json",
        ] {
            let _ = std::fs::remove_file(best.join(f));
        }
        let _ = std::fs::remove_dir(&best);
        State {
            step: 0,
            order: DataOrder {
                rng: Rng::new(cfg.seed ^ 0xda7a_0de7),
                order: vec![],
                pos: 0,
            },
            losses: vec![],
            evals: vec![],
            best: None,
        }
    };
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_err(&log_path))?;
    let mut log_line = |v: Value| -> Result<()> {
        writeln!(log, "{v}")
            .and_then(|_| log.flush())
            .map_err(io_err(&log_path))
    };

    observer.start(&RunStart {
        step: state.step,
        total,
        resumed: cfg.resume,
        data: data_stats,
        eval_data: eval_stats,
        max_length,
    });
    let mut stepper = Stepper::new(model.as_ref(), enc, opt, be)?;
    let start_step = state.step;
    let mut checkpoint_step = if cfg.resume { Some(state.step) } else { None };
    let t0 = Instant::now();
    let mut tokens_seen = 0usize;
    let report = |state: &State, completed, interrupted, signal, checkpoint_step| TrainReport {
        steps: state.step,
        total,
        steps_run: state.step - start_step,
        first_loss: state.losses.first().copied().unwrap_or(f64::NAN),
        last_loss: state.losses.last().copied().unwrap_or(f64::NAN),
        losses: state.losses.clone(),
        eval_losses: state.evals.clone(),
        best_eval: state.best,
        out: cfg.out.clone(),
        completed,
        interrupted,
        signal,
        checkpoint_step,
    };
    let adapter_config = || {
        let a = AdapterConfig::for_model(g, cfg.prefix_len, cfg.mid_dim);
        let a = if cfg.prefix_projection {
            a
        } else {
            a.without_projection()
        };
        a.base_model(Some(
            cfg.base_model_name
                .clone()
                .unwrap_or_else(|| cfg.model.to_string_lossy().into_owned()),
        ))
    };
    while state.step < total {
        if let Some(i) = cfg.interrupt.as_ref().filter(|i| i.is_requested()) {
            if state.step > start_step {
                save_checkpoint(&ckpt, &run, &state, &stepper.enc, &stepper.opt, be)?;
                checkpoint_step = Some(state.step);
            }
            return Ok(report(&state, false, true, i.signal(), checkpoint_step));
        }
        let idx = state.order.next(n, step_size);
        let batches = idx
            .chunks(cfg.batch_size)
            .map(|part| batch_of(&part.iter().map(|&i| &examples[i]).collect::<Vec<_>>()))
            .collect::<Result<Vec<Batch>>>()?;
        let lr = cfg.schedule.lr(cfg.lr, state.step, total, cfg.warmup_steps);
        let loss = stepper.step_accumulated(be, &batches, lr)?;
        let mean = loss.mean();
        if !mean.is_finite() {
            return Err(Error::Training(format!(
                "step {}: the loss is {mean}; training stopped. The last good checkpoint (step {}) is kept in {}",
                state.step + 1,
                checkpoint_step.unwrap_or(0),
                cfg.out.display()
            )));
        }
        state.step += 1;
        state.losses.push(mean);
        tokens_seen += batches
            .iter()
            .map(|b| b.lens.iter().sum::<usize>())
            .sum::<usize>();
        log_line(json!({"step": state.step, "loss": mean, "lr": lr, "tokens": loss.count}))?;
        let go_on = observer.step(&StepInfo {
            step: state.step,
            total,
            loss: mean,
            lr,
            tokens: loss.count,
            tokens_per_s: tokens_seen as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            start_step,
        });
        // The evaluation of a step comes before its checkpoint, so that a checkpoint always
        // covers the log lines and the best adapter up to its step.
        let last = state.step == total;
        if !eval_examples.is_empty()
            && (last || (cfg.eval_every > 0 && state.step % cfg.eval_every == 0))
        {
            let l = stepper.evaluate(be, &eval_examples, cfg.batch_size)?;
            let eval_loss = l.mean();
            let best = l.count > 0
                && eval_loss.is_finite()
                && state.best.is_none_or(|(_, b)| eval_loss < b);
            state.evals.push((state.step, eval_loss));
            if best {
                state.best = Some((state.step, eval_loss));
                let dir = cfg.out.join(BEST);
                PrefixAdapter {
                    config: adapter_config(),
                    prompt_embeddings: stepper.prefix(be)?,
                }
                .save(&dir)?;
                write_atomic(
                    &dir.join("eval.json"),
                    json!({"step": state.step, "eval_loss": eval_loss, "eval_tokens": l.count})
                        .to_string()
                        .as_bytes(),
                )?;
            }
            log_line(json!({"step": state.step, "eval_loss": eval_loss, "eval_tokens": l.count}))?;
            observer.eval(&EvalInfo {
                step: state.step,
                loss: eval_loss,
                tokens: l.count,
                best,
            });
        }
        if cfg.save_every > 0 && state.step % cfg.save_every == 0 && !last {
            save_checkpoint(&ckpt, &run, &state, &stepper.enc, &stepper.opt, be)?;
            checkpoint_step = Some(state.step);
        }
        if !go_on {
            return Ok(report(&state, false, false, None, checkpoint_step));
        }
    }
    save_checkpoint(&ckpt, &run, &state, &stepper.enc, &stepper.opt, be)?;
    // The adapter holds the encoder's output, as PEFT saves it.
    let prefix = stepper.prefix(be)?;
    PrefixAdapter {
        config: adapter_config(),
        prompt_embeddings: prefix,
    }
    .save(&cfg.out)?;
    stepper.enc.save(&cfg.out.join(ENCODER), be)?;
    if !state.losses.is_empty() {
        write_loss_svg(
            &cfg.out.join(LOSS_SVG),
            &state.losses,
            &state.evals,
            &format!("prefix-tuning loss ({} steps)", state.losses.len()),
        )?;
    }
    Ok(report(&state, true, false, None, Some(state.step)))
}

/// One training step's machinery: the encoder, its optimiser, and the model's workspaces
/// (grown to the largest batch seen and reused: a shorter batch allocates nothing).
pub struct Stepper<'m> {
    model: &'m dyn PrefixLm,
    /// The prefix encoder being trained.
    pub enc: PrefixEncoder,
    /// Its optimiser.
    pub opt: Optimizer,
    eacts: EncoderActs,
    egrads: PrefixEncoder,
    /// The prefix in the model's dtype when that is not f32 (the encoder computes in f32).
    prefix_cast: Option<Tensor>,
    /// The training forward and backward's buffers.
    ws: Workspace,
    /// The evaluation forward's buffers (no gradients).
    eval_ws: Workspace,
    /// The prefix gradient of one micro-batch `[P, L·2·Hkv·D]`, f32.
    d_prefix: Tensor,
    /// The prefix gradient summed over the micro-batches of a step.
    d_accum: Option<Tensor>,
}

impl<'m> Stepper<'m> {
    /// Buffers for training `enc` with `opt` on `model`.
    pub fn new(
        model: &'m dyn PrefixLm,
        enc: PrefixEncoder,
        opt: Optimizer,
        be: &dyn Backend,
    ) -> Result<Stepper<'m>> {
        let eacts = enc.acts(be)?;
        let egrads = PrefixEncoder::zeros(enc.dims, be)?;
        let prefix_cast = if model.dtype() == DType::F32 {
            None
        } else {
            Some(be.zeros(&[enc.dims.prefix_len, enc.dims.out_dim()], model.dtype())?)
        };
        let d_prefix = be.zeros(&[enc.dims.prefix_len, enc.dims.out_dim()], DType::F32)?;
        Ok(Stepper {
            model,
            enc,
            opt,
            eacts,
            egrads,
            prefix_cast,
            ws: Workspace::new(),
            eval_ws: Workspace::new(),
            d_prefix,
            d_accum: None,
        })
    }

    /// Computes the prefix and returns it in the model's dtype.
    fn model_prefix(&mut self, be: &dyn Backend) -> Result<&Tensor> {
        self.enc.forward(be, &mut self.eacts)?;
        // A half-precision model gets the f32 prefix rounded to its dtype (as PEFT casts the
        // encoder output to the base model's dtype); the gradient comes back in f32.
        Ok(match self.prefix_cast.as_mut() {
            Some(cast) => {
                be.copy(&self.eacts.prefix.view(), &mut cast.view_mut())?;
                &*cast
            }
            None => &self.eacts.prefix,
        })
    }

    /// One step on one batch: [`Stepper::step_accumulated`] with one micro-batch.
    pub fn step(&mut self, be: &dyn Backend, batch: &Batch, lr: f64) -> Result<LossSum> {
        self.step_accumulated(be, std::slice::from_ref(batch), lr)
    }

    /// One step over the micro-batches `batches`: the prefix (once), each micro-batch's
    /// summed loss and prefix gradient (summed over them), and, when the loss is finite and
    /// counts tokens, the encoder's backward scaled by `1 / total tokens` and an update at
    /// `lr`. Equal to one step on the union of the batches. Returns the loss before the
    /// update.
    pub fn step_accumulated(
        &mut self,
        be: &dyn Backend,
        batches: &[Batch],
        lr: f64,
    ) -> Result<LossSum> {
        if batches.is_empty() {
            return Err(Error::index("batches", "needs at least one batch"));
        }
        self.model_prefix(be)?;
        let mut total = LossSum { sum: 0.0, count: 0 };
        for batch in batches {
            let prefix = self.prefix_cast.as_ref().unwrap_or(&self.eacts.prefix);
            let loss =
                self.model
                    .loss_and_grad(be, batch, prefix, &mut self.ws, &mut self.d_prefix)?;
            total.sum += loss.sum;
            total.count += loss.count;
            if !loss.sum.is_finite() {
                return Ok(total);
            }
            if loss.count == 0 {
                continue;
            }
            if batches.len() > 1 {
                let acc = match self.d_accum.as_mut() {
                    Some(a) => a,
                    None => self
                        .d_accum
                        .insert(be.zeros(self.d_prefix.dims(), DType::F32)?),
                };
                if total.count == loss.count {
                    // The first micro-batch that counts tokens.
                    be.copy(&self.d_prefix.view(), &mut acc.view_mut())?;
                } else {
                    be.axpy(&mut acc.view_mut(), 1.0, &self.d_prefix.view())?;
                }
            }
        }
        if total.mean().is_finite() && total.count > 0 {
            let d_prefix = match (&self.d_accum, batches.len() > 1) {
                (Some(acc), true) => acc,
                _ => &self.d_prefix,
            };
            self.enc.backward(
                be,
                &mut self.eacts,
                d_prefix,
                1.0 / total.count as f32,
                &mut self.egrads,
            )?;
            self.opt
                .update(be, &mut self.enc.params, &self.egrads.params, lr)?;
        }
        Ok(total)
    }

    /// The summed loss of `examples` with the current prefix.
    pub fn evaluate(
        &mut self,
        be: &dyn Backend,
        examples: &[Example],
        batch_size: usize,
    ) -> Result<LossSum> {
        self.model_prefix(be)?;
        let prefix = self.prefix_cast.as_ref().unwrap_or(&self.eacts.prefix);
        evaluate_in(
            self.model,
            be,
            Some(prefix),
            examples,
            batch_size,
            &mut self.eval_ws,
        )
    }

    /// The current prefix `[P, L·2·C]` on the host.
    pub fn prefix(&mut self, be: &dyn Backend) -> Result<Vec<f32>> {
        self.enc.forward(be, &mut self.eacts)?;
        Ok(be.download(&self.eacts.prefix)?.to_f32_vec())
    }
}

/// The step of the checkpoint in `out`, if there is one of ours.
pub fn checkpoint_step(out: &Path) -> Option<usize> {
    let meta = crate::io::safetensors_metadata(&out.join(CHECKPOINT)).ok()?;
    let st: Value = serde_json::from_str(meta.get("state")?).ok()?;
    st.get("step").and_then(Value::as_u64).map(|s| s as usize)
}

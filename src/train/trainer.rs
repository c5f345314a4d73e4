//! The prefix-tuning training loop: MLP-reparameterised prefixes on a frozen GPT-2, with
//! checkpoints that make a resumed run end with exactly the adapter of an uninterrupted one.
//!
//! Every step: the encoder computes the prefix once; the model's forward gives the summed
//! token loss of the batch and its backward the prefix gradient of that sum; the encoder's
//! backward scales it by `1 / tokens` (the mean loss, DESIGN.md §2) and the optimiser
//! updates the five encoder parameters.

use super::data::{batch_of, load_jsonl, DataLimits, Example};
use super::optim::{Optimizer, OptimizerKind, Schedule};
use super::plot::write_loss_svg;
use crate::device::Backend;
use crate::error::{Error, Result};
use crate::gpt2::tokenizer::Tokenizer;
use crate::gpt2::{Activations, Batch, Gpt2, Gradients, LossSum};
use crate::io::{write_safetensors_f32_meta, SafetensorsFile};
use crate::prefix::encoder::{EncoderActs, EncoderDims, PrefixEncoder, PARAM_NAMES};
use crate::prefix::{AdapterConfig, PrefixAdapter};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How long to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Length {
    /// A number of optimiser steps.
    Steps(usize),
    /// A number of passes over the data.
    Epochs(usize),
}

/// Everything a training run is configured with.
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
    /// MLP width `E`.
    pub mid_dim: usize,
    /// Steps or epochs.
    pub length: Length,
    /// Sequences per step.
    pub batch_size: usize,
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
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct TrainReport {
    /// Steps done in total.
    pub steps: usize,
    /// Steps done by this invocation.
    pub steps_run: usize,
    /// Loss of the first step's batch.
    pub first_loss: f64,
    /// Loss of the last step's batch.
    pub last_loss: f64,
    /// Per-step losses, from step 1.
    pub losses: Vec<f64>,
    /// Output folder.
    pub out: PathBuf,
    /// Whether the run reached its last step (false: stopped by the caller).
    pub completed: bool,
}

/// File names inside the output folder.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
/// The encoder weights with PEFT names.
pub const ENCODER: &str = "prefix_encoder.safetensors";
/// The loss picture.
pub const LOSS_SVG: &str = "loss.svg";
/// The default log.
pub const LOG: &str = "log.jsonl";

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

/// What identifies a run: a resume must match it.
fn run_identity(cfg: &TrainConfig, total: usize) -> Value {
    json!({
        "model": cfg.model.to_string_lossy(),
        "data": cfg.data.to_string_lossy(),
        "init": cfg.init.as_ref().map(|p| p.to_string_lossy().into_owned()),
        "prefix_len": cfg.prefix_len,
        "mid_dim": cfg.mid_dim,
        "total_steps": total,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "schedule": format!("{:?}", cfg.schedule),
        "warmup_steps": cfg.warmup_steps,
        "optimizer": format!("{:?}", cfg.optimizer),
        "seed": cfg.seed,
    })
}

struct State {
    step: usize,
    order: DataOrder,
    losses: Vec<f64>,
}

fn save_checkpoint(
    path: &Path,
    identity: &Value,
    state: &State,
    enc: &PrefixEncoder,
    opt: &Optimizer,
    be: &dyn Backend,
) -> Result<()> {
    let host = |t: &crate::tensor::Tensor| be.download(t).map(|t| t.to_f32_vec());
    let mut names = vec![];
    let mut data = vec![];
    let shapes = enc.dims.shapes();
    for (i, n) in PARAM_NAMES.iter().enumerate() {
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
    });
    let mut meta = HashMap::new();
    meta.insert("run".to_string(), identity.to_string());
    meta.insert("state".to_string(), st.to_string());
    meta.insert("format".to_string(), "prefix-attn checkpoint 1".to_string());
    write_safetensors_f32_meta(path, &entries, Some(meta))
}

fn load_checkpoint(
    path: &Path,
    identity: &Value,
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
    let run: Value = serde_json::from_str(meta.get("run").map_or("", String::as_str))
        .map_err(|_| bad("not a prefix-attn checkpoint (no run metadata)".into()))?;
    if &run != identity {
        let diffs: Vec<String> = identity
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| run.get(k.as_str()) != Some(v))
            .map(|(k, v)| {
                format!(
                    "{k}: checkpoint {} vs now {v}",
                    run.get(k.as_str()).unwrap_or(&Value::Null)
                )
            })
            .collect();
        return Err(bad(format!(
            "belongs to a run with other settings ({}); resume with the same settings or use another --out",
            diffs.join("; ")
        )));
    }
    let st: Value = serde_json::from_str(meta.get("state").map_or("", String::as_str))
        .map_err(|_| bad("checkpoint state is missing or malformed".into()))?;
    let num = |k: &str| {
        st.get(k)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(format!("state field {k:?} missing")))
    };
    let rng: Vec<u64> = serde_json::from_value(st["rng"].clone())
        .map_err(|_| bad("state field \"rng\" malformed".into()))?;
    let order: Vec<usize> = serde_json::from_value(st["order"].clone())
        .map_err(|_| bad("state field \"order\" malformed".into()))?;
    let losses: Vec<f64> = serde_json::from_value(st["losses"].clone())
        .map_err(|_| bad("state field \"losses\" malformed".into()))?;
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
    for (i, n) in PARAM_NAMES.iter().enumerate() {
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
    crate::io::write_atomic(path, kept.as_bytes())
}

/// Runs (or resumes) a training run; `on_step` sees every step and returns whether to go
/// on. Stopping early behaves like a killed process: nothing more is written, and the run
/// can be resumed from its last checkpoint.
pub fn train(
    cfg: &TrainConfig,
    be: &dyn Backend,
    on_step: &mut dyn FnMut(&StepInfo) -> bool,
) -> Result<TrainReport> {
    if cfg.batch_size == 0 {
        return Err(Error::index("--batch-size", "must be at least 1"));
    }
    if cfg.prefix_len == 0 || cfg.mid_dim == 0 {
        return Err(Error::index("--prefix-len/--mid-dim", "must be at least 1"));
    }
    if !(cfg.lr.is_finite() && cfg.lr >= 0.0) {
        return Err(Error::index(
            "--lr",
            format!("{}, expected a non-negative number", cfg.lr),
        ));
    }
    let model = Gpt2::load(&cfg.model, be)?;
    let c = model.config.clone();
    if cfg.prefix_len >= c.n_positions {
        return Err(Error::index(
            "--prefix-len",
            format!(
                "{} leaves no position of n_positions = {}",
                cfg.prefix_len, c.n_positions
            ),
        ));
    }
    let tokenizer = Tokenizer::load_optional(&cfg.model)?;
    let eos = c
        .eos_token_id
        .or_else(|| tokenizer.as_ref().and_then(|t| t.token_id("<|endoftext|>")));
    let limits = DataLimits {
        vocab_size: c.vocab_size,
        max_len: c.n_positions - cfg.prefix_len,
    };
    let examples = load_jsonl(&cfg.data, tokenizer.as_ref(), eos, limits)?;
    let n = examples.len();
    let steps_per_epoch = n.div_ceil(cfg.batch_size);
    let total = match cfg.length {
        Length::Steps(s) => s,
        Length::Epochs(e) => e * steps_per_epoch,
    };
    let dims = EncoderDims {
        prefix_len: cfg.prefix_len,
        token_dim: c.n_embd,
        hidden: cfg.mid_dim,
        num_layers: c.n_layer,
    };
    let mut enc = match &cfg.init {
        Some(p) => PrefixEncoder::load(p, dims, be)?,
        None => PrefixEncoder::init(dims, cfg.seed, be)?,
    };
    let mut opt = Optimizer::new(cfg.optimizer, &dims.shapes(), be)?;
    std::fs::create_dir_all(&cfg.out).map_err(|source| Error::Io {
        path: cfg.out.clone(),
        source,
    })?;
    let ckpt = cfg.out.join(CHECKPOINT);
    let identity = run_identity(cfg, total);
    let log_path = cfg.log.clone().unwrap_or_else(|| cfg.out.join(LOG));
    let mut state = if cfg.resume {
        if !ckpt.exists() {
            return Err(Error::Format {
                path: ckpt,
                msg: "--resume: no checkpoint to resume from".into(),
            });
        }
        let st = load_checkpoint(&ckpt, &identity, &mut enc, &mut opt, be)?;
        truncate_log(&log_path, st.step)?;
        st
    } else {
        for f in [CHECKPOINT, "adapter_config.json", ENCODER] {
            if cfg.out.join(f).exists() {
                return Err(Error::Format {
                    path: cfg.out.clone(),
                    msg: format!(
                        "already holds a run ({f}); pass --resume to continue it, or choose another --out"
                    ),
                });
            }
        }
        let _ = std::fs::remove_file(&log_path);
        State {
            step: 0,
            order: DataOrder {
                rng: Rng::new(cfg.seed ^ 0xda7a_0de7),
                order: vec![],
                pos: 0,
            },
            losses: vec![],
        }
    };
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| Error::Io {
            path: log_path.clone(),
            source,
        })?;

    let mut stepper = Stepper::new(&model, enc, opt, be)?;
    let start_step = state.step;
    let t0 = Instant::now();
    let mut tokens_seen = 0usize;
    while state.step < total {
        let idx = state.order.next(n, cfg.batch_size);
        let refs: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
        let batch = batch_of(&refs)?;
        let lr = cfg.schedule.lr(cfg.lr, state.step, total, cfg.warmup_steps);
        let loss = stepper.step(be, &batch, lr)?;
        let mean = loss.mean();
        if !mean.is_finite() {
            return Err(Error::Training(format!(
                "step {}: the loss is {mean}; training stopped. The last good checkpoint (step {}) is kept in {}",
                state.step + 1,
                if ckpt.exists() { load_step(&ckpt).unwrap_or(0) } else { 0 },
                cfg.out.display()
            )));
        }
        state.step += 1;
        state.losses.push(mean);
        tokens_seen += batch.lens.iter().sum::<usize>();
        let line = json!({"step": state.step, "loss": mean, "lr": lr, "tokens": loss.count});
        writeln!(log, "{line}")
            .and_then(|_| log.flush())
            .map_err(|source| Error::Io {
                path: log_path.clone(),
                source,
            })?;
        if cfg.save_every > 0 && state.step % cfg.save_every == 0 && state.step < total {
            save_checkpoint(&ckpt, &identity, &state, &stepper.enc, &stepper.opt, be)?;
        }
        let go_on = on_step(&StepInfo {
            step: state.step,
            total,
            loss: mean,
            lr,
            tokens: loss.count,
            tokens_per_s: tokens_seen as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        });
        if !go_on {
            return Ok(TrainReport {
                steps: state.step,
                steps_run: state.step - start_step,
                first_loss: state.losses.first().copied().unwrap_or(f64::NAN),
                last_loss: mean,
                losses: state.losses,
                out: cfg.out.clone(),
                completed: false,
            });
        }
    }
    save_checkpoint(&ckpt, &identity, &state, &stepper.enc, &stepper.opt, be)?;
    // The adapter holds the encoder's output, as PEFT saves it.
    let prefix = stepper.prefix(be)?;
    PrefixAdapter {
        config: AdapterConfig::for_model(&c, cfg.prefix_len, cfg.mid_dim),
        prompt_embeddings: prefix,
    }
    .save(&cfg.out)?;
    stepper.enc.save(&cfg.out.join(ENCODER), be)?;
    write_loss_svg(
        &cfg.out.join(LOSS_SVG),
        &state.losses,
        &format!("prefix-tuning loss ({} steps)", state.losses.len()),
    )?;
    Ok(TrainReport {
        steps: state.step,
        steps_run: state.step - start_step,
        first_loss: state.losses.first().copied().unwrap_or(f64::NAN),
        last_loss: state.losses.last().copied().unwrap_or(f64::NAN),
        losses: state.losses,
        out: cfg.out.clone(),
        completed: true,
    })
}

/// One training step's machinery: the encoder, its optimiser, and buffers reused while the
/// batch shape stays the same.
pub struct Stepper<'m> {
    model: &'m Gpt2,
    /// The prefix encoder being trained.
    pub enc: PrefixEncoder,
    /// Its optimiser.
    pub opt: Optimizer,
    eacts: EncoderActs,
    egrads: PrefixEncoder,
    /// The prefix in the model's dtype when that is not f32 (the encoder computes in f32).
    prefix_cast: Option<Tensor>,
    bufs: Option<((usize, usize), Activations, Gradients)>,
}

impl<'m> Stepper<'m> {
    /// Buffers for training `enc` with `opt` on `model`.
    pub fn new(
        model: &'m Gpt2,
        enc: PrefixEncoder,
        opt: Optimizer,
        be: &dyn Backend,
    ) -> Result<Stepper<'m>> {
        let eacts = enc.acts(be)?;
        let egrads = PrefixEncoder::zeros(enc.dims, be)?;
        let prefix_cast = if model.dtype == DType::F32 {
            None
        } else {
            Some(be.zeros(&[enc.dims.prefix_len, enc.dims.out_dim()], model.dtype)?)
        };
        Ok(Stepper {
            model,
            enc,
            opt,
            eacts,
            egrads,
            prefix_cast,
            bufs: None,
        })
    }

    /// One step: the prefix (once, for the whole batch), the batch's summed loss, and, when
    /// that loss is finite and counts tokens, the backward and an update at `lr`. Returns the
    /// loss before the update.
    pub fn step(&mut self, be: &dyn Backend, batch: &Batch, lr: f64) -> Result<LossSum> {
        let shape = (batch.batch_size, batch.seq_len);
        if self.bufs.as_ref().map(|b| b.0) != Some(shape) {
            self.bufs = None; // free the old buffers before allocating new ones
            let acts = Activations::new(self.model, be, shape.0, shape.1, true)?.counted_only();
            let grads = Gradients::new(self.model, be, shape.0, shape.1, self.enc.dims.prefix_len)?;
            self.bufs = Some((shape, acts, grads));
        }
        let Some((_, acts, grads)) = self.bufs.as_mut() else {
            return Err(Error::index("batch", "no buffers"));
        };
        self.enc.forward(be, &mut self.eacts)?;
        // A half-precision model gets the f32 prefix rounded to its dtype (as PEFT casts the
        // encoder output to the base model's dtype); the gradient comes back in f32.
        let prefix = match self.prefix_cast.as_mut() {
            Some(cast) => {
                be.copy(&self.eacts.prefix.view(), &mut cast.view_mut())?;
                &*cast
            }
            None => &self.eacts.prefix,
        };
        let loss = self.model.forward(be, batch, Some(prefix), acts, None)?;
        if loss.mean().is_finite() && loss.count > 0 {
            self.model.backward(be, batch, prefix, acts, grads)?;
            self.enc.backward(
                be,
                &mut self.eacts,
                &grads.d_prefix,
                1.0 / loss.count as f32,
                &mut self.egrads,
            )?;
            self.opt
                .update(be, &mut self.enc.params, &self.egrads.params, lr)?;
        }
        Ok(loss)
    }

    /// The current prefix `[P, L·2·C]` on the host.
    pub fn prefix(&mut self, be: &dyn Backend) -> Result<Vec<f32>> {
        self.enc.forward(be, &mut self.eacts)?;
        Ok(be.download(&self.eacts.prefix)?.to_f32_vec())
    }
}

fn load_step(ckpt: &Path) -> Result<usize> {
    let meta = SafetensorsFile::open(ckpt)?.metadata()?;
    let st: Value =
        serde_json::from_str(meta.get("state").map_or("", String::as_str)).unwrap_or(Value::Null);
    Ok(st.get("step").and_then(Value::as_u64).unwrap_or(0) as usize)
}

//! What several commands share: the device flag, the model + adapter + tokenizer loading,
//! the truncation flags, and the progress display of a training run.

use prefix_attn::device::{Backend, Device};
use prefix_attn::lm::{self, PrefixLm};
use prefix_attn::prefix::PrefixAdapter;
use prefix_attn::tensor::{DType, Tensor};
use prefix_attn::tokenizer::Tokenizer;
use prefix_attn::train::data::{DataStats, Truncation};
use prefix_attn::train::trainer::{EvalInfo, RunStart, TrainObserver};
use prefix_attn::train::StepInfo;
use prefix_attn::{Error, Result};
use std::path::{Path, PathBuf};

/// The device flag's help, shared by every command that runs the model.
pub(super) const DEVICE_HELP: &str =
    "Device: cpu, cuda[:N], emu (the CUDA kernels on the CPU emulator; slow) or auto";

/// `--truncate` and `--max-length` as the data loader takes them.
pub(super) fn truncation(truncate: Option<&str>, max_length: Option<usize>) -> Result<Truncation> {
    match (truncate, max_length) {
        (Some(t), _) => t.parse(),
        (None, Some(_)) => Ok(Truncation::Right),
        (None, None) => Ok(Truncation::Error),
    }
}

/// What the command line shows of a run: a progress bar on a terminal (plain lines
/// otherwise), the resume point, truncation, evaluations.
pub(super) struct Progress {
    tty: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub(super) fn new() -> Progress {
        use std::io::IsTerminal;
        Progress {
            tty: std::io::stderr().is_terminal(),
            bar: None,
        }
    }

    fn say(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    /// Leaves the bar as it is and moves what follows to a line of its own.
    pub(super) fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.abandon();
            eprintln!();
        }
    }
}

pub(super) fn say_truncated(what: &str, s: &DataStats, max_length: usize) {
    if s.truncated > 0 {
        eprintln!(
            "{what}: {} of {} examples truncated to {max_length} tokens ({} tokens dropped)",
            s.truncated, s.examples, s.tokens_dropped
        );
    }
}

impl TrainObserver for Progress {
    fn start(&mut self, s: &RunStart) {
        say_truncated("--data", &s.data, s.max_length);
        if let Some(e) = &s.eval_data {
            say_truncated("--eval-data", e, s.max_length);
        }
        if s.resumed {
            eprintln!("resuming at step {} of {}", s.step, s.total);
        }
        if self.tty && s.total > 0 {
            let b = indicatif::ProgressBar::new(s.total as u64).with_position(s.step as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len}  {msg}  eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            // The estimator has seen the jump to the resume point; it starts from here.
            b.tick();
            b.reset_eta();
            self.bar = Some(b);
        }
    }

    fn step(&mut self, s: &StepInfo) -> bool {
        if let Some(b) = &self.bar {
            b.set_message(format!("loss {:.4}  {:.0} tok/s", s.loss, s.tokens_per_s));
            b.set_position(s.step as u64);
        } else if s.step == s.total
            || s.step % (s.total / 20).max(1) == 0
            || s.step == s.start_step + 1
        {
            eprintln!(
                "step {}/{}  loss {:.4}  lr {:.3e}  {:.0} tok/s",
                s.step, s.total, s.loss, s.lr, s.tokens_per_s
            );
        }
        true
    }

    fn eval(&mut self, e: &EvalInfo) {
        self.say(&format!(
            "step {}: held-out loss {:.4} over {} tokens{}",
            e.step,
            e.loss,
            e.tokens,
            if e.best { " (best so far: best/)" } else { "" }
        ));
    }
}

/// A backend for a `--device` value: `cpu`, `cuda`/`cuda:N`, `emu` (the CUDA kernels on the
/// CPU emulator: a test instrument, slow) or `auto` (CUDA when a device is usable, else the
/// CPU; it says which on stderr).
pub(super) fn backend_for(device: &str) -> Result<Box<dyn Backend>> {
    if device == "auto" {
        if prefix_attn::device::cuda::device_count() > 0 {
            match prefix_attn::device::cuda::CudaBackend::new(0) {
                Ok(be) => {
                    eprintln!("device auto: {}", be.describe());
                    return Ok(Box::new(be));
                }
                Err(e) => eprintln!("device auto: CUDA not usable ({e}); using the cpu"),
            }
        } else {
            eprintln!("device auto: no CUDA device; using the cpu");
        }
        return prefix_attn::device::backend(Device::Cpu);
    }
    prefix_attn::device::backend(parse_device(device)?)
}

/// A `--device` value (`auto` is handled by [`backend_for`]).
pub(super) fn parse_device(device: &str) -> Result<Device> {
    device.parse().map_err(|_| {
        Error::index(
            "--device",
            format!("{device:?}: expected cpu, cuda, cuda:N, emu or auto"),
        )
    })
}

/// The model, its tokenizer and the adapter's prefix, loaded and checked against each other.
pub(super) struct Loaded {
    pub(super) model: Box<dyn PrefixLm>,
    pub(super) tokenizer: Option<Tokenizer>,
    pub(super) prefix: Option<Tensor>,
    pub(super) eos: Option<u32>,
}

/// Loads `--model` (its family by `model_type`), its tokenizer and `--adapter`'s prefix.
pub(super) fn load(model_dir: &Path, adapter: Option<&Path>, be: &dyn Backend) -> Result<Loaded> {
    let model = lm::load(model_dir, be)?;
    let tokenizer = Tokenizer::for_model(model_dir, model.geometry().vocab_size)?;
    let prefix = match adapter {
        Some(dir) => Some(PrefixAdapter::load_for(dir, model.as_ref(), be)?),
        None => None,
    };
    let eos = model
        .eos_token_id()
        .or_else(|| tokenizer.as_ref().and_then(|t| t.token_id("<|endoftext|>")));
    Ok(Loaded {
        model,
        tokenizer,
        prefix,
        eos,
    })
}

/// Token ids from `--input-ids`: integers separated by commas and/or whitespace, optionally
/// in brackets.
pub(super) fn parse_ids(s: &str) -> Result<Vec<u32>> {
    let inner = s.trim();
    let inner = inner
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(inner);
    let ids = inner
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>().map_err(|_| {
                Error::index(
                    "--input-ids",
                    format!("{t:?} is not a token id (expected non-negative integers separated by commas or spaces)"),
                )
            })
        })
        .collect::<Result<Vec<u32>>>()?;
    if ids.is_empty() {
        return Err(Error::index("--input-ids", "no token ids given"));
    }
    Ok(ids)
}

pub(super) fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(Error::Unsupported(format!(
            "--dtype {s}: expected f32, f16 or bf16"
        ))),
    }
}

/// `--adapter` values: (name, folder).
pub(super) fn adapter_specs(values: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for v in values {
        let (name, dir) = match v.split_once('=') {
            Some((n, d)) if !n.is_empty() && !d.is_empty() => (n.to_string(), PathBuf::from(d)),
            Some(_) => {
                return Err(Error::index(
                    "--adapter",
                    format!("{v:?}: expected DIR or NAME=DIR"),
                ))
            }
            None => {
                let dir = PathBuf::from(v);
                let name = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| {
                        Error::index("--adapter", format!("{v:?}: name it with NAME={v}"))
                    })?;
                (name, dir)
            }
        };
        if out.iter().any(|(n, _)| *n == name) {
            return Err(Error::index(
                "--adapter",
                format!("two adapters named {name:?}: name them with NAME=DIR"),
            ));
        }
        out.push((name, dir));
    }
    Ok(out)
}

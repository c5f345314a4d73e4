//! Optimisers for the prefix encoder (AdamW exactly as `torch.optim.AdamW`, and SGD) and the
//! learning-rate schedules of Hugging Face's `get_{constant,linear}_schedule_with_warmup`.

use crate::device::{AdamWStep, Backend};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use std::str::FromStr;

/// Which optimiser.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    /// AdamW with betas, eps and decoupled weight decay.
    AdamW {
        /// First-moment decay (torch default 0.9).
        beta1: f64,
        /// Second-moment decay (torch default 0.999).
        beta2: f64,
        /// Added after the square root (torch default 1e-8).
        eps: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
    /// Plain SGD (momentum 0); weight decay is added to the gradient, as torch does.
    Sgd {
        /// L2 weight decay.
        weight_decay: f64,
    },
}

/// Learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Constant after the warm-up.
    Constant,
    /// Linear decay to 0 at the last step, after the warm-up.
    Linear,
}

impl FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Schedule> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            _ => Err(Error::Unsupported(format!(
                "--lr-schedule {s}: expected constant or linear"
            ))),
        }
    }
}

impl Schedule {
    /// Learning rate of the update with 0-based index `step` of `total` (Hugging Face's
    /// `LambdaLR` factor at `step`): `step / warmup` during the warm-up, then 1 (constant)
    /// or `(total - step) / (total - warmup)` (linear).
    pub fn lr(self, base: f64, step: usize, total: usize, warmup: usize) -> f64 {
        if step < warmup {
            return base * step as f64 / warmup.max(1) as f64;
        }
        match self {
            Schedule::Constant => base,
            Schedule::Linear => {
                base * (0f64).max((total as f64 - step as f64) / (total - warmup).max(1) as f64)
            }
        }
    }
}

/// Optimiser state for a list of f32 parameters.
#[derive(Debug)]
pub struct Optimizer {
    /// The optimiser and its hyper-parameters.
    pub kind: OptimizerKind,
    /// First moments (AdamW), one per parameter.
    pub m: Vec<Tensor>,
    /// Second moments (AdamW), one per parameter.
    pub v: Vec<Tensor>,
    /// Updates done so far.
    pub step: u64,
}

impl Optimizer {
    /// Fresh state for parameters of these shapes.
    pub fn new(kind: OptimizerKind, shapes: &[Vec<usize>], be: &dyn Backend) -> Result<Optimizer> {
        let zeros =
            || -> Result<Vec<Tensor>> { shapes.iter().map(|s| be.zeros(s, DType::F32)).collect() };
        let (m, v) = match kind {
            OptimizerKind::AdamW { .. } => (zeros()?, zeros()?),
            OptimizerKind::Sgd { .. } => (vec![], vec![]),
        };
        Ok(Optimizer {
            kind,
            m,
            v,
            step: 0,
        })
    }

    /// One update of `params` with `grads` at learning rate `lr`.
    pub fn update(
        &mut self,
        be: &dyn Backend,
        params: &mut [Tensor],
        grads: &[Tensor],
        lr: f64,
    ) -> Result<()> {
        if params.len() != grads.len() {
            return Err(Error::shape(
                "grads",
                format!("{} tensors", params.len()),
                &[grads.len()],
            ));
        }
        self.step += 1;
        match self.kind {
            OptimizerKind::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let hp = AdamWStep {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    step: self.step,
                };
                for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
                    be.adamw(
                        &mut p.view_mut(),
                        &g.view(),
                        &mut self.m[i].view_mut(),
                        &mut self.v[i].view_mut(),
                        hp,
                    )?;
                }
            }
            OptimizerKind::Sgd { weight_decay } => {
                for (p, g) in params.iter_mut().zip(grads) {
                    if weight_decay != 0.0 {
                        // p -= lr (g + wd p)  ==  p *= 1 - lr wd; p -= lr g
                        be.scale(&mut p.view_mut(), (1.0 - lr * weight_decay) as f32)?;
                    }
                    be.axpy(&mut p.view_mut(), -(lr as f32), &g.view())?;
                }
            }
        }
        Ok(())
    }
}

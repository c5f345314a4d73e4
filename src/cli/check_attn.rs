//! `prefix-attn check-attn`: prefix attention on random inputs against the f64 oracle and
//! the naive concat.

use super::common::{parse_device, parse_dtype, DEVICE_HELP};
use prefix_attn::attn::cpu;
use prefix_attn::attn::oracle::{Dense, Precision};
use prefix_attn::attn::shapes;
use prefix_attn::attn::testing::{
    random_spec, FwdBuffers, GradBuffers, ProblemSpec, RandomProblem,
};
use prefix_attn::bench::{naive, shape_spec};
use prefix_attn::device::{cpu::CpuBackend, Device};
use prefix_attn::rng::Rng;
use prefix_attn::{Error, Result};
use std::time::Instant;

// The arguments of `check-attn`.
#[derive(clap::Args)]
pub(super) struct CheckAttnArgs {
    /// A named shape (see `shapes`), CPU-scaled; without it, random small shapes.
    #[arg(long)]
    pub(super) shape: Option<String>,
    /// Number of random shapes when no `--shape` is given.
    #[arg(long, default_value_t = 20)]
    pub(super) count: usize,
    /// Element type: f32, f16 or bf16.
    #[arg(long, default_value = "f16")]
    pub(super) dtype: String,
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
    pub(super) device: String,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
}

/// Runs `check-attn` and prints the worst errors as one JSON object.
pub(super) fn run(args: CheckAttnArgs) -> Result<()> {
    let CheckAttnArgs {
        shape,
        count,
        dtype,
        device,
        seed,
    } = args;
    let device: Device = parse_device(&device)?;
    if device != Device::Cpu {
        prefix_attn::device::backend(device)?;
    }
    let dtype = parse_dtype(&dtype)?;
    let mut rng = Rng::new(seed);
    let specs: Vec<ProblemSpec> = match shape {
        Some(name) => {
            let s = shapes::by_name(&name).ok_or_else(|| {
                Error::Unsupported(format!(
                    "--shape {name}: expected one of {}",
                    shapes::SHAPES.map(|s| s.name).join(", ")
                ))
            })?;
            vec![shape_spec(s.cpu_scaled(), dtype)]
        }
        None => (0..count).map(|_| random_spec(&mut rng, dtype)).collect(),
    };
    let mut worst = [0f64; 4];
    let mut fused_s = 0f64;
    let mut naive_s = 0f64;
    for spec in specs {
        let pb = RandomProblem::new(spec, &mut rng)?;
        let args = pb.args()?;
        let x = Dense::from_args(&args)?;
        let exact = x.forward(Precision::Exact);
        let mut f = FwdBuffers::poisoned(&pb.spec)?;
        let t = Instant::now();
        cpu::forward(&args, f.out())?;
        fused_s += t.elapsed().as_secs_f64();
        let mut n = FwdBuffers::poisoned(&pb.spec)?;
        let t = Instant::now();
        naive::forward(&CpuBackend, &args, n.out())?;
        naive_s += t.elapsed().as_secs_f64();
        let d_o: Vec<f64> = pb.d_o.to_f32_vec().into_iter().map(f64::from).collect();
        let eg = x.backward(&d_o, Precision::Exact);
        let mut g = GradBuffers::poisoned(&pb.spec)?;
        cpu::backward(
            &pb.bwd_args(&f.o, &f.lse, false)?,
            g.grads(args.prefix.is_some(), false),
        )?;
        let err = |got: Vec<f32>, want: &[f64]| {
            got.iter().zip(want).fold(0f64, |m, (&g, &w)| {
                if g as f64 == w {
                    m
                } else {
                    m.max((g as f64 - w).abs())
                }
            })
        };
        worst[0] = worst[0].max(err(f.o.to_f32_vec(), &exact.o));
        worst[1] = worst[1].max(err(n.o.to_f32_vec(), &exact.o));
        worst[2] = worst[2].max(err(g.dq.to_f32_vec(), &eg.dq));
        if args.prefix.is_some() {
            worst[3] = worst[3].max(err(g.dk_pre.to_f32_vec(), &eg.dk_pre));
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "device": device.to_string(),
            "dtype": dtype.name(),
            "max_err_o_fused": worst[0],
            "max_err_o_naive": worst[1],
            "max_err_dq": worst[2],
            "max_err_dk_pre": worst[3],
            "fused_fwd_seconds": fused_s,
            "naive_fwd_seconds": naive_s,
        })
    );
    Ok(())
}

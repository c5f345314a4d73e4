//! `prefix-attn bench attn`, `bench step`, `bench decode`, `bench decode-kernel` and `bench serve`.

use super::common::{backend_for, parse_device, DEVICE_HELP};
use clap::Subcommand;
use prefix_attn::attn::shapes::{self, NamedShape};
use prefix_attn::bench::{bench_attn_cpu, bench_attn_device, bench_step, cpu_ceilings, StepBench};
use prefix_attn::device::cuda::CudaBackend;
use prefix_attn::device::{Backend, Device};
use prefix_attn::{Error, Result};

/// What to benchmark.
#[derive(Subcommand)]
pub(super) enum BenchCmd {
    /// Time fused prefix attention against the naive concat on the named shapes (CPU-scaled
    /// on the CPU) with FLOP/s, GB/s and the fraction of the measured roofline.
    Attn(AttnArgs),
    /// Time full training steps (forward, backward, AdamW) on a random-weight model.
    Step(StepArgs),
    /// Tokens per second of batched generation over many adapters (the engine) against one
    /// request at a time, one adapter, no prefix and the naive copied-prefix cache.
    Decode(DecodeArgs),
    /// Time the paged-decode kernel alone at the `decode` shape (32/8 heads of 128, 2,048
    /// cached keys in pages of 16, P = 64, fp16, one new token) for several batch sizes: GB/s
    /// against a copy measured on the spot, and the H200 goals (B ≥ 64: 80 % of the
    /// copy; B ≤ 4, split over keys: 50 %).
    DecodeKernel(DecodeKernelArgs),
    /// Load-test `prefix-attn serve`: throughput and p50/p99 latency at several concurrency
    /// levels, with 1, 8 and 1,000 adapters in the served directory (one server process
    /// each, driven over HTTP on loopback).
    Serve(ServeArgs),
}

// The arguments of `bench serve`.
#[derive(clap::Args)]
pub(super) struct ServeArgs {
    /// tiny or gpt2-small (12 layers, 12 heads of 64, vocab 50,257).
    #[arg(long, default_value = "gpt2-small")]
    shape: String,
    /// Concurrency levels, comma-separated (clients sending requests back to back).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    concurrency: Vec<usize>,
    /// Adapter counts in the served directory, comma-separated (one server each).
    #[arg(long, value_delimiter = ',', default_value = "1,8,1000")]
    adapters: Vec<usize>,
    /// Requests per concurrency level [default: max(16, 4 × concurrency)].
    #[arg(long)]
    requests: Option<usize>,
    /// Prompt tokens per request (random ids).
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    /// max_tokens of every (greedy) request.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Virtual tokens per adapter.
    #[arg(long, default_value_t = 10)]
    prefix_len: usize,
    /// Slots of each server's prefix table (serve --max-adapters).
    #[arg(long, default_value_t = 64)]
    max_adapters: usize,
    /// Sequences per engine step (serve --max-batch).
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Repetitions of every configuration, interleaved (the median is reported).
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Where to write the model and adapters [default: a temporary folder, removed after].
    #[arg(long)]
    workdir: Option<std::path::PathBuf>,
    /// Print one JSON object per configuration.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
    device: String,
}

// The arguments of `bench decode`.
#[derive(clap::Args)]
pub(super) struct DecodeArgs {
    /// tiny, gpt2-small (12 layers, 12 heads of 64, vocab 50,257) or qwen2-0.5b (24 layers,
    /// 14 query heads over 2 KV heads of 64, vocab 151,936).
    #[arg(long, default_value = "tiny")]
    shape: String,
    /// Concurrent requests.
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// Adapters the requests are spread over.
    #[arg(long, default_value_t = 8)]
    adapters: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    /// New tokens per request.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Timed runs per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print one JSON object per configuration.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
    device: String,
}

// The arguments of `bench decode-kernel`.
#[derive(clap::Args)]
pub(super) struct DecodeKernelArgs {
    /// Batch sizes, comma-separated [default: 1,2,4,64 on a GPU, 1,4 on the cpu].
    #[arg(long, value_delimiter = ',')]
    batches: Vec<usize>,
    /// Timed calls per batch size (the median is reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Device: cpu, cuda[:N] or auto; never the emulator.
    #[arg(long, default_value = "cpu")]
    device: String,
}

// The arguments of `bench attn`.
#[derive(clap::Args)]
pub(super) struct AttnArgs {
    /// A named shape (see `shapes`), or all of them.
    #[arg(long, default_value = "all")]
    shape: String,
    /// Timed repetitions per measurement (median reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Device: cpu (CPU-scaled shapes), cuda[:N] (full shapes) or auto; never the emulator.
    #[arg(long, default_value = "cpu")]
    device: String,
}

// The arguments of `bench step`.
#[derive(clap::Args)]
pub(super) struct StepArgs {
    /// tiny, gpt2-small or qwen2-0.5b (Qwen2-0.5B's shape: 24 layers, 896 wide, 14/2 heads of 64, vocab 151,936).
    #[arg(long, default_value = "tiny")]
    shape: String,
    /// Sequences per step [default: the shape's].
    #[arg(long, alias = "batch")]
    batch_size: Option<usize>,
    /// Tokens per sequence [default: the shape's].
    #[arg(long)]
    seq: Option<usize>,
    /// Prefix length [default: the shape's].
    #[arg(long)]
    prefix_len: Option<usize>,
    /// Encoder MLP width [default: the shape's].
    #[arg(long)]
    mid_dim: Option<usize>,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed steps [default: 20 for tiny, 5 for gpt2-small].
    #[arg(long)]
    steps: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "cpu", help = DEVICE_HELP)]
    device: String,
}

/// Runs a benchmark.
pub(super) fn run(what: BenchCmd) -> Result<()> {
    match what {
        BenchCmd::Attn(args) => attn(args),
        BenchCmd::Step(args) => step(args),
        BenchCmd::Decode(args) => decode(args),
        BenchCmd::DecodeKernel(args) => decode_kernel(args),
        BenchCmd::Serve(args) => serve(args),
    }
}

/// Prints one JSON object per row.
fn print_json_lines<T: serde::Serialize>(rows: &[T]) -> Result<()> {
    for r in rows {
        let line = serde_json::to_string(r).map_err(|e| Error::Unsupported(e.to_string()))?;
        println!("{line}");
    }
    Ok(())
}

/// `bench serve`: server processes under closed-loop load; throughput and latency per
/// (adapters, concurrency), and the ratios.
fn serve(args: ServeArgs) -> Result<()> {
    use prefix_attn::bench::serve::{bench_serve, ServeBench};
    parse_device(&args.device)?;
    if let Some(w) = &args.workdir {
        if w.exists() {
            return Err(Error::index(
                "--workdir",
                format!(
                    "{}: exists; give a new folder (the benchmark writes a model there)",
                    w.display()
                ),
            ));
        }
    }
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        path: "the prefix-attn executable".into(),
        source,
    })?;
    let b = ServeBench {
        concurrency: args.concurrency,
        adapters: args.adapters,
        requests: args.requests,
        prompt_len: args.prompt_len,
        max_tokens: args.max_tokens,
        prefix_len: args.prefix_len,
        max_adapters: args.max_adapters,
        max_batch: args.max_batch,
        reps: args.reps,
        device: args.device,
        workdir: args.workdir,
        ..ServeBench::named(&args.shape, exe)?
    };
    let rows = bench_serve(&b, &mut |line| eprintln!("bench serve: {line}"))?;
    if args.json {
        return print_json_lines(&rows);
    }
    println!(
        "bench serve: {} on {}, greedy, prompts of {} tokens, max_tokens {}, P = {}, {} table slots, batches of up to {} (median of {} interleaved reps)",
        b.shape, b.device, b.prompt_len, b.max_tokens, b.prefix_len, b.max_adapters, b.max_batch, b.reps
    );
    println!(
        "{:>8} {:>5} {:>8} {:>7} {:>10} {:>9} {:>9} {:>9} {:>7} {:>9}",
        "adapters",
        "conc",
        "requests",
        "tokens",
        "tokens/s",
        "p50 ms",
        "p99 ms",
        "tok/step",
        "loads",
        "evictions"
    );
    for r in &rows {
        println!(
            "{:>8} {:>5} {:>8} {:>7} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>7} {:>9}",
            r.adapters,
            r.concurrency,
            r.requests,
            r.tokens,
            r.tokens_per_s,
            r.p50_ms,
            r.p99_ms,
            r.tokens_per_step,
            r.adapter_loads,
            r.adapter_evictions
        );
    }
    let tps = |k: usize, c: usize| {
        rows.iter()
            .find(|r| r.adapters == k && r.concurrency == c)
            .map(|r| r.tokens_per_s)
    };
    let (cmin, cmax) = (
        b.concurrency.iter().copied().min().unwrap_or(1),
        b.concurrency.iter().copied().max().unwrap_or(1),
    );
    let base_k = b.adapters[0];
    for &k in &b.adapters {
        if let (Some(lo), Some(hi)) = (tps(k, cmin), tps(k, cmax)) {
            println!("{k} adapters: concurrency {cmax} gives {:.2}× the throughput of concurrency {cmin}", hi / lo);
        }
    }
    for &k in b.adapters.iter().skip(1) {
        for &c in &b.concurrency {
            if let (Some(base), Some(x)) = (tps(base_k, c), tps(k, c)) {
                println!(
                    "concurrency {c}: {k} adapters give {:.3}× the throughput of {base_k} ({:+.1} %)",
                    x / base,
                    100.0 * (x / base - 1.0)
                );
            }
        }
    }
    Ok(())
}

/// `bench decode`: the engine's tokens/s and its ratios to the baselines, in one process.
fn decode(args: DecodeArgs) -> Result<()> {
    use prefix_attn::engine::bench::{bench_decode, DecodeBench};
    let be = backend_for(&args.device)?;
    let b = DecodeBench {
        requests: args.requests,
        adapters: args.adapters,
        prompt_len: args.prompt_len,
        new_tokens: args.new_tokens,
        reps: args.reps,
        ..DecodeBench::named(&args.shape)?
    };
    let rows = bench_decode(&b, be.as_ref())?;
    if args.json {
        return print_json_lines(&rows);
    }
    println!(
        "bench decode: {} on {}, {} requests × {} new tokens, prompts of {}, P = {} (median of {})",
        b.shape,
        be.device(),
        b.requests,
        b.new_tokens,
        b.prompt_len,
        b.prefix_len,
        b.reps
    );
    if let Some(r) = rows.first() {
        println!("  {}", r.packing);
    }
    let ours = rows[0].tokens_per_s;
    for r in &rows {
        println!(
            "  {:<22} adapters {:>2}  {:>6} tokens in {:>8.3} s  {:>10.1} tokens/s  (batched/this {:.2}×)",
            r.method,
            r.adapters,
            r.tokens,
            r.seconds,
            r.tokens_per_s,
            ours / r.tokens_per_s
        );
    }
    Ok(())
}

/// `bench attn`: fused against naive attention on the named shapes.
fn attn(args: AttnArgs) -> Result<()> {
    let AttnArgs {
        shape,
        reps,
        json,
        device,
    } = args;
    let shapes: Vec<NamedShape> = if shape == "all" {
        shapes::SHAPES.to_vec()
    } else {
        vec![shapes::by_name(&shape).ok_or_else(|| {
            Error::Unsupported(format!(
                "--shape {shape}: expected all or one of {}",
                shapes::SHAPES.map(|s| s.name).join(", ")
            ))
        })?]
    };
    // cpu: CPU-scaled shapes, wall time; cuda: full shapes, CUDA events, inputs
    // rotated through 256 MiB (> 2× an H200's L2). Never the emulator.
    let cuda = bench_cuda("bench attn", &device)?;
    let (label, ceil, rows, checks) = match &cuda {
        None => {
            let ceil = cpu_ceilings()?;
            let mut rows = vec![];
            for s in shapes {
                rows.push(bench_attn_cpu(s.cpu_scaled(), reps)?);
            }
            let label = format!(
                "cpu, f16 inputs, CPU-scaled shapes; ceilings measured now: {:.0} GFLOP/s (f32 matmul), {:.1} GB/s (copy)",
                ceil.flops / 1e9,
                ceil.bytes / 1e9
            );
            (label, ceil, rows, vec![])
        }
        Some(be) => {
            let ceil = prefix_attn::bench::ceilings::cuda_ceilings(be)?;
            let mut rows = vec![];
            let mut checks = vec![];
            for s in shapes {
                let r = bench_attn_device(be, s, reps, 256 << 20)?;
                checks.push(serde_json::json!({
                    "o_max_diff": r.o_diff, "dk_pre_rel_diff": r.dk_pre_rel_diff, "input_sets": r.sets,
                }));
                rows.push(r.row);
            }
            let label = format!(
                "{}, f16, CUDA events, inputs rotated over 256 MiB; ceilings measured now: {:.0} TFLOP/s (cuBLAS fp16 8192³), {:.0} GB/s (1 GiB device copy); naive = concat kernels + our kernel without a prefix",
                be.describe(),
                ceil.flops / 1e12,
                ceil.bytes / 1e9
            );
            (label, ceil, rows, checks)
        }
    };
    let roof =
        |flops: f64, bytes: f64, ms: f64| (flops / ceil.flops).max(bytes / ceil.bytes) / (ms / 1e3);
    if json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut row = serde_json::json!({
                    "shape": r.shape.name, "batch": r.shape.batch, "tq": r.shape.tq, "tk": r.shape.tk,
                    "heads_q": r.shape.heads_q, "heads_kv": r.shape.heads_kv,
                    "prefix_len": r.shape.prefix_len, "head_dim": r.shape.head_dim,
                    "fwd_ms": r.fwd_ms, "bwd_ms": r.bwd_ms,
                    "naive_fwd_ms": r.naive_fwd_ms, "naive_bwd_ms": r.naive_bwd_ms,
                    "fwd_gflops": r.fwd_flops / r.fwd_ms / 1e6, "bwd_gflops": r.bwd_flops / r.bwd_ms / 1e6,
                    "fwd_gbs": r.fwd_bytes / r.fwd_ms / 1e6, "bwd_gbs": r.bwd_bytes / r.bwd_ms / 1e6,
                    "fwd_roofline": roof(r.fwd_flops, r.fwd_bytes, r.fwd_ms),
                    "bwd_roofline": roof(r.bwd_flops, r.bwd_bytes, r.bwd_ms),
                    "speedup_fwd": r.naive_fwd_ms / r.fwd_ms, "speedup_bwd": r.naive_bwd_ms / r.bwd_ms,
                    "naive_extra_mb": r.naive_extra_bytes / 1e6,
                });
                if let (Some(c), Some(obj)) = (checks.get(i), row.as_object_mut()) {
                    obj.insert("check".into(), c.clone());
                }
                row
            })
            .collect();
        let dev = cuda
            .as_ref()
            .map_or("cpu".to_string(), |b| b.device().to_string());
        println!(
            "{}",
            serde_json::json!({"device": dev, "ceiling_gflops": ceil.flops / 1e9, "ceiling_gbs": ceil.bytes / 1e9, "rows": v})
        );
    } else {
        println!("{label}");
        println!(
            "{:<18} {:>9} {:>8} {:>7} {:>6} {:>9} {:>8} {:>6} {:>9} {:>9} {:>10}",
            "shape",
            "fwd ms",
            "GFLOP/s",
            "GB/s",
            "roof",
            "bwd ms",
            "GFLOP/s",
            "roof",
            "×naive fwd",
            "×naive bwd",
            "naive +MB"
        );
        for r in &rows {
            println!(
                "{:<18} {:>9.3} {:>8.1} {:>7.1} {:>5.0}% {:>9.3} {:>8.1} {:>5.0}% {:>9.2}x {:>9.2}x {:>10.1}",
                r.shape.name,
                r.fwd_ms,
                r.fwd_flops / r.fwd_ms / 1e6,
                r.fwd_bytes / r.fwd_ms / 1e6,
                100.0 * roof(r.fwd_flops, r.fwd_bytes, r.fwd_ms),
                r.bwd_ms,
                r.bwd_flops / r.bwd_ms / 1e6,
                100.0 * roof(r.bwd_flops, r.bwd_bytes, r.bwd_ms),
                r.naive_fwd_ms / r.fwd_ms,
                r.naive_bwd_ms / r.bwd_ms,
                r.naive_extra_bytes / 1e6
            );
        }
        for (r, c) in rows.iter().zip(&checks) {
            println!("{}: fused vs naive {c}", r.shape.name);
        }
    }
    Ok(())
}

/// `bench step`: full training steps on a random-weight model.
fn step(args: StepArgs) -> Result<()> {
    let be = backend_for(&args.device)?;
    let mut s = StepBench::named(&args.shape)?;
    s.batch = args.batch_size.unwrap_or(s.batch);
    s.seq = args.seq.unwrap_or(s.seq);
    s.prefix_len = args.prefix_len.unwrap_or(s.prefix_len);
    s.mid_dim = args.mid_dim.unwrap_or(s.mid_dim);
    s.warmup = args.warmup;
    s.steps = args.steps.unwrap_or(s.steps);
    let r = bench_step(&s, be.as_ref())?;
    let v = serde_json::json!({
        "impl": "prefix-attn",
        "device": be.device().to_string(),
        "shape": s.shape,
        "batch": s.batch,
        "seq": s.seq,
        "prefix_len": s.prefix_len,
        "mid_dim": s.mid_dim,
        "threads": r.threads,
        "warmup": s.warmup,
        "steps": s.steps,
        "median_ms": r.median_ms,
        "min_ms": r.min_ms,
        "max_ms": r.max_ms,
        "tokens_per_s": r.tokens_per_s,
        "peak_rss_mb": r.peak_rss_mb,
        "peak_device_mb": r.peak_device_mb,
        "model_device_mb": r.model_device_mb,
        "rss_before_model_mb": r.rss_before_model_mb,
    });
    if args.json {
        println!("{v}");
    } else {
        let dev = r
            .peak_device_mb
            .map(|p| format!(", peak device memory {p:.0} MB"))
            .unwrap_or_default();
        println!(
            "{} on {} (batch {} × {} tokens, P={}, MLP {}), {} threads: median {:.2} ms (min {:.2}, max {:.2}), {:.0} tokens/s, peak RSS {:.0} MB{dev}",
            s.shape, be.device(), s.batch, s.seq, s.prefix_len, s.mid_dim, r.threads, r.median_ms, r.min_ms, r.max_ms, r.tokens_per_s, r.peak_rss_mb
        );
    }
    Ok(())
}

/// The GPU a benchmark's `--device` names (`None`: the cpu); the emulator is refused.
fn bench_cuda(cmd: &str, device: &str) -> Result<Option<CudaBackend>> {
    Ok(match device {
        "cpu" => None,
        "emu" => {
            return Err(Error::Unsupported(format!(
                "{cmd} --device emu: the emulator is a test instrument, never benchmarked (use cpu or cuda)"
            )))
        }
        "auto" => match prefix_attn::device::cuda::device_count() {
            0 => None,
            _ => Some(CudaBackend::new(0)?),
        },
        other => match parse_device(other)? {
            Device::Cuda(n) => Some(CudaBackend::new(n)?),
            _ => None,
        },
    })
}

/// The H200 goal for the decode kernel at batch `b`, as a fraction of the copy
/// bandwidth: 80 % from 64 sequences on, 50 % at 1–4 (split over keys), none between.
fn decode_goal(b: usize) -> Option<f64> {
    match b {
        1..=4 => Some(0.5),
        64.. => Some(0.8),
        _ => None,
    }
}

fn decode_kernel(args: DecodeKernelArgs) -> Result<()> {
    use prefix_attn::device::decode_bench::time_decode;
    let cuda = bench_cuda("bench decode-kernel", &args.device)?;
    let batches = match (args.batches.is_empty(), cuda.is_some()) {
        (false, _) => args.batches.clone(),
        (true, true) => vec![1, 2, 4, 64],
        (true, false) => vec![1, 4],
    };
    if let Some(&bad) = batches.iter().find(|&&b| b == 0) {
        return Err(Error::index(
            "--batches",
            format!("batch sizes must be at least 1, got {bad}"),
        ));
    }
    let (label, ceil, rows) = match &cuda {
        Some(be) => (
            be.describe(),
            prefix_attn::bench::ceilings::cuda_ceilings(be)?,
            time_decode(be, &batches, args.reps)?,
        ),
        None => (
            "cpu".to_string(),
            cpu_ceilings()?,
            time_decode(&prefix_attn::device::cpu::CpuBackend, &batches, args.reps)?,
        ),
    };
    let copy_gbs = ceil.bytes / 1e9;
    if args.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let frac = r.gb_per_s / copy_gbs;
                let goal = decode_goal(r.batch);
                serde_json::json!({
                    "batch": r.batch, "ms": r.ms, "bytes": r.bytes, "gb_per_s": r.gb_per_s,
                    "input_copies": r.copies,
                    "fraction_of_copy": frac, "h200_goal": goal,
                    "goal_met": goal.map(|g| frac >= g),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"device": label, "shape": "decode", "copy_gbs": copy_gbs, "rows": v})
        );
        return Ok(());
    }
    println!(
        "paged decode kernel, `decode` shape (Hq/Hkv 32/8, D 128, 2048 keys in pages of 16, P 64, fp16, Tq 1) on {label}; back-to-back calls over >= 128 MiB of input copies; copy measured now: {copy_gbs:.1} GB/s"
    );
    println!(
        "{:>6} {:>10} {:>10} {:>9} {:>10}",
        "batch", "ms", "GB/s", "of copy", "H200 goal"
    );
    for r in &rows {
        let frac = r.gb_per_s / copy_gbs;
        let goal = decode_goal(r.batch).map_or("-".to_string(), |g| {
            format!(
                "{:.0} % {}",
                g * 100.0,
                if frac >= g { "met" } else { "not met" }
            )
        });
        println!(
            "{:>6} {:>10.4} {:>10.1} {:>8.1}% {:>10}",
            r.batch,
            r.ms,
            r.gb_per_s,
            frac * 100.0,
            goal
        );
    }
    Ok(())
}

//! `prefix-attn shapes` and `prefix-attn kernels`: what the benchmarks and the planners use.

use prefix_attn::attn::shapes;
use prefix_attn::Result;

// The arguments of `kernels`.
#[derive(clap::Args)]
pub(super) struct KernelsArgs {
    /// Print one JSON object: {"launches": [{entry, threads, smem_bytes, planner, problem}]}.
    #[arg(long)]
    pub(super) json: bool,
}

/// `shapes`: the named attention shapes with their FLOPs.
pub(super) fn shapes() -> Result<()> {
    for s in shapes::SHAPES {
        println!(
            "{:<18} B={:<3} Hq/Hkv={}/{:<3} Tq={:<5} Tk={:<5} P={:<4} D={:<4} causal={}  fwd {:.3} GFLOP",
            s.name,
            s.batch,
            s.heads_q,
            s.heads_kv,
            s.tq,
            s.tk,
            s.prefix_len,
            s.head_dim,
            s.causal,
            s.fwd_flops() / 1e9
        );
    }
    Ok(())
}

/// `kernels`: every CUDA kernel's launch geometry as the planners compute it.
pub(super) fn kernels(args: KernelsArgs) -> Result<()> {
    let KernelsArgs { json } = args;
    let rows = prefix_attn::device::launch_table::launch_table()?;
    if json {
        println!("{}", serde_json::json!({ "launches": rows }));
    } else {
        for r in rows {
            println!(
                "{:<36} threads {:<4} dynamic smem {:>6} B  ({}, {})",
                r.entry, r.threads, r.smem_bytes, r.planner, r.problem
            );
        }
    }
    Ok(())
}

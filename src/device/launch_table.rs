//! The launch geometry of every CUDA kernel as the planners compute it: threads per block and
//! dynamic shared memory, for `prefix-attn kernels` and the static kernel report
//! (`scripts/kernel-report.sh`), so that the report reads the numbers the launcher really
//! uses instead of a second copy of their formulas.
//!
//! Each row comes from running the real planner ([`plan_fwd`], [`plan_bwd`], the `dense`
//! planners) on a small host problem: the attention kernels once per head dim and dtype, with
//! a prefix and all gradients (so every backward kernel is planned), the dense kernels once
//! each. The geometry of these kernels depends on the head dim (and nothing else of the
//! problem), so one small problem per head dim gives the geometry of every launch.

use super::dense::{self, CeGrad, GridCap};
use super::kernels::{plan_bwd, plan_decode, plan_fwd, plan_meta_clamp};
use super::AdamWStep;
use crate::attn::testing::{
    FwdBuffers, GradBuffers, PagedSpec, ProblemSpec, RandomPaged, RandomProblem,
};
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::{DType, Location, Tensor};

/// One planned launch.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PlannedLaunch {
    /// Kernel entry name.
    pub entry: &'static str,
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory, bytes (the dense kernels are launched without any).
    pub smem_bytes: usize,
    /// The planner that produced it.
    pub planner: &'static str,
    /// The problem it was planned for.
    pub problem: String,
}

/// Head dims the attention kernels are built for.
const HEAD_DIMS: [usize; 2] = [64, 128];

/// Plans every kernel once (attention: per head dim and dtype) and returns the launches in
/// planning order; an entry planned twice appears twice.
pub fn launch_table() -> Result<Vec<PlannedLaunch>> {
    let mut rows = Vec::new();
    for dtype in [DType::F16, DType::BF16] {
        for d in HEAD_DIMS {
            attention_rows(d, dtype, &mut rows)?;
        }
    }
    dense_rows(&mut rows)?;
    Ok(rows)
}

fn attention_rows(d: usize, dtype: DType, rows: &mut Vec<PlannedLaunch>) -> Result<()> {
    // B=2, Tq=Tk=64, Hq=2, Hkv=1 (GQA), P=10, causal.
    let mut spec = ProblemSpec::new(2, 64, 64, 2, 1, d, 10, true);
    spec.dtype = dtype;
    let problem = format!("B=2 Tq=Tk=64 Hq=2 Hkv=1 D={d} P=10 causal {}", dtype.name());
    let prob = RandomProblem::new(spec.clone(), &mut Rng::new(0))?;
    let mut fwd_out = FwdBuffers::poisoned(&spec)?;
    let fwd = plan_fwd(&prob.args()?, &fwd_out.out())?;
    rows.push(PlannedLaunch {
        entry: fwd.entry,
        threads: fwd.threads,
        smem_bytes: fwd.smem_bytes,
        planner: "plan_fwd",
        problem: problem.clone(),
    });
    // The metadata clamp runs before the attention kernels when metadata is on the device.
    let (_, clamp) = plan_meta_clamp(&fwd.params, [0; 3], 0)?;
    if !rows.iter().any(|r| r.entry == clamp.entry) {
        rows.push(PlannedLaunch {
            entry: clamp.entry,
            threads: clamp.threads,
            smem_bytes: clamp.smem_bytes,
            planner: "plan_meta_clamp",
            problem: problem.clone(),
        });
    }
    // Paged decode: B=1, Tq=1, G=2, 64 keys in pages of 16 (split in chunks, so the merge is
    // planned too).
    let pspec = PagedSpec {
        batch: 1,
        tq: 1,
        heads_q: 2,
        heads_kv: 1,
        head_dim: d,
        page_size: 16,
        seqlen_k: vec![64],
        prefix_rows: 10,
        num_prefixes: 1,
        prefix_index: vec![0],
        prefix_len: vec![10],
        dtype,
    };
    let paged = RandomPaged::new(&pspec, &mut Rng::new(0))?;
    let mut dec_out = FwdBuffers::poisoned(&ProblemSpec {
        dtype,
        ..ProblemSpec::new(1, 1, 1, 2, 1, d, 0, true)
    })?;
    let dec = plan_decode(&paged.args()?, &dec_out.out())?;
    for l in dec.launches {
        if !rows.iter().any(|r| r.entry == l.entry) {
            rows.push(PlannedLaunch {
                entry: l.entry,
                threads: l.threads,
                smem_bytes: l.smem_bytes,
                planner: "plan_decode",
                problem: format!(
                    "B=1 Tq=1 Hq=2 Hkv=1 D={d} P=10 64 paged keys {}",
                    dtype.name()
                ),
            });
        }
    }
    let mut grads = GradBuffers::poisoned(&spec)?;
    let bwd_args = prob.bwd_args(&fwd_out.o, &fwd_out.lse, false)?;
    let bwd = plan_bwd(&bwd_args, &grads.grads(true, false))?;
    for l in bwd.launches {
        rows.push(PlannedLaunch {
            entry: l.entry,
            threads: l.threads,
            smem_bytes: l.smem_bytes,
            planner: "plan_bwd",
            problem: problem.clone(),
        });
    }
    Ok(())
}

fn f32s(shape: &[usize]) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_f32(shape, &vec![0.5; n], DType::F32)
}

fn dense_rows(rows: &mut Vec<PlannedLaunch>) -> Result<()> {
    let (loc, cap) = (Location::Host, GridCap(8));
    let (m, c) = (4, 64);
    let x = f32s(&[m, c])?;
    let y = f32s(&[m, c])?;
    let mut out = f32s(&[m, c])?;
    let mut out2 = f32s(&[m, c])?;
    let row = f32s(&[c])?;
    let mut row_out = f32s(&[c])?;
    let mut mean = f32s(&[m])?;
    let mut rstd = f32s(&[m])?;
    let ids = [0i32, 1, 2, 3];
    let mut launches = vec![
        dense::layernorm(
            &x.view(),
            &row.view(),
            &row.view(),
            1e-5,
            &mut out.view_mut(),
            &mut mean.view_mut(),
            &mut rstd.view_mut(),
            loc,
            cap,
        )?,
        dense::layernorm_bwd(
            &y.view(),
            &x.view(),
            &row.view(),
            &mean.view(),
            &rstd.view(),
            &mut out.view_mut(),
            false,
            loc,
            cap,
        )?,
        dense::unary("dense_gelu", &x.view(), &mut out.view_mut(), loc, cap)?,
        dense::unary("dense_tanh", &x.view(), &mut out.view_mut(), loc, cap)?,
        dense::binary(
            "dense_gelu_bwd",
            &x.view(),
            &y.view(),
            &mut out.view_mut(),
            loc,
            cap,
        )?,
        dense::binary(
            "dense_tanh_bwd",
            &x.view(),
            &y.view(),
            &mut out.view_mut(),
            loc,
            cap,
        )?,
        dense::bias_gelu(
            &mut out.view_mut(),
            &row.view(),
            &mut out2.view_mut(),
            loc,
            cap,
        )?,
        dense::bias_residual(&mut out.view_mut(), &row.view(), &y.view(), loc, cap)?,
        dense::axpby(&mut out.view_mut(), 1.0, Some(&x.view()), 1.0, loc, cap)?,
        dense::sum_rows(&x.view(), &mut row_out.view_mut(), false, loc, cap)?,
        dense::copy(&x.view(), &mut out.view_mut(), false, loc, cap)?,
        dense::gather_rows(&x.view(), &ids, &mut out.view_mut(), loc, cap)?,
        dense::embed(
            &ids,
            m,
            &x.view(),
            &y.view(),
            0,
            &mut out.view_mut(),
            loc,
            cap,
        )?,
        dense::cross_entropy(
            &x.view(),
            &ids,
            &mut mean.view_mut(),
            CeGrad::Into(&mut out.view_mut()),
            loc,
            cap,
        )?,
    ];
    // The Llama family's kernels: x read as [B=1, T=m, H=1, D=c] for the rotation.
    let table = f32s(&[m, c / 2])?;
    let mut x4 = f32s(&[1, m, 1, c])?;
    launches.extend([
        dense::rmsnorm(
            &x.view(),
            &row.view(),
            1e-5,
            &mut out.view_mut(),
            &mut rstd.view_mut(),
            loc,
            cap,
        )?,
        dense::rmsnorm_bwd(
            &y.view(),
            &x.view(),
            &row.view(),
            &rstd.view(),
            &mut out.view_mut(),
            false,
            loc,
            cap,
        )?,
        dense::rope(
            &mut x4.view_mut(),
            &table.view(),
            &table.view(),
            1.0,
            loc,
            cap,
        )?,
        dense::swiglu(&x.view(), &y.view(), &mut out.view_mut(), loc, cap)?,
        dense::swiglu_bwd(
            &x.view(),
            &y.view(),
            &y.view(),
            &mut out.view_mut(),
            &mut out2.view_mut(),
            loc,
            cap,
        )?,
    ]);
    let (mut am, mut av) = (f32s(&[m, c])?, f32s(&[m, c])?);
    let hp = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
    };
    launches.push(dense::adamw(
        &mut out.view_mut(),
        &y.view(),
        &mut am.view_mut(),
        &mut av.view_mut(),
        hp,
        loc,
        cap,
    )?);
    for l in launches {
        rows.push(PlannedLaunch {
            entry: l.entry,
            threads: l.threads,
            // The CUDA device launches every dense kernel without dynamic shared memory
            // (`run_dense` in cuda.rs); the kernels' reduction buffers are static.
            smem_bytes: 0,
            planner: "dense",
            problem: format!("f32 [{m}, {c}]"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_attention_and_dense_kernel_is_planned() {
        let rows = launch_table().unwrap();
        for e in [
            "prefix_attn_fwd_d64_f16",
            "prefix_attn_fwd_d128_bf16",
            "prefix_attn_bwd_delta_f16",
            "prefix_attn_bwd_dq_d128_f16",
            "prefix_attn_bwd_dkv_seq_d64_bf16",
            "prefix_attn_bwd_dkv_pre_d128_bf16",
            "prefix_attn_bwd_reduce",
            "prefix_attn_meta_clamp",
            "prefix_attn_decode_d128_bf16",
            "prefix_attn_decode_merge_f16",
            "dense_adamw",
            "dense_cross_entropy",
            "dense_rmsnorm_bwd",
            "dense_rope",
            "dense_swiglu_bwd",
        ] {
            assert!(rows.iter().any(|r| r.entry == e), "{e} not planned");
        }
        // One geometry per entry: the report keys its rows by entry.
        for r in &rows {
            for s in rows.iter().filter(|s| s.entry == r.entry) {
                assert_eq!(
                    (r.threads, r.smem_bytes),
                    (s.threads, s.smem_bytes),
                    "{}",
                    r.entry
                );
            }
        }
    }
}

//! The emulator as a sanitizer (README "Racecheck"): with `--features emu-racecheck` the kernels
//! are compiled with gcc's ThreadSanitizer instrumentation and the emulator reports every pair
//! of shared-memory (and, within a block, global-memory) accesses by two CUDA threads that no
//! barrier or warp collective orders, reads of unwritten shared memory, and accesses to a
//! cp.async destination in flight. Here: a planted race is caught, and every synchronisation of
//! every kernel file is proven necessary by deleting it (`emu::set_drop_sync`) and showing that
//! racecheck, synccheck or the tests catch its absence. Without the feature these tests are
//! ignored (they say so).

mod common;

use common::*;
use prefix_attn::attn::oracle::{Dense, Precision};
use prefix_attn::attn::testing::{FwdBuffers, GradBuffers, ProblemSpec, RandomProblem};
use prefix_attn::device::cpu::CpuBackend;
use prefix_attn::device::emu::{self, EmuBackend};
use prefix_attn::device::Backend;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};
use std::path::Path;

#[test]
#[cfg_attr(
    not(feature = "emu-racecheck"),
    ignore = "needs --features emu-racecheck"
)]
fn racecheck_is_built_in() {
    assert!(
        emu::racecheck_enabled(),
        "the emulator was built without racecheck"
    );
}

/// The racecheck counterpart of the sanitizer mode's planted out-of-bounds write: the kernel
/// with its barrier is clean; without it the launch fails with a report naming both source
/// lines and threads of both warps.
#[test]
#[cfg_attr(
    not(feature = "emu-racecheck"),
    ignore = "needs --features emu-racecheck"
)]
fn racecheck_catches_a_planted_race() {
    let (clean, _) = emu::planted_race(false);
    clean.expect("the kernel with its barrier is clean");
    for reverse in [false, true] {
        emu::set_schedule_reverse(reverse);
        let (r, [write, read]) = emu::planted_race(true);
        emu::set_schedule_reverse(false);
        let e = r.expect_err("the planted race went unnoticed").to_string();
        for needle in [
            "racecheck:".to_string(),
            "hazard".to_string(),
            format!("selftest.cpp:{write}"),
            format!("selftest.cpp:{read}"),
            "warp 0 lane".to_string(),
            "warp 1 lane".to_string(),
            "no __syncthreads() between them".to_string(),
        ] {
            assert!(e.contains(&needle), "report lacks {needle:?}: {e}");
        }
    }
}

/// One synchronisation call of a kernel source: `file:line` and the line's text.
#[derive(Clone, Debug)]
struct Site {
    file: String,
    line: u32,
    text: String,
}

/// Every `__syncthreads()`, `__syncwarp()` and `cp_async_wait<N>()` call in `kernels/*.cu` and
/// `kernels/common/*.cuh` (code, not comments), read from the sources as they are now.
fn sync_sites() -> Vec<Site> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut files = Vec::new();
    for (dir, ext) in [(root.clone(), "cu"), (root.join("common"), "cuh")] {
        for e in std::fs::read_dir(&dir).expect("kernels/") {
            let p = e.expect("dir entry").path();
            if p.extension().is_some_and(|x| x == ext) {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut sites = Vec::new();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let src = std::fs::read_to_string(&path).expect("kernel source");
        for (i, line) in src.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if ["__syncthreads(", "__syncwarp(", "cp_async_wait<"]
                .iter()
                .any(|k| code.contains(k))
            {
                sites.push(Site {
                    file: name.clone(),
                    line: i as u32 + 1,
                    text: line.trim().to_string(),
                });
            }
        }
    }
    sites
}

/// The forward on shapes that reach every synchronisation: three key tiles (a double buffer
/// refilled), head dim 128, and a block whose rows are all padding (it sees no key tile).
fn fwd_workload() -> Result<(), String> {
    let mut a = ProblemSpec::new(2, 70, 70, 2, 1, 64, 9, true);
    a.dtype = DType::F16;
    a.seqlen_q = Some(vec![70, 5]);
    a.seqlen_k = Some(vec![70, 5]);
    let mut b = ProblemSpec::new(1, 40, 40, 2, 2, 128, 33, true);
    b.dtype = DType::BF16;
    for (i, spec) in [a, b].into_iter().enumerate() {
        let pb = RandomProblem::new(spec, &mut Rng::new(90 + i as u64)).unwrap();
        let args = pb.args().unwrap();
        let x = Dense::from_args(&args).unwrap();
        let mut f = FwdBuffers::poisoned(&pb.spec).unwrap();
        emu::attn_fwd(&args, f.out()).map_err(|e| e.to_string())?;
        check_fwd(&x, &f, &x.forward(Precision::Exact), pb.spec.dtype)
            .map_err(|e| format!("wrong result: {e}"))?;
    }
    Ok(())
}

/// The backward (after the forward) on shapes that reach every synchronisation: two key tiles
/// per query tile (dQ), two query tiles per key tile and two query heads per KV head (dK/dV),
/// two sequences on one prefix, a dQ block whose rows are all padding; head dim 128 too.
fn bwd_workload() -> Result<(), String> {
    let mut a = ProblemSpec::new(3, 70, 70, 4, 2, 64, 9, true);
    a.dtype = DType::F16;
    a.num_prefixes = 2;
    a.prefix_index = Some(vec![0, 1, 0]);
    a.seqlen_q = Some(vec![70, 5, 70]);
    a.seqlen_k = Some(vec![70, 5, 70]);
    let mut b = ProblemSpec::new(1, 40, 40, 2, 1, 128, 33, true);
    b.dtype = DType::BF16;
    for (i, spec) in [a, b].into_iter().enumerate() {
        let pb = RandomProblem::new(spec, &mut Rng::new(95 + i as u64)).unwrap();
        let args = pb.args().unwrap();
        let x = Dense::from_args(&args).unwrap();
        let mut f = FwdBuffers::poisoned(&pb.spec).unwrap();
        emu::attn_fwd(&args, f.out()).map_err(|e| format!("forward: {e}"))?;
        let d_o = f64s(&pb.d_o);
        let exact = x.backward(&d_o, Precision::Exact);
        let mut g = GradBuffers::poisoned(&pb.spec).unwrap();
        emu::attn_bwd(
            &pb.bwd_args(&f.o, &f.lse, false).unwrap(),
            g.grads(true, false),
        )
        .map_err(|e| e.to_string())?;
        check_bwd(
            &x,
            &d_o,
            &f64s(&f.o),
            &g,
            &exact,
            pb.spec.dtype,
            true,
            false,
        )
        .map_err(|e| format!("wrong result: {e}"))?;
    }
    Ok(())
}

/// The dense kernels with block-level synchronisation (the cross-entropy's block reductions),
/// separate and in place (the gradient written over the logits), against the cpu backend.
fn dense_workload() -> Result<(), String> {
    let (m, v) = (5usize, 331usize);
    let mut rng = Rng::new(7);
    let logits: Vec<f32> = (0..m * v).map(|_| rng.normal() as f32 * 3.0).collect();
    let targets: Vec<i32> = (0..m)
        .map(|i| {
            if i == 1 {
                -100
            } else {
                rng.below(v as u64) as i32
            }
        })
        .collect();
    let lh = Tensor::from_f32(&[m, v], &logits, DType::F16).unwrap();
    let lf = Tensor::from_f32(&[m, v], &lh.to_f32_vec(), DType::F32).unwrap();
    let mut want_loss = Tensor::zeros(&[m], DType::F32).unwrap();
    let mut want_grad = Tensor::zeros(&[m, v], DType::F32).unwrap();
    CpuBackend
        .cross_entropy(
            &lf.view(),
            &targets,
            &mut want_loss.view_mut(),
            Some(&mut want_grad.view_mut()),
        )
        .unwrap();
    let close = |what: &str, got: &Tensor, want: &Tensor, tol: f32| -> Result<(), String> {
        for (i, (a, b)) in got.to_f32_vec().iter().zip(want.to_f32_vec()).enumerate() {
            let ok = (a - b).abs() <= tol * (1.0 + b.abs()); // false for NaN
            if !ok {
                return Err(format!("wrong result: {what}[{i}] = {a}, want {b}"));
            }
        }
        Ok(())
    };
    let mut loss = Tensor::from_f32(&[m], &vec![f32::NAN; m], DType::F32).unwrap();
    let mut grad = Tensor::from_f32(&[m, v], &vec![f32::NAN; m * v], DType::F16).unwrap();
    EmuBackend
        .cross_entropy(
            &lh.view(),
            &targets,
            &mut loss.view_mut(),
            Some(&mut grad.view_mut()),
        )
        .map_err(|e| e.to_string())?;
    close("loss", &loss, &want_loss, 1e-5)?;
    close("dlogits", &grad, &want_grad, 2e-3)?;
    let mut inplace = lh.clone();
    let mut loss2 = Tensor::from_f32(&[m], &vec![f32::NAN; m], DType::F32).unwrap();
    EmuBackend
        .cross_entropy_inplace(&mut inplace.view_mut(), &targets, &mut loss2.view_mut())
        .map_err(|e| e.to_string())?;
    close("in-place loss", &loss2, &want_loss, 1e-5)?;
    close("in-place dlogits", &inplace, &want_grad, 2e-3)
}

/// Paged decode on shapes that reach every synchronisation: a block walking several key
/// tiles (the planner's split forced to one chunk, so the tile buffers are refilled), two
/// warps' rows (G · Tq = 6), prefix and paged keys in one tile; and the planner's own split
/// with the merge.
fn decode_workload() -> Result<(), String> {
    use prefix_attn::attn::paged;
    use prefix_attn::attn::testing::{PagedSpec, RandomPaged};
    use prefix_attn::device::kernel_device::KernelRunner;
    use prefix_attn::device::kernels::plan_decode;
    let spec = PagedSpec {
        batch: 2,
        tq: 3,
        heads_q: 4,
        heads_kv: 2,
        head_dim: 64,
        page_size: 16,
        seqlen_k: vec![70, 9],
        prefix_rows: 5,
        num_prefixes: 1,
        prefix_index: vec![0, 0],
        prefix_len: vec![5],
        dtype: DType::F16,
    };
    let pb = RandomPaged::new(&spec, &mut Rng::new(61)).unwrap();
    let args = pb.args().unwrap();
    let exact = paged::oracle(&args, Precision::Exact).unwrap();
    let lowp = paged::oracle(&args, Precision::Round(DType::F16)).unwrap();
    let mut t = ProblemSpec::new(2, 3, 3, 4, 2, 64, 0, true);
    t.dtype = DType::F16;
    for one_chunk in [true, false] {
        let mut f = FwdBuffers::poisoned(&t).unwrap();
        let mut plan = plan_decode(&args, &f.out()).map_err(|e| e.to_string())?;
        if one_chunk {
            plan.params.splits = 1;
            plan.launches.truncate(1);
            plan.launches[0].grid.0 = 1;
            plan.part_o_len = 0;
            plan.part_lse_len = 0;
        }
        EmuBackend.run_decode(plan).map_err(|e| e.to_string())?;
        within_rule(
            "o",
            max_err(&f64s(&f.o), &exact.o),
            max_err(&lowp.o, &exact.o),
            max_abs(&exact.o),
            DType::F16,
        )
        .map_err(|e| format!("wrong result: {e}"))?;
    }
    Ok(())
}

/// Every workload (for a synchronisation in a shared header).
fn all_workloads() -> Result<(), String> {
    fwd_workload()?;
    bwd_workload()?;
    decode_workload()?;
    dense_workload()
}

/// The workload that runs the kernels of a source file.
fn workload_of(file: &str) -> fn() -> Result<(), String> {
    match file {
        "prefix_attn_fwd.cu" => fwd_workload,
        "prefix_attn_bwd.cu" => bwd_workload,
        "prefix_attn_decode.cu" => decode_workload,
        "dense.cu" => dense_workload,
        f if f.ends_with(".cuh") => all_workloads,
        other => panic!(
            "kernels/{other} has synchronisations but tests/racecheck_emu.rs has no workload that runs \
             its kernels: add one to workload_of"
        ),
    }
}

/// What caught a deleted synchronisation, from the workload's outcome.
fn caught_by(outcome: &Result<(), String>, dropped: u64) -> String {
    let first_line = |e: &str, key: &str| -> String {
        let at = e.find(key).unwrap_or(0);
        e[at..]
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(150)
            .collect()
    };
    match outcome {
        Ok(()) if dropped == 0 => "NOT EXECUTED by the workload".into(),
        Ok(()) => "NOT CAUGHT".into(),
        Err(e) if e.contains("racecheck:") => {
            // The first hazard's kind: the line after the summary.
            let kind = e
                .lines()
                .find(|l| l.trim_start().starts_with("[1]"))
                .map(|l| {
                    let l = l.trim_start().trim_start_matches("[1]").trim();
                    l.split(" on ").next().unwrap_or(l).to_string()
                })
                .unwrap_or_default();
            format!("racecheck ({kind})")
        }
        Err(e) if e.contains("synccheck") => format!("synccheck ({})", first_line(e, "synccheck")),
        Err(e) if e.contains("deadlock") || e.contains("divergent") => {
            "synccheck (deadlock or divergent barrier)".into()
        }
        Err(e) if e.starts_with("wrong result") => format!("tests ({})", first_line(e, "wrong")),
        Err(e) => format!("emulator error ({})", first_line(e, "")),
    }
}

/// Deletes each synchronisation of every kernel file in turn and runs the kernels of that file:
/// each deletion must be caught (racecheck, synccheck or a wrong result), and with nothing
/// deleted the kernels are clean (0 hazards). Prints the report table (scripts/sync-removal-report.sh
/// runs this with --nocapture).
#[test]
#[cfg_attr(
    not(feature = "emu-racecheck"),
    ignore = "needs --features emu-racecheck"
)]
fn every_synchronisation_is_necessary() {
    assert!(emu::racecheck_enabled());
    let sites = sync_sites();
    for f in [
        "prefix_attn_fwd.cu",
        "prefix_attn_bwd.cu",
        "prefix_attn_decode.cu",
        "dense.cu",
    ] {
        assert!(
            sites.iter().any(|s| s.file == f),
            "found no synchronisation in kernels/{f}: {sites:?}"
        );
    }
    let mut files: Vec<&str> = sites.iter().map(|s| s.file.as_str()).collect();
    files.dedup();
    for f in &files {
        emu::set_drop_sync(None).unwrap();
        workload_of(f)().unwrap_or_else(|e| panic!("{f} with every synchronisation: {e}"));
    }
    let mut rows = Vec::new();
    let mut missed = Vec::new();
    for s in &sites {
        emu::set_drop_sync(Some(&format!("{}:{}", s.file, s.line))).unwrap();
        let outcome = workload_of(&s.file)();
        let dropped = emu::dropped_syncs();
        emu::set_drop_sync(None).unwrap();
        let by = caught_by(&outcome, dropped);
        if by.starts_with("NOT") {
            missed.push(format!("{}:{} `{}`: {by}", s.file, s.line, s.text));
        }
        rows.push(format!(
            "| {}:{} | `{}` | {} | {} |",
            s.file,
            s.line,
            s.text.replace('|', "\\|"),
            dropped,
            by.replace('|', "\\|")
        ));
    }
    eprintln!("\n| site | code | calls skipped | deleting it is caught by |");
    eprintln!("|---|---|---|---|");
    for r in &rows {
        eprintln!("{r}");
    }
    assert!(
        missed.is_empty(),
        "synchronisations whose deletion nothing catches (remove them if unnecessary, with the \
         reason, or extend the workload / the checker):\n{}",
        missed.join("\n")
    );
}

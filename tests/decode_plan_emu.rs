//! The paged decode planned once and run many times (`DecodePlan`) on the emulator: a run
//! gives the one-shot `attn_decode`'s bits on random shapes (pages shuffled, lengths across
//! page boundaries, mixed prefix lengths and indices, GQA, one split and many), with every
//! metadata array as a device tensor or, for `prefix_index` / `prefix_len`, left out for
//! the kernel's defaults; it allocates no device memory, clamps out-of-range device
//! metadata like the one-shot call, serves any lengths up to its block table, and refuses
//! what does not fit the plan with errors that name the argument.

mod common;

use common::meta::{arg_of, assert_bits_eq, bits, expect_err, paged_buffers, poisoned_workspace};
use prefix_attn::attn::paged::PagedAttnArgs;
use prefix_attn::attn::testing::{random_paged_spec, PagedSpec, RandomPaged};
use prefix_attn::attn::Meta;
use prefix_attn::device::decode_plan::DecodePlan;
use prefix_attn::device::emu::{self, EmuBackend};
use prefix_attn::device::kernel_device::{Stream, Workspace};
use prefix_attn::device::Backend;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Tensor};

/// The metadata of a paged problem as i32 "device" tensors (host memory on the emulator):
/// block table `[B, max_pages]`, seqlen_k `[B]` and, when `with_prefix_meta`, prefix_index
/// `[B]` and prefix_len `[NP]`.
struct DevMeta {
    table: Tensor,
    lens: Tensor,
    prefix: Option<(Tensor, Tensor)>,
}

impl DevMeta {
    fn new(pp: &RandomPaged, batch: usize, with_prefix_meta: bool) -> DevMeta {
        let width = pp.block_table.len() / batch;
        DevMeta {
            table: Tensor::from_slice(&[batch, width], &pp.block_table).unwrap(),
            lens: Tensor::from_slice(&[batch], &pp.seqlen_k).unwrap(),
            prefix: with_prefix_meta.then(|| {
                (
                    Tensor::from_slice(&[batch], &pp.prefix_index).unwrap(),
                    Tensor::from_slice(&[pp.prefix_len.len()], &pp.prefix_len).unwrap(),
                )
            }),
        }
    }

    /// `args` (host metadata) with these device tensors instead.
    fn args<'a>(&'a self, args: PagedAttnArgs<'a>) -> PagedAttnArgs<'a> {
        let mut a = PagedAttnArgs {
            prefix_index: None,
            prefix_len: None,
            ..args
        };
        a.kv.block_table = Meta::Device(self.table.view());
        a.kv.seqlen_k = Meta::Device(self.lens.view());
        if let Some((idx, len)) = &self.prefix {
            a.prefix_index = Some(Meta::Device(idx.view()));
            a.prefix_len = Some(Meta::Device(len.view()));
        }
        a
    }
}

/// A decode long enough to be split over keys: one sequence, one KV head, a few hundred keys.
fn long_spec(dtype: DType, head_dim: usize) -> PagedSpec {
    PagedSpec {
        batch: 2,
        tq: 3,
        heads_q: 4,
        heads_kv: 1,
        head_dim,
        page_size: 16,
        seqlen_k: vec![300, 141],
        prefix_rows: 12,
        num_prefixes: 2,
        prefix_index: vec![1, 0],
        prefix_len: vec![12, 7],
        dtype,
    }
}

/// Plan once, run with device metadata: the one-shot call's bits, no allocation; with
/// `prefix_index` and `prefix_len` left out when they hold the defaults.
#[test]
fn run_equals_one_shot_on_random_shapes() {
    let be = EmuBackend;
    let mut rng = Rng::new(4242);
    let mut split_cases = 0;
    for seed in 0..12u64 {
        let dtype = if seed % 2 == 0 {
            DType::F16
        } else {
            DType::BF16
        };
        let head_dim = if seed % 4 < 2 { 64 } else { 128 };
        let mut spec = if seed >= 10 {
            long_spec(dtype, head_dim)
        } else {
            random_paged_spec(&mut rng, dtype, &[head_dim])
        };
        // Every third problem with a table uses the defaults: prefix 0, P rows.
        let defaults = seed % 3 == 0 && spec.num_prefixes > 0;
        if defaults {
            spec.prefix_index = vec![0; spec.batch];
            spec.prefix_len = vec![spec.prefix_rows as i32; spec.num_prefixes];
        }
        let ctx = format!("seed {seed}, spec {spec:?}");
        let pp = RandomPaged::new(&spec, &mut Rng::new(900 + seed)).unwrap();
        let host = pp.args().unwrap();

        let mut d1 = paged_buffers(&spec);
        be.attn_decode(&host, d1.out())
            .unwrap_or_else(|e| panic!("{ctx}: one-shot: {e}"));

        let plan = DecodePlan::new(&be, &host).unwrap_or_else(|e| panic!("{ctx}: plan: {e}"));
        if plan.splits() > 1 {
            split_cases += 1;
            assert!(plan.workspace_bytes() > 0, "{ctx}: splits need partials");
            assert_eq!(plan.launches().len(), 2, "{ctx}: decode, then merge");
        } else {
            assert_eq!(plan.workspace_bytes(), 0, "{ctx}");
        }
        let meta = DevMeta::new(&pp, spec.batch, spec.num_prefixes > 0 && !defaults);
        let run_args = meta.args(host);
        let mut ws = poisoned_workspace(plan.workspace_bytes());
        let mut d2 = paged_buffers(&spec);
        let before = emu::device_allocations();
        plan.run(
            &be,
            &run_args,
            d2.out(),
            Workspace::from_view(ws.view_mut()).unwrap(),
            Stream::OWN,
        )
        .unwrap_or_else(|e| panic!("{ctx}: run: {e}"));
        assert_eq!(
            emu::device_allocations(),
            before,
            "{ctx}: the run allocated"
        );
        assert_bits_eq(
            &[bits(&d1.o), bits(&d1.lse)],
            &[bits(&d2.o), bits(&d2.lse)],
            &format!("{ctx} (run)"),
        );
    }
    assert!(
        split_cases >= 2,
        "the long problems must split: {split_cases}"
    );
}

/// One plan serves every step of a generation: the lengths grow (within the block table)
/// and the pages change between runs, and each run still equals the one-shot call.
#[test]
fn one_plan_serves_growing_lengths() {
    let be = EmuBackend;
    let mut spec = long_spec(DType::BF16, 64);
    let pp = RandomPaged::new(&spec, &mut Rng::new(77)).unwrap();
    let plan = DecodePlan::new(&be, &pp.args().unwrap()).unwrap();
    let mut ws = poisoned_workspace(plan.workspace_bytes());
    for (step, lens) in [[1, 0], [17, 5], [160, 141], [300, 141]]
        .into_iter()
        .enumerate()
    {
        spec.seqlen_k = lens.to_vec();
        let mut step_pp = RandomPaged::new(&spec, &mut Rng::new(100 + step as u64)).unwrap();
        // Keep the plan's block-table width and page count: pad the table, reuse the cache.
        let width = pp.block_table.len() / spec.batch;
        let step_width = step_pp.block_table.len() / spec.batch;
        let mut table = vec![0; spec.batch * width];
        for b in 0..spec.batch {
            table[b * width..b * width + step_width]
                .copy_from_slice(&step_pp.block_table[b * step_width..(b + 1) * step_width]);
        }
        step_pp.block_table = table;
        step_pp.k_cache = pp.k_cache.clone();
        step_pp.v_cache = pp.v_cache.clone();
        let host = step_pp.args().unwrap();
        let mut d1 = paged_buffers(&spec);
        be.attn_decode(&host, d1.out()).unwrap();
        let meta = DevMeta::new(&step_pp, spec.batch, true);
        let mut d2 = paged_buffers(&spec);
        plan.run(
            &be,
            &meta.args(host),
            d2.out(),
            Workspace::from_view(ws.view_mut()).unwrap(),
            Stream::OWN,
        )
        .unwrap_or_else(|e| panic!("step {step}: {e}"));
        assert_bits_eq(
            &[bits(&d1.o), bits(&d1.lse)],
            &[bits(&d2.o), bits(&d2.lse)],
            &format!("step {step}, lengths {lens:?}"),
        );
    }
}

/// Out-of-range device metadata (lengths past the block table and negative, prefix indices
/// outside the table, prefix lengths past P, page numbers outside the cache) is clamped by
/// the kernel as in the one-shot call with the same device tensors.
#[test]
fn run_clamps_device_metadata_like_the_one_shot_call() {
    let be = EmuBackend;
    let spec = long_spec(DType::F16, 64);
    let mut pp = RandomPaged::new(&spec, &mut Rng::new(5)).unwrap();
    pp.seqlen_k = vec![i32::MAX, -4];
    pp.prefix_index = vec![9, -3];
    pp.prefix_len = vec![1000, -2];
    let n = pp.block_table.len();
    pp.block_table[n - 1] = 10_000;
    pp.block_table[0] = -50;
    let meta = DevMeta::new(&pp, spec.batch, true);
    let args = meta.args(pp.args().unwrap());
    let mut d1 = paged_buffers(&spec);
    be.attn_decode(&args, d1.out()).unwrap();
    let plan = DecodePlan::new(&be, &args).unwrap();
    let mut ws = poisoned_workspace(plan.workspace_bytes());
    let mut d2 = paged_buffers(&spec);
    plan.run(
        &be,
        &args,
        d2.out(),
        Workspace::from_view(ws.view_mut()).unwrap(),
        Stream::OWN,
    )
    .unwrap();
    assert_bits_eq(
        &[bits(&d1.o), bits(&d1.lse)],
        &[bits(&d2.o), bits(&d2.lse)],
        "clamped device metadata",
    );
    assert!(d2.o.to_f32_vec().iter().all(|x| x.is_finite()));
}

/// Runs that do not fit the plan fail before launching, naming the argument.
#[test]
fn bad_runs_are_errors_that_name_the_argument() {
    let be = EmuBackend;
    let spec = long_spec(DType::BF16, 64);
    let pp = RandomPaged::new(&spec, &mut Rng::new(8)).unwrap();
    let host = pp.args().unwrap();
    let plan = DecodePlan::new(&be, &host).unwrap();
    assert!(plan.splits() > 1);
    let meta = DevMeta::new(&pp, spec.batch, true);
    let good = meta.args(host);
    let mut ws = poisoned_workspace(plan.workspace_bytes() + 64);
    let mut out = paged_buffers(&spec);
    let ws_bytes = plan.workspace_bytes();
    let (ws_addr, ws_loc) = {
        let v = ws.view_mut();
        (v.base_addr(), v.location())
    };
    let mut run = |what: &str, args: &PagedAttnArgs, ws_from: usize, ws_len: usize, arg, needle| {
        let (addr, loc) = (ws_addr + ws_from as u64, ws_loc);
        expect_err(
            what,
            &mut out,
            |o| {
                // SAFETY: inside the poisoned buffer (64 spare bytes past the plan's size).
                let w = unsafe { Workspace::from_raw_parts(addr, ws_len, loc) };
                plan.run(&be, args, o.out(), w, Stream::OWN)
            },
            arg,
            needle,
        );
    };

    // Host metadata: a run copies nothing from the host.
    let mut a = good;
    a.kv.block_table = Meta::Host(&pp.block_table);
    run(
        "host block table",
        &a,
        0,
        ws_bytes,
        "block_table",
        "host metadata",
    );
    let mut a = good;
    a.kv.seqlen_k = Meta::Host(&pp.seqlen_k);
    run(
        "host seqlen_k",
        &a,
        0,
        ws_bytes,
        "seqlen_k",
        "host metadata",
    );
    let a = good.prefix_index(Meta::Host(&pp.prefix_index));
    run(
        "host prefix_index",
        &a,
        0,
        ws_bytes,
        "prefix_index",
        "host metadata",
    );
    let a = good.prefix_len(Meta::Host(&pp.prefix_len));
    run(
        "host prefix_len",
        &a,
        0,
        ws_bytes,
        "prefix_len",
        "host metadata",
    );

    // The workspace: too small, misaligned.
    run(
        "small workspace",
        &good,
        0,
        ws_bytes - 4,
        "workspace",
        "needs",
    );
    run(
        "misaligned workspace",
        &good,
        4,
        ws_bytes,
        "workspace",
        "aligned",
    );

    // A block table of another width.
    let wide: Vec<i32> = (0..spec.batch)
        .flat_map(|b| {
            let w = pp.block_table.len() / spec.batch;
            let mut row = pp.block_table[b * w..(b + 1) * w].to_vec();
            row.push(0);
            row
        })
        .collect();
    let wide_t = Tensor::from_slice(&[spec.batch, wide.len() / spec.batch], &wide).unwrap();
    let mut a = good;
    a.kv.block_table = Meta::Device(wide_t.view());
    run(
        "wider block table",
        &a,
        0,
        ws_bytes,
        "block_table",
        "the plan's [B, max_pages]",
    );

    // Another batch (q and the metadata with one sequence less).
    let q1 = pp.q.view().narrow(0, 0, 1).unwrap();
    let t1 = meta.table.view().narrow(0, 0, 1).unwrap();
    let l1 = meta.lens.view().narrow(0, 0, 1).unwrap();
    let (idx, len) = meta.prefix.as_ref().unwrap();
    let i1 = idx.view().narrow(0, 0, 1).unwrap();
    let mut a = PagedAttnArgs {
        q: q1,
        prefix_index: Some(Meta::Device(i1)),
        prefix_len: Some(Meta::Device(len.view())),
        ..good
    };
    a.kv.block_table = Meta::Device(t1);
    a.kv.seqlen_k = Meta::Device(l1);
    let mut small = paged_buffers(&PagedSpec {
        batch: 1,
        seqlen_k: vec![300],
        prefix_index: vec![1],
        ..spec.clone()
    });
    let w = Workspace::from_view(ws.view_mut()).unwrap();
    let e = plan.run(&be, &a, small.out(), w, Stream::OWN).unwrap_err();
    assert_eq!(arg_of(&e), "q", "{e}");
    assert!(e.to_string().contains("the plan's"), "{e}");

    // No prefix table where the plan has one; another scale.
    let a = PagedAttnArgs {
        prefix: None,
        prefix_index: None,
        prefix_len: None,
        ..good
    };
    run(
        "no prefix table",
        &a,
        0,
        ws_bytes,
        "k_pre",
        "the plan has a prefix table",
    );
    let a = good.scale(0.5);
    run("another scale", &a, 0, ws_bytes, "scale", "the plan's");

    // Another dtype.
    let f16 = RandomPaged::new(&long_spec(DType::F16, 64), &mut Rng::new(8)).unwrap();
    let mut f16_out = paged_buffers(&long_spec(DType::F16, 64));
    let a = meta.args(f16.args().unwrap());
    let w = Workspace::from_view(ws.view_mut()).unwrap();
    let e = plan
        .run(&be, &a, f16_out.out(), w, Stream::OWN)
        .unwrap_err();
    assert_eq!(arg_of(&e), "q", "{e}");
    assert!(e.to_string().contains("bf16"), "{e}");
}

/// A plan refuses what the kernels cannot run, as the one-shot call does, and a caller's
/// stream on the emulator.
#[test]
fn plans_refuse_what_the_kernels_cannot_run() {
    let be = EmuBackend;
    let spec = PagedSpec {
        head_dim: 32,
        ..long_spec(DType::F16, 64)
    };
    let pp = RandomPaged::new(&spec, &mut Rng::new(1)).unwrap();
    let e = DecodePlan::new(&be, &pp.args().unwrap()).unwrap_err();
    assert!(e.to_string().contains("head dim 32"), "{e}");
    let f32_spec = PagedSpec {
        dtype: DType::F32,
        ..long_spec(DType::F16, 64)
    };
    let pp = RandomPaged::new(&f32_spec, &mut Rng::new(1)).unwrap();
    let e = DecodePlan::new(&be, &pp.args().unwrap()).unwrap_err();
    assert_eq!(arg_of(&e), "q", "{e}");

    let spec = long_spec(DType::F16, 64);
    let pp = RandomPaged::new(&spec, &mut Rng::new(2)).unwrap();
    let plan = DecodePlan::new(&be, &pp.args().unwrap()).unwrap();
    let meta = DevMeta::new(&pp, spec.batch, true);
    let mut ws = poisoned_workspace(plan.workspace_bytes());
    let mut out = paged_buffers(&spec);
    // SAFETY: the emu device reads nothing through the handle: it refuses it first.
    let not_a_stream = unsafe { Stream::from_raw(std::ptr::NonNull::dangling().as_ptr()) };
    let e = plan
        .run(
            &be,
            &meta.args(pp.args().unwrap()),
            out.out(),
            Workspace::from_view(ws.view_mut()).unwrap(),
            not_a_stream,
        )
        .unwrap_err();
    assert!(e.to_string().contains("stream"), "{e}");
    assert!(out.o.to_f32_vec().iter().all(|x| x.is_nan()));
}

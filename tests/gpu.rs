//! GPU tests: the kernels on a real CUDA device against the f64 oracle (and the C API on a
//! caller-created stream: the one-shot forward and plan/run). This binary has its own
//! harness so that a person running `cargo test` without a GPU *sees* that these tests were
//! skipped; `PREFIX_ATTN_REQUIRE_GPU=1` turns a skip into a failure.

mod common;

use common::*;
use cudarc::driver::{CudaContext, CudaSlice, DevicePtr};
use prefix_attn::attn::oracle::{Dense, Precision};
use prefix_attn::attn::paged::{self, PagedAttnArgs};
use prefix_attn::attn::testing::{
    random_paged_spec, random_spec, FwdBuffers, GradBuffers, KvLayout, PagedSpec, ProblemSpec,
    RandomPaged, RandomProblem,
};
use prefix_attn::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads, Meta};
use prefix_attn::capi;
use prefix_attn::device::cuda::{device_count, loaded_libraries, CudaBackend};
use prefix_attn::device::decode_bench::decode_shape;
use prefix_attn::device::decode_plan::DecodePlan;
use prefix_attn::device::kernel_device::{AttnPlan, Stream, Workspace};
use prefix_attn::device::Backend;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Layout, Location, Tensor, TensorView, TensorViewMut};
use std::ffi::{c_void, CStr};
use std::sync::Arc;

/// A host view's whole buffer copied to the device, and the same view there.
struct DeviceCopy {
    buf: CudaSlice<u8>,
}

fn to_device(stream: &Arc<cudarc::driver::CudaStream>, v: &TensorView) -> DeviceCopy {
    let bytes = v.buffer_len() * v.dtype().size();
    // SAFETY: a host view's buffer holds buffer_len() elements from base_addr().
    let host = unsafe { std::slice::from_raw_parts(v.base_addr() as usize as *const u8, bytes) };
    DeviceCopy {
        buf: stream.clone_htod(host).unwrap(),
    }
}

fn dev_view<'a>(
    stream: &Arc<cudarc::driver::CudaStream>,
    d: &'a DeviceCopy,
    like: &TensorView,
) -> TensorView<'a> {
    let (ptr, _) = d.buf.device_ptr(stream);
    // SAFETY: the device buffer is a byte copy of the host buffer and outlives the view.
    unsafe {
        TensorView::from_raw_parts(
            ptr,
            like.buffer_len(),
            Location::Cuda(0),
            like.dtype(),
            like.layout(),
        )
        .unwrap()
    }
}

fn run_case(
    be: &CudaBackend,
    stream: &Arc<cudarc::driver::CudaStream>,
    spec: ProblemSpec,
    seed: u64,
) -> Result<(), String> {
    let pb = RandomProblem::new(spec, &mut Rng::new(seed)).map_err(|e| e.to_string())?;
    let args = pb.args().map_err(|e| e.to_string())?;
    let x = Dense::from_args(&args).map_err(|e| e.to_string())?;
    let exact = x.forward(Precision::Exact);
    let copies: Vec<DeviceCopy> = [args.q, args.k, args.v]
        .iter()
        .map(|v| to_device(stream, v))
        .collect();
    let pre: Vec<DeviceCopy> = args
        .prefix
        .iter()
        .flat_map(|p| [to_device(stream, &p.k), to_device(stream, &p.v)])
        .collect();
    let mut dargs = AttnFwdArgs {
        q: dev_view(stream, &copies[0], &args.q),
        k: dev_view(stream, &copies[1], &args.k),
        v: dev_view(stream, &copies[2], &args.v),
        ..args
    };
    if let Some(p) = &args.prefix {
        dargs.prefix = Some(prefix_attn::attn::PrefixKv {
            k: dev_view(stream, &pre[0], &p.k),
            v: dev_view(stream, &pre[1], &p.v),
        });
    }
    let mut host = FwdBuffers::poisoned(&pb.spec).map_err(|e| e.to_string())?;
    let o_dev = to_device(stream, &host.o.view());
    let l_dev = to_device(stream, &host.lse.view());
    let (op, _) = o_dev.buf.device_ptr(stream);
    let (lp, _) = l_dev.buf.device_ptr(stream);
    // SAFETY: fresh device buffers of exactly these tensors' sizes, not aliased.
    let (o_view, l_view) = unsafe {
        (
            TensorViewMut::from_raw_parts(
                op,
                host.o.numel(),
                Location::Cuda(0),
                host.o.dtype(),
                host.o.view().layout(),
            )
            .unwrap(),
            TensorViewMut::from_raw_parts(
                lp,
                host.lse.numel(),
                Location::Cuda(0),
                DType::F32,
                host.lse.view().layout(),
            )
            .unwrap(),
        )
    };
    be.attn_fwd(
        &dargs,
        AttnFwdOut {
            o: o_view,
            lse: Some(l_view),
        },
    )
    .map_err(|e| e.to_string())?;
    let ob: Vec<u8> = stream.clone_dtoh(&o_dev.buf).unwrap();
    let lb: Vec<u8> = stream.clone_dtoh(&l_dev.buf).unwrap();
    copy_bytes(&mut host.o, &ob);
    copy_bytes(&mut host.lse, &lb);
    check_fwd(&x, &host, &exact, pb.spec.dtype)?;

    // Backward on the device, from the device forward's o and lse.
    let prefix_only = seed % 3 == 0;
    let d_o = f64s(&pb.d_o);
    let exact_g = x.backward(&d_o, Precision::Exact);
    let mut g = GradBuffers::poisoned(&pb.spec).map_err(|e| e.to_string())?;
    let do_dev = to_device(stream, &pb.d_o.view());
    let bufs: Vec<DeviceCopy> = [&g.dq, &g.dk, &g.dv, &g.dk_pre, &g.dv_pre]
        .iter()
        .map(|t| to_device(stream, &t.view()))
        .collect();
    let mut_view = |d: &DeviceCopy, t: &Tensor| {
        let (ptr, _) = d.buf.device_ptr(stream);
        // SAFETY: a fresh device buffer of exactly this tensor's size.
        unsafe {
            TensorViewMut::from_raw_parts(
                ptr,
                t.numel(),
                Location::Cuda(0),
                t.dtype(),
                t.view().layout(),
            )
            .unwrap()
        }
    };
    let has_prefix = args.prefix.is_some();
    let grads = AttnGrads {
        dq: (!prefix_only).then(|| mut_view(&bufs[0], &g.dq)),
        dk: (!prefix_only).then(|| mut_view(&bufs[1], &g.dk)),
        dv: (!prefix_only).then(|| mut_view(&bufs[2], &g.dv)),
        dk_pre: has_prefix.then(|| mut_view(&bufs[3], &g.dk_pre)),
        dv_pre: has_prefix.then(|| mut_view(&bufs[4], &g.dv_pre)),
    };
    let bargs = AttnBwdArgs {
        fwd: dargs,
        o: dev_view(stream, &o_dev, &host.o.view()),
        lse: dev_view(stream, &l_dev, &host.lse.view()),
        d_o: dev_view(stream, &do_dev, &pb.d_o.view()),
        prefix_only,
    };
    be.attn_bwd(&bargs, grads).map_err(|e| e.to_string())?;
    for (t, d) in [
        &mut g.dq,
        &mut g.dk,
        &mut g.dv,
        &mut g.dk_pre,
        &mut g.dv_pre,
    ]
    .into_iter()
    .zip(&bufs)
    {
        let bytes: Vec<u8> = stream.clone_dtoh(&d.buf).unwrap();
        copy_bytes(t, &bytes);
    }
    check_bwd(
        &x,
        &d_o,
        &f64s(&host.o),
        &g,
        &exact_g,
        pb.spec.dtype,
        has_prefix,
        prefix_only,
    )
}

/// A decode plan's workspace and zeroed outputs `o [B, Tq, Hq, D]`, `lse [B, Hq, Tq]` on the
/// device.
fn decode_plan_buffers(
    be: &CudaBackend,
    plan: &DecodePlan,
    spec: &PagedSpec,
) -> Result<[Tensor; 3], String> {
    let e = |e: prefix_attn::Error| e.to_string();
    let (b, tq, hq, d) = (spec.batch, spec.tq, spec.heads_q, spec.head_dim);
    Ok([
        be.zeros(&[plan.workspace_bytes().div_ceil(4).max(1)], DType::I32)
            .map_err(e)?,
        be.zeros(&[b, tq, hq, d], spec.dtype).map_err(e)?,
        be.zeros(&[b, hq, tq], DType::F32).map_err(e)?,
    ])
}

/// Paged decode on the device (the kernel and, with several chunks, the merge) against the f64
/// oracle, with host metadata and with the metadata as device tensors (same bits).
fn run_decode_case(be: &CudaBackend, spec: &PagedSpec, seed: u64) -> Result<(), String> {
    let e = |e: prefix_attn::Error| e.to_string();
    let pb = RandomPaged::new(spec, &mut Rng::new(seed)).map_err(e)?;
    let host_args = pb.args().map_err(e)?;
    let exact = paged::oracle(&host_args, Precision::Exact).map_err(e)?;
    let lowp = paged::oracle(&host_args, Precision::Round(spec.dtype)).map_err(e)?;
    let up = |t: &Tensor| be.upload(t).map_err(e);
    let (q, kc, vc) = (up(&pb.q)?, up(&pb.k_cache)?, up(&pb.v_cache)?);
    let pre = pb.prefix.as_ref().map(&up).transpose()?;
    let i32s = |v: &[i32], dims: &[usize]| up(&Tensor::from_slice(dims, v).map_err(e)?);
    let b = spec.batch;
    let table = i32s(&pb.block_table, &[b, pb.block_table.len() / b])?;
    let lk = i32s(&pb.seqlen_k, &[b])?;
    let idx = i32s(&pb.prefix_index, &[b])?;
    let plen = i32s(&pb.prefix_len, &[spec.num_prefixes])?;
    let mut outs = vec![];
    for device_meta in [false, true] {
        let mut args = PagedAttnArgs::new(
            q.view(),
            kc.view(),
            vc.view(),
            Meta::Host(&pb.block_table),
            Meta::Host(&pb.seqlen_k),
        );
        if let Some(p) = &pre {
            let pv = p.view();
            args = args
                .prefix(pv.select(0, 0).map_err(e)?, pv.select(0, 1).map_err(e)?)
                .prefix_index(Meta::Host(&pb.prefix_index))
                .prefix_len(Meta::Host(&pb.prefix_len));
        }
        if device_meta {
            args.kv.block_table = Meta::Device(table.view());
            args.kv.seqlen_k = Meta::Device(lk.view());
            if pre.is_some() {
                args.prefix_index = Some(Meta::Device(idx.view()));
                args.prefix_len = Some(Meta::Device(plen.view()));
            }
        }
        let mut t = ProblemSpec::new(
            b,
            spec.tq,
            spec.tq,
            spec.heads_q,
            spec.heads_kv,
            spec.head_dim,
            0,
            true,
        );
        t.dtype = spec.dtype;
        let host = FwdBuffers::poisoned(&t).map_err(e)?;
        let (mut o, mut lse) = (up(&host.o)?, up(&host.lse)?);
        be.attn_decode(
            &args,
            AttnFwdOut {
                o: o.view_mut(),
                lse: Some(lse.view_mut()),
            },
        )
        .map_err(e)?;
        let (o, lse) = (be.download(&o).map_err(e)?, be.download(&lse).map_err(e)?);
        common::meta::check_outputs(&o, &lse, &exact, &lowp, spec.dtype)?;
        outs.push((o.to_f32_vec(), lse.to_f32_vec()));
    }
    // The same decode planned once and run (device metadata, a device workspace, the
    // crate's stream).
    {
        let mut args = PagedAttnArgs::new(
            q.view(),
            kc.view(),
            vc.view(),
            Meta::Device(table.view()),
            Meta::Device(lk.view()),
        );
        if let Some(p) = &pre {
            let pv = p.view();
            args = args
                .prefix(pv.select(0, 0).map_err(e)?, pv.select(0, 1).map_err(e)?)
                .prefix_index(Meta::Device(idx.view()))
                .prefix_len(Meta::Device(plen.view()));
        }
        let plan = DecodePlan::new(be, &args).map_err(e)?;
        let [mut ws, mut o, mut lse] = decode_plan_buffers(be, &plan, spec)?;
        let before = be.memory();
        plan.run(
            be,
            &args,
            AttnFwdOut {
                o: o.view_mut(),
                lse: Some(lse.view_mut()),
            },
            Workspace::from_view(ws.view_mut()).map_err(e)?,
            Stream::OWN,
        )
        .map_err(e)?;
        if be.memory() != before {
            return Err("the decode plan's run allocated".into());
        }
        let (o, lse) = (be.download(&o).map_err(e)?, be.download(&lse).map_err(e)?);
        outs.push((o.to_f32_vec(), lse.to_f32_vec()));
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    if bits(&outs[0].0) != bits(&outs[1].0) || bits(&outs[0].1) != bits(&outs[1].1) {
        return Err("device metadata gave other bits than host metadata".into());
    }
    if bits(&outs[0].0) != bits(&outs[2].0) || bits(&outs[0].1) != bits(&outs[2].1) {
        return Err("the decode plan's run gave other bits than the one-shot call".into());
    }
    Ok(())
}

/// A device i32 array owned by the test's stream and a crate view of it (for metadata the
/// test rewrites between graph replays).
fn dev_i32(
    stream: &Arc<cudarc::driver::CudaStream>,
    v: &[i32],
    dims: &[usize],
) -> Result<(CudaSlice<i32>, TensorView<'static>), String> {
    let buf = stream.clone_htod(v).map_err(|e| format!("{e:?}"))?;
    let (ptr, _) = buf.device_ptr(stream);
    // SAFETY: a live device array of `v.len()` int32 values; the caller keeps `buf` alive
    // while the view is used.
    let view = unsafe {
        TensorView::from_raw_parts(
            ptr,
            v.len(),
            Location::Cuda(0),
            DType::I32,
            Layout::contiguous(dims).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?
    };
    Ok((buf, view))
}

/// An attention forward and backward plan run back to back, captured in one CUDA graph on a
/// caller's stream (thread-local capture mode), replayed for two sets of lengths written to
/// device memory in between: each replay gives the one-shot calls' bits.
fn run_attn_graph_case(be: &CudaBackend, cuda: &Arc<CudaContext>) -> Result<(), String> {
    use cudarc::driver::sys;
    let e = |e: prefix_attn::Error| e.to_string();
    let d = |e: cudarc::driver::DriverError| format!("{e:?}");
    let (b, tq, tk, hq, hkv, dh, np, p) = (
        3usize, 37usize, 53usize, 8usize, 2usize, 128usize, 2usize, 9usize,
    );
    let dt = DType::BF16;
    let mut rng = Rng::new(616);
    let mut rand = |dims: &[usize]| {
        let n = dims.iter().product();
        Tensor::from_f32(dims, &rng.normal_vec(n, 1.0), dt).map_err(e)
    };
    let host = [
        rand(&[b, tq, hq, dh])?,
        rand(&[b, tk, hkv, dh])?,
        rand(&[b, tk, hkv, dh])?,
        rand(&[np, p, hkv, dh])?,
        rand(&[np, p, hkv, dh])?,
        rand(&[b, tq, hq, dh])?,
    ];
    let dev: Vec<Tensor> = host
        .iter()
        .map(|t| be.upload(t))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let pidx = vec![1, -1, 0];
    let stream = cuda.new_stream().map_err(d)?;
    let (idx_buf, idx_view) = dev_i32(&stream, &pidx, &[b])?;
    let (mut sq_buf, sq_view) = dev_i32(&stream, &[tq as i32; 3], &[b])?;
    let (mut sk_buf, sk_view) = dev_i32(&stream, &[tk as i32; 3], &[b])?;
    let base = AttnFwdArgs::new(dev[0].view(), dev[1].view(), dev[2].view())
        .prefix(dev[3].view(), dev[4].view())
        .causal(true);
    let dargs = AttnFwdArgs {
        prefix_index: Some(Meta::Device(idx_view)),
        seqlen_q: Some(Meta::Device(sq_view)),
        seqlen_k: Some(Meta::Device(sk_view)),
        ..base
    };
    let fwd = AttnPlan::fwd(be, &dargs).map_err(e)?;
    let bwd = AttnPlan::bwd(be, &dargs).map_err(e)?;
    let zeros = |dims: &[usize], dt: DType| be.zeros(dims, dt).map_err(e);
    let mut wf = zeros(&[fwd.workspace_bytes().div_ceil(4)], DType::I32)?;
    let mut wb = zeros(&[bwd.workspace_bytes().div_ceil(4)], DType::I32)?;
    let mut o = zeros(&[b, tq, hq, dh], dt)?;
    let mut lse = zeros(&[b, hq, tq], DType::F32)?;
    let mut g: Vec<Tensor> = vec![
        zeros(&[b, tq, hq, dh], dt)?,
        zeros(&[b, tk, hkv, dh], dt)?,
        zeros(&[b, tk, hkv, dh], dt)?,
        zeros(&[np, p, hkv, dh], DType::F32)?,
        zeros(&[np, p, hkv, dh], DType::F32)?,
    ];
    be.synchronize().map_err(e)?;
    stream.synchronize().map_err(d)?;
    // SAFETY: the test's live stream of the primary context, synchronised before any read.
    let st = unsafe { Stream::from_raw(stream.cu_stream()) };
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(d)?;
    let ran = (|| -> prefix_attn::Result<()> {
        let out = AttnFwdOut {
            o: o.view_mut(),
            lse: Some(lse.view_mut()),
        };
        fwd.run_fwd(be, &dargs, out, Workspace::from_view(wf.view_mut())?, st)?;
        let bargs = AttnBwdArgs {
            fwd: dargs,
            o: o.view(),
            lse: lse.view(),
            d_o: dev[5].view(),
            prefix_only: false,
        };
        let [dq, dk, dv, dkp, dvp] = &mut g[..] else {
            unreachable!()
        };
        let grads = AttnGrads {
            dq: Some(dq.view_mut()),
            dk: Some(dk.view_mut()),
            dv: Some(dv.view_mut()),
            dk_pre: Some(dkp.view_mut()),
            dv_pre: Some(dvp.view_mut()),
        };
        bwd.run_bwd(be, &bargs, grads, Workspace::from_view(wb.view_mut())?, st)
    })();
    let graph = stream
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .map_err(|err| format!("end_capture: {err:?} (the runs: {ran:?})"))?;
    ran.map_err(e)?;
    let graph = graph.ok_or("the capture recorded nothing")?;
    for (step, (sq, sk)) in [([37, 20, 5], [53, 31, 2]), ([12, 37, 1], [40, 53, 7])]
        .into_iter()
        .enumerate()
    {
        stream.memcpy_htod(&sq, &mut sq_buf).map_err(d)?;
        stream.memcpy_htod(&sk, &mut sk_buf).map_err(d)?;
        graph.launch().map_err(d)?;
        stream.synchronize().map_err(d)?;
        // The one-shot calls with host metadata, on the crate's stream.
        let hargs = base.prefix_index(&pidx).seqlens(&sq, &sk);
        let (mut o1, mut l1) = (
            zeros(&[b, tq, hq, dh], dt)?,
            zeros(&[b, hq, tq], DType::F32)?,
        );
        be.attn_fwd(
            &hargs,
            AttnFwdOut {
                o: o1.view_mut(),
                lse: Some(l1.view_mut()),
            },
        )
        .map_err(e)?;
        let mut g1: Vec<Tensor> = g
            .iter()
            .map(|t| zeros(t.dims(), t.dtype()))
            .collect::<Result<_, _>>()?;
        let bargs = AttnBwdArgs {
            fwd: hargs,
            o: o1.view(),
            lse: l1.view(),
            d_o: dev[5].view(),
            prefix_only: false,
        };
        let [dq, dk, dv, dkp, dvp] = &mut g1[..] else {
            unreachable!()
        };
        be.attn_bwd(
            &bargs,
            AttnGrads {
                dq: Some(dq.view_mut()),
                dk: Some(dk.view_mut()),
                dv: Some(dv.view_mut()),
                dk_pre: Some(dkp.view_mut()),
                dv_pre: Some(dvp.view_mut()),
            },
        )
        .map_err(e)?;
        let bits = |t: &Tensor| -> Result<Vec<u32>, String> {
            Ok(be
                .download(t)
                .map_err(e)?
                .to_f32_vec()
                .iter()
                .map(|x| x.to_bits())
                .collect())
        };
        let names = ["o", "lse", "dq", "dk", "dv", "dk_pre", "dv_pre"];
        let got: Vec<&Tensor> = [&o, &lse].into_iter().chain(g.iter()).collect();
        let want: Vec<&Tensor> = [&o1, &l1].into_iter().chain(g1.iter()).collect();
        for ((name, a), w) in names.iter().zip(got).zip(want) {
            if bits(a)? != bits(w)? {
                return Err(format!(
                    "replay {step} (seqlen_q {sq:?}, seqlen_k {sk:?}): {name} differs from the one-shot call"
                ));
            }
        }
    }
    drop(idx_buf);
    Ok(())
}

/// A decode plan's run captured in a CUDA graph on a caller's stream (thread-local capture
/// mode: any synchronising or allocating call inside would end the capture with an error),
/// then the graph replayed for three steps whose lengths are changed in device memory in
/// between: each replay gives the one-shot call's bits for that step's lengths.
fn run_graph_case(be: &CudaBackend, cuda: &Arc<CudaContext>) -> Result<(), String> {
    use cudarc::driver::sys;
    let e = |e: prefix_attn::Error| e.to_string();
    let d = |e: cudarc::driver::DriverError| format!("{e:?}");
    let spec = PagedSpec {
        num_prefixes: 2,
        prefix_index: vec![1, -1, 0, 1],
        prefix_len: vec![64, 17],
        ..decode_shape(4)
    };
    let pb = RandomPaged::new(&spec, &mut Rng::new(515)).map_err(e)?;
    let b = spec.batch;
    let width = pb.block_table.len() / b;
    let up = |t: &Tensor| be.upload(t).map_err(e);
    let (q, kc, vc) = (up(&pb.q)?, up(&pb.k_cache)?, up(&pb.v_cache)?);
    let pre = up(pb.prefix.as_ref().ok_or("the case has a prefix table")?)?;
    let i32s = |v: &[i32], dims: &[usize]| up(&Tensor::from_slice(dims, v).map_err(e)?);
    let (table, idx, plen) = (
        i32s(&pb.block_table, &[b, width])?,
        i32s(&pb.prefix_index, &[b])?,
        i32s(&pb.prefix_len, &[2])?,
    );
    let stream = cuda.new_stream().map_err(d)?;
    // The lengths live in the test's own device buffer, rewritten between replays.
    let mut lens: CudaSlice<i32> = stream.clone_htod(&pb.seqlen_k).map_err(d)?;
    let lens_view = {
        let (ptr, _) = lens.device_ptr(&stream);
        // SAFETY: a live device array of B int32 values, alive until the end of the case.
        unsafe {
            TensorView::from_raw_parts(
                ptr,
                b,
                Location::Cuda(0),
                DType::I32,
                Layout::contiguous(&[b]).unwrap(),
            )
            .map_err(e)?
        }
    };
    let pv = pre.view();
    let args = PagedAttnArgs::new(
        q.view(),
        kc.view(),
        vc.view(),
        Meta::Device(table.view()),
        Meta::Device(lens_view),
    )
    .prefix(pv.select(0, 0).map_err(e)?, pv.select(0, 1).map_err(e)?)
    .prefix_index(Meta::Device(idx.view()))
    .prefix_len(Meta::Device(plen.view()));
    let plan = DecodePlan::new(be, &args).map_err(e)?;
    let [mut ws, mut o, mut lse] = decode_plan_buffers(be, &plan, &spec)?;
    // Uploads and zeroing ran on the crate's stream; the capture is on the test's.
    be.synchronize().map_err(e)?;
    stream.synchronize().map_err(d)?;
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(d)?;
    let ran = plan.run(
        be,
        &args,
        AttnFwdOut {
            o: o.view_mut(),
            lse: Some(lse.view_mut()),
        },
        Workspace::from_view(ws.view_mut()).map_err(e)?,
        // SAFETY: the test's live stream of the primary context, synchronised below.
        unsafe { Stream::from_raw(stream.cu_stream()) },
    );
    let graph = stream
        .end_capture(sys::CUgraphInstantiate_flags(0))
        .map_err(|err| format!("end_capture: {err:?} (the run: {ran:?})"))?;
    ran.map_err(e)?;
    let graph = graph.ok_or("the capture recorded nothing")?;
    let full = pb.seqlen_k.clone();
    for (step, cut) in [7, 1, 0].into_iter().enumerate() {
        let step_lens: Vec<i32> = full.iter().map(|&n| (n - cut).max(0)).collect();
        stream.memcpy_htod(&step_lens, &mut lens).map_err(d)?;
        graph.launch().map_err(d)?;
        stream.synchronize().map_err(d)?;
        let want = {
            let mut a = args;
            a.kv.seqlen_k = Meta::Host(&step_lens);
            a.kv.block_table = Meta::Host(&pb.block_table);
            a.prefix_index = Some(Meta::Host(&pb.prefix_index));
            a.prefix_len = Some(Meta::Host(&pb.prefix_len));
            let mut o1 = be
                .zeros(&[b, spec.tq, spec.heads_q, spec.head_dim], spec.dtype)
                .map_err(e)?;
            let mut l1 = be
                .zeros(&[b, spec.heads_q, spec.tq], DType::F32)
                .map_err(e)?;
            be.attn_decode(
                &a,
                AttnFwdOut {
                    o: o1.view_mut(),
                    lse: Some(l1.view_mut()),
                },
            )
            .map_err(e)?;
            (be.download(&o1).map_err(e)?, be.download(&l1).map_err(e)?)
        };
        let got = (be.download(&o).map_err(e)?, be.download(&lse).map_err(e)?);
        let bits = |t: &Tensor| {
            t.to_f32_vec()
                .iter()
                .map(|x| x.to_bits())
                .collect::<Vec<_>>()
        };
        if bits(&got.0) != bits(&want.0) || bits(&got.1) != bits(&want.1) {
            return Err(format!(
                "replay {step} (lengths {step_lens:?}) gave other bits than the one-shot call"
            ));
        }
    }
    Ok(())
}

/// A C description of a host view's layout at device address `base` (a byte copy of the
/// view's whole host buffer, so the view's offset applies).
fn c_tensor(base: u64, like: &TensorView) -> capi::pa_tensor {
    let (mut shape, mut strides) = ([0i64; 4], [0i64; 4]);
    for (i, (&d, &st)) in like.dims().iter().zip(like.strides()).enumerate() {
        shape[i] = d as i64;
        strides[i] = st as i64;
    }
    capi::pa_tensor {
        data: (base + (like.layout().offset() * like.dtype().size()) as u64) as usize
            as *mut c_void,
        dtype: match like.dtype() {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            DType::I32 => 3,
        },
        rank: like.dims().len() as i32,
        shape,
        strides,
    }
}

/// A C call's status as a result, with the library's message.
fn c_ok(what: &str, status: capi::pa_status) -> Result<(), String> {
    if status == capi::PA_OK {
        return Ok(());
    }
    // SAFETY: pa_last_error returns a NUL-terminated string valid until the next call.
    let msg = unsafe { CStr::from_ptr(capi::pa_last_error()) };
    Err(format!(
        "{what}: status {status}: {}",
        msg.to_string_lossy()
    ))
}

/// The C API on a stream this test creates (a non-blocking stream, so nothing orders it
/// against the crate's stream but the library): `pa_attn_fwd` with that stream, then a plan's
/// run (`pa_attn_plan_run_fwd`) with device metadata and workspace on it, against the f64
/// oracle and each other (same bits); then the Rust `AttnPlan` run on the same stream, which
/// must allocate no device memory.
fn run_stream_case(be: &CudaBackend, cuda: &Arc<CudaContext>) -> Result<(), String> {
    let e = |e: prefix_attn::Error| e.to_string();
    let d = |e: cudarc::driver::DriverError| format!("{e:?}");
    let mut spec = ProblemSpec::new(3, 40, 56, 4, 2, 64, 7, true);
    spec.dtype = DType::F16;
    spec.num_prefixes = 2;
    spec.prefix_index = Some(vec![1, -1, 0]);
    spec.seqlen_q = Some(vec![40, 17, 3]);
    spec.seqlen_k = Some(vec![56, 30, 9]);
    let pb = RandomProblem::new(spec, &mut Rng::new(4242)).map_err(e)?;
    let args = pb.args().map_err(e)?;
    let x = Dense::from_args(&args).map_err(e)?;
    let exact = x.forward(Precision::Exact);
    let pre = args.prefix.ok_or("the case has a prefix table")?;
    let stream = cuda.new_stream().map_err(d)?;
    let ptr = |c: &DeviceCopy| c.buf.device_ptr(&stream).0;
    let inputs: Vec<DeviceCopy> = [args.q, args.k, args.v, pre.k, pre.v]
        .iter()
        .map(|v| to_device(&stream, v))
        .collect();
    let [tq, tk, tv, tkp, tvp] = [args.q, args.k, args.v, pre.k, pre.v]
        .iter()
        .zip(&inputs)
        .map(|(v, c)| c_tensor(ptr(c), v))
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| "five inputs")?;
    let host = FwdBuffers::poisoned(&pb.spec).map_err(e)?;
    let outs: Vec<DeviceCopy> = [&host.o, &host.lse, &host.o, &host.lse, &host.o, &host.lse]
        .iter()
        .map(|t| to_device(&stream, &t.view()))
        .collect();
    let out_t = |i: usize| {
        let like = if i % 2 == 0 { &host.o } else { &host.lse };
        c_tensor(ptr(&outs[i]), &like.view())
    };
    let (pidx, sq, sk) = (
        pb.spec.prefix_index.clone().unwrap(),
        pb.spec.seqlen_q.clone().unwrap(),
        pb.spec.seqlen_k.clone().unwrap(),
    );
    let cargs = capi::pa_attn_args {
        q: &tq,
        k: &tk,
        v: &tv,
        k_pre: &tkp,
        v_pre: &tvp,
        prefix_index: pidx.as_ptr(),
        seqlen_q: sq.as_ptr(),
        seqlen_k: sk.as_ptr(),
        batch: 3,
        causal: 1,
        scale: 0.0,
    };
    let cu_stream = stream.cu_stream() as *mut c_void;
    let cuda_kind = capi::DEVICE_NAMES
        .iter()
        .find(|(name, _)| *name == "PA_DEVICE_CUDA")
        .map(|&(_, kind)| kind)
        .ok_or("PA_DEVICE_CUDA missing")?;
    let mut ctx: *mut capi::pa_context = std::ptr::null_mut();
    c_ok(
        "pa_context_create",
        capi::pa_context_create(cuda_kind, 0, &mut ctx),
    )?;
    let (o1, l1, o2, l2) = (out_t(0), out_t(1), out_t(2), out_t(3));
    let fwd = c_ok(
        "pa_attn_fwd",
        capi::pa_attn_fwd(ctx, &cargs, &o1, &l1, cu_stream),
    );
    // Plan and run with device metadata and a device workspace, on the same stream.
    let dev_meta: Vec<CudaSlice<i32>> = [&pidx, &sq, &sk]
        .iter()
        .map(|v| stream.clone_htod(v.as_slice()))
        .collect::<Result<_, _>>()
        .map_err(d)?;
    let meta_ptr = |i: usize| dev_meta[i].device_ptr(&stream).0 as usize as *const i32;
    let mut plan: *mut capi::pa_attn_plan = std::ptr::null_mut();
    let mut ws_bytes = 0u64;
    let planned = fwd
        .and_then(|()| {
            c_ok(
                "pa_attn_plan_create",
                capi::pa_attn_plan_create(ctx, &cargs, 0, &mut plan),
            )
        })
        .and_then(|()| {
            c_ok(
                "pa_attn_plan_workspace_size",
                capi::pa_attn_plan_workspace_size(plan, &mut ws_bytes),
            )
        });
    let ws = stream
        .alloc_zeros::<u8>(ws_bytes.max(1) as usize)
        .map_err(d)?;
    let run_args = capi::pa_attn_args {
        prefix_index: std::ptr::null(),
        seqlen_q: std::ptr::null(),
        seqlen_k: std::ptr::null(),
        batch: 0,
        ..cargs
    };
    let ran = planned.and_then(|()| {
        c_ok(
            "pa_attn_plan_run_fwd",
            capi::pa_attn_plan_run_fwd(
                plan,
                &run_args,
                &o2,
                &l2,
                meta_ptr(0),
                meta_ptr(1),
                meta_ptr(2),
                ws.device_ptr(&stream).0 as usize as *mut c_void,
                ws_bytes,
                cu_stream,
            ),
        )
    });
    // The work queued on the stream runs before the plan and the context (and their kernels'
    // modules) go.
    stream.synchronize().map_err(d)?;
    capi::pa_attn_plan_destroy(plan);
    capi::pa_context_destroy(ctx);
    ran?;

    // The Rust plan's run on the same stream: no device allocation.
    let meta_view = |i: usize| {
        // SAFETY: a live device array of B = 3 int32 values.
        unsafe {
            TensorView::from_raw_parts(
                dev_meta[i].device_ptr(&stream).0,
                3,
                Location::Cuda(0),
                DType::I32,
                Layout::contiguous(&[3]).unwrap(),
            )
            .unwrap()
        }
    };
    let dargs = AttnFwdArgs {
        q: dev_view(&stream, &inputs[0], &args.q),
        k: dev_view(&stream, &inputs[1], &args.k),
        v: dev_view(&stream, &inputs[2], &args.v),
        prefix: Some(prefix_attn::attn::PrefixKv {
            k: dev_view(&stream, &inputs[3], &pre.k),
            v: dev_view(&stream, &inputs[4], &pre.v),
        }),
        prefix_index: Some(Meta::Device(meta_view(0))),
        seqlen_q: Some(Meta::Device(meta_view(1))),
        seqlen_k: Some(Meta::Device(meta_view(2))),
        ..args
    };
    let rplan = AttnPlan::fwd(be, &dargs).map_err(e)?;
    let mut ws2 = be
        .zeros(&[rplan.workspace_bytes().div_ceil(4)], DType::I32)
        .map_err(e)?;
    // The zeroing runs on the crate's stream; the run below on the test's.
    be.synchronize().map_err(e)?;
    let out_mut = |i: usize, like: &Tensor| {
        // SAFETY: a fresh device buffer of exactly this tensor's size, not aliased.
        unsafe {
            TensorViewMut::from_raw_parts(
                ptr(&outs[i]),
                like.numel(),
                Location::Cuda(0),
                like.dtype(),
                like.view().layout(),
            )
            .unwrap()
        }
    };
    let before = be.memory();
    rplan
        .run_fwd(
            be,
            &dargs,
            AttnFwdOut {
                o: out_mut(4, &host.o),
                lse: Some(out_mut(5, &host.lse)),
            },
            Workspace::from_view(ws2.view_mut()).map_err(e)?,
            // SAFETY: the test's live stream of the primary context, synchronised below.
            unsafe { Stream::from_raw(stream.cu_stream()) },
        )
        .map_err(e)?;
    if be.memory() != before {
        return Err(format!(
            "the Rust plan's run allocated: memory {before:?} -> {:?}",
            be.memory()
        ));
    }
    stream.synchronize().map_err(d)?;

    let bytes: Vec<Vec<u8>> = outs
        .iter()
        .map(|c| stream.clone_dtoh(&c.buf))
        .collect::<Result<_, _>>()
        .map_err(d)?;
    if bytes[0] != bytes[2] || bytes[1] != bytes[3] {
        return Err("the C plan's run gave other bits than pa_attn_fwd".into());
    }
    if bytes[0] != bytes[4] || bytes[1] != bytes[5] {
        return Err("the Rust plan's run gave other bits than pa_attn_fwd".into());
    }
    let mut got = FwdBuffers::poisoned(&pb.spec).map_err(e)?;
    copy_bytes(&mut got.o, &bytes[0]);
    copy_bytes(&mut got.lse, &bytes[1]);
    check_fwd(&x, &got, &exact, pb.spec.dtype)
}

fn copy_bytes(t: &mut Tensor, bytes: &[u8]) {
    let n = t.numel();
    let dt = t.dtype();
    let vals: Vec<f32> = match dt {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    };
    assert_eq!(vals.len(), n);
    t.view_mut().scatter_f32(&vals).unwrap();
}

fn main() {
    let require = std::env::var("PREFIX_ATTN_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let n = device_count();
    if n == 0 {
        println!("GPU tests: SKIPPED (no CUDA device or driver on this machine)");
        if require {
            println!("PREFIX_ATTN_REQUIRE_GPU=1: failing because no GPU is present");
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
        println!("0 passed, 0 failed, 1 skipped");
        return;
    }
    let (be, ctx) = match CudaBackend::new(0).and_then(|be| {
        std::panic::catch_unwind(|| CudaContext::new(0))
            .map_err(|_| prefix_attn::Error::device("cuda:0", "CudaContext::new panicked"))?
            .map(|ctx| (be, ctx))
            .map_err(|e| prefix_attn::Error::device("cuda:0", format!("{e:?}")))
    }) {
        Ok(x) => x,
        Err(e) => {
            println!("FAILED to open cuda:0: {e}");
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
    };
    let stream = ctx.default_stream();
    println!("libraries loaded: {}", loaded_libraries().join(", "));
    let mut specs: Vec<(String, ProblemSpec)> = vec![];
    let mut rng = Rng::new(77);
    for i in 0..40 {
        let dtype = if i % 2 == 0 { DType::F16 } else { DType::BF16 };
        let mut s = random_spec(&mut rng, dtype);
        s.head_dim = if rng.below(2) == 0 { 64 } else { 128 };
        specs.push((format!("random {i}"), s));
    }
    let mut g = ProblemSpec::new(8, 128, 128, 12, 12, 64, 10, true);
    g.dtype = DType::F16;
    g.layout = KvLayout::FusedQkv;
    g.peft_layer = Some((12, 5));
    specs.push(("gpt2-train layout".into(), g));
    let (mut passed, mut failed) = (0, 0);
    for (i, (name, spec)) in specs.into_iter().enumerate() {
        // A panic in one case (an unwrap on a device error) must not hide the others.
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_case(&be, &stream, spec, 1000 + i as u64)
        }))
        .unwrap_or_else(|_| Err("panicked (message above)".into()));
        match res {
            Ok(()) => passed += 1,
            Err(e) => {
                failed += 1;
                println!("FAILED {name}: {e}");
            }
        }
    }
    println!("GPU forward and backward kernels vs f64 oracle on cuda:0");
    println!("{passed} passed, {failed} failed");
    // Paged decode: random paged problems, and the `decode` shape at B = 1 (many chunks and the
    // merge), 4 and 64 (one chunk).
    let mut decode: Vec<(String, PagedSpec)> = vec![];
    let mut rng = Rng::new(99);
    for i in 0..20 {
        let dtype = if i % 2 == 0 { DType::F16 } else { DType::BF16 };
        decode.push((
            format!("decode random {i}"),
            random_paged_spec(&mut rng, dtype, &[64, 128]),
        ));
    }
    for b in [1usize, 4, 64] {
        decode.push((
            format!("decode shape B={b}"),
            PagedSpec {
                num_prefixes: 2,
                prefix_index: (0..b as i32).map(|i| i % 3 - 1).collect(),
                prefix_len: vec![64, 17],
                ..decode_shape(b)
            },
        ));
    }
    for (i, (name, spec)) in decode.into_iter().enumerate() {
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_decode_case(&be, &spec, 3000 + i as u64)
        }))
        .unwrap_or_else(|_| Err("panicked (message above)".into()));
        match res {
            Ok(()) => passed += 1,
            Err(e) => {
                failed += 1;
                println!("FAILED {name}: {e}");
            }
        }
    }
    println!("GPU paged decode vs f64 oracle: {passed} passed, {failed} failed so far");
    // The C API on a caller-created stream: the one-shot forward and plan/run.
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_stream_case(&be, &ctx)))
        .unwrap_or_else(|_| Err("panicked (message above)".into()));
    match res {
        Ok(()) => {
            passed += 1;
            println!("C forward and plan/run on a caller's stream: ok");
        }
        Err(e) => {
            failed += 1;
            println!("FAILED C forward and plan/run on a caller's stream: {e}");
        }
    }
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_attn_graph_case(&be, &ctx)
    }))
    .unwrap_or_else(|_| Err("panicked (message above)".into()));
    match res {
        Ok(()) => {
            passed += 1;
            println!("attention forward + backward plans captured in one CUDA graph, replayed: ok");
        }
        Err(e) => {
            failed += 1;
            println!("FAILED attention plans in a CUDA graph: {e}");
        }
    }
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_graph_case(&be, &ctx)))
        .unwrap_or_else(|_| Err("panicked (message above)".into()));
    match res {
        Ok(()) => {
            passed += 1;
            println!("decode plan captured in a CUDA graph, replayed over 3 steps: ok");
        }
        Err(e) => {
            failed += 1;
            println!("FAILED decode plan in a CUDA graph: {e}");
        }
    }
    // The half-precision training path (dense kernels, cuBLAS, attention, AdamW, generation)
    // against the Hugging Face + PEFT fixture and its fp16 PyTorch run.
    println!("{}", be.describe());
    match common::fp16::tiny_c_fp16_parity(&be) {
        Ok(report) => {
            passed += 1;
            for line in report {
                println!("cuda {line}");
            }
        }
        Err(e) => {
            failed += 1;
            println!("FAILED tiny-c fp16 training path on cuda: {e}");
        }
    }
    // The Llama family's half-precision path (its dense kernels, GQA attention) against its
    // transformers + PEFT fixture.
    match common::llama_fp16::llama_gqa_fp16_parity(&be) {
        Ok(report) => {
            passed += 1;
            for line in report {
                println!("cuda {line}");
            }
        }
        Err(e) => {
            failed += 1;
            println!("FAILED llama-gqa fp16 path on cuda: {e}");
        }
    }
    // Out of memory is an error that names the size, never a panic.
    match be.zeros(&[1 << 42], DType::F16) {
        Err(e) if e.to_string().contains("MiB") => {
            passed += 1;
            println!("out of memory reported: {e}");
        }
        other => {
            failed += 1;
            println!("FAILED: a 8 TiB allocation gave {other:?}");
        }
    }
    println!("libraries loaded: {}", loaded_libraries().join(", "));
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}

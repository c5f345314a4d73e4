//! GPU tests: the kernels on a real CUDA device against the f64 oracle. This binary has its own
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
use prefix_attn::device::cuda::{device_count, loaded_libraries, CudaBackend};
use prefix_attn::device::decode_bench::decode_shape;
use prefix_attn::device::Backend;
use prefix_attn::rng::Rng;
use prefix_attn::tensor::{DType, Location, Tensor, TensorView, TensorViewMut};
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
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    if bits(&outs[0].0) != bits(&outs[1].0) || bits(&outs[0].1) != bits(&outs[1].1) {
        return Err("device metadata gave other bits than host metadata".into());
    }
    Ok(())
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

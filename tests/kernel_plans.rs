//! The CUDA launch plans of the named benchmark shapes, checked against the hardware limits a
//! GPU enforces and the occupancy goals, without a GPU: the planners only read shapes, so the
//! views point at a made-up device address and nothing is allocated.

use prefix_attn::attn::shapes::SHAPES;
use prefix_attn::attn::{AttnBwdArgs, AttnFwdArgs, AttnFwdOut, AttnGrads};
use prefix_attn::device::kernels::{plan_bwd, plan_fwd, prefix_split, KernelLaunch};
use prefix_attn::tensor::{DType, Layout, Location, TensorView, TensorViewMut};

/// A made-up, 256-byte aligned device address: the planners never dereference it.
const FAKE_ADDR: u64 = 1 << 32;

fn view(dims: &[usize], dt: DType) -> TensorView<'static> {
    let n = dims.iter().product();
    // SAFETY: planning reads shapes, strides and the address value only.
    unsafe {
        TensorView::from_raw_parts(
            FAKE_ADDR,
            n,
            Location::Cuda(0),
            dt,
            Layout::contiguous(dims).unwrap(),
        )
        .unwrap()
    }
}

fn view_mut(dims: &[usize], dt: DType) -> TensorViewMut<'static> {
    let n = dims.iter().product();
    // SAFETY: as in `view`.
    unsafe {
        TensorViewMut::from_raw_parts(
            FAKE_ADDR,
            n,
            Location::Cuda(0),
            dt,
            Layout::contiguous(dims).unwrap(),
        )
        .unwrap()
    }
}

/// Every launch within what a CUDA device accepts: grid y and z at most 65,535, at most 1,024
/// threads, dynamic shared memory within an sm_80's 163 KiB per block (opt-in above 48 KiB is
/// done by the launcher).
fn check_limits(shape: &str, l: &KernelLaunch) {
    assert!(
        l.grid.0 >= 1 && l.grid.1 <= 65_535 && l.grid.2 <= 65_535,
        "{shape} {l:?}"
    );
    assert!(
        l.threads >= 32 && l.threads <= 1024 && l.threads % 32 == 0,
        "{shape} {l:?}"
    );
    assert!(l.smem_bytes <= 163 * 1024, "{shape} {l:?}");
}

#[test]
fn named_shapes_plan_within_device_limits_and_fill_an_h200() {
    for s in SHAPES {
        let (b, tq, tk, hq, hkv, d, p) = (
            s.batch,
            s.tq,
            s.tk,
            s.heads_q,
            s.heads_kv,
            s.head_dim,
            s.prefix_len,
        );
        let dt = DType::F16;
        let lens_q = vec![tq as i32; b];
        let lens_k = vec![tk as i32; b];
        let fwd = AttnFwdArgs::new(
            view(&[b, tq, hq, d], dt),
            view(&[b, tk, hkv, d], dt),
            view(&[b, tk, hkv, d], dt),
        )
        .prefix(view(&[1, p, hkv, d], dt), view(&[1, p, hkv, d], dt))
        .seqlens(&lens_q, &lens_k)
        .causal(s.causal);
        let f = plan_fwd(
            &fwd,
            &AttnFwdOut {
                o: view_mut(&[b, tq, hq, d], dt),
                lse: Some(view_mut(&[b, hq, tq], DType::F32)),
            },
        )
        .unwrap();
        check_limits(
            s.name,
            &KernelLaunch {
                entry: f.entry,
                grid: f.grid,
                threads: f.threads,
                smem_bytes: f.smem_bytes,
            },
        );
        let plan = plan_bwd(
            &AttnBwdArgs {
                fwd,
                o: view(&[b, tq, hq, d], dt),
                lse: view(&[b, hq, tq], DType::F32),
                d_o: view(&[b, tq, hq, d], dt),
                prefix_only: false,
            },
            &AttnGrads {
                dq: Some(view_mut(&[b, tq, hq, d], dt)),
                dk: Some(view_mut(&[b, tk, hkv, d], dt)),
                dv: Some(view_mut(&[b, tk, hkv, d], dt)),
                dk_pre: Some(view_mut(&[1, p, hkv, d], DType::F32)),
                dv_pre: Some(view_mut(&[1, p, hkv, d], DType::F32)),
            },
        )
        .unwrap();
        for l in &plan.launches {
            check_limits(s.name, l);
        }
        let pre = plan
            .launches
            .iter()
            .find(|l| l.entry.contains("dkv_pre"))
            .unwrap_or_else(|| panic!("{}: no prefix kernel in {:?}", s.name, plan.launches));
        let blocks = pre.grid.0 * pre.grid.1 * pre.grid.2;
        // At least one block per SM of an H200 (132 SMs) where the work can be split that far.
        let splittable = b * (hq / hkv) * tq.div_ceil(if d <= 64 { 64 } else { 32 });
        let tiles = (pre.grid.0 * pre.grid.1) as usize;
        assert!(
            blocks >= 132 || blocks as usize == tiles * splittable,
            "{}: the prefix kernel launches only {blocks} blocks ({:?})",
            s.name,
            pre.grid
        );
        // The partial scratch holds one [2, NP, P, Hkv, D] slab per split.
        assert_eq!(
            plan.partial_len,
            plan.params.splits as usize * 2 * p * hkv * d,
            "{}",
            s.name
        );
        if s.name == "llm-long" {
            // 2 key tiles × 4 KV heads were 32 blocks when only the batch was split.
            assert!(blocks >= 132, "llm-long: {blocks} blocks");
        }
    }
}

#[test]
fn prefix_split_covers_the_work_once_in_whole_chunks() {
    for base in [1, 2, 8, 12, 24, 300] {
        for batch in [1, 3, 8] {
            for group in [1, 4, 8] {
                for q_tiles in [1, 2, 5, 128] {
                    let s = prefix_split(base, batch, group, q_tiles);
                    let ctx =
                        format!("base {base} batch {batch} group {group} q_tiles {q_tiles}: {s:?}");
                    assert!(s.batch >= 1 && s.batch <= batch, "{ctx}");
                    assert!(s.heads >= 1 && s.heads <= group, "{ctx}");
                    // Chunks tile the query tiles exactly: none empty, none past the end.
                    assert!(s.chunks * s.qtiles >= q_tiles, "{ctx}");
                    assert!((s.chunks - 1) * s.qtiles < q_tiles, "{ctx}");
                    // Split only as far as needed to reach the target (264 blocks), or all
                    // the way.
                    let blocks = base * s.splits();
                    assert!(
                        blocks >= 264 || s.splits() == batch * group * q_tiles.div_ceil(s.qtiles),
                        "{ctx}"
                    );
                }
            }
        }
    }
}

/// The registry lists every entry of every kernel file once, each with the parameter struct
/// its Rust wrapper passes and a file that the build compiles; the planners' geometry comes
/// from it, so a plan and its kernel cannot disagree (the emulator also refuses a launch whose
/// block size or shared memory differs from the kernel's).
#[test]
fn kernel_registry_is_complete_and_matches_the_rust_param_structs() {
    use prefix_attn::device::kernels::{
        fatbin, BwdParams, DecodeParams, FwdParams, MetaClampParams,
    };
    use prefix_attn::device::registry::{kernel, kernels};
    let all = kernels();
    let mut names: Vec<&str> = all.iter().map(|k| k.name).collect();
    names.sort();
    let before = names.len();
    names.dedup();
    assert_eq!(names.len(), before, "an entry registered twice: {names:?}");
    // (file, entries of that file whose name starts with `prefix`, their parameter struct).
    for (file, prefix, want, size) in [
        (
            "prefix_attn_fwd",
            "prefix_attn_fwd_",
            4,
            std::mem::size_of::<FwdParams>(),
        ),
        (
            "prefix_attn_fwd",
            "prefix_attn_meta_clamp",
            1,
            std::mem::size_of::<MetaClampParams>(),
        ),
        ("prefix_attn_bwd", "", 15, std::mem::size_of::<BwdParams>()),
        (
            "prefix_attn_decode",
            "",
            6,
            std::mem::size_of::<DecodeParams>(),
        ),
        (
            "dense",
            "",
            20,
            std::mem::size_of::<prefix_attn::device::dense::DenseParams>(),
        ),
    ] {
        let of_file: Vec<_> = all
            .iter()
            .filter(|k| k.file == file && k.name.starts_with(prefix))
            .collect();
        assert_eq!(of_file.len(), want, "{file} {prefix}: {of_file:?}");
        assert!(
            of_file.iter().all(|k| k.params_size == size),
            "{file}: {of_file:?}"
        );
        assert!(fatbin(file).is_ok(), "{file} is not in build.rs's KERNELS");
    }
    assert_eq!(all.len(), 46, "{all:?}");
    // The decode kernel packs up to 64 query rows (4 warps of 16) and takes keys 32 a tile.
    let dk = kernel("prefix_attn_decode_d128_f16").unwrap();
    assert_eq!((dk.threads, dk.block_m, dk.block_n), (128, 64, 32));
    // The attention kernels' geometry is their traits': 4 warps of 16 rows in the forward,
    // 64 keys a tile at head dim 64 and 32 at 128, double-buffered tiles.
    let f = kernel("prefix_attn_fwd_d64_f16").unwrap();
    assert_eq!((f.threads, f.block_m, f.block_n), (128, 64, 64));
    assert_eq!(f.smem_bytes, (64 * 64 + 4 * 64 * 64) * 2);
    let f = kernel("prefix_attn_fwd_d128_bf16").unwrap();
    assert_eq!((f.threads, f.block_m, f.block_n), (128, 64, 32));
    let pre = kernel("prefix_attn_bwd_dkv_pre_d128_f16").unwrap();
    assert_eq!((pre.threads, pre.block_m, pre.block_n), (64, 32, 32));
    assert!(kernel("prefix_attn_fwd_d96_f16").is_err());
}

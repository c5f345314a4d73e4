//! The paged decode planned once and run many times ([`DecodePlan`]): the call an engine runs
//! at every generated token, and so the one it most wants inside a CUDA graph.
//!
//! What a plan fixes is what the launch geometry depends on: the shapes (batch, new rows,
//! heads, head dim, pages, page size, block-table width, prefix table) and the dtype. The
//! number of key splits ([`super::kernels::decode_splits`]) depends on the block-table width
//! and the prefix rows, never on the lengths, so a plan made for `max_pages` pages a
//! sequence serves every step until a sequence needs more. A run takes every metadata array
//! from device memory (the block table and `seqlen_k` always; `prefix_index` and `prefix_len`
//! or, when missing, their defaults, which the kernel applies itself), and its split partials
//! from the caller's [`Workspace`]: it allocates nothing, copies nothing from the host and
//! never synchronises. The kernel clamps every metadata value where it reads it, as for any
//! device metadata (docs/ARCHITECTURE.md §1, "Plan and run").

use super::kernel_device::{check_location, run_checks, KernelRunner, Stream, Workspace};
use super::kernels::{plan_decode, KernelLaunch};
use super::Device;
use crate::attn::paged::{PagedAttnArgs, PagedProblem};
use crate::attn::{AttnFwdOut, Meta};
use crate::error::{Error, Result};
use crate::tensor::{DType, Layout, Location, TensorViewMut};

/// A paged decode planned for one shape: see the module documentation.
///
/// [`DecodePlan::new`] validates the shapes with every check of [`super::Backend::attn_decode`]
/// (the planner [`plan_decode`]), fixes the launches (the decode kernel and, with several key
/// splits, the merge), sizes the workspace and loads the kernels. [`DecodePlan::run`] checks
/// the run's tensors against the plan on the host and queues the launches on `stream`.
#[derive(Clone, Debug)]
pub struct DecodePlan {
    device: Device,
    problem: PagedProblem,
    has_prefix: bool,
    launches: Vec<KernelLaunch>,
    part_o_len: usize,
    part_lse_len: usize,
}

/// The rows of the block table a call has: `[B, max_pages]` from a host slice of `B ·
/// max_pages` values or a device tensor's second dimension (0 when neither says; the
/// planner's checks then name the argument).
fn max_pages_of(args: &PagedAttnArgs, batch: usize) -> usize {
    match &args.kv.block_table {
        Meta::Host(v) if batch > 0 => v.len() / batch,
        Meta::Host(_) => 0,
        Meta::Device(t) => t.dims().get(1).copied().unwrap_or(0),
    }
}

/// A contiguous output view at a fake address, for planning only (the planners read an
/// output's dims, strides, dtype, location and address alignment, never an element).
fn plan_view<'a>(dims: &[usize], dtype: DType, loc: Location) -> Result<TensorViewMut<'a>> {
    let layout = Layout::contiguous(dims)?;
    let cap = if layout.numel() == 0 {
        0
    } else {
        layout.span()
    };
    // SAFETY: the view goes only to the planner, which reads no element of a view, and the
    // plan keeps no view.
    unsafe { TensorViewMut::from_raw_parts(1 << 12, cap, loc, dtype, layout) }
}

impl DecodePlan {
    /// Plans paged decodes shaped like `args` on `runner`'s device. Its tensors give the
    /// shapes, dtype and strides (no element is read); its metadata give only the block
    /// table's width `max_pages` (host values of any content, or a device tensor
    /// `[B, max_pages]`); whether `prefix_index` / `prefix_len` are given does not matter
    /// (each run passes its own or none).
    pub fn new<R: KernelRunner>(runner: &R, args: &PagedAttnArgs) -> Result<DecodePlan> {
        let batch = args.q.dims().first().copied().unwrap_or(0);
        let max_pages = max_pages_of(args, batch);
        // Shape-only metadata: page 0 everywhere (the planner requires a page), no keys, the
        // default prefix index and lengths.
        let table = vec![0; batch * max_pages];
        let lens = vec![0; batch];
        let shaped = PagedAttnArgs {
            kv: crate::attn::paged::PagedKv {
                block_table: Meta::Host(&table),
                seqlen_k: Meta::Host(&lens),
                ..args.kv
            },
            prefix_index: None,
            prefix_len: None,
            ..*args
        };
        let pr = shaped.check()?;
        check_location(runner, pr.location)?;
        let out = AttnFwdOut {
            o: plan_view(&pr.q_dims(), pr.dtype, pr.location)?,
            lse: Some(plan_view(&pr.lse_dims(), DType::F32, pr.location)?),
        };
        let l = plan_decode(&shaped, &out)?;
        let entries: Vec<&'static str> = l.launches.iter().map(|l| l.entry).collect();
        runner.prepare(&entries)?;
        Ok(DecodePlan {
            device: runner.device(),
            has_prefix: args.prefix.is_some(),
            launches: l.launches,
            part_o_len: l.part_o_len,
            part_lse_len: l.part_lse_len,
            problem: l.problem,
        })
    }

    /// Bytes of the partial outputs in the workspace, rounded up to 256 (the partial LSEs
    /// follow).
    fn part_o_bytes(&self) -> usize {
        (4 * self.part_o_len).next_multiple_of(256)
    }

    /// Bytes of [`Workspace`] a run needs: the f32 partial outputs and LSEs of the key splits
    /// (0 with one split: a run then needs no workspace).
    pub fn workspace_bytes(&self) -> usize {
        if self.part_o_len == 0 {
            0
        } else {
            self.part_o_bytes() + 4 * self.part_lse_len
        }
    }

    /// Key splits per (sequence, KV head) a run uses (1: no merge).
    pub fn splits(&self) -> usize {
        self.launches.first().map_or(1, |l| l.grid.0 as usize)
    }

    /// The kernel launches of a run, in order.
    pub fn launches(&self) -> &[KernelLaunch] {
        &self.launches
    }

    /// The device it was planned for.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The validated problem (its sizes; its metadata vectors are placeholders).
    pub fn problem(&self) -> &PagedProblem {
        &self.problem
    }

    /// The decode on `runner` (the plan's device) with the tensors of `args` and `out`, which
    /// must have the plan's shapes and dtype, and every metadata array a device tensor:
    /// `block_table` `[B, max_pages]` and `seqlen_k` `[B]`, and `prefix_index` `[B]` and
    /// `prefix_len` `[NP]` or none (their defaults: prefix 0, `P` rows). `workspace` holds at
    /// least [`DecodePlan::workspace_bytes`] bytes (any, when that is 0).
    pub fn run<R: KernelRunner>(
        &self,
        runner: &R,
        args: &PagedAttnArgs,
        out: AttnFwdOut,
        workspace: Workspace,
        stream: Stream,
    ) -> Result<()> {
        run_checks::device(self.device, runner)?;
        let required = [
            ("block_table", Some(&args.kv.block_table)),
            ("seqlen_k", Some(&args.kv.seqlen_k)),
            ("prefix_index", args.prefix_index.as_ref()),
            ("prefix_len", args.prefix_len.as_ref()),
        ];
        for (name, m) in required {
            if let Some(Meta::Host(_)) = m {
                return Err(Error::device(
                    name,
                    "host metadata given to a plan's run, which copies nothing from the host: \
                     pass an i32 tensor on the plan's device",
                ));
            }
        }
        let mut l = plan_decode(args, &out)?;
        self.check_problem(runner, &l.problem, args.prefix.is_some())?;
        self.check_workspace(&workspace)?;
        let _keep = out;
        let p = &mut l.params;
        // Device tensors (checked above), so the planner recorded their addresses; a missing
        // prefix_index / prefix_len is the kernel's default (a null address).
        [p.block_table, p.seqlen_k, p.prefix_index, p.prefix_len] =
            l.meta_dev.map(|a| a.unwrap_or(0));
        if self.part_o_len > 0 {
            p.part_o = workspace.addr();
            p.part_lse = workspace.addr() + self.part_o_bytes() as u64;
        }
        for launch in &l.launches {
            // SAFETY: the planner checked every tensor address, shape and stride in
            // `l.params` against the views the caller borrows for the call (the device
            // metadata among them; the kernel clamps their values where it reads them), and
            // the partials fit the workspace (checked above), which is the caller's.
            unsafe { runner.launch_on(launch, &l.params, stream)? };
        }
        Ok(())
    }

    /// The run's problem (validated by the planner) against the plan's.
    fn check_problem<R: KernelRunner>(
        &self,
        runner: &R,
        pr: &PagedProblem,
        has_prefix: bool,
    ) -> Result<()> {
        check_location(runner, pr.location)?;
        let p = &self.problem;
        run_checks::dtype(p.dtype, pr.dtype)?;
        run_checks::dims("q", "[B, Tq, Hq, D]", &p.q_dims(), &pr.q_dims())?;
        let cache = |p: &PagedProblem| [p.num_pages, p.page_size, p.heads_kv, p.head_dim];
        run_checks::dims(
            "k_cache",
            "[num_pages, page_size, Hkv, D]",
            &cache(p),
            &cache(pr),
        )?;
        run_checks::dims(
            "block_table",
            "[B, max_pages]",
            &[p.batch, p.max_pages],
            &[pr.batch, pr.max_pages],
        )?;
        let table = |p: &PagedProblem| [p.num_prefixes, p.prefix_rows, p.heads_kv, p.head_dim];
        run_checks::prefix(
            self.has_prefix.then(|| table(p)),
            has_prefix.then(|| table(pr)),
        )?;
        run_checks::scale(p.scale, pr.scale)
    }

    /// The workspace is on the plan's device, aligned, and holds the partials (any workspace
    /// when the plan does not split).
    fn check_workspace(&self, ws: &Workspace) -> Result<()> {
        let need = self.workspace_bytes();
        if need == 0 {
            return Ok(());
        }
        run_checks::workspace(ws, self.problem.location, need, need)
    }
}

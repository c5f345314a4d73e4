//! The kernel registry, read from the kernels themselves.
//!
//! Every kernel entry registers itself next to its definition (`PA_REGISTER_KERNEL` in
//! `kernels/common/registry.h`) with its parameter struct's size and the launch geometry of its
//! traits: block size, dynamic shared memory, tile sizes. The kernel sources are also compiled
//! into the emulator library, which every build links, so that list is readable here on any
//! machine: the planners take their geometry from it (one source of truth, the C++ traits), the
//! `emu` device launches by name through it, and the `cuda` device finds an entry's fatbin from
//! the source file it names.

use crate::error::{Error, Result};
use std::ffi::{c_char, c_int, CStr};
use std::sync::OnceLock;

/// C mirror: `PaKernelInfo` in `kernels/common/registry.h`.
#[repr(C)]
struct RawInfo {
    name: *const c_char,
    file: *const c_char,
    params_size: usize,
    threads: c_int,
    smem_bytes: c_int,
    block_m: c_int,
    block_n: c_int,
}

extern "C" {
    fn pa_kernel_count() -> usize;
    fn pa_kernel_info(i: usize) -> *const RawInfo;
}

/// One registered kernel entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelInfo {
    /// The `extern "C"` entry name, as in the fatbin.
    pub name: &'static str,
    /// The stem of the kernel's source file (`prefix_attn_fwd`, ...), which names its fatbin.
    pub file: &'static str,
    /// Size of the parameter struct passed by value.
    pub params_size: usize,
    /// The block size the kernel is written for; 0 when the planner chooses (grid-stride or
    /// one-thread-per-element kernels).
    pub threads: u32,
    /// Dynamic shared memory per block, bytes.
    pub smem_bytes: usize,
    /// Query rows of one tile (rows per block for one-warp-per-row kernels); 0 if none.
    pub block_m: usize,
    /// Keys of one tile; 0 if none.
    pub block_n: usize,
}

/// Every registered kernel entry, in registration order.
pub fn kernels() -> &'static [KernelInfo] {
    static LIST: OnceLock<Vec<KernelInfo>> = OnceLock::new();
    LIST.get_or_init(|| {
        let text = |p: *const c_char| -> &'static str {
            // SAFETY: the registry's strings are string literals of the emulator library
            // (static storage, NUL-terminated), alive for the whole process.
            unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("")
        };
        // SAFETY: plain reads of the registry, filled before main by static initialisers.
        let n = unsafe { pa_kernel_count() };
        (0..n)
            .filter_map(|i| {
                // SAFETY: i < count, so the pointer is valid for the process's lifetime.
                let raw = unsafe { pa_kernel_info(i).as_ref() }?;
                let path = text(raw.file);
                let file = path.rsplit('/').next().unwrap_or(path);
                Some(KernelInfo {
                    name: text(raw.name),
                    file: file.strip_suffix(".cu").unwrap_or(file),
                    params_size: raw.params_size,
                    threads: raw.threads.max(0) as u32,
                    smem_bytes: raw.smem_bytes.max(0) as usize,
                    block_m: raw.block_m.max(0) as usize,
                    block_n: raw.block_n.max(0) as usize,
                })
            })
            .collect()
    })
}

/// The registered entry `name`.
pub fn kernel(name: &str) -> Result<&'static KernelInfo> {
    kernels().iter().find(|k| k.name == name).ok_or_else(|| {
        Error::Unsupported(format!(
            "kernel {name}: not in the kernel registry (kernels/common/registry.h)"
        ))
    })
}

// The kernel registry: every kernel entry registers itself, next to its definition, with its
// parameter struct and its launch geometry read from the kernel's own traits. This list is the
// one source of truth the Rust side reads (through the emulator library, which is linked into
// every build): the planners take threads, shared-memory bytes and tile sizes from it, the
// `emu` device launches by name through it, and the `cuda` device finds an entry's fatbin by
// the source file it names. Under nvcc the macro expands to nothing.
//
//   PA_REGISTER_KERNEL(entry, Params, threads, smem_bytes, block_m, block_n)
//
// threads: the block size the kernel is written for (0: the planner chooses, for grid-stride
// kernels); smem_bytes: dynamic shared memory per block; block_m, block_n: the query rows and
// keys of one tile (0 where the kernel has none). Adding a kernel: its .cu (listed in build.rs),
// one PA_REGISTER_KERNEL line per entry, and its typed Rust wrapper.
#pragma once

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/// What the registry knows of one kernel entry (mirrored by `KernelInfo` in
/// src/device/registry.rs).
typedef struct PaKernelInfo {
    const char* name;    // the extern "C" entry name, as in the fatbin
    const char* file;    // the kernel's source file (its stem names the fatbin)
    size_t params_size;  // sizeof the parameter struct passed by value
    int threads;
    int smem_bytes;
    int block_m;
    int block_n;
} PaKernelInfo;

#ifdef __cplusplus
}
#endif

#if defined(PREFIX_ATTN_EMU)
namespace emu {
// Type-erased launcher: runs `entry` on the emulator with *params (of the registered type).
using EntryLauncher = int (*)(const void* params, dim3 grid, dim3 block, size_t smem, char* err, size_t err_len);
// Adds an entry to the registry (at static-initialisation time); returns its index.
int register_kernel(const PaKernelInfo& info, EntryLauncher launcher);
}  // namespace emu

#define PA_REGISTER_KERNEL(entry, Params, threads, smem_bytes, block_m, block_n)                             \
    static int pa_registered_##entry = emu::register_kernel(                                              \
        PaKernelInfo{#entry, __FILE__, sizeof(Params), (threads), (smem_bytes), (block_m), (block_n)}, \
        [](const void* p, dim3 grid, dim3 block, size_t smem, char* err, size_t err_len) -> int {         \
            const Params params = *static_cast<const Params*>(p);                                        \
            return emu::launch(grid, block, smem, [&] { entry(params); }, err, err_len);                 \
        });
#else
#define PA_REGISTER_KERNEL(entry, Params, threads, smem_bytes, block_m, block_n)
#endif

// Platform layer: the same kernel sources compile with nvcc for the GPU and with g++ for the
// CPU emulator (PREFIX_ATTN_EMU, see kernels/emu/emu.h). Kernels use only what this header and
// prims.cuh provide.
#pragma once

#if defined(PREFIX_ATTN_EMU)
#include "../emu/emu.h"
#define PA_DEVICE inline
#define PA_GLOBAL
#define PA_LAUNCH_BOUNDS(threads, min_blocks)
// Dynamic shared memory: one buffer per block, owned by the emulator.
#define PA_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(emu::dynamic_smem())
// A wrapper's last, defaulted parameter: its caller's source location (the emulator's reports
// and its set_drop_sync name the kernel's line, not the wrapper's). Nothing under nvcc.
#define PA_CALL_SITE std::source_location loc = std::source_location::current()
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#define PA_DEVICE __device__ __forceinline__
#define PA_GLOBAL __global__
#define PA_LAUNCH_BOUNDS(threads, min_blocks) __launch_bounds__(threads, min_blocks)
#define PA_CALL_SITE
#define PA_DYNAMIC_SMEM(type, name) \
    extern __shared__ __align__(16) unsigned char pa_dynamic_smem_[]; \
    type* name = reinterpret_cast<type*>(pa_dynamic_smem_)
#endif

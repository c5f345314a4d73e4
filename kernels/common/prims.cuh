// One small wrapper per PTX instruction the kernels use. Under nvcc each is inline PTX; under
// the CPU emulator (PREFIX_ATTN_EMU) each calls the emulator's implementation of the documented
// fragment layout (kernels/emu/emu.h), so this file is the seam between the two.
#pragma once
#include "platform.cuh"

namespace pa {

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: D = A·B + C for one warp.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-fragment-mma-16816-float
// With g = lane >> 2, t = lane % 4:
//   a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   b[0] = B[2t..2t+1][g],  b[1] = B[2t+8..2t+9][g]   (two 16-bit values per register, low first)
//   c/d[0..1] = C[g][2t..2t+1], c/d[2..3] = C[g+8][2t..2t+1]
PA_DEVICE void mma_m16n8k16_f16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
#if defined(PREFIX_ATTN_EMU)
    emu::mma_m16n8k16(d, a, b, c, emu::Elem::F16);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

PA_DEVICE void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
#if defined(PREFIX_ATTN_EMU)
    emu::mma_m16n8k16(d, a, b, c, emu::Elem::BF16);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
#endif
}

#if !defined(PREFIX_ATTN_EMU)
PA_DEVICE uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16: four 8x8 matrices of 16-bit values.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-instructions-ldmatrix
// Lane l gives the 16-byte-aligned address of row l % 8 of matrix l / 8. Without .trans,
// r[j] of lane l = M_j[l >> 2][2(l % 4) .. +1]; with .trans, r[j] of lane l =
// (M_j[2(l % 4)][l >> 2], M_j[2(l % 4) + 1][l >> 2]) (low, high).
PA_DEVICE void ldmatrix_x4(uint32_t r[4], const void* row) {
#if defined(PREFIX_ATTN_EMU)
    emu::ldmatrix(r, 4, false, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
#endif
}

PA_DEVICE void ldmatrix_x4_trans(uint32_t r[4], const void* row) {
#if defined(PREFIX_ATTN_EMU)
    emu::ldmatrix(r, 4, true, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
#endif
}

// x2 / x1: only lanes 0-15 / 0-7 supply addresses (the others' are ignored).
PA_DEVICE void ldmatrix_x2(uint32_t r[2], const void* row) {
#if defined(PREFIX_ATTN_EMU)
    emu::ldmatrix(r, 2, false, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(row)));
#endif
}

PA_DEVICE void ldmatrix_x2_trans(uint32_t r[2], const void* row) {
#if defined(PREFIX_ATTN_EMU)
    emu::ldmatrix(r, 2, true, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_addr(row)));
#endif
}

PA_DEVICE void ldmatrix_x1(uint32_t r[1], const void* row) {
#if defined(PREFIX_ATTN_EMU)
    emu::ldmatrix(r, 1, false, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(smem_addr(row)));
#endif
}

PA_DEVICE void ldmatrix_x1_trans(uint32_t r[1], const void* row) {
#if defined(PREFIX_ATTN_EMU)
    emu::ldmatrix(r, 1, true, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(smem_addr(row)));
#endif
}

// cp.async.cg.shared.global [dst], [src], 16, src_size: copies 16 bytes (src_size = 16) or
// writes 16 zero bytes (src_size = 0, the source is not read) asynchronously. Both addresses
// must be 16-byte aligned.
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-cp-async
PA_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
#if defined(PREFIX_ATTN_EMU)
    emu::cp_async_16(smem_dst, gmem_src, valid);
#else
    const int src_size = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)),
                 "l"(gmem_src), "r"(src_size));
#endif
}

// cp.async.commit_group: closes the group of this thread's outstanding copies.
PA_DEVICE void cp_async_commit() {
#if defined(PREFIX_ATTN_EMU)
    emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// cp.async.wait_group N: waits until at most N of this thread's groups are pending.
template <int N>
PA_DEVICE void cp_async_wait(PA_CALL_SITE) {
#if defined(PREFIX_ATTN_EMU)
    emu::cp_async_wait(N, loc);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Butterfly shuffle within a warp (all 32 lanes participate).
PA_DEVICE float shfl_xor(float v, int lane_mask) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

}  // namespace pa

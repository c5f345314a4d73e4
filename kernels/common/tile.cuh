// The small tile vocabulary both attention kernels share: the swizzled shared-memory layout of
// a [rows][head_dim] 16-bit tile, the cp.async loader that fills it, and the per-type fragment
// operations (packing fp32 pairs into 16-bit registers, the matching mma).
#pragma once
#include "prims.cuh"

namespace pa {

// Element offset of chunk c (8 elements, 16 bytes) of row r in a swizzled [rows][kHeadDim]
// tile. XOR-ing the chunk with the row's low 3 bits puts the 8 rows that one ldmatrix reads at
// the same logical chunk into 8 different 16-byte bank groups: conflict-free. Needs at least 8
// chunks per row (kHeadDim >= 64).
template <int kHeadDim>
PA_DEVICE int swz(int r, int c) {
    static_assert(kHeadDim / 8 >= 8, "the XOR swizzle permutes 8 chunks per row");
    return r * kHeadDim + ((c ^ (r & 7)) << 3);
}

// Stages kRows rows × kHeadDim of a strided tensor into a swizzled shared tile with cp.async,
// kThreads threads sharing the chunks. Row r comes from base + (first + r) * row_stride when
// first + r < valid_rows; other rows are zero-filled (their source is not read).
template <int kHeadDim, int kRows, int kThreads, typename T>
PA_DEVICE void load_tile(T* smem, const T* base, int64_t row_stride, int first, int valid_rows, int tid) {
    constexpr int kChunks = kHeadDim / 8;
    constexpr int kTotal = kRows * kChunks;
#pragma unroll
    for (int idx = tid; idx < kTotal; idx += kThreads) {
        const int r = idx / kChunks;
        const int c = idx % kChunks;
        const bool valid = first + r < valid_rows;
        const T* src = valid ? base + (int64_t)(first + r) * row_stride + c * 8 : base;
        cp_async_16(smem + swz<kHeadDim>(r, c), src, valid);
    }
}

// Writes one packed pair of 16-bit values (4 bytes) to global memory with a single 32-bit
// store. The launchers require 4-byte aligned bases and even element strides for every output
// written this way; a memcpy into a (2-byte aligned) T* would compile to four byte stores.
template <typename T>
PA_DEVICE void store_pair(T* dst, uint32_t packed) {
    static_assert(sizeof(T) == 2, "a pair of 16-bit values");
    *reinterpret_cast<uint32_t*>(dst) = packed;
}

template <typename T>
struct TypeOps;

template <>
struct TypeOps<__half> {
    // Two fp32 values rounded into one register (low half first), as the mma operands expect.
    static PA_DEVICE uint32_t pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        uint32_t u;
        memcpy(&u, &h, 4);
        return u;
    }
    static PA_DEVICE float to_f(__half x) { return __half2float(x); }
    static PA_DEVICE void mma(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
        mma_m16n8k16_f16(d, a, b, c);
    }
};

template <>
struct TypeOps<__nv_bfloat16> {
    static PA_DEVICE uint32_t pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        uint32_t u;
        memcpy(&u, &h, 4);
        return u;
    }
    static PA_DEVICE float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
    static PA_DEVICE void mma(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
        mma_m16n8k16_bf16(d, a, b, c);
    }
};

}  // namespace pa

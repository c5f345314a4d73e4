// Paged-KV decode (docs/ARCHITECTURE.md §1, "paged decode"): Tq <= 16 new queries per
// sequence over [prefix table ; paged sequence K/V], with flash-decoding's split over keys.
//
// A block owns one (key chunk, KV head, sequence): the G·Tq query rows that share the KV head
// (G query heads × Tq new rows, at most kMaxRows) are packed into one block, so each key and
// value row of the chunk is read from global memory once per KV head. Keys are staged in
// shared memory kBlockN at a time, prefix rows first (from the table at prefix_index[b], up to
// prefix_len[n]), then the sequence keys, each found through the block table. Each warp owns
// rows warp, warp + 4, ...: a lane scores one key of the tile, the warp's online softmax runs
// in base 2 in fp32, and a lane accumulates D/32 output dims. Decode is bandwidth-bound, so
// the products run on the FMA pipes. With one chunk the block writes o and lse; with several
// it writes f32 partials that prefix_attn_decode_merge combines by their LSE in split order
// (deterministic). Metadata values are clamped where they are read (kernels/common/meta.cuh).
#include "common/meta.cuh"
#include "common/params.h"
#include "common/prims.cuh"
#include "common/registry.h"
#include "common/tile.cuh"

namespace pa {

template <int kHeadDim>
struct DecodeTraits {
    static constexpr int kWarps = 4;
    static constexpr int kThreads = kWarps * 32;
    // Keys per tile: one per lane.
    static constexpr int kBlockN = 32;
    // Query rows of one KV head a block holds (G · Tq), kRowsPerWarp per warp.
    static constexpr int kRowsPerWarp = 16;
    static constexpr int kMaxRows = kWarps * kRowsPerWarp;
    // Output dims per lane.
    static constexpr int kDimsPerLane = kHeadDim / 32;
    static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
    // sQ [kMaxRows][D], sK and sV [kBlockN][D] (16-bit), sP [kWarps][kRowsPerWarp][kBlockN] f32.
    static constexpr int kSmemBytes =
        (kMaxRows + 2 * kBlockN) * kHeadDim * 2 + kWarps * kRowsPerWarp * kBlockN * 4;
    static_assert(kHeadDim % 64 == 0, "head dims 64 and 128: two or four dims per lane");
};

// The chunk of keys a split takes: whole tiles, the same count for every split of a sequence.
PA_DEVICE int decode_chunk(int keys, int splits, int block_n) {
    const int per = (keys + splits - 1) / splits;
    return (per + block_n - 1) / block_n * block_n;
}

template <int kHeadDim, typename T>
PA_DEVICE void decode_kernel(const PrefixAttnDecodeParams& p) {
    using Tr = DecodeTraits<kHeadDim>;
    using Ops = TypeOps<T>;
    constexpr int kDP = Tr::kDimsPerLane;
    const int split = blockIdx.x, hkv = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int group = p.heads_q / p.heads_kv;
    const int rows = group * p.tq;

    // Metadata, clamped: keys in the sequence's pages, its prefix and that prefix's rows.
    const int sk = clamp_len(reinterpret_cast<const int32_t*>(p.seqlen_k)[b], p.max_pages * p.page_size);
    // A null prefix_index / prefix_len (a planned run given none) means the defaults:
    // prefix 0 for every sequence, P valid rows in every prefix.
    const int32_t* prefix_index = reinterpret_cast<const int32_t*>(p.prefix_index);
    const int32_t* prefix_len = reinterpret_cast<const int32_t*>(p.prefix_len);
    const int pidx = clamp_prefix(prefix_index ? prefix_index[b] : 0, p.num_prefixes);
    const int plen = pidx >= 0 ? clamp_len(prefix_len ? prefix_len[pidx] : p.prefix_rows, p.prefix_rows) : 0;
    const int32_t* table = reinterpret_cast<const int32_t*>(p.block_table) + (int64_t)b * p.max_pages;
    const int keys = plen + sk;
    const int chunk = decode_chunk(keys, p.splits, Tr::kBlockN);
    const int k_begin = split * chunk;
    const int k_end = k_begin + chunk < keys ? k_begin + chunk : keys;

    PA_DYNAMIC_SMEM(T, smem);
    T* sQ = smem;
    T* sK = sQ + Tr::kMaxRows * kHeadDim;
    T* sV = sK + Tr::kBlockN * kHeadDim;
    float* sP = reinterpret_cast<float*>(sV + Tr::kBlockN * kHeadDim) + warp * Tr::kRowsPerWarp * Tr::kBlockN;

    // Q rows of the group: row r = (query head hkv·G + r / Tq, new row r % Tq).
    for (int c = tid; c < rows * Tr::kChunks; c += Tr::kThreads) {
        const int r = c / Tr::kChunks, ch = c % Tr::kChunks;
        const int h = hkv * group + r / p.tq, i = r % p.tq;
        const T* src = reinterpret_cast<const T*>(p.q) + b * p.q_batch_stride + i * p.q_row_stride + h * p.q_head_stride;
        *reinterpret_cast<uint4*>(sQ + r * kHeadDim + ch * 8) = *reinterpret_cast<const uint4*>(src + ch * 8);
    }

    float acc[Tr::kRowsPerWarp][kDP];
    float m_run[Tr::kRowsPerWarp], l_run[Tr::kRowsPerWarp];
#pragma unroll
    for (int w = 0; w < Tr::kRowsPerWarp; ++w) {
        m_run[w] = -INFINITY;
        l_run[w] = 0.f;
#pragma unroll
        for (int d = 0; d < kDP; ++d) acc[w][d] = 0.f;
    }
    // Keys row r sees: its whole prefix, then the sequence keys below sk - Tq + i + 1
    // (i = r % Tq), recomputed where needed rather than held in registers.
    auto visible = [&](int r) {
        const int n = sk - p.tq + r % p.tq + 1;
        return plen + (n < 0 ? 0 : (n > sk ? sk : n));
    };

    for (int t0 = k_begin; t0 < k_end; t0 += Tr::kBlockN) {
        // Stage keys t0 .. t0 + kBlockN (past k_end: zeros, masked below).
        for (int c = tid; c < Tr::kBlockN * Tr::kChunks; c += Tr::kThreads) {
            const int kr = c / Tr::kChunks, ch = c % Tr::kChunks;
            const int g = t0 + kr;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (g < k_end) {
                const T* kp;
                const T* vp;
                if (g < plen) {
                    kp = reinterpret_cast<const T*>(p.k_pre) + pidx * p.kp_prefix_stride + g * p.kp_row_stride + hkv * p.kp_head_stride;
                    vp = reinterpret_cast<const T*>(p.v_pre) + pidx * p.vp_prefix_stride + g * p.vp_row_stride + hkv * p.vp_head_stride;
                } else {
                    const int j = g - plen;
                    const int page = clamp_len(table[j / p.page_size], p.num_pages - 1);
                    const int slot = j & (p.page_size - 1);
                    kp = reinterpret_cast<const T*>(p.k_cache) + page * p.kc_page_stride + slot * p.kc_row_stride + hkv * p.kc_head_stride;
                    vp = reinterpret_cast<const T*>(p.v_cache) + page * p.vc_page_stride + slot * p.vc_row_stride + hkv * p.vc_head_stride;
                }
                kv = *reinterpret_cast<const uint4*>(kp + ch * 8);
                vv = *reinterpret_cast<const uint4*>(vp + ch * 8);
            }
            *reinterpret_cast<uint4*>(sK + kr * kHeadDim + ch * 8) = kv;
            *reinterpret_cast<uint4*>(sV + kr * kHeadDim + ch * 8) = vv;
        }
        __syncthreads();
        const int key = t0 + lane;
#pragma unroll
        for (int w = 0; w < Tr::kRowsPerWarp; ++w) {
            const int r = warp + Tr::kWarps * w;
            if (r >= rows) break;
            // Score of this lane's key.
            float s = 0.f;
            for (int d = 0; d < kHeadDim; ++d) s += Ops::to_f(sQ[r * kHeadDim + d]) * Ops::to_f(sK[lane * kHeadDim + d]);
            s = key < k_end && key < visible(r) ? s * p.scale_log2 : -INFINITY;
            float m_new = fmaxf(m_run[w], s);
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) m_new = fmaxf(m_new, shfl_xor(m_new, off));
            // A row with no visible key yet keeps max -inf: exponentiate against 0 (no NaN).
            const float base = m_new == -INFINITY ? 0.f : m_new;
            const float corr = m_run[w] == -INFINITY ? 0.f : exp2f(m_run[w] - base);
            m_run[w] = m_new;
            const float e = exp2f(s - base);
            l_run[w] = l_run[w] * corr + e;
#pragma unroll
            for (int d = 0; d < kDP; ++d) acc[w][d] *= corr;
            sP[w * Tr::kBlockN + lane] = e;
        }
        // The probabilities of this warp's rows, written above by each lane, are read by all.
        __syncwarp();
#pragma unroll
        for (int w = 0; w < Tr::kRowsPerWarp; ++w) {
            const int r = warp + Tr::kWarps * w;
            if (r >= rows) break;
            for (int j = 0; j < Tr::kBlockN; ++j) {
                const float pj = sP[w * Tr::kBlockN + j];
#pragma unroll
                for (int d = 0; d < kDP; ++d) acc[w][d] += pj * Ops::to_f(sV[j * kHeadDim + lane * kDP + d]);
            }
        }
        // The next tile overwrites sK, sV and sP.
        __syncthreads();
    }

    const float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int w = 0; w < Tr::kRowsPerWarp; ++w) {
        const int r = warp + Tr::kWarps * w;
        if (r >= rows) break;
        float l = l_run[w];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) l += shfl_xor(l, off);
        const bool any = l > 0.f;
        const float inv = any ? 1.f / l : 0.f;
        const float lse = any ? (m_run[w] + log2f(l)) * kLn2 : -INFINITY;
        const int h = hkv * group + r / p.tq, i = r % p.tq;
        if (p.splits == 1) {
            T* o = reinterpret_cast<T*>(p.o) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
#pragma unroll
            for (int d = 0; d < kDP; d += 2)
                store_pair(o + lane * kDP + d, Ops::pack(acc[w][d] * inv, acc[w][d + 1] * inv));
            if (lane == 0 && p.lse != 0)
                reinterpret_cast<float*>(p.lse)[b * p.lse_batch_stride + h * p.lse_head_stride + i] = lse;
        } else {
            const int64_t row = (((int64_t)split * p.batch + b) * p.heads_q + h) * p.tq + i;
            float* po = reinterpret_cast<float*>(p.part_o) + row * kHeadDim + lane * kDP;
#pragma unroll
            for (int d = 0; d < kDP; d += 2)
                *reinterpret_cast<float2*>(po + d) = make_float2(acc[w][d] * inv, acc[w][d + 1] * inv);
            if (lane == 0) reinterpret_cast<float*>(p.part_lse)[row] = lse;
        }
    }
}

// Merge of the split partials: one warp per output row (b, h, i), the splits in order.
constexpr int kMergeThreads = 128;
template <typename T>
PA_DEVICE void decode_merge_kernel(const PrefixAttnDecodeParams& p) {
    using Ops = TypeOps<T>;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t rows = (int64_t)p.batch * p.heads_q * p.tq;
    const int64_t row = (int64_t)blockIdx.x * (kMergeThreads / 32) + warp;
    if (row >= rows) return;
    const int i = row % p.tq, h = row / p.tq % p.heads_q, b = row / ((int64_t)p.tq * p.heads_q);
    const float* plse = reinterpret_cast<const float*>(p.part_lse);
    const float* po = reinterpret_cast<const float*>(p.part_o);
    float m = -INFINITY;
    for (int s = 0; s < p.splits; ++s) m = fmaxf(m, plse[s * rows + row]);
    float total = 0.f;
    if (m != -INFINITY)
        for (int s = 0; s < p.splits; ++s) total += expf(plse[s * rows + row] - m);
    T* o = reinterpret_cast<T*>(p.o) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
    for (int d = 2 * lane; d < p.head_dim; d += 64) {
        float a0 = 0.f, a1 = 0.f;
        if (m != -INFINITY)
            for (int s = 0; s < p.splits; ++s) {
                const float w = expf(plse[s * rows + row] - m) / total;
                const float2 v = *reinterpret_cast<const float2*>(po + (s * rows + row) * p.head_dim + d);
                a0 += w * v.x;
                a1 += w * v.y;
            }
        store_pair(o + d, Ops::pack(a0, a1));
    }
    if (lane == 0 && p.lse != 0)
        reinterpret_cast<float*>(p.lse)[b * p.lse_batch_stride + h * p.lse_head_stride + i] =
            m == -INFINITY ? -INFINITY : m + logf(total);
}

}  // namespace pa

#define PA_DECODE_ENTRY(name, D, T)                                                                         \
    extern "C" PA_GLOBAL void PA_LAUNCH_BOUNDS(pa::DecodeTraits<D>::kThreads, 1) name(PrefixAttnDecodeParams p) { \
        pa::decode_kernel<D, T>(p);                                                                         \
    }                                                                                                       \
    PA_REGISTER_KERNEL(name, PrefixAttnDecodeParams, pa::DecodeTraits<D>::kThreads,                         \
                       pa::DecodeTraits<D>::kSmemBytes, pa::DecodeTraits<D>::kMaxRows, pa::DecodeTraits<D>::kBlockN)

PA_DECODE_ENTRY(prefix_attn_decode_d64_f16, 64, __half)
PA_DECODE_ENTRY(prefix_attn_decode_d128_f16, 128, __half)
PA_DECODE_ENTRY(prefix_attn_decode_d64_bf16, 64, __nv_bfloat16)
PA_DECODE_ENTRY(prefix_attn_decode_d128_bf16, 128, __nv_bfloat16)

#define PA_MERGE_ENTRY(name, T)                                                                   \
    extern "C" PA_GLOBAL void PA_LAUNCH_BOUNDS(pa::kMergeThreads, 1) name(PrefixAttnDecodeParams p) { \
        pa::decode_merge_kernel<T>(p);                                                            \
    }                                                                                             \
    PA_REGISTER_KERNEL(name, PrefixAttnDecodeParams, pa::kMergeThreads, 0, pa::kMergeThreads / 32, 0)

PA_MERGE_ENTRY(prefix_attn_decode_merge_f16, __half)
PA_MERGE_ENTRY(prefix_attn_decode_merge_bf16, __nv_bfloat16)

#if defined(PREFIX_ATTN_EMU)
#include <cstddef>

// Size and field offsets of the decode parameter struct, for the layout test.
extern "C" size_t pa_decode_params_layout(size_t* out, size_t n) {
    const size_t v[] = {
        sizeof(PrefixAttnDecodeParams),
        offsetof(PrefixAttnDecodeParams, block_table),
        offsetof(PrefixAttnDecodeParams, part_lse),
        offsetof(PrefixAttnDecodeParams, q_batch_stride),
        offsetof(PrefixAttnDecodeParams, lse_head_stride),
        offsetof(PrefixAttnDecodeParams, batch),
        offsetof(PrefixAttnDecodeParams, splits),
        offsetof(PrefixAttnDecodeParams, scale_log2),
    };
    const size_t count = sizeof(v) / sizeof(v[0]);
    for (size_t i = 0; i < count && i < n; ++i) out[i] = v[i];
    return count;
}
#endif

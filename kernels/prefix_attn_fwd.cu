// Fused prefix attention, forward: attention over [prefix K/V ; sequence K/V] without
// materialising the concatenation (docs/ARCHITECTURE.md §1), FlashAttention-2 style.
//
// A block of 4 warps owns 64 query rows of one (sequence b, query head h); each warp owns 16
// rows. The block walks the key tiles that its rows can see: first the prefix tiles (read
// straight from the prefix table at prefix_index[b]), then the sequence tiles up to the last
// key its last valid row sees. Tiles are staged in shared memory by cp.async with double
// buffering, read into tensor-core fragments by ldmatrix, and multiplied by mma.sync m16n8k16
// with fp32 accumulation; the softmax is online, in base 2, in fp32. Output o in the input
// type, lse (natural log) in fp32. Rows that see no key get o = 0, lse = -inf.
#include "common/meta.cuh"
#include "common/params.h"
#include "common/prims.cuh"
#include "common/registry.h"
#include "common/tile.cuh"

namespace pa {

// Compile-time choices of the forward kernel.
template <int kHeadDim>
struct FwdTraits {
    static constexpr int kWarps = 4;
    static constexpr int kThreads = kWarps * 32;
    // 16 rows per warp: the M dimension of one m16n8k16 fragment.
    static constexpr int kBlockM = kWarps * 16;
    // Keys per tile: 64 (8 n-fragments of S, 32 fp32 registers) for head dim 64; 32 for head
    // dim 128, whose O accumulators (64 registers) and Q fragments (32) leave less room.
    static constexpr int kBlockN = kHeadDim <= 64 ? 64 : 32;
    // A shared-memory row is kHeadDim 16-bit values = kChunks 16-byte chunks.
    static constexpr int kChunks = kHeadDim / 8;
    // Q tile + two K tiles + two V tiles (double buffering), in 16-bit elements.
    static constexpr int kTileElems = kBlockM * kHeadDim;
    static constexpr int kSmemElems = kTileElems + 4 * kBlockN * kHeadDim;
    static constexpr int kSmemBytes = kSmemElems * 2;
    static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of the mma K (16)");
    static_assert(kBlockN % 16 == 0, "P·V takes keys 16 at a time");
};

template <int kHeadDim, typename T>
PA_DEVICE void fwd_kernel(const PrefixAttnFwdParams& p) {
    using Tr = FwdTraits<kHeadDim>;
    using Ops = TypeOps<T>;
    constexpr int kNFrags = Tr::kBlockN / 8;   // n-fragments of S per tile
    constexpr int kDFrags = kHeadDim / 8;      // n-fragments of O
    constexpr int kKSteps = kHeadDim / 16;     // k-steps of Q·Kᵀ

    // Causal query tiles further down see more keys: launch them first (reversed order) so the
    // last wave of blocks holds the short tiles and the tail is short.
    const int m_block = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int h = blockIdx.y;
    const int b = blockIdx.z;
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int g = lane >> 2;  // fragment row
    const int t = lane & 3;   // fragment column pair

    const int sq = reinterpret_cast<const int32_t*>(p.seqlen_q)[b];
    const int sk = reinterpret_cast<const int32_t*>(p.seqlen_k)[b];
    const int pidx = reinterpret_cast<const int32_t*>(p.prefix_index)[b];
    const int hkv = h / (p.heads_q / p.heads_kv);
    const int plen = pidx >= 0 ? p.prefix_len : 0;

    // Keys of the sequence seen by row i: clamp(i + sk - sq + 1, 0, sk) when causal.
    auto visible = [&](int i) -> int {
        if (!p.causal) return sk;
        const int n = i + sk - sq + 1;
        return n < 0 ? 0 : (n > sk ? sk : n);
    };
    const int row0 = m_block * Tr::kBlockM;
    const int last_row = (row0 + Tr::kBlockM < sq ? row0 + Tr::kBlockM : sq) - 1;
    const int seq_keys = last_row >= row0 ? visible(last_row) : 0;
    const int prefix_tiles = last_row >= row0 ? (plen + Tr::kBlockN - 1) / Tr::kBlockN : 0;
    const int seq_tiles = (seq_keys + Tr::kBlockN - 1) / Tr::kBlockN;
    const int n_tiles = prefix_tiles + seq_tiles;

    PA_DYNAMIC_SMEM(T, smem);
    T* sQ = smem;
    T* sK = smem + Tr::kTileElems;
    T* sV = sK + 2 * Tr::kBlockN * kHeadDim;

    const T* q = reinterpret_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const T* k = reinterpret_cast<const T*>(p.k) + b * p.k_batch_stride + hkv * p.k_head_stride;
    const T* v = reinterpret_cast<const T*>(p.v) + b * p.v_batch_stride + hkv * p.v_head_stride;
    const T* kp = reinterpret_cast<const T*>(p.k_pre) + (pidx > 0 ? pidx : 0) * p.kp_prefix_stride +
                  hkv * p.kp_head_stride;
    const T* vp = reinterpret_cast<const T*>(p.v_pre) + (pidx > 0 ? pidx : 0) * p.vp_prefix_stride +
                  hkv * p.vp_head_stride;

    // Tile j: prefix rows j*64.. (< plen), then sequence rows (j - prefix_tiles)*64.. (< seq_keys).
    auto load_kv = [&](int j, int buf) {
        T* dk = sK + buf * Tr::kBlockN * kHeadDim;
        T* dv = sV + buf * Tr::kBlockN * kHeadDim;
        if (j < prefix_tiles) {
            load_tile<kHeadDim, Tr::kBlockN, Tr::kThreads>(dk, kp, p.kp_row_stride, j * Tr::kBlockN, plen, tid);
            load_tile<kHeadDim, Tr::kBlockN, Tr::kThreads>(dv, vp, p.vp_row_stride, j * Tr::kBlockN, plen, tid);
        } else {
            const int first = (j - prefix_tiles) * Tr::kBlockN;
            load_tile<kHeadDim, Tr::kBlockN, Tr::kThreads>(dk, k, p.k_row_stride, first, seq_keys, tid);
            load_tile<kHeadDim, Tr::kBlockN, Tr::kThreads>(dv, v, p.v_row_stride, first, seq_keys, tid);
        }
    };

    // Q rows beyond seqlen_q are zero-filled; they are never written back as results. Q is its
    // own cp.async group so that its fragments are read once, before the key loop, while the
    // first key tile is still in flight.
    load_tile<kHeadDim, Tr::kBlockM, Tr::kThreads>(sQ, q, p.q_row_stride, row0, last_row + 1, tid);
    cp_async_commit();
    if (n_tiles > 0) load_kv(0, 0);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    uint32_t q_frag[kKSteps][4];
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk)
        ldmatrix_x4(q_frag[kk], sQ + swz<kHeadDim>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));

    float o_acc[kDFrags][4];
#pragma unroll
    for (int i = 0; i < kDFrags; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) o_acc[i][j] = 0.f;
    // Running max (base-2 scaled scores) and partial sums of this thread's two rows.
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};
    const int my_row[2] = {row0 + warp * 16 + g, row0 + warp * 16 + g + 8};
    const int my_vis[2] = {visible(my_row[0]), visible(my_row[1])};
    const bool row_ok[2] = {my_row[0] < sq, my_row[1] < sq};

    for (int j = 0; j < n_tiles; ++j) {
        if (j + 1 < n_tiles) {
            load_kv(j + 1, (j + 1) & 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* tk = sK + (j & 1) * Tr::kBlockN * kHeadDim;
        const T* tv = sV + (j & 1) * Tr::kBlockN * kHeadDim;

        // S = Q Kᵀ for this warp's 16 rows and the tile's 64 keys.
        float s[kNFrags][4];
#pragma unroll
        for (int nb = 0; nb < kNFrags; ++nb)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[nb][i] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
            for (int nb = 0; nb < kNFrags; nb += 2) {
                // Matrices: keys nb*8.. (chunks 2kk, 2kk+1), keys (nb+1)*8.. (same chunks).
                const int mat = lane >> 3;
                const int key = nb * 8 + (lane & 7) + 8 * (mat >> 1);
                uint32_t kf[4];
                ldmatrix_x4(kf, tk + swz<kHeadDim>(key, kk * 2 + (mat & 1)));
                const uint32_t b0[2] = {kf[0], kf[1]};
                const uint32_t b1[2] = {kf[2], kf[3]};
                Ops::mma(s[nb], q_frag[kk], b0, s[nb]);
                Ops::mma(s[nb + 1], q_frag[kk], b1, s[nb + 1]);
            }
        }

        // Mask, scale to base 2, and update the running max.
        const bool is_prefix = j < prefix_tiles;
        const int key0 = (is_prefix ? j : j - prefix_tiles) * Tr::kBlockN;
        float m_new[2] = {m_run[0], m_run[1]};
#pragma unroll
        for (int nb = 0; nb < kNFrags; ++nb)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1;
                const int key = key0 + nb * 8 + 2 * t + (i & 1);
                const bool ok = row_ok[r] && (is_prefix ? key < plen : key < my_vis[r]);
                s[nb][i] = ok ? s[nb][i] * p.scale_log2 : -INFINITY;
                m_new[r] = fmaxf(m_new[r], s[nb][i]);
            }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            m_new[r] = fmaxf(m_new[r], shfl_xor(m_new[r], 1));
            m_new[r] = fmaxf(m_new[r], shfl_xor(m_new[r], 2));
        }
        // A row with no visible key yet keeps max -inf; exponentiate against 0 then (every
        // score is -inf, so every probability is 0) instead of producing NaN.
        float corr[2], base[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            base[r] = m_new[r] == -INFINITY ? 0.f : m_new[r];
            corr[r] = m_run[r] == -INFINITY ? 0.f : exp2f(m_run[r] - base[r]);
            m_run[r] = m_new[r];
            l_run[r] *= corr[r];
        }
#pragma unroll
        for (int nd = 0; nd < kDFrags; ++nd) {
            o_acc[nd][0] *= corr[0];
            o_acc[nd][1] *= corr[0];
            o_acc[nd][2] *= corr[1];
            o_acc[nd][3] *= corr[1];
        }
        // P = exp2(S - max), kept as A fragments for P·V (two S n-fragments per k-step).
        uint32_t p_frag[kNFrags / 2][4];
#pragma unroll
        for (int nb = 0; nb < kNFrags; ++nb) {
            float e[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                e[i] = exp2f(s[nb][i] - base[i >> 1]);
                l_run[i >> 1] += e[i];
            }
            p_frag[nb / 2][(nb & 1) * 2 + 0] = Ops::pack(e[0], e[1]);
            p_frag[nb / 2][(nb & 1) * 2 + 1] = Ops::pack(e[2], e[3]);
        }
        // O += P V: k-steps over 16 keys, n-fragments over 8 head dims.
#pragma unroll
        for (int kb = 0; kb < kNFrags / 2; ++kb) {
#pragma unroll
            for (int nd = 0; nd < kDFrags; nd += 2) {
                // Matrices: keys kb*16+0..7 / +8..15 at chunk nd, then the same at chunk nd+1.
                const int mat = lane >> 3;
                const int key = kb * 16 + (lane & 7) + 8 * (mat & 1);
                uint32_t vf[4];
                ldmatrix_x4_trans(vf, tv + swz<kHeadDim>(key, nd + (mat >> 1)));
                const uint32_t b0[2] = {vf[0], vf[1]};
                const uint32_t b1[2] = {vf[2], vf[3]};
                Ops::mma(o_acc[nd], p_frag[kb], b0, o_acc[nd]);
                Ops::mma(o_acc[nd + 1], p_frag[kb], b1, o_acc[nd + 1]);
            }
        }
        // The next iteration overwrites the buffer this one read.
        __syncthreads();
    }
    // No cp.async copy is in flight here, on every path: the Q group was completed before the
    // loop (cp_async_wait<1>), and the last key tile by the loop's last cp_async_wait<0>; a
    // block with no key tile committed only an empty group after Q. (Exiting with copies in
    // flight is what synccheck reports; tests/racecheck_emu.rs shows a wait here would be
    // redundant.)

    // Finalise: full row sums over the quad, normalise, write o and lse.
    float l_tot[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l_tot[r] = l_run[r] + shfl_xor(l_run[r], 1);
        l_tot[r] += shfl_xor(l_tot[r], 2);
    }
    T* o = reinterpret_cast<T*>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
    float* lse = reinterpret_cast<float*>(p.lse) + b * p.lse_batch_stride + h * p.lse_head_stride;
    const float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = my_row[r];
        if (row >= p.tq) continue;
        const bool any = row_ok[r] && l_tot[r] > 0.f;
        const float inv = any ? 1.f / l_tot[r] : 0.f;
        T* orow = o + (int64_t)row * p.o_row_stride;
#pragma unroll
        for (int nd = 0; nd < kDFrags; ++nd) {
            const uint32_t packed = Ops::pack(o_acc[nd][2 * r] * inv, o_acc[nd][2 * r + 1] * inv);
            store_pair(orow + nd * 8 + 2 * t, packed);
        }
        if (t == 0 && p.lse != 0) lse[row] = any ? (m_run[r] + log2f(l_tot[r])) * kLn2 : -INFINITY;
    }
}

}  // namespace pa

#define PA_FWD_ENTRY(name, D, T)                                                                      \
    extern "C" PA_GLOBAL void PA_LAUNCH_BOUNDS(pa::FwdTraits<D>::kThreads, 1) name(PrefixAttnFwdParams p) { \
        pa::fwd_kernel<D, T>(p);                                                                      \
    }                                                                                                 \
    PA_REGISTER_KERNEL(name, PrefixAttnFwdParams, pa::FwdTraits<D>::kThreads, pa::FwdTraits<D>::kSmemBytes,  \
                       pa::FwdTraits<D>::kBlockM, pa::FwdTraits<D>::kBlockN)

PA_FWD_ENTRY(prefix_attn_fwd_d64_f16, 64, __half)
PA_FWD_ENTRY(prefix_attn_fwd_d128_f16, 128, __half)
PA_FWD_ENTRY(prefix_attn_fwd_d64_bf16, 64, __nv_bfloat16)
PA_FWD_ENTRY(prefix_attn_fwd_d128_bf16, 128, __nv_bfloat16)

// Device metadata → the clamped copy the attention kernels read (kernels/common/meta.cuh):
// one thread per sequence, grid-stride. A plan's run passes null for an array the caller
// leaves out (src/device/kernel_device.rs, AttnPlan).
constexpr int kMetaClampThreads = 256;
extern "C" PA_GLOBAL void PA_LAUNCH_BOUNDS(kMetaClampThreads, 1) prefix_attn_meta_clamp(AttnMetaClampParams p) {
    const int32_t* idx = reinterpret_cast<const int32_t*>(p.src_prefix_index);
    const int32_t* sq = reinterpret_cast<const int32_t*>(p.src_seqlen_q);
    const int32_t* sk = reinterpret_cast<const int32_t*>(p.src_seqlen_k);
    int32_t* dst = reinterpret_cast<int32_t*>(p.dst);
    // A null source is the default: prefix 0 (none without a prefix table), Tq, Tk.
    for (int b = blockIdx.x * blockDim.x + threadIdx.x; b < p.batch; b += gridDim.x * blockDim.x) {
        dst[b] = pa::clamp_prefix(idx ? idx[b] : 0, p.num_prefixes);
        dst[p.batch + b] = pa::clamp_len(sq ? sq[b] : p.tq, p.tq);
        dst[2 * p.batch + b] = pa::clamp_len(sk ? sk[b] : p.tk, p.tk);
    }
}
PA_REGISTER_KERNEL(prefix_attn_meta_clamp, AttnMetaClampParams, kMetaClampThreads, 0, 0, 0)

#if defined(PREFIX_ATTN_EMU)
#include <cstddef>

// Size and field offsets of the metadata clamp's parameter struct.
extern "C" size_t pa_meta_clamp_params_layout(size_t* out, size_t n) {
    const size_t v[] = {
        sizeof(AttnMetaClampParams),
        offsetof(AttnMetaClampParams, src_seqlen_k),
        offsetof(AttnMetaClampParams, dst),
        offsetof(AttnMetaClampParams, batch),
        offsetof(AttnMetaClampParams, num_prefixes),
    };
    const size_t count = sizeof(v) / sizeof(v[0]);
    for (size_t i = 0; i < count && i < n; ++i) out[i] = v[i];
    return count;
}

// Size and field offsets of the parameter struct, for the layout test against the Rust mirror.
extern "C" size_t pa_fwd_params_layout(size_t* out, size_t n) {
    const size_t v[] = {
        sizeof(PrefixAttnFwdParams),
        offsetof(PrefixAttnFwdParams, q),
        offsetof(PrefixAttnFwdParams, lse),
        offsetof(PrefixAttnFwdParams, prefix_index),
        offsetof(PrefixAttnFwdParams, seqlen_k),
        offsetof(PrefixAttnFwdParams, q_batch_stride),
        offsetof(PrefixAttnFwdParams, kp_prefix_stride),
        offsetof(PrefixAttnFwdParams, lse_head_stride),
        offsetof(PrefixAttnFwdParams, batch),
        offsetof(PrefixAttnFwdParams, num_prefixes),
        offsetof(PrefixAttnFwdParams, causal),
        offsetof(PrefixAttnFwdParams, dtype),
        offsetof(PrefixAttnFwdParams, scale),
        offsetof(PrefixAttnFwdParams, scale_log2),
    };
    const size_t count = sizeof(v) / sizeof(v[0]);
    for (size_t i = 0; i < count && i < n; ++i) out[i] = v[i];
    return count;
}
#endif

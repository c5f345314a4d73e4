// Fused prefix attention, backward (docs/ARCHITECTURE.md §1), deterministic: no float atomics.
//
// Five kernels, launched in this order by the Rust wrapper:
//   1. delta:     D[b, h, i] = rowsum(dO ∘ O) in fp32 (the softmax Jacobian's correction).
//   2. dq:        a block owns 64 query rows of (b, h) and walks the key tiles they see
//                 (prefix, then sequence), recomputing P = exp(S - lse), dP = dO Vᵀ,
//                 dS = P ∘ (dP - D), and accumulating dQ = scale · dS K in registers.
//   3. dkv_seq:   a block owns a tile of sequence keys of (b, hkv) and walks the query tiles
//                 (of every query head of the group) that see them: dV += Pᵀ dO,
//                 dK += scale · dSᵀ Q. Rows beyond seqlen_k get zeros.
//   4. dkv_pre:   a block owns a tile of prefix keys of (prefix n, hkv) and one split of its
//                 work, a share of the (sequence, query head, query chunk) triples that use
//                 prefix n (params.h says which), and writes fp32 partial sums for its split.
//   5. reduce:    sums the partials over the splits in a fixed order into dK_pre, dV_pre.
// Kernels 2 and 3 are skipped with prefix_only. Every product is an mma.sync m16n8k16 with
// fp32 accumulation on tiles staged by cp.async and read by ldmatrix (kernels/common); kernels
// 2–4 prefetch their next tile while computing on the current one (two shared buffers).
#include "common/params.h"
#include "common/prims.cuh"
#include "common/registry.h"
#include "common/tile.cuh"

namespace pa {

template <int kHeadDim>
struct BwdTraits {
    // Query rows per tile (4 warps × 16 in the dq kernel; the dkv kernels stage 64 rows).
    static constexpr int kBlockM = 64;
    // Keys per tile: 64 for head dim 64; 32 for head dim 128 (register budget).
    static constexpr int kBlockN = kHeadDim <= 64 ? 64 : 32;
    // The dkv kernels give each warp 16 keys.
    static constexpr int kDkvWarps = kBlockN / 16;
    // Query rows per tile in the dkv kernels: 32 at head dim 128 keeps Sᵀ and dPᵀ (and the
    // persistent K, V fragments and dK, dV accumulators) within the register file.
    static constexpr int kDkvRows = kHeadDim <= 64 ? 64 : 32;
    static constexpr int kDkvThreads = kDkvWarps * 32;
    static constexpr int kDqThreads = 128;
    static constexpr int kChunks = kHeadDim / 8;
    // dq: the Q and dO tiles, two buffers of (K, V) tiles.
    static constexpr int kDqSmemBytes = (2 * kBlockM + 4 * kBlockN) * kHeadDim * 2;
    // dkv: the K and V tiles, two buffers of (Q, dO) tiles and of (lse, delta) rows.
    static constexpr int kDkvSmemBytes = (2 * kBlockN + 4 * kDkvRows) * kHeadDim * 2 + 4 * kDkvRows * 4;
    // delta: one warp per row.
    static constexpr int kDeltaThreads = 128;
    static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of the mma K (16)");
};

struct Meta {
    int sq, sk, pidx, plen, hkv;
};

PA_DEVICE Meta meta_of(const PrefixAttnFwdParams& p, int b, int h) {
    Meta m;
    m.sq = reinterpret_cast<const int32_t*>(p.seqlen_q)[b];
    m.sk = reinterpret_cast<const int32_t*>(p.seqlen_k)[b];
    m.pidx = reinterpret_cast<const int32_t*>(p.prefix_index)[b];
    m.plen = m.pidx >= 0 ? p.prefix_len : 0;
    m.hkv = h / (p.heads_q / p.heads_kv);
    return m;
}

// Number of sequence keys row i sees: clamp(i + sk - sq + 1, 0, sk) when causal.
PA_DEVICE int visible_keys(const PrefixAttnFwdParams& p, const Meta& m, int i) {
    if (!p.causal) return m.sk;
    const int n = i + m.sk - m.sq + 1;
    return n < 0 ? 0 : (n > m.sk ? m.sk : n);
}

// ---------------------------------------------------------------------------------------
// 1. delta = rowsum(dO ∘ O): one warp per row.
template <typename T>
PA_DEVICE void delta_kernel(const PrefixAttnBwdParams& p) {
    const PrefixAttnFwdParams& f = p.f;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + warp;
    const int h = blockIdx.y, b = blockIdx.z;
    if (row >= f.tq) return;
    const T* o = reinterpret_cast<const T*>(f.o) + b * f.o_batch_stride + row * f.o_row_stride + h * f.o_head_stride;
    const T* dO = reinterpret_cast<const T*>(p.d_o) + b * p.do_batch_stride + row * p.do_row_stride + h * p.do_head_stride;
    float acc = 0.f;
    for (int c = lane; c < f.head_dim; c += 32) acc += TypeOps<T>::to_f(o[c]) * TypeOps<T>::to_f(dO[c]);
    for (int off = 16; off > 0; off >>= 1) acc += shfl_xor(acc, off);
    if (lane == 0) reinterpret_cast<float*>(p.delta)[((int64_t)b * f.heads_q + h) * f.tq + row] = acc;
}

// ---------------------------------------------------------------------------------------
// 2. dQ: a block owns 64 query rows of (b, h).
template <int kHeadDim, typename T>
PA_DEVICE void dq_kernel(const PrefixAttnBwdParams& p) {
    using Tr = BwdTraits<kHeadDim>;
    using Ops = TypeOps<T>;
    constexpr int kNFrags = Tr::kBlockN / 8;
    constexpr int kDFrags = kHeadDim / 8;
    constexpr int kKSteps = kHeadDim / 16;
    const PrefixAttnFwdParams& f = p.f;
    // Heaviest causal query tiles first, as in the forward.
    const int m_block = f.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane & 3;
    const Meta m = meta_of(f, b, h);
    const int row0 = m_block * Tr::kBlockM;
    const int last_row = (row0 + Tr::kBlockM < m.sq ? row0 + Tr::kBlockM : m.sq) - 1;
    const int seq_keys = last_row >= row0 ? visible_keys(f, m, last_row) : 0;
    const int prefix_tiles = last_row >= row0 ? (m.plen + Tr::kBlockN - 1) / Tr::kBlockN : 0;
    const int n_tiles = prefix_tiles + (seq_keys + Tr::kBlockN - 1) / Tr::kBlockN;

    PA_DYNAMIC_SMEM(T, smem);
    T* sQ = smem;
    T* sdO = sQ + Tr::kBlockM * kHeadDim;
    T* sK = sdO + Tr::kBlockM * kHeadDim;  // two K tiles and two V tiles: double buffering
    T* sV = sK + 2 * Tr::kBlockN * kHeadDim;

    const T* q = reinterpret_cast<const T*>(f.q) + b * f.q_batch_stride + h * f.q_head_stride;
    const T* dO = reinterpret_cast<const T*>(p.d_o) + b * p.do_batch_stride + h * p.do_head_stride;
    const T* k = reinterpret_cast<const T*>(f.k) + b * f.k_batch_stride + m.hkv * f.k_head_stride;
    const T* v = reinterpret_cast<const T*>(f.v) + b * f.v_batch_stride + m.hkv * f.v_head_stride;
    const int pn = m.pidx > 0 ? m.pidx : 0;
    const T* kp = reinterpret_cast<const T*>(f.k_pre) + pn * f.kp_prefix_stride + m.hkv * f.kp_head_stride;
    const T* vp = reinterpret_cast<const T*>(f.v_pre) + pn * f.vp_prefix_stride + m.hkv * f.vp_head_stride;

    const int my_row[2] = {row0 + warp * 16 + g, row0 + warp * 16 + g + 8};
    const bool row_ok[2] = {my_row[0] < m.sq, my_row[1] < m.sq};
    const int my_vis[2] = {visible_keys(f, m, my_row[0]), visible_keys(f, m, my_row[1])};
    const float kLog2e = 1.4426950408889634f;
    float lse2[2], dlt[2];
    for (int r = 0; r < 2; ++r) {
        const int64_t li = ((int64_t)b * f.heads_q + h) * f.tq + my_row[r];
        const float* lse = reinterpret_cast<const float*>(f.lse) + b * f.lse_batch_stride + h * f.lse_head_stride;
        const float l = row_ok[r] ? lse[my_row[r]] : -INFINITY;
        lse2[r] = l * kLog2e;
        dlt[r] = row_ok[r] ? reinterpret_cast<const float*>(p.delta)[li] : 0.f;
    }

    float dq_acc[kDFrags][4];
    for (int i = 0; i < kDFrags; ++i)
        for (int j = 0; j < 4; ++j) dq_acc[i][j] = 0.f;
    uint32_t q_frag[kKSteps][4], do_frag[kKSteps][4];

    // Key tile j (prefix tiles, then sequence tiles) into buffer `buf`.
    auto load_kv = [&](int j, int buf) {
        T* dk = sK + buf * Tr::kBlockN * kHeadDim;
        T* dv = sV + buf * Tr::kBlockN * kHeadDim;
        if (j < prefix_tiles) {
            load_tile<kHeadDim, Tr::kBlockN, Tr::kDqThreads>(dk, kp, f.kp_row_stride, j * Tr::kBlockN, m.plen, tid);
            load_tile<kHeadDim, Tr::kBlockN, Tr::kDqThreads>(dv, vp, f.vp_row_stride, j * Tr::kBlockN, m.plen, tid);
        } else {
            const int first = (j - prefix_tiles) * Tr::kBlockN;
            load_tile<kHeadDim, Tr::kBlockN, Tr::kDqThreads>(dk, k, f.k_row_stride, first, seq_keys, tid);
            load_tile<kHeadDim, Tr::kBlockN, Tr::kDqThreads>(dv, v, f.v_row_stride, first, seq_keys, tid);
        }
    };
    // Q and dO are one cp.async group, read into fragments once; key tile 0 is the next group,
    // and each iteration prefetches tile j + 1 while it computes on tile j.
    load_tile<kHeadDim, Tr::kBlockM, Tr::kDqThreads>(sQ, q, f.q_row_stride, row0, last_row + 1, tid);
    load_tile<kHeadDim, Tr::kBlockM, Tr::kDqThreads>(sdO, dO, p.do_row_stride, row0, last_row + 1, tid);
    cp_async_commit();
    if (n_tiles > 0) load_kv(0, 0);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    for (int kk = 0; kk < kKSteps; ++kk) {
        ldmatrix_x4(q_frag[kk], sQ + swz<kHeadDim>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
        ldmatrix_x4(do_frag[kk], sdO + swz<kHeadDim>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
    }
    for (int j = 0; j < n_tiles; ++j) {
        const bool is_prefix = j < prefix_tiles;
        const int key0 = (is_prefix ? j : j - prefix_tiles) * Tr::kBlockN;
        if (j + 1 < n_tiles) {
            load_kv(j + 1, (j + 1) & 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* sKj = sK + (j & 1) * Tr::kBlockN * kHeadDim;
        const T* sVj = sV + (j & 1) * Tr::kBlockN * kHeadDim;
        // S = Q Kᵀ and dP = dO Vᵀ for this warp's 16 rows.
        float s[kNFrags][4], dp[kNFrags][4];
        for (int nb = 0; nb < kNFrags; ++nb)
            for (int i = 0; i < 4; ++i) s[nb][i] = dp[nb][i] = 0.f;
        for (int kk = 0; kk < kKSteps; ++kk) {
            for (int nb = 0; nb < kNFrags; nb += 2) {
                const int mat = lane >> 3;
                const int key = nb * 8 + (lane & 7) + 8 * (mat >> 1);
                uint32_t kf[4], vf[4];
                ldmatrix_x4(kf, sKj + swz<kHeadDim>(key, kk * 2 + (mat & 1)));
                ldmatrix_x4(vf, sVj + swz<kHeadDim>(key, kk * 2 + (mat & 1)));
                const uint32_t kb0[2] = {kf[0], kf[1]}, kb1[2] = {kf[2], kf[3]};
                const uint32_t vb0[2] = {vf[0], vf[1]}, vb1[2] = {vf[2], vf[3]};
                Ops::mma(s[nb], q_frag[kk], kb0, s[nb]);
                Ops::mma(s[nb + 1], q_frag[kk], kb1, s[nb + 1]);
                Ops::mma(dp[nb], do_frag[kk], vb0, dp[nb]);
                Ops::mma(dp[nb + 1], do_frag[kk], vb1, dp[nb + 1]);
            }
        }
        // dS = P ∘ (dP - D), P = exp2(S scale log2e - lse log2e), masked entries 0.
        uint32_t ds_frag[kNFrags / 2][4];
        for (int nb = 0; nb < kNFrags; ++nb) {
            float e[4];
            for (int i = 0; i < 4; ++i) {
                const int r = i >> 1;
                const int key = key0 + nb * 8 + 2 * t + (i & 1);
                const bool ok = row_ok[r] && lse2[r] != -INFINITY && (is_prefix ? key < m.plen : key < my_vis[r]);
                const float pr = ok ? exp2f(s[nb][i] * f.scale_log2 - lse2[r]) : 0.f;
                e[i] = pr * (dp[nb][i] - dlt[r]);
            }
            ds_frag[nb / 2][(nb & 1) * 2 + 0] = Ops::pack(e[0], e[1]);
            ds_frag[nb / 2][(nb & 1) * 2 + 1] = Ops::pack(e[2], e[3]);
        }
        // dQ += dS K: k-steps over 16 keys, n-fragments over 8 head dims (K read transposed).
        for (int kb = 0; kb < kNFrags / 2; ++kb) {
            for (int nd = 0; nd < kDFrags; nd += 2) {
                const int mat = lane >> 3;
                const int key = kb * 16 + (lane & 7) + 8 * (mat & 1);
                uint32_t kf[4];
                ldmatrix_x4_trans(kf, sKj + swz<kHeadDim>(key, nd + (mat >> 1)));
                const uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
                Ops::mma(dq_acc[nd], ds_frag[kb], b0, dq_acc[nd]);
                Ops::mma(dq_acc[nd + 1], ds_frag[kb], b1, dq_acc[nd + 1]);
            }
        }
        // The next iteration refills the buffer this one read.
        __syncthreads();
    }
    // No copy is in flight: Q and dO were completed before the loop and the last key tile by
    // its wait; with no key tile only an empty group was committed after them.
    T* dq = reinterpret_cast<T*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride;
    for (int r = 0; r < 2; ++r) {
        const int row = my_row[r];
        if (row >= f.tq) continue;
        T* out = dq + (int64_t)row * p.dq_row_stride;
        for (int nd = 0; nd < kDFrags; ++nd) {
            const uint32_t packed = Ops::pack(dq_acc[nd][2 * r] * f.scale, dq_acc[nd][2 * r + 1] * f.scale);
            store_pair(out + nd * 8 + 2 * t, packed);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3./4. dK, dV of one key tile, accumulated over a walk of query tiles: the sequences
// b = b_first + i · b_step (i < n_b) that have the tile's keys, the query heads
// hh = hh_first + j · hh_step (j < n_hh) of the KV head's group, and the query tiles
// qt_begin + k (k < n_qt) of each, clipped to the rows that see the tile. Item
// (i · n_hh + j) · n_qt + k of the walk is that query tile: the walk's cursor is one integer,
// decoded where it is used, so it costs one register across the heavy compute.
struct DkvWalk {
    int b_first, b_step, n_b, hh_first, hh_step, n_hh, qt_begin, n_qt;
};

template <int kHeadDim, typename T>
PA_DEVICE void dkv_tile(const PrefixAttnBwdParams& p, bool prefix, int key_tile, int hkv, int prefix_n,
                        const DkvWalk& walk, float dk_acc[][4], float dv_acc[][4]) {
    using Tr = BwdTraits<kHeadDim>;
    using Ops = TypeOps<T>;
    constexpr int kRows = Tr::kDkvRows;
    constexpr int kMFrags = kRows / 8;  // query n-fragments per tile
    constexpr int kDFrags = kHeadDim / 8;
    constexpr int kKSteps = kHeadDim / 16;
    constexpr int kThreads = Tr::kDkvThreads;
    const PrefixAttnFwdParams& f = p.f;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane & 3;
    const int group = f.heads_q / f.heads_kv;
    const float kLog2e = 1.4426950408889634f;

    // K, V of the tile once; Q, dO, lse and delta of the query tiles double-buffered.
    PA_DYNAMIC_SMEM(T, smem);
    T* sK = smem;
    T* sV = sK + Tr::kBlockN * kHeadDim;
    T* sQ = sV + Tr::kBlockN * kHeadDim;        // [2][kRows][kHeadDim]
    T* sdO = sQ + 2 * kRows * kHeadDim;         // [2][kRows][kHeadDim]
    float* sL = reinterpret_cast<float*>(sdO + 2 * kRows * kHeadDim);  // [2][kRows] lse · log2e
    float* sD = sL + 2 * kRows;                                        // [2][kRows] delta

    const int key0 = key_tile * Tr::kBlockN;
    const int per_b = walk.n_hh * walk.n_qt;
    const int total = walk.n_b * per_b;
    // The keys of sequence m (prefix rows or its own sequence keys).
    auto nkeys_of = [&](const Meta& m) { return prefix ? m.plen : m.sk; };
    auto b_of = [&](int it) { return walk.b_first + it / per_b * walk.b_step; };
    auto meta_at = [&](int it) { return meta_of(f, b_of(it), hkv * group); };
    // The first item at or after `it` that holds work, or `total`.
    auto seek = [&](int it) -> int {
        while (it < total) {
            const int bi = it / per_b;
            const Meta m = meta_at(it);
            // Query tiles [lo, hi) of the walk's range that see the tile's first key.
            int lo = 0;
            if (!prefix && f.causal) {
                const int c = key0 - (m.sk - m.sq);
                lo = (c > 0 ? c : 0) / kRows - walk.qt_begin;
            }
            if (lo < 0) lo = 0;
            int hi = (m.sq + kRows - 1) / kRows - walk.qt_begin;
            if (hi > walk.n_qt) hi = walk.n_qt;
            const bool usable = (!prefix || m.pidx == prefix_n) && key0 < nkeys_of(m) && lo < hi;
            if (!usable) {
                it = (bi + 1) * per_b;
                continue;
            }
            const int k = it % walk.n_qt;
            if (k < lo) return it + (lo - k);
            if (k < hi) return it;
            it += walk.n_qt - k;  // the next query head
        }
        return total;
    };
    // Stages the query tile of item `it` into buffer buf: Q and dO by cp.async, lse and delta
    // by plain stores (visible after the next barrier).
    auto load_q = [&](int it, int buf) {
        const int b = b_of(it);
        const Meta m = meta_at(it);
        const int h = hkv * group + walk.hh_first + it / walk.n_qt % walk.n_hh * walk.hh_step;
        const int qrow0 = (walk.qt_begin + it % walk.n_qt) * kRows;
        const T* q = reinterpret_cast<const T*>(f.q) + b * f.q_batch_stride + h * f.q_head_stride;
        const T* dO = reinterpret_cast<const T*>(p.d_o) + b * p.do_batch_stride + h * p.do_head_stride;
        const float* lse = reinterpret_cast<const float*>(f.lse) + b * f.lse_batch_stride + h * f.lse_head_stride;
        const float* delta = reinterpret_cast<const float*>(p.delta) + ((int64_t)b * f.heads_q + h) * f.tq;
        load_tile<kHeadDim, kRows, kThreads>(sQ + buf * kRows * kHeadDim, q, f.q_row_stride, qrow0, m.sq, tid);
        load_tile<kHeadDim, kRows, kThreads>(sdO + buf * kRows * kHeadDim, dO, p.do_row_stride, qrow0, m.sq, tid);
        for (int r = tid; r < kRows; r += kThreads) {
            const int i = qrow0 + r;
            sL[buf * kRows + r] = i < m.sq ? lse[i] * kLog2e : -INFINITY;
            sD[buf * kRows + r] = i < m.sq ? delta[i] : 0.f;
        }
    };

    int it = seek(0);
    if (it >= total) return;

    // Sequence keys belong to the one sequence of the walk; prefix keys are the same for all.
    {
        const int b = b_of(it);
        const int nkeys = nkeys_of(meta_at(it));
        const T* ks;
        const T* vs;
        int64_t krs, vrs;
        if (prefix) {
            ks = reinterpret_cast<const T*>(f.k_pre) + prefix_n * f.kp_prefix_stride + hkv * f.kp_head_stride;
            vs = reinterpret_cast<const T*>(f.v_pre) + prefix_n * f.vp_prefix_stride + hkv * f.vp_head_stride;
            krs = f.kp_row_stride;
            vrs = f.vp_row_stride;
        } else {
            ks = reinterpret_cast<const T*>(f.k) + b * f.k_batch_stride + hkv * f.k_head_stride;
            vs = reinterpret_cast<const T*>(f.v) + b * f.v_batch_stride + hkv * f.v_head_stride;
            krs = f.k_row_stride;
            vrs = f.v_row_stride;
        }
        load_tile<kHeadDim, Tr::kBlockN, kThreads>(sK, ks, krs, key0, nkeys, tid);
        load_tile<kHeadDim, Tr::kBlockN, kThreads>(sV, vs, vrs, key0, nkeys, tid);
    }
    load_q(it, 0);
    cp_async_commit();

    // This warp's keys (rows of Sᵀ): g and g + 8.
    const int my_key[2] = {key0 + warp * 16 + g, key0 + warp * 16 + g + 8};
    for (int buf = 0;; buf ^= 1) {
        // Prefetch the walk's next query tile into the other buffer while this one computes.
        const int next = seek(it + 1);
        const bool more = next < total;
        if (more) {
            load_q(next, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* tQ = sQ + buf * kRows * kHeadDim;
        const T* tdO = sdO + buf * kRows * kHeadDim;
        const float* tL = sL + buf * kRows;
        const float* tD = sD + buf * kRows;
        const Meta m = meta_at(it);
        const int qrow0 = (walk.qt_begin + it % walk.n_qt) * kRows;
        const int nkeys = nkeys_of(m);
        // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: 16 keys × kRows queries per warp.
        float s[kMFrags][4], dp[kMFrags][4];
        for (int nb = 0; nb < kMFrags; ++nb)
            for (int i = 0; i < 4; ++i) s[nb][i] = dp[nb][i] = 0.f;
        for (int kk = 0; kk < kKSteps; ++kk) {
            // This warp's 16 keys as A fragments, re-read from shared memory for each k-step
            // rather than kept in registers (the register budget goes to the dK, dV
            // accumulators).
            uint32_t k_a[4], v_a[4];
            ldmatrix_x4(k_a, sK + swz<kHeadDim>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
            ldmatrix_x4(v_a, sV + swz<kHeadDim>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
            for (int nb = 0; nb < kMFrags; nb += 2) {
                const int mat = lane >> 3;
                const int qr = nb * 8 + (lane & 7) + 8 * (mat >> 1);
                uint32_t qf[4], of[4];
                ldmatrix_x4(qf, tQ + swz<kHeadDim>(qr, kk * 2 + (mat & 1)));
                ldmatrix_x4(of, tdO + swz<kHeadDim>(qr, kk * 2 + (mat & 1)));
                const uint32_t qb0[2] = {qf[0], qf[1]}, qb1[2] = {qf[2], qf[3]};
                const uint32_t ob0[2] = {of[0], of[1]}, ob1[2] = {of[2], of[3]};
                Ops::mma(s[nb], k_a, qb0, s[nb]);
                Ops::mma(s[nb + 1], k_a, qb1, s[nb + 1]);
                Ops::mma(dp[nb], v_a, ob0, dp[nb]);
                Ops::mma(dp[nb + 1], v_a, ob1, dp[nb + 1]);
            }
        }
        // Pᵀ and dSᵀ as A fragments (k = queries) for dV += Pᵀ dO and dK += dSᵀ Q.
        uint32_t p_frag[kMFrags / 2][4], ds_frag[kMFrags / 2][4];
        for (int nb = 0; nb < kMFrags; ++nb) {
            float pe[4], de[4];
            for (int i = 0; i < 4; ++i) {
                const int key = my_key[i >> 1];
                const int qc = nb * 8 + 2 * t + (i & 1);
                const int qi = qrow0 + qc;
                bool ok = qi < m.sq && key < nkeys && tL[qc] != -INFINITY;
                if (ok && !prefix && f.causal) ok = key <= qi + m.sk - m.sq;
                pe[i] = ok ? exp2f(s[nb][i] * f.scale_log2 - tL[qc]) : 0.f;
                de[i] = pe[i] * (dp[nb][i] - tD[qc]);
            }
            p_frag[nb / 2][(nb & 1) * 2 + 0] = Ops::pack(pe[0], pe[1]);
            p_frag[nb / 2][(nb & 1) * 2 + 1] = Ops::pack(pe[2], pe[3]);
            ds_frag[nb / 2][(nb & 1) * 2 + 0] = Ops::pack(de[0], de[1]);
            ds_frag[nb / 2][(nb & 1) * 2 + 1] = Ops::pack(de[2], de[3]);
        }
        for (int kq = 0; kq < kMFrags / 2; ++kq) {
            for (int nd = 0; nd < kDFrags; nd += 2) {
                const int mat = lane >> 3;
                const int qr = kq * 16 + (lane & 7) + 8 * (mat & 1);
                uint32_t of[4], qf[4];
                ldmatrix_x4_trans(of, tdO + swz<kHeadDim>(qr, nd + (mat >> 1)));
                ldmatrix_x4_trans(qf, tQ + swz<kHeadDim>(qr, nd + (mat >> 1)));
                const uint32_t ob0[2] = {of[0], of[1]}, ob1[2] = {of[2], of[3]};
                const uint32_t qb0[2] = {qf[0], qf[1]}, qb1[2] = {qf[2], qf[3]};
                Ops::mma(dv_acc[nd], p_frag[kq], ob0, dv_acc[nd]);
                Ops::mma(dv_acc[nd + 1], p_frag[kq], ob1, dv_acc[nd + 1]);
                Ops::mma(dk_acc[nd], ds_frag[kq], qb0, dk_acc[nd]);
                Ops::mma(dk_acc[nd + 1], ds_frag[kq], qb1, dk_acc[nd + 1]);
            }
        }
        if (!more) break;
        // The next iteration refills the buffer this one read.
        __syncthreads();
        it = next;
    }
}

template <int kHeadDim, typename T>
PA_DEVICE void dkv_seq_kernel(const PrefixAttnBwdParams& p) {
    using Ops = TypeOps<T>;
    constexpr int kDFrags = kHeadDim / 8;
    const PrefixAttnFwdParams& f = p.f;
    const int key_tile = blockIdx.x, hkv = blockIdx.y, b = blockIdx.z;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane >> 2, t = lane & 3;
    float dk_acc[kDFrags][4], dv_acc[kDFrags][4];
    for (int i = 0; i < kDFrags; ++i)
        for (int j = 0; j < 4; ++j) dk_acc[i][j] = dv_acc[i][j] = 0.f;
    // One sequence, every query head of the group, every query tile.
    const int q_tiles = (f.tq + BwdTraits<kHeadDim>::kDkvRows - 1) / BwdTraits<kHeadDim>::kDkvRows;
    const DkvWalk walk = {b, 1, 1, 0, 1, f.heads_q / f.heads_kv, 0, q_tiles};
    dkv_tile<kHeadDim, T>(p, false, key_tile, hkv, -1, walk, dk_acc, dv_acc);
    const int sk = reinterpret_cast<const int32_t*>(f.seqlen_k)[b];
    T* dk = reinterpret_cast<T*>(p.dk) + b * p.dk_batch_stride + hkv * p.dk_head_stride;
    T* dv = reinterpret_cast<T*>(p.dv) + b * p.dv_batch_stride + hkv * p.dv_head_stride;
    for (int r = 0; r < 2; ++r) {
        const int key = key_tile * BwdTraits<kHeadDim>::kBlockN + warp * 16 + g + 8 * r;
        if (key >= f.tk) continue;
        const float live = key < sk ? 1.f : 0.f;
        for (int nd = 0; nd < kDFrags; ++nd) {
            const uint32_t pk = Ops::pack(dk_acc[nd][2 * r] * f.scale * live, dk_acc[nd][2 * r + 1] * f.scale * live);
            const uint32_t pv = Ops::pack(dv_acc[nd][2 * r] * live, dv_acc[nd][2 * r + 1] * live);
            store_pair(dk + (int64_t)key * p.dk_row_stride + nd * 8 + 2 * t, pk);
            store_pair(dv + (int64_t)key * p.dv_row_stride + nd * 8 + 2 * t, pv);
        }
    }
}

template <int kHeadDim, typename T>
PA_DEVICE void dkv_pre_kernel(const PrefixAttnBwdParams& p) {
    constexpr int kDFrags = kHeadDim / 8;
    const PrefixAttnFwdParams& f = p.f;
    const int key_tile = blockIdx.x, hkv = blockIdx.y;
    const int n = blockIdx.z / p.splits, split = blockIdx.z % p.splits;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane >> 2, t = lane & 3;
    float dk_acc[kDFrags][4], dv_acc[kDFrags][4];
    for (int i = 0; i < kDFrags; ++i)
        for (int j = 0; j < 4; ++j) dk_acc[i][j] = dv_acc[i][j] = 0.f;
    const int b_first = split % p.split_batch;
    const int hh_first = (split / p.split_batch) % p.split_heads;
    const int qt_begin = split / (p.split_batch * p.split_heads) * p.split_qtiles;
    const int q_tiles = (f.tq + BwdTraits<kHeadDim>::kDkvRows - 1) / BwdTraits<kHeadDim>::kDkvRows;
    const int group = f.heads_q / f.heads_kv;
    const DkvWalk walk = {b_first,
                          p.split_batch,
                          (f.batch - b_first + p.split_batch - 1) / p.split_batch,
                          hh_first,
                          p.split_heads,
                          (group - hh_first + p.split_heads - 1) / p.split_heads,
                          qt_begin,
                          q_tiles - qt_begin < p.split_qtiles ? q_tiles - qt_begin : p.split_qtiles};
    dkv_tile<kHeadDim, T>(p, true, key_tile, hkv, n, walk, dk_acc, dv_acc);
    // partial [split][0 = dk, 1 = dv][n][key][hkv][d], fp32, contiguous (8-byte pairs).
    const int64_t per = (int64_t)f.num_prefixes * f.prefix_len * f.heads_kv * kHeadDim;
    float* part = reinterpret_cast<float*>(p.partial) + (int64_t)split * 2 * per;
    for (int r = 0; r < 2; ++r) {
        const int key = key_tile * BwdTraits<kHeadDim>::kBlockN + warp * 16 + g + 8 * r;
        if (key >= f.prefix_len) continue;
        const int64_t at = (((int64_t)n * f.prefix_len + key) * f.heads_kv + hkv) * kHeadDim;
        for (int nd = 0; nd < kDFrags; ++nd) {
            const int c = nd * 8 + 2 * t;
            *reinterpret_cast<float2*>(part + at + c) = make_float2(dk_acc[nd][2 * r] * f.scale, dk_acc[nd][2 * r + 1] * f.scale);
            *reinterpret_cast<float2*>(part + per + at + c) = make_float2(dv_acc[nd][2 * r], dv_acc[nd][2 * r + 1]);
        }
    }
}

// 5. dK_pre, dV_pre = sum over splits of the partials, in split order.
PA_DEVICE void reduce_kernel(const PrefixAttnBwdParams& p) {
    const PrefixAttnFwdParams& f = p.f;
    const int64_t per = (int64_t)f.num_prefixes * f.prefix_len * f.heads_kv * f.head_dim;
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= 2 * per) return;
    const int which = idx >= per ? 1 : 0;
    const int64_t e = idx - which * per;
    const float* part = reinterpret_cast<const float*>(p.partial);
    float acc = 0.f;
    for (int s = 0; s < p.splits; ++s) acc += part[(int64_t)s * 2 * per + which * per + e];
    const int d = e % f.head_dim;
    const int hkv = (e / f.head_dim) % f.heads_kv;
    const int key = (e / ((int64_t)f.head_dim * f.heads_kv)) % f.prefix_len;
    const int n = e / ((int64_t)f.head_dim * f.heads_kv * f.prefix_len);
    float* out = reinterpret_cast<float*>(which ? p.dv_pre : p.dk_pre);
    const int64_t ps = which ? p.dvp_prefix_stride : p.dkp_prefix_stride;
    const int64_t rs = which ? p.dvp_row_stride : p.dkp_row_stride;
    const int64_t hs = which ? p.dvp_head_stride : p.dkp_head_stride;
    if (out != nullptr) out[n * ps + key * rs + hkv * hs + d] = acc;
}

}  // namespace pa

#define PA_BWD_ENTRIES(D, T, suffix)                                                                  \
    extern "C" PA_GLOBAL void PA_LAUNCH_BOUNDS(pa::BwdTraits<D>::kDqThreads, 1)                       \
        prefix_attn_bwd_dq_##suffix(PrefixAttnBwdParams p) {                                          \
        pa::dq_kernel<D, T>(p);                                                                       \
    }                                                                                                 \
    extern "C" PA_GLOBAL void PA_LAUNCH_BOUNDS(pa::BwdTraits<D>::kDkvThreads, 1)                      \
        prefix_attn_bwd_dkv_seq_##suffix(PrefixAttnBwdParams p) {                                     \
        pa::dkv_seq_kernel<D, T>(p);                                                                  \
    }                                                                                                 \
    extern "C" PA_GLOBAL void PA_LAUNCH_BOUNDS(pa::BwdTraits<D>::kDkvThreads, 1)                      \
        prefix_attn_bwd_dkv_pre_##suffix(PrefixAttnBwdParams p) {                                     \
        pa::dkv_pre_kernel<D, T>(p);                                                                  \
    }                                                                                                 \
    PA_REGISTER_KERNEL(prefix_attn_bwd_dq_##suffix, PrefixAttnBwdParams, pa::BwdTraits<D>::kDqThreads, \
                       pa::BwdTraits<D>::kDqSmemBytes, pa::BwdTraits<D>::kBlockM, pa::BwdTraits<D>::kBlockN) \
    PA_REGISTER_KERNEL(prefix_attn_bwd_dkv_seq_##suffix, PrefixAttnBwdParams, pa::BwdTraits<D>::kDkvThreads, \
                       pa::BwdTraits<D>::kDkvSmemBytes, pa::BwdTraits<D>::kDkvRows, pa::BwdTraits<D>::kBlockN) \
    PA_REGISTER_KERNEL(prefix_attn_bwd_dkv_pre_##suffix, PrefixAttnBwdParams, pa::BwdTraits<D>::kDkvThreads, \
                       pa::BwdTraits<D>::kDkvSmemBytes, pa::BwdTraits<D>::kDkvRows, pa::BwdTraits<D>::kBlockN)

PA_BWD_ENTRIES(64, __half, d64_f16)
PA_BWD_ENTRIES(128, __half, d128_f16)
PA_BWD_ENTRIES(64, __nv_bfloat16, d64_bf16)
PA_BWD_ENTRIES(128, __nv_bfloat16, d128_bf16)

extern "C" PA_GLOBAL void prefix_attn_bwd_delta_f16(PrefixAttnBwdParams p) { pa::delta_kernel<__half>(p); }
extern "C" PA_GLOBAL void prefix_attn_bwd_delta_bf16(PrefixAttnBwdParams p) { pa::delta_kernel<__nv_bfloat16>(p); }
extern "C" PA_GLOBAL void prefix_attn_bwd_reduce(PrefixAttnBwdParams p) { pa::reduce_kernel(p); }
// delta: block_m = rows per block (one warp each); reduce: one thread per element, in blocks
// of the planner's size.
PA_REGISTER_KERNEL(prefix_attn_bwd_delta_f16, PrefixAttnBwdParams, pa::BwdTraits<64>::kDeltaThreads, 0,
                   pa::BwdTraits<64>::kDeltaThreads / 32, 0)
PA_REGISTER_KERNEL(prefix_attn_bwd_delta_bf16, PrefixAttnBwdParams, pa::BwdTraits<64>::kDeltaThreads, 0,
                   pa::BwdTraits<64>::kDeltaThreads / 32, 0)
PA_REGISTER_KERNEL(prefix_attn_bwd_reduce, PrefixAttnBwdParams, 0, 0, 0, 0)

#if defined(PREFIX_ATTN_EMU)
#include <cstddef>

extern "C" size_t pa_bwd_params_layout(size_t* out, size_t n) {
    const size_t v[] = {
        sizeof(PrefixAttnBwdParams),          offsetof(PrefixAttnBwdParams, d_o),
        offsetof(PrefixAttnBwdParams, dv_pre), offsetof(PrefixAttnBwdParams, partial),
        offsetof(PrefixAttnBwdParams, do_batch_stride), offsetof(PrefixAttnBwdParams, dvp_head_stride),
        offsetof(PrefixAttnBwdParams, prefix_only),     offsetof(PrefixAttnBwdParams, splits),
        offsetof(PrefixAttnBwdParams, split_qtiles),
    };
    const size_t count = sizeof(v) / sizeof(v[0]);
    for (size_t i = 0; i < count && i < n; ++i) out[i] = v[i];
    return count;
}
#endif

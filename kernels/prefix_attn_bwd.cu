// Fused prefix attention, backward (DESIGN.md §1), deterministic: no float atomics.
//
// Five kernels, launched in this order by the Rust wrapper:
//   1. delta:     D[b, h, i] = rowsum(dO ∘ O) in fp32 (the softmax Jacobian's correction).
//   2. dq:        a block owns 64 query rows of (b, h) and walks the key tiles they see
//                 (prefix, then sequence), recomputing P = exp(S - lse), dP = dO Vᵀ,
//                 dS = P ∘ (dP - D), and accumulating dQ = scale · dS K in registers.
//   3. dkv_seq:   a block owns a tile of sequence keys of (b, hkv) and walks the query tiles
//                 (of every query head of the group) that see them: dV += Pᵀ dO,
//                 dK += scale · dSᵀ Q. Rows beyond seqlen_k get zeros.
//   4. dkv_pre:   a block owns a tile of prefix keys of (prefix n, hkv) and one split of the
//                 batch: it walks the query tiles of the sequences b ≡ split (mod splits)
//                 that use prefix n, and writes fp32 partial sums for its split.
//   5. reduce:    sums the partials over the splits in a fixed order into dK_pre, dV_pre.
// Kernels 2 and 3 are skipped with prefix_only. Every product is an mma.sync m16n8k16 with
// fp32 accumulation on tiles staged by cp.async and read by ldmatrix (kernels/common).
#include "common/params.h"
#include "common/prims.cuh"
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
    const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
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
    T* sK = sdO + Tr::kBlockM * kHeadDim;
    T* sV = sK + Tr::kBlockN * kHeadDim;

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

    load_tile<kHeadDim, Tr::kBlockM, Tr::kDqThreads>(sQ, q, f.q_row_stride, row0, last_row + 1, tid);
    load_tile<kHeadDim, Tr::kBlockM, Tr::kDqThreads>(sdO, dO, p.do_row_stride, row0, last_row + 1, tid);
    cp_async_commit();
    for (int j = 0; j < n_tiles; ++j) {
        const bool is_prefix = j < prefix_tiles;
        const int key0 = (is_prefix ? j : j - prefix_tiles) * Tr::kBlockN;
        if (is_prefix) {
            load_tile<kHeadDim, Tr::kBlockN, Tr::kDqThreads>(sK, kp, f.kp_row_stride, key0, m.plen, tid);
            load_tile<kHeadDim, Tr::kBlockN, Tr::kDqThreads>(sV, vp, f.vp_row_stride, key0, m.plen, tid);
        } else {
            load_tile<kHeadDim, Tr::kBlockN, Tr::kDqThreads>(sK, k, f.k_row_stride, key0, seq_keys, tid);
            load_tile<kHeadDim, Tr::kBlockN, Tr::kDqThreads>(sV, v, f.v_row_stride, key0, seq_keys, tid);
        }
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        if (j == 0) {
            for (int kk = 0; kk < kKSteps; ++kk) {
                ldmatrix_x4(q_frag[kk], sQ + swz<kHeadDim>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
                ldmatrix_x4(do_frag[kk], sdO + swz<kHeadDim>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
            }
        }
        // S = Q Kᵀ and dP = dO Vᵀ for this warp's 16 rows.
        float s[kNFrags][4], dp[kNFrags][4];
        for (int nb = 0; nb < kNFrags; ++nb)
            for (int i = 0; i < 4; ++i) s[nb][i] = dp[nb][i] = 0.f;
        for (int kk = 0; kk < kKSteps; ++kk) {
            for (int nb = 0; nb < kNFrags; nb += 2) {
                const int mat = lane >> 3;
                const int key = nb * 8 + (lane & 7) + 8 * (mat >> 1);
                uint32_t kf[4], vf[4];
                ldmatrix_x4(kf, sK + swz<kHeadDim>(key, kk * 2 + (mat & 1)));
                ldmatrix_x4(vf, sV + swz<kHeadDim>(key, kk * 2 + (mat & 1)));
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
                ldmatrix_x4_trans(kf, sK + swz<kHeadDim>(key, nd + (mat >> 1)));
                const uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
                Ops::mma(dq_acc[nd], ds_frag[kb], b0, dq_acc[nd]);
                Ops::mma(dq_acc[nd + 1], ds_frag[kb], b1, dq_acc[nd + 1]);
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    T* dq = reinterpret_cast<T*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride;
    for (int r = 0; r < 2; ++r) {
        const int row = my_row[r];
        if (row >= f.tq) continue;
        T* out = dq + (int64_t)row * p.dq_row_stride;
        for (int nd = 0; nd < kDFrags; ++nd) {
            const uint32_t packed = Ops::pack(dq_acc[nd][2 * r] * f.scale, dq_acc[nd][2 * r + 1] * f.scale);
            memcpy(out + nd * 8 + 2 * t, &packed, 4);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3./4. dK, dV of one key tile: accumulates over the query tiles of the sequences in
// `[b_first, b_last]` step `b_step` (one sequence for sequence keys; a batch split for
// prefix keys) and every query head of the group.
template <int kHeadDim, typename T>
PA_DEVICE void dkv_tile(const PrefixAttnBwdParams& p, bool prefix, int key_tile, int hkv, int b_first, int b_step,
                        int prefix_n, float dk_acc[][4], float dv_acc[][4]) {
    using Tr = BwdTraits<kHeadDim>;
    using Ops = TypeOps<T>;
    constexpr int kMFrags = Tr::kDkvRows / 8;  // query n-fragments per tile
    constexpr int kDFrags = kHeadDim / 8;
    constexpr int kKSteps = kHeadDim / 16;
    constexpr int kThreads = Tr::kDkvThreads;
    const PrefixAttnFwdParams& f = p.f;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane >> 2, t = lane & 3;
    const int group = f.heads_q / f.heads_kv;
    const float kLog2e = 1.4426950408889634f;

    PA_DYNAMIC_SMEM(T, smem);
    T* sK = smem;
    T* sV = sK + Tr::kBlockN * kHeadDim;
    T* sQ = sV + Tr::kBlockN * kHeadDim;
    T* sdO = sQ + Tr::kDkvRows * kHeadDim;
    float* sL = reinterpret_cast<float*>(sdO + Tr::kDkvRows * kHeadDim);  // lse · log2e
    float* sD = sL + Tr::kDkvRows;  // delta

    const int key0 = key_tile * Tr::kBlockN;
    bool loaded_kv = false;

    for (int b = b_first; b < f.batch; b += b_step) {
        const Meta m = meta_of(f, b, hkv * group);
        if (prefix && m.pidx != prefix_n) continue;
        const int nkeys = prefix ? m.plen : m.sk;
        if (key0 >= nkeys || m.sq == 0) continue;
        if (!loaded_kv || !prefix) {
            // Sequence keys belong to one b; prefix keys are the same for every b.
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
            // No barrier before this load and no wait after it: it runs once per block (a dkv_seq
            // block has one sequence; dkv_pre loads its prefix keys once) before any other
            // shared-memory access, and the first query tile below (there is one: some row sees
            // key0 < nkeys) completes these copies with its cp_async_wait<0>() and publishes
            // them with its __syncthreads() before sK, sV are read (tests/racecheck_emu.rs).
            load_tile<kHeadDim, Tr::kBlockN, kThreads>(sK, ks, krs, key0, nkeys, tid);
            load_tile<kHeadDim, Tr::kBlockN, kThreads>(sV, vs, vrs, key0, nkeys, tid);
            cp_async_commit();
            loaded_kv = true;
        }
        // This warp's keys (rows of Sᵀ): g and g + 8.
        const int my_key[2] = {key0 + warp * 16 + g, key0 + warp * 16 + g + 8};
        // First query row that sees the tile's first key (sequence keys, causal).
        int i_first = 0;
        if (!prefix && f.causal) {
            i_first = key0 - (m.sk - m.sq);
            if (i_first < 0) i_first = 0;
        }
        for (int hh = 0; hh < group; ++hh) {
            const int h = hkv * group + hh;
            const T* q = reinterpret_cast<const T*>(f.q) + b * f.q_batch_stride + h * f.q_head_stride;
            const T* dO = reinterpret_cast<const T*>(p.d_o) + b * p.do_batch_stride + h * p.do_head_stride;
            const float* lse = reinterpret_cast<const float*>(f.lse) + b * f.lse_batch_stride + h * f.lse_head_stride;
            const float* delta = reinterpret_cast<const float*>(p.delta) + ((int64_t)b * f.heads_q + h) * f.tq;
            for (int qt = i_first / Tr::kDkvRows; qt * Tr::kDkvRows < m.sq; ++qt) {
                const int qrow0 = qt * Tr::kDkvRows;
                __syncthreads();
                load_tile<kHeadDim, Tr::kDkvRows, kThreads>(sQ, q, f.q_row_stride, qrow0, m.sq, tid);
                load_tile<kHeadDim, Tr::kDkvRows, kThreads>(sdO, dO, p.do_row_stride, qrow0, m.sq, tid);
                cp_async_commit();
                for (int r = tid; r < Tr::kDkvRows; r += kThreads) {
                    const int i = qrow0 + r;
                    sL[r] = i < m.sq ? lse[i] * kLog2e : -INFINITY;
                    sD[r] = i < m.sq ? delta[i] : 0.f;
                }
                cp_async_wait<0>();
                __syncthreads();
                // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: 16 keys × 64 queries per warp.
                float s[kMFrags][4], dp[kMFrags][4];
                for (int nb = 0; nb < kMFrags; ++nb)
                    for (int i = 0; i < 4; ++i) s[nb][i] = dp[nb][i] = 0.f;
                for (int kk = 0; kk < kKSteps; ++kk) {
                    // This warp's 16 keys as A fragments, re-read from shared memory for each
                    // k-step rather than kept in registers (the register budget goes to the
                    // dK, dV accumulators).
                    uint32_t k_a[4], v_a[4];
                    ldmatrix_x4(k_a, sK + swz<kHeadDim>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
                    ldmatrix_x4(v_a, sV + swz<kHeadDim>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
                    for (int nb = 0; nb < kMFrags; nb += 2) {
                        const int mat = lane >> 3;
                        const int qr = nb * 8 + (lane & 7) + 8 * (mat >> 1);
                        uint32_t qf[4], of[4];
                        ldmatrix_x4(qf, sQ + swz<kHeadDim>(qr, kk * 2 + (mat & 1)));
                        ldmatrix_x4(of, sdO + swz<kHeadDim>(qr, kk * 2 + (mat & 1)));
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
                        bool ok = qi < m.sq && key < nkeys && sL[qc] != -INFINITY;
                        if (ok && !prefix && f.causal) ok = key <= qi + m.sk - m.sq;
                        pe[i] = ok ? exp2f(s[nb][i] * f.scale_log2 - sL[qc]) : 0.f;
                        de[i] = pe[i] * (dp[nb][i] - sD[qc]);
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
                        ldmatrix_x4_trans(of, sdO + swz<kHeadDim>(qr, nd + (mat >> 1)));
                        ldmatrix_x4_trans(qf, sQ + swz<kHeadDim>(qr, nd + (mat >> 1)));
                        const uint32_t ob0[2] = {of[0], of[1]}, ob1[2] = {of[2], of[3]};
                        const uint32_t qb0[2] = {qf[0], qf[1]}, qb1[2] = {qf[2], qf[3]};
                        Ops::mma(dv_acc[nd], p_frag[kq], ob0, dv_acc[nd]);
                        Ops::mma(dv_acc[nd + 1], p_frag[kq], ob1, dv_acc[nd + 1]);
                        Ops::mma(dk_acc[nd], ds_frag[kq], qb0, dk_acc[nd]);
                        Ops::mma(dk_acc[nd + 1], ds_frag[kq], qb1, dk_acc[nd + 1]);
                    }
                }
            }
        }
    }
    // Every cp.async group is complete here: each query tile waits for all of them.
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
    dkv_tile<kHeadDim, T>(p, false, key_tile, hkv, b, f.batch, -1, dk_acc, dv_acc);
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
            memcpy(dk + (int64_t)key * p.dk_row_stride + nd * 8 + 2 * t, &pk, 4);
            memcpy(dv + (int64_t)key * p.dv_row_stride + nd * 8 + 2 * t, &pv, 4);
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
    dkv_tile<kHeadDim, T>(p, true, key_tile, hkv, split, p.splits, n, dk_acc, dv_acc);
    // partial [split][0 = dk, 1 = dv][n][key][hkv][d], fp32, contiguous.
    const int64_t per = (int64_t)f.num_prefixes * f.prefix_len * f.heads_kv * kHeadDim;
    float* part = reinterpret_cast<float*>(p.partial) + (int64_t)split * 2 * per;
    for (int r = 0; r < 2; ++r) {
        const int key = key_tile * BwdTraits<kHeadDim>::kBlockN + warp * 16 + g + 8 * r;
        if (key >= f.prefix_len) continue;
        const int64_t at = (((int64_t)n * f.prefix_len + key) * f.heads_kv + hkv) * kHeadDim;
        for (int nd = 0; nd < kDFrags; ++nd) {
            const int c = nd * 8 + 2 * t;
            part[at + c] = dk_acc[nd][2 * r] * f.scale;
            part[at + c + 1] = dk_acc[nd][2 * r + 1] * f.scale;
            part[per + at + c] = dv_acc[nd][2 * r];
            part[per + at + c + 1] = dv_acc[nd][2 * r + 1];
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

#define PA_BWD_ENTRIES(D, T, suffix)                                                              \
    extern "C" PA_GLOBAL void PA_LAUNCH_BOUNDS(pa::BwdTraits<D>::kDqThreads, 1)                   \
        prefix_attn_bwd_dq_##suffix(PrefixAttnBwdParams p) {                                      \
        pa::dq_kernel<D, T>(p);                                                                   \
    }                                                                                             \
    extern "C" PA_GLOBAL void PA_LAUNCH_BOUNDS(pa::BwdTraits<D>::kDkvThreads, 1)                  \
        prefix_attn_bwd_dkv_seq_##suffix(PrefixAttnBwdParams p) {                                 \
        pa::dkv_seq_kernel<D, T>(p);                                                              \
    }                                                                                             \
    extern "C" PA_GLOBAL void PA_LAUNCH_BOUNDS(pa::BwdTraits<D>::kDkvThreads, 1)                  \
        prefix_attn_bwd_dkv_pre_##suffix(PrefixAttnBwdParams p) {                                 \
        pa::dkv_pre_kernel<D, T>(p);                                                              \
    }

PA_BWD_ENTRIES(64, __half, d64_f16)
PA_BWD_ENTRIES(128, __half, d128_f16)
PA_BWD_ENTRIES(64, __nv_bfloat16, d64_bf16)
PA_BWD_ENTRIES(128, __nv_bfloat16, d128_bf16)

extern "C" PA_GLOBAL void prefix_attn_bwd_delta_f16(PrefixAttnBwdParams p) { pa::delta_kernel<__half>(p); }
extern "C" PA_GLOBAL void prefix_attn_bwd_delta_bf16(PrefixAttnBwdParams p) { pa::delta_kernel<__nv_bfloat16>(p); }
extern "C" PA_GLOBAL void prefix_attn_bwd_reduce(PrefixAttnBwdParams p) { pa::reduce_kernel(p); }

#if defined(PREFIX_ATTN_EMU)
#include <cstdio>
#include <cstring>

// Launches one backward kernel by name on the emulator with the Rust wrapper's geometry.
extern "C" int pa_emu_prefix_attn_bwd(const char* name, const PrefixAttnBwdParams* p, unsigned gx, unsigned gy,
                                      unsigned gz, unsigned threads, size_t smem_bytes, char* err, size_t err_len) {
    const PrefixAttnBwdParams params = *p;
    struct Entry {
        const char* name;
        void (*fn)(PrefixAttnBwdParams);
    };
    static const Entry entries[] = {
        {"prefix_attn_bwd_dq_d64_f16", prefix_attn_bwd_dq_d64_f16},
        {"prefix_attn_bwd_dq_d128_f16", prefix_attn_bwd_dq_d128_f16},
        {"prefix_attn_bwd_dq_d64_bf16", prefix_attn_bwd_dq_d64_bf16},
        {"prefix_attn_bwd_dq_d128_bf16", prefix_attn_bwd_dq_d128_bf16},
        {"prefix_attn_bwd_dkv_seq_d64_f16", prefix_attn_bwd_dkv_seq_d64_f16},
        {"prefix_attn_bwd_dkv_seq_d128_f16", prefix_attn_bwd_dkv_seq_d128_f16},
        {"prefix_attn_bwd_dkv_seq_d64_bf16", prefix_attn_bwd_dkv_seq_d64_bf16},
        {"prefix_attn_bwd_dkv_seq_d128_bf16", prefix_attn_bwd_dkv_seq_d128_bf16},
        {"prefix_attn_bwd_dkv_pre_d64_f16", prefix_attn_bwd_dkv_pre_d64_f16},
        {"prefix_attn_bwd_dkv_pre_d128_f16", prefix_attn_bwd_dkv_pre_d128_f16},
        {"prefix_attn_bwd_dkv_pre_d64_bf16", prefix_attn_bwd_dkv_pre_d64_bf16},
        {"prefix_attn_bwd_dkv_pre_d128_bf16", prefix_attn_bwd_dkv_pre_d128_bf16},
        {"prefix_attn_bwd_delta_f16", prefix_attn_bwd_delta_f16},
        {"prefix_attn_bwd_delta_bf16", prefix_attn_bwd_delta_bf16},
        {"prefix_attn_bwd_reduce", prefix_attn_bwd_reduce},
    };
    for (const Entry& e : entries) {
        if (strcmp(e.name, name) == 0) {
            return emu::launch(dim3(gx, gy, gz), dim3(threads, 1, 1), smem_bytes, [&] { e.fn(params); }, err,
                               err_len);
        }
    }
    snprintf(err, err_len, "no backward kernel named %s", name);
    return 1;
}

extern "C" size_t pa_bwd_params_layout(size_t* out, size_t n) {
    const size_t v[] = {
        sizeof(PrefixAttnBwdParams),          offsetof(PrefixAttnBwdParams, d_o),
        offsetof(PrefixAttnBwdParams, dv_pre), offsetof(PrefixAttnBwdParams, partial),
        offsetof(PrefixAttnBwdParams, do_batch_stride), offsetof(PrefixAttnBwdParams, dvp_head_stride),
        offsetof(PrefixAttnBwdParams, prefix_only),     offsetof(PrefixAttnBwdParams, splits),
    };
    const size_t count = sizeof(v) / sizeof(v[0]);
    for (size_t i = 0; i < count && i < n; ++i) out[i] = v[i];
    return count;
}
#endif

// Parameter struct of the prefix-attention forward kernel, passed by value. Mirrored by
// `#[repr(C)] struct FwdParams` in src/device/kernels.rs; a test checks that the size and every
// field offset agree (pa_fwd_params_layout below reports them from this side).
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct PrefixAttnFwdParams {
    // Addresses (device pointers on the GPU, host pointers under the emulator).
    uint64_t q, k, v, k_pre, v_pre, o, lse;
    // int32 [B] each; the wrapper always supplies all three (defaults filled in).
    uint64_t prefix_index, seqlen_q, seqlen_k;
    // Element strides of the outer dimensions (the head dimension is contiguous).
    int64_t q_batch_stride, q_row_stride, q_head_stride;
    int64_t k_batch_stride, k_row_stride, k_head_stride;
    int64_t v_batch_stride, v_row_stride, v_head_stride;
    int64_t kp_prefix_stride, kp_row_stride, kp_head_stride;
    int64_t vp_prefix_stride, vp_row_stride, vp_head_stride;
    int64_t o_batch_stride, o_row_stride, o_head_stride;
    int64_t lse_batch_stride, lse_head_stride;  // lse rows are contiguous
    int32_t batch, tq, tk, heads_q, heads_kv, head_dim, prefix_len, num_prefixes;
    int32_t causal;  // 0 or 1
    int32_t dtype;   // 0 = f16, 1 = bf16
    float scale;       // softmax scale
    float scale_log2;  // scale * log2(e): scores are exponentiated in base 2
} PrefixAttnFwdParams;

#ifdef __cplusplus
}
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Parameter struct of prefix_attn_meta_clamp (kernels/prefix_attn_fwd.cu), which makes
// device metadata safe before the attention kernels read it (kernels/common/meta.cuh).
// Mirrored by `#[repr(C)] struct MetaClampParams` in src/device/kernels.rs.
typedef struct AttnMetaClampParams {
    uint64_t src_prefix_index, src_seqlen_q, src_seqlen_k;  // int32 [B] each, unchecked; 0: default
    uint64_t dst;  // int32 [3B]: clamped prefix_index; seqlen_q; seqlen_k
    int32_t batch, tq, tk, num_prefixes;
} AttnMetaClampParams;

// Parameter struct of the paged-decode kernels (kernels/prefix_attn_decode.cu). Mirrored by
// `#[repr(C)] struct DecodeParams` in src/device/kernels.rs.
typedef struct PrefixAttnDecodeParams {
    uint64_t q, k_cache, v_cache, k_pre, v_pre, o, lse;
    // int32: block_table [B, max_pages] (row-major), seqlen_k [B], prefix_index [B],
    // prefix_len [NP]; clamped where read. prefix_index and prefix_len may be 0 (null): the
    // defaults, prefix 0 for every sequence and P rows in every prefix.
    uint64_t block_table, seqlen_k, prefix_index, prefix_len;
    // f32 scratch with splits > 1: partial o [splits, B, Hq, Tq, D], partial lse [splits, B, Hq, Tq].
    uint64_t part_o, part_lse;
    int64_t q_batch_stride, q_row_stride, q_head_stride;
    int64_t kc_page_stride, kc_row_stride, kc_head_stride;
    int64_t vc_page_stride, vc_row_stride, vc_head_stride;
    int64_t kp_prefix_stride, kp_row_stride, kp_head_stride;
    int64_t vp_prefix_stride, vp_row_stride, vp_head_stride;
    int64_t o_batch_stride, o_row_stride, o_head_stride;
    int64_t lse_batch_stride, lse_head_stride;
    int32_t batch, tq, heads_q, heads_kv, head_dim, num_pages, page_size, max_pages;
    int32_t prefix_rows, num_prefixes, splits, dtype;
    float scale, scale_log2;
} PrefixAttnDecodeParams;

// Parameter struct of the backward kernels. `f` holds the forward's inputs (q, k, v, the
// prefix table, metadata, sizes) and its outputs o and lse (read here). Mirrored by
// `#[repr(C)] struct BwdParams` in src/device/kernels.rs.
typedef struct PrefixAttnBwdParams {
    PrefixAttnFwdParams f;
    uint64_t d_o, dq, dk, dv;  // 16-bit, strided like q / k
    uint64_t dk_pre, dv_pre;   // f32 [NP, P, Hkv, D], strided
    uint64_t delta;            // f32 scratch [B, Hq, Tq], contiguous: rowsum(dO * O)
    uint64_t partial;          // f32 scratch [splits, 2, NP, P, Hkv, D], contiguous
    int64_t do_batch_stride, do_row_stride, do_head_stride;
    int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
    int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
    int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
    int64_t dkp_prefix_stride, dkp_row_stride, dkp_head_stride;
    int64_t dvp_prefix_stride, dvp_row_stride, dvp_head_stride;
    int32_t prefix_only;  // 0 or 1
    // The prefix dK/dV work of one (prefix tile, KV head, prefix) is split `splits` ways, each
    // split writing its own partial: split s takes the sequences b ≡ s % split_batch
    // (mod split_batch), the query heads hh ≡ (s / split_batch) % split_heads (mod split_heads)
    // of the KV head's group, and the query tiles [c · split_qtiles, (c + 1) · split_qtiles),
    // c = s / (split_batch · split_heads). splits = split_batch · split_heads · chunks.
    int32_t splits;
    int32_t split_batch;
    int32_t split_heads;
    int32_t split_qtiles;
} PrefixAttnBwdParams;

// Parameter struct of the dense GPT-2 kernels (kernels/dense.cu), one for all of them: each
// kernel documents which fields it reads. Mirrored by `#[repr(C)] struct DenseParams` in
// src/device/kernels.rs (size and offsets checked by a test). Dense tensors are contiguous
// row-major `[rows, cols]` unless stated (only `dense_copy` takes strides).
#define PA_DENSE_MAX_RANK 6
typedef struct DenseParams {
    uint64_t in0, in1, in2, in3, in4;  // inputs
    uint64_t out0, out1, out2;         // outputs
    uint64_t idx;                      // int32 indices (token ids, targets, rows)
    int64_t rows, cols;
    int64_t dims[PA_DENSE_MAX_RANK];     // dense_copy: shape (rank dims used)
    int64_t in_str[PA_DENSE_MAX_RANK];   // dense_copy: element strides of in0
    int64_t out_str[PA_DENSE_MAX_RANK];  // dense_copy: element strides of out0
    int64_t in_off, out_off;             // dense_copy: element offsets
    int32_t in_dt, in1_dt, out_dt;       // element types: 0 = f16, 1 = bf16, 2 = f32
    int32_t flags;                       // bit 0: accumulate into out0
    int32_t seq_len, pos_offset, rank, pad0;
    float f[8];                          // scalars (alpha, beta, eps, AdamW constants)
} DenseParams;

#ifdef __cplusplus
}
#endif

/* prefix_attn.h: the C ABI of the prefix-attn crate (src/capi/mod.rs).
 *
 * Written by hand and checked against the Rust side by tests/c_api.rs (every function and
 * constant here exists there with the same value, and the header compiles as C99 and C++).
 *
 * Every function returns a pa_status (PA_OK = 0); on failure pa_last_error() gives the
 * calling thread's message, which names the argument. No panic crosses the boundary.
 * Memory: tensors in host memory on a cpu (or emu) context, in device memory on a cuda
 * context; the one-shot calls' int32 metadata arrays are host memory on every context.
 * Strides are in elements, non-negative; the last dimension must be contiguous; pointers
 * must be aligned to their element size; outputs must not overlap inputs.
 * Streams (void *stream, a CUstream): NULL runs on the crate's stream; on a cuda context a
 * stream of the device's primary context (the CUDA runtime's) orders the work against the
 * caller's (docs/ARCHITECTURE.md section 1); cpu and emu contexts take NULL only.
 * Link the static library with -lpthread -ldl -lm (cudarc loads libcuda with dlopen).
 */
#ifndef PREFIX_ATTN_H
#define PREFIX_ATTN_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int32_t pa_status;
#define PA_OK 0
#define PA_ERR_NULL 1
#define PA_ERR_SHAPE 2
#define PA_ERR_DTYPE 3
#define PA_ERR_LAYOUT 4
#define PA_ERR_INDEX 5
#define PA_ERR_DEVICE 6
#define PA_ERR_UNSUPPORTED 7
#define PA_ERR_KERNEL 8
#define PA_ERR_PANIC 9
#define PA_ERR_OTHER 10

/* pa_tensor.dtype */
#define PA_F32 0
#define PA_F16 1
#define PA_BF16 2
#define PA_I32 3

/* pa_context_create kind */
#define PA_DEVICE_CPU 0
#define PA_DEVICE_CUDA 1
#define PA_DEVICE_EMU 2

/* A strided view of caller-owned memory. */
typedef struct pa_tensor {
    void *data;          /* element 0 (host or device pointer) */
    int32_t dtype;       /* PA_F32, PA_F16, PA_BF16, PA_I32 */
    int32_t rank;        /* 1..4 */
    int64_t shape[4];    /* sizes, outermost first */
    int64_t strides[4];  /* element strides, >= 0 */
} pa_tensor;

/* Inputs of the forward and the shared part of the backward. Shapes: q [B, Tq, Hq, D],
 * k, v [B, Tk, Hkv, D], k_pre, v_pre [NP, P, Hkv, D] (both NULL: no prefix table). */
typedef struct pa_attn_args {
    const pa_tensor *q;
    const pa_tensor *k;
    const pa_tensor *v;
    const pa_tensor *k_pre;
    const pa_tensor *v_pre;
    const int32_t *prefix_index; /* [batch] host, -1 = none; NULL: 0 for all (NULL in runs) */
    const int32_t *seqlen_q;     /* [batch] host; NULL: Tq (NULL in runs) */
    const int32_t *seqlen_k;     /* [batch] host; NULL: Tk (NULL in runs) */
    int64_t batch;               /* length of the metadata arrays (q's B) */
    int32_t causal;              /* non-zero: causal, bottom-right aligned */
    float scale;                 /* 0: 1/sqrt(D) */
} pa_attn_args;

/* Inputs of the paged decode: Tq <= 16 new queries per sequence over [its prefix ; the
 * seqlen_k tokens in its pages]. q [B, Tq, Hq, D]; k_cache, v_cache [num_pages, page_size,
 * Hkv, D] (page_size a power of two); k_pre, v_pre [NP, P, Hkv, D] (both NULL: none). */
typedef struct pa_decode_args {
    const pa_tensor *q;
    const pa_tensor *k_cache;
    const pa_tensor *v_cache;
    const pa_tensor *k_pre;
    const pa_tensor *v_pre;
    const int32_t *block_table;  /* [batch, max_pages] host, row-major page numbers (NULL in runs) */
    int64_t max_pages;           /* row length of block_table */
    const int32_t *seqlen_k;     /* [batch] host: tokens in the pages, the new ones included (NULL in runs) */
    const int32_t *prefix_index; /* [batch] host, -1 = none; NULL: 0 for all (NULL in runs) */
    const int32_t *prefix_len;   /* [NP] host: valid rows of each prefix; NULL: P for all (NULL in runs) */
    int64_t batch;               /* length of the [batch] arrays (q's B) */
    float scale;                 /* 0: 1/sqrt(D) */
} pa_decode_args;

typedef struct pa_context pa_context;
/* A forward or backward planned once for a shape (pa_attn_plan_create). */
typedef struct pa_attn_plan pa_attn_plan;
/* A paged decode planned once for a shape (pa_decode_plan_create). */
typedef struct pa_decode_plan pa_decode_plan;

/* The library version, a static string. */
const char *pa_version(void);
/* The calling thread's last error message ("" after a success). */
const char *pa_last_error(void);
/* A context for a device: kind PA_DEVICE_CPU, PA_DEVICE_CUDA (ordinal) or PA_DEVICE_EMU. */
pa_status pa_context_create(int32_t kind, int32_t ordinal, pa_context **out);
/* Destroys a context (NULL does nothing); work it queued on a caller's stream must have run. */
void pa_context_destroy(pa_context *ctx);
/* Forward: o [B, Tq, Hq, D] (q's dtype), lse [B, Hq, Tq] f32 or NULL. stream: NULL, or on
 * cuda the caller's stream: the call runs after the work queued on it so far and before the
 * work it queues later (event-ordered; the host does not wait). */
pa_status pa_attn_fwd(const pa_context *ctx, const pa_attn_args *args, const pa_tensor *o,
                      const pa_tensor *lse, void *stream);
/* Backward: dq, dk, dv (NULL allowed with prefix_only), f32 dk_pre, dv_pre or NULL. */
pa_status pa_attn_bwd(const pa_context *ctx, const pa_attn_args *args, const pa_tensor *o,
                      const pa_tensor *lse, const pa_tensor *d_o, const pa_tensor *dq,
                      const pa_tensor *dk, const pa_tensor *dv, const pa_tensor *dk_pre,
                      const pa_tensor *dv_pre, int32_t prefix_only, void *stream);
/* Paged decode: o [B, Tq, Hq, D] (q's dtype), lse [B, Hq, Tq] f32 or NULL; the new queries are
 * causal among themselves (bottom-right), prefix rows past prefix_len are masked. stream as
 * for pa_attn_fwd. */
pa_status pa_attn_decode(const pa_context *ctx, const pa_decode_args *args, const pa_tensor *o,
                         const pa_tensor *lse, void *stream);
/* Validates args and writes the caller workspace the one-shot call needs (0). */
pa_status pa_workspace_size(const pa_context *ctx, const pa_attn_args *args, int32_t backward,
                            uint64_t *bytes);

/* Plan/run (emu and cuda contexts). A plan validates the shapes, fixes the kernel launches,
 * sizes the workspace and loads the kernels once; a run allocates nothing, copies nothing
 * from the host and never synchronises, so a CUDA graph can capture it.
 * pa_attn_plan_create reads args for shapes only: data pointers may be NULL, metadata
 * pointers and batch are not read. backward: non-zero plans the backward (sized for the
 * sequence and, with a prefix table, the prefix gradients). A plan may outlive its context. */
pa_status pa_attn_plan_create(const pa_context *ctx, const pa_attn_args *args, int32_t backward,
                              pa_attn_plan **out);
/* The workspace bytes a run needs (context memory, 16-byte aligned). */
pa_status pa_attn_plan_workspace_size(const pa_attn_plan *plan, uint64_t *bytes);
/* Runs a forward plan on tensors of the planned shapes and dtype, with the planned causal and
 * scale (args' metadata pointers must be NULL). prefix_index, seqlen_q, seqlen_k: int32 [B] in
 * the context's memory (device pointers on cuda), each NULL for its default; values are
 * clamped (lengths to [0, Tq] / [0, Tk], a prefix index outside [0, NP) means none). workspace: workspace_bytes bytes of the
 * context's memory. stream: NULL, or the caller's stream, on which the kernels are launched
 * directly. */
pa_status pa_attn_plan_run_fwd(const pa_attn_plan *plan, const pa_attn_args *args,
                               const pa_tensor *o, const pa_tensor *lse,
                               const int32_t *prefix_index, const int32_t *seqlen_q,
                               const int32_t *seqlen_k, void *workspace,
                               uint64_t workspace_bytes, void *stream);
/* Runs a backward plan: tensors as for pa_attn_bwd, the rest as for pa_attn_plan_run_fwd. */
pa_status pa_attn_plan_run_bwd(const pa_attn_plan *plan, const pa_attn_args *args,
                               const pa_tensor *o, const pa_tensor *lse, const pa_tensor *d_o,
                               const pa_tensor *dq, const pa_tensor *dk, const pa_tensor *dv,
                               const pa_tensor *dk_pre, const pa_tensor *dv_pre,
                               int32_t prefix_only, const int32_t *prefix_index,
                               const int32_t *seqlen_q, const int32_t *seqlen_k,
                               void *workspace, uint64_t workspace_bytes, void *stream);
/* Destroys a plan (NULL does nothing); the work its runs queued must have run. */
void pa_attn_plan_destroy(pa_attn_plan *plan);
/* The paged decode planned once (emu and cuda contexts), for the call an engine makes at every
 * token. pa_decode_plan_create reads args for its tensors' shapes and max_pages only (data
 * pointers may be NULL; metadata pointers and batch are not read). The key splits depend on
 * the shapes and max_pages, never on the lengths: one plan serves every step while the
 * sequences fit max_pages pages. A plan may outlive its context. */
pa_status pa_decode_plan_create(const pa_context *ctx, const pa_decode_args *args,
                                pa_decode_plan **out);
/* The workspace bytes a run needs (the splits' partials; 0 when the plan does not split). */
pa_status pa_decode_plan_workspace_size(const pa_decode_plan *plan, uint64_t *bytes);
/* Runs a decode plan on tensors of the planned shapes and dtype (args' metadata pointers must
 * be NULL; max_pages the plan's). block_table [B, max_pages], seqlen_k [B], prefix_index [B]
 * (NULL: 0 for all), prefix_len [NP] (NULL: P for all): int32 in the context's memory (device
 * pointers on cuda), clamped where read (lengths to [0, max_pages * page_size] and [0, P],
 * pages to [0, num_pages), a prefix index outside [0, NP) means none). workspace:
 * workspace_bytes bytes of the context's memory, 16-byte aligned (NULL when the size is 0).
 * stream as for pa_attn_plan_run_fwd: no allocation, host copy or synchronisation. */
pa_status pa_decode_plan_run(const pa_decode_plan *plan, const pa_decode_args *args,
                             const pa_tensor *o, const pa_tensor *lse, const int32_t *block_table,
                             const int32_t *seqlen_k, const int32_t *prefix_index,
                             const int32_t *prefix_len, void *workspace, uint64_t workspace_bytes,
                             void *stream);
/* Destroys a decode plan (NULL does nothing); the work its runs queued must have run. */
void pa_decode_plan_destroy(pa_decode_plan *plan);
/* Test hook: panics inside the library; returns PA_ERR_PANIC. */
pa_status pa_test_panic(void);

#ifdef __cplusplus
}
#endif

#endif /* PREFIX_ATTN_H */

/* prefix_attn.h: the C ABI of the prefix-attn crate (src/capi/mod.rs).
 *
 * Written by hand and checked against the Rust side by tests/c_api.rs (every function and
 * constant here exists there with the same value, and the header compiles as C99 and C++).
 *
 * Every function returns a pa_status (PA_OK = 0); on failure pa_last_error() gives the
 * calling thread's message, which names the argument. No panic crosses the boundary.
 * Memory: host pointers on a cpu (or emu) context, device pointers on a cuda context.
 * Strides are in elements, non-negative; the last dimension must be contiguous; pointers
 * must be aligned to their element size; outputs must not overlap inputs.
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
    const int32_t *prefix_index; /* [batch] host, -1 = none; NULL: 0 for all */
    const int32_t *seqlen_q;     /* [batch] host; NULL: Tq */
    const int32_t *seqlen_k;     /* [batch] host; NULL: Tk */
    int64_t batch;               /* length of the metadata arrays (q's B) */
    int32_t causal;              /* non-zero: causal, bottom-right aligned */
    float scale;                 /* 0: 1/sqrt(D) */
} pa_attn_args;

typedef struct pa_context pa_context;

/* The library version, a static string. */
const char *pa_version(void);
/* The calling thread's last error message ("" after a success). */
const char *pa_last_error(void);
/* A context for a device: kind PA_DEVICE_CPU, PA_DEVICE_CUDA (ordinal) or PA_DEVICE_EMU. */
pa_status pa_context_create(int32_t kind, int32_t ordinal, pa_context **out);
/* Destroys a context (NULL does nothing). */
void pa_context_destroy(pa_context *ctx);
/* Forward: o [B, Tq, Hq, D] (q's dtype), lse [B, Hq, Tq] f32 or NULL. stream: NULL. */
pa_status pa_attn_fwd(const pa_context *ctx, const pa_attn_args *args, const pa_tensor *o,
                      const pa_tensor *lse, void *stream);
/* Backward: dq, dk, dv (NULL allowed with prefix_only), f32 dk_pre, dv_pre or NULL. */
pa_status pa_attn_bwd(const pa_context *ctx, const pa_attn_args *args, const pa_tensor *o,
                      const pa_tensor *lse, const pa_tensor *d_o, const pa_tensor *dq,
                      const pa_tensor *dk, const pa_tensor *dv, const pa_tensor *dk_pre,
                      const pa_tensor *dv_pre, int32_t prefix_only, void *stream);
/* Validates args and writes the caller workspace the call needs (0 today). */
pa_status pa_workspace_size(const pa_context *ctx, const pa_attn_args *args, int32_t backward,
                            uint64_t *bytes);
/* Test hook: panics inside the library; returns PA_ERR_PANIC. */
pa_status pa_test_panic(void);

#ifdef __cplusplus
}
#endif

#endif /* PREFIX_ATTN_H */

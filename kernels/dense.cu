// The dense kernels of the training and inference path, GPT-2's and the Llama family's
// (everything but the matmuls, which go to cuBLAS, and attention, in prefix_attn_*.cu):
//
//   dense_embed           token + position embedding (positions start at pos_offset)
//   dense_layernorm       layer norm forward, also storing mean and rstd (f32) per row
//   dense_layernorm_bwd   input gradient of layer norm (the weights are frozen)
//   dense_gelu            gelu, tanh form (HF `gelu_new`)
//   dense_gelu_bwd        dx = gelu'(x) · dy
//   dense_bias_gelu       h += bias; out = gelu(h) (one pass: the MLP's first layer)
//   dense_bias_residual   out += bias + residual (one pass: a projection's bias + residual)
//   dense_tanh            tanh (prefix encoder)
//   dense_tanh_bwd        dx = (1 - y²) · dy, y = tanh(x)
//   dense_axpby           out = alpha · in0 + beta · out (residual adds, axpy, scale)
//   dense_sum_rows        out[c] (+)= Σ_r x[r, c] (bias gradients; fixed order)
//   dense_copy            strided copy of up to 6 dims with dtype conversion
//   dense_gather_rows     out row i = in row idx[i], or zeros where idx[i] < 0
//   dense_cross_entropy   softmax cross-entropy per row with HF's -100 convention; writes the
//                         gradient of the summed loss (may overwrite the logits in place)
//   dense_adamw           one torch AdamW update of f32 parameters
//
// and those of the Llama family (Llama, Qwen2, Mistral; docs/ARCHITECTURE.md §11):
//
//   dense_rmsnorm         RMS norm forward, also storing rstd (f32) per row
//   dense_rmsnorm_bwd     input gradient of RMS norm (the weight is frozen)
//   dense_rope            rotate-half rotary embedding in place (sign -1: its backward)
//   dense_swiglu          silu(gate) · up
//   dense_swiglu_bwd      the gradients of silu(gate) · up
//
// Every kernel is a grid-stride loop, so any grid size is correct; the Rust planner
// (src/device/kernels.rs, `plan_dense`) picks it. Arithmetic is fp32 whatever the storage
// type; reductions use a fixed order (warp butterflies, then warps in order): results are
// deterministic. The same source runs on the CPU emulator (PREFIX_ATTN_EMU).
#include "common/params.h"
#include "common/prims.cuh"
#include "common/registry.h"

namespace pa {
namespace dense {

enum : int { kF16 = 0, kBF16 = 1, kF32 = 2 };
constexpr int kIgnore = -100;

template <class T>
PA_DEVICE T* ptr(uint64_t addr) {
    return reinterpret_cast<T*>(static_cast<uintptr_t>(addr));
}

// Element i of a buffer of type dt, as f32.
PA_DEVICE float load(uint64_t base, int64_t i, int dt) {
    if (dt == kF32) return ptr<const float>(base)[i];
    if (dt == kF16) return __half2float(ptr<const __half>(base)[i]);
    return __bfloat162float(ptr<const __nv_bfloat16>(base)[i]);
}

// Stores v (rounded to nearest even) as element i of a buffer of type dt.
PA_DEVICE void store(uint64_t base, int64_t i, int dt, float v) {
    if (dt == kF32) {
        ptr<float>(base)[i] = v;
    } else if (dt == kF16) {
        ptr<__half>(base)[i] = __float2half_rn(v);
    } else {
        ptr<__nv_bfloat16>(base)[i] = __float2bfloat16_rn(v);
    }
}

PA_DEVICE int64_t first_index() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
PA_DEVICE int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

PA_DEVICE float warp_sum(float v) {
    for (int m = 16; m > 0; m >>= 1) v += shfl_xor(v, m);
    return v;
}
PA_DEVICE float warp_max(float v) {
    for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, shfl_xor(v, m));
    return v;
}

// Sum (or max) over the block; every thread gets the same value. `red` holds one float per
// warp. Ends with a barrier, so `red` may be reused at once.
template <bool kMax>
PA_DEVICE float block_reduce(float v, float* red) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    v = kMax ? warp_max(v) : warp_sum(v);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = red[0];
    for (int w = 1; w < warps; ++w) r = kMax ? fmaxf(r, red[w]) : r + red[w];
    __syncthreads();
    return r;
}

constexpr float kGeluK = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluC = 0.044715f;

}  // namespace dense
}  // namespace pa

using namespace pa::dense;

// in0 = wte [V, C], in1 = wpe [n_positions, C] (in_dt), idx = token ids [rows] (checked by
// the wrapper), out0 = [rows, C] (out_dt); row r has position pos_offset + r % seq_len.
extern "C" PA_GLOBAL void dense_embed(DenseParams p) {
    const int64_t n = p.rows * p.cols;
    for (int64_t i = first_index(); i < n; i += grid_threads()) {
        const int64_t r = i / p.cols, c = i - r * p.cols;
        const int64_t id = ptr<const int32_t>(p.idx)[r];
        const int64_t pos = p.pos_offset + r % p.seq_len;
        store(p.out0, i, p.out_dt, load(p.in0, id * p.cols + c, p.in_dt) + load(p.in1, pos * p.cols + c, p.in_dt));
    }
}

// One warp per row. in0 = x [rows, C] (in_dt), in1 = weight [C], in2 = bias [C] (in1_dt),
// out0 = y (out_dt), out1 = mean [rows], out2 = rstd [rows] (f32), f[0] = eps.
// Two passes in f32: mean, then the variance of (x - mean).
extern "C" PA_GLOBAL void dense_layernorm(DenseParams p) {
    const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
    const float inv_c = 1.0f / static_cast<float>(p.cols);
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * wpb + (threadIdx.x >> 5); r < p.rows;
         r += static_cast<int64_t>(gridDim.x) * wpb) {
        const int64_t base = r * p.cols;
        float s = 0.0f;
        for (int64_t c = lane; c < p.cols; c += 32) s += load(p.in0, base + c, p.in_dt);
        const float mu = warp_sum(s) * inv_c;
        float v = 0.0f;
        for (int64_t c = lane; c < p.cols; c += 32) {
            const float d = load(p.in0, base + c, p.in_dt) - mu;
            v += d * d;
        }
        const float rs = 1.0f / sqrtf(warp_sum(v) * inv_c + p.f[0]);
        for (int64_t c = lane; c < p.cols; c += 32) {
            const float xh = (load(p.in0, base + c, p.in_dt) - mu) * rs;
            store(p.out0, base + c, p.out_dt, xh * load(p.in1, c, p.in1_dt) + load(p.in2, c, p.in1_dt));
        }
        if (lane == 0) {
            ptr<float>(p.out1)[r] = mu;
            ptr<float>(p.out2)[r] = rs;
        }
    }
}

// One warp per row. in0 = dy, in1 = x [rows, C] (in_dt), in2 = weight [C] (in1_dt),
// in3 = mean, in4 = rstd [rows] (f32), out0 = dx (out_dt), flags bit 0: dx += instead of =.
// With xhat = (x - mean) rstd and g = dy · w: dx = rstd (g - mean(g) - xhat mean(g xhat)).
extern "C" PA_GLOBAL void dense_layernorm_bwd(DenseParams p) {
    const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
    const float inv_c = 1.0f / static_cast<float>(p.cols);
    const bool acc = (p.flags & 1) != 0;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * wpb + (threadIdx.x >> 5); r < p.rows;
         r += static_cast<int64_t>(gridDim.x) * wpb) {
        const int64_t base = r * p.cols;
        const float mu = ptr<const float>(p.in3)[r], rs = ptr<const float>(p.in4)[r];
        float mg = 0.0f, mgx = 0.0f;
        for (int64_t c = lane; c < p.cols; c += 32) {
            const float g = load(p.in0, base + c, p.in_dt) * load(p.in2, c, p.in1_dt);
            mg += g;
            mgx += g * ((load(p.in1, base + c, p.in_dt) - mu) * rs);
        }
        mg = warp_sum(mg) * inv_c;
        mgx = warp_sum(mgx) * inv_c;
        for (int64_t c = lane; c < p.cols; c += 32) {
            const float xh = (load(p.in1, base + c, p.in_dt) - mu) * rs;
            const float g = load(p.in0, base + c, p.in_dt) * load(p.in2, c, p.in1_dt);
            float v = rs * (g - mg - xh * mgx);
            if (acc) v += load(p.out0, base + c, p.out_dt);
            store(p.out0, base + c, p.out_dt, v);
        }
    }
}

// in0 = x, out0 = gelu(x); rows · cols elements.
extern "C" PA_GLOBAL void dense_gelu(DenseParams p) {
    const int64_t n = p.rows * p.cols;
    for (int64_t i = first_index(); i < n; i += grid_threads()) {
        const float x = load(p.in0, i, p.in_dt);
        store(p.out0, i, p.out_dt, 0.5f * x * (1.0f + tanhf(kGeluK * (x + kGeluC * x * x * x))));
    }
}

// out0 = h [rows, cols] (in place: h += bias), in0 = bias [cols] (in_dt), out1 = gelu(h)
// (out_dt, same type as h). One pass over h: the MLP's first bias and activation.
extern "C" PA_GLOBAL void dense_bias_gelu(DenseParams p) {
    const int64_t n = p.rows * p.cols;
    for (int64_t i = first_index(); i < n; i += grid_threads()) {
        const int64_t c = i % p.cols;
        // h is rounded to its storage type first: the backward reads it from there.
        store(p.out0, i, p.out_dt, load(p.out0, i, p.out_dt) + load(p.in0, c, p.in_dt));
        const float x = load(p.out0, i, p.out_dt);
        store(p.out1, i, p.out_dt, 0.5f * x * (1.0f + tanhf(kGeluK * (x + kGeluC * x * x * x))));
    }
}

// out0 [rows, cols] += in0 = bias [cols] (in_dt) + in1 = residual [rows, cols] (out_dt): a
// projection's bias and the residual add in one pass.
extern "C" PA_GLOBAL void dense_bias_residual(DenseParams p) {
    const int64_t n = p.rows * p.cols;
    for (int64_t i = first_index(); i < n; i += grid_threads()) {
        const int64_t c = i % p.cols;
        store(p.out0, i, p.out_dt,
              load(p.out0, i, p.out_dt) + (load(p.in0, c, p.in_dt) + load(p.in1, i, p.out_dt)));
    }
}

// in0 = x, in1 = dy, out0 = dx = gelu'(x) · dy.
extern "C" PA_GLOBAL void dense_gelu_bwd(DenseParams p) {
    const int64_t n = p.rows * p.cols;
    for (int64_t i = first_index(); i < n; i += grid_threads()) {
        const float x = load(p.in0, i, p.in_dt), g = load(p.in1, i, p.in_dt);
        const float t = tanhf(kGeluK * (x + kGeluC * x * x * x));
        const float du = kGeluK * (1.0f + 3.0f * kGeluC * x * x);
        store(p.out0, i, p.out_dt, g * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du));
    }
}

// in0 = x, out0 = tanh(x).
extern "C" PA_GLOBAL void dense_tanh(DenseParams p) {
    const int64_t n = p.rows * p.cols;
    for (int64_t i = first_index(); i < n; i += grid_threads()) store(p.out0, i, p.out_dt, tanhf(load(p.in0, i, p.in_dt)));
}

// in0 = y = tanh(x), in1 = dy, out0 = dx = (1 - y²) dy.
extern "C" PA_GLOBAL void dense_tanh_bwd(DenseParams p) {
    const int64_t n = p.rows * p.cols;
    for (int64_t i = first_index(); i < n; i += grid_threads()) {
        const float y = load(p.in0, i, p.in_dt);
        store(p.out0, i, p.out_dt, (1.0f - y * y) * load(p.in1, i, p.in_dt));
    }
}

// out0 = f[0] · in0 + f[1] · out0 (in0 == 0: out0 = f[1] · out0).
extern "C" PA_GLOBAL void dense_axpby(DenseParams p) {
    const int64_t n = p.rows * p.cols;
    const float alpha = p.f[0], beta = p.f[1];
    for (int64_t i = first_index(); i < n; i += grid_threads()) {
        float v = beta * load(p.out0, i, p.out_dt);
        if (p.in0 != 0) v += alpha * load(p.in0, i, p.in_dt);
        store(p.out0, i, p.out_dt, v);
    }
}

// in0 = x [rows, cols] with row stride in_str[0] (columns contiguous), out0 = [cols]:
// out0[c] (+)= Σ_r x[r, c], rows in order, one thread per column (bias gradients of the
// prefix encoder; the batch reduction of the naive-concat baseline's prefix gradient).
extern "C" PA_GLOBAL void dense_sum_rows(DenseParams p) {
    for (int64_t c = first_index(); c < p.cols; c += grid_threads()) {
        float s = (p.flags & 1) ? load(p.out0, c, p.out_dt) : 0.0f;
        for (int64_t r = 0; r < p.rows; ++r) s += load(p.in0, r * p.in_str[0] + c, p.in_dt);
        store(p.out0, c, p.out_dt, s);
    }
}

// out0[idx] = in0[idx] over the `rank` dims (strided both sides; a stride may be 0 to
// broadcast), converting in_dt -> out_dt; flags bit 0: out0[idx] += in0[idx].
extern "C" PA_GLOBAL void dense_copy(DenseParams p) {
    int64_t n = 1;
    for (int d = 0; d < p.rank; ++d) n *= p.dims[d];
    for (int64_t i = first_index(); i < n; i += grid_threads()) {
        int64_t rem = i, src = p.in_off, dst = p.out_off;
        for (int d = p.rank - 1; d >= 0; --d) {
            const int64_t k = rem % p.dims[d];
            rem /= p.dims[d];
            src += k * p.in_str[d];
            dst += k * p.out_str[d];
        }
        float v = load(p.in0, src, p.in_dt);
        if (p.flags & 1) v += load(p.out0, dst, p.out_dt);
        store(p.out0, dst, p.out_dt, v);
    }
}

// in0 = [M, cols], idx = [rows] (row of in0, or -1 for zeros), out0 = [rows, cols].
extern "C" PA_GLOBAL void dense_gather_rows(DenseParams p) {
    const int64_t n = p.rows * p.cols;
    for (int64_t i = first_index(); i < n; i += grid_threads()) {
        const int64_t r = i / p.cols, c = i - r * p.cols;
        const int64_t src = ptr<const int32_t>(p.idx)[r];
        store(p.out0, i, p.out_dt, src < 0 ? 0.0f : load(p.in0, src * p.cols + c, p.in_dt));
    }
}

// One block per row. in0 = logits [rows, V] (in_dt), idx = targets [rows] (-100: ignored;
// others checked by the wrapper), out1 = losses [rows] (f32: logsumexp - logit[target], 0
// when ignored), out0 = dlogits [rows, V] (out_dt) or 0 for none: softmax - onehot for
// counted rows, zeros for ignored ones: the gradient of the *sum* of the losses. out0 may be
// in0 (in place: every read of a row happens before its first write).
extern "C" PA_GLOBAL void dense_cross_entropy(DenseParams p) {
    __shared__ float red[32];
    for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const int t = ptr<const int32_t>(p.idx)[r];
        const int64_t base = r * p.cols;
        if (t == kIgnore) {
            if (threadIdx.x == 0) ptr<float>(p.out1)[r] = 0.0f;
            if (p.out0 != 0) {
                for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) store(p.out0, base + c, p.out_dt, 0.0f);
            }
            continue;
        }
        float mx = -INFINITY;
        for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) mx = fmaxf(mx, load(p.in0, base + c, p.in_dt));
        mx = block_reduce<true>(mx, red);
        float s = 0.0f;
        for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) s += expf(load(p.in0, base + c, p.in_dt) - mx);
        s = block_reduce<false>(s, red);
        const float xt = load(p.in0, base + t, p.in_dt);
        __syncthreads();  // everyone has read logit[target] before the row is overwritten
        if (threadIdx.x == 0) ptr<float>(p.out1)[r] = mx + logf(s) - xt;
        if (p.out0 != 0) {
            const float inv = 1.0f / s;
            for (int64_t c = threadIdx.x; c < p.cols; c += blockDim.x) {
                const float g = expf(load(p.in0, base + c, p.in_dt) - mx) * inv - (c == t ? 1.0f : 0.0f);
                store(p.out0, base + c, p.out_dt, g);
            }
        }
    }
}

// torch.optim.AdamW (single-tensor form), f32: out0 = param, in0 = grad, out1 = m, out2 = v;
// f = {1 - lr·wd, 1 - β1, β2, 1 - β2, lr / (1 - β1^t), sqrt(1 - β2^t), eps} computed by the
// host in f64 and rounded, like the CPU backend.
extern "C" PA_GLOBAL void dense_adamw(DenseParams p) {
    const int64_t n = p.rows * p.cols;
    float* param = ptr<float>(p.out0);
    float* m = ptr<float>(p.out1);
    float* v = ptr<float>(p.out2);
    const float* g = ptr<const float>(p.in0);
    for (int64_t i = first_index(); i < n; i += grid_threads()) {
        float pi = param[i] * p.f[0];
        const float gi = g[i];
        const float mi = m[i] + (gi - m[i]) * p.f[1];
        const float vi = v[i] * p.f[2] + p.f[3] * gi * gi;
        const float denom = sqrtf(vi) / p.f[5] + p.f[6];
        pi -= p.f[4] * mi / denom;
        m[i] = mi;
        v[i] = vi;
        param[i] = pi;
    }
}

// One warp per row. in0 = x [rows, C] (in_dt), in1 = weight [C] (in1_dt), out0 = y (out_dt),
// out1 = rstd [rows] (f32), f[0] = eps: y = w · (x · rstd), rstd = 1 / sqrt(mean(x²) + eps),
// in f32 as transformers' LlamaRMSNorm.
extern "C" PA_GLOBAL void dense_rmsnorm(DenseParams p) {
    const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
    const float inv_c = 1.0f / static_cast<float>(p.cols);
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * wpb + (threadIdx.x >> 5); r < p.rows;
         r += static_cast<int64_t>(gridDim.x) * wpb) {
        const int64_t base = r * p.cols;
        float s = 0.0f;
        for (int64_t c = lane; c < p.cols; c += 32) {
            const float x = load(p.in0, base + c, p.in_dt);
            s += x * x;
        }
        const float rs = 1.0f / sqrtf(warp_sum(s) * inv_c + p.f[0]);
        for (int64_t c = lane; c < p.cols; c += 32) {
            store(p.out0, base + c, p.out_dt, load(p.in1, c, p.in1_dt) * (load(p.in0, base + c, p.in_dt) * rs));
        }
        if (lane == 0) ptr<float>(p.out1)[r] = rs;
    }
}

// One warp per row. in0 = dy, in1 = x [rows, C] (in_dt), in2 = weight [C] (in1_dt),
// in3 = rstd [rows] (f32), out0 = dx (out_dt), flags bit 0: dx += instead of =.
// dx = rstd · w · dy - x · rstd³ · mean(w · dy · x).
extern "C" PA_GLOBAL void dense_rmsnorm_bwd(DenseParams p) {
    const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
    const float inv_c = 1.0f / static_cast<float>(p.cols);
    const bool acc = (p.flags & 1) != 0;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * wpb + (threadIdx.x >> 5); r < p.rows;
         r += static_cast<int64_t>(gridDim.x) * wpb) {
        const int64_t base = r * p.cols;
        const float rs = ptr<const float>(p.in3)[r];
        float s = 0.0f;
        for (int64_t c = lane; c < p.cols; c += 32) {
            s += load(p.in2, c, p.in1_dt) * load(p.in0, base + c, p.in_dt) * load(p.in1, base + c, p.in_dt);
        }
        const float k = rs * rs * rs * (warp_sum(s) * inv_c);
        for (int64_t c = lane; c < p.cols; c += 32) {
            float v = rs * load(p.in2, c, p.in1_dt) * load(p.in0, base + c, p.in_dt) - load(p.in1, base + c, p.in_dt) * k;
            if (acc) v += load(p.out0, base + c, p.out_dt);
            store(p.out0, base + c, p.out_dt, v);
        }
    }
}

// out0 = x [rows = B·T, dims[0] = H, dims[1] = D] (out_dt), rotated in place; in0 = cos,
// in1 = sin [seq_len, D/2] (f32): row r uses table row r % seq_len (seq_len = T: one table for
// the batch; B·T: one per sequence); f[0] = +1 (forward) or -1 (backward: the transposed
// rotation). Pair (j, j + D/2) of every head: (a, b) -> (a·c - b·s, b·c + a·s).
extern "C" PA_GLOBAL void dense_rope(DenseParams p) {
    const int64_t heads = p.dims[0], d = p.dims[1], half = d / 2;
    const int64_t n = p.rows * heads * half;
    for (int64_t i = first_index(); i < n; i += grid_threads()) {
        const int64_t r = i / (heads * half), rem = i - r * heads * half;
        const int64_t h = rem / half, j = rem - h * half;
        const int64_t t = (r % p.seq_len) * half + j;
        const float c = ptr<const float>(p.in0)[t], s = p.f[0] * ptr<const float>(p.in1)[t];
        const int64_t base = (r * heads + h) * d;
        const float a = load(p.out0, base + j, p.out_dt), b = load(p.out0, base + j + half, p.out_dt);
        store(p.out0, base + j, p.out_dt, a * c - b * s);
        store(p.out0, base + j + half, p.out_dt, b * c + a * s);
    }
}

// in0 = gate, in1 = up (in_dt), out0 = silu(gate) · up (out_dt); rows · cols elements.
extern "C" PA_GLOBAL void dense_swiglu(DenseParams p) {
    const int64_t n = p.rows * p.cols;
    for (int64_t i = first_index(); i < n; i += grid_threads()) {
        const float g = load(p.in0, i, p.in_dt);
        store(p.out0, i, p.out_dt, g / (1.0f + expf(-g)) * load(p.in1, i, p.in_dt));
    }
}

// in0 = gate, in1 = up, in2 = dy (in_dt), out0 = d_gate = dy · up · silu'(gate),
// out1 = d_up = dy · silu(gate) (out_dt), silu'(g) = σ(g) (1 + g (1 - σ(g))).
extern "C" PA_GLOBAL void dense_swiglu_bwd(DenseParams p) {
    const int64_t n = p.rows * p.cols;
    for (int64_t i = first_index(); i < n; i += grid_threads()) {
        const float g = load(p.in0, i, p.in_dt), u = load(p.in1, i, p.in_dt), dy = load(p.in2, i, p.in_dt);
        const float sg = 1.0f / (1.0f + expf(-g));
        store(p.out0, i, p.out_dt, dy * u * sg * (1.0f + g * (1.0f - sg)));
        store(p.out1, i, p.out_dt, dy * g * sg);
    }
}

// Every dense kernel is grid-stride over rows or elements: the planner picks the block size.
PA_REGISTER_KERNEL(dense_embed, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_layernorm, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_layernorm_bwd, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_gelu, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_bias_gelu, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_bias_residual, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_gelu_bwd, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_tanh, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_tanh_bwd, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_axpby, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_sum_rows, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_copy, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_gather_rows, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_cross_entropy, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_adamw, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_rmsnorm, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_rmsnorm_bwd, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_rope, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_swiglu, DenseParams, 0, 0, 0, 0)
PA_REGISTER_KERNEL(dense_swiglu_bwd, DenseParams, 0, 0, 0, 0)

#if defined(PREFIX_ATTN_EMU)
#include <cstddef>

// Size and field offsets of DenseParams, for the layout test against the Rust mirror.
extern "C" size_t pa_dense_params_layout(size_t* out, size_t n) {
    const size_t v[] = {
        sizeof(DenseParams),          offsetof(DenseParams, in0),     offsetof(DenseParams, out0),
        offsetof(DenseParams, idx),   offsetof(DenseParams, rows),    offsetof(DenseParams, dims),
        offsetof(DenseParams, in_str), offsetof(DenseParams, out_str), offsetof(DenseParams, in_off),
        offsetof(DenseParams, in_dt), offsetof(DenseParams, flags),   offsetof(DenseParams, seq_len),
        offsetof(DenseParams, rank),  offsetof(DenseParams, f),
    };
    const size_t count = sizeof(v) / sizeof(v[0]);
    for (size_t i = 0; i < count && i < n; ++i) out[i] = v[i];
    return count;
}
#endif

// CPU emulator of the CUDA kernels: the shim that lets the same `.cu` sources compile with g++
// (-std=c++20 -x c++ -DPREFIX_ATTN_EMU -fno-strict-aliasing) and run on the CPU inside
// `cargo test`. See docs/ARCHITECTURE.md §4 for the why; this header is the "device side" API.
//
// Execution model (implemented in emu.cpp):
//   * Every CUDA thread of a block is a fiber with its own stack, so __syncthreads() is a real
//     block barrier. Blocks run one after another on the OS thread that called emu::launch(),
//     and launches are serialised process-wide, so `__shared__` can be plain static storage.
//   * Scheduling is deterministic run-to-barrier round robin: each fiber runs until it blocks
//     (block barrier or warp collective) or exits, then the next one in thread order runs (or
//     in reverse order, see set_schedule_reverse). A thread that releases a barrier (the last to
//     arrive) keeps running. No progress possible = a reported error, never a hang.
//   * Warp collectives (shuffles, ballot, __syncwarp, mma.sync, ldmatrix) meet in a per-warp
//     scratch area behind a 32-party warp barrier, never the block barrier.
//   * cp.async is a deferred copy: performed at cp.async.wait_group, destination poisoned
//     until then.
//   * Synccheck (always on): a __syncthreads() not reached by every live thread of the block, a
//     warp collective not reached by every lane of its mask (a lane that waits elsewhere or has
//     exited), and a thread that exits with cp.async copies still pending are launch errors.
//   * Racecheck (cargo feature `emu-racecheck`, PREFIX_ATTN_EMU_RACECHECK): the kernels are
//     compiled with gcc's ThreadSanitizer instrumentation (-fsanitize=thread), whose hooks the
//     emulator implements itself (emu.cpp): a shadow memory of every shared-memory byte (and,
//     per block, of global memory) reports pairs of accesses by two CUDA threads that no block
//     barrier or warp collective orders, reads of shared memory no thread of the block has
//     written (initcheck), and accesses to a cp.async destination between the copy's issue and
//     its cp.async.wait_group. See README "Racecheck".
//
// Nothing here defines __CUDA_ARCH__; kernels test PREFIX_ATTN_EMU.
#pragma once

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <source_location>
#include <type_traits>

// ---------------------------------------------------------------------------------------------
// CUDA qualifiers. Everything is host code here.
// ---------------------------------------------------------------------------------------------
#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// One block runs at a time and launches are serialised, so per-block shared storage is plain
// static storage. Static arrays also get AddressSanitizer redzones, so an out-of-bounds access
// to a `__shared__` array is caught in the sanitizer build. In the racecheck build they live in
// one section (pa_emu_shared), which the emulator poisons (0xFF) at the start of every block
// and shadows like the dynamic shared memory; otherwise they are NOT re-poisoned between blocks
// (the emulator cannot see them): a block may read what the previous block left there.
#if defined(PREFIX_ATTN_EMU_RACECHECK)
#define __shared__ static __attribute__((section("pa_emu_shared"), aligned(16)))
// Code the racecheck instrumentation must not see (atomics: they never race).
#define PA_EMU_NO_RACECHECK __attribute__((no_sanitize("thread")))
#else
#define __shared__ static
#define PA_EMU_NO_RACECHECK
#endif

// ---------------------------------------------------------------------------------------------
// Built-in vector types and index variables.
// ---------------------------------------------------------------------------------------------
struct uint3 {
    unsigned x, y, z;
};

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// Rewritten by the scheduler at every fiber switch (threadIdx) and at every block (the others).
// Plain globals: launches are serialised and a fiber never leaves the OS thread that runs its
// launch. The kernel reads them after every blocking call because those calls are out of line.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// 16-bit floating-point types behind CUDA's names (cuda_fp16.h / cuda_bf16.h).
// ---------------------------------------------------------------------------------------------
// __half is the compiler's IEEE binary16 type. Conversions go through the functions below,
// which use F16C when the build enables it (-mf16c) and exact bit manipulation otherwise, so
// the emulator itself needs no libgcc soft-float helpers.
using __half = _Float16;
// Two halves, x in the low 16 bits (little endian), 4-byte aligned like CUDA's, so a kernel may
// memcpy/reinterpret it to and from uint32_t.
struct alignas(4) __half2 {
    __half x, y;
};

// bfloat16: the upper half of an IEEE binary32. Conversion from float rounds to nearest even.
struct alignas(2) __nv_bfloat16 {
    uint16_t __x;
    __nv_bfloat16() = default;
    inline __nv_bfloat16(float f);
    inline operator float() const;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
static_assert(sizeof(__half) == 2 && sizeof(__half2) == 4 && alignof(__half2) == 4);
static_assert(sizeof(__nv_bfloat16) == 2 && sizeof(__nv_bfloat162) == 4);
static_assert(std::is_trivially_copyable_v<__nv_bfloat16>);

using half = __half;
using half2 = __half2;
using nv_bfloat16 = __nv_bfloat16;
using nv_bfloat162 = __nv_bfloat162;

namespace emu {

// IEEE binary32 -> binary16, round to nearest even; overflow to infinity; NaN stays a quiet
// NaN with the top payload bits (what F16C's vcvtps2ph does).
constexpr uint16_t float_to_half_bits(float f) {
    const uint32_t x = std::bit_cast<uint32_t>(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: infinity
    if (ax < 0x38800000u) {  // below 2^-14: a binary16 subnormal (unit 2^-24) or zero
        if (ax <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25 rounds to 0
        const uint32_t e = ax >> 23;
        const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126u - e;  // 14..24
        uint32_t q = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1u);
        const uint32_t halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
        return static_cast<uint16_t>(sign | q);
    }
    const uint32_t r = ax - 0x38000000u;  // rebias the exponent from 127 to 15
    uint32_t q = r >> 13;
    const uint32_t rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;  // a carry moves into the exponent
    return static_cast<uint16_t>(sign | q);
}

// binary16 -> binary32 (exact).
constexpr float half_bits_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu;
    const uint32_t m = h & 0x3ffu;
    if (e == 0x1fu) return std::bit_cast<float>(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
        const float v = static_cast<float>(m) * 0x1p-24f;  // exact: m < 2^10
        return sign ? -v : v;
    }
    return std::bit_cast<float>(sign | ((e + 112u) << 23) | (m << 13));
}

// binary32 -> bfloat16, round to nearest even; NaN -> 0x7fff (CUDA's canonical bf16 NaN).
constexpr uint16_t float_to_bf16_bits(float f) {
    const uint32_t x = std::bit_cast<uint32_t>(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

constexpr float bf16_bits_to_float(uint16_t b) {
    return std::bit_cast<float>(static_cast<uint32_t>(b) << 16);
}

}  // namespace emu

inline __nv_bfloat16::__nv_bfloat16(float f) : __x(emu::float_to_bf16_bits(f)) {}
inline __nv_bfloat16::operator float() const { return emu::bf16_bits_to_float(__x); }

inline __half __float2half(float f) {
#if defined(__F16C__)
    return static_cast<__half>(f);
#else
    return std::bit_cast<__half>(emu::float_to_half_bits(f));
#endif
}
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) {
#if defined(__F16C__)
    return static_cast<float>(h);
#else
    return emu::half_bits_to_float(std::bit_cast<uint16_t>(h));
#endif
}
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half(a), __float2half(b)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return emu::bf16_bits_to_float(b.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) {
    return float2{__bfloat162float(b.x), __bfloat162float(b.y)};
}
inline float __low2float(__nv_bfloat162 b) { return __bfloat162float(b.x); }
inline float __high2float(__nv_bfloat162 b) { return __bfloat162float(b.y); }

// ---------------------------------------------------------------------------------------------
// Math intrinsics: plain float functions (the fast-math variants are not approximated, so the
// emulator is at least as accurate as the GPU; tolerances must allow for the GPU's __expf).
// expf, exp2f, logf, log2f, fmaxf, fminf, INFINITY come from <cmath>.
// ---------------------------------------------------------------------------------------------
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }

// Integer and bit-reinterpretation intrinsics (CUDA Math API "Integer Intrinsics", "Type Casting
// Intrinsics").
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned>(x)) + 1; }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }

// Memory-ordering helpers: everything runs on one OS thread, so they are no-ops.
inline void __threadfence_block() {}
inline void __threadfence() {}
template <class T>
inline T __ldg(const T* p) {
    return *p;
}

// Atomics: blocks and threads of a launch run on one OS thread and only switch at blocking
// calls, so a plain read-modify-write is atomic here. They return the old value, like CUDA.
// Racecheck does not see them (atomics do not race with each other).
template <class T>
PA_EMU_NO_RACECHECK inline T atomicAdd(T* p, std::type_identity_t<T> v) {
    const T old = *p;
    *p = old + v;
    return old;
}
template <class T>
PA_EMU_NO_RACECHECK inline T atomicSub(T* p, std::type_identity_t<T> v) {
    const T old = *p;
    *p = old - v;
    return old;
}
template <class T>
PA_EMU_NO_RACECHECK inline T atomicMax(T* p, std::type_identity_t<T> v) {
    const T old = *p;
    *p = old < v ? v : old;
    return old;
}
template <class T>
PA_EMU_NO_RACECHECK inline T atomicMin(T* p, std::type_identity_t<T> v) {
    const T old = *p;
    *p = v < old ? v : old;
    return old;
}
template <class T>
PA_EMU_NO_RACECHECK inline T atomicExch(T* p, std::type_identity_t<T> v) {
    const T old = *p;
    *p = v;
    return old;
}
template <class T>
PA_EMU_NO_RACECHECK inline T atomicCAS(T* p, std::type_identity_t<T> compare, std::type_identity_t<T> v) {
    const T old = *p;
    if (old == compare) *p = v;
    return old;
}

// ---------------------------------------------------------------------------------------------
// The emulator's runtime API.
// ---------------------------------------------------------------------------------------------
namespace emu {

enum class Elem { F16, BF16 };

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, PTX ISA "Matrix Fragments
// for mma.m16n8k16 with floating point type":
// https://docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-fragment-mma-16816-float
// A warp collective: all 32 lanes must call it. g = lane >> 2, t = lane % 4; two 16-bit values
// per register, low half first:
//   a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..]   a[2] = A[g][2t+8..]   a[3] = A[g+8][2t+8..]
//   b[0] = B[2t..2t+1][g]   b[1] = B[2t+8..2t+9][g]
//   c/d[0] = C[g][2t]  c/d[1] = C[g][2t+1]  c/d[2] = C[g+8][2t]  c/d[3] = C[g+8][2t+1]
// D = C + sum_k A[m][k] * B[k][n]: each product exact in fp32, accumulated in fp32 in
// increasing k starting from C. d may alias c.
void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], Elem e,
                  std::source_location loc = std::source_location::current());

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16, PTX ISA "Warp-level matrix load
// instruction: ldmatrix":
// https://docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-instructions-ldmatrix
// A warp collective (all 32 lanes). Lane l gives the 16-byte-aligned address of row l % 8 of
// matrix l / 8 (x1 uses the addresses of lanes 0-7, x2 of lanes 0-15). r[j] of lane l is
//   (M_j[l>>2][2(l%4)], M_j[l>>2][2(l%4)+1])          without .trans
//   (M_j[2(l%4)][l>>2], M_j[2(l%4)+1][l>>2])          with .trans        (low half first)
// All lanes' rows are read when the last lane arrives (one instruction for the whole warp).
void ldmatrix(uint32_t* r, int num, bool trans, const void* row_addr,
              std::source_location loc = std::source_location::current());

// cp.async.cg.shared.global [dst], [src], 16, src_size, PTX ISA "cp.async":
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-cp-async
// (and cp.async.commit_group / cp.async.wait_group just after it). Deferred:
// recorded in the calling thread's open group and performed by cp_async_wait; the 16
// destination bytes are poisoned (0xFF: NaN as f16, bf16 and f32) at issue. valid == false is
// src_size = 0: 16 zero bytes, the source is not read. Both addresses must be 16-byte aligned.
void cp_async_16(void* smem_dst, const void* gmem_src, bool valid);
// cp.async.commit_group: closes the thread's open group (an empty group is allowed).
void cp_async_commit();
// cp.async.wait_group n: performs, in issue order, the copies of all but the n most recent
// committed groups of this thread. Copies issued but not yet committed are not waited for.
// A thread that exits with copies still pending fails the launch (synccheck: the copy could
// land in the shared memory of the block that runs next on the SM). `loc` is the kernel's call
// site (see set_drop_sync).
void cp_async_wait(int n, std::source_location loc = std::source_location::current());

// The block's dynamic shared memory: exactly the size given at launch (a heap allocation, so
// AddressSanitizer sees its bounds), 16-byte aligned, filled with 0xFF before every block.
void* dynamic_smem();
size_t dynamic_smem_size();

// Runs kernel_body once per thread of every block: blocks in order (blockIdx.x fastest, then
// y, then z), blockDim.x*y*z (<= 1024) threads per block as fibers. Returns 0 on success;
// otherwise non-zero with a human-readable, NUL-terminated message in err (truncated to
// err_len): a divergent or deadlocked barrier (with every thread's state), a misaligned
// ldmatrix/cp.async address, a warp collective with missing lanes, a thread that exits with
// cp.async copies pending, racecheck hazards (racecheck build: every distinct pair of source
// lines, with both threads; the launch runs to its end first), an emu::fail() call, a bad
// launch configuration. The process is never aborted for these. Launches are serialised
// (process-wide mutex); a kernel must not launch. Each fiber has a 64 KiB stack (256 KiB under
// ASan; PREFIX_ATTN_EMU_STACK_KIB overrides) above a guard page: an overflow kills the process
// with a message naming the thread (build with -fstack-clash-protection so that frames larger
// than a page cannot jump over the guard).
int launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& kernel_body,
           char* err, size_t err_len);

// Aborts the current launch with msg (launch() returns it). Outside a launch: aborts the process.
[[noreturn]] void fail(const char* msg);

// Schedule of the calling OS thread's launches: false (default) runs fibers in thread order,
// true in reverse thread order. The environment variable PREFIX_ATTN_EMU_SCHEDULE=reverse
// selects reverse for threads that never called this.
void set_schedule_reverse(bool reverse);
bool schedule_reverse();

// C entry point of set_schedule_reverse for the Rust side (same per-OS-thread semantics:
// call it on the thread that launches).
extern "C" void pa_emu_set_schedule_reverse(int reverse);

// Counters of the calling OS thread's last launch (for measurements and tests).
struct LaunchStats {
    uint64_t blocks;
    uint64_t fiber_switches;
    uint64_t block_barriers;    // released __syncthreads phases
    uint64_t warp_collectives;  // completed warp collectives (one per warp, not per lane)
    uint64_t dropped_syncs;     // calls skipped by set_drop_sync (per thread, not per warp)
    uint64_t hazards;           // racecheck hazards found (every access, not only distinct ones)
};
LaunchStats last_launch_stats();

// A test instrument for proving every synchronisation necessary: launches from the calling OS
// thread skip every __syncthreads(), __syncwarp() and cp_async_wait<N>() called at the source
// line `file`:`line` (file: the base name, e.g. "prefix_attn_fwd.cu"), as if that line had been
// deleted from the kernel. file == nullptr (or "") restores normal operation. The environment
// variable PREFIX_ATTN_EMU_DROP_SYNC=file:line does the same for threads that never called it.
void set_drop_sync(const char* file, unsigned line);
// C entry points for the Rust side: `site` is "file:line" or empty; the counter is the number of
// skipped calls of the calling OS thread's launches since its last pa_emu_set_drop_sync.
extern "C" void pa_emu_set_drop_sync(const char* site);
extern "C" uint64_t pa_emu_dropped_syncs();
// 1 when this build has racecheck (feature emu-racecheck), else 0.
extern "C" int pa_emu_racecheck_enabled();

namespace detail {
enum class Shfl { Idx, Up, Down, Xor };
uint64_t shfl(unsigned mask, uint64_t bits, int lane_arg, int width, Shfl mode,
              const std::source_location& loc);
uint32_t ballot(unsigned mask, bool pred, const std::source_location& loc);
void syncwarp(unsigned mask, const std::source_location& loc);
void syncthreads(const std::source_location& loc);

template <class T>
using ShflBits = std::conditional_t<sizeof(T) == 1, uint8_t,
                 std::conditional_t<sizeof(T) == 2, uint16_t,
                 std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>>;

template <class T>
inline T shfl_value(unsigned mask, T v, int lane_arg, int width, Shfl mode, const std::source_location& loc) {
    static_assert(std::is_trivially_copyable_v<T> && (sizeof(T) == 1 || sizeof(T) == 2 ||
                                                      sizeof(T) == 4 || sizeof(T) == 8),
                  "the emulated shuffles move 1-, 2-, 4- or 8-byte trivially copyable values");
    const auto in = std::bit_cast<ShflBits<T>>(v);
    const uint64_t out = shfl(mask, static_cast<uint64_t>(in), lane_arg, width, mode, loc);
    return std::bit_cast<T>(static_cast<ShflBits<T>>(out));
}
}  // namespace detail

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// Block barrier and warp-level intrinsics, CUDA C++ Programming Guide "Synchronization
// Functions", "Warp Vote Functions" and "Warp Shuffle Functions"; PTX ISA bar/barrier, shfl.sync,
// vote.sync, bar.warp.sync:
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-bar-barrier
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-shfl-sync
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-vote-sync
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-bar-warp-sync
// __syncthreads(): completes when every thread of the block that has not exited is waiting; all
// of them must wait at the same __syncthreads() call (source location), else the launch fails
// ("divergent __syncthreads()"), as it does when no thread can make progress ("deadlock").
// Warp intrinsics: every live lane of the warp must be in the mask (partial-warp masks are not
// emulated) and every live lane must call the same intrinsic at the same source location
// (__syncwarp: any location). The mask must not name a lane that has exited or exits while the
// others wait (synccheck: the CUDA rule that every thread named in the mask executes it); lanes
// beyond the end of a partial last warp do not count. Each call records its source location
// for error reports.
// ---------------------------------------------------------------------------------------------
inline void __syncthreads(std::source_location loc = std::source_location::current()) {
    emu::detail::syncthreads(loc);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location loc = std::source_location::current()) {
    emu::detail::syncwarp(mask, loc);
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize,
                     std::source_location loc = std::source_location::current()) {
    return emu::detail::shfl_value(mask, var, srcLane, width, emu::detail::Shfl::Idx, loc);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        std::source_location loc = std::source_location::current()) {
    return emu::detail::shfl_value(mask, var, static_cast<int>(delta), width, emu::detail::Shfl::Up, loc);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          std::source_location loc = std::source_location::current()) {
    return emu::detail::shfl_value(mask, var, static_cast<int>(delta), width, emu::detail::Shfl::Down, loc);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                         std::source_location loc = std::source_location::current()) {
    return emu::detail::shfl_value(mask, var, laneMask, width, emu::detail::Shfl::Xor, loc);
}
inline unsigned __ballot_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
    return emu::detail::ballot(mask, pred != 0, loc);
}
inline int __all_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
    return emu::detail::ballot(mask, pred == 0, loc) == 0;
}
inline int __any_sync(unsigned mask, int pred, std::source_location loc = std::source_location::current()) {
    return emu::detail::ballot(mask, pred != 0, loc) != 0;
}

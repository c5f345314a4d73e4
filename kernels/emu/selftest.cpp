// Self-tests of the CPU emulator (emu.h / emu.cpp): tiny emulated kernels, each checking one
// primitive or behaviour against its documented semantics with fresh pseudo-random inputs
// (never zeros). The fragment layouts are written out here again, independently of emu.cpp,
// from the PTX ISA text. Exposed to Rust as pa_emu_selftest(name) / pa_emu_selftest_names(),
// plus pa_emu_planted_oob() for the sanitizer check and pa_emu_planted_race() for racecheck.
//
// Seeds: each run draws a fresh seed (time and a counter) unless PREFIX_ATTN_EMU_SELFTEST_SEED
// is set; failures name the seed.

#include "../common/prims.cuh"
#include "emu.h"

#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// Test plumbing.
// ---------------------------------------------------------------------------------------------
struct Rng {
    uint64_t s;
    uint64_t next() {  // splitmix64
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    uint32_t u32() { return static_cast<uint32_t>(next() >> 32); }
    unsigned below(unsigned n) { return static_cast<unsigned>(next() % n); }
    // Uniform in [-r, r], bounded away from zero.
    float nonzero(float r) {
        float x = (static_cast<float>(next() >> 40) / 16777216.0f * 2.0f - 1.0f) * r;
        if (std::fabs(x) < r / 64) x += x < 0 ? -r / 4 : r / 4;
        return x;
    }
};

uint64_t fresh_seed() {
    if (const char* e = std::getenv("PREFIX_ATTN_EMU_SELFTEST_SEED")) return std::strtoull(e, nullptr, 0);
    static std::atomic<uint64_t> counter{0};
    const auto now = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    return now * 0x9e3779b97f4a7c15ull + ++counter;
}

struct Test {
    std::string msg;
    uint64_t seed = fresh_seed();
    Rng rng{seed};
};

[[gnu::format(printf, 2, 3)]] bool failf(Test& t, const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (t.msg.empty()) {
        char s[64];
        snprintf(s, sizeof s, " (seed %" PRIu64 ")", t.seed);
        t.msg = std::string(buf) + s;
    }
    return false;
}

#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) return failf(t, __VA_ARGS__);         \
    } while (0)

// Runs a launch; on failure records the emulator's message and returns false.
bool run(Test& t, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
    char err[8192];
    if (emu::launch(grid, block, smem, body, err, sizeof err) == 0) return true;
    return failf(t, "launch failed: %s", err);
}

// Runs a launch that must fail with a message containing every needle.
bool run_expect_error(Test& t, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body,
                      std::initializer_list<const char*> needles) {
    char err[8192];
    if (emu::launch(grid, block, smem, body, err, sizeof err) == 0)
        return failf(t, "the launch succeeded but must report an error");
    for (const char* n : needles)
        if (std::strstr(err, n) == nullptr) return failf(t, "error message lacks \"%s\": %s", n, err);
    return true;
}

unsigned linear_tid() { return threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y; }
unsigned linear_block() { return blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * gridDim.x * gridDim.y; }

uint32_t pack16(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | static_cast<uint32_t>(hi) << 16; }

// Restores the calling thread's schedule when a test that changes it returns.
struct ScheduleGuard {
    bool saved = emu::schedule_reverse();
    ~ScheduleGuard() { emu::set_schedule_reverse(saved); }
};

// ---------------------------------------------------------------------------------------------
// Block barrier.
// ---------------------------------------------------------------------------------------------
// Multi-round exchange through shared memory: each round every thread publishes a value, waits
// at the barrier and combines two other threads' values. Double-buffered, so one barrier per
// round suffices; without the barrier the run-to-barrier schedule reads stale values.
constexpr unsigned kXchgThreads = 128;
constexpr int kXchgRounds = 6;

uint32_t mix(uint32_t a, uint32_t b, uint32_t c) {
    return (a * 2654435761u) ^ (b + 0x9e3779b9u) ^ (c << 7 | c >> 25);
}

std::vector<uint32_t> exchange_reference(const std::vector<uint32_t>& init, unsigned blocks) {
    std::vector<uint32_t> out(init);
    for (unsigned b = 0; b < blocks; ++b) {
        uint32_t* v = &out[b * kXchgThreads];
        for (int r = 0; r < kXchgRounds; ++r) {
            std::vector<uint32_t> pub(v, v + kXchgThreads);
            for (unsigned i = 0; i < kXchgThreads; ++i)
                v[i] = mix(v[i], pub[(i * 7 + r + 1) % kXchgThreads], pub[(i + 37) % kXchgThreads]);
        }
    }
    return out;
}

// The exchange kernel; with_barrier = false drops the barrier (a planted bug).
std::function<void()> exchange_kernel(std::vector<uint32_t>& data, bool with_barrier) {
    return [&data, with_barrier] {
        __shared__ uint32_t pub[2][kXchgThreads];
        const unsigned i = linear_tid();
        uint32_t& mine = data[linear_block() * kXchgThreads + i];
        uint32_t v = mine;
        for (int r = 0; r < kXchgRounds; ++r) {
            uint32_t* p = pub[r & 1];
            p[i] = v;
            if (with_barrier) __syncthreads();
            v = mix(v, p[(i * 7 + r + 1) % kXchgThreads], p[(i + 37) % kXchgThreads]);
        }
        mine = v;
    };
}

bool test_block_barrier(Test& t) {
    const dim3 grid(2, 1, 2), block(32, 2, 2);  // 4 blocks of 128 threads, 3-D indices
    std::vector<uint32_t> data(4 * kXchgThreads);
    for (auto& x : data) x = t.rng.u32() | 1u;
    const auto want = exchange_reference(data, 4);
    if (!run(t, grid, block, 0, exchange_kernel(data, true))) return false;
    for (size_t i = 0; i < data.size(); ++i)
        CHECK(data[i] == want[i], "block %zu thread %zu: got %08x, want %08x", i / kXchgThreads, i % kXchgThreads,
              data[i], want[i]);
    return true;
}

// The same exchange without its barrier must come out wrong under both schedules: the emulator
// is adversarial for a missing __syncthreads(). (With racecheck, the launch reports it.)
bool test_missing_barrier_caught(Test& t) {
    ScheduleGuard guard;
    for (bool rev : {false, true}) {
        emu::set_schedule_reverse(rev);
        std::vector<uint32_t> data(kXchgThreads);
        for (auto& x : data) x = t.rng.u32() | 1u;
        const auto want = exchange_reference(data, 1);
#if defined(PREFIX_ATTN_EMU_RACECHECK)
        if (!run_expect_error(t, dim3(1), dim3(kXchgThreads), 0, exchange_kernel(data, false),
                              {"racecheck", "hazard", "selftest.cpp:"}))
            return false;
#else
        if (!run(t, dim3(1), dim3(kXchgThreads), 0, exchange_kernel(data, false))) return false;
        CHECK(data != want, "%s schedule: a kernel missing its __syncthreads() gave the right answer",
              rev ? "reverse" : "forward");
#endif
    }
    return true;
}

// Threads that exit drop out of the barrier: 96 threads; 70-95 exit at once, 40-69 after two
// rounds, 0-39 run five rounds. Lanes 64-69 (the rest of warp 2) then shuffle and vote among
// themselves, with the mask of the lanes left (0x3f).
bool test_early_exit(Test& t) {
    constexpr unsigned n = 96;
    auto alive_in_round = [](int r) { return r < 2 ? 70u : 40u; };
    std::vector<uint32_t> data(n), shfl_out(n, 0), ballot_out(n, 0), first_ballot(n, 0);
    for (auto& x : data) x = t.rng.u32() | 1u;
    // Reference: the rounds each thread takes part in; 40-69 keep their value after round 1.
    std::vector<uint32_t> want(data);
    for (int r = 0; r < 5; ++r) {
        const unsigned alive = alive_in_round(r);
        std::vector<uint32_t> pub(want.begin(), want.begin() + alive);
        for (unsigned i = 0; i < alive; ++i) want[i] = mix(want[i], pub[(i * 5 + r) % alive], 0);
    }
    auto body = [&] {
        __shared__ uint32_t pub[2][n];
        const unsigned i = threadIdx.x;
        first_ballot[i] = __ballot_sync(0xffffffffu, 1);  // every lane still alive
        if (i >= 70) return;
        uint32_t v = data[i];
        for (int r = 0; r < 5; ++r) {
            const unsigned alive = alive_in_round(r);
            if (i >= alive) break;
            pub[r & 1][i] = v;
            __syncthreads();
            v = mix(v, pub[r & 1][(i * 5 + r) % alive], 0);
            if (r == 1 && i >= 64) {  // warp 2 now has lanes 0-5 only
                shfl_out[i] = __shfl_xor_sync(0x3fu, v, 1);
                ballot_out[i] = __ballot_sync(0x3fu, v & 1u);
            }
        }
        data[i] = v;
    };
    if (!run(t, dim3(1), dim3(n), 0, body)) return false;
    for (unsigned i = 0; i < 96; ++i) {
        const uint32_t w = i < 70 ? want[i] : data[i];  // 70-95 never write
        CHECK(data[i] == w, "thread %u: got %08x, want %08x", i, data[i], w);
    }
    for (unsigned i = 0; i < 96; ++i)
        CHECK(first_ballot[i] == 0xffffffffu, "thread %u: ballot of a full warp got %08x", i, first_ballot[i]);
    uint32_t bits = 0;
    for (unsigned i = 64; i < 70; ++i) bits |= (want[i] & 1u) << (i - 64);
    for (unsigned i = 64; i < 70; ++i) {
        CHECK(shfl_out[i] == want[i ^ 1u], "thread %u: shfl_xor among the surviving lanes got %08x, want %08x", i,
              shfl_out[i], want[i ^ 1u]);
        CHECK(ballot_out[i] == bits, "thread %u: ballot among the surviving lanes got %08x, want %08x", i,
              ballot_out[i], bits);
    }
    // Lanes 16-31 exit; lanes 0-15 shuffle among themselves once the others are gone (the
    // barrier completes when they have exited).
    std::vector<float> vals(32), got(32, 0.0f);
    for (auto& x : vals) x = t.rng.nonzero(5.0f);
    auto half_warp = [&] {
        const unsigned i = threadIdx.x;
        if (i >= 16) return;
        __syncthreads();
        got[i] = __shfl_xor_sync(0xffffu, vals[i], 1);
    };
    if (!run(t, dim3(1), dim3(32), 0, half_warp)) return false;
    for (unsigned i = 0; i < 16; ++i)
        CHECK(got[i] == vals[i ^ 1u], "half warp, lane %u: shfl_xor got %g, want %g", i, got[i], vals[i ^ 1u]);
    return true;
}

// Two groups of threads wait at different __syncthreads() calls: reported, not run.
bool test_divergent_barrier(Test& t) {
    auto body = [] {
        if (threadIdx.x < 32) {
            __syncthreads();
        } else {
            __syncthreads();
        }
    };
    return run_expect_error(t, dim3(1), dim3(64), 0, body,
                            {"divergent __syncthreads()", "threads 0-31: at __syncthreads()",
                             "threads 32-63: at __syncthreads()"});
}

// Half of warp 0 waits at the block barrier, the other half at a shuffle that needs it: no
// progress is possible, and the report gives every thread's state.
bool test_deadlock_reported(Test& t) {
    auto body = [] {
        const unsigned i = threadIdx.x;
        if (i >= 16 && i < 32) {
            float v = __shfl_xor_sync(0xffffffffu, static_cast<float>(i), 1);
            (void)v;
        } else {
            __syncthreads();
        }
    };
    return run_expect_error(t, dim3(1), dim3(96), 0, body,
                            {"deadlock", "threads 0-15: at __syncthreads()",
                             "threads 16-31: at __shfl_xor_sync", "16 of its 32 live lanes",
                             "threads 32-95: at __syncthreads()",
                             "synccheck: warp 0: __shfl_xor_sync (width 32) with mask 0xffffffff",
                             "is reached by lanes 16-31 of its mask only; lanes 0-15 never reach it"});
}

// ---------------------------------------------------------------------------------------------
// Warp shuffles and votes, against the CUDA Programming Guide's description ("Warp Shuffle
// Functions"), written independently of the PTX pseudo-code emu.cpp follows.
// ---------------------------------------------------------------------------------------------
enum class Mode { Idx, Up, Down, Xor };

unsigned shfl_source(Mode m, unsigned lane, int arg, unsigned width) {
    const unsigned seg = lane / width * width;
    switch (m) {
        case Mode::Idx: return seg + static_cast<unsigned>(arg) % width;
        case Mode::Up: return lane % width >= static_cast<unsigned>(arg) ? lane - arg : lane;
        case Mode::Down: return lane % width + arg < width ? lane + arg : lane;
        case Mode::Xor: {
            // Earlier groups may be read; a later group gives the lane's own value.
            const unsigned src = lane ^ static_cast<unsigned>(arg);
            return src / width > lane / width ? lane : src;
        }
    }
    return lane;
}

template <class T>
T do_shfl(Mode m, T v, int arg, int width) {
    switch (m) {
        case Mode::Idx: return __shfl_sync(0xffffffffu, v, arg, width);
        case Mode::Up: return __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(arg), width);
        case Mode::Down: return __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(arg), width);
        case Mode::Xor: return __shfl_xor_sync(0xffffffffu, v, arg, width);
    }
    return v;
}

struct ShflCase {
    Mode mode;
    int arg;  // -1: a random source lane per lane (idx only)
    int width;
};

std::vector<ShflCase> shfl_cases() {
    std::vector<ShflCase> cs;
    for (int w : {32, 16, 8, 4, 2, 1}) {
        for (int a : {0, 5, 31, 37, -1}) cs.push_back({Mode::Idx, a, w});
        for (int a : {0, 1, 3, 16}) cs.push_back({Mode::Up, a, w});
        for (int a : {0, 1, 3, 16}) cs.push_back({Mode::Down, a, w});
        for (int a : {1, 2, 5, 16, 31}) cs.push_back({Mode::Xor, a, w});
    }
    return cs;
}

// All cases run back to back in one launch (two warps), for float, int, unsigned and double:
// also a test of the warp scratch's double buffering.
bool test_shfl(Test& t) {
    constexpr unsigned n = 64;
    const auto cases = shfl_cases();
    const size_t nc = cases.size();
    std::vector<float> in_f(nc * n), out_f(nc * n);
    std::vector<int> in_i(nc * n), out_i(nc * n), src_lane(nc * n);
    std::vector<unsigned> in_u(nc * n), out_u(nc * n);
    std::vector<double> in_d(nc * n), out_d(nc * n);
    for (size_t k = 0; k < nc * n; ++k) {
        in_f[k] = t.rng.nonzero(100.0f);
        in_i[k] = static_cast<int>(t.rng.u32() | 1u);
        in_u[k] = t.rng.u32() | 1u;
        in_d[k] = static_cast<double>(t.rng.nonzero(1.0f)) * 1e10;
        src_lane[k] = static_cast<int>(t.rng.below(64));  // >= 32 wraps modulo width
    }
    auto body = [&] {
        const unsigned i = threadIdx.x;
        for (size_t c = 0; c < nc; ++c) {
            const ShflCase& sc = cases[c];
            const size_t k = c * n + i;
            const int arg = sc.arg < 0 ? src_lane[k] : sc.arg;
            out_f[k] = do_shfl(sc.mode, in_f[k], arg, sc.width);
            out_i[k] = do_shfl(sc.mode, in_i[k], arg, sc.width);
            out_u[k] = do_shfl(sc.mode, in_u[k], arg, sc.width);
            out_d[k] = do_shfl(sc.mode, in_d[k], arg, sc.width);
        }
    };
    if (!run(t, dim3(1), dim3(n), 0, body)) return false;
    static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
    for (size_t c = 0; c < nc; ++c) {
        const ShflCase& sc = cases[c];
        for (unsigned i = 0; i < n; ++i) {
            const size_t k = c * n + i;
            const unsigned lane = i % 32, wbase = i / 32 * 32;
            const int arg = sc.arg < 0 ? src_lane[k] : sc.arg;
            const size_t src = c * n + wbase + shfl_source(sc.mode, lane, arg, static_cast<unsigned>(sc.width));
            const char* nm = names[static_cast<int>(sc.mode)];
            CHECK(out_f[k] == in_f[src], "%s(arg %d, width %d) float, thread %u: got %g, want %g", nm, arg, sc.width,
                  i, out_f[k], in_f[src]);
            CHECK(out_i[k] == in_i[src], "%s(arg %d, width %d) int, thread %u: got %d, want %d", nm, arg, sc.width, i,
                  out_i[k], in_i[src]);
            CHECK(out_u[k] == in_u[src], "%s(arg %d, width %d) unsigned, thread %u: got %u, want %u", nm, arg,
                  sc.width, i, out_u[k], in_u[src]);
            CHECK(out_d[k] == in_d[src], "%s(arg %d, width %d) double, thread %u: got %g, want %g", nm, arg,
                  sc.width, i, out_d[k], in_d[src]);
        }
    }
    return true;
}

// __ballot_sync, __any_sync, __all_sync on random predicates, in full warps and in a partial
// warp (a 48-thread block: warp 1 has lanes 0-15 only), plus pa::shfl_xor's butterfly sum.
bool test_ballot(Test& t) {
    constexpr unsigned n = 48;
    constexpr int rounds = 8;
    std::vector<int> pred(rounds * n);
    std::vector<unsigned> got(rounds * n), any(rounds * n), all(rounds * n);
    for (int r = 0; r < rounds; ++r)
        for (unsigned i = 0; i < n; ++i)  // round 0: all true; round 1: all false; then random
            pred[r * n + i] = r == 0 ? 1 : r == 1 ? 0 : static_cast<int>(t.rng.below(2)) * static_cast<int>(i + 1);
    std::vector<float> sum_in(n), sum_out(n);
    for (auto& x : sum_in) x = static_cast<float>(t.rng.below(1000) + 1);  // exact integer sums
    auto body = [&] {
        const unsigned i = threadIdx.x;
        for (int r = 0; r < rounds; ++r) {
            got[r * n + i] = __ballot_sync(0xffffffffu, pred[r * n + i]);
            any[r * n + i] = static_cast<unsigned>(__any_sync(0xffffffffu, pred[r * n + i]));
            all[r * n + i] = static_cast<unsigned>(__all_sync(0xffffffffu, pred[r * n + i]));
        }
        float v = sum_in[i];
        const int width_lanes = i < 32 ? 32 : 16;
        for (int m = width_lanes / 2; m > 0; m /= 2) v += pa::shfl_xor(v, m);
        sum_out[i] = v;
    };
    if (!run(t, dim3(1), dim3(n), 0, body)) return false;
    for (int r = 0; r < rounds; ++r) {
        for (unsigned w = 0; w < 2; ++w) {
            const unsigned lanes = w == 0 ? 32 : 16;
            uint32_t bits = 0;
            for (unsigned l = 0; l < lanes; ++l) bits |= (pred[r * n + w * 32 + l] != 0 ? 1u : 0u) << l;
            const uint32_t full = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
            for (unsigned l = 0; l < lanes; ++l) {
                const unsigned k = r * n + w * 32 + l;
                CHECK(got[k] == bits, "round %d thread %u: ballot %08x, want %08x", r, w * 32 + l, got[k], bits);
                CHECK(any[k] == (bits != 0 ? 1u : 0u), "round %d thread %u: __any_sync wrong", r, w * 32 + l);
                CHECK(all[k] == (bits == full ? 1u : 0u), "round %d thread %u: __all_sync wrong", r, w * 32 + l);
            }
        }
    }
    for (unsigned w = 0; w < 2; ++w) {
        float s = 0;
        for (unsigned l = 0; l < (w == 0 ? 32u : 16u); ++l) s += sum_in[w * 32 + l];
        for (unsigned l = 0; l < (w == 0 ? 32u : 16u); ++l)
            CHECK(sum_out[w * 32 + l] == s, "warp %u lane %u: butterfly sum %g, want %g", w, l,
                  sum_out[w * 32 + l], s);
    }
    return true;
}

// __syncwarp orders a warp's shared-memory exchange (rotating partners, double-buffered).
bool test_syncwarp(Test& t) {
    constexpr unsigned n = 64;
    constexpr int rounds = 5;
    std::vector<uint32_t> data(n);
    for (auto& x : data) x = t.rng.u32() | 1u;
    std::vector<uint32_t> want(data);
    for (int r = 0; r < rounds; ++r) {
        std::vector<uint32_t> pub(want);
        for (unsigned i = 0; i < n; ++i) want[i] = mix(want[i], pub[i / 32 * 32 + (i + 3 * r + 1) % 32], r);
    }
    auto body = [&] {
        __shared__ uint32_t pub[2][n];
        const unsigned i = threadIdx.x;
        uint32_t v = data[i];
        for (int r = 0; r < rounds; ++r) {
            pub[r & 1][i] = v;
            __syncwarp();
            v = mix(v, pub[r & 1][i / 32 * 32 + (i + 3 * r + 1) % 32], r);
        }
        data[i] = v;
    };
    if (!run(t, dim3(1), dim3(n), 0, body)) return false;
    for (unsigned i = 0; i < n; ++i) CHECK(data[i] == want[i], "thread %u: got %08x, want %08x", i, data[i], want[i]);
    return true;
}

// Lanes that exited cannot take part (synccheck, under both schedules: the lane exits before or
// while the others wait); mma.sync needs all 32 lanes (a partial last warp cannot run it); a
// shuffle that reads a lane outside its mask that has exited is an error.
bool test_warp_exited_lanes(Test& t) {
    ScheduleGuard guard;
    auto mma = [] {
        uint32_t a[4] = {0x3c003c00u, 0x3c003c00u, 0x3c003c00u, 0x3c003c00u}, b[2] = {0x3c003c00u, 0x3c003c00u};
        float c[4] = {1, 2, 3, 4}, d[4];
        emu::mma_m16n8k16(d, a, b, c, emu::Elem::F16);
    };
    auto mma_exited = [&mma] {
        if (threadIdx.x == 31) return;
        mma();
    };
    for (bool rev : {false, true}) {
        emu::set_schedule_reverse(rev);
        if (!run_expect_error(t, dim3(1), dim3(32), 0, mma_exited, {"synccheck", "mma.sync", "mask"})) return false;
        auto shfl_exited = [] {
            if (threadIdx.x >= 16) return;
            float v = __shfl_xor_sync(0xffffffffu, 1.0f + static_cast<float>(threadIdx.x), 1);
            (void)v;
        };
        const char* needle = rev ? "names lanes 16-31 in its mask, which have exited"
                                 : "exits while lanes 0-15 of its warp wait at __shfl_xor_sync";
        if (!run_expect_error(t, dim3(1), dim3(32), 0, shfl_exited,
                              {"synccheck", needle, rev ? "thread 15 (15,0,0)" : "thread 16 (16,0,0)"}))
            return false;
    }
    emu::set_schedule_reverse(false);
    if (!run_expect_error(t, dim3(1), dim3(31), 0, mma, {"mma.sync", "lanes 0-30 only", "all 32 lanes"}))
        return false;
    auto shfl_body = [] {
        if (threadIdx.x == 31) return;
        __syncthreads();
        float v = __shfl_down_sync(0x7fffffffu, 1.0f + static_cast<float>(threadIdx.x), 1);
        (void)v;
    };
    return run_expect_error(t, dim3(1), dim3(32), 0, shfl_body,
                            {"__shfl_down_sync", "lane 30 (thread 30) reads lane 31, which has exited"});
}

// ---------------------------------------------------------------------------------------------
// mma.sync m16n8k16 against a naive matmul. The fragment layout, from the PTX ISA figures for
// mma.m16n8k16 (.f16/.bf16 A and B, .f32 C/D), with g = lane / 4, t = lane % 4:
//   A register r, half h: row g + 8*(r % 2), column 2t + h + 8*(r / 2)
//   B register r, half h: row (k) 2t + h + 8r, column (n) g
//   C/D element i: row g + 8*(i / 2), column 2t + i % 2
// ---------------------------------------------------------------------------------------------
struct MmaTile {
    uint16_t A[16][16], B[16][8];  // raw 16-bit values; B is K x N
    float C[16][8];
};

float elem_to_float(uint16_t bits, emu::Elem e) {
    return e == emu::Elem::BF16 ? emu::bf16_bits_to_float(bits) : emu::half_bits_to_float(bits);
}

uint16_t float_to_elem(float f, emu::Elem e) {
    return e == emu::Elem::BF16 ? emu::float_to_bf16_bits(f) : emu::float_to_half_bits(f);
}

void random_tile(Rng& rng, MmaTile& m, emu::Elem e) {
    for (auto& row : m.A)
        for (auto& x : row) x = float_to_elem(rng.nonzero(2.0f), e);
    for (auto& row : m.B)
        for (auto& x : row) x = float_to_elem(rng.nonzero(2.0f), e);
    for (auto& row : m.C)
        for (auto& x : row) x = rng.nonzero(4.0f);
}

// D = C + A*B with fp32 products (exact) summed in increasing k from C.
void naive_mma(const MmaTile& m, emu::Elem e, const float C[16][8], float D[16][8]) {
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
            float acc = C[i][j];
            for (int k = 0; k < 16; ++k) acc += elem_to_float(m.A[i][k], e) * elem_to_float(m.B[k][j], e);
            D[i][j] = acc;
        }
}

void a_frag(const MmaTile& m, unsigned lane, uint32_t a[4]) {
    const unsigned g = lane / 4, t = lane % 4;
    for (unsigned r = 0; r < 4; ++r) {
        const unsigned row = g + 8 * (r % 2), col = 2 * t + 8 * (r / 2);
        a[r] = pack16(m.A[row][col], m.A[row][col + 1]);
    }
}

void b_frag(const MmaTile& m, unsigned lane, uint32_t b[2]) {
    const unsigned g = lane / 4, t = lane % 4;
    for (unsigned r = 0; r < 2; ++r) b[r] = pack16(m.B[2 * t + 8 * r][g], m.B[2 * t + 1 + 8 * r][g]);
}

void cd_pos(unsigned lane, unsigned i, unsigned& row, unsigned& col) {
    row = lane / 4 + 8 * (i / 2);
    col = 2 * (lane % 4) + i % 2;
}

// Two warps, each with its own tile; the second product accumulates into the first with d
// aliasing c.
bool test_mma(Test& t, emu::Elem e) {
    const char* ty = e == emu::Elem::BF16 ? "bf16" : "f16";
    MmaTile tiles[2];
    for (auto& m : tiles) random_tile(t.rng, m, e);
    float got1[2][16][8], got2[2][16][8];
    auto body = [&] {
        const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
        const MmaTile& m = tiles[w];
        uint32_t a[4], b[2];
        a_frag(m, lane, a);
        b_frag(m, lane, b);
        float c[4], d[4];
        for (unsigned i = 0; i < 4; ++i) {
            unsigned row, col;
            cd_pos(lane, i, row, col);
            c[i] = m.C[row][col];
        }
        if (e == emu::Elem::BF16)
            pa::mma_m16n8k16_bf16(d, a, b, c);
        else
            pa::mma_m16n8k16_f16(d, a, b, c);
        for (unsigned i = 0; i < 4; ++i) {
            unsigned row, col;
            cd_pos(lane, i, row, col);
            got1[w][row][col] = d[i];
        }
        emu::mma_m16n8k16(d, a, b, d, e);  // d aliases c
        for (unsigned i = 0; i < 4; ++i) {
            unsigned row, col;
            cd_pos(lane, i, row, col);
            got2[w][row][col] = d[i];
        }
    };
    if (!run(t, dim3(1), dim3(64), 0, body)) return false;
    for (unsigned w = 0; w < 2; ++w) {
        float D1[16][8], D2[16][8];
        naive_mma(tiles[w], e, tiles[w].C, D1);
        naive_mma(tiles[w], e, D1, D2);
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 8; ++j) {
                CHECK(got1[w][i][j] == D1[i][j], "mma %s warp %u D[%d][%d]: got %.9g, want %.9g", ty, w, i, j,
                      got1[w][i][j], D1[i][j]);
                CHECK(got2[w][i][j] == D2[i][j], "mma %s (d aliasing c) warp %u D[%d][%d]: got %.9g, want %.9g", ty,
                      w, i, j, got2[w][i][j], D2[i][j]);
            }
    }
    return true;
}

bool test_mma_f16(Test& t) { return test_mma(t, emu::Elem::F16); }
bool test_mma_bf16(Test& t) { return test_mma(t, emu::Elem::BF16); }

// ---------------------------------------------------------------------------------------------
// ldmatrix. Register j of lane l, from the PTX ISA's ldmatrix fragment figure:
//   without .trans: (M_j[l/4][2(l%4)], M_j[l/4][2(l%4)+1]); with .trans: the transpose,
//   (M_j[2(l%4)][l/4], M_j[2(l%4)+1][l/4]); low half first.
// ---------------------------------------------------------------------------------------------
constexpr int kLdRows = 32, kLdStride = 40;  // halves per row: 80 bytes, a multiple of 16

bool test_ldmatrix(Test& t) {
    alignas(16) uint16_t tile[kLdRows * kLdStride];
    for (auto& x : tile) x = static_cast<uint16_t>(t.rng.u32() | 1u);
    struct Case {
        int num;
        bool trans;
    };
    const Case cases[] = {{1, false}, {1, true}, {2, false}, {2, true}, {4, false}, {4, true}};
    for (const Case& cs : cases) {
        int row0[4], col0[4];  // where matrix j starts
        for (int j = 0; j < 4; ++j) {
            row0[j] = static_cast<int>(t.rng.below(kLdRows - 7));
            col0[j] = 8 * static_cast<int>(t.rng.below(kLdStride / 8));
        }
        uint32_t got[32][4] = {};
        auto body = [&] {
            const unsigned l = threadIdx.x;
            const int j = static_cast<int>(l / 8), r = static_cast<int>(l % 8);
            // Lanes beyond the matrices give a misaligned address, which must be ignored.
            const uint16_t* p = j < cs.num ? &tile[(row0[j] + r) * kLdStride + col0[j]] : &tile[1];
            uint32_t reg[4] = {0, 0, 0, 0};
            if (cs.num == 4 && cs.trans)
                pa::ldmatrix_x4_trans(reg, p);
            else if (cs.num == 4)
                pa::ldmatrix_x4(reg, p);
            else if (cs.num == 2 && cs.trans)
                pa::ldmatrix_x2_trans(reg, p);
            else if (cs.num == 2)
                pa::ldmatrix_x2(reg, p);
            else if (cs.trans)
                pa::ldmatrix_x1_trans(reg, p);
            else
                pa::ldmatrix_x1(reg, p);
            for (int k = 0; k < 4; ++k) got[l][k] = reg[k];
        };
        if (!run(t, dim3(1), dim3(32), 0, body)) return false;
        auto M = [&](int j, int r, int c) { return tile[(row0[j] + r) * kLdStride + col0[j] + c]; };
        for (unsigned l = 0; l < 32; ++l)
            for (int j = 0; j < cs.num; ++j) {
                const int q = static_cast<int>(l / 4), c = 2 * static_cast<int>(l % 4);
                const uint32_t want =
                    cs.trans ? pack16(M(j, c, q), M(j, c + 1, q)) : pack16(M(j, q, c), M(j, q, c + 1));
                CHECK(got[l][j] == want, "ldmatrix.x%d%s lane %u register %d: got %08x, want %08x", cs.num,
                      cs.trans ? ".trans" : "", l, j, got[l][j], want);
            }
    }
    return true;
}

// ldmatrix feeding mma, the way kernels use them: A (16x16, row-major) through ldmatrix.x4 is
// the A fragment; B stored K x N through ldmatrix.x2.trans, and stored N x K (like K^T in
// attention) through ldmatrix.x2, are both the B fragment. Checked against the naive product.
bool test_ldmatrix_mma(Test& t) {
    constexpr int sa = 24, sbt = 8, sbn = 16;  // row strides in halves (48, 16, 32 bytes)
    alignas(16) uint16_t As[16 * sa], Bkn[16 * sbt], Bnk[8 * sbn];
    MmaTile m;
    random_tile(t.rng, m, emu::Elem::F16);
    for (int i = 0; i < 16; ++i)
        for (int k = 0; k < 16; ++k) As[i * sa + k] = m.A[i][k];
    for (int k = 0; k < 16; ++k)
        for (int n = 0; n < 8; ++n) {
            Bkn[k * sbt + n] = m.B[k][n];
            Bnk[n * sbn + k] = m.B[k][n];
        }
    float got[2][16][8];
    auto body = [&] {
        const unsigned l = threadIdx.x;
        const unsigned j = l / 8, r = l % 8;
        uint32_t a[4], b1[2], b2[2];
        // Matrix j of the x4: rows 8*(j%2).., columns 8*(j/2)..: a[0..3] in the mma order.
        pa::ldmatrix_x4(a, &As[(8 * (j % 2) + r) * sa + 8 * (j / 2)]);
        pa::ldmatrix_x2_trans(b1, &Bkn[(l % 16) * sbt]);          // matrix j: k rows 8j..8j+7
        pa::ldmatrix_x2(b2, &Bnk[r * sbn + 8 * ((l / 8) % 2)]);   // matrix j: k columns 8j..
        float c[4], d[4];
        for (unsigned i = 0; i < 4; ++i) {
            unsigned row, col;
            cd_pos(l, i, row, col);
            c[i] = m.C[row][col];
        }
        pa::mma_m16n8k16_f16(d, a, b1, c);
        for (unsigned i = 0; i < 4; ++i) {
            unsigned row, col;
            cd_pos(l, i, row, col);
            got[0][row][col] = d[i];
        }
        pa::mma_m16n8k16_f16(d, a, b2, c);
        for (unsigned i = 0; i < 4; ++i) {
            unsigned row, col;
            cd_pos(l, i, row, col);
            got[1][row][col] = d[i];
        }
    };
    if (!run(t, dim3(1), dim3(32), 0, body)) return false;
    float D[16][8];
    naive_mma(m, emu::Elem::F16, m.C, D);
    for (int v = 0; v < 2; ++v)
        for (int i = 0; i < 16; ++i)
            for (int j = 0; j < 8; ++j)
                CHECK(got[v][i][j] == D[i][j], "ldmatrix+mma (B via %s) D[%d][%d]: got %.9g, want %.9g",
                      v == 0 ? "x2.trans of K x N" : "x2 of N x K", i, j, got[v][i][j], D[i][j]);
    return true;
}

bool test_ldmatrix_misaligned(Test& t) {
    alignas(16) uint16_t tile[8 * 16];
    for (auto& x : tile) x = 0x3c00;
    auto body = [&tile] {
        const unsigned l = threadIdx.x;
        const uint16_t* p = &tile[(l % 8) * 16 + (l == 5 ? 1 : 0)];  // lane 5 is 2 bytes off
        uint32_t r[4];
        pa::ldmatrix_x4(r, p);
    };
    return run_expect_error(t, dim3(1), dim3(32), 0, body, {"ldmatrix.x4", "lane 5", "not 16-byte aligned"});
}

// ---------------------------------------------------------------------------------------------
// cp.async: deferred copies, poison before the wait, wait_group N, zero fill.
// ---------------------------------------------------------------------------------------------
// Peeks at memory without racecheck seeing it (the tests look at poison on purpose).
PA_EMU_NO_RACECHECK bool all_bytes(const void* p, unsigned char v, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i)
        if (b[i] != v) return false;
    return true;
}

bool test_cp_async(Test& t) {
    constexpr unsigned n = 32, chunks = 5;  // per thread: 16-byte chunks 0..4
    alignas(16) float src[n * chunks * 4];
    for (auto& x : src) x = t.rng.nonzero(10.0f);
    // Flags each thread records (1 = as expected), checked on the host.
    enum {
        kPoisonedAtIssue, kWait2First, kWait2Pending, kWait1Second, kWait1Pending, kZeroFill,
        kOpenGroupPending, kOpenGroupArrived, kNeighbour, kPoisonIsNan, kFlags
    };
    static const char* flag_names[] = {
        "destination poisoned at issue", "wait_group 2 completed group 0", "wait_group 2 left groups 1-2 pending",
        "wait_group 1 completed group 1", "wait_group 1 left group 2 pending", "zero fill",
        "uncommitted copy not waited for",
        "uncommitted copy arrives after commit + wait", "other threads' copies visible after the barrier",
        "poison reads as NaN"};
    std::vector<int> flags(n * kFlags, 0);
    auto body = [&] {
        PA_DYNAMIC_SMEM(float, smem);
        const unsigned i = threadIdx.x;
        int* f = &flags[i * kFlags];
        auto dst = [&](unsigned c) { return smem + (c * n + i) * 4; };
        auto from = [&](unsigned c) { return &src[(i * chunks + c) * 4]; };
        auto same = [&](unsigned c) { return std::memcmp(dst(c), from(c), 16) == 0; };
        for (unsigned c = 0; c < chunks; ++c) std::memset(dst(c), 0x11, 16);  // not the poison
        pa::cp_async_16(dst(0), from(0), true);
        f[kPoisonedAtIssue] = all_bytes(dst(0), 0xff, 16);
        f[kPoisonIsNan] = all_bytes(dst(0), 0xff, 4) && std::isnan(std::bit_cast<float>(0xffffffffu)) &&
                          std::isnan(__half2float(std::bit_cast<__half>(uint16_t{0xffff}))) &&
                          std::isnan(__bfloat162float(std::bit_cast<__nv_bfloat16>(uint16_t{0xffff})));
        pa::cp_async_commit();
        pa::cp_async_16(dst(1), from(1), true);
        pa::cp_async_commit();
        pa::cp_async_16(dst(2), from(2), false);  // zero fill: the (valid) source is not read
        pa::cp_async_commit();
        pa::cp_async_wait<2>();
        f[kWait2First] = same(0);
        f[kWait2Pending] = all_bytes(dst(1), 0xff, 16) && all_bytes(dst(2), 0xff, 16);
        pa::cp_async_wait<1>();
        f[kWait1Second] = same(1);
        f[kWait1Pending] = all_bytes(dst(2), 0xff, 16);
        pa::cp_async_wait<0>();
        f[kZeroFill] = all_bytes(dst(2), 0, 16);
        pa::cp_async_16(dst(3), from(3), true);  // not committed: wait_group does not cover it
        pa::cp_async_wait<0>();
        f[kOpenGroupPending] = all_bytes(dst(3), 0xff, 16);
        pa::cp_async_commit();
        pa::cp_async_wait<0>();
        f[kOpenGroupArrived] = same(3);
        pa::cp_async_16(dst(4), from(4), true);
        pa::cp_async_commit();
        pa::cp_async_wait<0>();
        __syncthreads();
        const unsigned o = (i + 1) % n;
        f[kNeighbour] = std::memcmp(smem + (4 * n + o) * 4, &src[(o * chunks + 4) * 4], 16) == 0;
    };
    if (!run(t, dim3(1), dim3(n), chunks * n * 16, body)) return false;
    for (unsigned i = 0; i < n; ++i)
        for (int k = 0; k < kFlags; ++k) CHECK(flags[i * kFlags + k] == 1, "thread %u: %s: no", i, flag_names[k]);
    return true;
}

bool test_cp_async_misaligned(Test& t) {
    alignas(16) float src[8];
    for (auto& x : src) x = 1.0f;
    auto dst_body = [&src] {
        PA_DYNAMIC_SMEM(unsigned char, smem);
        pa::cp_async_16(smem + 16 * threadIdx.x + (threadIdx.x == 3 ? 8 : 0), src, true);
        pa::cp_async_commit();
        pa::cp_async_wait<0>();
    };
    if (!run_expect_error(t, dim3(1), dim3(32), 1024, dst_body,
                          {"cp.async", "destination", "not 16-byte aligned", "thread 3"}))
        return false;
    auto src_body = [&src] {
        PA_DYNAMIC_SMEM(unsigned char, smem);
        pa::cp_async_16(smem + 16 * threadIdx.x, reinterpret_cast<const unsigned char*>(src) + 4, true);
    };
    return run_expect_error(t, dim3(1), dim3(32), 1024, src_body, {"cp.async", "source", "not 16-byte aligned"});
}

// Synccheck: a thread must complete its copies (cp.async.wait_group) before it exits, whether
// it committed them or not. The report names the thread and the line that issued the copy.
bool test_cp_async_pending_exit(Test& t) {
    alignas(16) float src[4] = {1, 2, 3, 4};
    for (bool commit : {true, false}) {
        unsigned line = 0;
        auto body = [&src, &line, commit] {
            PA_DYNAMIC_SMEM(unsigned char, smem);
            if (threadIdx.x != 5) return;
            pa::cp_async_16(smem, src, true); line = __LINE__;
            if (commit) pa::cp_async_commit();
        };
        char want_line[64];
        // The line is known once the kernel ran; run it once to learn it (the error is the same).
        char err[8192];
        emu::launch(dim3(1), dim3(64), 64, body, err, sizeof err);
        snprintf(want_line, sizeof want_line, "issued at selftest.cpp:%u", line);
        if (!run_expect_error(t, dim3(1), dim3(64), 64, body,
                              {"synccheck", "thread 5 (5,0,0)", "exits with 1 cp.async copy pending",
                               commit ? "committed, never waited for" : "some never committed", want_line}))
            return false;
    }
    return true;
}

// set_drop_sync skips the synchronisations of one source line, as if it had been deleted: the
// exchange loses its barrier (wrong results, or a racecheck report), and comes back right when
// the drop is lifted.
bool test_drop_sync(Test& t) {
    struct Restore {
        ~Restore() { emu::set_drop_sync(nullptr, 0); }
    } restore;
    std::vector<uint32_t> data(kXchgThreads);
    unsigned line = 0;
    auto body = [&data, &line] {
        __shared__ uint32_t pub[2][kXchgThreads];
        const unsigned i = threadIdx.x;
        uint32_t v = data[i];
        for (int r = 0; r < kXchgRounds; ++r) {
            uint32_t* p = pub[r & 1];
            p[i] = v;
            __syncthreads(); if (i == 0) line = __LINE__;
            v = mix(v, p[(i * 7 + r + 1) % kXchgThreads], p[(i + 37) % kXchgThreads]);
        }
        data[i] = v;
    };
    auto init = [&] {
        for (auto& x : data) x = t.rng.u32() | 1u;
        return exchange_reference(data, 1);
    };
    auto want = init();
    if (!run(t, dim3(1), dim3(kXchgThreads), 0, body)) return false;
    CHECK(data == want, "the exchange with its barrier gave a wrong result");
    CHECK(line != 0, "the kernel did not record its barrier's line");
    emu::set_drop_sync("selftest.cpp", line);
    want = init();
    char err[8192];
    const int rc = emu::launch(dim3(1), dim3(kXchgThreads), 0, body, err, sizeof err);
    CHECK(emu::pa_emu_dropped_syncs() == kXchgThreads * kXchgRounds, "%" PRIu64 " synchronisations dropped, want %u",
          emu::pa_emu_dropped_syncs(), kXchgThreads * kXchgRounds);
    CHECK(rc != 0 || data != want, "the exchange without its barrier gave the right result");
    emu::set_drop_sync("selftest.cpp", line + 1000);  // a line without a synchronisation: nothing dropped
    want = init();
    if (!run(t, dim3(1), dim3(kXchgThreads), 0, body)) return false;
    CHECK(data == want && emu::pa_emu_dropped_syncs() == 0, "a drop of another line changed the exchange");
    return true;
}

#if defined(PREFIX_ATTN_EMU_RACECHECK)
// ---------------------------------------------------------------------------------------------
// Racecheck: planted hazards of every kind are reported with both lines and both threads, and
// the same kernels with their synchronisation are clean (so is every other self-test).
// ---------------------------------------------------------------------------------------------
std::string at_line(unsigned line) { return "selftest.cpp:" + std::to_string(line); }

// Runs body once with each schedule; each must fail with every needle (needles may depend on
// the schedule and on lines the kernel recorded: they are built after the run).
bool expect_hazard(Test& t, unsigned threads, size_t smem, const std::function<void()>& body,
                   const std::function<std::vector<std::string>(bool)>& needles, unsigned blocks = 1) {
    ScheduleGuard guard;
    for (bool rev : {false, true}) {
        emu::set_schedule_reverse(rev);
        char err[8192];
        if (emu::launch(dim3(blocks), dim3(threads), smem, body, err, sizeof err) == 0)
            return failf(t, "%s schedule: the launch succeeded but must report a hazard", rev ? "reverse" : "forward");
        for (const std::string& n : needles(rev))
            if (std::strstr(err, n.c_str()) == nullptr)
                return failf(t, "%s schedule: error message lacks \"%s\": %s", rev ? "reverse" : "forward", n.c_str(),
                             err);
    }
    return true;
}

bool expect_clean(Test& t, unsigned threads, size_t smem, const std::function<void()>& body, unsigned blocks = 1) {
    ScheduleGuard guard;
    for (bool rev : {false, true}) {
        emu::set_schedule_reverse(rev);
        if (!run(t, dim3(blocks), dim3(threads), smem, body)) return false;
    }
    return true;
}

// Two warps exchange through a static __shared__ array: thread i reads what thread i ^ 32 (the
// other warp) wrote. Without the barrier: the forward schedule reads before the other warp has
// written (uninitialised, then write-after-read), the reverse one after (read-after-write).
bool test_racecheck_block_barrier(Test& t) {
    unsigned wline = 0, rline = 0;
    std::vector<float> out(64);
    auto kernel = [&](bool barrier) {
        return [&, barrier] {
            __shared__ float buf[64];
            const unsigned i = threadIdx.x;
            buf[i] = static_cast<float>(i); if (i == 0) wline = __LINE__;
            if (barrier) __syncthreads();
            out[i] = buf[i ^ 32u]; if (i == 0) rline = __LINE__;
        };
    };
    if (!expect_clean(t, 64, 0, kernel(true))) return false;
    return expect_hazard(t, 64, 0, kernel(false), [&](bool rev) {
        std::vector<std::string> n = {"racecheck:", "a static __shared__ array", at_line(wline), at_line(rline),
                                      "different warps and no __syncthreads() between them", "warp 0", "warp 1"};
        n.push_back(rev ? "read-after-write hazard" : "write-after-read hazard");
        if (!rev) n.push_back("uninitialized shared-memory read (initcheck)");
        return n;
    });
}

// Lanes of one warp: lane 1 reads what lane 0 wrote. Ordered by __syncwarp (or any collective),
// racing without.
bool test_racecheck_warp(Test& t) {
    unsigned wline = 0, rline = 0;
    std::vector<uint32_t> out(32);
    auto kernel = [&](int sync) {
        return [&, sync] {
            PA_DYNAMIC_SMEM(uint32_t, sh);
            const unsigned i = threadIdx.x;
            sh[i] = i * 3u + 1u; if (i == 0) wline = __LINE__;
            if (sync == 1) __syncwarp();
            if (sync == 2) (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);
            out[i] = sh[(i + 1) % 32]; if (i == 0) rline = __LINE__;
        };
    };
    if (!expect_clean(t, 32, 128, kernel(1)) || !expect_clean(t, 32, 128, kernel(2))) return false;
    return expect_hazard(t, 32, 128, kernel(0), [&](bool) {
        return std::vector<std::string>{"racecheck:", "dynamic shared memory, byte", at_line(wline), at_line(rline),
                                        "the same warp, but no __syncthreads() and no warp collective"};
    });
}

// cp.async: the destination is written from the issue to the issuing thread's wait. Thread 0
// copies 16 bytes; thread 40 (another warp) reads them after a barrier, before (hazard) or after
// (clean) thread 0's wait; thread 0 reads them before its wait (hazard); thread 40 writes them
// while the copy is in flight (hazard); a wait with no barrier before the other warp reads
// (read-after-write hazard on the completed copy).
bool test_racecheck_cp_async(Test& t) {
    alignas(16) static float src[4] = {1, 2, 3, 4};
    unsigned issue = 0, use = 0;
    float sink[64] = {};
    enum Mode { kCorrect, kReadInFlight, kOwnRead, kWriteInFlight, kNoBarrierAfterWait };
    auto kernel = [&](Mode m) {
        return [&, m] {
            PA_DYNAMIC_SMEM(float, sh);
            const unsigned i = threadIdx.x;
            if (i == 0) { pa::cp_async_16(sh, src, true); issue = __LINE__; }
            pa::cp_async_commit();
            if (m == kOwnRead && i == 0) { sink[i] = sh[1]; use = __LINE__; }
            if (m == kCorrect || m == kNoBarrierAfterWait) pa::cp_async_wait<0>();
            if (m != kNoBarrierAfterWait) __syncthreads();
            if (i == 40 && m == kWriteInFlight) { sh[2] = 5.0f; use = __LINE__; }
            if (i == 40 && m != kWriteInFlight && m != kOwnRead) { sink[i] = sh[1]; use = __LINE__; }
            __syncthreads();
            pa::cp_async_wait<0>();
        };
    };
    if (!expect_clean(t, 64, 64, kernel(kCorrect))) return false;
    struct Case {
        Mode m;
        const char* kind;
    };
    const Case cases[] = {{kReadInFlight, "read of a cp.async destination in flight"},
                          {kOwnRead, "read of the thread's own cp.async destination in flight"},
                          {kWriteInFlight, "write to a cp.async destination in flight"},
                          {kNoBarrierAfterWait, "read-after-write hazard"}};
    for (const Case& c : cases) {
        if (!expect_hazard(t, 64, 64, kernel(c.m), [&](bool rev) {
                // Without any barrier, the reverse schedule reads before the copy is issued.
                const char* kind = c.m == kNoBarrierAfterWait && rev ? "write-after-read hazard" : c.kind;
                std::vector<std::string> n = {"racecheck:", kind, at_line(issue), at_line(use), "thread 0 (0,0,0)"};
                if (c.m != kOwnRead) n.push_back("thread 40 (40,0,0)");
                return n;
            }))
            return false;
    }
    return true;
}

// Initcheck: shared memory is uninitialised at the start of every block; reading a byte no
// thread of this block has written is reported, in dynamic and static shared memory, even when
// an earlier block wrote it.
bool test_racecheck_initcheck(Test& t) {
    unsigned rline = 0;
    std::vector<float> out(64);
    auto dynamic = [&] {
        PA_DYNAMIC_SMEM(float, sh);
        const unsigned i = threadIdx.x;
        if (i < 32) sh[i] = 1.0f;  // bytes 0-127 written, 128-255 not
        __syncthreads();
        out[i] = sh[i]; if (i == 0) rline = __LINE__;
    };
    if (!expect_hazard(t, 64, 256, dynamic, [&](bool) {
            return std::vector<std::string>{"racecheck:", "uninitialized shared-memory read (initcheck)",
                                            "of 256 (32 times)", at_line(rline)};
        }))
        return false;
    auto stat = [&] {
        __shared__ float arr[64];
        const unsigned i = threadIdx.x;
        if (blockIdx.x == 0) arr[i] = 2.0f;  // block 1 reads what block 0 wrote: not its own
        __syncthreads();
        out[i] = arr[i]; if (i == 0) rline = __LINE__;
    };
    if (!expect_hazard(
            t, 64, 0, stat,
            [&](bool) {
                return std::vector<std::string>{"racecheck:", "uninitialized shared-memory read (initcheck)",
                                                "a static __shared__ array", at_line(rline), "block (1,0,0)"};
            },
            2))
        return false;
    auto good = [&] {
        PA_DYNAMIC_SMEM(float, sh);
        sh[threadIdx.x] = 1.0f;
        __syncthreads();
        out[threadIdx.x] = sh[63 - threadIdx.x];
    };
    return expect_clean(t, 64, 256, good, 3);
}

// Global memory, within a block: two warps write the same word (and one reads what the other
// wrote) with no barrier between; with one, and across blocks, nothing is reported.
bool test_racecheck_global(Test& t) {
    unsigned wline = 0;
    std::vector<float> out(4);
    auto kernel = [&](bool barrier) {
        return [&, barrier] {
            const unsigned i = threadIdx.x;
            if (i == 0) { out[0] = 1.0f; wline = __LINE__; }
            if (barrier) __syncthreads();
            if (i == 33) out[0] = 2.0f;
            if (i == 0) out[1] = 3.0f;  // every block writes it: blocks are not compared
        };
    };
    if (!expect_clean(t, 64, 0, kernel(true), 2)) return false;
    return expect_hazard(t, 64, 0, kernel(false), [&](bool) {
        return std::vector<std::string>{"racecheck:", "write-after-write hazard on global memory", at_line(wline),
                                        "thread 0 (0,0,0)", "thread 33 (33,0,0)"};
    });
}
#endif

// ---------------------------------------------------------------------------------------------
// Dynamic shared memory: 16-byte aligned, exact size, and all 0xFF at the start of every block
// (the previous block's data must not leak through).
// ---------------------------------------------------------------------------------------------
bool test_dynamic_smem_repoison(Test& t) {
    constexpr unsigned n = 64, blocks = 3;
    constexpr size_t bytes = 1000;  // not a multiple of 16 on purpose
    std::vector<int> ok(blocks * n, 0);
    std::vector<uint32_t> fill(blocks * n);
    for (auto& x : fill) x = (t.rng.u32() & 0x7f7f7f7fu) | 0x01010101u;  // no 0xFF or zero bytes
    auto body = [&] {
        auto* smem = static_cast<unsigned char*>(emu::dynamic_smem());
        const unsigned i = threadIdx.x, b = blockIdx.x;
        const size_t per = bytes / n;  // 15 bytes each; thread 0 also checks the tail
        bool good = reinterpret_cast<uintptr_t>(smem) % 16 == 0 && emu::dynamic_smem_size() == bytes &&
                    all_bytes(smem + i * per, 0xff, per) &&
                    (i != 0 || all_bytes(smem + n * per, 0xff, bytes - n * per));
        __syncthreads();
        auto byte_of = [&](unsigned th, size_t k) {
            return static_cast<unsigned char>(fill[b * n + th] >> (k % 4 * 8));
        };
        for (size_t k = i * per; k < (i + 1) * per; ++k) smem[k] = byte_of(i, k);
        if (i == 0)
            for (size_t k = n * per; k < bytes; ++k) smem[k] = 0x5a;
        __syncthreads();
        const unsigned o = (i + 1) % n;
        good = good && smem[o * per] == byte_of(o, o * per);
        ok[b * n + i] = good ? 1 : 0;
    };
    if (!run(t, dim3(blocks), dim3(n), bytes, body)) return false;
    for (unsigned b = 0; b < blocks; ++b)
        for (unsigned i = 0; i < n; ++i)
            CHECK(ok[b * n + i] == 1,
                  "block %u thread %u: dynamic shared memory not aligned, sized or poisoned as expected", b, i);
    return true;
}

// ---------------------------------------------------------------------------------------------
// Schedules: the reverse schedule really runs threads in reverse order, and correct kernels give
// the same results under both.
// ---------------------------------------------------------------------------------------------
bool test_reverse_schedule(Test& t) {
    ScheduleGuard guard;
    constexpr unsigned n = 128;
    std::vector<uint32_t> init(2 * n);
    for (auto& x : init) x = t.rng.u32() | 1u;
    MmaTile tile;
    random_tile(t.rng, tile, emu::Elem::BF16);
    std::vector<float> shfl_in(n);
    for (auto& x : shfl_in) x = t.rng.nonzero(3.0f);
    std::vector<uint32_t> results[2];
    std::vector<unsigned> order[2];
    for (int rev = 0; rev < 2; ++rev) {
        emu::set_schedule_reverse(rev == 1);
        std::vector<uint32_t> data(init);
        if (!run(t, dim3(2), dim3(n), 0, exchange_kernel(data, true))) return false;
        std::vector<unsigned> log(n);
        unsigned logged = 0;
        std::vector<float> sums(n), mma_out(32 * 4);
        auto body = [&] {
            const unsigned i = threadIdx.x;
            if (blockIdx.x == 0) log[atomicAdd(&logged, 1u)] = i;  // order of first execution
            float v = shfl_in[i];
            for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
            sums[i] = v;
            if (i < 32) {
                uint32_t a[4], b[2];
                a_frag(tile, i, a);
                b_frag(tile, i, b);
                float c[4] = {v, v, v, v}, d[4];
                pa::mma_m16n8k16_bf16(d, a, b, c);
                for (int k = 0; k < 4; ++k) mma_out[i * 4 + k] = d[k];
            }
        };
        if (!run(t, dim3(1), dim3(n), 0, body)) return false;
        results[rev] = data;
        for (float s : sums) results[rev].push_back(std::bit_cast<uint32_t>(s));
        for (float s : mma_out) results[rev].push_back(std::bit_cast<uint32_t>(s));
        order[rev] = log;
    }
    CHECK(results[0] == results[1], "forward and reverse schedules give different results on correct kernels");
    for (unsigned i = 0; i < n; ++i) {
        CHECK(order[0][i] == i, "forward schedule: thread %u started %u-th", order[0][i], i);
        CHECK(order[1][i] == n - 1 - i, "reverse schedule: thread %u started %u-th", order[1][i], i);
    }
    return true;
}

// ---------------------------------------------------------------------------------------------
// Errors and launch configurations.
// ---------------------------------------------------------------------------------------------
bool test_fail(Test& t) {
    auto body = [] {
        if (threadIdx.x == 37) emu::fail("planted failure 42");
        __syncthreads();
    };
    if (!run_expect_error(t, dim3(2), dim3(64), 0, body, {"emu::fail: planted failure 42", "thread 37"}))
        return false;
    // The emulator is fine afterwards.
    std::vector<uint32_t> data(kXchgThreads);
    for (auto& x : data) x = t.rng.u32() | 1u;
    const auto want = exchange_reference(data, 1);
    if (!run(t, dim3(1), dim3(kXchgThreads), 0, exchange_kernel(data, true))) return false;
    CHECK(data == want, "a launch after a failed launch gave a wrong result");
    return true;
}

bool test_launch_config(Test& t) {
    auto nop = [] {};
    if (!run_expect_error(t, dim3(1), dim3(1025), 0, nop, {"invalid block"})) return false;
    if (!run_expect_error(t, dim3(0), dim3(32), 0, nop, {"invalid grid"})) return false;
    if (!run_expect_error(t, dim3(1), dim3(32), 1 << 20, nop, {"dynamic shared memory"})) return false;
    // A launch inside a kernel is refused (and the outer kernel goes on).
    int inner_rc = 0;
    char inner_err[256] = {};
    auto outer = [&] {
        if (threadIdx.x == 0) inner_rc = emu::launch(dim3(1), dim3(1), 0, [] {}, inner_err, sizeof inner_err);
    };
    if (!run(t, dim3(1), dim3(32), 0, outer)) return false;
    CHECK(inner_rc != 0 && std::strstr(inner_err, "inside") != nullptr, "a nested launch was not refused: %s",
          inner_err);
    // The largest block: 1024 threads, a barrier round and a warp reduction, 32x32x1.
    std::vector<unsigned> sums(1024);
    auto body = [&] {
        __shared__ unsigned s[1024];
        const unsigned i = linear_tid();
        s[i] = i;
        __syncthreads();
        unsigned v = s[1023 - i];
        for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
        sums[i] = v;
    };
    if (!run(t, dim3(1), dim3(32, 32, 1), 0, body)) return false;
    for (unsigned i = 0; i < 1024; ++i) {
        unsigned want = 0;
        for (unsigned l = 0; l < 32; ++l) want += 1023 - (i / 32 * 32 + l);
        CHECK(sums[i] == want, "1024-thread block, thread %u: %u, want %u", i, sums[i], want);
    }
    const emu::LaunchStats st = emu::last_launch_stats();
    CHECK(st.blocks == 1 && st.block_barriers == 1 && st.warp_collectives == 32 * 5,
          "stats of the 1024-thread launch: %" PRIu64 " blocks, %" PRIu64 " barriers, %" PRIu64 " warp collectives",
          st.blocks, st.block_barriers, st.warp_collectives);
    return true;
}

// ---------------------------------------------------------------------------------------------
// Half types: conversions against the definitions of binary16 / bfloat16 and round to nearest
// even, layouts of the pairs.
// ---------------------------------------------------------------------------------------------
double half_value(uint16_t h) {  // from the binary16 definition
    const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    const double v = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
    return s ? -v : v;
}

bool test_half_types(Test& t) {
    // binary16 -> float: every finite value exactly; infinities and NaNs keep their class.
    for (uint32_t h = 0; h < 0x10000; ++h) {
        const float f = __half2float(std::bit_cast<__half>(static_cast<uint16_t>(h)));
        const int e = (h >> 10) & 31;
        if (e == 31) {
            CHECK((h & 1023) ? std::isnan(f) : std::isinf(f), "half %04x: wrong class", h);
        } else {
            CHECK(static_cast<double>(f) == half_value(static_cast<uint16_t>(h)), "half %04x -> %g", h, f);
        }
    }
    // float -> binary16 rounds to nearest even: check the midpoints between neighbours and the
    // floats just around them, for every positive finite binary16 and its negation.
    for (uint16_t h = 0; h < 0x7bff; ++h) {
        const double lo = half_value(h), hi = half_value(static_cast<uint16_t>(h + 1));
        const float mid = static_cast<float>((lo + hi) / 2);  // exact in float
        const uint16_t even = (h & 1) ? static_cast<uint16_t>(h + 1) : h;
        for (int sgn = 0; sgn < 2; ++sgn) {
            const float s = sgn ? -1.0f : 1.0f;
            const uint16_t sb = sgn ? 0x8000 : 0;
            CHECK(emu::float_to_half_bits(s * mid) == (even | sb), "float %a -> half %04x, want %04x", s * mid,
                  emu::float_to_half_bits(s * mid), even | sb);
            CHECK(emu::float_to_half_bits(s * std::nextafter(mid, 0.0f)) == (h | sb),
                  "float just below midpoint %a", mid);
            CHECK(emu::float_to_half_bits(s * std::nextafter(mid, 1e9f)) == ((h + 1) | sb),
                  "float just above midpoint %a", mid);
            CHECK(std::bit_cast<uint16_t>(__float2half_rn(s * static_cast<float>(lo))) == (h | sb),
                  "__float2half of the exact value of half %04x", h);
        }
    }
    CHECK(emu::float_to_half_bits(65519.996f) == 0x7bff && emu::float_to_half_bits(65520.0f) == 0x7c00 &&
              emu::float_to_half_bits(-1e30f) == 0xfc00 && emu::float_to_half_bits(INFINITY) == 0x7c00 &&
              (emu::float_to_half_bits(NAN) & 0x7e00) == 0x7e00 && emu::float_to_half_bits(-0.0f) == 0x8000 &&
              emu::float_to_half_bits(1e-10f) == 0,
          "binary16 overflow, infinity, NaN, -0 or underflow");
#if defined(__F16C__)
    for (int k = 0; k < 200000; ++k) {  // the hardware conversion agrees with the hand-written one
        const float f = std::bit_cast<float>(t.rng.u32());
        const uint16_t hw = std::bit_cast<uint16_t>(static_cast<_Float16>(f));
        CHECK(hw == emu::float_to_half_bits(f), "float %a: F16C %04x, emulator %04x", f, hw,
              emu::float_to_half_bits(f));
    }
#endif
    // bfloat16: midpoints between neighbours round to even; NaN -> 0x7fff.
    for (int k = 0; k < 200000; ++k) {
        const uint16_t b = static_cast<uint16_t>(t.rng.u32() & 0x7f7e);  // finite, not the largest
        const uint32_t lo = static_cast<uint32_t>(b) << 16;
        const float mid = std::bit_cast<float>(lo | 0x8000u);
        const uint16_t even = (b & 1) ? static_cast<uint16_t>(b + 1) : b;
        CHECK(__float2bfloat16(mid).__x == even, "bf16 midpoint %a -> %04x, want %04x", mid,
              __float2bfloat16(mid).__x, even);
        CHECK(__float2bfloat16_rn(std::bit_cast<float>(lo | 0x7fffu)).__x == b, "bf16 below midpoint");
        CHECK(__float2bfloat16(std::bit_cast<float>(lo | 0x8001u)).__x == b + 1, "bf16 above midpoint");
        CHECK(std::bit_cast<uint32_t>(__bfloat162float(std::bit_cast<__nv_bfloat16>(b))) == lo, "bf16 -> float");
    }
    CHECK(__float2bfloat16(NAN).__x == 0x7fff && __float2bfloat16(INFINITY).__x == 0x7f80 &&
              __float2bfloat16(3.4e38f).__x == 0x7f80,
          "bf16 NaN / infinity / overflow");
    // Pairs: x in the low 16 bits.
    const float a = t.rng.nonzero(8.0f), b = t.rng.nonzero(8.0f);
    const __half2 h2 = __floats2half2_rn(a, b);
    uint32_t bits;
    std::memcpy(&bits, &h2, 4);
    CHECK(bits == pack16(emu::float_to_half_bits(a), emu::float_to_half_bits(b)), "__half2 layout");
    const float2 f2 = __half22float2(h2);
    CHECK(f2.x == emu::half_bits_to_float(emu::float_to_half_bits(a)) &&
              f2.y == emu::half_bits_to_float(emu::float_to_half_bits(b)),
          "__half22float2");
    const __nv_bfloat162 b2 = __floats2bfloat162_rn(a, b);
    std::memcpy(&bits, &b2, 4);
    CHECK(bits == pack16(emu::float_to_bf16_bits(a), emu::float_to_bf16_bits(b)), "__nv_bfloat162 layout");
    const float2 g2 = __bfloat1622float2(b2);
    CHECK(g2.x == emu::bf16_bits_to_float(emu::float_to_bf16_bits(a)) &&
              g2.y == emu::bf16_bits_to_float(emu::float_to_bf16_bits(b)),
          "__bfloat1622float2");
    return true;
}

// ---------------------------------------------------------------------------------------------
// Registry.
// ---------------------------------------------------------------------------------------------
struct Entry {
    const char* name;
    bool (*fn)(Test&);
};

const Entry kTests[] = {
    {"block_barrier", test_block_barrier},
    {"missing_barrier_caught", test_missing_barrier_caught},
    {"early_exit", test_early_exit},
    {"divergent_barrier", test_divergent_barrier},
    {"deadlock_reported", test_deadlock_reported},
    {"shfl", test_shfl},
    {"ballot", test_ballot},
    {"syncwarp", test_syncwarp},
    {"warp_exited_lanes", test_warp_exited_lanes},
    {"mma_f16", test_mma_f16},
    {"mma_bf16", test_mma_bf16},
    {"ldmatrix", test_ldmatrix},
    {"ldmatrix_mma", test_ldmatrix_mma},
    {"ldmatrix_misaligned", test_ldmatrix_misaligned},
    {"cp_async", test_cp_async},
    {"cp_async_misaligned", test_cp_async_misaligned},
    {"cp_async_pending_exit", test_cp_async_pending_exit},
    {"drop_sync", test_drop_sync},
#if defined(PREFIX_ATTN_EMU_RACECHECK)
    {"racecheck_block_barrier", test_racecheck_block_barrier},
    {"racecheck_warp", test_racecheck_warp},
    {"racecheck_cp_async", test_racecheck_cp_async},
    {"racecheck_initcheck", test_racecheck_initcheck},
    {"racecheck_global", test_racecheck_global},
#endif
    {"dynamic_smem_repoison", test_dynamic_smem_repoison},
    {"reverse_schedule", test_reverse_schedule},
    {"fail", test_fail},
    {"launch_config", test_launch_config},
    {"half_types", test_half_types},
};

void copy_out(const std::string& s, char* err, size_t err_len) {
    if (err == nullptr || err_len == 0) return;
    const size_t n = std::min(s.size(), err_len - 1);
    std::memcpy(err, s.data(), n);
    err[n] = '\0';
}

}  // namespace

extern "C" int pa_emu_selftest(const char* name, char* err, size_t err_len) {
    copy_out("", err, err_len);
    for (const Entry& e : kTests) {
        if (std::strcmp(e.name, name) != 0) continue;
        Test t;
        if (e.fn(t)) return 0;
        copy_out(t.msg.empty() ? std::string("failed") : t.msg, err, err_len);
        return 1;
    }
    copy_out(std::string("no emulator self-test named ") + name, err, err_len);
    return 2;
}

extern "C" const char* pa_emu_selftest_names() {
    static const std::string names = [] {
        std::string s;
        for (const Entry& e : kTests) {
            if (!s.empty()) s += ",";
            s += e.name;
        }
        return s;
    }();
    return names.c_str();
}

// A tiny kernel with a planted out-of-bounds write, for the sanitizer mode: with
// write_out_of_bounds = 1, thread 63 writes one element past a 64-element `__shared__` array
// (static storage with an ASan redzone after it); with 2, one element past the 256-byte dynamic
// shared memory (a heap block); with 0 everything is in bounds. The store goes through a pointer
// the compiler cannot see through, so UBSan's bounds and object-size checks stay silent and the
// report is AddressSanitizer's (global- or heap-buffer-overflow), which aborts the process.
// Without ASan the kernel just runs (the write lands in whatever follows). Returns the launch's
// result.
namespace {
float g_planted_sink[64];  // where the planted kernel leaves its (unused) result

float* opaque(float* p) {
    asm volatile("" : "+r"(p));  // hides where p points from the optimiser and UBSan
    return p;
}
}  // namespace

extern "C" int pa_emu_planted_oob(int write_out_of_bounds) {
    char err[1024];
    return emu::launch(
        dim3(1), dim3(64), 64 * sizeof(float),
        [m = write_out_of_bounds] {
            __shared__ float arr[64];
            const unsigned i = threadIdx.x;
            const unsigned idx = i + (m != 0 && i == 63 ? 1u : 0u);  // 64 = one past the end
            float* stat = opaque(arr);
            float* dyn = opaque(static_cast<float*>(emu::dynamic_smem()));
            stat[m == 2 ? i : idx] = static_cast<float>(i);
            dyn[m == 2 ? idx : i] = static_cast<float>(i) * 2.0f;
            __syncthreads();
            g_planted_sink[i] = arr[(i + 1) % 64] + dyn[(i + 1) % 64];
        },
        err, sizeof err);
}

// A tiny kernel with a planted race, for the racecheck mode: two warps exchange values through a
// `__shared__` array, thread i reading what thread 63 - i wrote; with race = 1 the barrier
// between the write and the read is missing. lines[0], lines[1] receive the source lines of the
// write and the read (the report must name both). Returns the launch's result.
extern "C" int pa_emu_planted_race(int race, unsigned* lines, char* err, size_t err_len) {
    unsigned wl = 0, rl = 0;
    const int rc = emu::launch(
        dim3(1), dim3(64), 0,
        [race, &wl, &rl] {
            __shared__ float buf[64];
            const unsigned i = threadIdx.x;
            buf[i] = static_cast<float>(i) * 0.5f; if (i == 0) wl = __LINE__;
            if (race == 0) __syncthreads();
            opaque(g_planted_sink)[i] = buf[63 - i]; if (i == 0) rl = __LINE__;
        },
        err, err_len);
    lines[0] = wl;
    lines[1] = rl;
    return rc;
}

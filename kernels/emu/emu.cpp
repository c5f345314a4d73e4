// CPU emulator of the CUDA kernels: the runtime behind emu.h (docs/ARCHITECTURE.md §4).
//
// Every CUDA thread of a block is a fiber (a 64 KiB stack above a guard page). One OS thread runs
// a whole launch: blocks one after another, the fibers of a block by deterministic
// run-to-barrier round robin. A fiber runs until it blocks at a block barrier or a warp
// collective, or exits; then the next ready fiber in thread order (or reverse order) runs. The
// thread that completes a barrier (the last to arrive) releases the others and keeps running.
// When no fiber is ready and some are still alive, nothing can make progress: the launch fails
// with every thread's state instead of hanging.
//
// The context switch is a dozen instructions of x86-64 assembly (callee-saved registers, MXCSR
// and the x87 control word); other architectures, or -DPREFIX_ATTN_EMU_UCONTEXT, use ucontext
// (about 20x slower: swapcontext makes a sigprocmask system call). Measured on a 2-core x86-64
// VM: about 13 ns per switch including the scheduling, 1.6 us per block-barrier phase of 128
// threads, 0.9 us per warp shuffle, 64 ms for an FA-like launch (8 blocks of 128 threads, 256
// barriers, 35k warp collectives, mostly mma); ucontext: 240 ns per switch, 31 us per phase. Under AddressSanitizer every
// switch is announced with __sanitizer_{start,finish}_switch_fiber so ASan knows which stack is
// current (otherwise it reports false stack overflows and cannot unpoison stacks).
//
// Launches are serialised by a process-wide mutex because the kernels' `__shared__` arrays are
// plain static storage (emu.h); a launch must not start another launch.

#include "emu.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#if defined(__x86_64__) && !defined(PREFIX_ATTN_EMU_UCONTEXT)
#define EMU_X86_SWITCH 1
#else
#define EMU_X86_SWITCH 0
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#if !defined(EMU_ASAN)
#define EMU_ASAN 0
#endif
#if EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// The built-in index variables (emu.h). Written by the scheduler only.
uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim;
dim3 gridDim;

// ---------------------------------------------------------------------------------------------
// x86-64 context switch.
//
// pa_emu_ctx_switch(&from_sp, to_sp) pushes the System V callee-saved registers and the
// floating-point control state (MXCSR: rounding mode, FTZ/DAZ; x87 control word) on the current
// stack, stores the stack pointer in *from_sp, loads to_sp and pops the same frame from there.
// Everything else is caller-saved, so the C++ compiler has already spilled it around the call
// (rax and rcx are used as scratch). ldmxcsr/fldcw are slow (about 40% of a switch), and the
// control state almost never differs between fibers, so they only run when it does.
// A new fiber's stack is prepared with such a frame whose return address is pa_emu_fiber_start,
// which calls the function in r12 (the fiber's main, which never returns). The CFI marks the
// start of a fiber as the outermost frame for debuggers and unwinders.
// ---------------------------------------------------------------------------------------------
#if EMU_X86_SWITCH
extern "C" void pa_emu_ctx_switch(void** save_sp, void* new_sp);
extern "C" void pa_emu_fiber_start();
asm(R"(
    .pushsection .text
    .globl pa_emu_ctx_switch
    .hidden pa_emu_ctx_switch
    .type pa_emu_ctx_switch, @function
    .p2align 4
pa_emu_ctx_switch:
    .cfi_startproc
    pushq %rbp
    .cfi_adjust_cfa_offset 8
    pushq %rbx
    .cfi_adjust_cfa_offset 8
    pushq %r12
    .cfi_adjust_cfa_offset 8
    pushq %r13
    .cfi_adjust_cfa_offset 8
    pushq %r14
    .cfi_adjust_cfa_offset 8
    pushq %r15
    .cfi_adjust_cfa_offset 8
    subq $8, %rsp
    .cfi_adjust_cfa_offset 8
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movl (%rsp), %eax
    movzwl 4(%rsp), %ecx
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    cmpl (%rsp), %eax
    je 1f
    ldmxcsr (%rsp)
1:
    cmpw 4(%rsp), %cx
    je 2f
    fldcw 4(%rsp)
2:
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .cfi_endproc
    .size pa_emu_ctx_switch, .-pa_emu_ctx_switch

    .globl pa_emu_fiber_start
    .hidden pa_emu_fiber_start
    .type pa_emu_fiber_start, @function
    .p2align 4
pa_emu_fiber_start:
    .cfi_startproc
    .cfi_undefined rip
    xorl %ebp, %ebp
    call *%r12
    ud2
    .cfi_endproc
    .size pa_emu_fiber_start, .-pa_emu_fiber_start
    .popsection
)");
#endif

extern "C" void pa_emu_fiber_main();

namespace emu {
namespace {

// ---------------------------------------------------------------------------------------------
// State.
// ---------------------------------------------------------------------------------------------
struct Ctx {
#if EMU_X86_SWITCH
    void* sp = nullptr;
#else
    ucontext_t uc;
#endif
    // The stack's bounds and ASan's fake-stack handle, for the fiber-switch annotations.
    const void* stack_lo = nullptr;
    size_t stack_size = 0;
    void* asan_fake_stack = nullptr;
};

enum class St : uint8_t { Ready, AtBarrier, AtWarp, Exited };

enum class WKind : uint8_t { Syncwarp, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Mma, Ldmatrix };

const char* kind_name(WKind k) {
    switch (k) {
        case WKind::Syncwarp: return "__syncwarp";
        case WKind::ShflIdx: return "__shfl_sync";
        case WKind::ShflUp: return "__shfl_up_sync";
        case WKind::ShflDown: return "__shfl_down_sync";
        case WKind::ShflXor: return "__shfl_xor_sync";
        case WKind::Ballot: return "__ballot_sync";
        case WKind::Mma: return "mma.sync.m16n8k16";
        case WKind::Ldmatrix: return "ldmatrix.sync.m8n8";
    }
    return "?";
}

// One cp.async recorded at issue and performed at cp.async.wait_group.
struct PendingCopy {
    unsigned char* dst;
    const unsigned char* src;
    bool valid;
    uint32_t group;  // index of the commit group it belongs to
};

struct Thread {
    Ctx ctx;
    // Parity of the warp collectives this lane has completed: which half of the warp's
    // double-buffered scratch its next collective uses.
    uint8_t phase = 0;
    uint3 tid{0, 0, 0};
    std::source_location loc;  // where it waits (barrier or collective), for reports
    std::vector<PendingCopy> copies;
    uint32_t open_group = 0;  // groups committed so far = index of the group being filled
};

// A lane's mailbox in a warp collective: inputs written at arrival, outputs written by the
// lane that completes the collective.
struct Slot {
    uint64_t val;  // shfl value / ballot predicate
    int arg;  // shfl b operand (source lane, delta or lane mask); may differ per lane
    const void* ptr;  // ldmatrix row address
    uint32_t a[4];
    uint32_t b[2];
    float c[4];
    uint32_t out[4];  // mma: d (as bits), ldmatrix: registers
    uint64_t out_val;  // shfl / ballot result
};

// Warp scratch is double-buffered: after a collective completes, the lane that completed it
// runs on and may enter the next collective before the other lanes have resumed and read their
// results. Lanes alternate buffers (Thread::phase), so the runner-ahead writes the other buffer,
// and it cannot get two collectives ahead because the next one needs every live lane. (The
// outputs are also computed once, at completion, into separate fields, so even a single buffer
// would not lose them; the double buffer keeps each collective's whole record - inputs, kind,
// location - intact until every lane has left it, which the state reports rely on.)
struct WarpPhase {
    unsigned arrived = 0;
    uint32_t arrived_mask = 0;
    WKind kind = WKind::Syncwarp;
    std::source_location loc;
    unsigned mask = 0;
    int param = 0;  // shfl width, ldmatrix num | trans << 8, mma element type
    Slot slot[32];
};

struct Warp {
    unsigned size = 0;   // lanes that exist (the last warp of a block may be partial)
    unsigned alive = 0;  // lanes that have not exited
    uint32_t alive_mask = 0;
    WarpPhase ph[2];
};

struct Launch {
    dim3 grid, block;
    unsigned n = 0;  // threads per block
    bool reverse = false;
    std::vector<Thread> th;
    std::vector<St> st;  // each thread's state, kept apart from Thread so scans stay in cache
    std::vector<Warp> warps;
    Ctx sched;  // the OS thread's own context (the scheduler)
    bool sched_stack_known = false;
    Ctx* switching_from = nullptr;
    bool in_block = false;
    unsigned cur = 0;          // the running thread
    unsigned live = 0;         // threads that have not exited
    unsigned ready = 0;        // threads that are running or may run
    unsigned bar_arrived = 0;  // threads waiting at the block barrier
    unsigned char* smem = nullptr;
    size_t smem_bytes = 0;
    unsigned char* stacks = nullptr;
    size_t stacks_bytes = 0;
    size_t stack_bytes = 0;  // usable bytes per fiber stack
    size_t stack_stride = 0;  // stack + guard page
    uint64_t fpctl = 0;  // MXCSR and x87 control word every fiber starts with
    const std::function<void()>* body = nullptr;
    bool failed = false;
    std::string err;
    LaunchStats stats{};
};

// The running launch. Launches are serialised (g_launch_mutex), so a plain global.
Launch* g_launch = nullptr;
std::mutex g_launch_mutex;
thread_local bool t_in_launch = false;
thread_local int t_schedule = -1;  // -1: not set, read PREFIX_ATTN_EMU_SCHEDULE
thread_local LaunchStats t_last_stats{};

constexpr unsigned kNone = ~0u;
constexpr size_t kMaxThreads = 1024;
constexpr size_t kMaxDynamicSmem = 227 * 1024;  // sm_90's largest opt-in per-block size

// ---------------------------------------------------------------------------------------------
// Small helpers.
// ---------------------------------------------------------------------------------------------
[[gnu::format(printf, 2, 3)]] void appendf(std::string& s, const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    s += buf;
}

const char* base_name(const char* path) {
    const char* b = path;
    for (const char* p = path; *p; ++p)
        if (*p == '/' || *p == '\\') b = p + 1;
    return b;
}

// A short formatted string without heap storage. Error paths use these for the arguments of
// fail_launch(): it never returns (the fiber is abandoned), so heap-owning temporaries of its
// full-expression would never be destroyed and would leak.
struct Text {
    char s[256];
    const char* c_str() const { return s; }
};

[[gnu::format(printf, 1, 2)]] Text textf(const char* fmt, ...) {
    Text t;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t.s, sizeof t.s, fmt, ap);
    va_end(ap);
    return t;
}

Text loc_str(const std::source_location& l) {
    return textf("%s:%u:%u", base_name(l.file_name()), static_cast<unsigned>(l.line()),
                 static_cast<unsigned>(l.column()));
}

inline bool same_loc(const std::source_location& a, const std::source_location& b) {
    return a.line() == b.line() && a.column() == b.column() &&
           (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

[[noreturn]] void die_outside_launch(const char* what) {
    std::fprintf(stderr, "prefix-attn emulator: %s called outside an emulated kernel launch\n", what);
    std::abort();
}

Launch& running(const char* what) {
    Launch* L = g_launch;
    if (L == nullptr || !L->in_block) die_outside_launch(what);
    return *L;
}

unsigned lane_of(unsigned t) { return t & 31u; }

std::string thread_name(const Launch& L, unsigned t) {
    std::string s;
    const uint3 id = L.th[t].tid;
    appendf(s, "thread %u (%u,%u,%u), warp %u lane %u", t, id.x, id.y, id.z, t / 32, lane_of(t));
    return s;
}

std::string block_name(const Launch& L) {
    std::string s;
    appendf(s, "block (%u,%u,%u) of grid (%u,%u,%u), %u threads", blockIdx.x, blockIdx.y, blockIdx.z,
            L.grid.x, L.grid.y, L.grid.z, L.n);
    return s;
}

// ---------------------------------------------------------------------------------------------
// Fiber switching.
// ---------------------------------------------------------------------------------------------
#if EMU_ASAN
// Called on the stack we just switched to: completes ASan's switch and learns the bounds of the
// scheduler's stack the first time we leave it.
void asan_arrived(Launch& L, void* fake_stack) {
    const void* lo = nullptr;
    size_t size = 0;
    __sanitizer_finish_switch_fiber(fake_stack, &lo, &size);
    if (L.switching_from == &L.sched && !L.sched_stack_known) {
        L.sched.stack_lo = lo;
        L.sched.stack_size = size;
        L.sched_stack_known = true;
    }
}
#endif

// Switches from the running context to `to`. `from_dies`: `from` is never resumed (its ASan
// fake stack is released). Returns when something switches back to `from`.
void switch_ctx(Launch& L, Ctx& from, Ctx& to, bool from_dies) {
    ++L.stats.fiber_switches;
#if EMU_ASAN
    __sanitizer_start_switch_fiber(from_dies ? nullptr : &from.asan_fake_stack, to.stack_lo, to.stack_size);
    L.switching_from = &from;
#else
    (void)from_dies;
#endif
#if EMU_X86_SWITCH
    pa_emu_ctx_switch(&from.sp, to.sp);
#else
    swapcontext(&from.uc, &to.uc);
#endif
#if EMU_ASAN
    asan_arrived(L, from.asan_fake_stack);
#endif
}

// Makes thread t the running one and switches to it.
void resume(Launch& L, Ctx& from, unsigned t, bool from_dies) {
    L.cur = t;
    threadIdx = L.th[t].tid;
    switch_ctx(L, from, L.th[t].ctx, from_dies);
}

// The next ready thread after the running one in schedule order (round robin), or kNone.
unsigned next_ready(const Launch& L) {
    if (L.ready == 0) return kNone;
    for (unsigned k = 1; k <= L.n; ++k) {
        const unsigned t = L.reverse ? (L.cur + L.n - k) % L.n : (L.cur + k) % L.n;
        if (L.st[t] == St::Ready) return t;
    }
    return kNone;
}

// The running thread has just blocked: run the next ready thread, or go back to the scheduler
// when none is ready (a deadlock, which it reports). Returns when this thread is resumed.
void yield_blocked(Launch& L) {
    Thread& me = L.th[L.cur];
    const unsigned next = next_ready(L);
    if (next == kNone)
        switch_ctx(L, me.ctx, L.sched, false);
    else
        resume(L, me.ctx, next, false);
}

// Ends the launch with the error already recorded in L.err: back to the scheduler for good.
// The fibers are abandoned where they stand (their stacks are unmapped by launch()); nothing
// on them owns resources (kernels are plain code, and the emulator holds no heap objects
// across a switch).
[[noreturn]] void abort_launch(Launch& L) {
    L.failed = true;
    switch_ctx(L, L.th[L.cur].ctx, L.sched, true);
    __builtin_unreachable();
}

// Records the first error of the launch, prefixed with where it happened, and aborts the launch.
[[noreturn, gnu::format(printf, 2, 3)]] void fail_launch(Launch& L, const char* fmt, ...) {
    if (L.err.empty()) {
        char buf[1024];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        L.err = block_name(L) + ", " + thread_name(L, L.cur) + ": " + buf;
    }
    abort_launch(L);
}

// ---------------------------------------------------------------------------------------------
// Thread-state report (deadlocks, divergent barriers): one line per run of consecutive threads
// in the same state.
// ---------------------------------------------------------------------------------------------
std::string describe(const Launch& L, unsigned t) {
    const Thread& th = L.th[t];
    std::string s;
    switch (L.st[t]) {
        case St::Exited: return "exited";
        case St::Ready: return t == L.cur ? "running" : "ready";
        case St::AtBarrier: return std::string("at __syncthreads() ") + loc_str(th.loc).c_str();
        case St::AtWarp: {
            const Warp& w = L.warps[t / 32];
            const WarpPhase& ph = w.ph[th.phase];
            appendf(s, "at %s %s (warp %u: %u of its %u live lanes arrived)", kind_name(ph.kind),
                    loc_str(th.loc).c_str(), t / 32, ph.arrived, w.alive);
            return s;
        }
    }
    return "?";
}

std::string thread_states(const Launch& L) {
    std::string s;
    unsigned start = 0;
    std::string cur = describe(L, 0);
    for (unsigned t = 1; t <= L.n; ++t) {
        std::string d = t < L.n ? describe(L, t) : std::string();
        if (t < L.n && d == cur) continue;
        if (t - 1 == start)
            appendf(s, "\n  thread %u: %s", start, cur.c_str());
        else
            appendf(s, "\n  threads %u-%u: %s", start, t - 1, cur.c_str());
        start = t;
        cur = std::move(d);
    }
    s += "\n  (thread = threadIdx.x + threadIdx.y*blockDim.x + threadIdx.z*blockDim.x*blockDim.y; "
         "warp = thread/32)";
    return s;
}

// ---------------------------------------------------------------------------------------------
// Block barrier: bar.sync 0 / __syncthreads(), PTX ISA "Parallel Synchronization and
// Communication Instructions: bar, barrier" (waits for the non-exited threads):
// https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-bar-barrier
// Completes when every thread that has not exited has arrived; all
// of them must be at the same __syncthreads() (CUDA allows it in conditional code only when the
// condition is uniform across the block).
// ---------------------------------------------------------------------------------------------
// `site`: the __syncthreads() of the thread that completes the barrier; null when a thread's
// exit completes it.
void release_barrier(Launch& L, const std::source_location* site) {
    for (unsigned t = 0; t < L.n; ++t) {
        if (L.st[t] != St::AtBarrier) continue;
        if (site == nullptr) site = &L.th[t].loc;
        if (!same_loc(*site, L.th[t].loc)) {
            // Every live thread is at the barrier now: undo the releases for the report.
            for (unsigned u = 0; u < t; ++u)
                if (L.st[u] == St::Ready) L.st[u] = St::AtBarrier;
            if (L.err.empty())
                L.err = block_name(L) + ": divergent __syncthreads(): the threads that have not exited "
                        "wait at different __syncthreads() calls:" + thread_states(L);
            abort_launch(L);  // no string temporaries are alive here
        }
        L.st[t] = St::Ready;
    }
    L.ready += L.bar_arrived;
    L.bar_arrived = 0;
    ++L.stats.block_barriers;
}

// ---------------------------------------------------------------------------------------------
// Warp collectives.
// ---------------------------------------------------------------------------------------------
Text lanes_str(uint32_t mask) {
    Text t;
    size_t len = 0;
    t.s[0] = '\0';
    for (unsigned l = 0; l < 32; ++l) {
        if (!(mask >> l & 1u)) continue;
        unsigned e = l;
        while (e + 1 < 32 && (mask >> (e + 1) & 1u)) ++e;
        len += static_cast<size_t>(snprintf(t.s + len, sizeof t.s - len, e == l ? "%s%u" : "%s%u-%u",
                                            len ? "," : "", l, e));
        l = e;
    }
    if (len == 0) std::strcpy(t.s, "none");
    return t;
}

Text call_str(WKind kind, unsigned mask, int param, const std::source_location& loc) {
    Text p = textf("%s", "");
    switch (kind) {
        case WKind::ShflIdx:
        case WKind::ShflUp:
        case WKind::ShflDown:
        case WKind::ShflXor: p = textf(" (width %d)", param); break;
        case WKind::Ldmatrix: p = textf(".x%d%s", param & 0xff, (param >> 8) ? ".trans" : ""); break;
        case WKind::Mma: p = textf("%s", param == static_cast<int>(Elem::BF16) ? ".bf16" : ".f16"); break;
        default: break;
    }
    return textf("%s%s with mask 0x%08x at %s", kind_name(kind), p.c_str(), mask, loc_str(loc).c_str());
}

// Joins the running lane to its warp's next collective; returns its slot for the inputs.
Slot& begin_collective(Launch& L, WKind kind, unsigned mask, int param, const std::source_location& loc) {
    Thread& me = L.th[L.cur];
    Warp& w = L.warps[L.cur / 32];
    const unsigned lane = lane_of(L.cur);
    if ((w.alive_mask & ~mask) != 0)
        fail_launch(L, "%s at %s with mask 0x%08x, but the warp's live lanes are 0x%08x (the emulator "
                    "requires every live lane of the warp in the mask)",
                    kind_name(kind), loc_str(loc).c_str(), mask, w.alive_mask);
    WarpPhase& ph = w.ph[me.phase];
    if (ph.arrived == 0) {
        ph.kind = kind;
        ph.loc = loc;
        ph.mask = mask;
        ph.param = param;
    } else if (ph.kind != kind || (kind != WKind::Syncwarp && !same_loc(ph.loc, loc)) ||
               ph.mask != mask || ph.param != param) {
        fail_launch(L, "divergent warp collective: this lane calls %s while lanes %s of its warp wait at %s "
                    "(every live lane must execute the same warp collective)",
                    call_str(kind, mask, param, loc).c_str(), lanes_str(ph.arrived_mask).c_str(),
                    call_str(ph.kind, ph.mask, ph.param, ph.loc).c_str());
    }
    me.loc = loc;
    return ph.slot[lane];
}

void compute_collective(Launch& L, Warp& w, WarpPhase& ph);


// Completes the collective for all lanes (run by the lane that arrives last, or by the lane
// whose exit leaves only arrived lanes): computes every lane's outputs and makes them ready.
void release_warp(Launch& L, Warp& w, unsigned p) {
    WarpPhase& ph = w.ph[p];
    compute_collective(L, w, ph);
    const unsigned base = static_cast<unsigned>(&w - L.warps.data()) * 32;
    for (unsigned l = 0; l < 32; ++l)
        if (ph.arrived_mask >> l & 1u) L.st[base + l] = St::Ready;
    L.ready += ph.arrived;
    ph.arrived = 0;
    ph.arrived_mask = 0;
    ++L.stats.warp_collectives;
}

// The running lane has written its inputs: waits for the collective to complete and returns
// its slot, now holding its outputs (valid until it joins the collective after next).
Slot& finish_collective(Launch& L) {
    Thread& me = L.th[L.cur];
    Warp& w = L.warps[L.cur / 32];
    const unsigned p = me.phase;
    WarpPhase& ph = w.ph[p];
    L.st[L.cur] = St::AtWarp;
    --L.ready;
    ++ph.arrived;
    ph.arrived_mask |= 1u << lane_of(L.cur);
    if (ph.arrived == w.alive) {
        release_warp(L, w, p);  // the last lane completes the collective and runs on
    } else {
        yield_blocked(L);
    }
    me.phase ^= 1u;
    return ph.slot[lane_of(L.cur)];
}

// shfl.sync, PTX ISA "Data Movement and Conversion Instructions: shfl.sync" (its pseudo-code):
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-shfl-sync
// with the c operand that CUDA's
// __shfl*_sync(mask, var, b, width) pass: c = ((32 - width) << 8) | (up ? 0 : 0x1f).
void compute_shfl(Launch& L, Warp& w, WarpPhase& ph, WKind kind) {
    const unsigned base = static_cast<unsigned>(&w - L.warps.data()) * 32;
    const int width = ph.param;
    const int segmask = (32 - width) & 0x1f;
    const int cval = kind == WKind::ShflUp ? 0 : 0x1f;
    for (int lane = 0; lane < 32; ++lane) {
        if (!(ph.arrived_mask >> lane & 1u)) continue;
        Slot& s = ph.slot[lane];
        const int b = s.arg & 0x1f;
        const int max_lane = (lane & segmask) | (cval & ~segmask);
        const int min_lane = lane & segmask;
        int j = lane;
        bool pval = false;
        switch (kind) {
            case WKind::ShflUp: j = lane - b; pval = j >= max_lane; break;
            case WKind::ShflDown: j = lane + b; pval = j <= max_lane; break;
            case WKind::ShflXor: j = lane ^ b; pval = j <= max_lane; break;
            default: j = min_lane | (b & ~segmask); pval = j <= max_lane; break;
        }
        if (!pval) j = lane;  // out of the lane's segment: it keeps its own value
        if (!(ph.arrived_mask >> j & 1u))
            fail_launch(L, "%s at %s: lane %d (thread %u) reads lane %d, which %s", kind_name(kind),
                        loc_str(ph.loc).c_str(), lane, base + static_cast<unsigned>(lane), j,
                        static_cast<unsigned>(j) < w.size ? "has exited" : "does not exist (partial warp)");
        s.out[0] = static_cast<uint32_t>(j);
    }
    for (int lane = 0; lane < 32; ++lane)
        if (ph.arrived_mask >> lane & 1u) ph.slot[lane].out_val = ph.slot[ph.slot[lane].out[0]].val;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, PTX ISA "Matrix Fragments for
// mma.m16n8k16 with floating point type":
// https://docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-fragment-mma-16816-float
void compute_mma(Launch& L, WarpPhase& ph) {
    if (ph.arrived_mask != 0xffffffffu)
        fail_launch(L, "mma.sync at %s with lanes %s only: all 32 lanes of the warp must execute it",
                    loc_str(ph.loc).c_str(), lanes_str(ph.arrived_mask).c_str());
    const bool bf16 = ph.param == static_cast<int>(Elem::BF16);
    auto cvt = [bf16](uint32_t reg, int hi) {
        const uint16_t bits = static_cast<uint16_t>(reg >> (16 * hi));
        return bf16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
    };
    float A[16][16], B[16][8], D[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const Slot& s = ph.slot[lane];
        const int g = lane >> 2, t = lane & 3;
        for (int h = 0; h < 2; ++h) {
            A[g][2 * t + h] = cvt(s.a[0], h);
            A[g + 8][2 * t + h] = cvt(s.a[1], h);
            A[g][2 * t + 8 + h] = cvt(s.a[2], h);
            A[g + 8][2 * t + 8 + h] = cvt(s.a[3], h);
            B[2 * t + h][g] = cvt(s.b[0], h);
            B[2 * t + 8 + h][g] = cvt(s.b[1], h);
            D[g][2 * t + h] = s.c[h];
            D[g + 8][2 * t + h] = s.c[2 + h];
        }
    }
    // D[m][n] = C[m][n] + A[m][0]*B[0][n] + A[m][1]*B[1][n] + ... in this order, one rounding per
    // addition. Each product of two f16/bf16 values is exact in fp32, so a fused multiply-add
    // (if the compiler contracts) gives the same result. The loop over n vectorises.
    for (int m = 0; m < 16; ++m) {
        float acc[8];
        for (int n = 0; n < 8; ++n) acc[n] = D[m][n];
        for (int k = 0; k < 16; ++k) {
            const float a = A[m][k];
            for (int n = 0; n < 8; ++n) acc[n] += a * B[k][n];
        }
        for (int n = 0; n < 8; ++n) D[m][n] = acc[n];
    }
    for (int lane = 0; lane < 32; ++lane) {
        Slot& s = ph.slot[lane];
        const int g = lane >> 2, t = lane & 3;
        for (int h = 0; h < 2; ++h) {
            s.out[h] = std::bit_cast<uint32_t>(D[g][2 * t + h]);
            s.out[2 + h] = std::bit_cast<uint32_t>(D[g + 8][2 * t + h]);
        }
    }
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16, PTX ISA "Warp-level matrix load
// instruction: ldmatrix":
// https://docs.nvidia.com/cuda/parallel-thread-execution/#warp-level-matrix-instructions-ldmatrix
// The rows of all lanes are
// read here, once, as the single warp-wide instruction does.
void compute_ldmatrix(Launch& L, Warp& w, WarpPhase& ph) {
    const int num = ph.param & 0xff;
    const bool trans = (ph.param >> 8) != 0;
    if (ph.arrived_mask != 0xffffffffu)
        fail_launch(L, "ldmatrix at %s with lanes %s only: all 32 lanes of the warp must execute it",
                    loc_str(ph.loc).c_str(), lanes_str(ph.arrived_mask).c_str());
    const unsigned base = static_cast<unsigned>(&w - L.warps.data()) * 32;
    for (int l = 0; l < 8 * num; ++l) {
        const uintptr_t a = reinterpret_cast<uintptr_t>(ph.slot[l].ptr);
        if (a == 0 || (a & 15u) != 0)
            fail_launch(L, "ldmatrix.x%d%s at %s: lane %d (thread %u) gives row address %p, which is %s", num,
                        trans ? ".trans" : "", loc_str(ph.loc).c_str(), l, base + static_cast<unsigned>(l),
                        ph.slot[l].ptr, a == 0 ? "null" : "not 16-byte aligned");
    }
    // Element (row, col) of matrix j: the col-th 16-bit value of the row whose address lane
    // 8j + row gave.
    auto at = [&ph](int j, int row, int col) -> uint32_t {
        uint16_t v;
        std::memcpy(&v, static_cast<const unsigned char*>(ph.slot[8 * j + row].ptr) + 2 * col, 2);
        return v;
    };
    for (int l = 0; l < 32; ++l) {
        for (int j = 0; j < num; ++j) {
            const int r = l >> 2, c = 2 * (l & 3);
            ph.slot[l].out[j] = trans ? at(j, c, r) | at(j, c + 1, r) << 16 : at(j, r, c) | at(j, r, c + 1) << 16;
        }
    }
}

void compute_collective(Launch& L, Warp& w, WarpPhase& ph) {
    switch (ph.kind) {
        case WKind::Syncwarp: break;
        case WKind::ShflIdx:
        case WKind::ShflUp:
        case WKind::ShflDown:
        case WKind::ShflXor: compute_shfl(L, w, ph, ph.kind); break;
        case WKind::Ballot: {
            // vote.sync.ballot.b32, PTX ISA "vote.sync": bit l is set iff lane l takes part and
            // its predicate is true (exited lanes contribute 0).
            // https://docs.nvidia.com/cuda/parallel-thread-execution/#parallel-synchronization-and-communication-instructions-vote-sync
            uint32_t bits = 0;
            for (unsigned l = 0; l < 32; ++l)
                if ((ph.arrived_mask >> l & 1u) && ph.slot[l].val != 0) bits |= 1u << l;
            for (unsigned l = 0; l < 32; ++l) ph.slot[l].out_val = bits;
            break;
        }
        case WKind::Mma: compute_mma(L, ph); break;
        case WKind::Ldmatrix: compute_ldmatrix(L, w, ph); break;
    }
}

// ---------------------------------------------------------------------------------------------
// Thread exit: the thread drops out of the block barrier and of its warp's collectives, which
// may complete them ("an exiting fiber must re-check pending barriers").
// ---------------------------------------------------------------------------------------------
[[noreturn]] void thread_exit(Launch& L) {
    Thread& me = L.th[L.cur];
    Warp& w = L.warps[L.cur / 32];
    L.st[L.cur] = St::Exited;
    me.copies.clear();  // pending cp.async copies are dropped
    --L.ready;
    --L.live;
    --w.alive;
    w.alive_mask &= ~(1u << lane_of(L.cur));
    for (unsigned p = 0; p < 2; ++p)
        if (w.ph[p].arrived != 0 && w.ph[p].arrived == w.alive) release_warp(L, w, p);
    if (L.bar_arrived != 0 && L.bar_arrived == L.live) release_barrier(L, nullptr);
    const unsigned next = next_ready(L);
    if (next == kNone)
        switch_ctx(L, me.ctx, L.sched, true);
    else
        resume(L, me.ctx, next, true);
    __builtin_unreachable();
}

// ---------------------------------------------------------------------------------------------
// Stacks and contexts.
// ---------------------------------------------------------------------------------------------
// Stack overflow of a fiber hits its guard page: without a word, that is a bare SIGSEGV that
// kills the test binary. A SIGSEGV handler (installed once, chained to the previous handler for
// every other fault) names the cause before the process dies. It runs on the thread's
// alternate signal stack (Rust threads have one; launch() sets one up otherwise).
struct sigaction g_prev_segv;
std::once_flag g_segv_once;

void write_str(const char* s) {
    size_t n = std::strlen(s);
    while (n > 0) {
        const ssize_t w = write(2, s, n);
        if (w <= 0) return;
        s += w;
        n -= static_cast<size_t>(w);
    }
}

void write_uint(unsigned long v) {  // async-signal-safe decimal output
    char buf[24];
    int i = sizeof buf - 1;
    buf[i] = '\0';
    do {
        buf[--i] = static_cast<char>('0' + v % 10);
        v /= 10;
    } while (v != 0 && i > 0);
    write_str(buf + i);
}

void segv_handler(int sig, siginfo_t* info, void* uctx) {
    const Launch* L = g_launch;
    const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
    const auto lo = reinterpret_cast<uintptr_t>(L != nullptr ? L->stacks : nullptr);
    // A guard page, or just below the first stack (a frame larger than a page can jump over
    // the guard; -fstack-clash-protection makes every overflow touch it).
    const bool in_guard = L != nullptr && lo != 0 && addr >= lo && addr < lo + L->stacks_bytes &&
                          (addr - lo) % L->stack_stride < L->stack_stride - L->stack_bytes;
    const bool below = L != nullptr && lo != 0 && addr < lo && lo - addr <= (1u << 20);
    if (in_guard || below) {
        write_str("\nprefix-attn emulator: an emulated CUDA thread overflowed its fiber stack (");
        write_uint(L->stack_bytes / 1024);
        write_str(" KiB) in thread ");
        write_uint(below ? 0ul : static_cast<unsigned long>((addr - lo) / L->stack_stride));
        write_str(" of block (");
        write_uint(blockIdx.x);
        write_str(",");
        write_uint(blockIdx.y);
        write_str(",");
        write_uint(blockIdx.z);
        write_str("): the kernel has large local arrays or deep recursion; PREFIX_ATTN_EMU_STACK_KIB sets "
                  "the size\n");
        signal(SIGSEGV, SIG_DFL);  // returning re-executes the access, which now kills the process
        return;
    }
    if (g_prev_segv.sa_flags & SA_SIGINFO) {
        g_prev_segv.sa_sigaction(sig, info, uctx);
    } else if (g_prev_segv.sa_handler == SIG_DFL || g_prev_segv.sa_handler == SIG_IGN) {
        signal(SIGSEGV, SIG_DFL);
    } else {
        g_prev_segv.sa_handler(sig);
    }
}

void install_segv_handler() {
    std::call_once(g_segv_once, [] {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = segv_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_prev_segv);
    });
}

// Gives the calling thread an alternate signal stack for the launch if it has none.
struct AltStack {
    std::vector<unsigned char> mem;
    bool installed = false;
    AltStack() {
        stack_t cur;
        if (sigaltstack(nullptr, &cur) != 0 || !(cur.ss_flags & SS_DISABLE)) return;
        mem.resize(64 * 1024);
        stack_t st;
        st.ss_sp = mem.data();
        st.ss_size = mem.size();
        st.ss_flags = 0;
        installed = sigaltstack(&st, nullptr) == 0;
    }
    ~AltStack() {
        if (!installed) return;
        stack_t st;
        std::memset(&st, 0, sizeof st);
        st.ss_flags = SS_DISABLE;
        sigaltstack(&st, nullptr);
    }
    AltStack(const AltStack&) = delete;
    AltStack& operator=(const AltStack&) = delete;
};

bool alloc_stacks(Launch& L, std::string& err) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    size_t kib = EMU_ASAN ? 256 : 64;  // ASan's redzones make frames larger
    if (const char* e = std::getenv("PREFIX_ATTN_EMU_STACK_KIB")) {
        const long v = std::strtol(e, nullptr, 10);
        if (v >= 16 && v <= 65536) kib = static_cast<size_t>(v);
    }
    L.stack_bytes = (kib * 1024 + page - 1) / page * page;
    L.stack_stride = L.stack_bytes + page;  // a guard page below each stack
    L.stacks_bytes = L.stack_stride * L.n;
    void* m = mmap(nullptr, L.stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) {
        appendf(err, "cannot map %zu bytes of fiber stacks", L.stacks_bytes);
        return false;
    }
    L.stacks = static_cast<unsigned char*>(m);
    for (unsigned t = 0; t < L.n; ++t) {
        unsigned char* guard = L.stacks + t * L.stack_stride;
        if (mprotect(guard, page, PROT_NONE) != 0) {
            appendf(err, "cannot protect a fiber stack guard page");
            return false;
        }
        L.th[t].ctx.stack_lo = guard + page;
        L.th[t].ctx.stack_size = L.stack_bytes;
    }
    return true;
}

void free_stacks(Launch& L) {
    if (L.stacks == nullptr) return;
#if EMU_ASAN
    // Abandoned fibers leave poisoned frames in ASan's shadow; clear it before the memory can be
    // mapped again for something else.
    for (unsigned t = 0; t < L.n; ++t) ASAN_UNPOISON_MEMORY_REGION(L.th[t].ctx.stack_lo, L.stack_bytes);
#endif
    munmap(L.stacks, L.stacks_bytes);
    L.stacks = nullptr;
}

// Prepares thread t's fiber to start at pa_emu_fiber_main on an empty stack.
void init_fiber(Launch& L, unsigned t) {
    Ctx& c = L.th[t].ctx;
    c.asan_fake_stack = nullptr;
#if EMU_ASAN
    // A fiber that exited left the frames of its exit path (near the top of its stack) with
    // ASan's redzone poison; the next block's fiber starts on the same stack.
    const size_t clean = std::min<size_t>(c.stack_size, 16 * 1024);
    ASAN_UNPOISON_MEMORY_REGION(static_cast<const unsigned char*>(c.stack_lo) + c.stack_size - clean, clean);
#endif
#if EMU_X86_SWITCH
    // The frame pa_emu_ctx_switch pops (lowest address first): FP control, r15, r14, r13, r12,
    // rbx, rbp, return address. After its `ret` the stack pointer is 16-byte aligned, as the
    // `call` in pa_emu_fiber_start requires.
    // Stack tops are staggered by a cache line per fiber: otherwise every fiber's hot frames sit
    // at the same page offset and compete for the same few L1 sets.
    auto* top = static_cast<unsigned char*>(const_cast<void*>(c.stack_lo)) + c.stack_size - 64 * (t % 64);
    auto* f = reinterpret_cast<uint64_t*>(top - 80);
    f[0] = L.fpctl;
    f[1] = f[2] = f[3] = 0;                                       // r15, r14, r13
    f[4] = reinterpret_cast<uint64_t>(&pa_emu_fiber_main);       // r12: called by the trampoline
    f[5] = f[6] = 0;                                              // rbx, rbp (ends the frame chain)
    f[7] = reinterpret_cast<uint64_t>(&pa_emu_fiber_start);      // return address
    f[8] = f[9] = 0;
    c.sp = f;
#else
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = const_cast<void*>(c.stack_lo);
    c.uc.uc_stack.ss_size = c.stack_size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, &pa_emu_fiber_main, 0);
#endif
}

uint64_t current_fpctl() {
#if EMU_X86_SWITCH
    uint32_t mxcsr = 0;
    uint16_t cw = 0;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(cw));
    return static_cast<uint64_t>(mxcsr) | static_cast<uint64_t>(cw) << 32;
#else
    return 0;
#endif
}

// ---------------------------------------------------------------------------------------------
// Blocks.
// ---------------------------------------------------------------------------------------------
void init_block(Launch& L) {
    if (L.smem_bytes != 0) std::memset(L.smem, 0xff, L.smem_bytes);
    for (unsigned t = 0; t < L.n; ++t) {
        Thread& th = L.th[t];
        L.st[t] = St::Ready;
        th.phase = 0;
        th.copies.clear();
        th.open_group = 0;
        init_fiber(L, t);
    }
    for (size_t w = 0; w < L.warps.size(); ++w) {
        Warp& wp = L.warps[w];
        wp.size = std::min<unsigned>(32, L.n - static_cast<unsigned>(w) * 32);
        wp.alive = wp.size;
        wp.alive_mask = wp.size == 32 ? 0xffffffffu : (1u << wp.size) - 1u;
        for (WarpPhase& ph : wp.ph) {
            ph.arrived = 0;
            ph.arrived_mask = 0;
        }
    }
    L.live = L.n;
    L.ready = L.n;
    L.bar_arrived = 0;
}

// Runs the current block to completion (or failure). Returns false on failure.
bool run_block(Launch& L) {
    init_block(L);
    L.in_block = true;
    const unsigned first = L.reverse ? L.n - 1 : 0;
    resume(L, L.sched, first, false);
    L.in_block = false;
    if (L.failed) return false;
    if (L.live != 0) {
        std::string m = block_name(L) + ": deadlock: no thread can make progress (" +
                        std::to_string(L.bar_arrived) + " of " + std::to_string(L.live) +
                        " live threads wait at the block barrier; a __syncthreads() or warp collective is "
                        "not reached by every thread that has not exited):" +
                        thread_states(L);
        L.err = std::move(m);
        L.failed = true;
        return false;
    }
    ++L.stats.blocks;
    return true;
}

void copy_err(const std::string& msg, char* err, size_t err_len) {
    if (err == nullptr || err_len == 0) return;
    const size_t n = std::min(msg.size(), err_len - 1);
    std::memcpy(err, msg.data(), n);
    err[n] = '\0';
}

bool env_reverse() {
    const char* e = std::getenv("PREFIX_ATTN_EMU_SCHEDULE");
    return e != nullptr && std::strcmp(e, "reverse") == 0;
}

}  // namespace

// =============================================================================================
// Public API.
// =============================================================================================
int launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& kernel_body,
           char* err, size_t err_len) {
    copy_err("", err, err_len);
    const uint64_t n = static_cast<uint64_t>(block.x) * block.y * block.z;
    std::string bad;
    if (t_in_launch)
        bad = "emu::launch called from inside an emulated kernel";
    else if (!kernel_body)
        bad = "emu::launch: empty kernel body";
    else if (n == 0 || n > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64)
        appendf(bad, "invalid block (%u,%u,%u): at most 1024 threads, x,y <= 1024, z <= 64, none 0", block.x,
                block.y, block.z);
    else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
        appendf(bad, "invalid grid (%u,%u,%u)", grid.x, grid.y, grid.z);
    else if (dynamic_smem_bytes > kMaxDynamicSmem)
        appendf(bad, "dynamic shared memory of %zu bytes exceeds the %zu a block can have", dynamic_smem_bytes,
                kMaxDynamicSmem);
    if (!bad.empty()) {
        copy_err(bad, err, err_len);
        return 1;
    }

    std::lock_guard<std::mutex> lock(g_launch_mutex);
    t_in_launch = true;
    install_segv_handler();
    AltStack alt_stack;
    Launch L;
    L.grid = grid;
    L.block = block;
    L.n = static_cast<unsigned>(n);
    L.reverse = t_schedule >= 0 ? t_schedule == 1 : env_reverse();
    L.body = &kernel_body;
    L.fpctl = current_fpctl();
    L.th.resize(L.n);
    L.st.assign(L.n, St::Ready);
    L.warps.resize((L.n + 31) / 32);
    for (unsigned t = 0; t < L.n; ++t) {
        L.th[t].tid = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        L.th[t].copies.reserve(16);
    }
    std::string setup_err;
    bool ok = alloc_stacks(L, setup_err);
    if (ok && dynamic_smem_bytes != 0) {
        // Exactly the requested size, so ASan's heap redzone starts right after it.
        void* p = nullptr;
        if (posix_memalign(&p, 16, dynamic_smem_bytes) != 0) {
            setup_err = "cannot allocate dynamic shared memory";
            ok = false;
        } else {
            L.smem = static_cast<unsigned char*>(p);
            L.smem_bytes = dynamic_smem_bytes;
        }
    }
    if (ok) {
        g_launch = &L;
        gridDim = grid;
        blockDim = block;
        for (unsigned z = 0; z < grid.z && ok; ++z)
            for (unsigned y = 0; y < grid.y && ok; ++y)
                for (unsigned x = 0; x < grid.x && ok; ++x) {
                    blockIdx = uint3{x, y, z};
                    ok = run_block(L);
                }
        g_launch = nullptr;
        setup_err = L.err;
    }
    free_stacks(L);
    std::free(L.smem);
    t_last_stats = L.stats;
    t_in_launch = false;
    if (ok) return 0;
    copy_err(setup_err.empty() ? std::string("emulated launch failed") : setup_err, err, err_len);
    return 1;
}

void fail(const char* msg) {
    Launch* L = g_launch;
    if (L == nullptr || !L->in_block) {
        std::fprintf(stderr, "prefix-attn emulator: emu::fail outside a launch: %s\n", msg);
        std::abort();
    }
    fail_launch(*L, "emu::fail: %s", msg);
}

void set_schedule_reverse(bool reverse) { t_schedule = reverse ? 1 : 0; }
extern "C" void pa_emu_set_schedule_reverse(int reverse) { set_schedule_reverse(reverse != 0); }
bool schedule_reverse() { return t_schedule >= 0 ? t_schedule == 1 : env_reverse(); }
LaunchStats last_launch_stats() { return t_last_stats; }

void* dynamic_smem() { return running("emu::dynamic_smem").smem; }
size_t dynamic_smem_size() { return running("emu::dynamic_smem_size").smem_bytes; }

void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], Elem e,
                  std::source_location loc) {
    Launch& L = running("mma_m16n8k16");
    Slot& in = begin_collective(L, WKind::Mma, 0xffffffffu, static_cast<int>(e), loc);
    std::memcpy(in.a, a, sizeof in.a);
    std::memcpy(in.b, b, sizeof in.b);
    std::memcpy(in.c, c, sizeof in.c);  // copied before d is written: d may alias c
    const Slot& out = finish_collective(L);
    for (int i = 0; i < 4; ++i) d[i] = std::bit_cast<float>(out.out[i]);
}

void ldmatrix(uint32_t* r, int num, bool trans, const void* row_addr, std::source_location loc) {
    Launch& L = running("ldmatrix");
    if (num != 1 && num != 2 && num != 4) fail_launch(L, "ldmatrix with %d matrices (must be 1, 2 or 4)", num);
    Slot& in = begin_collective(L, WKind::Ldmatrix, 0xffffffffu, num | (trans ? 1 << 8 : 0), loc);
    in.ptr = row_addr;
    const Slot& out = finish_collective(L);
    for (int j = 0; j < num; ++j) r[j] = out.out[j];
}

// cp.async, cp.async.commit_group, cp.async.wait_group, PTX ISA:
// https://docs.nvidia.com/cuda/parallel-thread-execution/#data-movement-and-conversion-instructions-cp-async
// Per thread, no collective.
void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
    Launch& L = running("cp_async_16");
    if ((reinterpret_cast<uintptr_t>(smem_dst) & 15u) != 0 || smem_dst == nullptr)
        fail_launch(L, "cp.async: shared-memory destination %p is not 16-byte aligned", smem_dst);
    if ((reinterpret_cast<uintptr_t>(gmem_src) & 15u) != 0)
        fail_launch(L, "cp.async: global source %p is not 16-byte aligned", gmem_src);
    Thread& me = L.th[L.cur];
    auto* dst = static_cast<unsigned char*>(smem_dst);
    std::memset(dst, 0xff, 16);  // poison: reading before the wait sees NaN
    me.copies.push_back(PendingCopy{dst, static_cast<const unsigned char*>(gmem_src), valid, me.open_group});
}

void cp_async_commit() {
    Launch& L = running("cp_async_commit");
    ++L.th[L.cur].open_group;
}

void cp_async_wait(int n) {
    Launch& L = running("cp_async_wait");
    if (n < 0) fail_launch(L, "cp.async.wait_group %d", n);
    Thread& me = L.th[L.cur];
    const uint32_t committed = me.open_group;
    const uint32_t done_below = committed > static_cast<uint32_t>(n) ? committed - static_cast<uint32_t>(n) : 0;
    size_t keep = 0;
    for (size_t i = 0; i < me.copies.size(); ++i) {
        const PendingCopy& c = me.copies[i];
        if (c.group < done_below) {
            if (c.valid)
                std::memcpy(c.dst, c.src, 16);
            else
                std::memset(c.dst, 0, 16);
        } else {
            me.copies[keep++] = c;
        }
    }
    me.copies.resize(keep);
}

namespace detail {

void syncthreads(const std::source_location& loc) {
    Launch& L = running("__syncthreads");
    Thread& me = L.th[L.cur];
    L.st[L.cur] = St::AtBarrier;
    me.loc = loc;
    --L.ready;
    ++L.bar_arrived;
    if (L.bar_arrived == L.live)
        release_barrier(L, &loc);  // the last thread to arrive runs on
    else
        yield_blocked(L);
}

void syncwarp(unsigned mask, const std::source_location& loc) {
    Launch& L = running("__syncwarp");
    begin_collective(L, WKind::Syncwarp, mask, 0, loc);
    finish_collective(L);
}

uint64_t shfl(unsigned mask, uint64_t bits, int lane_arg, int width, Shfl mode, const std::source_location& loc) {
    Launch& L = running("__shfl_sync");
    static constexpr WKind kinds[] = {WKind::ShflIdx, WKind::ShflUp, WKind::ShflDown, WKind::ShflXor};
    const WKind kind = kinds[static_cast<int>(mode)];
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
        fail_launch(L, "%s at %s with width %d (must be a power of two <= 32)", kind_name(kind),
                    loc_str(loc).c_str(), width);
    Slot& in = begin_collective(L, kind, mask, width, loc);
    in.val = bits;
    in.arg = lane_arg;
    return finish_collective(L).out_val;
}

uint32_t ballot(unsigned mask, bool pred, const std::source_location& loc) {
    Launch& L = running("__ballot_sync");
    Slot& in = begin_collective(L, WKind::Ballot, mask, 0, loc);
    in.val = pred ? 1 : 0;
    return static_cast<uint32_t>(finish_collective(L).out_val);
}

}  // namespace detail
}  // namespace emu

// The body of every fiber: runs the kernel for the thread the scheduler switched to, then
// exits it. Never returns (there is nothing to return to).
extern "C" void pa_emu_fiber_main() {
    emu::Launch& L = *emu::g_launch;
#if EMU_ASAN
    emu::asan_arrived(L, nullptr);
#endif
#if defined(__cpp_exceptions)
    try {
        (*L.body)();
    } catch (...) {
        emu::fail_launch(L, "the kernel threw a C++ exception");
    }
#else
    (*L.body)();
#endif
    emu::thread_exit(L);
}

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
//
// Racecheck (PREFIX_ATTN_EMU_RACECHECK, cargo feature emu-racecheck): the kernels are compiled
// with -fsanitize=thread, and this file (compiled without it) implements the __tsan_* hooks the
// instrumentation calls, feeding every load and store of a running block into the shadow memory
// of racecheck.h; ldmatrix and cp.async, which move memory here, feed it themselves. Why not
// ThreadSanitizer's own runtime: see README "Racecheck".

#include "emu.h"

#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cxxabi.h>
#include <mutex>
#include <string>
#include <vector>

#if defined(PREFIX_ATTN_EMU_RACECHECK)
#define EMU_RACECHECK 1
#include "racecheck.h"
#else
#define EMU_RACECHECK 0
#endif
#if defined(PREFIX_ATTN_EMU_LIBBACKTRACE)
#include <backtrace.h>
#endif

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

#if defined(PREFIX_ATTN_EMU_RACECHECK)
// The linker's bounds of the section that holds the static __shared__ arrays (emu.h).
extern "C" __attribute__((weak)) unsigned char __start_pa_emu_shared[];
extern "C" __attribute__((weak)) unsigned char __stop_pa_emu_shared[];
#endif

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
    uintptr_t pc;    // where it was issued (for reports)
};

struct Thread {
    Ctx ctx;
    // Parity of the warp collectives this lane has completed: which half of the warp's
    // double-buffered scratch its next collective uses.
    uint8_t phase = 0;
    uint3 tid{0, 0, 0};
    std::source_location loc;  // where it waits (barrier or collective), for reports
    uintptr_t pc = 0;          // the kernel's call site of that wait (a return address)
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
    uintptr_t pc;  // the lane's call site in the kernel (a return address)
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
    uintptr_t pc = 0;  // the first lane's call site in the kernel
    Slot slot[32];
};

struct Warp {
    unsigned size = 0;   // lanes that exist (the last warp of a block may be partial)
    unsigned alive = 0;  // lanes that have not exited
    uint32_t alive_mask = 0;
    uint32_t exist_mask = 0;
    uint32_t completed = 0;  // collectives completed since the launch started (racecheck's clock)
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
    // set_drop_sync: the call site whose synchronisations are skipped (line 0: none).
    std::string drop_file;
    unsigned drop_line = 0;
};

// The running launch. Launches are serialised (g_launch_mutex), so a plain global.
Launch* g_launch = nullptr;
std::mutex g_launch_mutex;
thread_local bool t_in_launch = false;
thread_local int t_schedule = -1;  // -1: not set, read PREFIX_ATTN_EMU_SCHEDULE
thread_local LaunchStats t_last_stats{};
// set_drop_sync of this OS thread: -1 not set (read PREFIX_ATTN_EMU_DROP_SYNC), 0 off, 1 on.
thread_local int t_drop_state = -1;
thread_local std::string t_drop_file;
thread_local unsigned t_drop_line = 0;
thread_local uint64_t t_dropped_total = 0;

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

// ---------------------------------------------------------------------------------------------
// Source lines of code addresses. Reports name the kernel's line of an access or a call from
// the return address the emulator's entry point (or the instrumentation hook) sees. Messages
// built inside a fiber carry a token ({pc:HEX}) that launch() replaces once the launch is over:
// reading the executable's DWARF wants more than a 64 KiB fiber stack. With gcc's libbacktrace
// (found by build.rs) the line comes with its inline chain; without it, module + offset (for
// addr2line).
// ---------------------------------------------------------------------------------------------
Text pc_token(uintptr_t pc) { return textf("{pc:%" PRIxPTR "}", pc); }

[[maybe_unused]] std::string demangle(const char* f) {
    if (f == nullptr) return "";
    std::string r = f;
    if (f[0] == '_' && f[1] == 'Z') {
        // Without the optimiser's clone suffix (".isra.0", ".constprop.0", ".part.0", ...), and
        // with _Float16 (DF16_, which gcc 12's demangler does not know) as IEEE half (Dh).
        std::string mangled = r.substr(0, r.find('.'));
        for (size_t at; (at = mangled.find("DF16_")) != std::string::npos;) mangled.replace(at, 5, "Dh");
        int status = 0;
        char* d = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status);
        if (d != nullptr && status == 0) r = d;
        std::free(d);
    }
    // Drop the argument list and the return type: "void pa::f<64>(int)" -> "pa::f<64>".
    if (r.size() > 6 && r.compare(r.size() - 6, 6, " const") == 0) r.resize(r.size() - 6);
    const auto ends_with = [&r](const char* e) {
        const size_t n = std::strlen(e);
        return r.size() >= n && r.compare(r.size() - n, n, e) == 0;
    };
    if (!r.empty() && r.back() == ')' && !ends_with("operator()")) {  // "operator()" has no arguments left
        int depth = 0;
        for (size_t i = r.size(); i-- > 0;) {
            if (r[i] == ')') ++depth;
            if (r[i] == '(' && --depth == 0) {
                r.resize(i);
                break;
            }
        }
    }
    int depth = 0;
    for (size_t i = 0; i < r.size(); ++i) {
        if (r[i] == '<' || r[i] == '(') ++depth;
        if (r[i] == '>' || r[i] == ')') --depth;
        if (r[i] == ' ' && depth == 0 && r.compare(0, 8, "operator") != 0) {
            r.erase(0, i + 1);
            break;
        }
    }
    return r;
}

struct Frame {
    std::string file;
    int line;
    std::string func;
};

#if defined(PREFIX_ATTN_EMU_LIBBACKTRACE)
std::mutex g_bt_mutex;
backtrace_state* g_bt = nullptr;
void bt_error(void*, const char*, int) {}
int bt_frame(void* data, uintptr_t, const char* file, int line, const char* func) {
    static_cast<std::vector<Frame>*>(data)->push_back(Frame{file ? file : "", line, demangle(func)});
    return 0;
}
#endif

// The frames of pc, innermost (inlined) first; empty when unknown.
std::vector<Frame> frames_of(uintptr_t pc) {
    std::vector<Frame> v;
#if defined(PREFIX_ATTN_EMU_LIBBACKTRACE)
    std::lock_guard<std::mutex> lock(g_bt_mutex);
    if (g_bt == nullptr) g_bt = backtrace_create_state(nullptr, 1, bt_error, nullptr);
    // pc is a return address: pc - 1 lies in the call (or access) instruction.
    if (g_bt != nullptr) backtrace_pcinfo(g_bt, pc - 1, bt_frame, bt_error, &v);
    while (!v.empty() && v.back().file.empty()) v.pop_back();
#else
    (void)pc;
#endif
    return v;
}

// The static variable that holds addr, as "name+offset", or "" when unknown.
[[maybe_unused]] std::string data_symbol(uintptr_t addr) {
    std::string out;
#if defined(PREFIX_ATTN_EMU_LIBBACKTRACE)
    std::lock_guard<std::mutex> lock(g_bt_mutex);
    if (g_bt == nullptr) g_bt = backtrace_create_state(nullptr, 1, bt_error, nullptr);
    struct Found {
        uintptr_t addr;
        std::string* out;
    } f{addr, &out};
    auto cb = [](void* data, uintptr_t, const char* name, uintptr_t value, uintptr_t size) {
        auto* fd = static_cast<Found*>(data);
        if (name != nullptr && fd->addr >= value && fd->addr < value + (size ? size : 1))
            *fd->out = demangle(name) + "+" + std::to_string(fd->addr - value);
    };
    if (g_bt != nullptr) backtrace_syminfo(g_bt, addr, cb, bt_error, &f);
#else
    (void)addr;
#endif
    return out;
}

bool is_header(const std::string& f) {
    auto ends = [&f](const char* e) {
        const size_t n = std::strlen(e);
        return f.size() >= n && f.compare(f.size() - n, n, e) == 0;
    };
    return ends(".cuh") || ends(".h");
}

// "prefix_attn_fwd.cu:91 <- :120 in pa::fwd_kernel<64, __half> (via tile.cuh:33)": the line in
// the kernel's own source (the innermost frame outside the headers), the lines of the calls of
// the lambdas it sits in, its function, and the header frame just inside it.
std::string symbolize(uintptr_t pc) {
    const std::vector<Frame> fr = frames_of(pc);
    if (fr.empty()) {
        Dl_info info;
        if (dladdr(reinterpret_cast<void*>(pc), &info) != 0 && info.dli_fname != nullptr)
            return textf("%s+0x%" PRIxPTR " (no line information: addr2line -f -i -C -e %s 0x%" PRIxPTR ")",
                         base_name(info.dli_fname), pc - 1 - reinterpret_cast<uintptr_t>(info.dli_fbase),
                         info.dli_fname, pc - 1 - reinterpret_cast<uintptr_t>(info.dli_fbase))
                .c_str();
        return textf("pc 0x%" PRIxPTR, pc).c_str();
    }
    size_t k = 0;
    while (k + 1 < fr.size() && is_header(fr[k].file)) ++k;
    std::string s;
    appendf(s, "%s:%d", base_name(fr[k].file.c_str()), fr[k].line);
    size_t j = k;
    auto lambda = [](const std::string& f) {
        return f.find("{lambda") != std::string::npos || f == "operator()";  // (inlined: DWARF's short name)
    };
    while (lambda(fr[j].func) && j + 1 < fr.size() && fr[j + 1].file == fr[k].file) {
        ++j;
        appendf(s, " <- :%d", fr[j].line);
    }
    if (!fr[j].func.empty()) s += " in " + fr[j].func;
    if (k > 0) appendf(s, " (via %s:%d)", base_name(fr[k - 1].file.c_str()), fr[k - 1].line);
    return s;
}

// Replaces every {pc:HEX} token of s by symbolize(pc).
std::string expand_pcs(const std::string& s) {
    std::string out;
    size_t i = 0;
    while (true) {
        const size_t at = s.find("{pc:", i);
        if (at == std::string::npos) break;
        const size_t end = s.find('}', at);
        if (end == std::string::npos) break;
        out.append(s, i, at - i);
        out += symbolize(static_cast<uintptr_t>(std::strtoull(s.c_str() + at + 4, nullptr, 16)));
        i = end + 1;
    }
    out.append(s, i, std::string::npos);
    return out;
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
// Racecheck glue: the running block's clocks, its shadow regions, the hooks' entry, reports.
// ---------------------------------------------------------------------------------------------
#if EMU_RACECHECK
// The anchor makes sure the section of the static __shared__ arrays exists.
__attribute__((section("pa_emu_shared"), used, aligned(16))) unsigned char g_shared_anchor[16];

struct RcState {
    uint32_t counter = 0;  // barrier intervals handed out (grows over launches)
    uint32_t base = 0;     // the running block's first interval
    uint32_t bar = 0;      // its current interval
    uintptr_t dyn_lo = 0;  // the block's dynamic shared memory
    size_t dyn_len = 0;
    std::vector<rc::Cell> dyn;
    uintptr_t sec_lo = 0;  // the static __shared__ section
    size_t sec_len = 0;
    std::vector<rc::Cell> sec;
    uintptr_t skip_lo[2] = {};  // not shadowed: the fiber stacks, the launching thread's stack
    size_t skip_len[2] = {};
    rc::GlobalShadow global;
    rc::Hazards hazards;
};
RcState g_rc;
// True on the launching OS thread while one of its blocks runs: only then do the hooks look at
// an access (other OS threads run instrumented code outside launches at the same time).
thread_local bool t_rc_active = false;

rc::Acc rc_now(const Launch& L, unsigned t, uintptr_t pc, rc::What what) {
    rc::Acc a;
    a.pc = pc;
    a.bar = g_rc.bar;
    a.wgen = 2 * L.warps[t / 32].completed;
    a.tid = static_cast<uint16_t>(t);
    a.what = what;
    return a;
}

void rc_block_start(Launch& L) {
    if (g_rc.counter >= 0xfffff000u) {  // the clock wraps: forget everything
        std::fill(g_rc.dyn.begin(), g_rc.dyn.end(), rc::Cell{});
        std::fill(g_rc.sec.begin(), g_rc.sec.end(), rc::Cell{});
        g_rc.counter = 0;
    }
    g_rc.base = g_rc.bar = ++g_rc.counter;
    g_rc.dyn_lo = reinterpret_cast<uintptr_t>(L.smem);
    g_rc.dyn_len = L.smem_bytes;
    if (g_rc.dyn.size() < g_rc.dyn_len) g_rc.dyn.resize(g_rc.dyn_len);
    if (+__start_pa_emu_shared != nullptr && +__stop_pa_emu_shared > +__start_pa_emu_shared) {
        g_rc.sec_lo = reinterpret_cast<uintptr_t>(__start_pa_emu_shared);
        g_rc.sec_len = static_cast<size_t>(__stop_pa_emu_shared - __start_pa_emu_shared);
        if (g_rc.sec.size() < g_rc.sec_len) g_rc.sec.resize(g_rc.sec_len);
        std::memset(__start_pa_emu_shared, 0xff, g_rc.sec_len);  // poisoned like the dynamic memory
    }
    g_rc.skip_lo[0] = reinterpret_cast<uintptr_t>(L.stacks);
    g_rc.skip_len[0] = L.stacks_bytes;
    g_rc.global.new_block();
    t_rc_active = true;
}

// Checks one access of n bytes at a against the shadow and records it; c is the access.
void rc_check(Launch& L, uintptr_t a, size_t n, bool write, const rc::Acc& c) {
    rc::Region region = rc::Region::Global;
    rc::Cell* cells = nullptr;
    uintptr_t lo = 0;
    if (a - g_rc.dyn_lo < g_rc.dyn_len) {
        region = rc::Region::Dynamic;
        lo = g_rc.dyn_lo;
        cells = g_rc.dyn.data() + (a - lo);
        n = std::min(n, g_rc.dyn_len - (a - lo));
    } else if (a - g_rc.sec_lo < g_rc.sec_len) {
        region = rc::Region::Static;
        lo = g_rc.sec_lo;
        cells = g_rc.sec.data() + (a - lo);
        n = std::min(n, g_rc.sec_len - (a - lo));
    } else {
        for (int i = 0; i < 2; ++i)
            if (a - g_rc.skip_lo[i] < g_rc.skip_len[i]) return;
    }
    rc::Found f;
    for (size_t i = 0; i < n; ++i) {
        rc::Cell& x = cells != nullptr ? cells[i] : g_rc.global.at(a + i);
        if (write)
            rc::on_write(x, c, g_rc.base, i, f);
        else
            rc::on_read(x, c, g_rc.base, region != rc::Region::Global, i, f);
    }
    if (!f.any) return;
    for (int k = 0; k < rc::kKinds; ++k) {
        if (!f.seen[k]) continue;
        rc::Hazard h;
        h.kind = static_cast<rc::Kind>(k);
        h.region = region;
        h.addr = a + f.at[k];
        h.offset = a + f.at[k] - lo;
        h.prev = f.prev[k];
        h.cur = c;
        h.block[0] = blockIdx.x;
        h.block[1] = blockIdx.y;
        h.block[2] = blockIdx.z;
        h.count = 1;
        g_rc.hazards.add(h);
        ++L.stats.hazards;
    }
}

// One of this thread's copies completes at its cp.async.wait_group.
void rc_complete(Launch& L, const PendingCopy& cp) {
    const auto d = reinterpret_cast<uintptr_t>(cp.dst);
    rc::Cell* cells = nullptr;
    if (d - g_rc.dyn_lo < g_rc.dyn_len)
        cells = g_rc.dyn.data() + (d - g_rc.dyn_lo);
    else if (d - g_rc.sec_lo < g_rc.sec_len)
        cells = g_rc.sec.data() + (d - g_rc.sec_lo);
    const rc::Acc c = rc_now(L, L.cur, cp.pc, rc::What::CpAsyncDone);
    for (uintptr_t i = 0; i < 16; ++i) {
        rc::Cell& x = cells != nullptr ? cells[i] : g_rc.global.at(d + i);
        if (x.w.inflight && x.w.tid == c.tid) rc::on_complete(x, c);
    }
}

const char* rc_verb(rc::What w) {
    switch (w) {
        case rc::What::Load: return "load";
        case rc::What::Store: return "store";
        case rc::What::Ldmatrix: return "ldmatrix read";
        case rc::What::CpAsync: return "cp.async";
        case rc::What::CpAsyncDone: return "cp.async completed by the cp.async.wait_group";
    }
    return "?";
}

const char* rc_kind_name(rc::Kind k) {
    switch (k) {
        case rc::Kind::ReadAfterWrite: return "read-after-write hazard";
        case rc::Kind::WriteAfterRead: return "write-after-read hazard";
        case rc::Kind::WriteAfterWrite: return "write-after-write hazard";
        case rc::Kind::Uninitialized: return "uninitialized shared-memory read (initcheck)";
        case rc::Kind::InflightRead: return "read of a cp.async destination in flight";
        case rc::Kind::InflightWrite: return "write to a cp.async destination in flight";
        case rc::Kind::OwnInflightRead: return "read of the thread's own cp.async destination in flight";
    }
    return "?";
}

// The launch's racecheck report (pc tokens unexpanded).
std::string rc_report(const Launch& L) {
    const rc::Hazards& hz = g_rc.hazards;
    std::string s;
    appendf(s, "racecheck: %" PRIu64 " hazard%s (%zu distinct pair%s of source lines) in %s:", hz.total,
            hz.total == 1 ? "" : "s", hz.list.size(), hz.list.size() == 1 ? "" : "s", block_name(L).c_str());
    constexpr size_t kShown = 8;
    for (size_t i = 0; i < hz.list.size() && i < kShown; ++i) {
        const rc::Hazard& h = hz.list[i];
        std::string where;
        if (h.region == rc::Region::Dynamic)
            appendf(where, "dynamic shared memory, byte %zu of %zu", h.offset, g_rc.dyn_len);
        else if (h.region == rc::Region::Static)
            appendf(where, "a static __shared__ array, %s%s%p", data_symbol(h.addr).c_str(),
                    data_symbol(h.addr).empty() ? "" : " at ", reinterpret_cast<void*>(h.addr));
        else
            appendf(where, "global memory at %p", reinterpret_cast<void*>(h.addr));
        appendf(s, "\n  [%zu] %s on %s (%" PRIu64 " time%s):", i + 1, rc_kind_name(h.kind), where.c_str(), h.count,
                h.count == 1 ? "" : "s");
        appendf(s, "\n      %s by %s at %s", rc_verb(h.cur.what), thread_name(L, h.cur.tid).c_str(),
                pc_token(h.cur.pc).c_str());
        const bool same_warp = (h.prev.tid >> 5) == (h.cur.tid >> 5);
        switch (h.kind) {
            case rc::Kind::Uninitialized:
                s += "\n      no thread of the block has written it since the block started (shared memory "
                     "starts as 0xFF bytes)";
                break;
            case rc::Kind::InflightRead:
            case rc::Kind::InflightWrite:
            case rc::Kind::OwnInflightRead:
                appendf(s, "\n      while the cp.async of %s issued at %s may still be copying into it",
                        thread_name(L, h.prev.tid).c_str(), pc_token(h.prev.pc).c_str());
                s += h.kind == rc::Kind::OwnInflightRead
                         ? "\n      (no cp.async.wait_group completed that copy before the read)"
                         : "\n      (a copy is complete for its own thread after its cp.async.wait_group, and for the "
                           "others after a __syncthreads() that follows that wait)";
                break;
            default:
                appendf(s, "\n      and the %s by %s at %s", rc_verb(h.prev.what), thread_name(L, h.prev.tid).c_str(),
                        pc_token(h.prev.pc).c_str());
                s += same_warp ? "\n      nothing orders them: the same warp, but no __syncthreads() and no warp "
                                 "collective (__syncwarp, shuffle, vote, mma, ldmatrix) between them"
                               : "\n      nothing orders them: different warps and no __syncthreads() between them";
                break;
        }
    }
    if (hz.list.size() > kShown) appendf(s, "\n  ... and %zu more distinct pairs", hz.list.size() - kShown);
    return s;
}
#endif

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
            appendf(s, "at %s %s, called at %s (warp %u: %u of its %u live lanes arrived)", kind_name(ph.kind),
                    loc_str(th.loc).c_str(), pc_token(th.pc).c_str(), t / 32, ph.arrived, w.alive);
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
#if EMU_RACECHECK
    g_rc.bar = ++g_rc.counter;  // a new barrier interval: everything before is ordered before it
#endif
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

// Joins the running lane to its warp's next collective; returns its slot for the inputs. pc: the
// lane's call site in the kernel.
Slot& begin_collective(Launch& L, WKind kind, unsigned mask, int param, const std::source_location& loc,
                       uintptr_t pc) {
    Thread& me = L.th[L.cur];
    Warp& w = L.warps[L.cur / 32];
    const unsigned lane = lane_of(L.cur);
    if ((w.alive_mask & ~mask) != 0)
        fail_launch(L, "%s at %s, called at %s, with mask 0x%08x, but the warp's live lanes are 0x%08x (the "
                    "emulator requires every live lane of the warp in the mask)",
                    kind_name(kind), loc_str(loc).c_str(), pc_token(pc).c_str(), mask, w.alive_mask);
    const uint32_t exited = w.exist_mask & ~w.alive_mask;
    if ((mask & exited) != 0)
        fail_launch(L, "synccheck: %s, called at %s, names lanes %s in its mask, which have exited: every lane "
                    "of the mask must execute the warp collective",
                    call_str(kind, mask, param, loc).c_str(), pc_token(pc).c_str(), lanes_str(mask & exited).c_str());
    WarpPhase& ph = w.ph[me.phase];
    if (ph.arrived == 0) {
        ph.kind = kind;
        ph.loc = loc;
        ph.mask = mask;
        ph.param = param;
        ph.pc = pc;
    } else if (ph.kind != kind || (kind != WKind::Syncwarp && !same_loc(ph.loc, loc)) ||
               ph.mask != mask || ph.param != param) {
        fail_launch(L, "divergent warp collective: this lane calls %s (called at %s) while lanes %s of its warp "
                    "wait at %s (called at %s; every live lane must execute the same warp collective)",
                    call_str(kind, mask, param, loc).c_str(), pc_token(pc).c_str(), lanes_str(ph.arrived_mask).c_str(),
                    call_str(ph.kind, ph.mask, ph.param, ph.loc).c_str(), pc_token(ph.pc).c_str());
    }
    me.loc = loc;
    me.pc = pc;
    ph.slot[lane].pc = pc;
    return ph.slot[lane];
}

void compute_collective(Launch& L, Warp& w, WarpPhase& ph);


// Completes the collective for all lanes (run by the lane that arrives last, or by the lane
// whose exit leaves only arrived lanes): computes every lane's outputs and makes them ready.
void release_warp(Launch& L, Warp& w, unsigned p) {
    WarpPhase& ph = w.ph[p];
    compute_collective(L, w, ph);
    ++w.completed;  // racecheck's warp clock: everything before is ordered before what follows
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
#if EMU_RACECHECK
    // The rows are read inside the collective: after everything the warp's lanes did before it,
    // before everything they do after it (an odd warp clock), each by the lane that gave it.
    if (t_rc_active) {
        for (int l = 0; l < 8 * num; ++l) {
            const uintptr_t a = reinterpret_cast<uintptr_t>(ph.slot[l].ptr);
            rc::Acc c = rc_now(L, base + static_cast<unsigned>(l), ph.slot[l].pc, rc::What::Ldmatrix);
            c.wgen += 1;
            rc_check(L, a, 16, false, c);
        }
    }
#endif
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
    // Synccheck: the lanes waiting at a collective whose mask names this lane would wait forever
    // on a GPU (or read garbage), and copies still in flight could land in the next block's
    // shared memory.
    for (const WarpPhase& ph : w.ph)
        if (ph.arrived != 0 && (ph.mask >> lane_of(L.cur) & 1u))
            fail_launch(L, "synccheck: the thread exits while lanes %s of its warp wait at %s (called at %s), whose "
                        "mask names it: every lane of the mask must execute the warp collective",
                        lanes_str(ph.arrived_mask).c_str(), call_str(ph.kind, ph.mask, ph.param, ph.loc).c_str(),
                        pc_token(ph.pc).c_str());
    if (!me.copies.empty()) {
        const PendingCopy& c = me.copies.front();
        const bool committed = me.copies.back().group < me.open_group;
        fail_launch(L, "synccheck: the thread exits with %zu cp.async cop%s pending (%s), the first issued at %s: "
                    "a thread must complete its copies with cp.async.wait_group before it exits",
                    me.copies.size(), me.copies.size() == 1 ? "y" : "ies",
                    committed ? "committed, never waited for" : "some never committed",
                    pc_token(c.pc).c_str());
    }
    L.st[L.cur] = St::Exited;
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
        wp.exist_mask = wp.alive_mask;
        for (WarpPhase& ph : wp.ph) {
            ph.arrived = 0;
            ph.arrived_mask = 0;
        }
    }
    L.live = L.n;
    L.ready = L.n;
    L.bar_arrived = 0;
#if EMU_RACECHECK
    rc_block_start(L);
#endif
}

// Synccheck's reading of a deadlock: each warp collective that some lanes of its mask wait at
// while the others are elsewhere (at the block barrier, or at the warp's other collective).
std::string partial_collectives(const Launch& L) {
    std::string s;
    for (size_t wi = 0; wi < L.warps.size(); ++wi) {
        const Warp& w = L.warps[wi];
        for (const WarpPhase& ph : w.ph) {
            if (ph.arrived == 0) continue;
            const uint32_t missing = ph.mask & w.alive_mask & ~ph.arrived_mask;
            appendf(s, "\n  synccheck: warp %zu: %s (called at %s) is reached by lanes %s of its mask only; lanes %s "
                    "never reach it", wi, call_str(ph.kind, ph.mask, ph.param, ph.loc).c_str(),
                    pc_token(ph.pc).c_str(), lanes_str(ph.arrived_mask).c_str(), lanes_str(missing).c_str());
        }
    }
    return s;
}

// Runs the current block to completion (or failure). Returns false on failure.
bool run_block(Launch& L) {
    init_block(L);
    L.in_block = true;
    const unsigned first = L.reverse ? L.n - 1 : 0;
    resume(L, L.sched, first, false);
    L.in_block = false;
#if EMU_RACECHECK
    t_rc_active = false;
    if (L.failed && g_rc.hazards.total != 0) L.err += "\n" + rc_report(L);
#endif
    if (L.failed) return false;
    if (L.live != 0) {
        std::string m = block_name(L) + ": deadlock: no thread can make progress (" +
                        std::to_string(L.bar_arrived) + " of " + std::to_string(L.live) +
                        " live threads wait at the block barrier; a __syncthreads() or warp collective is "
                        "not reached by every thread that has not exited):" +
                        partial_collectives(L) + thread_states(L);
        L.err = std::move(m);
        L.failed = true;
        return false;
    }
#if EMU_RACECHECK
    if (g_rc.hazards.total != 0) {  // the block ran to its end; report what it found and stop
        L.err = rc_report(L);
        L.failed = true;
        return false;
    }
#endif
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

// "file:line" -> (file, line); false when it is not of that form.
bool parse_site(const char* site, std::string& file, unsigned& line) {
    if (site == nullptr) return false;
    const char* colon = std::strrchr(site, ':');
    if (colon == nullptr || colon == site) return false;
    char* end = nullptr;
    const unsigned long v = std::strtoul(colon + 1, &end, 10);
    if (end == colon + 1 || *end != '\0' || v == 0 || v > 0xffffffu) return false;
    file.assign(site, static_cast<size_t>(colon - site));
    line = static_cast<unsigned>(v);
    return true;
}

// The calling OS thread's set_drop_sync (or PREFIX_ATTN_EMU_DROP_SYNC) for a launch.
void drop_sync_of_thread(Launch& L) {
    if (t_drop_state < 0) {
        t_drop_state = parse_site(std::getenv("PREFIX_ATTN_EMU_DROP_SYNC"), t_drop_file, t_drop_line) ? 1 : 0;
    }
    if (t_drop_state == 1) {
        L.drop_file = t_drop_file;
        L.drop_line = t_drop_line;
    }
}

// set_drop_sync: this synchronisation is skipped (counted).
inline bool drop_here(Launch& L, const std::source_location& loc) {
    if (L.drop_line == 0 || loc.line() != L.drop_line) return false;
    if (std::strcmp(base_name(loc.file_name()), L.drop_file.c_str()) != 0) return false;
    ++L.stats.dropped_syncs;
    return true;
}

#if EMU_RACECHECK
void rc_launch_start() {
    g_rc.hazards.clear();
    // Kernels reach their arguments through the launching thread's stack (the launch wrapper's
    // copy of the parameter struct): private to the launch, not device memory.
    pthread_attr_t attr;
    void* lo = nullptr;
    size_t len = 0;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
        if (pthread_attr_getstack(&attr, &lo, &len) != 0) len = 0;
        pthread_attr_destroy(&attr);
    }
    g_rc.skip_lo[1] = reinterpret_cast<uintptr_t>(lo);
    g_rc.skip_len[1] = len;
}
#endif

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
    drop_sync_of_thread(L);
#if EMU_RACECHECK
    rc_launch_start();
#endif
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
    t_dropped_total += L.stats.dropped_syncs;
    t_in_launch = false;
    if (ok) return 0;
    copy_err(setup_err.empty() ? std::string("emulated launch failed") : expand_pcs(setup_err), err, err_len);
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

void set_drop_sync(const char* file, unsigned line) {
    t_drop_state = file != nullptr && *file != '\0' && line != 0 ? 1 : 0;
    t_drop_file = t_drop_state == 1 ? file : "";
    t_drop_line = t_drop_state == 1 ? line : 0;
    t_dropped_total = 0;
}
extern "C" void pa_emu_set_drop_sync(const char* site) {
    std::string file;
    unsigned line = 0;
    if (parse_site(site, file, line))
        set_drop_sync(file.c_str(), line);
    else
        set_drop_sync(nullptr, 0);
}
extern "C" uint64_t pa_emu_dropped_syncs() { return t_dropped_total; }
extern "C" int pa_emu_racecheck_enabled() { return EMU_RACECHECK; }

// The caller's return address: the kernel's call site of an entry point below (the wrappers in
// kernels/common are inline).
#define EMU_CALLER reinterpret_cast<uintptr_t>(__builtin_return_address(0))

void* dynamic_smem() { return running("emu::dynamic_smem").smem; }
size_t dynamic_smem_size() { return running("emu::dynamic_smem_size").smem_bytes; }

void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4], Elem e,
                  std::source_location loc) {
    Launch& L = running("mma_m16n8k16");
    Slot& in = begin_collective(L, WKind::Mma, 0xffffffffu, static_cast<int>(e), loc, EMU_CALLER);
    std::memcpy(in.a, a, sizeof in.a);
    std::memcpy(in.b, b, sizeof in.b);
    std::memcpy(in.c, c, sizeof in.c);  // copied before d is written: d may alias c
    const Slot& out = finish_collective(L);
    for (int i = 0; i < 4; ++i) d[i] = std::bit_cast<float>(out.out[i]);
}

void ldmatrix(uint32_t* r, int num, bool trans, const void* row_addr, std::source_location loc) {
    Launch& L = running("ldmatrix");
    if (num != 1 && num != 2 && num != 4) fail_launch(L, "ldmatrix with %d matrices (must be 1, 2 or 4)", num);
    Slot& in = begin_collective(L, WKind::Ldmatrix, 0xffffffffu, num | (trans ? 1 << 8 : 0), loc, EMU_CALLER);
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
    const uintptr_t pc = EMU_CALLER;
#if EMU_RACECHECK
    if (t_rc_active) {
        const auto d = reinterpret_cast<uintptr_t>(smem_dst);
        rc::Acc c = rc_now(L, L.cur, pc, rc::What::CpAsync);
        if (valid) rc_check(L, reinterpret_cast<uintptr_t>(gmem_src), 16, false, c);  // the source, read now
        c.inflight = 1;  // the destination: written from now until the wait that completes the copy
        rc_check(L, d, 16, true, c);
    }
#endif
    std::memset(dst, 0xff, 16);  // poison: reading before the wait sees NaN
    me.copies.push_back(PendingCopy{dst, static_cast<const unsigned char*>(gmem_src), valid, me.open_group, pc});
}

void cp_async_commit() {
    Launch& L = running("cp_async_commit");
    ++L.th[L.cur].open_group;
}

void cp_async_wait(int n, std::source_location loc) {
    Launch& L = running("cp_async_wait");
    if (n < 0) fail_launch(L, "cp.async.wait_group %d", n);
    if (drop_here(L, loc)) return;
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
#if EMU_RACECHECK
            if (t_rc_active) rc_complete(L, c);
#endif
        } else {
            me.copies[keep++] = c;
        }
    }
    me.copies.resize(keep);
}

namespace detail {

void syncthreads(const std::source_location& loc) {
    Launch& L = running("__syncthreads");
    if (drop_here(L, loc)) return;
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
    if (drop_here(L, loc)) return;
    begin_collective(L, WKind::Syncwarp, mask, 0, loc, EMU_CALLER);
    finish_collective(L);
}

uint64_t shfl(unsigned mask, uint64_t bits, int lane_arg, int width, Shfl mode, const std::source_location& loc) {
    Launch& L = running("__shfl_sync");
    static constexpr WKind kinds[] = {WKind::ShflIdx, WKind::ShflUp, WKind::ShflDown, WKind::ShflXor};
    const WKind kind = kinds[static_cast<int>(mode)];
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
        fail_launch(L, "%s at %s with width %d (must be a power of two <= 32)", kind_name(kind),
                    loc_str(loc).c_str(), width);
    Slot& in = begin_collective(L, kind, mask, width, loc, EMU_CALLER);
    in.val = bits;
    in.arg = lane_arg;
    return finish_collective(L).out_val;
}

uint32_t ballot(unsigned mask, bool pred, const std::source_location& loc) {
    Launch& L = running("__ballot_sync");
    Slot& in = begin_collective(L, WKind::Ballot, mask, 0, loc, EMU_CALLER);
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

// =============================================================================================
// Racecheck: the hooks of gcc's -fsanitize=thread instrumentation. The kernels (and the
// self-tests) are compiled with it; this file is not. Every load and store of instrumented code
// calls one of these with its address; they look at it only while a block runs on this OS
// thread, and pass it to the shadow memory with the access's return address (the kernel's
// line). ThreadSanitizer's own runtime is not linked: these are the whole runtime.
// =============================================================================================
#if EMU_RACECHECK
namespace emu {
namespace {
inline void rc_hook(const void* a, size_t n, bool write, uintptr_t pc) {
    if (!t_rc_active) return;
    Launch& L = *g_launch;
    rc_check(L, reinterpret_cast<uintptr_t>(a), n, write,
             rc_now(L, L.cur, pc, write ? rc::What::Store : rc::What::Load));
}
}  // namespace
}  // namespace emu

extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_read(void**) {}
void __tsan_vptr_update(void**, void*) {}

#define EMU_RC_HOOKS(n)                                                                   \
    void __tsan_read##n(void* a) { emu::rc_hook(a, n, false, EMU_CALLER); }               \
    void __tsan_write##n(void* a) { emu::rc_hook(a, n, true, EMU_CALLER); }               \
    void __tsan_volatile_read##n(void* a) { emu::rc_hook(a, n, false, EMU_CALLER); }      \
    void __tsan_volatile_write##n(void* a) { emu::rc_hook(a, n, true, EMU_CALLER); }
EMU_RC_HOOKS(1)
EMU_RC_HOOKS(2)
EMU_RC_HOOKS(4)
EMU_RC_HOOKS(8)
EMU_RC_HOOKS(16)
#define EMU_RC_UNALIGNED_HOOKS(n)                                                         \
    void __tsan_unaligned_read##n(void* a) { emu::rc_hook(a, n, false, EMU_CALLER); }     \
    void __tsan_unaligned_write##n(void* a) { emu::rc_hook(a, n, true, EMU_CALLER); }     \
    void __tsan_unaligned_volatile_read##n(void* a) { emu::rc_hook(a, n, false, EMU_CALLER); } \
    void __tsan_unaligned_volatile_write##n(void* a) { emu::rc_hook(a, n, true, EMU_CALLER); }
EMU_RC_UNALIGNED_HOOKS(2)
EMU_RC_UNALIGNED_HOOKS(4)
EMU_RC_UNALIGNED_HOOKS(8)
EMU_RC_UNALIGNED_HOOKS(16)
void __tsan_read_range(void* a, unsigned long n) { emu::rc_hook(a, n, false, EMU_CALLER); }
void __tsan_write_range(void* a, unsigned long n) { emu::rc_hook(a, n, true, EMU_CALLER); }

// Atomic operations of instrumented code (std::atomic, static-initialisation guards): performed
// as sequentially consistent atomics (never weaker than asked), invisible to the shadow.
#define EMU_RC_ATOMICS(bits, T)                                                                              \
    T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
    void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {                                              \
        return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                  \
    }                                                                                                        \
    T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }   \
    T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##bits##_fetch_nand(volatile T* a, T v, int) {                                            \
        return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                                  \
    }                                                                                                        \
    int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                  \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);              \
    }                                                                                                        \
    int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                    \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);               \
    }                                                                                                        \
    T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                        \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                    \
        return c;                                                                                            \
    }
EMU_RC_ATOMICS(8, unsigned char)
EMU_RC_ATOMICS(16, unsigned short)
EMU_RC_ATOMICS(32, unsigned int)
EMU_RC_ATOMICS(64, unsigned long long)
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
}  // extern "C"
#endif

// Racecheck's shadow memory (internal to emu.cpp; DESIGN.md §10, README "Racecheck").
//
// What orders two accesses of a block on a GPU, and nothing else, orders them here:
//   * program order within a thread;
//   * a block barrier: every access before a released __syncthreads() happens before every
//     access after it (the block's barrier interval, `bar`, counts released barriers);
//   * a warp collective (__syncwarp, shuffles, vote, mma, ldmatrix): within its warp, every
//     access before it happens before every access after it (`wgen` counts the warp's completed
//     collectives twice, so that what a collective itself reads, ldmatrix's rows, sits between:
//     after everything its lanes did before it and before everything they do after it).
// Every collective takes all live lanes of the warp (emu.h), so one counter per warp and one per
// block describe every thread's position, and "a happens before b" is a constant-time test.
//
// Per byte of shared memory the shadow keeps the last write and up to two reads since (from two
// warps when there are two). That finds every read-after-write and write-after-write hazard,
// and a write-after-read hazard whenever one of the remembered reads is unordered with the
// write; two reads from different warps always leave one unordered with a write from any warp.
// (A read can be forgotten only when three or more threads of one warp read a byte in the same
// interval and a lane of that warp then writes it without a collective in between.)
// Reports are never false: every one names two real accesses that nothing orders.
//
// cp.async: the destination counts as written from the issue (an access of the issuing thread
// then) until the cp.async.wait_group that completes it (`inflight`); any access to it in
// between, by any thread, is a hazard, because the copy may land at any moment in between.
// Initcheck: a shared-memory byte no thread of the block has written since the block started
// is uninitialised; reading it is a hazard. Global memory is shadowed per block (a block's own
// threads, barrier intervals and warps order its accesses exactly as for shared memory; blocks
// are not compared with one another) and has no initcheck.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace emu::rc {

enum class What : uint8_t { Load, Store, Ldmatrix, CpAsync, CpAsyncDone };

// One access as the shadow remembers it.
struct Acc {
    uintptr_t pc = 0;   // the instrumented instruction (a return address into the kernel)
    uint32_t bar = 0;   // barrier interval; 0: no access
    uint32_t wgen = 0;  // 2 x the warp's completed collectives (+1: inside a collective)
    uint16_t tid = 0;   // linear thread index in the block
    What what = What::Load;
    uint8_t inflight = 0;  // a cp.async destination between issue and completion
};

struct Cell {
    Acc w;      // the last write (or cp.async)
    Acc r[2];   // reads since that write
};

// a happened before b (b is the access being made now, so a is not later than b).
inline bool ordered(const Acc& a, const Acc& b) {
    return a.tid == b.tid || a.bar < b.bar || ((a.tid >> 5) == (b.tid >> 5) && a.wgen < b.wgen);
}

enum class Kind : uint8_t {
    ReadAfterWrite,
    WriteAfterRead,
    WriteAfterWrite,
    Uninitialized,     // initcheck
    InflightRead,      // another thread reads a cp.async destination in flight
    InflightWrite,     // a write (or another cp.async) to a cp.async destination in flight
    OwnInflightRead,   // the issuing thread reads it before its cp.async.wait_group
};
constexpr int kKinds = 7;

enum class Region : uint8_t { Dynamic, Static, Global };

struct Hazard {
    Kind kind;
    Region region;
    uintptr_t addr;   // first byte of the access that found it
    size_t offset;    // into its shared-memory region (unused for global memory)
    Acc prev;         // the earlier access (unused for Uninitialized)
    Acc cur;          // the access that found it
    unsigned block[3];
    uint64_t count;   // accesses that found this same pair of source lines
};

// The hazards of a launch: distinct (kind, earlier line, later line) pairs, with counts.
struct Hazards {
    static constexpr size_t kMaxDistinct = 64;
    std::vector<Hazard> list;
    uint64_t total = 0;
    void add(const Hazard& h) {
        ++total;
        for (Hazard& x : list)
            if (x.kind == h.kind && x.prev.pc == h.prev.pc && x.cur.pc == h.cur.pc) {
                ++x.count;
                return;
            }
        if (list.size() < kMaxDistinct) list.push_back(h);
    }
    void clear() {
        list.clear();
        total = 0;
    }
};

// The accesses one instrumented access collides with, at most one per kind (a 16-byte access
// reports once, not once per byte).
struct Found {
    bool any = false;
    bool seen[kKinds] = {};
    Acc prev[kKinds];
    size_t at[kKinds] = {};  // byte index within the access
    void note(Kind k, const Acc& p, size_t i) {
        const int n = static_cast<int>(k);
        if (seen[n]) return;
        seen[n] = true;
        prev[n] = p;
        at[n] = i;
        any = true;
    }
};

// Remembers a read: the reads of the current interval only (earlier ones are ordered before
// anything that comes now), one per thread, and two warps whenever two have read.
inline void add_reader(Cell& x, const Acc& c) {
    for (Acc& r : x.r)
        if (r.bar != 0 && r.bar < c.bar) r.bar = 0;
    Acc& r0 = x.r[0];
    Acc& r1 = x.r[1];
    if (r0.bar == 0 || r0.tid == c.tid) {
        r0 = c;
        return;
    }
    if (r1.bar == 0 || r1.tid == c.tid) {
        r1 = c;
        return;
    }
    const unsigned w0 = r0.tid >> 5, w1 = r1.tid >> 5, wc = c.tid >> 5;
    if (w0 == w1 && wc != w0)
        r1 = c;  // keep two warps
    else if (wc == w0)
        r0 = c;  // the later read of a warp is unordered with more of its lanes' writes
    else if (wc == w1)
        r1 = c;
    // else a third warp: either remembered read is unordered with a write from any warp
}

// One byte is read (valid: entries of this block have bar >= base).
inline void on_read(Cell& x, const Acc& c, uint32_t base, bool initcheck, size_t i, Found& f) {
    if (x.w.bar < base) {
        if (initcheck) f.note(Kind::Uninitialized, Acc{}, i);
        x.w.bar = 0;
    } else if (x.w.inflight) {
        f.note(x.w.tid == c.tid ? Kind::OwnInflightRead : Kind::InflightRead, x.w, i);
    } else if (!ordered(x.w, c)) {
        f.note(Kind::ReadAfterWrite, x.w, i);
    }
    for (Acc& r : x.r)
        if (r.bar < base) r.bar = 0;
    add_reader(x, c);
}

// One byte is written (a plain store, or a cp.async issue: then c.inflight is set).
inline void on_write(Cell& x, const Acc& c, uint32_t base, size_t i, Found& f) {
    if (x.w.bar >= base) {
        if (x.w.inflight)
            f.note(Kind::InflightWrite, x.w, i);
        else if (!ordered(x.w, c))
            f.note(Kind::WriteAfterWrite, x.w, i);
    }
    for (const Acc& r : x.r)
        if (r.bar >= base && !ordered(r, c)) f.note(Kind::WriteAfterRead, r, i);
    x.w = c;
    x.r[0].bar = x.r[1].bar = 0;
}

// The cp.async that wrote this byte completes (the issuing thread's cp.async.wait_group): from
// now on it is an ordinary write of that thread, at the wait.
inline void on_complete(Cell& x, const Acc& c) {
    x.w = c;
    x.r[0].bar = x.r[1].bar = 0;
}

// Shadow of global memory for one block: open addressing on the byte address, emptied in O(1)
// at every block by a stamp.
class GlobalShadow {
public:
    Cell& at(uintptr_t a) {
        if (2 * (used_ + 1) > tab_.size()) grow();
        size_t i = hash(a) & (tab_.size() - 1);
        while (true) {
            Entry& e = tab_[i];
            if (e.stamp != stamp_) {
                e.stamp = stamp_;
                e.addr = a;
                e.cell = Cell{};
                ++used_;
                return e.cell;
            }
            if (e.addr == a) return e.cell;
            i = (i + 1) & (tab_.size() - 1);
        }
    }
    void new_block() {
        used_ = 0;
        if (++stamp_ == 0) {
            for (Entry& e : tab_) e.stamp = 0;
            stamp_ = 1;
        }
    }

private:
    struct Entry {
        uintptr_t addr = 0;
        uint32_t stamp = 0;
        Cell cell;
    };
    static size_t hash(uintptr_t a) {  // murmur3's finaliser: neighbouring bytes spread out
        uint64_t x = a;
        x ^= x >> 33;
        x *= 0xff51afd7ed558ccdull;
        x ^= x >> 33;
        return static_cast<size_t>(x);
    }
    void grow() {
        std::vector<Entry> old;
        old.swap(tab_);
        tab_.assign(old.empty() ? size_t{1} << 14 : old.size() * 2, Entry{});
        const uint32_t s = stamp_;
        used_ = 0;
        for (const Entry& e : old)
            if (e.stamp == s) at(e.addr) = e.cell;
    }
    std::vector<Entry> tab_;
    size_t used_ = 0;
    uint32_t stamp_ = 1;
};

}  // namespace emu::rc

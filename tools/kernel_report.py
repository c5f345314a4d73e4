#!/usr/bin/env python3
"""Static report of the CUDA kernels in the crate's fatbins (no GPU needed).

Per kernel and architecture (sm_80, sm_90): registers, spills, static + dynamic shared
memory, threads per block, blocks per SM by the CUDA occupancy rule, and the SASS
instruction mix of the kernel's hot loop (one key tile of the attention kernels) and of the
whole kernel. `scripts/kernel-report.sh` installs the tools, builds the crate and calls this;
README.md ("Kernel report") explains the columns.

Sources, one per number:
  registers, static shared memory, local memory   `cuobjdump -res-usage` (the cubins)
  spill stores / loads                            ptxas -v of the build (the cargo build
                                                  script's `output` file beside OUT_DIR)
  launch bounds (max threads)                     `cuobjdump -elf`: EIATTR_MAX_THREADS
  threads per block, dynamic shared memory        `prefix-attn kernels --json`: the Rust
                                                  planners' own launch plans
  SASS                                            `nvdisasm -g` of each extracted cubin

The hot loop (method): every backward branch (a BRA whose target is at or below its own
address, a branch to itself excluded: ptxas ends each kernel with one) closes a loop
[target, branch]. In a kernel with tensor-core instructions the hot loop is the loop holding
the most HMMA; among loops holding that many, the shortest one (the innermost that encloses
them all). In a kernel without HMMA it is chosen the same way by global memory instructions
(LDG, STG, LDGSTS, ATOM/RED). Counts are static: an instruction inside the loop is counted
once, also when a branch in the body skips it on some iterations (e.g. the forward's Q
fragments, loaded on the first key tile only). Whole-kernel totals are reported beside the
loop counts so nothing rests on the heuristic alone.

Stdlib only. Subcommands:
  report      the full report (what kernel-report.sh runs)
  parse-sass  counts and loops of a SASS listing (cuobjdump -sass or nvdisasm), as JSON;
              tests/kernel_report.rs runs it on a committed excerpt
  occupancy   blocks per SM for given registers / threads / shared memory, as JSON
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------------------
# Hardware facts of the occupancy rule (CUDA Programming Guide, "Compute Capabilities",
# and the CUDA occupancy calculator, cuda_occupancy.h). Shared memory per SM is the largest
# carveout: the driver picks the carveout the launch needs.

COMMON_LIMITS = {
    "regs_per_sm": 65536,
    "regs_per_block": 65536,
    "reg_granularity": 256,  # registers are allocated per warp in units of 256
    "sub_partitions": 4,  # the register file is split over 4 SM sub-partitions
    "max_regs_per_thread": 255,
    "max_warps_per_sm": 64,
    "max_blocks_per_sm": 32,
    "max_threads_per_block": 1024,
    "reserved_smem_per_block": 1024,  # the driver reserves 1 KiB per block (sm_80+)
    "smem_granularity": 128,
}
ARCH_LIMITS = {
    "sm_80": {"smem_per_sm": 164 * 1024, "smem_per_block_optin": 163 * 1024},
    "sm_90": {"smem_per_sm": 228 * 1024, "smem_per_block_optin": 227 * 1024},
}
ARCHS = tuple(ARCH_LIMITS)
# PTX of the fatbin: compute_80, at most the PTX ISA that a CUDA 13.0 driver loads
# (docs/ARCHITECTURE.md §7: the pinned nvcc 13.0 writes 9.0).
PTX_ARCH = "sm_80"  # cuobjdump names compute_80 PTX "sm_80"
PTX_MAX_ISA = (9, 0)
# The fatbins the crate builds (build.rs KERNELS) and which of them hold attention kernels.
FATBINS = ("prefix_attn_fwd", "prefix_attn_bwd", "prefix_attn_decode", "dense")
ATTENTION_PREFIX = "prefix_attn_"
# Goal of --check: HMMA per LDSM in the forward's key-tile loop.
GOAL_FWD_HMMA_PER_LDSM = 2.0


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def occupancy(arch: str, regs: int, threads: int, static_smem: int, dynamic_smem: int) -> dict:
    """Blocks per SM by the CUDA occupancy rule: the smallest of the warp, block, register
    and shared-memory limits. `static_smem` excludes the driver's 1 KiB reservation, which
    is added here once per block."""
    c, a = COMMON_LIMITS, ARCH_LIMITS[arch]
    warps = -(-threads // 32)
    limits = {}
    limits["warps"] = c["max_warps_per_sm"] // warps if 0 < threads <= c["max_threads_per_block"] else 0
    limits["blocks"] = c["max_blocks_per_sm"]
    regs_per_warp = round_up(regs * 32, c["reg_granularity"])
    if regs > c["max_regs_per_thread"] or regs_per_warp * round_up(warps, c["sub_partitions"]) > c["regs_per_block"]:
        limits["regs"] = 0
    elif regs_per_warp == 0:
        limits["regs"] = c["max_blocks_per_sm"]
    else:
        warps_per_sub = c["regs_per_sm"] // c["sub_partitions"] // regs_per_warp
        limits["regs"] = warps_per_sub * c["sub_partitions"] // warps
    smem_block = round_up(static_smem + dynamic_smem + c["reserved_smem_per_block"], c["smem_granularity"])
    if static_smem + dynamic_smem > a["smem_per_block_optin"]:
        limits["smem"] = 0
    else:
        limits["smem"] = a["smem_per_sm"] // smem_block
    blocks = min(limits.values())
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "limits": limits,
        "limited_by": [k for k, v in limits.items() if v == blocks],
        "smem_per_block_allocated": smem_block,
        "regs_per_warp_allocated": regs_per_warp,
    }


# ---------------------------------------------------------------------------------------
# SASS listings


@dataclass
class Instr:
    addr: int
    pred: str
    op: str  # full opcode with modifiers, e.g. STG.E.U8
    operands: str
    src: tuple | None = None  # (file, line) from nvdisasm -g

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


@dataclass
class Function:
    name: str
    arch: str | None
    instrs: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)


INSTR_RE = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
PRED_RE = re.compile(r"^(@!?U?P(?:T|\d+))\s+")
FILE_RE = re.compile(r'//## File "([^"]+)", line (\d+)')
LABEL_RE = re.compile(r"^\s*(\.L_[A-Za-z0-9_]+):")
CUOBJ_FUNC_RE = re.compile(r"^\s*Function : (\S+)")
NVDIS_FUNC_RE = re.compile(r"^//-+ \.text\.(\S+)\s+-+")
ARCH_RE = re.compile(r"code for (sm_\d+a?)|^\s*\.target\s+(sm_\d+a?)|EF_CUDA_SM(\d+)")


def parse_sass(text: str, arch: str | None = None) -> list:
    """Functions of a `cuobjdump -sass` or `nvdisasm [-g]` listing, in order."""
    funcs: list[Function] = []
    cur: Function | None = None
    src = None
    pending_labels: list[str] = []
    for line in text.splitlines():
        m = ARCH_RE.search(line)
        if m:
            if m.group(1) or m.group(2):
                arch = m.group(1) or m.group(2)
            elif cur is not None and cur.arch is None:
                cur.arch = "sm_" + m.group(3)
            continue
        m = CUOBJ_FUNC_RE.match(line) or NVDIS_FUNC_RE.match(line)
        if m:
            cur = Function(m.group(1), arch)
            funcs.append(cur)
            src, pending_labels = None, []
            continue
        if cur is None:
            continue
        m = FILE_RE.search(line)
        if m:
            src = (m.group(1), int(m.group(2)))
            continue
        m = LABEL_RE.match(line)
        if m:
            pending_labels.append(m.group(1))
            continue
        m = INSTR_RE.match(line)
        if not m:
            continue
        addr, body = int(m.group(1), 16), m.group(2).strip()
        pred = ""
        pm = PRED_RE.match(body)
        if pm:
            pred, body = pm.group(1), body[pm.end():]
        parts = body.split(None, 1)
        ins = Instr(addr, pred, parts[0], parts[1] if len(parts) > 1 else "", src)
        for lab in pending_labels:
            cur.labels[lab] = addr
        pending_labels = []
        cur.instrs.append(ins)
    return funcs


def branch_target(ins: Instr, labels: dict) -> int | None:
    """Target address of a direct BRA (hex address or nvdisasm label), else None."""
    if ins.base != "BRA":
        return None
    m = re.search(r"`\(([^)]+)\)", ins.operands)
    if m:
        return labels.get(m.group(1))
    hexes = re.findall(r"0x[0-9a-fA-F]+", ins.operands)
    return int(hexes[-1], 16) if hexes else None


def store_width(op: str) -> int:
    mods = op.split(".")[1:]
    for m in mods:
        if m in ("U8", "S8"):
            return 8
        if m in ("U16", "S16"):
            return 16
        if m in ("64", "128"):
            return int(m)
    return 32


STORE_WIDTHS = (8, 16, 32, 64, 128)


def classify(instrs) -> dict:
    """The instruction mix the report prints: HMMA, LDSM, LDGSTS, BAR, global stores by
    width, and a few others that explain a kernel (local memory = spills or stack arrays)."""
    c = Counter()
    for ins in instrs:
        b = ins.base
        if b in ("HMMA", "LDSM", "LDGSTS", "BAR", "LDG", "LDS", "STS", "LDL", "STL", "SHFL", "MUFU"):
            c[b] += 1
        elif b in ("ATOM", "ATOMG", "RED", "REDG"):
            c["ATOM/RED"] += 1
        elif b == "STG":
            c["STG"] += 1
            c[f"STG.{store_width(ins.op)}"] += 1
    out = {k: c.get(k, 0) for k in ("HMMA", "LDSM", "LDGSTS", "BAR", "LDG", "STG", "LDS", "STS", "LDL", "STL", "SHFL", "MUFU", "ATOM/RED")}
    out["STG_by_width"] = {str(w): c.get(f"STG.{w}", 0) for w in STORE_WIDTHS}
    out["instructions"] = len(instrs)
    out["HMMA_per_LDSM"] = round(out["HMMA"] / out["LDSM"], 3) if out["LDSM"] else None
    return out


def find_loops(fn: Function) -> list:
    """Every backward branch as a loop [start, end] (addresses), with its instructions."""
    loops = []
    for ins in fn.instrs:
        t = branch_target(ins, fn.labels)
        if t is None or t > ins.addr or t == ins.addr:
            continue  # forward branch, or the trailing branch-to-self after EXIT
        body = [i for i in fn.instrs if t <= i.addr <= ins.addr]
        loops.append({"start": t, "end": ins.addr, "branch": f"{ins.pred} {ins.op}".strip(), "body": body})
    return loops


def every_iteration(body: list, labels: dict, end: int) -> list:
    """The loop body's instructions that every iteration executes: those that no forward
    branch inside the loop can skip and that carry no predicate (a predicated instruction
    issues, but may do nothing: the forward's first-tile-only Q fragment loads are
    predicated LDSMs at head dim 64 and a branched-over block at 128). A forward branch to a
    target within the loop marks the range it jumps over (both halves of an if/else: the
    conditional branch skips the then-part, the unconditional one the else-part); branches
    that leave the loop do not count as skips."""
    skipped = set()
    for ins in body:
        t = branch_target(ins, labels)
        if t is not None and ins.addr < t <= end:
            skipped.update(i.addr for i in body if ins.addr < i.addr < t)
    return [i for i in body if i.addr not in skipped and i.pred in ("", "@PT")]


def hot_loop(fn: Function) -> dict | None:
    """The loop the report counts per iteration (see the module doc)."""
    loops = find_loops(fn)
    if not loops:
        return None
    has_hmma = any(i.base == "HMMA" for i in fn.instrs)
    mem = ("LDG", "STG", "LDGSTS", "ATOM", "ATOMG", "RED", "REDG")

    def weight(lp):
        if has_hmma:
            return sum(1 for i in lp["body"] if i.base == "HMMA")
        return sum(1 for i in lp["body"] if i.base in mem)

    best = max(weight(lp) for lp in loops)
    if best == 0:
        return None
    cands = [lp for lp in loops if weight(lp) == best]
    lp = min(cands, key=lambda lp: (lp["end"] - lp["start"], lp["start"]))
    return {**lp, "selected_by": "HMMA" if has_hmma else "global memory instructions", "loops_total": len(loops)}


def source_of(lp: dict) -> tuple:
    """(`file.cu:line` of the backward branch, i.e. the loop statement; `first-last` of the
    body's lines of that file). nvdisasm -g only; (None, None) without line info."""
    br = next((i for i in lp["body"] if i.addr == lp["end"]), None)
    if not br or not br.src:
        return None, None
    f = br.src[0]
    lines = [i.src[1] for i in lp["body"] if i.src and i.src[0] == f]
    return f"{os.path.basename(f)}:{br.src[1]}", f"{min(lines)}-{max(lines)}"


def analyse_function(fn: Function) -> dict:
    lp = hot_loop(fn)
    out = {"name": fn.name, "arch": fn.arch, "total": classify(fn.instrs), "loop": None}
    if lp:
        src, span = source_of(lp)
        out["loop"] = {
            "start": f"{lp['start']:#06x}",
            "end": f"{lp['end']:#06x}",
            "branch": lp["branch"],
            "selected_by": lp["selected_by"],
            "backward_branches": lp["loops_total"],
            "source": src,
            "source_lines": span,
            "count": classify(lp["body"]),
            "every_iteration": classify(every_iteration(lp["body"], fn.labels, lp["end"])),
        }
    return out


# ---------------------------------------------------------------------------------------
# Tools


def run(cmd, cwd=None) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"kernel-report: {' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}{r.stdout}")
    return r.stdout


def parse_res_usage(text: str) -> tuple[dict, list]:
    """(`{(arch, fn): {REG, STACK, SHARED, LOCAL, ...}}`, [PTX sections as (arch, (major, minor))])."""
    res, ptx = {}, []
    section, arch, version = None, None, None
    fn = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("Fatbin ptx code"):
            section, arch, version = "ptx", None, None
        elif s.startswith("Fatbin elf code"):
            section, arch = "elf", None
        elif s.startswith("arch = "):
            arch = s.split("=", 1)[1].strip()
        elif s.startswith("code version = ") and section == "ptx":
            m = re.match(r"code version = \[(\d+),(\d+)\]", s)
            if m:
                ptx.append((arch, (int(m.group(1)), int(m.group(2)))))
        elif s.startswith("Function ") and section == "elf":
            fn = s[len("Function "):].rstrip(":")
        elif fn and s.startswith("REG:"):
            vals = dict(kv.split(":", 1) for kv in s.split())
            res[(arch, fn)] = {k: int(v) for k, v in vals.items() if v.isdigit()}
            fn = None
    return res, ptx


def parse_symbols(text: str) -> dict:
    """`{arch: {"entries": [...], "reserved_smem": bool}}` from `cuobjdump -symbols`."""
    out, arch, section = {}, None, None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("Fatbin ptx code"):
            section = "ptx"
        elif s.startswith("Fatbin elf code"):
            section = "elf"
        elif s.startswith("arch = ") and section == "elf":
            arch = s.split("=", 1)[1].strip()
            out.setdefault(arch, {"entries": [], "reserved_smem": False})
        elif section == "elf" and arch:
            if "STO_ENTRY" in s:
                out[arch]["entries"].append(s.split()[-1])
            if ".nv.reservedSmem" in s:
                out[arch]["reserved_smem"] = True
    return out


def parse_max_threads(elf_text: str) -> dict:
    """`{fn: max threads per block}` from the EIATTR_MAX_THREADS of `cuobjdump -elf`."""
    out, fn, want = {}, None, False
    for line in elf_text.splitlines():
        m = re.match(r"^\.nv\.info\.(\S+)$", line.strip())
        if m:
            fn, want = m.group(1), False
            continue
        if fn and "EIATTR_MAX_THREADS" in line:
            want = True
        elif want and line.strip().startswith("Value:"):
            vals = [int(v, 16) for v in re.findall(r"0x[0-9a-fA-F]+", line)]
            out[fn] = vals[0] * (vals[1] if len(vals) > 1 else 1) * (vals[2] if len(vals) > 2 else 1)
            want = False
    return out


PTXAS_RE = re.compile(r"ptxas '([^']+)' for '(sm_\d+a?)': (.*)")


def parse_ptxas(text: str) -> dict:
    """`{(arch, fn): {"spill_stores", "spill_loads", "registers"}}` from the build script's
    ptxas -v lines (build.rs prints them as cargo warnings)."""
    out = {}
    for line in text.splitlines():
        m = PTXAS_RE.search(line)
        if not m:
            continue
        fn, arch, rest = m.groups()
        d = out.setdefault((arch, fn), {"spill_stores": 0, "spill_loads": 0})
        sm = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", rest)
        if sm:
            d["spill_stores"] += int(sm.group(1))
            d["spill_loads"] += int(sm.group(2))
        rm = re.search(r"Used (\d+) registers", rest)
        if rm:
            d["registers"] = int(rm.group(1))
    return out


# ---------------------------------------------------------------------------------------
# The report


def load_launches(path: str | None) -> tuple[dict, list]:
    if not path:
        return {}, ["no launch table (threads, dynamic shared memory unknown: blocks/SM not computed)"]
    with open(path) as f:
        data = json.load(f)
    by_entry, notes = {}, []
    for row in data["launches"]:
        e = row["entry"]
        key = (row["threads"], row["smem_bytes"])
        if e in by_entry and by_entry[e]["key"] != key:
            notes.append(f"{e}: launched with more than one geometry {by_entry[e]['key']} / {key}; the first is used")
            continue
        by_entry.setdefault(e, {"key": key, **row})
    return by_entry, notes


def report(args) -> int:
    fatbin_dir = args.fatbin_dir
    launches, notes = load_launches(args.launches)
    ptxas = {}
    build_output = args.build_output or os.path.join(os.path.dirname(os.path.abspath(fatbin_dir)), "output")
    if os.path.isfile(build_output):
        with open(build_output, errors="replace") as f:
            ptxas = parse_ptxas(f.read())
    if not ptxas:
        notes.append(f"no ptxas -v lines in {build_output}: spills judged from local memory (LOCAL, STL/LDL)")
    kfilter = re.compile(args.kernels) if args.kernels else None
    rows, hard_fail, fatbins = [], [], {}
    for stem in FATBINS:
        path = os.path.join(fatbin_dir, f"{stem}.fatbin")
        if not os.path.isfile(path):
            hard_fail.append(f"FAIL fatbin: {path} missing (was the crate built with nvcc?)")
            continue
        res, ptx = parse_res_usage(run([args.cuobjdump, "-res-usage", path]))
        syms = parse_symbols(run([args.cuobjdump, "-symbols", path]))
        have = sorted({a for (a, _) in res} | set(syms))
        fb = {"sass_archs": have, "ptx": [(a, f"{v[0]}.{v[1]}") for a, v in ptx], "STG.8": 0}
        fatbins[stem] = fb
        for a in ARCHS:
            if a not in syms:
                hard_fail.append(f"FAIL fatbin {stem}: no {a} SASS (has {', '.join(have) or 'none'})")
        if not any(a == PTX_ARCH for a, _ in ptx):
            hard_fail.append(f"FAIL fatbin {stem}: no compute_80 PTX (has {fb['ptx'] or 'none'})")
        for a, v in ptx:
            if v > PTX_MAX_ISA:
                hard_fail.append(f"FAIL fatbin {stem}: PTX ISA {v[0]}.{v[1]} is newer than a CUDA 13.0 driver loads ({PTX_MAX_ISA[0]}.{PTX_MAX_ISA[1]})")
        with tempfile.TemporaryDirectory() as tmp:
            run([args.cuobjdump, "-xelf", "all", os.path.abspath(path)], cwd=tmp)
            for cubin in sorted(glob.glob(os.path.join(tmp, "*.cubin"))):
                m = re.search(r"\.(sm_\d+a?)\.cubin$", cubin)
                if not m:
                    continue
                arch = m.group(1)
                max_threads = parse_max_threads(run([args.cuobjdump, "-elf", cubin]))
                funcs = parse_sass(run([args.nvdisasm, "-c", "-g", cubin]), arch)
                for fn in funcs:
                    if fn.name not in syms.get(arch, {}).get("entries", []):
                        continue  # internal subroutines are listed inside their kernel
                    a = analyse_function(fn)
                    fb["STG.8"] += a["total"]["STG_by_width"]["8"]
                    if kfilter and not kfilter.search(fn.name):
                        continue
                    r = res.get((arch, fn.name), {})
                    reserved = syms.get(arch, {}).get("reserved_smem", False)
                    shared_elf = r.get("SHARED", 0)
                    # sm_90 cubins carry the driver's 1 KiB reservation as static shared
                    # memory (.nv.reservedSmem); count it once, as the reservation.
                    static = max(0, shared_elf - COMMON_LIMITS["reserved_smem_per_block"]) if reserved else shared_elf
                    launch = launches.get(fn.name)
                    pt = ptxas.get((arch, fn.name))
                    row = {
                        "kernel": fn.name,
                        "fatbin": stem,
                        "arch": arch,
                        "regs": r.get("REG"),
                        "spill_stores": pt["spill_stores"] if pt else None,
                        "spill_loads": pt["spill_loads"] if pt else None,
                        "local_bytes": r.get("LOCAL"),
                        "stack_bytes": r.get("STACK"),
                        "static_smem": static,
                        "static_smem_elf": shared_elf,
                        "elf_includes_reserved_smem": reserved,
                        "dynamic_smem": launch["smem_bytes"] if launch else None,
                        "threads": launch["threads"] if launch else None,
                        "planned_by": launch.get("planner") if launch else None,
                        "launch_bounds_max_threads": max_threads.get(fn.name),
                        "occupancy": None,
                        "loop": a["loop"],
                        "total": a["total"],
                    }
                    # Above 48 KiB a launch needs the opt-in attribute (the cuda device sets it).
                    row["needs_smem_optin"] = bool(launch) and static + launch["smem_bytes"] > 48 * 1024
                    if launch and row["regs"] is not None:
                        row["occupancy"] = occupancy(arch, row["regs"], launch["threads"], static, launch["smem_bytes"])
                        lb = row["launch_bounds_max_threads"]
                        if lb and launch["threads"] > lb:
                            hard_fail.append(f"FAIL launch bounds: {fn.name} ({arch}) is launched with {launch['threads']} threads, its launch bounds allow {lb}")
                    elif not launch:
                        notes.append(f"{fn.name}: not in the launch table (never planned?)")
                    rows.append(row)
    planned_missing = sorted(set(launches) - {r["kernel"] for r in rows})
    if planned_missing and not kfilter:
        hard_fail.append("FAIL fatbin: planned but not in any fatbin: " + ", ".join(planned_missing))
    rows.sort(key=lambda r: (FATBINS.index(r["fatbin"]), r["kernel"], r["arch"]))
    notes = sorted(set(notes))
    goals = check_goals(rows, fatbins) if args.check else []
    if args.json:
        json.dump({"rows": rows, "fatbins": fatbins, "notes": notes, "hard_checks": hard_fail or ["PASS"], "goals": goals}, sys.stdout, indent=1)
        print()
    else:
        print_tables(rows, fatbins, notes)
        for line in hard_fail:
            print(line)
        if not hard_fail:
            print("PASS fatbin: every fatbin holds sm_80 and sm_90 SASS and compute_80 PTX "
                  f"(ISA <= {PTX_MAX_ISA[0]}.{PTX_MAX_ISA[1]}); every planned kernel is in one, within its launch bounds")
        for g in goals:
            print(g)
    failed = bool(hard_fail) or any(g.startswith("FAIL") for g in goals)
    return 1 if failed else 0


def check_goals(rows, fatbins) -> list:
    out = []
    att = [r for r in rows if r["kernel"].startswith(ATTENTION_PREFIX)]
    bad = [f"{r['kernel']} ({r['arch']}) {r['total']['STG_by_width']['8']}" for r in att if r["total"]["STG_by_width"]["8"]]
    total = sum(int(r["total"]["STG_by_width"]["8"]) for r in att)
    out.append(("PASS" if not bad else "FAIL") + f" goal: no byte-wide global store (STG.E.U8) in the attention kernels"
               + (f": {total} in {len(bad)} kernel builds, e.g. " + "; ".join(bad[:4]) if bad else ""))
    spilled = []
    for r in rows:
        if r["spill_stores"] is not None:
            if r["spill_stores"] or r["spill_loads"]:
                spilled.append(f"{r['kernel']} ({r['arch']}) {r['spill_stores']}/{r['spill_loads']} B")
        elif r["local_bytes"] or r["total"]["STL"] or r["total"]["LDL"]:
            spilled.append(f"{r['kernel']} ({r['arch']}) local {r['local_bytes']} B, STL {r['total']['STL']}")
    archs = sorted({r["arch"] for r in rows})
    out.append(("PASS" if not spilled else "FAIL") + f" goal: 0 spills in every kernel on {', '.join(archs)}"
               + (": " + "; ".join(spilled[:6]) if spilled else ""))
    # The forward's entries (its fatbin also holds the one-block metadata clamp, which has no
    # key loop).
    fwd = [r for r in rows if r["fatbin"] == "prefix_attn_fwd" and r["kernel"].startswith("prefix_attn_fwd_")]
    low = []
    for r in fwd:
        ratio = r["loop"]["count"]["HMMA_per_LDSM"] if r["loop"] else None
        if ratio is None or ratio < GOAL_FWD_HMMA_PER_LDSM:
            every = r["loop"]["every_iteration"]["HMMA_per_LDSM"] if r["loop"] else None
            low.append(f"{r['kernel']} ({r['arch']}) {ratio} (every iteration: {every})")
    out.append(("PASS" if fwd and not low else "FAIL") + f" goal: forward HMMA/LDSM >= {GOAL_FWD_HMMA_PER_LDSM:g} per key tile (static loop body)"
               + (": " + "; ".join(low) if low else "") + ("" if fwd else ": no forward kernel in the report"))
    return out


def fmt_kib(b) -> str:
    if b is None:
        return "?"
    return f"{b / 1024:g}K" if b % 256 == 0 and b >= 1024 else str(b)


def merged(rows, cell) -> str:
    """One cell for a kernel's rows (one per arch): the value, or `sm_80/sm_90` values
    joined by '/' where they differ."""
    vals = [cell(r) for r in rows]
    return vals[0] if all(v == vals[0] for v in vals) else "/".join(vals)


def widths_of(c) -> str:
    return "/".join(str(c["STG_by_width"][str(w)]) for w in STORE_WIDTHS)


def print_tables(rows, fatbins, notes):
    by_kernel: dict = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    archs = sorted({r["arch"] for r in rows})
    print(f"Per kernel; a cell with two values separated by '/' gives {' / '.join(archs)} where they differ.\n")
    print("| kernel | regs | spills st/ld B | smem static+dyn | threads | blocks/SM | limited by "
          "| loop at | HMMA | LDSM | HMMA/LDSM | every-iter HMMA/LDSM | LDGSTS | BAR | STG 8/16/32/64/128 "
          "| kernel HMMA | kernel LDSM | kernel STG 8/16/32/64/128 |")
    print("|---|--:|--:|--:|--:|--:|---|---|--:|--:|--:|--:|--:|--:|---|--:|--:|---|")

    def spill(r):
        if r["spill_stores"] is not None:
            return f"{r['spill_stores']}/{r['spill_loads']}"
        return f"local {r['local_bytes']}"

    def loop(key, part="count"):
        def f(r):
            if not r["loop"]:
                return "-"
            c = r["loop"][part]
            if key == "ratio":
                return f"{c['HMMA_per_LDSM']:.2f}" if c["HMMA_per_LDSM"] is not None else "-"
            if key == "stg":
                return widths_of(c)
            return str(c[key])
        return f

    def occ(key):
        def f(r):
            o = r["occupancy"]
            if not o:
                return "?"
            return ",".join(o[key]) if key == "limited_by" else str(o[key])
        return f

    for name, rs in by_kernel.items():
        cells = [
            merged(rs, lambda r: str(r["regs"])),
            merged(rs, spill),
            merged(rs, lambda r: f"{fmt_kib(r['static_smem'])}+{fmt_kib(r['dynamic_smem'])}"),
            merged(rs, lambda r: str(r["threads"]) if r["threads"] is not None else "?"),
            merged(rs, occ("blocks_per_sm")),
            merged(rs, occ("limited_by")),
            merged(rs, lambda r: (r["loop"]["source"] or f"{r['loop']['start']}-{r['loop']['end']}") if r["loop"] else "(none)"),
            merged(rs, loop("HMMA")),
            merged(rs, loop("LDSM")),
            merged(rs, loop("ratio")),
            merged(rs, loop("ratio", "every_iteration")),
            merged(rs, loop("LDGSTS")),
            merged(rs, loop("BAR")),
            merged(rs, loop("stg")),
            merged(rs, lambda r: str(r["total"]["HMMA"])),
            merged(rs, lambda r: str(r["total"]["LDSM"])),
            merged(rs, lambda r: widths_of(r["total"])),
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("STG.E.U8 per fatbin (all kernels, both archs): " + ", ".join(f"{k} {v['STG.8']}" for k, v in fatbins.items()))
    for n in notes:
        print(f"note: {n}")
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("report", help="the full report")
    r.add_argument("--fatbin-dir", required=True, help="OUT_DIR with prefix_attn_fwd.fatbin etc.")
    r.add_argument("--cuobjdump", default="cuobjdump")
    r.add_argument("--nvdisasm", default="nvdisasm")
    r.add_argument("--launches", help="`prefix-attn kernels --json` output")
    r.add_argument("--build-output", help="the build script's output file (default: OUT_DIR/../output)")
    r.add_argument("--kernels", help="only kernels whose name matches this regex")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.add_argument("--check", action="store_true", help="also judge the goals (PASS/FAIL each; a FAIL exits 1)")
    p = sub.add_parser("parse-sass", help="counts and loops of a SASS listing, as JSON")
    p.add_argument("file")
    p.add_argument("--arch", help="architecture when the listing does not say")
    o = sub.add_parser("occupancy", help="blocks per SM, as JSON")
    o.add_argument("--arch", required=True, choices=ARCHS)
    o.add_argument("--regs", type=int, required=True)
    o.add_argument("--threads", type=int, required=True)
    o.add_argument("--static-smem", type=int, default=0)
    o.add_argument("--dynamic-smem", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "report":
        return report(args)
    if args.cmd == "parse-sass":
        with open(args.file) as f:
            funcs = parse_sass(f.read(), args.arch)
        json.dump([analyse_function(fn) for fn in funcs], sys.stdout, indent=1)
        print()
        return 0
    json.dump(occupancy(args.arch, args.regs, args.threads, args.static_smem, args.dynamic_smem), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

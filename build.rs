//! Build script.
//!
//! 1. Compiles every CUDA kernel file with nvcc into a fatbin (sm_80 and sm_90 machine code
//!    plus compute_80 PTX, which later GPUs JIT), embedded in the crate, and keeps the `.ptx`
//!    in OUT_DIR for inspection. ptxas `-v` spill lines become cargo warnings where a kernel
//!    spills (every register/spill line with `PREFIX_ATTN_VERBOSE_BUILD=1`). nvcc is found
//!    through `NVCC`, `CUDA_HOME`/`CUDA_PATH`, then `PATH`.
//!    Without nvcc the crate builds without GPU kernels (the CUDA device says so at run time);
//!    `PREFIX_ATTN_REQUIRE_NVCC=1` turns that into a build error.
//! 2. Compiles the same kernel sources with the system C++ compiler against the CPU emulator
//!    (`kernels/emu/`) into a static library, so `cargo test` runs the kernels everywhere.
//!    Feature `emu-sanitize` builds it with ASan + UBSan; feature `emu-racecheck` compiles the
//!    kernels and the emulator's self-tests with gcc's ThreadSanitizer instrumentation, whose
//!    hooks the emulator itself implements (racecheck, initcheck; see README "Racecheck"). gcc's
//!    libbacktrace, where the compiler has one, gives the emulator's reports their source lines.
//!
//! No build step downloads anything.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Kernel files, each compiled for the GPU and for the emulator.
const KERNELS: &[&str] = &[
    "kernels/prefix_attn_fwd.cu",
    "kernels/prefix_attn_bwd.cu",
    "kernels/prefix_attn_decode.cu",
    "kernels/dense.cu",
];
/// Headers the kernels include.
const HEADERS: &[&str] = &[
    "kernels/common/meta.cuh",
    "kernels/common/platform.cuh",
    "kernels/common/prims.cuh",
    "kernels/common/tile.cuh",
    "kernels/common/params.h",
    "kernels/common/registry.h",
    "kernels/emu/emu.h",
];
/// The emulator runtime and the kernel registry (the first `EMU_RUNTIME` files: never
/// instrumented by racecheck, since they implement its hooks), then the self-tests.
const EMU_RUNTIME: usize = 2;
/// See [`EMU_RUNTIME`].
const EMU_SOURCES: &[&str] = &[
    "kernels/emu/emu.cpp",
    "kernels/emu/registry.cpp",
    "kernels/emu/selftest.cpp",
];
/// The emulator's internal headers.
const EMU_HEADERS: &[&str] = &["kernels/emu/racecheck.h"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for f in KERNELS
        .iter()
        .chain(HEADERS)
        .chain(EMU_SOURCES)
        .chain(EMU_HEADERS)
    {
        println!("cargo:rerun-if-changed={f}");
    }
    for v in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "PREFIX_ATTN_REQUIRE_NVCC",
        "PREFIX_ATTN_VERBOSE_BUILD",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    build_emulator();
    build_cuda(&out);
}

fn build_emulator() {
    let sanitize = env::var_os("CARGO_FEATURE_EMU_SANITIZE").is_some();
    let racecheck = env::var_os("CARGO_FEATURE_EMU_RACECHECK").is_some();
    if sanitize && racecheck {
        panic!(
            "features emu-sanitize and emu-racecheck cannot be combined: AddressSanitizer and the \
             ThreadSanitizer instrumentation of racecheck exclude each other"
        );
    }
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .std("c++20")
            .define("PREFIX_ATTN_EMU", None)
            .include("kernels")
            .flag("-fno-strict-aliasing")
            // Kernel frames larger than a page must not jump a fiber stack's guard page.
            .flag_if_supported("-fstack-clash-protection")
            .flag_if_supported("-Wno-unused-parameter")
            .flag_if_supported("-Wno-unknown-pragmas")
            .opt_level(2)
            .warnings(true);
        // The kernel files are CUDA C++; under the emulator they are plain C++.
        b.flag("-x").flag("c++");
        if racecheck {
            b.define("PREFIX_ATTN_EMU_RACECHECK", None);
        }
        if sanitize {
            b.flag("-fsanitize=address,undefined")
                .flag("-fno-omit-frame-pointer")
                .flag("-fno-sanitize-recover=undefined");
        }
        b
    };
    let mut b = base();
    let backtrace = find_libbacktrace(&b);
    if backtrace.is_some() {
        b.define("PREFIX_ATTN_EMU_LIBBACKTRACE", None);
    }
    if racecheck {
        // The kernels and self-tests get the instrumentation (every load and store calls a
        // __tsan_* hook, with line tables for the reports); the emulator runtime, which
        // implements the hooks, does not.
        let mut k = base();
        k.flag("-fsanitize=thread")
            .flag("--param=tsan-instrument-func-entry-exit=0")
            .flag("-g");
        let (runtime, rest) = EMU_SOURCES.split_at(EMU_RUNTIME);
        for f in rest.iter().chain(KERNELS) {
            k.file(f);
        }
        b.objects(k.compile_intermediates());
        b.files(runtime);
    } else {
        for f in EMU_SOURCES.iter().chain(KERNELS) {
            b.file(f);
        }
    }
    // Whole archive: the kernel files are reached only through the registry they fill at
    // static-initialisation time, so no symbol of theirs is referenced by name.
    b.link_lib_modifier("+whole-archive");
    b.compile("prefix_attn_emu");
    if let Some(lib) = backtrace {
        let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        std::fs::copy(&lib, out.join("libpa_emu_backtrace.a")).expect("copy libbacktrace.a");
        println!("cargo:rustc-link-search=native={}", out.display());
        println!("cargo:rustc-link-lib=static=pa_emu_backtrace");
    }
    println!("cargo:rustc-link-lib=dylib=stdc++");
    if sanitize {
        println!("cargo:rustc-link-lib=dylib=asan");
        println!("cargo:rustc-link-lib=dylib=ubsan");
    }
}

/// gcc's libbacktrace (`libbacktrace.a` beside libgcc, with `backtrace.h` on the compiler's
/// include path), or None: the emulator then names code addresses by module and offset.
fn find_libbacktrace(b: &cc::Build) -> Option<PathBuf> {
    let cc = b.try_get_compiler().ok()?;
    let o = Command::new(cc.path())
        .arg("-print-file-name=libbacktrace.a")
        .output()
        .ok()?;
    let lib = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    if !lib.is_absolute() || !lib.exists() {
        return None;
    }
    let header = Command::new(cc.path())
        .arg("-print-file-name=include/backtrace.h")
        .output()
        .ok()?;
    let header = PathBuf::from(String::from_utf8_lossy(&header.stdout).trim());
    (header.is_absolute() && header.exists()).then_some(lib)
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|d| d.join("nvcc"))
            .find(|p| p.exists())
    })
}

fn build_cuda(out: &Path) {
    let require = env::var("PREFIX_ATTN_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let mut consts = String::new();
    let mut table = String::new();
    let nvcc = find_nvcc();
    match &nvcc {
        None => {
            let msg =
                "nvcc not found (NVCC, CUDA_HOME/CUDA_PATH, PATH): building without GPU kernels; \
                       scripts/install-nvcc.sh installs one";
            if require {
                panic!("PREFIX_ATTN_REQUIRE_NVCC=1: {msg}");
            }
            println!("cargo:warning={msg}");
        }
        Some(nvcc) => println!(
            "cargo:warning=compiling CUDA kernels with {}",
            nvcc.display()
        ),
    }
    for k in KERNELS {
        let stem = Path::new(k)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("kernel");
        let name = stem.to_uppercase();
        let embedded = nvcc
            .as_ref()
            .and_then(|nvcc| match compile_kernel(nvcc, k, stem, out) {
                Ok(fatbin) => Some(fatbin),
                Err(e) => {
                    if require {
                        panic!("PREFIX_ATTN_REQUIRE_NVCC=1: {k}: {e}");
                    }
                    println!("cargo:warning={k}: {e}; building without it");
                    None
                }
            });
        match embedded {
            Some(fatbin) => consts.push_str(&format!(
                "/// Fatbin of `{k}`.\npub const {name}: Option<&[u8]> = Some(include_bytes!({:?}));\n",
                fatbin.display().to_string()
            )),
            None => consts.push_str(&format!(
                "/// Fatbin of `{k}` (not compiled in this build).\npub const {name}: Option<&[u8]> = None;\n"
            )),
        }
        table.push_str(&format!("    ({stem:?}, {name}),\n"));
    }
    consts.push_str(&format!(
        "/// Every kernel file's fatbin by file stem.\npub const FATBINS: &[(&str, Option<&[u8]>)] = &[\n{table}];\n"
    ));
    std::fs::write(out.join("kernels.rs"), consts).expect("write kernels.rs");
}

fn compile_kernel(nvcc: &Path, src: &str, stem: &str, out: &Path) -> Result<PathBuf, String> {
    let fatbin = out.join(format!("{stem}.fatbin"));
    let ptx = out.join(format!("{stem}.ptx"));
    let common = [
        "-std=c++17",
        "-O3",
        "-Ikernels",
        "--expt-relaxed-constexpr",
        "-lineinfo",
    ];
    let run = |args: &[&str]| -> Result<String, String> {
        let o = Command::new(nvcc)
            .args(common)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
        let text =
            String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
        if o.status.success() {
            Ok(text)
        } else {
            Err(format!("nvcc failed:\n{text}"))
        }
    };
    let log = run(&[
        "-fatbin",
        "-Xptxas",
        "-v",
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_90,code=sm_90",
        "-gencode",
        "arch=compute_80,code=compute_80",
        "-o",
        fatbin.to_str().ok_or("non-UTF-8 OUT_DIR")?,
        src,
    ])?;
    // ptxas -v: "Compiling entry function '...' for 'sm_80'", "Used N registers, ...",
    // "N bytes stack frame, N bytes spill stores, N bytes spill loads".
    // Shown only where a kernel spills, or for every kernel with PREFIX_ATTN_VERBOSE_BUILD=1
    // (scripts/kernel-report.sh gives the full table).
    let verbose = env::var("PREFIX_ATTN_VERBOSE_BUILD").is_ok_and(|v| v == "1");
    let mut entry = String::new();
    for line in log.lines() {
        let l = line.trim_start_matches("ptxas info    : ").trim();
        if let Some(rest) = l.strip_prefix("Compiling entry function") {
            entry = rest.trim().to_string();
        } else if l.contains("spill") {
            let spills =
                !l.contains(" 0 bytes spill stores") || !l.contains(" 0 bytes spill loads");
            if verbose || spills {
                println!("cargo:warning=ptxas {entry}: {l}");
            }
        } else if verbose && l.starts_with("Used") {
            println!("cargo:warning=ptxas {entry}: {l}");
        }
    }
    run(&[
        "-ptx",
        "-arch=compute_80",
        "-o",
        ptx.to_str().ok_or("non-UTF-8 OUT_DIR")?,
        src,
    ])?;
    Ok(fatbin)
}

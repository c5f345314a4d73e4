//! The C ABI: `include/prefix_attn.h` against the Rust side (every constant, and every
//! function with its return type and parameters), the header compiled as C99 and C++, and the
//! C program `tests/c/c_api.c` linked against the static library, run on fresh random problems
//! whose f64 oracle values this test writes: one for the cpu context's one-shot calls, one for
//! plan/run on the emu context.

use prefix_attn::attn::oracle::{Dense, Precision};
use prefix_attn::attn::AttnFwdArgs;
use prefix_attn::capi::{DEVICE_NAMES, DTYPE_NAMES, STATUS_NAMES};
use prefix_attn::rng::Rng;
use prefix_attn::tensor::Tensor;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn header() -> String {
    std::fs::read_to_string(root().join("include/prefix_attn.h")).expect("header readable")
}

fn cc() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

#[test]
fn header_matches_the_rust_side() {
    let h = header();
    let defines: Vec<(String, i32)> = h
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("#define")).then_some(())?;
            let name = w.next()?.to_string();
            let value = w.next()?.parse().ok()?;
            Some((name, value))
        })
        .collect();
    let mut rust: Vec<(String, i32)> = STATUS_NAMES
        .iter()
        .chain(&DTYPE_NAMES)
        .chain(&DEVICE_NAMES)
        .map(|&(n, v)| (n.to_string(), v))
        .collect();
    let mut got = defines.clone();
    rust.sort();
    got.sort();
    assert_eq!(got, rust, "header #defines differ from src/capi constants");

    // The functions the header declares and the ones src/capi exports.
    let src = std::fs::read_to_string(root().join("src/capi/mod.rs")).unwrap();
    let exported: BTreeSet<String> = src
        .split("pub extern \"C\" fn ")
        .skip(1)
        .map(|s| s.split('(').next().unwrap().to_string())
        .collect();
    let declared: BTreeSet<String> = h
        .lines()
        .filter(|l| !l.trim_start().starts_with("/*"))
        .flat_map(|l| {
            l.match_indices("pa_")
                .filter(|&(at, _)| {
                    at == 0
                        || !l.as_bytes()[at - 1].is_ascii_alphanumeric()
                            && l.as_bytes()[at - 1] != b'_'
                })
                .filter_map(|(at, _)| {
                    let name: String = l[at..]
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    l[at + name.len()..].starts_with('(').then_some(name)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(exported.len() >= 13, "too few exports found: {exported:?}");
    assert_eq!(
        declared, exported,
        "header functions differ from src/capi exports"
    );

    // Each function's return type and parameters (names and types, in order) agree.
    let rust_sigs = rust_signatures(&src);
    let header_sigs = header_signatures(&h);
    for name in &exported {
        let (h, r) = (&header_sigs.get(name), &rust_sigs.get(name));
        assert!(h.is_some() && r.is_some(), "{name}: signature not parsed");
        assert_eq!(
            h, r,
            "{name}: header signature (left) differs from src/capi (right)"
        );
    }
}

/// A signature as `(return type, [(parameter, type)])`, C types with spaces removed
/// (`const pa_tensor *` → `constpa_tensor*`).
type Signature = (String, Vec<(String, String)>);

/// The C spelling of a Rust FFI type of src/capi.
fn c_type(rust: &str) -> String {
    let rust = rust.trim();
    if let Some(inner) = rust.strip_prefix("*const ") {
        return format!("const{}*", c_type(inner));
    }
    if let Some(inner) = rust.strip_prefix("*mut ") {
        return format!("{}*", c_type(inner));
    }
    match rust {
        "i32" => "int32_t",
        "u64" => "uint64_t",
        "f32" => "float",
        "c_void" => "void",
        "c_char" => "char",
        other => other,
    }
    .to_string()
}

/// Every `pub extern "C" fn` of src/capi with its signature in C spelling.
fn rust_signatures(src: &str) -> std::collections::BTreeMap<String, Signature> {
    src.split("pub extern \"C\" fn ")
        .skip(1)
        .map(|s| {
            let (name, rest) = s.split_once('(').unwrap();
            let (params, rest) = rest.split_once(')').unwrap();
            let ret = rest.split('{').next().unwrap().trim();
            let ret = match ret.strip_prefix("->") {
                Some(t) => c_type(t),
                None => "void".into(),
            };
            let params = params
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (n, t) = p.split_once(':').unwrap();
                    (n.trim().to_string(), c_type(t))
                })
                .collect();
            (name.to_string(), (ret, params))
        })
        .collect()
}

/// Every function the header declares, with its signature (comments and spaces removed).
fn header_signatures(h: &str) -> std::collections::BTreeMap<String, Signature> {
    let mut code = String::new();
    let mut rest = h;
    while let Some(at) = rest.find("/*") {
        code.push_str(&rest[..at]);
        rest = &rest[at + 2..];
        rest = &rest[rest.find("*/").map_or(rest.len(), |e| e + 2)..];
    }
    code.push_str(rest);
    let code: String = code
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let squash = |s: &str| s.split_whitespace().collect::<String>();
    code.split([';', '{', '}'])
        .filter_map(|stmt| {
            let (head, params) = stmt.split_once('(')?;
            let params = params.trim_end().strip_suffix(')')?;
            let name_at = head.rfind(|c: char| !(c.is_alphanumeric() || c == '_'))? + 1;
            let name = &head[name_at..];
            if !name.starts_with("pa_") {
                return None;
            }
            let params = if params.trim() == "void" {
                vec![]
            } else {
                params
                    .split(',')
                    .map(|p| {
                        let p = p.trim();
                        let n_at = p
                            .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                            .unwrap()
                            + 1;
                        (p[n_at..].to_string(), squash(&p[..n_at]))
                    })
                    .collect()
            };
            Some((name.to_string(), (squash(&head[..name_at]), params)))
        })
        .collect()
}

#[test]
fn header_compiles_as_c_and_cpp() {
    let inc = root().join("include");
    let c = Command::new(cc())
        .args([
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-fsyntax-only",
            "-x",
            "c",
        ])
        .arg(inc.join("prefix_attn.h"))
        .status()
        .expect("C compiler runs");
    assert!(c.success(), "header does not compile as C99");
    let cpp = Command::new("c++")
        .args([
            "-std=c++11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-fsyntax-only",
            "-x",
            "c++",
        ])
        .arg(inc.join("prefix_attn.h"))
        .status()
        .expect("C++ compiler runs");
    assert!(cpp.success(), "header does not compile as C++");
}

/// `target/<profile>/libprefix_attn.a`, built with the lib target (crate-type staticlib).
fn staticlib() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let lib = profile_dir.join("libprefix_attn.a");
    // `cargo test` builds the lib as an rlib only: build the static library the way a C user
    // would (a no-op when it is up to date).
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "--lib", "--quiet"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let built = build.status().expect("cargo runs");
    assert!(built.success(), "cargo build --lib failed");
    assert!(
        lib.exists(),
        "{} missing: cargo builds it with the lib",
        lib.display()
    );
    lib
}

fn push(out: &mut String, xs: impl IntoIterator<Item = String>) {
    for x in xs {
        out.push_str(&x);
        out.push(' ');
    }
    out.push('\n');
}

/// The case of the C program's plan/run section (an emu context): bf16 inputs (drawn as f32
/// and rounded to bf16, so the C side converts them exactly), head dim 64, two prefixes with
/// every sequence on another one (the second on none), right padding, causal; the f64 oracle
/// forward of exactly those values.
fn emu_case(case: &mut String, rng: &mut Rng) {
    let (b, tq, tk, h, d, p, np) = (3usize, 6usize, 9usize, 2usize, 64usize, 4usize, 2usize);
    let mut bf16s = |n: usize| -> Vec<f32> {
        rng.normal_vec(n, 1.0)
            .into_iter()
            .map(|x| half::bf16::from_f32(x).to_f32())
            .collect()
    };
    let (nq, nk, npre) = (b * tq * h * d, b * tk * h * d, np * p * h * d);
    let (qv, kv, vv) = (bf16s(nq), bf16s(nk), bf16s(nk));
    let (kpv, vpv, dov) = (bf16s(npre), bf16s(npre), bf16s(nq));
    let q = Tensor::from_slice(&[b, tq, h, d], &qv).unwrap();
    let k = Tensor::from_slice(&[b, tk, h, d], &kv).unwrap();
    let v = Tensor::from_slice(&[b, tk, h, d], &vv).unwrap();
    let kp = Tensor::from_slice(&[np, p, h, d], &kpv).unwrap();
    let vp = Tensor::from_slice(&[np, p, h, d], &vpv).unwrap();
    let (pidx, sq, sk) = ([1, -1, 0], [6, 4, 2], [9, 7, 3]);
    let args = AttnFwdArgs::new(q.view(), k.view(), v.view())
        .prefix(kp.view(), vp.view())
        .prefix_index(&pidx)
        .seqlens(&sq, &sk)
        .causal(true);
    let out = Dense::from_args(&args).unwrap().forward(Precision::Exact);
    writeln!(case, "{b} {tq} {tk} {h} {d} {p} {np} 1").unwrap();
    for m in [&pidx, &sq, &sk] {
        push(case, m.iter().map(|x| x.to_string()));
    }
    for x in [&qv, &kv, &vv, &kpv, &vpv, &dov] {
        push(case, x.iter().map(|x| format!("{x:e}")));
    }
    for x in [&out.o, &out.lse] {
        push(case, x.iter().map(|x| format!("{x:e}")));
    }
}

/// The case of the C program's paged-decode section: bf16-representable values (the C side
/// runs them in f32 on a cpu context and in bf16 on an emu context), 4 query heads over 2 KV
/// heads of 64, 2 new queries a sequence, pages of 4 in scattered order, two prefixes of 3
/// rows (the second valid for 2) and one sequence without a prefix; the f64 oracle's output.
fn decode_case(case: &mut String, rng: &mut Rng) {
    use prefix_attn::attn::paged::{oracle, PagedAttnArgs};
    use prefix_attn::attn::Meta;
    let (b, tq, hq, hkv, d, ps, pages, mp, np, p) = (3, 2, 4, 2, 64, 4, 10, 4, 2, 3);
    let mut bf16s = |n: usize| -> Vec<f32> {
        rng.normal_vec(n, 1.0)
            .into_iter()
            .map(|x| half::bf16::from_f32(x).to_f32())
            .collect()
    };
    let (nq, nc, npre) = (b * tq * hq * d, pages * ps * hkv * d, np * p * hkv * d);
    let (qv, kv, vv, kpv, vpv) = (bf16s(nq), bf16s(nc), bf16s(nc), bf16s(npre), bf16s(npre));
    let table: [i32; 12] = [7, 2, 1, 1, 0, 9, 4, 5, 3, 1, 1, 1];
    let (sk, pidx, plen) = ([6, 13, 2], [1, 0, -1], [3, 2]);
    let q = Tensor::from_slice(&[b, tq, hq, d], &qv).unwrap();
    let kc = Tensor::from_slice(&[pages, ps, hkv, d], &kv).unwrap();
    let vc = Tensor::from_slice(&[pages, ps, hkv, d], &vv).unwrap();
    let kp = Tensor::from_slice(&[np, p, hkv, d], &kpv).unwrap();
    let vp = Tensor::from_slice(&[np, p, hkv, d], &vpv).unwrap();
    let args = PagedAttnArgs::new(
        q.view(),
        kc.view(),
        vc.view(),
        Meta::Host(&table),
        Meta::Host(&sk),
    )
    .prefix(kp.view(), vp.view())
    .prefix_index(Meta::Host(&pidx))
    .prefix_len(Meta::Host(&plen));
    let out = oracle(&args, Precision::Exact).unwrap();
    writeln!(case, "{b} {tq} {hq} {hkv} {d} {ps} {pages} {mp} {np} {p}").unwrap();
    push(case, table.iter().map(|x| x.to_string()));
    for m in [&sk[..], &pidx[..], &plen[..]] {
        push(case, m.iter().map(|x| x.to_string()));
    }
    for x in [&qv, &kv, &vv, &kpv, &vpv] {
        push(case, x.iter().map(|x| format!("{x:e}")));
    }
    for x in [&out.o, &out.lse] {
        push(case, x.iter().map(|x| format!("{x:e}")));
    }
}

#[test]
fn c_program_matches_the_oracle_and_reports_bad_arguments() {
    let t0 = std::time::Instant::now();
    let (b, tq, tk, h, d, p) = (3usize, 5usize, 7usize, 2usize, 8usize, 3usize);
    let causal = true;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = Rng::new(seed);
    let mut rand = |n: usize| rng.normal_vec(n, 1.0);
    let (nq, nk, np) = (b * tq * h * d, b * tk * h * d, p * h * d);
    let (qv, kv, vv, kpv, vpv, dov) = (rand(nq), rand(nk), rand(nk), rand(np), rand(np), rand(nq));
    let q = Tensor::from_slice(&[b, tq, h, d], &qv).unwrap();
    let k = Tensor::from_slice(&[b, tk, h, d], &kv).unwrap();
    let v = Tensor::from_slice(&[b, tk, h, d], &vv).unwrap();
    let kp = Tensor::from_slice(&[1, p, h, d], &kpv).unwrap();
    let vp = Tensor::from_slice(&[1, p, h, d], &vpv).unwrap();
    // Row 0 of the last sequence sees only the prefix (bottom-right causal, Tk < Tq); the
    // middle sequence has no prefix and padding rows.
    let (pidx, sq, sk) = ([0, -1, 0], [5, 3, 5], [7, 6, 4]);
    let args = AttnFwdArgs::new(q.view(), k.view(), v.view())
        .prefix(kp.view(), vp.view())
        .prefix_index(&pidx)
        .seqlens(&sq, &sk)
        .causal(causal);
    let dense = Dense::from_args(&args).unwrap();
    let out = dense.forward(Precision::Exact);
    let d_o: Vec<f64> = dov.iter().map(|&x| x as f64).collect();
    let g = dense.backward(&d_o, Precision::Exact);

    let mut case = String::new();
    writeln!(case, "{b} {tq} {tk} {h} {d} {p} {}", causal as i32).unwrap();
    for m in [&pidx, &sq, &sk] {
        push(&mut case, m.iter().map(|x| x.to_string()));
    }
    for x in [&qv, &kv, &vv, &kpv, &vpv, &dov] {
        push(&mut case, x.iter().map(|x| format!("{x:e}")));
    }
    for x in [&out.o, &out.lse, &g.dq, &g.dk, &g.dv, &g.dk_pre, &g.dv_pre] {
        push(&mut case, x.iter().map(|x| format!("{x:e}")));
    }
    emu_case(&mut case, &mut rng);
    decode_case(&mut case, &mut rng);
    let dir = tempfile::tempdir().unwrap();
    let case_path = dir.path().join("case.txt");
    std::fs::write(&case_path, case).unwrap();

    let exe = dir.path().join("c_api");
    let build = Command::new(cc())
        .args([
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-O1",
        ])
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join("tests/c/c_api.c"))
        .arg(staticlib())
        .args(["-lpthread", "-ldl", "-lm", "-lstdc++", "-o"])
        .arg(&exe)
        .output()
        .expect("C compiler runs");
    assert!(
        build.status.success(),
        "C test does not build:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let built = t0.elapsed();
    let run = Command::new(&exe).arg(&case_path).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&run.stderr));
    println!(
        "seed {seed}: C test built in {:.2} s, ran in {:.2} s",
        built.as_secs_f64(),
        (t0.elapsed() - built).as_secs_f64()
    );
    assert!(run.status.success(), "C test failed (seed {seed})");
    assert!(stdout.contains("all C checks passed"));
}

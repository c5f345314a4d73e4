//! `scripts/gpu-check.sh`: its library discovery against a fake pip layout, and its answer on a
//! machine without a GPU (one clear line, within seconds, written to `$OUT` too).

mod common;

use common::files::tmp_dir;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-check.sh")
}

#[test]
fn libdirs_finds_every_nvidia_lib_of_a_namespace_package_and_the_toolkit() {
    let root = tmp_dir("gpu-check-libdirs");
    // Two site-packages folders both holding part of the `nvidia` namespace package (as pip
    // lays out torch's CUDA wheels), none with an __init__.py; a folder without lib/ and a
    // plain file named lib must not be listed.
    let site_a = root.join("a/site-packages");
    let site_b = root.join("b/site-packages");
    for d in [
        site_a.join("nvidia/cu13/lib"),
        site_a.join("nvidia/cublas/lib"),
        site_a.join("nvidia/nolib/include"),
        site_b.join("nvidia/cuda_nvrtc/lib"),
        site_b.join("nvidia/filelib"),
        root.join("toolkit/lib64"),
    ] {
        std::fs::create_dir_all(&d).unwrap();
    }
    std::fs::write(site_b.join("nvidia/filelib/lib"), b"not a folder").unwrap();
    let out = Command::new("bash")
        .arg(script())
        .arg("libdirs")
        .env(
            "PYTHONPATH",
            format!("{}:{}", site_a.display(), site_b.display()),
        )
        .env("CUDA_HOME", root.join("toolkit"))
        .env_remove("CUDA_PATH")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let got: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    let want_first = [
        site_a.join("nvidia/cu13/lib"),
        site_a.join("nvidia/cublas/lib"),
        site_b.join("nvidia/cuda_nvrtc/lib"),
        root.join("toolkit/lib64"),
    ];
    let want_first: Vec<String> = want_first.iter().map(|p| p.display().to_string()).collect();
    // /usr/local/cuda may add its own folders after ours on a CUDA machine.
    assert!(got.len() >= want_first.len(), "{got:?}");
    assert_eq!(&got[..want_first.len()], &want_first[..], "{got:?}");
    assert!(
        got[want_first.len()..]
            .iter()
            .all(|l| l.starts_with("/usr/local/cuda/")),
        "{got:?}"
    );
}

#[test]
fn run_without_a_gpu_says_so_in_one_line_within_seconds() {
    if prefix_attn::device::cuda::device_count() > 0 {
        // On a CUDA machine `run` is the real check (minutes), not this answer.
        eprintln!("skipped: a CUDA device is present");
        return;
    }
    let out_dir = tmp_dir("gpu-check-run");
    let t0 = Instant::now();
    let out = Command::new("bash")
        .arg(script())
        .arg("run")
        .env("OUT", out_dir.as_path())
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(out.status.code(), Some(77), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(
        lines[0].starts_with("gpu-check: no CUDA GPU on this machine (")
            && lines[0].ends_with("nothing was run"),
        "{stdout}"
    );
    // The same line is in $OUT as it happened.
    let log = std::fs::read_to_string(out_dir.join("gpu-check.log")).unwrap();
    assert_eq!(log.trim_end(), lines[0]);
}

//! Files for the tests: the committed fixtures, temporary folders that clean up after
//! themselves, and the `prefix-attn` binary run as a user runs it.

use std::ffi::OsStr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// A committed fixture under `tests/fixtures/gpt2`: relative to the current folder when the
/// tests run in the crate root (so messages name short paths), else under the crate root.
pub fn fixture(name: &str) -> PathBuf {
    let rel = Path::new("tests/fixtures/gpt2").join(name);
    if rel.exists() {
        rel
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }
}

/// A committed Llama-family fixture under `tests/fixtures/llama` (as [`fixture`]).
pub fn llama_fixture(name: &str) -> PathBuf {
    let rel = Path::new("tests/fixtures/llama").join(name);
    if rel.exists() {
        rel
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }
}

/// A path in a fresh temporary folder of its own (under `TMPDIR`, named
/// `prefix-attn-<tag>-<random>`) that is removed, with everything in it, when this guard
/// drops: when the test returns and when it panics. Dereferences to the path. Unique per
/// call, so tests running in parallel never share one.
pub struct TmpPath {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Deref for TmpPath {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.path
    }
}

impl AsRef<Path> for TmpPath {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

fn fresh(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("prefix-attn-{tag}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary folder for {tag}: {e}"))
}

/// A fresh, empty temporary folder (see [`TmpPath`]).
pub fn tmp_dir(tag: &str) -> TmpPath {
    let dir = fresh(tag);
    TmpPath {
        path: dir.path().to_path_buf(),
        _dir: dir,
    }
}

/// A path that does not exist yet, `<fresh folder>/<tag>`: for an output folder that the code
/// under test must create itself (see [`TmpPath`]).
pub fn tmp_out(tag: &str) -> TmpPath {
    let dir = fresh(tag);
    TmpPath {
        path: dir.path().join(tag),
        _dir: dir,
    }
}

/// Copies the plain files of `src` (not its sub-folders) into `dst`, creating it.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs the `prefix-attn` binary with `args`: (exit status, stdout, stderr).
pub fn cli<A: AsRef<OsStr>>(args: &[A]) -> (ExitStatus, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_prefix-attn"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status,
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Owned strings of string literals (command-line arguments).
pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// A JSON array of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array of ids, got {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap_or_else(|| panic!("not an id: {x}")) as u32)
        .collect()
}

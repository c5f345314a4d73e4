//! The shared test helpers keep their promises: a temporary folder is fresh, unique, under
//! `TMPDIR`, and gone with everything in it once its guard drops, also when the test panics.

mod common;

use common::files::{tmp_dir, tmp_out};
use common::rel_err;

#[test]
fn temporary_folders_are_fresh_unique_and_removed_on_drop() {
    let a = tmp_dir("helpers");
    let b = tmp_dir("helpers");
    assert_ne!(*a, *b, "two calls share a folder");
    assert!(a.is_dir() && std::fs::read_dir(&*a).unwrap().next().is_none());
    assert!(
        a.starts_with(std::env::temp_dir()),
        "{} not under TMPDIR",
        a.display()
    );
    let out = tmp_out("helpers-out");
    assert!(!out.exists() && out.parent().unwrap().is_dir());
    std::fs::create_dir_all(out.join("sub")).unwrap();
    std::fs::write(out.join("sub/file"), b"x").unwrap();
    let (a_path, out_root) = (a.to_path_buf(), out.parent().unwrap().to_path_buf());
    drop(a);
    drop(out);
    assert!(!a_path.exists(), "{} left behind", a_path.display());
    assert!(!out_root.exists(), "{} left behind", out_root.display());
    drop(b);
}

#[test]
fn a_panicking_test_leaves_no_temporary_folder() {
    let mut seen = None;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let d = tmp_dir("helpers-panic");
        std::fs::write(d.join("partial.json"), b"{").unwrap();
        seen = Some(d.to_path_buf());
        panic!("a failing test");
    }));
    assert!(r.is_err());
    let path = seen.expect("the closure ran");
    assert!(!path.exists(), "{} left behind", path.display());
}

#[test]
fn rel_err_is_max_abs_error_over_max_abs_reference() {
    // Errors 0.5, 0.5 and 4 against a largest reference of 8.
    assert_eq!(rel_err(&[1.0, -2.5, 4.0], &[1.5, -2.0, 8.0]), 0.5);
    assert_eq!(rel_err(&[3.0], &[3.0]), 0.0);
}

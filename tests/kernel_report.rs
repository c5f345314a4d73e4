//! The static kernel report's parser and occupancy rule (tools/kernel_report.py), on
//! committed hand-made SASS excerpts (tests/fixtures/sass/) and hand-computed occupancy
//! cases. Needs `python3` (`PYTHON` to pick another); no CUDA tools.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn tool(args: &[&str]) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(root.join("tools/kernel_report.py"))
        .args(args)
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (set PYTHON): {e}"));
    assert!(
        out.status.success(),
        "kernel_report.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("kernel_report.py prints JSON")
}

fn function<'a>(funcs: &'a Value, name: &str) -> &'a Value {
    funcs
        .as_array()
        .expect("a list of functions")
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("{name} not parsed"))
}

fn widths(v: &Value) -> Vec<u64> {
    ["8", "16", "32", "64", "128"]
        .iter()
        .map(|w| v["STG_by_width"][*w].as_u64().unwrap())
        .collect()
}

#[test]
fn cuobjdump_listing_counts_and_finds_the_innermost_hmma_loop() {
    let funcs = tool(&["parse-sass", "tests/fixtures/sass/toy.cuobjdump.sass"]);
    let f = function(&funcs, "toy_attn");
    assert_eq!(f["arch"], "sm_80");
    let t = &f["total"];
    assert_eq!(t["instructions"], 27);
    assert_eq!((t["HMMA"].as_u64(), t["LDSM"].as_u64()), (Some(4), Some(2)));
    assert_eq!(
        (t["LDGSTS"].as_u64(), t["BAR"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(widths(t), [2, 1, 1, 1, 1]);
    // Three backward branches (the nested loop, the key-tile loop, the cold block's jump
    // back); the branch-to-self is not a loop. The hot loop is the shortest one holding all
    // four HMMA: [0x30, 0x100], not the cold block's longer [0x30, 0x180].
    let l = &f["loop"];
    assert_eq!(l["backward_branches"], 3);
    assert_eq!(
        (l["start"].as_str(), l["end"].as_str()),
        (Some("0x0030"), Some("0x0100"))
    );
    assert_eq!(l["selected_by"], "HMMA");
    let c = &l["count"];
    assert_eq!(c["instructions"], 14);
    assert_eq!((c["HMMA"].as_u64(), c["LDSM"].as_u64()), (Some(4), Some(2)));
    assert_eq!(c["HMMA_per_LDSM"].as_f64(), Some(2.0));
    assert_eq!(
        (c["LDGSTS"].as_u64(), c["BAR"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(widths(c), [1, 0, 0, 0, 0]);
    // No forward branch inside; only the two predicated backward branches drop out.
    assert_eq!(l["every_iteration"]["instructions"], 12);
    assert_eq!(l["every_iteration"]["LDSM"], 2);

    // Without HMMA the hot loop is the one with global memory instructions, not the
    // arithmetic-only loop after it.
    let d = function(&funcs, "toy_dense");
    assert_eq!(d["loop"]["start"], "0x0020");
    assert_eq!(d["loop"]["end"], "0x0070");
    assert_eq!(d["loop"]["selected_by"], "global memory instructions");
    assert_eq!(d["loop"]["count"]["HMMA_per_LDSM"], Value::Null);
    assert_eq!(widths(&d["total"]), [0, 1, 0, 0, 0]);
}

#[test]
fn nvdisasm_listing_resolves_labels_and_source_lines() {
    let funcs = tool(&["parse-sass", "tests/fixtures/sass/toy.nvdisasm.sass"]);
    let f = function(&funcs, "toy_nvd");
    assert_eq!(f["arch"], "sm_90");
    let l = &f["loop"];
    assert_eq!(
        (l["start"].as_str(), l["end"].as_str()),
        (Some("0x0010"), Some("0x00b0"))
    );
    assert_eq!(l["backward_branches"], 1);
    // The loop statement is the backward branch's line; the span covers the body's lines of
    // that file (the header's line 40 is left out).
    assert_eq!(l["source"], "toy.cu:11");
    assert_eq!(l["source_lines"], "11-14");
    let c = &l["count"];
    assert_eq!((c["HMMA"].as_u64(), c["LDSM"].as_u64()), (Some(4), Some(3)));
    assert_eq!(c["instructions"], 11);
    assert_eq!(widths(c), [1, 0, 0, 0, 0]);
    // Every iteration: the branched-over LDSM (0x30), the predicated one (0x40) and the
    // predicated branches are out; the branch that leaves the loop (0xa0) skips nothing.
    let e = &l["every_iteration"];
    assert_eq!((e["HMMA"].as_u64(), e["LDSM"].as_u64()), (Some(4), Some(1)));
    assert_eq!(e["HMMA_per_LDSM"].as_f64(), Some(4.0));
    assert_eq!(e["instructions"], 6);
    assert_eq!(widths(e), [1, 0, 0, 0, 0]);
}

fn blocks(arch: &str, regs: u32, threads: u32, dynamic_smem: u32) -> (u64, Vec<String>) {
    let v = tool(&[
        "occupancy",
        "--arch",
        arch,
        "--regs",
        &regs.to_string(),
        "--threads",
        &threads.to_string(),
        "--dynamic-smem",
        &dynamic_smem.to_string(),
    ]);
    let by = v["limited_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    (v["blocks_per_sm"].as_u64().unwrap(), by)
}

#[test]
fn occupancy_follows_the_cuda_rule() {
    // 250 registers -> 8000 per warp, allocated 8192: 2 warps per sub-partition, 8 per SM,
    // two 4-warp blocks. 48 KiB + 1 KiB reserved would allow 4 on sm_90.
    assert_eq!(blocks("sm_90", 250, 128, 49152), (2, vec!["regs".into()]));
    // 64 registers, 4 warps: registers allow 8 blocks; 49 KiB per block: 164 KiB / 49 = 3
    // on sm_80, 228 / 49 = 4 on sm_90.
    assert_eq!(blocks("sm_80", 64, 128, 49152), (3, vec!["smem".into()]));
    assert_eq!(blocks("sm_90", 64, 128, 49152), (4, vec!["smem".into()]));
    // 32 registers, 8 warps: 64 warps per SM allow 8 blocks, and so do the registers.
    assert_eq!(
        blocks("sm_80", 32, 256, 0),
        (8, vec!["warps".into(), "regs".into()])
    );
    // Tiny blocks hit the 32 blocks per SM limit.
    assert_eq!(blocks("sm_90", 16, 32, 0), (32, vec!["blocks".into()]));
    // More shared memory than a block may opt in to (163 KiB on sm_80): no block fits.
    assert_eq!(blocks("sm_80", 32, 128, 164 * 1024).0, 0);
}

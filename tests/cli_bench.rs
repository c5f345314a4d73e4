//! The benchmark commands run and report what they promise (timings are never asserted).

mod common;

use common::files::cli;

fn json_of(args: &[&str]) -> serde_json::Value {
    let (status, stdout, stderr) = cli(args);
    assert!(status.success(), "{args:?}: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

#[test]
fn bench_step_reports_a_json_object() {
    let v = json_of(&[
        "bench", "step", "--shape", "tiny", "--warmup", "1", "--steps", "2", "--json",
    ]);
    for k in [
        "median_ms",
        "min_ms",
        "max_ms",
        "tokens_per_s",
        "peak_rss_mb",
    ] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {v}");
    }
    assert_eq!(v["batch"], 8);
    assert_eq!(v["seq"], 64);
}

#[test]
fn bench_attn_reports_every_figure() {
    let v = json_of(&[
        "bench",
        "attn",
        "--shape",
        "gpt2-train",
        "--reps",
        "1",
        "--json",
    ]);
    assert!(v["ceiling_gflops"].as_f64().is_some_and(|x| x > 0.0));
    let row = &v["rows"][0];
    assert_eq!(row["shape"], "gpt2-train");
    for k in [
        "fwd_ms",
        "bwd_ms",
        "fwd_gflops",
        "fwd_gbs",
        "fwd_roofline",
        "speedup_fwd",
        "speedup_bwd",
        "naive_extra_mb",
    ] {
        assert!(row[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {row}");
    }
}

#[test]
fn bench_decode_kernel_reports_bandwidth_against_the_copy() {
    let v = json_of(&[
        "bench",
        "decode-kernel",
        "--batches",
        "1,5",
        "--reps",
        "1",
        "--json",
    ]);
    assert_eq!(v["device"], "cpu");
    let copy = v["copy_gbs"].as_f64().unwrap();
    assert!(copy > 0.0, "{v}");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (r, b) in rows.iter().zip([1u64, 5]) {
        assert_eq!(r["batch"].as_u64(), Some(b));
        // Per sequence: 2 · (64 prefix + 2048 cached) K/V rows of 8 · 128 fp16, q and o.
        assert_eq!(
            r["bytes"].as_u64(),
            Some(b * (2 * 2112 * 2048 + 2 * 32 * 128 * 2))
        );
        let (gbs, ms) = (r["gb_per_s"].as_f64().unwrap(), r["ms"].as_f64().unwrap());
        let bytes = r["bytes"].as_f64().unwrap();
        assert!((gbs - bytes / (ms * 1e-3) / 1e9).abs() <= 1e-9 * gbs, "{r}");
        // The calls rotate through at least 128 MiB of inputs.
        let copies = r["input_copies"].as_u64().unwrap();
        assert!(copies * bytes as u64 >= 128 << 20 && (copies - 1) * (bytes as u64) < 128 << 20);
        let frac = r["fraction_of_copy"].as_f64().unwrap();
        assert!((frac - gbs / copy).abs() <= 1e-12 * frac.max(1.0), "{r}");
    }
    // The goals: 50 % at B = 1, none at B = 5.
    assert_eq!(rows[0]["h200_goal"].as_f64(), Some(0.5));
    assert_eq!(
        rows[0]["goal_met"].as_bool(),
        Some(rows[0]["fraction_of_copy"].as_f64().unwrap() >= 0.5)
    );
    assert!(rows[1]["h200_goal"].is_null() && rows[1]["goal_met"].is_null());
    let (status, _, stderr) = cli(&["bench", "decode-kernel", "--device", "emu"]);
    assert!(!status.success() && stderr.contains("emulator"), "{stderr}");
    let (status, _, stderr) = cli(&["bench", "decode-kernel", "--batches", "0"]);
    assert!(
        !status.success() && stderr.contains("--batches"),
        "{stderr}"
    );
}

#[test]
fn bench_serve_drives_real_servers_and_reports_each_configuration() {
    let work = common::files::tmp_out("bench-serve");
    let (status, stdout, stderr) = cli(&[
        "bench",
        "serve",
        "--workdir",
        &common::files::s(&work),
        "--shape",
        "tiny",
        "--concurrency",
        "1,4",
        "--adapters",
        "1,5",
        "--max-adapters",
        "2",
        "--requests",
        "6",
        "--max-tokens",
        "3",
        "--json",
    ]);
    assert!(status.success(), "{stderr}");
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let configs: Vec<(u64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["adapters"].as_u64().unwrap(),
                r["concurrency"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(configs, [(1, 1), (1, 4), (5, 1), (5, 4)]);
    for r in &rows {
        assert_eq!(r["requests"], 6, "{r}");
        let tokens = r["tokens"].as_u64().unwrap();
        assert!((1..=18).contains(&tokens), "{r}");
        let (p50, p99) = (r["p50_ms"].as_f64().unwrap(), r["p99_ms"].as_f64().unwrap());
        assert!(p50 > 0.0 && p99 >= p50, "{r}");
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
        // The server's own counters saw the run: at least one step, at most the batch.
        let per_step = r["tokens_per_step"].as_f64().unwrap();
        let conc = r["concurrency"].as_f64().unwrap();
        assert!(per_step >= 1.0 && per_step <= conc, "{r}");
    }
    // One adapter stays in the table after the warm-up; five over two slots keep loading.
    assert_eq!(rows[0]["adapter_loads"], 0.0);
    assert_eq!(rows[1]["adapter_loads"], 0.0);
    let loads5 =
        rows[2]["adapter_loads"].as_f64().unwrap() + rows[3]["adapter_loads"].as_f64().unwrap();
    let evictions5 = rows[2]["adapter_evictions"].as_f64().unwrap()
        + rows[3]["adapter_evictions"].as_f64().unwrap();
    assert!(loads5 >= 1.0 && evictions5 >= 1.0, "{rows:?}");
}

#[test]
fn bench_serve_refuses_an_existing_workdir() {
    let dir = common::files::tmp_dir("bench-serve-exists");
    let (status, _, stderr) = cli(&[
        "bench",
        "serve",
        "--shape",
        "tiny",
        "--workdir",
        &common::files::s(&dir),
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("--workdir") && stderr.contains("exists"),
        "{stderr}"
    );
}

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

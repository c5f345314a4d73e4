//! `bench serve`: a load benchmark of `prefix-attn serve`. It writes a random model and a
//! directory of adapters, starts one real server process per adapter count (the same binary,
//! on a free loopback port), and drives each with closed-loop clients (each sends its next
//! request when the previous one is answered) at every concurrency level, over HTTP, as a user
//! would. It reports throughput (generated tokens per second) and the p50/p99 latency of whole
//! requests, plus the server's own counters (engine steps, adapter loads and evictions).
//!
//! The servers run side by side and the measurements are interleaved: repetition `r` runs
//! every (concurrency, adapter count) pair before repetition `r + 1` starts, so a slow minute
//! of the machine falls on every configuration alike, and the median repetition is reported.
//!
//! With more adapters in the directory than slots in the device prefix table
//! (`--max-adapters`), requests pick their adapter uniformly, so most of them find theirs
//! evicted and read it from disk again: the cost measured is the server's adapter cache, warm
//! (the files are in the OS page cache and the server has answered a warm-up round).

use crate::error::{Error, Result};
use crate::gpt2::random::{small_config, write_random_model};
use crate::lm::Geometry;
use crate::prefix::{AdapterConfig, PrefixAdapter};
use crate::rng::Rng;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Clone, Debug)]
pub struct ServeBench {
    /// The `prefix-attn` executable that serves.
    pub exe: PathBuf,
    /// `tiny` (3 layers, 4 heads of 16, vocab 503) or `gpt2-small` (12 layers, 12 heads of
    /// 64, vocab 50,257).
    pub shape: String,
    /// Concurrency levels (clients sending requests back to back).
    pub concurrency: Vec<usize>,
    /// Adapter counts in the directory, one server each.
    pub adapters: Vec<usize>,
    /// Requests per concurrency level; `None`: `max(16, 4 · concurrency)`.
    pub requests: Option<usize>,
    /// Prompt tokens per request (random ids).
    pub prompt_len: usize,
    /// `max_tokens` of every request (greedy).
    pub max_tokens: usize,
    /// Virtual tokens per adapter.
    pub prefix_len: usize,
    /// Slots of each server's device prefix table (`serve --max-adapters`).
    pub max_adapters: usize,
    /// Sequences per engine step (`serve --max-batch`).
    pub max_batch: usize,
    /// Repetitions of every configuration (the median is reported).
    pub reps: usize,
    /// `serve --device`.
    pub device: String,
    /// Where the model and adapters are written (a temporary folder, removed at the end,
    /// when `None`).
    pub workdir: Option<PathBuf>,
}

impl ServeBench {
    /// The configuration at `shape`: concurrency 1, 8, 64; 1, 8 and 1,000 adapters;
    /// 16-token prompts, 32 new tokens, P = 10, 64 table slots, batches of up to 64.
    pub fn named(shape: &str, exe: PathBuf) -> Result<ServeBench> {
        bench_config(shape)?;
        Ok(ServeBench {
            exe,
            shape: shape.to_string(),
            concurrency: vec![1, 8, 64],
            adapters: vec![1, 8, 1000],
            requests: None,
            prompt_len: 16,
            max_tokens: 32,
            prefix_len: 10,
            max_adapters: 64,
            max_batch: 64,
            reps: 1,
            device: "cpu".into(),
            workdir: None,
        })
    }

    fn requests_at(&self, concurrency: usize) -> usize {
        self.requests.unwrap_or((4 * concurrency).max(16))
    }
}

fn bench_config(shape: &str) -> Result<crate::gpt2::Gpt2Config> {
    match shape {
        "tiny" => Ok(small_config(3, 4, 16, 503, 256)),
        "gpt2-small" => Ok(small_config(12, 12, 64, 50257, 1024)),
        other => Err(Error::index(
            "--shape",
            format!("{other}: expected tiny or gpt2-small"),
        )),
    }
}

/// One measured (adapter count, concurrency) configuration: the median repetition by
/// throughput.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServeRow {
    /// Adapters in the server's directory.
    pub adapters: usize,
    /// Clients sending requests back to back.
    pub concurrency: usize,
    /// Requests answered.
    pub requests: usize,
    /// Tokens generated in all (`usage.completion_tokens` summed).
    pub tokens: usize,
    /// Wall time from the first request sent to the last answer, seconds.
    pub seconds: f64,
    /// `tokens / seconds`.
    pub tokens_per_s: f64,
    /// Median latency of a whole request (sent to answered), milliseconds.
    pub p50_ms: f64,
    /// 99th-percentile latency (nearest rank), milliseconds.
    pub p99_ms: f64,
    /// Engine steps the server ran meanwhile (from its `/metrics`).
    pub engine_steps: f64,
    /// Generated tokens per engine step: the mean batch.
    pub tokens_per_step: f64,
    /// Adapters the server read from disk meanwhile.
    pub adapter_loads: f64,
    /// Adapters it evicted from its prefix table meanwhile.
    pub adapter_evictions: f64,
    /// Throughput of every repetition, in order.
    pub reps_tokens_per_s: Vec<f64>,
}

/// A served process on a free loopback port, stopped with SIGTERM (then killed) on drop.
struct ServerProcess {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    fn start(exe: &Path, args: &[String]) -> Result<ServerProcess> {
        let mut child = Command::new(exe)
            .arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| Error::Io {
                path: exe.to_path_buf(),
                source,
            })?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| Error::Unsupported("bench serve: no stderr pipe".into()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                if let Ok(mut l) = log2.lock() {
                    l.push(line);
                }
            }
        });
        let mut server = ServerProcess {
            child,
            base: String::new(),
            log,
        };
        // A GPT-2-small model takes a few seconds to load.
        match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(addr) => server.base = format!("http://{addr}"),
            Err(_) => {
                return Err(Error::Unsupported(format!(
                    "bench serve: the server did not start: {}",
                    server.log_tail()
                )))
            }
        }
        Ok(server)
    }

    fn log_tail(&self) -> String {
        let l = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        l[l.len().saturating_sub(5)..].join(" | ")
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .build()
            .into()
    }

    /// `POST /v1/completions`: the status and the body.
    fn complete(&self, agent: &ureq::Agent, body: &Value) -> Result<(u16, Value)> {
        let http = |e: ureq::Error| Error::Unsupported(format!("bench serve: HTTP: {e}"));
        let mut r = agent
            .post(&format!("{}/v1/completions", self.base))
            .send_json(body)
            .map_err(http)?;
        let status = r.status().as_u16();
        let v: Value = r.body_mut().read_json().map_err(http)?;
        Ok((status, v))
    }

    /// The value of an unlabelled sample of `/metrics`.
    fn metric(&self, name: &str) -> Result<f64> {
        let http = |e: ureq::Error| Error::Unsupported(format!("bench serve: /metrics: {e}"));
        let text = Self::agent()
            .get(&format!("{}/metrics", self.base))
            .call()
            .map_err(http)?
            .body_mut()
            .read_to_string()
            .map_err(http)?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .ok_or_else(|| Error::Unsupported(format!("bench serve: /metrics has no {name}")))
    }

    fn counters(&self) -> Result<[f64; 4]> {
        Ok([
            self.metric("prefix_attn_engine_steps_total")?,
            self.metric("prefix_attn_generation_tokens_total")?,
            self.metric("prefix_attn_adapter_loads_total")?,
            self.metric("prefix_attn_adapter_evictions_total")?,
        ])
    }

    /// SIGTERM, then waits for the exit; an error if it did not exit 0.
    fn stop(mut self) -> Result<()> {
        #[cfg(unix)]
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        #[cfg(not(unix))]
        let _ = self.child.kill();
        let status = self.child.wait().map_err(|source| Error::Io {
            path: PathBuf::from("prefix-attn serve"),
            source,
        })?;
        if cfg!(unix) && !status.success() {
            return Err(Error::Unsupported(format!(
                "bench serve: the server exited with {status}: {}",
                self.log_tail()
            )));
        }
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Removes the folder it names when dropped (the benchmark's own temporary folder).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the model, `max(adapters)` adapter folders `a0000 …` under `all/`, and for each
/// adapter count `k` a directory `adapters-k/` holding the first `k` of them (hard links:
/// no copies). Returns the model folder and the directory of each count.
fn write_inputs(b: &ServeBench, root: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let cfg = bench_config(&b.shape)?;
    let model = root.join("model");
    write_random_model(&model, &cfg, 0x5eed, 0.02)?;
    let geometry = Geometry::from(&cfg);
    let config = AdapterConfig::for_model(geometry, b.prefix_len, 512);
    let most = b.adapters.iter().copied().max().unwrap_or(0);
    let all = root.join("all");
    let mut rng = Rng::new(17);
    for i in 0..most {
        PrefixAdapter {
            config: config.clone(),
            prompt_embeddings: rng.normal_vec(b.prefix_len * geometry.prefix_width(), 0.5),
        }
        .save(&all.join(format!("a{i:04}")))?;
    }
    let mut dirs = Vec::new();
    for &k in &b.adapters {
        let dir = root.join(format!("adapters-{k}"));
        for i in 0..k {
            let name = format!("a{i:04}");
            let to = dir.join(&name);
            std::fs::create_dir_all(&to).map_err(io_err(&to))?;
            for file in ["adapter_config.json", "adapter_model.safetensors"] {
                let dst = to.join(file);
                std::fs::hard_link(all.join(&name).join(file), &dst).map_err(io_err(&dst))?;
            }
        }
        dirs.push(dir);
    }
    Ok((model, dirs))
}

/// The result of one closed-loop run.
struct Run {
    tokens: usize,
    seconds: f64,
    latencies_ms: Vec<f64>,
}

/// `requests` greedy completions sent by `concurrency` clients back to back, request `j`
/// with a random prompt and a random adapter of `a0000 .. a{k-1}` (seeded by `seed` and
/// `j`). Any answer but 200 is an error.
fn closed_loop(
    server: &ServerProcess,
    b: &ServeBench,
    k: usize,
    concurrency: usize,
    requests: usize,
    max_tokens: usize,
    seed: u64,
    vocab: u64,
) -> Result<Run> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(f64, usize)>> = Mutex::new(Vec::with_capacity(requests));
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..concurrency {
            scope.spawn(|| {
                let agent = ServerProcess::agent();
                loop {
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    if j >= requests || failure.lock().map_or(true, |f| f.is_some()) {
                        return;
                    }
                    let mut rng = Rng::new(seed ^ (j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    let prompt: Vec<u64> = (0..b.prompt_len).map(|_| rng.below(vocab)).collect();
                    let adapter = format!("a{:04}", rng.below(k as u64));
                    let body = json!({
                        "model": adapter, "prompt": prompt, "max_tokens": max_tokens,
                        "temperature": 0,
                    });
                    let t = Instant::now();
                    let answer = server.complete(&agent, &body).and_then(|(status, v)| {
                        if status != 200 {
                            return Err(Error::Unsupported(format!(
                                "bench serve: request {j} ({adapter}) got {status}: {v}"
                            )));
                        }
                        v["usage"]["completion_tokens"]
                            .as_u64()
                            .map(|n| n as usize)
                            .ok_or_else(|| {
                                Error::Unsupported(format!(
                                    "bench serve: request {j}: no usage.completion_tokens in {v}"
                                ))
                            })
                    });
                    match answer {
                        Ok(n) => {
                            let ms = t.elapsed().as_secs_f64() * 1e3;
                            if let Ok(mut r) = results.lock() {
                                r.push((ms, n));
                            }
                        }
                        Err(e) => {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(e);
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    let seconds = t0.elapsed().as_secs_f64();
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    let results = results.into_inner().unwrap_or_default();
    Ok(Run {
        tokens: results.iter().map(|r| r.1).sum(),
        seconds,
        latencies_ms: results.iter().map(|r| r.0).collect(),
    })
}

/// The `q`-quantile of `v` by nearest rank (`v` not empty).
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// Runs the benchmark; `progress` receives a line as each measurement ends. Rows come
/// grouped by adapter count, then by concurrency, in the order given.
pub fn bench_serve(b: &ServeBench, progress: &mut dyn FnMut(&str)) -> Result<Vec<ServeRow>> {
    if b.concurrency.contains(&0) || b.adapters.contains(&0) || b.concurrency.is_empty() {
        return Err(Error::index(
            "bench serve",
            "concurrency levels and adapter counts must be at least 1",
        ));
    }
    if b.prompt_len == 0 || b.max_tokens == 0 || b.prefix_len == 0 || b.reps == 0 {
        return Err(Error::index(
            "bench serve",
            "prompt length, max tokens, prefix length and repetitions must be at least 1",
        ));
    }
    let vocab = bench_config(&b.shape)?.vocab_size as u64;
    let (root, _guard) = match &b.workdir {
        Some(d) => (d.clone(), RemoveOnDrop(None)),
        None => {
            let d = std::env::temp_dir()
                .join(format!("prefix-attn-bench-serve-{}", std::process::id()));
            (d.clone(), RemoveOnDrop(Some(d)))
        }
    };
    std::fs::create_dir_all(&root).map_err(io_err(&root))?;
    progress(&format!(
        "writing a random {} model and {} adapters under {}",
        b.shape,
        b.adapters.iter().max().unwrap_or(&0),
        root.display()
    ));
    let (model, dirs) = write_inputs(b, &root)?;
    // Enough pages for every sequence of a full batch (the prefix is in the table, not in
    // the pages), and more than one whole context, which the server wants.
    let context = bench_config(&b.shape)?.n_positions;
    let pages = b.max_batch * (b.prompt_len + b.max_tokens).div_ceil(16) + context / 16 + 1;
    let mut servers = Vec::new();
    for (&k, dir) in b.adapters.iter().zip(&dirs) {
        let args: Vec<String> = [
            "--model",
            &model.to_string_lossy(),
            "--adapters-dir",
            &dir.to_string_lossy(),
            "--max-adapters",
            &b.max_adapters.to_string(),
            "--max-batch",
            &b.max_batch.to_string(),
            "--max-queue",
            &(b.concurrency.iter().max().unwrap_or(&1) * 2).to_string(),
            "--num-pages",
            &pages.to_string(),
            "--prefix-len",
            &b.prefix_len.to_string(),
            "--device",
            &b.device,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s = ServerProcess::start(&b.exe, &args)?;
        progress(&format!("server for {k} adapters at {}", s.base));
        // Warm-up: every code path once, and the first adapters read.
        closed_loop(&s, b, k, 8, 16, 4, 0xabcd, vocab)?;
        servers.push(s);
    }
    // runs[config][rep], config = adapter index × concurrency index.
    let nc = b.concurrency.len();
    let mut runs: Vec<Vec<(Run, [f64; 4])>> = (0..b.adapters.len() * nc).map(|_| vec![]).collect();
    for rep in 0..b.reps {
        for (ci, &c) in b.concurrency.iter().enumerate() {
            for (ai, &k) in b.adapters.iter().enumerate() {
                let s = &servers[ai];
                let before = s.counters()?;
                let n = b.requests_at(c);
                let run = closed_loop(s, b, k, c, n, b.max_tokens, 0x1000 + rep as u64, vocab)?;
                let after = s.counters()?;
                let delta = [0, 1, 2, 3].map(|i| after[i] - before[i]);
                progress(&format!(
                    "rep {}/{}: {k:>4} adapters, concurrency {c:>3}: {n} requests, {:.1} tokens/s",
                    rep + 1,
                    b.reps,
                    run.tokens as f64 / run.seconds
                ));
                runs[ai * nc + ci].push((run, delta));
            }
        }
    }
    for s in servers {
        s.stop()?;
    }
    let mut rows = Vec::new();
    for (ai, &k) in b.adapters.iter().enumerate() {
        for (ci, &c) in b.concurrency.iter().enumerate() {
            let reps = &runs[ai * nc + ci];
            let tps: Vec<f64> = reps
                .iter()
                .map(|(r, _)| r.tokens as f64 / r.seconds)
                .collect();
            let mut order: Vec<usize> = (0..reps.len()).collect();
            order.sort_by(|&x, &y| tps[x].total_cmp(&tps[y]));
            let (run, d) = &reps[order[order.len() / 2]];
            rows.push(ServeRow {
                adapters: k,
                concurrency: c,
                requests: run.latencies_ms.len(),
                tokens: run.tokens,
                seconds: run.seconds,
                tokens_per_s: run.tokens as f64 / run.seconds,
                p50_ms: quantile(&run.latencies_ms, 0.5),
                p99_ms: quantile(&run.latencies_ms, 0.99),
                engine_steps: d[0],
                tokens_per_step: if d[0] > 0.0 { d[1] / d[0] } else { 0.0 },
                adapter_loads: d[2],
                adapter_evictions: d[3],
                reps_tokens_per_s: tps,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
    }
}

//! `prefix-attn serve` against a server started on a free port: completions equal offline
//! `generate` (greedy and seeded sampling, streamed or not), many concurrent requests over
//! several adapters, bad requests and their error objects, the bounded queue, cancellation
//! freeing pages, and SIGTERM with requests in flight.

mod common;

use common::files::{cli, fixture, ids, s, strings, tmp_dir};
use prefix_attn::prefix::PrefixAdapter;
use prefix_attn::rng::Rng;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(args: &[String]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_prefix-attn"))
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("server: {line}");
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap().to_string();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server did not start");
        Server {
            child,
            base: format!("http://{addr}"),
        }
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut r = Self::agent()
            .post(&format!("{}{path}", self.base))
            .send_json(body)
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_json().unwrap())
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut r = Self::agent()
            .get(&format!("{}{path}", self.base))
            .call()
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing"))
            .parse()
            .unwrap()
    }

    /// The streamed chunks of a completion (until `[DONE]`).
    fn stream(&self, body: &Value) -> Vec<Value> {
        let r = Self::agent()
            .post(&format!("{}/v1/completions", self.base))
            .send_json(body)
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let mut out = Vec::new();
        for line in BufReader::new(r.into_body().into_reader()).lines() {
            let line = line.unwrap();
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                return out;
            }
            out.push(serde_json::from_str(data).unwrap());
        }
        panic!("the stream ended without [DONE]");
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` adapters: fixture `tiny-a`'s with noise, saved under `dir/a0`, `dir/a1`, ...
fn adapters(dir: &Path, n: usize) {
    adapters_of("tiny-a", dir, n)
}

fn adapters_of(fx: &str, dir: &Path, n: usize) {
    let base = PrefixAdapter::load(&fixture(fx).join("adapter")).unwrap();
    let mut rng = Rng::new(41);
    for i in 0..n {
        let mut ad = base.clone();
        for x in ad.prompt_embeddings.iter_mut() {
            *x += 0.5 * rng.normal() as f32;
        }
        ad.save(&dir.join(format!("a{i}"))).unwrap();
    }
}

/// Offline `generate --data` over the adapters of `dir` for `lines` (JSON requests).
fn offline(dir: &Path, n_adapters: usize, lines: &[Value], extra: &[&str]) -> Vec<Value> {
    let data = dir.join(format!("req-{}.jsonl", lines.len()));
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&data, text).unwrap();
    let mut args = strings(&["generate", "--model"]);
    args.push(s(&fixture("tiny-a").join("model")));
    for i in 0..n_adapters {
        args.push("--adapter".into());
        args.push(format!("a{i}={}", s(&dir.join(format!("a{i}")))));
    }
    args.push("--data".into());
    args.push(s(&data));
    args.extend(extra.iter().map(|x| x.to_string()));
    let (status, out, err) = cli(&args);
    assert!(status.success(), "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn serve_args(dir: &Path, extra: &[&str]) -> Vec<String> {
    serve_args_of("tiny-a", dir, extra)
}

fn serve_args_of(fx: &str, dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = strings(&["--model"]);
    a.push(s(&fixture(fx).join("model")));
    a.push("--adapters-dir".into());
    a.push(s(dir));
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

#[test]
fn completions_equal_offline_generate_streamed_or_not() {
    let dir = tmp_dir("serve-eq");
    adapters(&dir, 2);
    let srv = Server::start(&serve_args(&dir, &[]));
    let prompt = "name : The Eagle |";
    // Greedy, adapter a1 and the bare model.
    let want = offline(
        &dir,
        2,
        &[
            json!({"prompt": prompt, "adapter": "a1", "max_new_tokens": 12}),
            json!({"prompt": prompt, "adapter": null, "max_new_tokens": 12}),
        ],
        &[],
    );
    for (model, w) in [("a1", &want[0]), ("model", &want[1])] {
        let body = json!({"model": model, "prompt": prompt, "max_tokens": 12,
                          "temperature": 0, "return_token_ids": true});
        let (st, r) = srv.post("/v1/completions", &body);
        assert_eq!(st, 200, "{r}");
        let c = &r["choices"][0];
        assert_eq!(ids(&c["token_ids"]), ids(&w["ids"]), "{model}");
        assert_eq!(c["text"], w["text"]);
        assert_eq!(c["finish_reason"], w["finish_reason"]);
        assert_eq!(r["usage"]["completion_tokens"], ids(&w["ids"]).len());
        let mut body = body.clone();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let chunks = srv.stream(&body);
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(text, w["text"].as_str().unwrap(), "{model} streamed");
        let streamed: Vec<u32> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["token_ids"].as_array())
            .flat_map(|a| a.iter().map(|x| x.as_u64().unwrap() as u32))
            .collect();
        assert_eq!(streamed, ids(&w["ids"]));
        let last = chunks.last().unwrap();
        assert_eq!(last["usage"]["completion_tokens"], streamed.len());
    }
    // Seeded sampling, n = 3: choice c is request c of the offline file with --seed.
    let lines = vec![json!({"prompt": prompt, "adapter": "a0", "max_new_tokens": 10}); 3];
    let want = offline(
        &dir,
        2,
        &lines,
        &["--temperature", "0.9", "--top-k", "50", "--seed", "11"],
    );
    let body = json!({"model": "a0", "prompt": prompt, "max_tokens": 10, "n": 3,
                      "temperature": 0.9, "top_k": 50, "seed": 11, "return_token_ids": true});
    let (st, r) = srv.post("/v1/completions", &body);
    assert_eq!(st, 200, "{r}");
    let got: Vec<Vec<u32>> = (0..3).map(|c| ids(&r["choices"][c]["token_ids"])).collect();
    let exp: Vec<Vec<u32>> = want.iter().map(|w| ids(&w["ids"])).collect();
    assert_eq!(got, exp);
    assert_ne!(got[0], got[1], "different choices draw differently");
    // Stop strings: the text ends before the stop, as offline.
    let stop = want[0]["text"]
        .as_str()
        .unwrap()
        .chars()
        .skip(3)
        .take(2)
        .collect::<String>();
    let want = offline(
        &dir,
        2,
        &[json!({"prompt": prompt, "adapter": "a1", "max_new_tokens": 12})],
        &["--stop", &stop],
    );
    let body = json!({"model": "a1", "prompt": prompt, "max_tokens": 12, "temperature": 0,
                      "stop": stop});
    let (_, r) = srv.post("/v1/completions", &body);
    assert_eq!(r["choices"][0]["text"], want[0]["text"]);
    assert_eq!(r["choices"][0]["finish_reason"], want[0]["finish_reason"]);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let text: String = srv
        .stream(&sb)
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, want[0]["text"].as_str().unwrap());
}

/// `n` concurrent greedy requests over adapters `a0 .. a{k-1}` (request `i` uses `a{i % k}`,
/// a random prompt of 1–6 ids, `max_tokens` 9), all sent at once, each checked for 200 and
/// against offline `generate --data` over the same adapters.
fn concurrent_requests_equal_offline(srv: &Server, dir: &Path, n: usize, k: usize) {
    let mut rng = Rng::new(5);
    let prompts: Vec<Vec<u32>> = (0..n)
        .map(|_| {
            (0..1 + rng.below(6))
                .map(|_| rng.below(500) as u32)
                .collect()
        })
        .collect();
    let lines: Vec<Value> = prompts
        .iter()
        .enumerate()
        .map(
            |(i, p)| json!({"input_ids": p, "adapter": format!("a{}", i % k), "max_new_tokens": 9}),
        )
        .collect();
    let want = offline(dir, k, &lines, &[]);
    let base = srv.base.clone();
    let handles: Vec<_> = prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let url = format!("{base}/v1/completions");
            std::thread::spawn(move || {
                let body = json!({"model": format!("a{}", i % k), "prompt": p, "max_tokens": 9,
                                  "temperature": 0, "return_token_ids": true});
                let mut r = Server::agent().post(&url).send_json(&body).unwrap();
                let status = r.status().as_u16();
                let v: Value = r.body_mut().read_json().unwrap();
                assert_eq!(status, 200, "request {i}: {v}");
                ids(&v["choices"][0]["token_ids"])
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), ids(&want[i]["ids"]), "request {i}");
    }
    assert_eq!(srv.metric("prefix_attn_kv_pages_in_use"), 0.0);
    assert_eq!(srv.metric("prefix_attn_queue_length"), 0.0);
}

#[test]
fn sixty_four_concurrent_requests_over_eight_adapters() {
    let dir = tmp_dir("serve-64");
    adapters(&dir, 8);
    let srv = Server::start(&serve_args(&dir, &["--max-adapters", "8"]));
    concurrent_requests_equal_offline(&srv, &dir, 64, 8);
    assert_eq!(srv.metric("prefix_attn_adapters_loaded"), 8.0);
}

#[test]
fn requests_for_more_adapters_than_slots_wait_for_a_slot() {
    // Six adapters in flight at once over two slots: the requests whose adapter finds no
    // free slot wait until one is given back (no 429), then answer as offline.
    let dir = tmp_dir("serve-wait-slot");
    adapters(&dir, 6);
    let srv = Server::start(&serve_args(&dir, &["--max-adapters", "2"]));
    concurrent_requests_equal_offline(&srv, &dir, 24, 6);
    assert_eq!(srv.metric("prefix_attn_adapters_loaded"), 2.0);
    assert!(srv.metric("prefix_attn_adapter_loads_total") >= 6.0);
    assert_eq!(srv.metric("prefix_attn_requests_cancelled_total"), 0.0);
}

#[test]
fn bad_requests_get_their_status_and_a_json_error() {
    let dir = tmp_dir("serve-bad");
    adapters(&dir, 1);
    let srv = Server::start(&serve_args(
        &dir,
        &["--api-key", "sekret", "--max-tokens-limit", "20"],
    ));
    let agent = Server::agent();
    let url = format!("{}/v1/completions", srv.base);
    let send = |body: &str, key: Option<&str>| -> (u16, Value) {
        let mut req = agent.post(&url).header("content-type", "application/json");
        if let Some(k) = key {
            req = req.header("authorization", &format!("Bearer {k}"));
        }
        let mut r = req.send(body).unwrap();
        (r.status().as_u16(), r.body_mut().read_json().unwrap())
    };
    let long: Vec<u32> = (0..70).map(|i| i % 400).collect();
    let cases: Vec<(String, Option<&str>, u16, Option<&str>)> = vec![
        (
            r#"{"model": "model", "prompt": "x"}"#.into(),
            None,
            401,
            None,
        ),
        (
            r#"{"model": "model", "prompt": "x"}"#.into(),
            Some("wrong"),
            401,
            None,
        ),
        ("{not json".into(), Some("sekret"), 400, None),
        (
            r#"{"model": "model", "prompt": "x", "max_tokens": "ten"}"#.into(),
            Some("sekret"),
            400,
            Some("max_tokens"),
        ),
        (
            r#"{"model": "model", "prompt": "x", "temperature": [1]}"#.into(),
            Some("sekret"),
            400,
            Some("temperature"),
        ),
        (
            r#"{"model": "nope", "prompt": "x"}"#.into(),
            Some("sekret"),
            404,
            Some("model"),
        ),
        (
            json!({"model": "a0", "prompt": long}).to_string(),
            Some("sekret"),
            400,
            Some("prompt"),
        ),
        (
            r#"{"model": "model", "prompt": "x", "max_tokens": 21}"#.into(),
            Some("sekret"),
            400,
            Some("max_tokens"),
        ),
        (
            r#"{"model": "model", "prompt": [1, 2], "max_tokens": 20, "n": 400}"#.into(),
            Some("sekret"),
            400,
            Some("n"),
        ),
        (
            r#"{"model": "model", "prompt": [99999]}"#.into(),
            Some("sekret"),
            400,
            Some("prompt"),
        ),
    ];
    for (body, key, status, param) in cases {
        let (st, v) = send(&body, key);
        assert_eq!(st, status, "{body}: {v}");
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert_eq!(e["param"].as_str(), param, "{body}: {v}");
    }
    // /health needs no key; the others do.
    let (st, _) = srv.get("/health");
    assert_eq!(st, 200);
    let (st, _) = srv.get("/v1/models");
    assert_eq!(st, 401);
    let mut r = agent
        .get(&format!("{}/v1/models", srv.base))
        .header("authorization", "Bearer sekret")
        .call()
        .unwrap();
    let v: Value = r.body_mut().read_json().unwrap();
    let names: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["model", "a0"]);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let dir = tmp_dir("serve-429");
    adapters_of("tiny-c", &dir, 1);
    let srv = Server::start(&serve_args_of(
        "tiny-c",
        &dir,
        &[
            "--device",
            "emu",
            "--max-batch",
            "1",
            "--max-queue",
            "0",
            "--step-delay-ms",
            "20",
        ],
    ));
    let url = format!("{}/v1/completions", srv.base);
    // Hold the one place with a long request on the (slowed) emulator; tiny-c has no
    // tokenizer, so the chunks carry token ids (return_token_ids) and no text.
    let body = json!({"model": "a0", "prompt": [3, 4], "max_tokens": 50, "temperature": 0,
                      "stream": true, "return_token_ids": true});
    let r = Server::agent().post(&url).send_json(&body).unwrap();
    let mut reader = BufReader::new(r.into_body().into_reader());
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "));
    let mut r = Server::agent()
        .post(&url)
        .send_json(json!({"model": "a0", "prompt": [3], "max_tokens": 2}))
        .unwrap();
    // The stream still holds its place until it is read to the end.
    assert_eq!(r.status().as_u16(), 429, "first chunk: {first}");
    assert_eq!(r.headers().get("retry-after").unwrap(), "1");
    let v: Value = r.body_mut().read_json().unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("[DONE]"));
    // Its place is given back once the server is done with the body (just after the client
    // read the end).
    let t0 = Instant::now();
    loop {
        let (st, _) = srv.post(
            "/v1/completions",
            &json!({"model": "a0", "prompt": [3], "max_tokens": 2}),
        );
        if st == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the place stays taken"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_client_that_disconnects_cancels_its_request_and_frees_its_pages() {
    let dir = tmp_dir("serve-cancel");
    adapters_of("tiny-c", &dir, 1);
    // On the emulator (tiny-c: head dim 64, which the kernels take), each step slowed down so
    // that the request is surely still running when the client leaves.
    let srv = Server::start(&serve_args_of(
        "tiny-c",
        &dir,
        &["--device", "emu", "--step-delay-ms", "10"],
    ));
    for stream in [true, false] {
        let before = srv.metric("prefix_attn_requests_cancelled_total");
        let addr = srv.base.trim_start_matches("http://").to_string();
        let mut sock = std::net::TcpStream::connect(&addr).unwrap();
        let body = json!({"model": "a0", "prompt": [3, 4, 5], "max_tokens": 55,
                          "temperature": 0, "stream": stream})
        .to_string();
        write!(
            sock,
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        // Wait until it runs, then leave.
        let t0 = Instant::now();
        while srv.metric("prefix_attn_running_requests") < 1.0 {
            assert!(t0.elapsed() < Duration::from_secs(30), "never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(sock);
        let t0 = Instant::now();
        while srv.metric("prefix_attn_requests_cancelled_total") < before + 1.0 {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "not cancelled (stream = {stream})"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(srv.metric("prefix_attn_kv_pages_in_use"), 0.0);
        assert_eq!(srv.metric("prefix_attn_running_requests"), 0.0);
    }
}

#[test]
fn sigterm_answers_the_requests_in_flight_then_exits_0() {
    let dir = tmp_dir("serve-term");
    adapters_of("tiny-c", &dir, 1);
    let mut srv = Server::start(&serve_args_of(
        "tiny-c",
        &dir,
        &["--device", "emu", "--step-delay-ms", "10"],
    ));
    let url = format!("{}/v1/completions", srv.base);
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let body = json!({"model": "a0", "prompt": [3 + i, 4], "max_tokens": 12,
                                  "temperature": 0});
                let mut r = Server::agent().post(&url).send_json(&body).unwrap();
                let st = r.status().as_u16();
                let v: Value = r.body_mut().read_json().unwrap();
                (st, v)
            })
        })
        .collect();
    let t0 = Instant::now();
    while srv.metric("prefix_attn_running_requests") < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = srv.terminate();
    assert!(status.success(), "{status:?}");
    for h in handles {
        let (st, v) = h.join().unwrap();
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 12);
    }
}

#[test]
fn adapters_load_unload_and_evict_least_recently_used() {
    let dir = tmp_dir("serve-lru");
    adapters(&dir, 4);
    let extra = tmp_dir("serve-lru-extra");
    adapters_of("tiny-a", &extra, 1);
    // Two slots for four adapters on disk: each request beyond two evicts one.
    let srv = Server::start(&serve_args(&dir, &["--max-adapters", "2"]));
    let lines: Vec<Value> = (0..4)
        .map(|i| json!({"input_ids": [7, 8], "adapter": format!("a{i}"), "max_new_tokens": 6}))
        .collect();
    let want = offline(&dir, 4, &lines, &[]);
    for round in 0..2 {
        for i in 0..4 {
            let (st, r) = srv.post(
                "/v1/completions",
                &json!({"model": format!("a{i}"), "prompt": [7, 8], "max_tokens": 6,
                        "temperature": 0, "return_token_ids": true}),
            );
            assert_eq!(st, 200, "{r}");
            assert_eq!(
                ids(&r["choices"][0]["token_ids"]),
                ids(&want[i]["ids"]),
                "round {round}, a{i}"
            );
        }
    }
    assert_eq!(srv.metric("prefix_attn_adapters_loaded"), 2.0);
    assert_eq!(srv.metric("prefix_attn_adapter_loads_total"), 8.0);
    assert_eq!(srv.metric("prefix_attn_adapter_evictions_total"), 6.0);
    // Load one at run time under a new name; it answers like its folder offline.
    let (st, r) = srv.post(
        "/v1/adapters",
        &json!({"name": "late", "path": s(&extra.join("a0"))}),
    );
    assert_eq!(st, 200, "{r}");
    let (st, r) = srv.post(
        "/v1/adapters",
        &json!({"name": "late", "path": s(&extra.join("a0"))}),
    );
    assert_eq!(st, 409, "{r}");
    let (st, _) = srv.post("/v1/adapters", &json!({"name": "../x", "path": s(&extra)}));
    assert_eq!(st, 400);
    let (st, r) = srv.post(
        "/v1/completions",
        &json!({"model": "late", "prompt": [7, 8], "max_tokens": 6, "temperature": 0,
                "return_token_ids": true}),
    );
    assert_eq!(st, 200);
    // extra/a0 was drawn with the same noise as dir/a0.
    assert_eq!(ids(&r["choices"][0]["token_ids"]), ids(&want[0]["ids"]));
    let del = |name: &str| {
        let r = Server::agent()
            .delete(&format!("{}/v1/adapters/{name}", srv.base))
            .call()
            .unwrap();
        r.status().as_u16()
    };
    assert_eq!(del("late"), 200);
    assert_eq!(del("late"), 404);
    assert_eq!(del("a1"), 200);
    let (st, _) = srv.post(
        "/v1/completions",
        &json!({"model": "a1", "prompt": [7], "max_tokens": 1}),
    );
    assert_eq!(st, 404, "a deleted adapter is gone");
    let (_, models) = srv.get("/v1/models");
    assert!(
        !models.contains("\"a1\"") && models.contains("\"a2\""),
        "{models}"
    );
}

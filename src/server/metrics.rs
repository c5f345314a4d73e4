//! The server's counters and gauges, written by the engine thread and the HTTP handlers,
//! rendered as Prometheus text for `GET /metrics`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Throughput is averaged over this window.
const WINDOW: Duration = Duration::from_secs(10);

/// What the engine reports after each step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineGauges {
    /// Requests (choices) waiting for admission.
    pub waiting: usize,
    /// Requests running.
    pub running: usize,
    /// Sequences in the last step (beams count one each).
    pub batch_size: usize,
    /// KV-cache pages in use.
    pub pages_in_use: usize,
    /// KV-cache pages in all.
    pub pages_total: usize,
    /// Adapters in the device prefix table.
    pub adapters_loaded: usize,
    /// Slots of the prefix table.
    pub adapter_slots: usize,
}

#[derive(Default)]
struct Inner {
    responses: BTreeMap<u16, u64>,
    finished: BTreeMap<&'static str, u64>,
    cancelled: u64,
    prompt_tokens: u64,
    generated_tokens: u64,
    adapter_loads: u64,
    adapter_evictions: u64,
    steps: u64,
    recent: VecDeque<(Instant, u64)>,
    gauges: EngineGauges,
}

/// The metrics (one per server, shared).
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic elsewhere never makes the counters unreadable.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// An HTTP response with this status was sent.
    pub fn response(&self, status: u16) {
        self.with(|m| *m.responses.entry(status).or_default() += 1);
    }
    /// A choice finished (`"stop"` or `"length"`).
    pub fn finished(&self, reason: &'static str) {
        self.with(|m| *m.finished.entry(reason).or_default() += 1);
    }
    /// A choice was cancelled (its client went away, or the shutdown grace period ran out).
    pub fn cancelled(&self) {
        self.with(|m| m.cancelled += 1);
    }
    /// Prompt tokens of an accepted choice.
    pub fn prompt_tokens(&self, n: usize) {
        self.with(|m| m.prompt_tokens += n as u64);
    }
    /// An adapter was read from disk into the prefix table, evicting `evicted` others.
    pub fn adapter_loaded(&self, evicted: bool) {
        self.with(|m| {
            m.adapter_loads += 1;
            m.adapter_evictions += evicted as u64;
        });
    }
    /// One engine step that generated `tokens` tokens, and the state after it.
    pub fn step(&self, tokens: usize, gauges: EngineGauges) {
        let now = Instant::now();
        self.with(|m| {
            m.steps += 1;
            m.generated_tokens += tokens as u64;
            m.recent.push_back((now, tokens as u64));
            while m
                .recent
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW)
            {
                m.recent.pop_front();
            }
            m.gauges = gauges;
        });
    }
    /// The engine's state changed outside a step (a request admitted or cancelled).
    pub fn gauges(&self, gauges: EngineGauges) {
        self.with(|m| m.gauges = gauges);
    }
    /// The last gauges the engine reported.
    pub fn current(&self) -> EngineGauges {
        self.with(|m| m.gauges)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let now = Instant::now();
        self.with(|m| {
            let mut out = String::new();
            let head = |out: &mut String, name: &str, kind: &str, help: &str| {
                let _ = writeln!(out, "# HELP prefix_attn_{name} {help}");
                let _ = writeln!(out, "# TYPE prefix_attn_{name} {kind}");
            };
            head(
                &mut out,
                "http_responses_total",
                "counter",
                "HTTP responses sent, by status code.",
            );
            for (code, n) in &m.responses {
                let _ = writeln!(
                    out,
                    "prefix_attn_http_responses_total{{code=\"{code}\"}} {n}"
                );
            }
            head(
                &mut out,
                "requests_finished_total",
                "counter",
                "Choices (completions) finished, by finish reason.",
            );
            for reason in ["stop", "length"] {
                let n = m.finished.get(reason).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "prefix_attn_requests_finished_total{{finish_reason=\"{reason}\"}} {n}"
                );
            }
            let window_tokens: u64 = m.recent.iter().map(|(_, n)| n).sum();
            let span = m
                .recent
                .front()
                .map_or(WINDOW, |(t, _)| now.duration_since(*t).max(WINDOW / 10));
            let g = m.gauges;
            let rows: [(&str, &str, &str, String); 14] = [
                (
                    "requests_cancelled_total",
                    "counter",
                    "Choices cancelled before they finished (client gone, shutdown).",
                    m.cancelled.to_string(),
                ),
                (
                    "prompt_tokens_total",
                    "counter",
                    "Prompt tokens of accepted choices.",
                    m.prompt_tokens.to_string(),
                ),
                (
                    "generation_tokens_total",
                    "counter",
                    "Tokens generated.",
                    m.generated_tokens.to_string(),
                ),
                (
                    "generation_tokens_per_second",
                    "gauge",
                    "Tokens generated per second over the last 10 s.",
                    format!("{:.3}", window_tokens as f64 / span.as_secs_f64()),
                ),
                (
                    "engine_steps_total",
                    "counter",
                    "Engine steps (one model call each).",
                    m.steps.to_string(),
                ),
                (
                    "queue_length",
                    "gauge",
                    "Choices waiting for admission.",
                    g.waiting.to_string(),
                ),
                (
                    "running_requests",
                    "gauge",
                    "Choices running.",
                    g.running.to_string(),
                ),
                (
                    "batch_size",
                    "gauge",
                    "Sequences in the last engine step.",
                    g.batch_size.to_string(),
                ),
                (
                    "kv_pages_in_use",
                    "gauge",
                    "KV-cache pages in use.",
                    g.pages_in_use.to_string(),
                ),
                (
                    "kv_pages_total",
                    "gauge",
                    "KV-cache pages in all.",
                    g.pages_total.to_string(),
                ),
                (
                    "adapters_loaded",
                    "gauge",
                    "Adapters in the device prefix table.",
                    g.adapters_loaded.to_string(),
                ),
                (
                    "adapter_slots",
                    "gauge",
                    "Slots of the device prefix table.",
                    g.adapter_slots.to_string(),
                ),
                (
                    "adapter_loads_total",
                    "counter",
                    "Adapters read from disk into the prefix table.",
                    m.adapter_loads.to_string(),
                ),
                (
                    "adapter_evictions_total",
                    "counter",
                    "Adapters evicted from the prefix table (least recently used).",
                    m.adapter_evictions.to_string(),
                ),
            ];
            for (name, kind, help, v) in rows {
                head(&mut out, name, kind, help);
                let _ = writeln!(out, "prefix_attn_{name} {v}");
            }
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of an unlabelled sample.
    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing"))
            .parse()
            .unwrap()
    }

    #[test]
    fn counters_and_gauges_render_as_prometheus_text() {
        let m = Metrics::default();
        m.response(200);
        m.response(200);
        m.response(429);
        m.finished("stop");
        m.prompt_tokens(7);
        m.step(
            3,
            EngineGauges {
                pages_in_use: 5,
                pages_total: 64,
                ..EngineGauges::default()
            },
        );
        m.step(4, m.current());
        let t = m.render();
        assert!(t.contains("prefix_attn_http_responses_total{code=\"200\"} 2\n"));
        assert!(t.contains("prefix_attn_http_responses_total{code=\"429\"} 1\n"));
        assert!(t.contains("prefix_attn_requests_finished_total{finish_reason=\"stop\"} 1\n"));
        assert_eq!(sample(&t, "prefix_attn_generation_tokens_total"), 7.0);
        assert_eq!(sample(&t, "prefix_attn_prompt_tokens_total"), 7.0);
        assert_eq!(sample(&t, "prefix_attn_kv_pages_in_use"), 5.0);
        assert_eq!(sample(&t, "prefix_attn_engine_steps_total"), 2.0);
        assert!(sample(&t, "prefix_attn_generation_tokens_per_second") > 0.0);
        // Every sample line belongs to a declared family.
        for l in t.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(t.contains(&format!("# TYPE {name} ")), "{l}");
        }
    }
}

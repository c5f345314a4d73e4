//! `prefix-attn serve`: an OpenAI-compatible HTTP server (tokio + axum) over the engine, where
//! `model` names the base model or one of many prefix adapters, served together in one
//! continuous batch.
//!
//! - [`engine`]: the thread that owns the model and runs the [`Scheduler`](crate::engine::Scheduler).
//! - [`openai`]: the wire format (requests read field by field, error objects).
//! - [`registry`]: the adapter catalogue (named adapters and an adapters directory).
//! - [`metrics`]: the Prometheus counters.
//!
//! Routes: `POST /v1/completions`, `GET /v1/models`, `POST /v1/adapters`,
//! `DELETE /v1/adapters/{name}`, `GET /health`, `GET /metrics`. With an API key every route but
//! `/health` wants `Authorization: Bearer KEY`. The queue is bounded: a request whose
//! sequences would exceed `max_batch + max_queue` in flight gets `429` with `Retry-After`.
//! A client that goes away cancels its request. `SIGTERM` (or Ctrl-C) stops accepting
//! connections, lets the requests in flight finish within the grace period, cancels the rest,
//! and returns.

pub mod engine;
pub mod metrics;
pub mod openai;
pub mod registry;

use crate::engine::text::{completion_text, TextStream};
use crate::engine::FinishReason;
use crate::error::{Error, Result};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use engine::{Choice, Cmd, EngineConfig, EngineHandle, Event, ModelInfo, Refusal};
use metrics::Metrics;
use openai::{ApiError, CompletionRequest, Fields, PromptIn};
use registry::{valid_name, Registry};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// How the server is set up.
pub struct ServeConfig {
    /// The engine (model, backend, batch, pages, prefix table).
    pub engine: EngineConfig,
    /// `--adapter NAME=DIR` adapters (placed in the prefix table at start).
    pub adapters: Vec<(String, PathBuf)>,
    /// A directory of adapter folders, loaded on first use.
    pub adapters_dir: Option<PathBuf>,
    /// The base model's name in `model` (default: the model folder's name).
    pub served_model_name: Option<String>,
    /// Address to bind.
    pub host: String,
    /// Port (0: any free one; the bound address is printed).
    pub port: u16,
    /// Wanted as `Authorization: Bearer KEY` on every route but `/health`.
    pub api_key: Option<String>,
    /// Sequences that may wait beyond the `max_batch` running ones.
    pub max_queue: usize,
    /// The largest `max_tokens` accepted (`None`: the context).
    pub max_tokens_limit: Option<usize>,
    /// How long requests in flight may take to finish after `SIGTERM`.
    pub grace: Duration,
}

struct App {
    engine: EngineHandle,
    info: ModelInfo,
    base: String,
    registry: Arc<Mutex<Registry>>,
    metrics: Arc<Metrics>,
    api_key: Option<String>,
    capacity: usize,
    in_flight: AtomicUsize,
    max_tokens_limit: usize,
    created: u64,
    next_id: AtomicU64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A seed nobody chose: for sampling requests that bring none.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        match r {
            Refusal::Invalid {
                param: Some(p),
                message,
            } => ApiError::invalid(&p, message),
            Refusal::Invalid {
                param: None,
                message,
            } => ApiError::bad_request(message),
            Refusal::NotFound(m) => ApiError {
                message: m,
                ..ApiError::model_not_found("")
            },
            Refusal::Busy(m) => ApiError::busy(m),
            Refusal::Unavailable(m) => ApiError::unavailable(m),
            Refusal::Conflict(m) => ApiError::conflict(m),
            Refusal::Internal(m) => ApiError::internal(m),
        }
    }
}

/// Sequences in flight, given back when the answer is complete (or the client is gone).
struct InFlight {
    app: Arc<App>,
    n: usize,
}

impl InFlight {
    fn take(app: &Arc<App>, n: usize) -> Option<InFlight> {
        app.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur + n <= app.capacity).then_some(cur + n)
            })
            .ok()?;
        Some(InFlight {
            app: Arc::clone(app),
            n,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.app.in_flight.fetch_sub(self.n, Ordering::AcqRel);
    }
}

/// Runs the server until `SIGTERM`/Ctrl-C, then shuts down gracefully.
pub fn serve(cfg: ServeConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Unsupported(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(serve_async(cfg))
}

async fn serve_async(mut cfg: ServeConfig) -> Result<()> {
    let base = match cfg.served_model_name.take() {
        Some(n) => n,
        None => cfg
            .engine
            .model_dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".into()),
    };
    let mut reg = Registry::new(cfg.adapters_dir.clone());
    if let Some(d) = &cfg.adapters_dir {
        if !d.is_dir() {
            return Err(Error::index(
                "--adapters-dir",
                format!("{}: not a directory", d.display()),
            ));
        }
    }
    for (name, dir) in &cfg.adapters {
        if !valid_name(name) {
            return Err(Error::index(
                "--adapter",
                format!("{name:?}: an adapter name is 1 to 256 characters without '/', '\\' or control characters"),
            ));
        }
        if *name == base {
            return Err(Error::index(
                "--adapter",
                format!("{name:?} is the base model's name (--served-model-name)"),
            ));
        }
        reg.insert(name, dir);
    }
    cfg.engine.preload = cfg.adapters.iter().map(|(n, _)| n.clone()).collect();
    let registry = Arc::new(Mutex::new(reg));
    let metrics = Arc::new(Metrics::default());
    // Signals first: a SIGTERM during loading must not kill the process half-way.
    let stop = shutdown_signal()?;
    let (engine, info) = tokio::task::block_in_place(|| {
        engine::start(cfg.engine, Arc::clone(&registry), Arc::clone(&metrics))
    })?;
    let ctx = info.max_positions;
    let app = Arc::new(App {
        capacity: info.max_batch + cfg.max_queue,
        max_tokens_limit: cfg.max_tokens_limit.unwrap_or(ctx),
        info,
        engine,
        base,
        registry,
        metrics,
        api_key: cfg.api_key,
        in_flight: AtomicUsize::new(0),
        created: now_secs(),
        next_id: AtomicU64::new(0),
    });
    let router = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/adapters", post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(Arc::clone(&app), guard))
        .with_state(Arc::clone(&app));
    let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
        .await
        .map_err(|e| Error::Io {
            path: PathBuf::from(format!("{}:{}", cfg.host, cfg.port)),
            source: e,
        })?;
    let addr = listener.local_addr().map_err(|e| Error::Io {
        path: PathBuf::from(format!("{}:{}", cfg.host, cfg.port)),
        source: e,
    })?;
    eprintln!(
        "prefix-attn serve: listening on http://{addr} (model {:?} on {}, context {}, prefix {}, {} sequences a step, {} pages of {}; {})",
        app.base,
        app.info.device,
        app.info.max_positions,
        app.info.prefix_len,
        app.info.max_batch,
        app.info.num_pages,
        app.info.page_size,
        app.info.packing,
    );
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        let _ = stopping_rx.wait_for(|s| *s).await;
    });
    let mut server = tokio::spawn(async move { server.await });
    tokio::select! {
        r = &mut server => {
            // The server ended by itself: an accept loop error.
            app.engine.shutdown();
            return match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Error::Io { path: PathBuf::from(addr.to_string()), source: e }),
                Err(e) => Err(Error::Unsupported(format!("the server task failed: {e}"))),
            };
        }
        _ = stop => {}
    }
    eprintln!(
        "prefix-attn serve: stopping; requests in flight have {} s to finish",
        cfg.grace.as_secs_f64()
    );
    let _ = stopping_tx.send(true);
    if tokio::time::timeout(cfg.grace, &mut server).await.is_err() {
        eprintln!("prefix-attn serve: the grace period ended; cancelling what is left");
        app.engine.send(Cmd::CancelAll);
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut server).await;
    }
    let app2 = Arc::clone(&app);
    tokio::task::block_in_place(|| app2.engine.shutdown());
    eprintln!("prefix-attn serve: stopped");
    Ok(())
}

/// Resolves on the first `SIGTERM` or Ctrl-C.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| Error::Unsupported(format!("cannot listen for SIGTERM: {e}")))?;
        let mut int = signal(SignalKind::interrupt())
            .map_err(|e| Error::Unsupported(format!("cannot listen for SIGINT: {e}")))?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async move {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

/// The API key check and the response counters, around every route.
async fn guard(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        if req.uri().path() != "/health" && !authorized(req.headers(), key) {
            app.metrics.response(401);
            return ApiError::unauthorized().into_response();
        }
    }
    let r = next.run(req).await;
    app.metrics.response(r.status().as_u16());
    r
}

fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let Some(got) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // The same time whatever the first differing byte.
    got.len() == key.len()
        && got
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route {} {}: the server has POST /v1/completions, GET /v1/models, POST /v1/adapters, DELETE /v1/adapters/{{name}}, GET /health, GET /metrics",
        req.method(),
        req.uri().path()
    ))
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

fn model_object(app: &App, id: &str, parent: Option<&str>) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": app.created,
        "owned_by": "prefix-attn",
        "root": parent.unwrap_or(id),
        "parent": parent,
    })
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let names = app
        .registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .names();
    let mut data = vec![model_object(&app, &app.base, None)];
    data.extend(names.iter().map(|n| model_object(&app, n, Some(&app.base))));
    Json(json!({"object": "list", "data": data}))
}

async fn ask(
    app: &App,
    cmd: impl FnOnce(oneshot::Sender<std::result::Result<(), Refusal>>) -> Cmd,
) -> std::result::Result<(), ApiError> {
    let (tx, rx) = oneshot::channel();
    if !app.engine.send(cmd(tx)) {
        return Err(ApiError::unavailable("the engine has stopped"));
    }
    rx.await
        .map_err(|_| ApiError::unavailable("the engine has stopped"))?
        .map_err(ApiError::from)
}

async fn load_adapter(
    State(app): State<Arc<App>>,
    body: Bytes,
) -> std::result::Result<Json<Value>, ApiError> {
    let (v, _) = Fields::of(&body, &["name", "path"])?;
    let f = Fields::new(&v);
    let name = f.required_string("name")?.to_string();
    let path = PathBuf::from(f.required_string("path")?);
    if !valid_name(&name) {
        return Err(ApiError::invalid(
            "name",
            format!("{name:?}: an adapter name is 1 to 256 characters without '/', '\\' or control characters"),
        ));
    }
    if name == app.base {
        return Err(ApiError::conflict(format!(
            "`{name}` is the base model's name"
        )));
    }
    if !path.is_dir() {
        return Err(ApiError::invalid(
            "path",
            format!("{}: not a directory (on the server)", path.display()),
        ));
    }
    ask(&app, |reply| Cmd::Load {
        name: name.clone(),
        dir: path,
        reply,
    })
    .await?;
    Ok(Json(model_object(&app, &name, Some(&app.base))))
}

async fn unload_adapter(
    State(app): State<Arc<App>>,
    UrlPath(name): UrlPath<String>,
) -> std::result::Result<Json<Value>, ApiError> {
    if name == app.base {
        return Err(ApiError::invalid(
            "name",
            "the base model cannot be unloaded",
        ));
    }
    ask(&app, |reply| Cmd::Unload {
        name: name.clone(),
        reply,
    })
    .await?;
    Ok(Json(
        json!({"id": name, "object": "model", "deleted": true}),
    ))
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    match complete(app, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// A checked request, ready for the engine.
struct Prepared {
    req: CompletionRequest,
    adapter: Option<String>,
    prompts: Vec<Vec<u32>>,
}

fn prepare(app: &App, body: &[u8]) -> std::result::Result<Prepared, ApiError> {
    let req = openai::parse_completion(body)?;
    let adapter = if req.model == app.base {
        None
    } else if app
        .registry
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .resolve(&req.model)
        .is_some()
    {
        Some(req.model.clone())
    } else {
        return Err(ApiError::model_not_found(&req.model));
    };
    let tok = app.info.tokenizer.as_deref();
    if tok.is_none() && !req.stop.is_empty() {
        return Err(ApiError::invalid(
            "stop",
            "this model folder has no tokenizer: stop strings cannot be matched",
        ));
    }
    if req.max_tokens > app.max_tokens_limit {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "`max_tokens` = {} exceeds this server's limit of {} (--max-tokens-limit)",
                req.max_tokens, app.max_tokens_limit
            ),
        ));
    }
    let ctx = app.info.context(adapter.is_some());
    let mut prompts = Vec::with_capacity(req.prompts.len());
    for (i, p) in req.prompts.iter().enumerate() {
        let ids = match p {
            PromptIn::Ids(ids) => ids.clone(),
            PromptIn::Text(t) => tok
                .ok_or_else(|| {
                    ApiError::invalid(
                        "prompt",
                        "this model folder has no tokenizer: send token ids",
                    )
                })?
                .encode(t)
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))?,
        };
        if ids.is_empty() {
            return Err(ApiError::invalid(
                "prompt",
                format!("prompt {i} has no tokens"),
            ));
        }
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= app.info.vocab_size) {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "prompt {i}: token id {t} is outside the vocabulary (size {})",
                    app.info.vocab_size
                ),
            ));
        }
        let prefix = if adapter.is_some() {
            format!(" after the adapter's {}-token prefix", app.info.prefix_len)
        } else {
            String::new()
        };
        if ids.len() > ctx {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "prompt {i} has {} tokens; this model's context holds {ctx}{prefix}",
                    ids.len()
                ),
            ));
        }
        if ids.len() + req.max_tokens > ctx {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "prompt {i} ({} tokens) and `max_tokens` = {} exceed this model's context of {ctx} tokens{prefix}",
                    ids.len(),
                    req.max_tokens
                ),
            ));
        }
        prompts.push(ids);
    }
    if req.sequences() > app.capacity {
        return Err(ApiError::invalid(
            "n",
            format!(
                "the request needs {} sequences at once; this server holds at most {}",
                req.sequences(),
                app.capacity
            ),
        ));
    }
    Ok(Prepared {
        req,
        adapter,
        prompts,
    })
}

async fn complete(app: Arc<App>, body: Bytes) -> std::result::Result<Response, ApiError> {
    let Prepared {
        req,
        adapter,
        prompts,
    } = prepare(&app, &body)?;
    let decodings = req.decodings(random_seed())?;
    let permit = InFlight::take(&app, req.sequences()).ok_or_else(|| {
        ApiError::busy(format!(
            "the server is full ({} sequences in flight at most): retry later",
            app.capacity
        ))
    })?;
    let choices: Vec<Choice> = decodings
        .into_iter()
        .enumerate()
        .map(|(c, decoding)| Choice {
            prompt: prompts[c / req.n].clone(),
            max_new_tokens: req.max_tokens,
            decoding,
            stop: req.stop.clone(),
            stream: req.stream,
        })
        .collect();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    ask(&app, |reply| Cmd::Submit {
        adapter,
        choices,
        events: events_tx,
        reply,
    })
    .await?;
    let id = format!(
        "cmpl-{:x}{:08x}",
        app.created,
        app.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let head = Head {
        id,
        created: now_secs(),
        model: req.model.clone(),
    };
    if req.stream {
        Ok(stream(app, permit, head, req, prompts, events_rx))
    } else {
        collect(&app, permit, head, &req, &prompts, events_rx).await
    }
}

struct Head {
    id: String,
    created: u64,
    model: String,
}

fn usage(prompts: &[Vec<u32>], completion: usize) -> Value {
    let p: usize = prompts.iter().map(Vec::len).sum();
    json!({"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion})
}

async fn collect(
    app: &App,
    permit: InFlight,
    head: Head,
    req: &CompletionRequest,
    prompts: &[Vec<u32>],
    mut events: mpsc::UnboundedReceiver<Event>,
) -> std::result::Result<Response, ApiError> {
    let k = req.choices();
    let mut outs: Vec<Option<(Vec<u32>, FinishReason)>> = vec![None; k];
    let mut left = k;
    while left > 0 {
        match events.recv().await {
            Some(Event::Done {
                choice,
                ids,
                finish,
            }) => {
                if outs[choice].replace((ids, finish)).is_none() {
                    left -= 1;
                }
            }
            Some(Event::Tokens { .. }) => {}
            Some(Event::Failed { message }) => return Err(ApiError::unavailable(message)),
            None => return Err(ApiError::unavailable("the engine has stopped")),
        }
    }
    drop(permit);
    let tok = app.info.tokenizer.as_deref();
    let mut completion = 0;
    let mut choices = Vec::with_capacity(k);
    for (c, out) in outs.into_iter().enumerate() {
        let (ids, finish) = out.expect("every choice finished");
        completion += ids.len();
        let text = completion_text(tok, &ids, app.info.eos, &req.stop)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .unwrap_or_default();
        let mut choice = json!({
            "index": c, "text": text, "finish_reason": finish.as_str(), "logprobs": null,
        });
        if req.return_token_ids {
            choice["token_ids"] = json!(ids);
            choice["prompt_token_ids"] = json!(prompts[c / req.n]);
        }
        choices.push(choice);
    }
    Ok(Json(json!({
        "id": head.id,
        "object": "text_completion",
        "created": head.created,
        "model": head.model,
        "choices": choices,
        "usage": usage(prompts, completion),
    }))
    .into_response())
}

fn chunk(head: &Head, choices: Value, usage: Value) -> SseEvent {
    SseEvent::default().data(
        json!({
            "id": head.id,
            "object": "text_completion",
            "created": head.created,
            "model": head.model,
            "choices": choices,
            "usage": usage,
        })
        .to_string(),
    )
}

/// Streams the choices as server-sent events, ending with `data: [DONE]`. A task turns the
/// engine's events into chunks; when the client goes away the chunk channel closes, the task
/// ends and drops the engine's event channel, and the engine cancels the request.
fn stream(
    app: Arc<App>,
    permit: InFlight,
    head: Head,
    req: CompletionRequest,
    prompts: Vec<Vec<u32>>,
    mut events: mpsc::UnboundedReceiver<Event>,
) -> Response {
    let (out, out_rx) = mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let k = req.choices();
        let mut texts: Vec<TextStream> = (0..k)
            .map(|_| TextStream::new(app.info.tokenizer.clone(), app.info.eos, req.stop.clone()))
            .collect();
        let mut sent_ids = vec![0usize; k];
        let mut left = k;
        let mut completion = 0;
        while left > 0 {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = out.closed() => return,
            };
            let (choice, piece, ids, finish) = match ev {
                Some(Event::Tokens { choice, ids }) => {
                    let piece = texts[choice].push(&ids).unwrap_or_default();
                    (choice, piece, ids, None)
                }
                Some(Event::Done {
                    choice,
                    ids,
                    finish,
                }) => {
                    left -= 1;
                    completion += ids.len();
                    let piece = texts[choice].finish(&ids).unwrap_or_default();
                    let rest = ids[sent_ids[choice].min(ids.len())..].to_vec();
                    (choice, piece, rest, Some(finish))
                }
                Some(Event::Failed { message }) => {
                    let e = ApiError::unavailable(message);
                    let _ = out
                        .send(SseEvent::default().data(e.body().to_string()))
                        .await;
                    return;
                }
                None => return,
            };
            sent_ids[choice] += ids.len();
            if piece.is_empty() && finish.is_none() && !req.return_token_ids {
                continue;
            }
            let mut c = json!({
                "index": choice, "text": piece,
                "finish_reason": finish.map(FinishReason::as_str), "logprobs": null,
            });
            if req.return_token_ids {
                c["token_ids"] = json!(ids);
            }
            if out
                .send(chunk(&head, json!([c]), Value::Null))
                .await
                .is_err()
            {
                return;
            }
        }
        if req.include_usage {
            let u = usage(&prompts, completion);
            if out.send(chunk(&head, json!([]), u)).await.is_err() {
                return;
            }
        }
        let _ = out.send(SseEvent::default().data("[DONE]")).await;
    });
    // The places in flight are given back when the body is done with (sent, or the client
    // gone).
    let body = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(out_rx),
        move |e| {
            let _held = &permit;
            Ok::<SseEvent, std::convert::Infallible>(e)
        },
    );
    Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response()
}

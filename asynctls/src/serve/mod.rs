//! `asynctls serve`: an OpenAI-compatible HTTP server (axum on tokio) in
//! front of the continuous-batching [`scheduler`].
//!
//! The HTTP side parses and validates a request ([`api`]), turns its
//! messages or prompt into token ids, and queues a [`scheduler::Job`]; the
//! scheduler thread runs it in the batch and sends its text back as
//! [`scheduler::Event`]s, which become one JSON response or SSE chunks.
//! Every failure is the request's own: a 4xx/5xx in OpenAI's error shape,
//! never a panic or a stopped server. [`metrics`] backs `GET /metrics`,
//! [`client`] is the small HTTP client the load generator and the tests use.

pub mod api;
pub mod bench;
pub mod client;
pub mod metrics;
pub mod scheduler;
pub mod text;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use asynctls_models::Tokenizer;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::FinishReason;
use crate::sampler::SamplingParams;
use api::{ApiError, ChatFields, Common, CompletionFields, Endpoint, Prompt, ResponseMeta};
use metrics::{Metrics, Outcome};
use scheduler::{Event, Job, Scheduler, SubmitError};

/// Request bodies larger than this are refused (a 32k-token prompt is a few
/// hundred KB of text or ids).
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// Completions' `max_tokens` when a request gives none (OpenAI's default);
/// chat requests default to the rest of the context.
pub const DEFAULT_COMPLETION_TOKENS: usize = 16;

/// What every handler shares.
#[derive(Debug)]
pub struct ServerState {
    pub scheduler: Scheduler,
    pub metrics: Arc<Metrics>,
    pub tokenizer: Arc<Tokenizer>,
    /// The id `/v1/models` lists and requests must name.
    pub model_id: String,
    pub api_key: Option<String>,
    started: u64,
    serial: AtomicU64,
}

impl ServerState {
    pub fn new(
        scheduler: Scheduler,
        metrics: Arc<Metrics>,
        tokenizer: Arc<Tokenizer>,
        model_id: String,
        api_key: Option<String>,
    ) -> Self {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        ServerState {
            scheduler,
            metrics,
            tokenizer,
            model_id,
            api_key,
            started,
            serial: AtomicU64::new(0),
        }
    }
}

/// The routes: `/v1/*` behind the API key when there is one; `/health` and
/// `/metrics` open (probes and scrapers carry no key, as with vLLM).
pub fn router(state: Arc<ServerState>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` resolves; then
/// takes no new requests, lets running ones finish for up to `grace`, and
/// fails the rest, so that every stream ends and the server returns.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let on_shutdown = state.clone();
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            shutdown.await;
            on_shutdown.scheduler.stop_accepting();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                on_shutdown.scheduler.cancel_all();
            });
        })
        .await
}

/// Equal in time whatever the inputs share, so that the key cannot be
/// guessed byte by byte from response times.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_key(State(state): State<Arc<ServerState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.trim().as_bytes(), key.as_bytes()) {
            state.metrics.count_request(Outcome::Unauthorized);
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

fn model_card(state: &ServerState) -> Value {
    json!({
        "id": state.model_id,
        "object": "model",
        "created": state.started,
        "owned_by": "asynctls",
        "max_model_len": state.scheduler.limits.max_context,
        "vocab_size": state.scheduler.limits.vocab_size,
    })
}

async fn list_models(State(state): State<Arc<ServerState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_card(&state)]}))
}

async fn get_model(State(state): State<Arc<ServerState>>, Path(id): Path<String>) -> Response {
    if id != state.model_id {
        return ApiError::model_not_found(&id).into_response();
    }
    Json(model_card(&state)).into_response()
}

/// 200 while the scheduler thread runs; 503 once it has stopped (a bug in
/// the engine) so that a supervisor restarts the server.
async fn health(State(state): State<Arc<ServerState>>) -> Response {
    if state.scheduler.is_alive() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        let e = ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            ..ApiError::internal("the scheduler thread has stopped")
        };
        e.into_response()
    }
}

async fn prometheus(State(state): State<Arc<ServerState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

async fn chat_completions(State(state): State<Arc<ServerState>>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(state, Endpoint::Chat, body).await
}

async fn completions(State(state): State<Arc<ServerState>>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(state, Endpoint::Completions, body).await
}

async fn generate(state: Arc<ServerState>, endpoint: Endpoint, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let accepted = match body {
        Err(e) => Err(ApiError {
            status: e.status(),
            ..ApiError::invalid(e.body_text(), None)
        }),
        // Templates and tokenization of a long prompt take milliseconds of
        // CPU: off the async workers, so that other streams keep flowing.
        Ok(bytes) => {
            let state = state.clone();
            tokio::task::spawn_blocking(move || prepare(&state, endpoint, &bytes, arrived))
                .await
                .unwrap_or_else(|e| Err(ApiError::internal(format!("preparing the request failed: {e}"))))
        }
    };
    let (job, meta, knobs, events) = match accepted {
        Ok(parts) => parts,
        Err(e) => {
            state
                .metrics
                .count_request(if e.status == StatusCode::NOT_FOUND || e.status.is_client_error() {
                    Outcome::Invalid
                } else {
                    Outcome::Failed
                });
            return e.into_response();
        }
    };
    if let Err(e) = state.scheduler.submit(job) {
        let (outcome, error) = match e {
            SubmitError::QueueFull(depth) => (Outcome::QueueFull, ApiError::queue_full(depth)),
            SubmitError::ShuttingDown => (Outcome::Failed, ApiError::shutting_down()),
        };
        state.metrics.count_request(outcome);
        return error.into_response();
    }
    if knobs.stream {
        stream_response(events, meta, knobs.include_usage).into_response()
    } else {
        full_response(events, meta).await
    }
}

/// Validates a body and makes its job; the receiver of its events.
fn prepare(
    state: &ServerState,
    endpoint: Endpoint,
    bytes: &[u8],
    arrived: Instant,
) -> Result<(Job, ResponseMeta, api::Knobs, UnboundedReceiver<Event>), ApiError> {
    let raw = api::parse_json(bytes)?;
    let common: Common = api::from_body(&raw)?;
    if common.model != state.model_id {
        return Err(ApiError::model_not_found(&common.model));
    }
    api::refuse_unsupported(&raw, endpoint)?;
    let knobs = common.knobs()?;
    let stop_strings = common.stop_strings()?;
    let tok = &state.tokenizer;
    let tokenize_err = |e: asynctls_models::ModelError, param: &str| ApiError::invalid(e.to_string(), Some(param));
    let prompt_ids = match endpoint {
        Endpoint::Chat => {
            let fields: ChatFields = api::from_body(&raw)?;
            let messages = api::chat_messages(&fields.messages)?;
            let rendered = tok
                .apply_chat_template(&messages, true)
                .map_err(|e| tokenize_err(e, "messages"))?;
            tok.encode(&rendered, false).map_err(|e| tokenize_err(e, "messages"))?
        }
        Endpoint::Completions => {
            let fields: CompletionFields = api::from_body(&raw)?;
            match fields.prompt {
                Prompt::Text(t) => tok.encode(&t, true).map_err(|e| tokenize_err(e, "prompt"))?,
                Prompt::Ids(ids) => ids,
                Prompt::Texts(mut v) if v.len() == 1 => {
                    let t = v.remove(0);
                    tok.encode(&t, true).map_err(|e| tokenize_err(e, "prompt"))?
                }
                Prompt::IdLists(mut v) if v.len() == 1 => v.remove(0),
                Prompt::Texts(v) => return Err(ApiError::unsupported("prompt", &format!("with {} prompts", v.len()))),
                Prompt::IdLists(v) => {
                    return Err(ApiError::unsupported("prompt", &format!("with {} prompts", v.len())))
                }
            }
        }
    };
    let param = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
    };
    let limits = &state.scheduler.limits;
    if prompt_ids.is_empty() {
        return Err(ApiError::invalid("The prompt is empty", Some(param)));
    }
    if let Some(&id) = prompt_ids.iter().find(|&&t| t as usize >= limits.vocab_size) {
        return Err(ApiError::invalid(
            format!("Token id {id} is outside the vocabulary of {}", limits.vocab_size),
            Some(param),
        ));
    }
    let context = limits.max_context;
    let max_tokens = match (knobs.max_tokens, endpoint) {
        (Some(n), _) => n,
        (None, Endpoint::Completions) => DEFAULT_COMPLETION_TOKENS,
        (None, Endpoint::Chat) => context.saturating_sub(prompt_ids.len()).max(1),
    };
    let total = prompt_ids.len().saturating_add(max_tokens);
    if total > context {
        return Err(ApiError::invalid(
            format!(
                "This model's maximum context length is {context} tokens. However, you requested {total} tokens \
                 ({} in the {param}, {max_tokens} in the completion). Please reduce the length of the {param} or \
                 completion.",
                prompt_ids.len()
            ),
            Some(param),
        )
        .with_code("context_length_exceeded"));
    }
    if limits.blocks_for(total) > limits.kv_blocks {
        return Err(ApiError::invalid(
            format!(
                "{total} tokens need {} KV blocks; the server's pool has {} (raise --kv-blocks)",
                limits.blocks_for(total),
                limits.kv_blocks
            ),
            Some(param),
        )
        .with_code("context_length_exceeded"));
    }
    let mut stop_ids = Vec::new();
    if !knobs.ignore_eos {
        stop_ids = limits.eos_token_ids.clone();
        stop_ids.extend(tok.eos_token_id());
    }
    let sampling = if knobs.temperature <= 0.0 {
        SamplingParams::greedy()
    } else {
        SamplingParams {
            temperature: knobs.temperature,
            top_p: knobs.top_p,
            top_k: 0,
            // Without a seed, every request draws differently.
            seed: knobs.seed.unwrap_or_else(rand::random),
        }
    };
    let serial = state.serial.fetch_add(1, Ordering::Relaxed);
    let meta = ResponseMeta::new(endpoint, &state.model_id, serial);
    let (events, rx) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        prompt_ids,
        max_tokens,
        sampling,
        stop_ids,
        stop_strings,
        events,
        arrived,
    };
    Ok((job, meta, knobs, rx))
}

fn finish_label(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

async fn full_response(mut events: UnboundedReceiver<Event>, meta: ResponseMeta) -> Response {
    let mut text = String::new();
    loop {
        match events.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done { finish, usage }) => {
                return Json(meta.full(&text, finish_label(finish), usage)).into_response();
            }
            Some(Event::Failed(e)) => return e.into_response(),
            None => return ApiError::internal("the scheduler stopped").into_response(),
        }
    }
}

/// An SSE stream's state: events still to send, and the scheduler's
/// receiver until its last event.
struct StreamState {
    events: Option<UnboundedReceiver<Event>>,
    meta: ResponseMeta,
    include_usage: bool,
    pending: VecDeque<String>,
}

fn stream_response(
    events: UnboundedReceiver<Event>,
    meta: ResponseMeta,
    include_usage: bool,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let mut pending = VecDeque::new();
    if meta.endpoint == Endpoint::Chat {
        // The role first, as OpenAI does, before any text is known.
        pending.push_back(meta.chunk(Some(""), true, None).to_string());
    }
    let state = StreamState {
        events: Some(events),
        meta,
        include_usage,
        pending,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.pending.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), s));
            }
            let rx = s.events.as_mut()?;
            match rx.recv().await {
                Some(Event::Text(t)) => s.pending.push_back(s.meta.chunk(Some(&t), false, None).to_string()),
                Some(Event::Done { finish, usage }) => {
                    let last = match s.meta.endpoint {
                        Endpoint::Chat => s.meta.chunk(None, false, Some(finish_label(finish))),
                        Endpoint::Completions => s.meta.chunk(Some(""), false, Some(finish_label(finish))),
                    };
                    s.pending.push_back(last.to_string());
                    if s.include_usage {
                        s.pending.push_back(s.meta.usage_chunk(usage).to_string());
                    }
                    s.pending.push_back("[DONE]".into());
                    s.events = None;
                }
                Some(Event::Failed(e)) => {
                    s.pending.push_back(e.body().to_string());
                    s.pending.push_back("[DONE]".into());
                    s.events = None;
                }
                None => {
                    s.pending
                        .push_back(ApiError::internal("the scheduler stopped").body().to_string());
                    s.pending.push_back("[DONE]".into());
                    s.events = None;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

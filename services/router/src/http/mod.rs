//! The router's OpenAI-compatible HTTP front door (`--http-listen`): the same
//! session core as the gRPC API (validation, routing, sessions in the store,
//! relay, metrics, auth, TLS), another face.
//!
//! - `GET /v1/models`: the served model, its context length and block length.
//! - `POST /v1/completions`: a completion, whole or streamed as Server-Sent
//!   Events in OpenAI's chunk format, ending with `data: [DONE]`.
//! - `POST /v1/chat/completions`: the same over the model's chat template
//!   (`chat_template.jinja` or `tokenizer_config.json`'s `chat_template`); a
//!   model without one answers 400.
//!
//! Streams can be resumed, which OpenAI's API does not offer: every event
//! carries `id: <session>:<offset>` (the tokens sent so far), and a request
//! with `Last-Event-ID` gets the rest of that session through any router, with
//! no token lost or repeated. So a stream's session does not stop when its
//! connection drops: it runs to its end and stays resumable for the session
//! TTL. The session id is also in the `x-session-id` response header.

mod errors;
mod openai;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use blockserve_proto::v1::{generate_response, GenerateRequest, GenerateResponse};
use blockserve_runtime::metrics::METRICS;
use blockserve_runtime::tls::ServerTls;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::sessions::Router;
use errors::ApiError;
use openai::{ChatRequest, CompletionRequest};

/// The `tier` label of this face's metrics.
const TIER: &str = "router";

/// What the handlers share.
pub struct Http {
    core: Arc<Router>,
    token: Option<String>,
    /// The model's chat template, if its directory has one.
    chat_template: Option<String>,
}

/// The model's chat template: `chat_template.jinja`, or the `chat_template`
/// of `tokenizer_config.json`.
pub fn chat_template(model_dir: &std::path::Path) -> Option<String> {
    if let Ok(t) = std::fs::read_to_string(model_dir.join("chat_template.jinja")) {
        return Some(t);
    }
    let config: Value = serde_json::from_str(&std::fs::read_to_string(model_dir.join("tokenizer_config.json")).ok()?).ok()?;
    config.get("chat_template")?.as_str().map(String::from)
}

/// Serve the front door on `listen` (TLS with `tls`) until `stop`; returns
/// the bound address.
pub async fn serve(
    core: Arc<Router>,
    listen: SocketAddr,
    tls: Option<Arc<ServerTls>>,
    token: Option<String>,
    chat_template: Option<String>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .with_state(Arc::new(Http { core, token, chat_template }));
    match tls {
        None => {
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                    tracing::error!(error = %e, "the HTTP front door stopped");
                }
            });
        }
        Some(tls) => {
            use tokio_stream::StreamExt;
            let mut incoming = Box::pin(blockserve_runtime::tls::incoming(listener, tls));
            tokio::spawn(async move {
                loop {
                    let stream = tokio::select! {
                        s = incoming.next() => match s { Some(Ok(s)) => s, Some(Err(_)) => continue, None => return },
                        _ = stop.wait_for(|s| *s) => return,
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app.clone());
                    tokio::spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                        let _ = builder.serve_connection(io, service).await;
                    });
                }
            });
        }
    }
    tracing::info!(address = %bound, "OpenAI-compatible HTTP API listening");
    Ok(bound)
}

impl Http {
    fn auth(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        crate::auth::check(self.token.as_deref(), headers.get("authorization").map(|v| v.as_bytes())).map_err(ApiError::from)
    }
}

/// Count a request by path and HTTP code.
fn counted(path: &str, r: Response) -> Response {
    METRICS.requests.with_label_values(&[TIER, path, r.status().as_str()]).inc();
    r
}

/// A deadline the client asked for: `x-request-timeout` (seconds), or the
/// `x-stainless-timeout` OpenAI's SDKs send.
fn deadline(headers: &HeaderMap) -> Option<Duration> {
    ["x-request-timeout", "x-stainless-timeout"]
        .iter()
        .find_map(|k| headers.get(*k)?.to_str().ok()?.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(h): State<Arc<Http>>, headers: HeaderMap) -> Response {
    let r = match h.auth(&headers) {
        Err(e) => e.into_response(),
        Ok(()) => {
            let m = &h.core.model;
            let model = json!({
                "id": m.name, "object": "model", "created": 0, "owned_by": "blockserve",
                "max_model_len": m.max_total_tokens, "block_length": m.block_length, "vocab_size": m.vocab,
            });
            Json(json!({"object": "list", "data": [model]})).into_response()
        }
    };
    counted("/v1/models", r)
}

/// Which response shape a stream or body takes.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// What a completion asked for beyond the session.
struct Shape {
    kind: Kind,
    model: String,
    echo: Option<String>,
    /// Return the chosen tokens' log-probabilities (and them as "top").
    logprobs: Option<bool>,
    include_usage: bool,
}

/// A handler's answer, or its error in OpenAI's body, counted by path.
fn answer(path: &str, r: Result<Response, ApiError>) -> Response {
    counted(path, r.unwrap_or_else(IntoResponse::into_response))
}

async fn completions(State(h): State<Arc<Http>>, headers: HeaderMap, body: Bytes) -> Response {
    answer("/v1/completions", completion(&h, &headers, &body).await)
}

async fn completion(h: &Arc<Http>, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    h.auth(headers)?;
    let req: CompletionRequest = openai::parse(body, openai::COMPLETION)?;
    req.common.log_user();
    let model = h.core.model.name.clone();
    let shape = Shape {
        kind: Kind::Completion,
        model: model.clone(),
        echo: req.echo.then(|| req.prompt_text(h.core.tokenizer.as_deref())),
        logprobs: req.logprobs.map(|n| n >= 1),
        include_usage: req.common.include_usage(),
    };
    if let Some(last) = headers.get("last-event-id") {
        return resume(h, last, shape).await;
    }
    let generate = req.to_generate(&model)?;
    run(h, generate, req.common.stream, deadline(headers), shape).await
}

async fn chat(State(h): State<Arc<Http>>, headers: HeaderMap, body: Bytes) -> Response {
    answer("/v1/chat/completions", chat_completion(&h, &headers, &body).await)
}

async fn chat_completion(h: &Arc<Http>, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    h.auth(headers)?;
    let req: ChatRequest = openai::parse(body, openai::CHAT)?;
    req.common.log_user();
    let model = h.core.model.name.clone();
    req.common.check(&model)?;
    let Some(template) = &h.chat_template else {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the model `{model}` has no chat template (chat_template.jinja or tokenizer_config.json's chat_template); send a prompt to /v1/completions"
            ),
        ));
    };
    if req.top_logprobs.is_some_and(|n| n > 1) {
        return Err(ApiError::invalid("top_logprobs", "top_logprobs: at most 1 (only the chosen token's log-probability is computed)"));
    }
    let messages: Vec<Value> =
        req.messages.iter().enumerate().map(|(i, m)| Ok(json!({"role": m.role, "content": m.content.text(i)?}))).collect::<Result<_, ApiError>>()?;
    let env = minijinja::Environment::new();
    let prompt = env
        .render_str(template, minijinja::context! { messages => messages, add_generation_prompt => true, bos_token => "", eos_token => "" })
        .map_err(|e| ApiError::invalid("messages", format!("the chat template failed on these messages: {e}")))?;
    let shape = Shape {
        kind: Kind::Chat,
        model,
        echo: None,
        logprobs: req.logprobs.then_some(req.top_logprobs.unwrap_or(0) >= 1),
        include_usage: req.common.include_usage(),
    };
    if let Some(last) = headers.get("last-event-id") {
        return resume(h, last, shape).await;
    }
    let generate = GenerateRequest {
        prompt: Some(blockserve_proto::v1::generate_request::Prompt::Text(prompt)),
        parameters: Some(req.common.parameters()),
        session_id: String::new(),
    };
    run(h, generate, req.common.stream, deadline(headers), shape).await
}

/// Start a session; answer whole or as a stream.
async fn run(h: &Arc<Http>, generate: GenerateRequest, stream: bool, deadline: Option<Duration>, shape: Shape) -> Result<Response, ApiError> {
    let (id, events) = h.core.start(generate, deadline).await?;
    // The prompt's ids are needed only to score the output (usage comes
    // with the session's end): no store read otherwise.
    let prompt_ids = if shape.logprobs.is_some() { h.core.record(&id).await?.spec.prompt_ids } else { vec![] };
    if stream {
        return Ok(sse(h.clone(), id, events, 0, prompt_ids, shape));
    }
    whole(h, id, events, prompt_ids, shape).await
}

/// The rest of a session after `Last-Event-ID: <session>:<offset>`.
async fn resume(h: &Arc<Http>, last: &HeaderValue, shape: Shape) -> Result<Response, ApiError> {
    let text = last.to_str().unwrap_or("");
    let Some((id, offset)) = text.rsplit_once(':').and_then(|(id, o)| Some((id.to_string(), o.parse::<usize>().ok()?))) else {
        return Err(ApiError::invalid(
            "Last-Event-ID",
            format!("Last-Event-ID must be <session>:<offset> as the stream's event ids, got {}", crate::validate::echo(text)),
        ));
    };
    let rec = h.core.named(&id).await.map_err(|st| match st.code() {
        tonic::Code::NotFound => ApiError::not_found("session_not_found", st.message()),
        _ => st.into(),
    })?;
    if offset > rec.generated && rec.state.is_final() {
        return Err(ApiError::invalid("Last-Event-ID", format!("offset {offset} is beyond the {} tokens this session generated", rec.generated)));
    }
    let slot = h.core.stream_slot()?;
    let (tx, events) = mpsc::channel(16);
    tokio::spawn(h.core.clone().follow(id.clone(), offset, tx, slot));
    Ok(sse(h.clone(), id, events, offset, rec.spec.prompt_ids, Shape { echo: None, ..shape }))
}

/// A whole (non-streamed) answer.
async fn whole(
    h: &Arc<Http>,
    id: String,
    events: mpsc::Receiver<Result<GenerateResponse, Status>>,
    prompt_ids: Vec<u32>,
    shape: Shape,
) -> Result<Response, ApiError> {
    let (tokens, text, finished) = crate::sessions::collect(events).await?;
    let f = finished.ok_or_else(|| ApiError::from(Status::unavailable("the session's stream ended without its end")))?;
    if !f.error.is_empty() {
        return Err(ApiError::from(Status::internal(f.error)));
    }
    let logprobs = match shape.logprobs {
        Some(top) => Some(logprobs(h, &prompt_ids, &[], &tokens, top, shape.kind).await?),
        None => None,
    };
    let reason = openai::finish_reason(f.reason);
    let usage = f.usage.map(|u| openai::usage(u.prompt_tokens, u.generated_tokens)).unwrap_or(Value::Null);
    let created = now_s();
    let body = match shape.kind {
        Kind::Completion => {
            let text = format!("{}{text}", shape.echo.unwrap_or_default());
            json!({"id": format!("cmpl-{id}"), "object": "text_completion", "created": created, "model": shape.model,
                "choices": [{"index": 0, "text": text, "token_ids": tokens, "logprobs": logprobs, "finish_reason": reason}], "usage": usage})
        }
        Kind::Chat => json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion", "created": created, "model": shape.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "token_ids": tokens, "logprobs": logprobs, "finish_reason": reason}],
            "usage": usage}),
    };
    let mut r = Json(body).into_response();
    r.headers_mut().insert("x-session-id", HeaderValue::from_str(&id).expect("session ids are ASCII"));
    Ok(r)
}

/// Log-probabilities of `new` (after `prompt` and `before`), from the same
/// scoring as Score, in the shape of `kind`.
async fn logprobs(h: &Arc<Http>, prompt: &[u32], before: &[u32], new: &[u32], top: bool, kind: Kind) -> Result<Value, ApiError> {
    let all: Vec<u32> = prompt.iter().chain(before).chain(new).copied().collect();
    let scored = h.core.score(all).await?;
    let first = scored.first_scored as usize;
    let start = prompt.len() + before.len();
    // Score gives log p of each token from `first_scored` on (the first
    // block's tokens have no context to be scored with).
    let lps: Vec<Option<f32>> = (0..new.len()).map(|j| (start + j).checked_sub(first).and_then(|i| scored.logprobs.get(i).copied())).collect();
    let strings: Vec<String> = new.iter().map(|&t| h.core.tokenizer.as_deref().map(|tk| tk.decode(&[t])).unwrap_or_else(|| t.to_string())).collect();
    Ok(match kind {
        Kind::Completion => {
            let mut offsets = Vec::with_capacity(strings.len());
            let mut at = 0;
            for s in &strings {
                offsets.push(at);
                at += s.len();
            }
            openai::logprobs_object(&strings, &lps, &offsets, top)
        }
        Kind::Chat => {
            let content: Vec<Value> = strings
                .iter()
                .zip(&lps)
                .map(|(t, lp)| {
                    let tops = if top { json!([{"token": t, "logprob": lp}]) } else { json!([]) };
                    json!({"token": t, "logprob": lp, "top_logprobs": tops})
                })
                .collect();
            json!({ "content": content })
        }
    })
}

/// Send one SSE event, waiting for room while the client reads (a slow
/// client slows its own stream only). A client gone makes it fail at once;
/// the session is still read to its end.
async fn emit(tx: &mpsc::Sender<Result<Bytes, std::convert::Infallible>>, event: String) {
    let _ = tx.send(Ok(Bytes::from(event))).await;
}

/// A streamed answer: Server-Sent Events, each with `id: <session>:<offset>`.
/// The forwarding task reads the session to its end even when the client
/// has gone: the session stays whole and resumable.
fn sse(h: Arc<Http>, id: String, mut events: mpsc::Receiver<Result<GenerateResponse, Status>>, from: usize, prompt_ids: Vec<u32>, shape: Shape) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(32);
    let session = id.clone();
    tokio::spawn(async move {
        let created = now_s();
        let (object, prefix) = match shape.kind {
            Kind::Completion => ("text_completion", "cmpl"),
            Kind::Chat => ("chat.completion.chunk", "chatcmpl"),
        };
        // `token_ids` (an extension, as vLLM's) lets a client check the
        // stream against the gRPC API token for token.
        let chunk = |text: &str, ids: &[u32], logprobs: Value, finish: Option<&str>, first: bool| {
            let choice = match shape.kind {
                Kind::Completion => json!({"index": 0, "text": text, "token_ids": ids, "logprobs": logprobs, "finish_reason": finish}),
                Kind::Chat => {
                    let delta = if first { json!({"role": "assistant", "content": text}) } else { json!({"content": text}) };
                    json!({"index": 0, "delta": delta, "token_ids": ids, "logprobs": logprobs, "finish_reason": finish})
                }
            };
            json!({"id": format!("{prefix}-{session}"), "object": object, "created": created, "model": shape.model, "choices": [choice]})
        };
        let mut offset = from;
        let mut generated: Vec<u32> = vec![];
        let mut first = from == 0;
        if let Some(echo) = &shape.echo {
            emit(&tx, format!("id: {session}:0\ndata: {}\n\n", chunk(echo, &[], Value::Null, None, true))).await;
            first = false;
        }
        while let Some(msg) = events.recv().await {
            match msg.map(|m| m.event) {
                Ok(Some(generate_response::Event::Tokens(c))) => {
                    let n = c.token_ids.len();
                    // Scoring is for a reader: none once the client has gone.
                    let lp = match shape.logprobs {
                        Some(top) if !tx.is_closed() => logprobs(&h, &prompt_ids, &generated, &c.token_ids, top, shape.kind).await.unwrap_or(Value::Null),
                        _ => Value::Null,
                    };
                    if shape.logprobs.is_some() {
                        generated.extend_from_slice(&c.token_ids);
                    }
                    offset = c.offset as usize + n;
                    let event = format!("id: {session}:{offset}\ndata: {}\n\n", chunk(&c.text, &c.token_ids, lp, None, first));
                    first = false;
                    emit(&tx, event).await;
                }
                Ok(Some(generate_response::Event::Finished(f))) => {
                    let reason = if f.error.is_empty() { openai::finish_reason(f.reason) } else { "error" };
                    emit(&tx, format!("id: {session}:{offset}\ndata: {}\n\n", chunk("", &[], Value::Null, Some(reason), first))).await;
                    if shape.include_usage {
                        let usage = f.usage.map(|u| openai::usage(u.prompt_tokens, u.generated_tokens)).unwrap_or(Value::Null);
                        let last = json!({"id": format!("{prefix}-{session}"), "object": object, "created": created, "model": shape.model, "choices": [], "usage": usage});
                        emit(&tx, format!("data: {last}\n\n")).await;
                    }
                    break;
                }
                Ok(_) => {}
                Err(st) => {
                    emit(&tx, format!("data: {}\n\n", ApiError::from(st).body())).await;
                    break;
                }
            }
        }
        emit(&tx, "data: [DONE]\n\n".to_string()).await;
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let mut r = (StatusCode::OK, body).into_response();
    let headers = r.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("text/event-stream"));
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    headers.insert("x-session-id", HeaderValue::from_str(&id).expect("session ids are ASCII"));
    r
}

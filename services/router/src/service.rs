//! The public `Generation` service.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockserve_proto::v1::generation_server::Generation;
use blockserve_proto::v1::token_decoder_client::TokenDecoderClient;
use blockserve_proto::v1::*;
use blockserve_runtime::metrics;
use blockserve_runtime::{params, status};
use blockserve_store::{now_ms, Assignment, InstanceInfo, Outcome, SessionRecord, SessionSpec, SessionStore, Tier};
use blockserve_text::Tokenizer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{relay, validate};

/// The `tier` label of this service's metrics.
const TIER: &str = "router";

/// What the router knows of the model (from its config and tokenizer; the router
/// holds no weights).
pub struct ModelFacts {
    pub name: String,
    pub vocab: usize,
    pub block_length: usize,
    pub max_total_tokens: usize,
    pub eos: Option<u32>,
    pub dtype: String,
}

/// Default of `--max-migrations`.
pub const DEFAULT_MAX_MIGRATIONS: u32 = 3;
/// Default of `--max-streams`.
pub const DEFAULT_MAX_STREAMS: usize = 8192;

pub struct Router {
    pub store: Arc<dyn SessionStore>,
    pub model: ModelFacts,
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Bounds on prompts (vocabulary, text bytes).
    pub prompt_limits: validate::PromptLimits,
    /// Tokenizations running at once (each on a blocking thread, so a burst
    /// of large prompts never holds up the threads that serve other calls).
    tokenizing: Arc<tokio::sync::Semaphore>,
    pub max_new_tokens: usize,
    pub session_ttl: Duration,
    /// How often Resume looks for new tokens of a session served elsewhere.
    pub poll: Duration,
    /// Most times one session may move to another instance after a failure.
    pub max_migrations: u32,
    /// Router streams open at once (Generate and Resume); more get
    /// RESOURCE_EXHAUSTED.
    pub streams: Arc<tokio::sync::Semaphore>,
    pub max_streams: usize,
    /// Channels to token decoders.
    pub channels: blockserve_runtime::channels::Channels,
    /// Sessions this router started on each instance (by address) that are still
    /// running, and when each was last picked. Reported loads lag by a lease
    /// period; this spreads a burst, and between equally loaded instances
    /// the one picked longest ago goes first.
    routed: Arc<std::sync::Mutex<Picks>>,
}

#[derive(Default)]
pub(crate) struct Picks {
    running: std::collections::HashMap<String, u32>,
    last: std::collections::HashMap<String, u64>,
    count: u64,
}

/// Counts a session (or a Score call) against the instance it was routed to,
/// while it runs.
pub(crate) struct Routed(Arc<std::sync::Mutex<Picks>>, String);

impl Drop for Routed {
    fn drop(&mut self) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.running.get_mut(&self.1) {
            *n = n.saturating_sub(1);
        }
    }
}

pub(crate) type EventTx = mpsc::Sender<Result<GenerateResponse, Status>>;

pub(crate) fn event(id: &str, e: generate_response::Event) -> Result<GenerateResponse, Status> {
    Ok(GenerateResponse { session_id: id.to_string(), event: Some(e) })
}

fn reason_from_name(name: Option<&str>) -> FinishReason {
    match name {
        Some("eos") => FinishReason::Eos,
        Some("length") => FinishReason::Length,
        Some("stop") => FinishReason::Stop,
        Some("cancelled") => FinishReason::Cancelled,
        Some("error") => FinishReason::Error,
        _ => FinishReason::Unspecified,
    }
}

fn wire_state(s: blockserve_store::SessionState) -> SessionState {
    use blockserve_store::SessionState as S;
    match s {
        S::Queued => SessionState::Queued,
        S::Prefilling => SessionState::Prefilling,
        S::Decoding => SessionState::Decoding,
        S::Finished => SessionState::Finished,
        S::Cancelled => SessionState::Cancelled,
        S::Failed => SessionState::Failed,
    }
}

/// The final message of a stored session.
pub(crate) fn finished_from_record(r: &SessionRecord) -> Finished {
    let created = r.spec.created_at_ms;
    let span = |t: Option<u64>| t.map_or(0.0, |t| t.saturating_sub(created) as f64);
    let n = r.generated as f64;
    let (first, last) = (r.first_token_at_ms, r.finished_at_ms);
    let itl = match (first, last) {
        (Some(a), Some(b)) if n > 1.0 => b.saturating_sub(a) as f64 / (n - 1.0),
        _ => 0.0,
    };
    Finished {
        reason: reason_from_name(r.finish_reason.as_deref()) as i32,
        usage: Some(Usage { prompt_tokens: r.spec.prompt_ids.len() as u32, generated_tokens: r.generated as u32, ..Default::default() }),
        timings: Some(Timings { time_to_first_token_ms: span(first), total_ms: span(last), mean_inter_token_ms: itl }),
        error: r.error.clone().unwrap_or_default(),
    }
}

impl Router {
    pub fn new(store: Arc<dyn SessionStore>, model: ModelFacts, tokenizer: Option<Tokenizer>, max_new_tokens: usize, session_ttl: Duration) -> Self {
        let prompt_limits = validate::PromptLimits::new(model.vocab, model.max_total_tokens, tokenizer.as_ref());
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            store,
            model,
            tokenizer: tokenizer.map(Arc::new),
            prompt_limits,
            tokenizing: Arc::new(tokio::sync::Semaphore::new(threads)),
            max_new_tokens,
            session_ttl,
            poll: Duration::from_millis(20),
            max_migrations: DEFAULT_MAX_MIGRATIONS,
            streams: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_STREAMS)),
            max_streams: DEFAULT_MAX_STREAMS,
            channels: Default::default(),
            routed: Default::default(),
        }
    }

    pub(crate) async fn channel(&self, address: &str) -> Result<Channel, Status> {
        self.channels.get(address).await
    }

    /// The least-loaded live instance of `tier` with room for a session, other
    /// than the instances (by id: a process restarted on the same address is
    /// a new instance) in `exclude`.
    /// The choice counts against the instance until the returned guard drops:
    /// it is made and counted under one lock, so a burst of concurrent
    /// sessions spreads over the instances instead of all taking the one that
    /// looked least loaded.
    pub(crate) async fn pick(&self, tier: Tier, exclude: &[String]) -> Result<(InstanceInfo, Routed), Status> {
        let mut all = self.store.instances(tier).await.map_err(status::from_store)?;
        let name = tier.as_str().replace('_', " ");
        if all.is_empty() {
            return Err(Status::unavailable(format!("no live {name} instance is registered")));
        }
        all.retain(|i| !exclude.contains(&i.id));
        if all.is_empty() {
            return Err(Status::unavailable(format!("no live {name} instance other than the {} that failed this session", exclude.len())));
        }
        let mut picks = self.routed.lock().unwrap_or_else(|p| p.into_inner());
        let best = all
            .into_iter()
            .filter(|i| i.free_capacity > 0)
            // Reported load plus what this router sent since (it may double count
            // for a lease period, alike for every instance); then the one
            // picked longest ago, so sessions started one after another
            // alternate instead of all taking the first of equals.
            .min_by_key(|i| {
                let running = picks.running.get(&i.address).copied().unwrap_or(0);
                (i.load_key().0 + running, i.load_key(), picks.last.get(&i.address).copied().unwrap_or(0))
            })
            .ok_or_else(|| Status::resource_exhausted(format!("every {name} is at capacity; retry later")))?;
        picks.count += 1;
        let n = picks.count;
        picks.last.insert(best.address.clone(), n);
        *picks.running.entry(best.address.clone()).or_default() += 1;
        let guard = Routed(self.routed.clone(), best.address.clone());
        Ok((best, guard))
    }

    pub(crate) async fn record(&self, id: &str) -> Result<SessionRecord, Status> {
        self.store.session(id).await.map_err(status::from_store)?.ok_or_else(|| Status::not_found(format!("session {id:?} not found (unknown or expired)")))
    }

    /// The record of a session a client names (checked first).
    async fn named(&self, id: &str) -> Result<SessionRecord, Status> {
        validate::session_id(id)?;
        self.record(id).await
    }

    /// A prompt as token ids. Text is tokenized on a blocking thread, a few
    /// at a time, after its length is checked.
    pub(crate) async fn prompt_ids(&self, prompt: validate::Prompt) -> Result<Vec<u32>, Status> {
        let (tokenizer, limits) = (self.tokenizer.clone(), self.prompt_limits);
        if !prompt.is_text() {
            return validate::prompt_ids(prompt, None, limits);
        }
        if let validate::Prompt::Text(t) = &prompt {
            if t.len() > limits.max_text_bytes {
                return validate::prompt_ids(prompt, None, limits);
            }
        }
        let _turn = self.tokenizing.clone().acquire_owned().await.map_err(|_| Status::unavailable("the router is shutting down"))?;
        tokio::task::spawn_blocking(move || validate::prompt_ids(prompt, tokenizer.as_deref(), limits))
            .await
            .map_err(|e| Status::internal(format!("tokenizer: {e}")))?
    }

    /// A stream slot, or RESOURCE_EXHAUSTED at once when every one is taken.
    pub(crate) fn stream_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this router relays its limit of {} streams (--max-streams); retry later or use another router",
                self.max_streams
            ))
        })
    }

    /// Validate, route, record and start a session; events arrive on the
    /// receiver. It runs as a task of its own: a client that goes away in the
    /// middle (the RPC future is dropped) must not leave a session recorded
    /// and never run, or running with nobody to stop it; the task finishes,
    /// then sees the receiver gone and cancels the session.
    async fn start(
        self: &Arc<Self>,
        req: GenerateRequest,
        deadline: Option<Duration>,
    ) -> Result<(String, mpsc::Receiver<Result<GenerateResponse, Status>>), Status> {
        let this = self.clone();
        // In the RPC's span: the session's spans (store calls, the token
        // decoder's Run) belong to its trace.
        let task = async move { this.start_session(req, deadline).await }.instrument(tracing::Span::current());
        tokio::spawn(task).await.map_err(|e| Status::internal(format!("session start: {e}")))?
    }

    async fn start_session(
        self: Arc<Self>,
        req: GenerateRequest,
        deadline: Option<Duration>,
    ) -> Result<(String, mpsc::Receiver<Result<GenerateResponse, Status>>), Status> {
        let arrived = Instant::now();
        let slot = self.stream_slot()?;
        let (tx, rx) = mpsc::channel(16);
        if !req.session_id.is_empty() {
            validate::session_id(&req.session_id)?;
        }
        let m = &self.model;
        let prompt = self.prompt_ids(validate::generate_prompt(&req)?).await?;
        let parameters = params::validate(&req.parameters.clone().unwrap_or_default(), m.vocab)?;
        let max_new = parameters.max_new_tokens.unwrap_or_default() as usize;
        validate::lengths(prompt.len(), max_new, self.max_new_tokens, m.max_total_tokens)?;
        let spec = SessionSpec { id: req.session_id.clone(), prompt_ids: prompt.clone(), parameters: parameters.clone(), created_at_ms: now_ms() };
        if !req.session_id.is_empty() {
            if let Some(rec) = self.store.session(&req.session_id).await.map_err(status::from_store)? {
                return self.attach(rec, &spec, tx, rx, slot).await;
            }
        }
        let (td, td_routed) = self.pick(Tier::TokenDecoder, &[]).await?;
        let (bd, bd_routed) = self.pick(Tier::BlockDecoder, &[]).await?;
        let routed = (td_routed, bd_routed);
        let id = if req.session_id.is_empty() { uuid::Uuid::new_v4().to_string() } else { req.session_id.clone() };
        let spec = SessionSpec { id: id.clone(), ..spec };
        let to = Assignment { token_decoder: td.address.clone(), token_decoder_id: td.id.clone(), block_decoder: bd.address.clone() };
        if !self.store.create_session(&spec, &to).await.map_err(status::from_store)? {
            // Lost a race with another request of the same id: attach to it.
            let rec = self.record(&id).await?;
            return self.attach(rec, &spec, tx, rx, slot).await;
        }
        let run = RunRequest {
            session_id: id.clone(),
            prompt_ids: prompt.clone(),
            parameters: Some(parameters),
            block_decoder: bd.address,
            eos_token_id: m.eos,
            max_migrations: self.max_migrations,
            ..Default::default()
        };
        let (client, events) = match self.run_on(&td.address, run).await {
            Ok(r) => r,
            Err(e) => {
                let outcome = Outcome { state: blockserve_store::SessionState::Failed, finish_reason: "error".into(), error: Some(e.message().into()) };
                let _ = self.store.finish(&id, None, &outcome, self.session_ttl).await;
                return Err(e);
            }
        };
        let started = Started { prompt_tokens: prompt.len() as u32, attached: false };
        let _ = tx.send(event(&id, generate_response::Event::Started(started))).await;
        let relay = relay::Relay {
            id: id.clone(),
            client,
            events,
            tx,
            token_decoder: td.address,
            token_decoder_id: td.id,
            arrived,
            deadline: deadline.map(|d| arrived + d),
        };
        tokio::spawn(self.clone().relay(relay, (routed, slot)));
        Ok((id, rx))
    }
}

impl Router {
    /// A Generate with the id of an existing session: the same request again
    /// (a client retrying, or reconnecting through another router) follows
    /// that session from its start; another request under the same id is
    /// refused, never answered with the other request's output.
    async fn attach(
        self: &Arc<Self>,
        rec: SessionRecord,
        spec: &SessionSpec,
        tx: EventTx,
        rx: mpsc::Receiver<Result<GenerateResponse, Status>>,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(String, mpsc::Receiver<Result<GenerateResponse, Status>>), Status> {
        let id = rec.spec.id.clone();
        if rec.spec.prompt_ids != spec.prompt_ids || rec.spec.parameters != spec.parameters {
            let differs = if rec.spec.prompt_ids != spec.prompt_ids { "its prompt differs" } else { "its parameters differ" };
            return Err(Status::already_exists(format!(
                "session_id {} is taken by another request ({differs}); choose another id, or send the same request to attach to it",
                validate::echo(&id)
            )));
        }
        let started = Started { prompt_tokens: rec.spec.prompt_ids.len() as u32, attached: true };
        let _ = tx.send(event(&id, generate_response::Event::Started(started))).await;
        tokio::spawn(self.clone().follow(id.clone(), 0, tx, slot));
        Ok((id, rx))
    }
}

/// The `grpc-timeout` a client set on a call (its deadline), if any.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    blockserve_runtime::guard::grpc_timeout(metadata.as_ref())
}

/// The service object tonic serves (shares the router state).
pub struct GenerationService(pub Arc<Router>);

#[tonic::async_trait]
impl Generation for GenerationService {
    type GenerateStream = ReceiverStream<Result<GenerateResponse, Status>>;
    type ResumeStream = ReceiverStream<Result<GenerateResponse, Status>>;

    async fn generate(&self, req: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        metrics::rpc(TIER, "Generate", blockserve_runtime::telemetry::from_metadata(req.metadata()), async move {
            let deadline = grpc_timeout(req.metadata());
            let (_, rx) = self.0.start(req.into_inner(), deadline).await?;
            Ok(Response::new(ReceiverStream::new(rx)))
        })
        .await
    }

    async fn generate_unary(&self, req: Request<GenerateRequest>) -> Result<Response<GenerateUnaryResponse>, Status> {
        metrics::rpc(TIER, "GenerateUnary", blockserve_runtime::telemetry::from_metadata(req.metadata()), async move {
            let deadline = grpc_timeout(req.metadata());
            let (id, mut rx) = self.0.start(req.into_inner(), deadline).await?;
            let mut out = GenerateUnaryResponse { session_id: id, ..Default::default() };
            while let Some(msg) = rx.recv().await {
                match msg?.event {
                    Some(generate_response::Event::Tokens(c)) => {
                        out.token_ids.extend(c.token_ids);
                        out.text.push_str(&c.text);
                    }
                    Some(generate_response::Event::Finished(f)) => {
                        out.finished = Some(f);
                        break;
                    }
                    _ => {}
                }
            }
            Ok(Response::new(out))
        })
        .await
    }

    async fn resume(&self, req: Request<ResumeRequest>) -> Result<Response<Self::ResumeStream>, Status> {
        metrics::rpc(TIER, "Resume", blockserve_runtime::telemetry::from_metadata(req.metadata()), async move {
            let req = req.into_inner();
            let rec = self.0.named(&req.session_id).await?;
            let offset = req.offset as usize;
            if rec.state.is_final() && offset > rec.generated {
                return Err(Status::invalid_argument(format!("offset {offset} is beyond the {} tokens this session generated", rec.generated)));
            }
            let slot = self.0.stream_slot()?;
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(self.0.clone().follow(req.session_id, offset, tx, slot));
            Ok(Response::new(ReceiverStream::new(rx)))
        })
        .await
    }

    async fn cancel(&self, req: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        metrics::rpc(TIER, "Cancel", blockserve_runtime::telemetry::from_metadata(req.metadata()), async move {
            let id = req.into_inner().session_id;
            let rec = self.0.named(&id).await?;
            if rec.state.is_final() {
                return Ok(Response::new(CancelResponse { state: wire_state(rec.state) as i32 }));
            }
            // Tell the token decoder (best effort: it may be gone), then make it final
            // in the store whatever happened there.
            if let Ok(ch) = self.0.channel(&rec.assignment.token_decoder).await {
                let _ = TokenDecoderClient::new(ch).cancel(CancelRequest { session_id: id.clone() }).await;
            }
            let outcome = Outcome { state: blockserve_store::SessionState::Cancelled, finish_reason: "cancelled".into(), error: None };
            self.0.store.finish(&id, None, &outcome, self.0.session_ttl).await.map_err(status::from_store)?;
            let rec = self.0.record(&id).await?;
            Ok(Response::new(CancelResponse { state: wire_state(rec.state) as i32 }))
        })
        .await
    }

    async fn get_session(&self, req: Request<GetSessionRequest>) -> Result<Response<SessionInfo>, Status> {
        metrics::rpc(TIER, "GetSession", blockserve_runtime::telemetry::from_metadata(req.metadata()), async move {
            let id = req.into_inner().session_id;
            let rec = self.0.named(&id).await?;
            let tokens = self.0.store.tokens(&id, 0).await.map_err(status::from_store)?;
            let parameters = rec.spec.parameters.clone();
            Ok(Response::new(SessionInfo {
                session_id: id,
                state: wire_state(rec.state) as i32,
                prompt_ids: rec.spec.prompt_ids.clone(),
                token_ids: tokens,
                parameters: Some(parameters),
                token_decoder: rec.assignment.token_decoder.clone(),
                block_decoder: rec.assignment.block_decoder.clone(),
                finish_reason: reason_from_name(rec.finish_reason.as_deref()) as i32,
                error: rec.error.clone().unwrap_or_default(),
                created_at_ms: rec.spec.created_at_ms,
                updated_at_ms: rec.updated_at_ms,
                first_token_at_ms: rec.first_token_at_ms.unwrap_or(0),
                finished_at_ms: rec.finished_at_ms.unwrap_or(0),
                migrations: rec.migrations,
            }))
        })
        .await
    }

    async fn score(&self, req: Request<ScoreRequest>) -> Result<Response<ScoreResponse>, Status> {
        metrics::rpc(TIER, "Score", blockserve_runtime::telemetry::from_metadata(req.metadata()), async move {
            let r = &self.0;
            let ids = r.prompt_ids(validate::score_input(&req.into_inner().input)?).await?;
            if ids.len() > r.model.max_total_tokens {
                return Err(Status::invalid_argument(format!("input has {} tokens; the model's context allows {}", ids.len(), r.model.max_total_tokens)));
            }
            let (td, _td_routed) = r.pick(Tier::TokenDecoder, &[]).await?;
            let (bd, _bd_routed) = r.pick(Tier::BlockDecoder, &[]).await?;
            let mut client = TokenDecoderClient::new(r.channel(&td.address).await?);
            Ok(Response::new(client.score(ScoreIdsRequest { token_ids: ids, block_decoder: bd.address }).await?.into_inner()))
        })
        .await
    }

    async fn model_info(&self, _: Request<ModelInfoRequest>) -> Result<Response<ModelInfoResponse>, Status> {
        metrics::rpc(TIER, "ModelInfo", Default::default(), async move {
            let m = &self.0.model;
            Ok(Response::new(ModelInfoResponse {
                model_type: "block_transformer".into(),
                model_name: m.name.clone(),
                vocab_size: m.vocab as u32,
                block_length: m.block_length as u32,
                max_total_tokens: m.max_total_tokens as u32,
                max_new_tokens: self.0.max_new_tokens as u32,
                eos_token_id: m.eos,
                dtype: m.dtype.clone(),
                has_tokenizer: self.0.tokenizer.is_some(),
            }))
        })
        .await
    }
}

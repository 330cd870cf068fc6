//! The router's session core: what it knows of the model and of the
//! instances it routes to, and the primitives every path of a session uses
//! (picking an instance, reading a record, a stream slot, starting a run on a
//! token decoder, the events a client receives). The paths themselves are in
//! `start` (a new session), `relay` (following it through failures) and
//! `grpc` (the public API's face).

use std::sync::Arc;
use std::time::Duration;

use blockserve_config::PromptLayout;
use blockserve_proto::v1::*;
use blockserve_runtime::metrics::METRICS;
use blockserve_runtime::{status, telemetry};
use blockserve_store::{InstanceInfo, SessionRecord, SessionStore, Tier};
use blockserve_text::Tokenizer;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::Status;

use crate::prefix_routing::{self, PrefixIndex};
use crate::relay_link::{RelayLinks, SessionStream};
use crate::validate;

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
    /// Relay streams to token decoders (one each), over those channels.
    pub relay_links: RelayLinks,
    /// Sessions this router started on each instance (by address) that are still
    /// running, and when each was last picked. Reported loads lag by a lease
    /// period; this spreads a burst, and between equally loaded instances
    /// the one picked longest ago goes first.
    routed: Arc<std::sync::Mutex<Picks>>,
    /// Where this router sent prompt pages, when it routes by prefix
    /// (`--prefix-routing`).
    pub prefix_index: Option<std::sync::Mutex<PrefixIndex>>,
    /// The prompt layout of requests that leave theirs unset (`--prompt-layout`).
    pub prompt_layout: PromptLayout,
}

/// Why an instance was chosen (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Choice {
    LeastLoaded,
    /// The one holding the longest known prefix.
    Prefix,
    /// The one holding the longest known prefix was overloaded.
    PrefixOverloaded,
}

impl Choice {
    fn as_str(self) -> &'static str {
        match self {
            Choice::LeastLoaded => "least_loaded",
            Choice::Prefix => "prefix",
            Choice::PrefixOverloaded => "prefix_overloaded",
        }
    }
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

pub(crate) fn reason_from_name(name: Option<&str>) -> FinishReason {
    match name {
        Some("eos") => FinishReason::Eos,
        Some("length") => FinishReason::Length,
        Some("stop") => FinishReason::Stop,
        Some("cancelled") => FinishReason::Cancelled,
        Some("error") => FinishReason::Error,
        _ => FinishReason::Unspecified,
    }
}

pub(crate) fn wire_state(s: blockserve_store::SessionState) -> SessionState {
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

/// A session's whole output from its events: tokens, text, and its end
/// (none when the stream stopped without one).
pub(crate) async fn collect(mut events: mpsc::Receiver<Result<GenerateResponse, Status>>) -> Result<(Vec<u32>, String, Option<Finished>), Status> {
    let (mut tokens, mut text) = (vec![], String::new());
    while let Some(msg) = events.recv().await {
        match msg?.event {
            Some(generate_response::Event::Tokens(c)) => {
                tokens.extend(c.token_ids);
                text.push_str(&c.text);
            }
            Some(generate_response::Event::Finished(f)) => return Ok((tokens, text, Some(f))),
            _ => {}
        }
    }
    Ok((tokens, text, None))
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
            relay_links: Default::default(),
            routed: Default::default(),
            prefix_index: None,
            prompt_layout: PromptLayout::Reference,
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
        let all = self.candidates(tier, exclude).await?;
        self.choose(tier, all, &|_| (0, 0)).map(|(i, r, _, _)| (i, r))
    }

    /// The block decoder for a new session's prompt: by prefix when this
    /// router routes so (see [`crate::prefix_routing`]), else the least loaded.
    /// The lookup, the choice and the record happen under the index's lock:
    /// in a burst, the sessions of a new prefix after the first already see
    /// where the first went.
    pub(crate) async fn pick_block_decoder(&self, prompt: &[u32], layout: PromptLayout) -> Result<(InstanceInfo, Routed), Status> {
        let Some(index) = &self.prefix_index else { return self.pick(Tier::BlockDecoder, &[]).await };
        let hashes = prefix_routing::page_hashes(prompt, self.model.block_length, layout);
        let all = self.candidates(Tier::BlockDecoder, &[]).await?;
        let mut index = index.lock().unwrap_or_else(|p| p.into_inner());
        index.retain(|a| all.iter().any(|i| i.address == a));
        // While no cache has had to evict, a prefix held twice costs nothing:
        // between holders, load decides. Once caches are full, each prefix
        // keeps to the holder it was sent to last (the other may soon drop it).
        let pressure = all.iter().any(|i| i.cache_limit_pages > 0);
        let affinity = |i: &InstanceInfo| {
            let (pages, sent) = index.known(&i.address, &hashes);
            (pages, if pressure { sent } else { 0 })
        };
        let (bd, routed, choice, known) = self.choose(Tier::BlockDecoder, all, &affinity)?;
        index.record(&hashes, &bd.address, bd.cache_limit_pages as usize);
        drop(index);
        METRICS.routing_choices.with_label_values(&["block_decoder", choice.as_str()]).inc();
        tracing::debug!(block_decoder = %bd.address, reason = choice.as_str(), prompt_pages = hashes.len(), known_pages = known, "block decoder chosen");
        Ok((bd, routed))
    }

    /// The live instances of `tier` but those in `exclude`.
    async fn candidates(&self, tier: Tier, exclude: &[String]) -> Result<Vec<InstanceInfo>, Status> {
        let mut all = self.store.instances(tier).await.map_err(status::from_store)?;
        let name = || tier.as_str().replace('_', " ");
        if all.is_empty() {
            return Err(Status::unavailable(format!("no live {} instance is registered", name())));
        }
        all.retain(|i| !exclude.contains(&i.id));
        if all.is_empty() {
            return Err(Status::unavailable(format!("no live {} instance other than the {} that failed this session", name(), exclude.len())));
        }
        Ok(all)
    }

    /// The instance for a new session: among those not overloaded next to
    /// the least loaded (see [`prefix_routing::within_slack`]), the one of
    /// greatest `affinity` (the prompt pages it most likely holds, then a
    /// tie-break; (0, 0) for every instance when routing by load), then the
    /// least loaded. Returns it with why, and the pages it most likely holds.
    fn choose(
        &self,
        tier: Tier,
        all: Vec<InstanceInfo>,
        affinity: &dyn Fn(&InstanceInfo) -> (usize, u64),
    ) -> Result<(InstanceInfo, Routed, Choice, usize), Status> {
        let mut picks = self.routed.lock().unwrap_or_else(|p| p.into_inner());
        // Reported load plus what this router sent since (it may double count
        // for a lease period, alike for every instance); then the one picked
        // longest ago, so sessions started one after another alternate
        // instead of all taking the first of equals. Each instance with room
        // is scored once: (affinity, load key).
        let scored: Vec<_> = all
            .into_iter()
            .filter(|i| i.free_capacity > 0)
            .map(|i| {
                let running = picks.running.get(&i.address).copied().unwrap_or(0);
                let key = (i.load_key().0 + running, i.load_key(), picks.last.get(&i.address).copied().unwrap_or(0));
                (affinity(&i), key, i)
            })
            .collect();
        let least = scored
            .iter()
            .map(|(_, key, _)| key.0)
            .min()
            .ok_or_else(|| Status::resource_exhausted(format!("every {} is at capacity; retry later", tier.as_str().replace('_', " "))))?;
        let most_known = scored.iter().map(|(a, _, _)| a.0).max().unwrap_or(0);
        let (affinity, _, best) = scored
            .into_iter()
            .filter(|(_, key, _)| prefix_routing::within_slack(key.0, least))
            .min_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)))
            .expect("the least loaded is within its own slack");
        let known = affinity.0;
        let choice = match known {
            0 if most_known == 0 => Choice::LeastLoaded,
            n if n < most_known => Choice::PrefixOverloaded,
            _ => Choice::Prefix,
        };
        picks.count += 1;
        let n = picks.count;
        picks.last.insert(best.address.clone(), n);
        *picks.running.entry(best.address.clone()).or_default() += 1;
        let guard = Routed(self.routed.clone(), best.address.clone());
        Ok((best, guard, choice, known))
    }

    pub(crate) async fn record(&self, id: &str) -> Result<SessionRecord, Status> {
        self.store.session(id).await.map_err(status::from_store)?.ok_or_else(|| Status::not_found(format!("session {id:?} not found (unknown or expired)")))
    }

    /// The record of a session a client names (checked first).
    pub(crate) async fn named(&self, id: &str) -> Result<SessionRecord, Status> {
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

    /// Per-token log-probabilities of `ids` (what Score answers), computed by
    /// a token decoder with contexts from a block decoder.
    pub(crate) async fn score(&self, ids: Vec<u32>) -> Result<ScoreResponse, Status> {
        if ids.len() > self.model.max_total_tokens {
            return Err(Status::invalid_argument(format!("input has {} tokens; the model's context allows {}", ids.len(), self.model.max_total_tokens)));
        }
        let (td, _td_routed) = self.pick(Tier::TokenDecoder, &[]).await?;
        let (bd, _bd_routed) = self.pick(Tier::BlockDecoder, &[]).await?;
        let mut client = blockserve_proto::v1::token_decoder_client::TokenDecoderClient::new(self.channel(&td.address).await?);
        Ok(client.score(ScoreIdsRequest { token_ids: ids, block_decoder: bd.address }).await?.into_inner())
    }

    /// Start `run` on the token decoder at `address`, over this router's relay
    /// stream to it; the session's events come back on the returned stream.
    pub(crate) async fn run_on(&self, address: &str, mut run: RunRequest) -> Result<SessionStream, Status> {
        run.traceparent = telemetry::headers(&tracing::Span::current()).remove("traceparent").unwrap_or_default();
        self.relay_links.run(&self.channels, address, run).await
    }
}

//! One session, start to end: open it on the engine (which sends the prompt to
//! a block decoder over the shared link and decodes each block as its context
//! arrives), then record and relay each block's tokens (store + stream) until
//! a stop condition, a cancel or an error. Dropping the engine guard closes
//! the session on both tiers however this task ends.
//!
//! Failures it survives:
//! - the router's stream goes away (the router died): the session goes on,
//!   recording its output, so a client can `Resume` it through another router;
//!   only `Cancel` (which the router sends when its client leaves) stops it;
//! - the link to its block decoder breaks: it re-prefills prompt + output on
//!   another block decoder and goes on where it was (up to the session's
//!   migration limit);
//! - the store is unreachable: its writes wait in the recorder (see there).
//!
//! A migrated session (`RunRequest.generated_ids`) starts after the output it
//! already had, with offsets, stop checks and sampler positions counting it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockserve_model::prompt::{PaddedPrompt, PromptLayout};
use blockserve_model::FinishReason as ModelFinish;
use blockserve_proto::v1::{run_event, FinishReason, Finished, RunEvent, RunRequest, Timings, TokenChunk, Usage};
use blockserve_runtime::metrics::METRICS;
use blockserve_runtime::params::{self, Resolved};
use blockserve_store::{Outcome, SessionState, Tier};
use blockserve_text::{find_stop, IncrementalDecoder};
use tokio::sync::{mpsc, watch};
use tonic::{Code, Status};

use crate::lag::LAG;
use crate::model_thread::{Event, OpenRequest, Spec, TIER};
use crate::recorder::SessionWrites;
use crate::Shared;

/// How a session ended.
enum End {
    Done(ModelFinish),
    StopSequence,
    Cancelled,
    /// Its writes were fenced off: it was migrated elsewhere (or ended there).
    Superseded,
}

fn wire_reason(r: &End) -> (FinishReason, &'static str, SessionState) {
    match r {
        End::Done(ModelFinish::Eos) => (FinishReason::Eos, "eos", SessionState::Finished),
        End::Done(ModelFinish::Length) => (FinishReason::Length, "length", SessionState::Finished),
        End::Done(ModelFinish::StopToken) | End::StopSequence => (FinishReason::Stop, "stop", SessionState::Finished),
        End::Cancelled | End::Superseded => (FinishReason::Cancelled, "cancelled", SessionState::Cancelled),
    }
}

/// The session's way to its router. Once the router is gone the session
/// runs on without it.
struct Relay {
    to: Events,
    detached: bool,
}

impl Relay {
    async fn send(&mut self, e: Result<RunEvent, Status>) {
        if !self.detached && !self.to.send(e).await {
            self.detached = true;
            tracing::info!("router stream gone; the session goes on (clients may resume it)");
        }
    }
}

/// Where a session's events go: its own `Run` stream, or a router's relay
/// stream that it shares with the other sessions of that router.
pub enum Events {
    Stream(mpsc::Sender<Result<RunEvent, Status>>),
    Relay { session_id: String, to: crate::relay::Outbox },
}

impl Events {
    /// False once the router is gone.
    async fn send(&self, e: Result<RunEvent, Status>) -> bool {
        match self {
            Events::Stream(tx) => tx.send(e).await.is_ok(),
            Events::Relay { session_id, to } => to.send(crate::relay::session_event(session_id, e)).await,
        }
    }
}

/// The session's output so far and what streaming it needs.
struct Output<'t> {
    tokens: Vec<u32>,
    /// Protobuf bytes exchanged with block decoders.
    wire_bytes: u64,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    text: Option<IncrementalDecoder<'t>>,
    /// All text so far (kept only for stop sequences).
    full_text: String,
    chunks: u64,
    /// When the last failure was detected (until the next block arrives).
    failed_at: Option<Instant>,
}

/// Drive the session; events go to `tx`. Returns when the session is final.
pub async fn run(shared: Arc<Shared>, req: RunRequest, to: Events, mut cancel: watch::Receiver<bool>) {
    let id = req.session_id.clone();
    let started = Instant::now();
    let writes = shared.recorder.session(&id, req.epoch);
    let mut fenced = writes.fenced.clone();
    let text = shared.tokenizer.as_ref().map(|t| IncrementalDecoder::with_prefix(t, &req.generated_ids));
    let full_text = text.as_ref().map(|t| t.text()).unwrap_or_default();
    let mut out = Output { tokens: req.generated_ids.clone(), wire_bytes: 0, first_at: None, last_at: None, text, full_text, chunks: 0, failed_at: None };
    let mut relay = Relay { to, detached: false };
    let result = tokio::select! {
        r = drive(&shared, &req, &mut relay, &mut out, &writes) => r,
        _ = cancel.wait_for(|c| *c) => Ok(End::Cancelled),
        _ = fenced.wait_for(|f| *f) => Ok(End::Superseded),
    };
    let ttl = shared.session_ttl;
    match result {
        Ok(End::Superseded) => {
            tracing::info!(session = %id, "session moved on elsewhere; stopping here");
            let moved = Status::aborted(format!("session {id} was moved to another token decoder"));
            relay.send(Err(blockserve_runtime::status::session_end(moved, "moved"))).await;
        }
        Ok(end) => {
            let (reason, name, state) = wire_reason(&end);
            if let Err(e) = writes.finish(Outcome { state, finish_reason: name.into(), error: None }, ttl).await {
                tracing::warn!(session = %id, error = %e, "could not record the end of a session");
            }
            let ms = |t: Option<Instant>| t.map_or(0.0, |t| (t - started).as_secs_f64() * 1e3);
            let n = out.tokens.len() - req.generated_ids.len();
            let mean_itl = match (out.first_at, out.last_at) {
                (Some(a), Some(b)) if n > 1 => (b - a).as_secs_f64() * 1e3 / (n - 1) as f64,
                _ => 0.0,
            };
            let finished = Finished {
                reason: reason as i32,
                usage: Some(Usage {
                    prompt_tokens: req.prompt_ids.len() as u32,
                    generated_tokens: out.tokens.len() as u32,
                    internal_wire_bytes: out.wire_bytes,
                }),
                timings: Some(Timings { time_to_first_token_ms: ms(out.first_at), total_ms: ms(out.last_at), mean_inter_token_ms: mean_itl }),
                error: String::new(),
            };
            relay.send(Ok(RunEvent { kind: Some(run_event::Kind::Finished(finished)) })).await;
        }
        Err(status) => {
            let outcome = Outcome { state: SessionState::Failed, finish_reason: "error".into(), error: Some(status.message().to_string()) };
            let _ = writes.finish(outcome, ttl).await;
            tracing::warn!(session = %id, error = %status.message(), "session failed");
            relay.send(Err(blockserve_runtime::status::session_end(status, "failed"))).await;
        }
    }
}

/// Decode on the session's block decoder, moving to another one when the
/// link breaks.
async fn drive(shared: &Shared, req: &RunRequest, relay: &mut Relay, out: &mut Output<'_>, writes: &SessionWrites) -> Result<End, Status> {
    let l = shared.model.block_length();
    // The router validated them; a Run request from elsewhere gets the same
    // check (it returns validated parameters unchanged).
    // (An unset layout is the reference's: the router always sets one.)
    let p = params::resolve(
        &params::validate(&req.parameters.clone().unwrap_or_default(), shared.model.config.vocab_size, PromptLayout::Reference)?,
        req.eos_token_id,
    );
    // Output so far must end on a block boundary of the session's layout.
    PaddedPrompt::lay_out(&req.prompt_ids, &out.tokens, l, p.layout).map_err(|e| Status::invalid_argument(e.to_string()))?;
    if out.tokens.len() >= p.stop.max_new_tokens {
        return Ok(End::Done(ModelFinish::Length));
    }
    let (mut block_decoder, mut migrations) = (req.block_decoder.clone(), req.migrations);
    loop {
        match decode_on(shared, req, &p, &block_decoder, relay, out, writes).await {
            // Unavailable is what a broken or unreachable link gives.
            Err(st) if st.code() == Code::Unavailable => {
                migrations += 1;
                if migrations > req.max_migrations {
                    METRICS.migrations.with_label_values(&[TIER, "limit"]).inc();
                    let limit = req.max_migrations;
                    return Err(Status::unavailable(format!("{}; the session reached its limit of {limit} migrations (--max-migrations)", st.message())));
                }
                out.failed_at.get_or_insert_with(Instant::now);
                let next = another_block_decoder(shared, &block_decoder).await.map_err(|e| Status::unavailable(format!("{}; {e}", st.message())))?;
                tracing::warn!(session = %req.session_id, from = %block_decoder, to = %next, error = %st.message(), tokens = out.tokens.len(), "moving the session to another block decoder");
                METRICS.migrations.with_label_values(&[TIER, "block_decoder_lost"]).inc();
                writes.moved(&next).await.map_err(blockserve_runtime::status::from_store)?;
                block_decoder = next;
            }
            r => return r,
        }
    }
}

/// A live block decoder other than `failed` (which is taken again only after
/// a few seconds: it may have restarted on its address).
async fn another_block_decoder(shared: &Shared, failed: &str) -> Result<String, String> {
    let start = Instant::now();
    loop {
        let waited = start.elapsed();
        if let Ok(all) = shared.store.instances(Tier::BlockDecoder).await {
            let pick = all.into_iter().filter(|i| i.free_capacity > 0 && (i.address != failed || waited > Duration::from_secs(3))).min_by_key(|i| i.load_key());
            if let Some(i) = pick {
                return Ok(i.address);
            }
        }
        if waited > MOVE_TIMEOUT {
            return Err(format!("no other block decoder came up within {}s", MOVE_TIMEOUT.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long a session waits for a block decoder to move to.
const MOVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Open the session on `block_decoder` (prefilling prompt + output so far) and
/// record and relay its blocks until it ends or fails.
async fn decode_on(
    shared: &Shared,
    req: &RunRequest,
    p: &Resolved,
    block_decoder: &str,
    relay: &mut Relay,
    out: &mut Output<'_>,
    writes: &SessionWrites,
) -> Result<End, Status> {
    let l = shared.model.block_length();
    let link = shared.links.get(block_decoder).await?;
    let padded = PaddedPrompt::lay_out(&req.prompt_ids, &out.tokens, l, p.layout).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    out.wire_bytes += 4 * padded.ids.len() as u64;
    let history = if p.sampling.uses_history() { req.prompt_ids.iter().chain(&out.tokens).copied().collect() } else { vec![] };
    let open = shared.engine.open(OpenRequest {
        key: shared.next_key.fetch_add(1, Ordering::Relaxed),
        session_id: req.session_id.clone(),
        link,
        max_new_blocks: padded.new_blocks(p.stop.max_new_tokens - out.tokens.len(), l) as u32,
        prompt: padded.ids,
        forced: padded.forced,
        generated: out.tokens.clone(),
        traceparent: blockserve_runtime::telemetry::headers(&tracing::Span::current()).remove("traceparent").unwrap_or_default(),
        spec: Spec { sampling: p.sampling.clone(), stop: p.stop.clone(), history },
        events: events_tx,
    })?;
    if out.first_at.is_none() {
        writes.progress(SessionState::Prefilling).await.map_err(blockserve_runtime::status::from_store)?;
    }
    loop {
        // A block decoder that keeps the link open but stops answering (hung,
        // or overloaded far beyond its queue) would hold the session for
        // ever: past the timeout it counts as lost and the session moves.
        let next = async {
            match shared.block_timeout {
                Some(t) => tokio::time::timeout(t, events.recv()).await.map_err(|_| {
                    Status::unavailable(format!("block decoder {block_decoder} sent nothing for this session in {} s (--block-timeout-s)", t.as_secs_f64()))
                }),
                None => Ok(events.recv().await),
            }
        };
        let (mut new, mut finish, mut wire_bytes) = match next.await? {
            Some(Event::Block { tokens, finish, wire_bytes, reused, settled_at }) => {
                LAG.taken(settled_at);
                if let Some(n) = reused {
                    writes.reused(n).await.map_err(blockserve_runtime::status::from_store)?;
                }
                (tokens, finish, wire_bytes)
            }
            Some(Event::Failed(st)) => return Err(st),
            None => return Err(Status::internal("token decoder engine dropped the session")),
        };
        // Blocks that arrived meanwhile join this one: a task that fell behind
        // catches up with one record and one message instead of one per block.
        // (Not with stop sequences, which cut the output at a block's end.)
        let mut blocks = 1;
        while finish.is_none() && p.stop_sequences.is_empty() {
            match events.try_recv() {
                Ok(Event::Block { tokens, finish: f, wire_bytes: w, settled_at, .. }) => {
                    LAG.taken(settled_at);
                    new.extend_from_slice(&tokens);
                    (finish, wire_bytes, blocks) = (f, wire_bytes + w, blocks + 1);
                }
                Ok(Event::Failed(st)) => return Err(st),
                Err(_) => break,
            }
        }
        if out.first_at.is_none() {
            writes.progress(SessionState::Decoding).await.map_err(blockserve_runtime::status::from_store)?;
        }
        if let Some(t) = out.failed_at.take() {
            METRICS.migration_seconds.with_label_values(&[TIER]).observe(t.elapsed().as_secs_f64());
        }
        out.wire_bytes += wire_bytes;
        let offset = out.tokens.len();
        // A span (from here until the chunk is sent) for the first chunk and
        // every BLOCK_SPAN_EVERY-th one after, so a long session's trace stays
        // small. It is not entered: it would be held across awaits.
        let _block_span =
            out.chunks.is_multiple_of(BLOCK_SPAN_EVERY).then(|| tracing::info_span!("token_decoder.block", offset, tokens = new.len(), merged_blocks = blocks));
        out.chunks += 1;
        out.tokens.extend_from_slice(&new);
        let mut end = finish.map(End::Done);
        let mut delta = out.text.as_mut().map(|d| d.push(&new)).unwrap_or_default();
        if !p.stop_sequences.is_empty() {
            let before = out.full_text.len();
            out.full_text.push_str(&delta);
            if let Some(at) = find_stop(&out.full_text, &p.stop_sequences) {
                delta = out.full_text[before.min(at)..at].to_string();
                end = Some(End::StopSequence);
            }
        }
        if end.is_some() && !matches!(end, Some(End::StopSequence)) {
            if let Some(d) = out.text.as_mut() {
                delta.push_str(&d.finish());
            }
        }
        let now = Instant::now();
        out.first_at.get_or_insert(now);
        out.last_at = Some(now);
        let t = Instant::now();
        writes.append(offset, &new).await.map_err(blockserve_runtime::status::from_store)?;
        LAG.store_wait(t);
        let chunk = TokenChunk { offset: offset as u64, token_ids: new, text: delta };
        let t = Instant::now();
        relay.send(Ok(RunEvent { kind: Some(run_event::Kind::Tokens(chunk)) })).await;
        LAG.relay_wait(t);
        open.consumed(blocks);
        if let Some(end) = end {
            return Ok(end);
        }
    }
}

pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(3600);

/// One traced chunk in this many (see the block span in `decode_on`).
const BLOCK_SPAN_EVERY: u64 = 16;

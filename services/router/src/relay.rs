//! Keeping a session's stream going whatever dies under it.
//!
//! - **Relay** (`Generate`): the router streams the token decoder's events to
//!   its client. When that stream breaks without the session's own end (the
//!   token decoder died, its connection reset), the router migrates the
//!   session: it fences the old assignment off in the store (a new epoch),
//!   picks another token decoder and runs the session there from the prompt
//!   plus the output so far. The client's stream goes on with no token lost
//!   or repeated; greedy and seeded output is the same as without the fault.
//! - **Follow** (`Resume`, or `Generate` with an existing id): the router
//!   streams the session's output from the store. The session runs on its
//!   token decoder whether or not any router listens; if that token decoder
//!   dies with nobody relaying (its router died too), a follower notices that
//!   its lease is gone and the session stalls, and takes it over the same way.
//!
//! Either way a session moves at most `max_migrations` times; then it fails
//! with UNAVAILABLE and a message that says so.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockserve_proto::v1::*;
use blockserve_runtime::metrics::{ActiveSession, METRICS};
use blockserve_runtime::status;
use blockserve_store::{Assignment, Epoch, Outcome, Reassigned, SessionState, Tier};
use blockserve_text::IncrementalDecoder;
use tonic::Status;

use crate::relay_link::{Deliver, SessionStream};
use crate::sessions::{event, finished_from_record, EventTx, Router};

const TIER: &str = "router";

/// How long a migration may look for a token decoder to take the session.
const MOVE_TIMEOUT: Duration = Duration::from_secs(30);

/// A follower takes a session over when its token decoder has been gone from
/// the registry and the session made no progress for this long (a lease
/// expires only after its ttl, and after a store restart live instances
/// register again within a third of it).
const ORPHANED_AFTER: Duration = Duration::from_secs(3);

/// A session being relayed from its token decoder to its client.
pub(crate) struct Relay {
    pub id: String,
    pub events: SessionStream,
    pub tx: EventTx,
    pub token_decoder: String,
    pub token_decoder_id: String,
    pub arrived: Instant,
    /// The client's deadline (`grpc-timeout`), if it set one.
    pub deadline: Option<Instant>,
}

/// What a relayed session's client has been sent: kept by its task, and by
/// the relay reader, which hands the session's chunks to the client itself
/// while the client keeps up (`relay_link`).
pub(crate) struct Delivery {
    id: String,
    tx: EventTx,
    arrived: Instant,
    relayed: blockserve_runtime::metrics::IntCounter,
    progress: Mutex<Progress>,
}

#[derive(Default)]
struct Progress {
    /// Output the client has been sent (what a migration resumes after).
    known: Vec<u32>,
    last_chunk: Option<Instant>,
    /// When the session lost its token decoder, until its next chunk.
    failed_at: Option<Instant>,
}

impl Delivery {
    fn new(r: &Relay) -> Self {
        let relayed = METRICS.generated_tokens.with_label_values(&[TIER]);
        Self { id: r.id.clone(), tx: r.tx.clone(), arrived: r.arrived, relayed, progress: Default::default() }
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a chunk that goes to the client now, as the load generator
    /// counts it: the first chunk's delay is the time to first token; a later
    /// chunk's gap is shared by its tokens (one ITL sample each).
    fn record(&self, c: &TokenChunk) {
        let (now, n) = (Instant::now(), c.token_ids.len());
        let mut p = self.progress();
        match p.last_chunk.replace(now) {
            None => METRICS.time_to_first_token.observe((now - self.arrived).as_secs_f64()),
            Some(prev) => {
                for _ in 0..n {
                    METRICS.inter_token_latency.observe((now - prev).as_secs_f64() / n as f64);
                }
            }
        }
        if let Some(t) = p.failed_at.take() {
            METRICS.migration_seconds.with_label_values(&[TIER]).observe(t.elapsed().as_secs_f64());
        }
        self.relayed.inc_by(n as u64);
        p.known.extend_from_slice(&c.token_ids);
    }

    fn known(&self) -> Vec<u32> {
        self.progress().known.clone()
    }

    fn set_known(&self, tokens: Vec<u32>) {
        self.progress().known = tokens;
    }

    /// The session lost its token decoder (timed until its next chunk).
    fn failed(&self) {
        self.progress().failed_at.get_or_insert_with(Instant::now);
    }
}

impl Deliver for Delivery {
    fn try_deliver(&self, chunk: TokenChunk) -> Result<(), TokenChunk> {
        match self.tx.try_reserve() {
            Ok(permit) => {
                self.record(&chunk);
                permit.send(event(&self.id, generate_response::Event::Tokens(chunk)));
                Ok(())
            }
            Err(tokio::sync::mpsc::error::TrySendError::Full(())) => Err(chunk),
            Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => Ok(()),
        }
    }
}

/// A session running on its new token decoder.
pub(crate) struct Moved {
    events: SessionStream,
    token_decoder: String,
    token_decoder_id: String,
    /// The output it resumes after.
    tokens: Vec<u32>,
}

pub(crate) enum NotMoved {
    /// The session is final; its end is in the store.
    Final,
    /// Someone else moved it first.
    Stale,
    /// It could not be moved (and is recorded as failed when it exists).
    Failed(Status),
}

impl Router {
    /// Relay a session to its client until it ends, migrating it when its
    /// token decoder fails. `_held` (its load count and stream slot) is
    /// released when the relay ends.
    pub(crate) async fn relay<H>(self: Arc<Self>, mut r: Relay, _held: H) {
        let _active = ActiveSession::new(TIER);
        let delivery = Arc::new(Delivery::new(&r));
        r.events.deliver_directly(delivery.clone());
        let (mut epoch, mut failed): (Epoch, Vec<String>) = (0, vec![]);
        let deadline = async move {
            match r.deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            let msg = tokio::select! {
                m = r.events.message() => m,
                _ = r.tx.closed() => {
                    // The client went away: the session stops on every tier.
                    r.events.cancel();
                    return;
                }
                _ = &mut deadline => {
                    // (Closed first: the reader could still hand the client chunks.)
                    r.events.close();
                    r.events.cancel();
                    let msg = "the call's deadline (grpc-timeout) passed; the session was cancelled";
                    let outcome = Outcome { state: SessionState::Cancelled, finish_reason: "cancelled".into(), error: Some(msg.into()) };
                    let _ = self.store.finish(&r.id, None, &outcome, self.session_ttl).await;
                    let _ = r.tx.send(Err(Status::deadline_exceeded(msg))).await;
                    return;
                }
            };
            let cause = match msg {
                // (Chunks the reader could not hand over while the client's buffer was full.)
                Ok(Some(RunEvent { kind: Some(run_event::Kind::Tokens(c)) })) => {
                    delivery.record(&c);
                    if r.tx.send(event(&r.id, generate_response::Event::Tokens(c))).await.is_err() {
                        r.events.cancel();
                        return;
                    }
                    continue;
                }
                Ok(Some(RunEvent { kind: Some(run_event::Kind::Finished(f)) })) => {
                    let _ = r.tx.send(event(&r.id, generate_response::Event::Finished(f))).await;
                    return;
                }
                Ok(Some(RunEvent { kind: None })) => continue,
                Err(st) if status::session_end_kind(&st) == Some("failed") => {
                    let _ = r.tx.send(Err(st)).await;
                    return;
                }
                Err(st) if status::session_end_kind(&st) == Some("moved") => {
                    return self.follow_from(r.id, delivery.known(), r.tx).await;
                }
                Ok(None) => "the stream ended without the session's end".to_string(),
                Err(st) => st.message().to_string(),
            };
            // Dropping the old stream removes its route: nothing reaches the
            // client from there any more, so `known` holds until the new one runs.
            drop(r.events);
            let known = delivery.known();
            tracing::warn!(session = %r.id, token_decoder = %r.token_decoder, error = %cause, tokens = known.len(), "lost the token decoder; migrating the session");
            failed.push(r.token_decoder_id.clone());
            delivery.failed();
            match self.migrate(&r.id, epoch, &mut failed, &known, "token_decoder_lost", &cause).await {
                Ok((m, e)) => {
                    epoch = e;
                    // Output the old token decoder recorded but never relayed.
                    if m.tokens.len() > known.len() {
                        let text = self.tokenizer.as_deref().map(|t| IncrementalDecoder::with_prefix(t, &known).push(&m.tokens[known.len()..]));
                        let chunk = TokenChunk { offset: known.len() as u64, token_ids: m.tokens[known.len()..].to_vec(), text: text.unwrap_or_default() };
                        if r.tx.send(event(&r.id, generate_response::Event::Tokens(chunk))).await.is_err() {
                            m.events.cancel();
                            return;
                        }
                        delivery.set_known(m.tokens);
                    }
                    (r.events, r.token_decoder, r.token_decoder_id) = (m.events, m.token_decoder, m.token_decoder_id);
                    r.events.deliver_directly(delivery.clone());
                }
                Err(NotMoved::Final) | Err(NotMoved::Stale) => return self.follow_from(r.id, known, r.tx).await,
                Err(NotMoved::Failed(st)) => {
                    let _ = r.tx.send(Err(st)).await;
                    return;
                }
            }
        }
    }

    /// Go on streaming from the store after the `known` output.
    async fn follow_from(self: Arc<Self>, id: String, known: Vec<u32>, tx: EventTx) {
        let offset = known.len();
        match self.stream_slot() {
            Ok(slot) => self.follow(id, offset, tx, slot).await,
            Err(st) => drop(tx.send(Err(st)).await),
        }
    }

    /// Move session `id`, now at `epoch`, to a token decoder whose instance id
    /// is not in `failed` (which collects those that fail to take it). `known` is
    /// the output its client was sent. Returns the running session and its
    /// new epoch.
    pub(crate) async fn migrate(
        &self,
        id: &str,
        mut epoch: Epoch,
        failed: &mut Vec<String>,
        known: &[u32],
        cause: &'static str,
        why: &str,
    ) -> Result<(Moved, Epoch), NotMoved> {
        let start = Instant::now();
        let mut last = why.to_string();
        loop {
            if start.elapsed() > MOVE_TIMEOUT {
                let st = Status::unavailable(format!(
                    "session {id} lost its token decoder ({why}) and none took it over within {}s: {last}",
                    MOVE_TIMEOUT.as_secs()
                ));
                let outcome = Outcome { state: SessionState::Failed, finish_reason: "error".into(), error: Some(st.message().into()) };
                let _ = self.store.finish(id, None, &outcome, self.session_ttl).await;
                return Err(NotMoved::Failed(st));
            }
            let attempt = async {
                let rec = self.record(id).await?;
                // (Not counted while it runs: the relay holds the first choice's count.)
                let (td, _) = self.pick(Tier::TokenDecoder, failed).await?;
                // Its block decoder stays unless it is gone too.
                let bds = self.store.instances(Tier::BlockDecoder).await.map_err(status::from_store)?;
                let bd = match bds.iter().any(|i| i.address == rec.assignment.block_decoder) {
                    true => rec.assignment.block_decoder.clone(),
                    false => self.pick(Tier::BlockDecoder, &[]).await?.0.address,
                };
                let to = Assignment { token_decoder: td.address.clone(), token_decoder_id: td.id.clone(), block_decoder: bd };
                let moved = self.store.reassign(id, epoch, &to, known).await.map_err(status::from_store)?;
                Ok::<_, Status>((rec, to, moved))
            };
            let (rec, to, moved) = match attempt.await {
                Ok(x) => x,
                Err(st) if st.code() == tonic::Code::NotFound => return Err(NotMoved::Failed(st)),
                Err(st) => {
                    last = st.message().to_string();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let (e, migrations, tokens) = match moved {
                Reassigned::Moved { epoch, migrations, tokens } => (epoch, migrations, tokens),
                Reassigned::Final => return Err(NotMoved::Final),
                Reassigned::Stale => return Err(NotMoved::Stale),
                Reassigned::Missing => return Err(NotMoved::Failed(Status::not_found(format!("session {id:?} not found (unknown or expired)")))),
            };
            epoch = e;
            if migrations > self.max_migrations {
                METRICS.migrations.with_label_values(&[TIER, "limit"]).inc();
                let st = Status::unavailable(format!(
                    "session {id} lost its token decoder ({why}); it reached its limit of {} migrations (--max-migrations)",
                    self.max_migrations
                ));
                let outcome = Outcome { state: SessionState::Failed, finish_reason: "error".into(), error: Some(st.message().into()) };
                let _ = self.store.finish(id, Some(epoch), &outcome, self.session_ttl).await;
                return Err(NotMoved::Failed(st));
            }
            METRICS.migrations.with_label_values(&[TIER, cause]).inc();
            let run = RunRequest {
                session_id: id.to_string(),
                prompt_ids: rec.spec.prompt_ids.clone(),
                parameters: Some(rec.spec.parameters.clone()),
                block_decoder: to.block_decoder.clone(),
                eos_token_id: self.model.eos,
                generated_ids: tokens.clone(),
                epoch,
                migrations,
                max_migrations: self.max_migrations,
                traceparent: String::new(),
            };
            match self.run_on(&to.token_decoder, run).await {
                Ok(events) => {
                    tracing::info!(session = %id, to = %to.token_decoder, epoch, tokens = tokens.len(), "session migrated");
                    let moved = Moved { events, token_decoder: to.token_decoder, token_decoder_id: to.token_decoder_id, tokens };
                    return Ok((moved, epoch));
                }
                Err(st) => {
                    last = st.message().to_string();
                    failed.push(to.token_decoder_id);
                }
            }
        }
    }

    /// Stream a stored session from `offset` until it is final (it may be
    /// running on any token decoder, started by any router), riding out store
    /// outages and taking the session over when its token decoder is gone.
    /// `_slot` is this stream's slot, released when it ends.
    pub(crate) async fn follow(self: Arc<Self>, id: String, mut offset: usize, tx: EventTx, _slot: tokio::sync::OwnedSemaphorePermit) {
        let mut text = None;
        // (generated, when it last changed): to tell a stalled session.
        let mut progress = (usize::MAX, Instant::now());
        let mut store_down_since: Option<Instant> = None;
        loop {
            let polled = async {
                let rec = self.record(&id).await?;
                let new = self.store.tokens(&id, offset).await.map_err(status::from_store)?;
                Ok::<_, Status>((rec, new))
            };
            let (rec, new) = match polled.await {
                Ok(x) => {
                    store_down_since = None;
                    x
                }
                Err(st) if st.code() == tonic::Code::Unavailable && store_down_since.is_none_or(|t| t.elapsed() < STORE_OUTAGE_LIMIT) => {
                    store_down_since.get_or_insert_with(Instant::now);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                        _ = tx.closed() => return,
                    }
                }
                Err(st) => {
                    let _ = tx.send(Err(st)).await;
                    return;
                }
            };
            if !new.is_empty() {
                if text.is_none() && self.tokenizer.is_some() {
                    let prefix = self.store.tokens(&id, 0).await.unwrap_or_default();
                    text = self.tokenizer.as_deref().map(|t| IncrementalDecoder::with_prefix(t, &prefix[..offset.min(prefix.len())]));
                }
                let delta = text.as_mut().map(|d| d.push(&new)).unwrap_or_default();
                let chunk = TokenChunk { offset: offset as u64, token_ids: new.clone(), text: delta };
                if tx.send(event(&id, generate_response::Event::Tokens(chunk))).await.is_err() {
                    return;
                }
                offset += new.len();
            }
            if rec.state.is_final() && offset >= rec.generated {
                let _ = tx.send(event(&id, generate_response::Event::Finished(finished_from_record(&rec)))).await;
                return;
            }
            if rec.generated != progress.0 {
                progress = (rec.generated, Instant::now());
            } else if !rec.state.is_final() && progress.1.elapsed() > ORPHANED_AFTER {
                self.take_over_if_orphaned(&id, &rec).await;
                progress.1 = Instant::now();
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll) => {}
                _ = tx.closed() => return,
            }
        }
    }

    /// Move a stalled session whose token decoder left the registry.
    async fn take_over_if_orphaned(&self, id: &str, rec: &blockserve_store::SessionRecord) {
        let Ok(live) = self.store.instances(Tier::TokenDecoder).await else { return };
        if live.iter().any(|i| i.id == rec.assignment.token_decoder_id) {
            return;
        }
        self.take_over(id, rec, &format!("token decoder {} left the registry", rec.assignment.token_decoder)).await;
    }

    /// Move `rec`'s session to another token decoder, leaving its current one
    /// out. The new token decoder's stream is dropped at once: it runs the
    /// session on its own and followers read its output from the store.
    pub(crate) async fn take_over(&self, id: &str, rec: &blockserve_store::SessionRecord, why: &str) {
        tracing::warn!(session = %id, %why, "taking over an orphaned session");
        let known = self.store.tokens(id, 0).await.unwrap_or_default();
        let mut failed = vec![rec.assignment.token_decoder_id.clone()];
        if let Ok((moved, _)) = self.migrate(id, rec.epoch, &mut failed, &known, "orphaned", why).await {
            drop(moved);
        }
    }
}

/// How long a follower rides out an unreachable store before it gives up.
const STORE_OUTAGE_LIMIT: Duration = Duration::from_secs(120);

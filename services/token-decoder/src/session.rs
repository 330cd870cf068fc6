//! One session, start to end: open it on the engine (which sends the prompt to
//! a block decoder over the shared link and decodes each block as its context
//! arrives), then record and relay each block's tokens (store + stream) until
//! a stop condition, a cancel or an error. Dropping the engine guard closes
//! the session on both tiers however this task ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockserve_model::prompt::PaddedPrompt;
use blockserve_model::FinishReason as ModelFinish;
use blockserve_proto::v1::{run_event, FinishReason, Finished, RunEvent, RunRequest, Timings, TokenChunk, Usage};
use blockserve_runtime::params;
use blockserve_store::{Outcome, SessionState};
use blockserve_text::{find_stop, IncrementalDecoder};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::engine::{Event, OpenRequest, Spec};
use crate::Shared;

/// How a session ended.
enum End {
    Done(ModelFinish),
    StopSequence,
    Cancelled,
}

fn wire_reason(r: &End) -> (FinishReason, &'static str, SessionState) {
    match r {
        End::Done(ModelFinish::Eos) => (FinishReason::Eos, "eos", SessionState::Finished),
        End::Done(ModelFinish::Length) => (FinishReason::Length, "length", SessionState::Finished),
        End::Done(ModelFinish::StopToken) | End::StopSequence => (FinishReason::Stop, "stop", SessionState::Finished),
        End::Cancelled => (FinishReason::Cancelled, "cancelled", SessionState::Cancelled),
    }
}

/// Drive the session; events go to `tx`. Returns when the session is final.
pub async fn run(shared: Arc<Shared>, req: RunRequest, tx: mpsc::Sender<Result<RunEvent, Status>>, mut cancel: watch::Receiver<bool>) {
    let id = req.session_id.clone();
    let started = Instant::now();
    let mut gen = Generated { tokens: vec![], wire_bytes: 0, first_at: None, last_at: None };
    let result = tokio::select! {
        r = drive(&shared, &req, &tx, &mut gen) => r,
        _ = cancel.wait_for(|c| *c) => Ok(End::Cancelled),
        _ = tx.closed() => Ok(End::Cancelled),
    };
    let store = &shared.store;
    let ttl = shared.session_ttl;
    match result {
        Ok(end) => {
            let (reason, name, state) = wire_reason(&end);
            if let Err(e) = store.finish(&id, &Outcome { state, finish_reason: name.into(), error: None }, ttl).await {
                tracing::warn!(session = %id, error = %e, "could not record the end of a session");
            }
            let ms = |t: Option<Instant>| t.map_or(0.0, |t| (t - started).as_secs_f64() * 1e3);
            let n = gen.tokens.len();
            let mean_itl = match (gen.first_at, gen.last_at) {
                (Some(a), Some(b)) if n > 1 => (b - a).as_secs_f64() * 1e3 / (n - 1) as f64,
                _ => 0.0,
            };
            let finished = Finished {
                reason: reason as i32,
                usage: Some(Usage { prompt_tokens: req.prompt_ids.len() as u32, generated_tokens: n as u32, internal_wire_bytes: gen.wire_bytes }),
                timings: Some(Timings { time_to_first_token_ms: ms(gen.first_at), total_ms: ms(gen.last_at), mean_inter_token_ms: mean_itl }),
                error: String::new(),
            };
            let _ = tx.send(Ok(RunEvent { kind: Some(run_event::Kind::Finished(finished)) })).await;
        }
        Err(status) => {
            let outcome = Outcome { state: SessionState::Failed, finish_reason: "error".into(), error: Some(status.message().to_string()) };
            let _ = store.finish(&id, &outcome, ttl).await;
            tracing::warn!(session = %id, error = %status.message(), "session failed");
            let _ = tx.send(Err(status)).await;
        }
    }
}

struct Generated {
    tokens: Vec<u32>,
    /// Protobuf bytes exchanged with the block decoder.
    wire_bytes: u64,
    first_at: Option<Instant>,
    last_at: Option<Instant>,
}

async fn drive(shared: &Shared, req: &RunRequest, tx: &mpsc::Sender<Result<RunEvent, Status>>, gen: &mut Generated) -> Result<End, Status> {
    let m = &shared.model;
    let l = m.block_length();
    let p = params::resolve(&req.parameters.clone().unwrap_or_default(), req.eos_token_id, m.config.vocab_size)?;
    let padded = PaddedPrompt::new(&req.prompt_ids, l).map_err(|e| Status::invalid_argument(e.to_string()))?;

    let link = shared.links.get(&req.block_decoder, &shared.engine).await?;
    let (events_tx, mut events) = mpsc::unbounded_channel();
    gen.wire_bytes += 4 * padded.ids.len() as u64;
    let history = if p.sampling.uses_history() { req.prompt_ids.clone() } else { vec![] };
    let open = shared.engine.open(OpenRequest {
        key: shared.next_key.fetch_add(1, Ordering::Relaxed),
        session_id: req.session_id.clone(),
        link,
        prompt: padded.ids,
        max_new_blocks: p.stop.max_new_tokens.div_ceil(l) as u32,
        traceparent: blockserve_runtime::telemetry::headers(&tracing::Span::current()).remove("traceparent").unwrap_or_default(),
        spec: Spec { sampling: p.sampling.clone(), stop: p.stop.clone(), history },
        events: events_tx,
    })?;
    shared.store.set_progress(&req.session_id, SessionState::Prefilling).await.map_err(blockserve_runtime::status::from_store)?;

    let mut text = shared.tokenizer.as_ref().map(|t| IncrementalDecoder::new(t));
    let mut full_text = String::new();
    let mut chunks = 0u64;
    loop {
        let (mut new, mut finish, mut wire_bytes) = match events.recv().await {
            Some(Event::Block { tokens, finish, wire_bytes }) => (tokens, finish, wire_bytes),
            Some(Event::Failed(st)) => return Err(st),
            None => return Err(Status::internal("token decoder engine dropped the session")),
        };
        // Blocks that arrived meanwhile join this one: a task that fell behind
        // catches up with one record and one message instead of one per block.
        // (Not with stop sequences, which cut the output at a block's end.)
        let mut blocks = 1;
        while finish.is_none() && p.stop_sequences.is_empty() {
            match events.try_recv() {
                Ok(Event::Block { tokens, finish: f, wire_bytes: w }) => {
                    new.extend_from_slice(&tokens);
                    (finish, wire_bytes, blocks) = (f, wire_bytes + w, blocks + 1);
                }
                Ok(Event::Failed(st)) => return Err(st),
                Err(_) => break,
            }
        }
        if gen.first_at.is_none() {
            shared.store.set_progress(&req.session_id, SessionState::Decoding).await.map_err(blockserve_runtime::status::from_store)?;
        }
        gen.wire_bytes += wire_bytes;
        let offset = gen.tokens.len() as u64;
        // A span (from here until the chunk is sent) for the first chunk and
        // every BLOCK_SPAN_EVERY-th one after, so a long session's trace stays
        // small. It is not entered: it would be held across awaits.
        let _block_span =
            (chunks % BLOCK_SPAN_EVERY == 0).then(|| tracing::info_span!("token_decoder.block", offset, tokens = new.len(), merged_blocks = blocks));
        chunks += 1;
        gen.tokens.extend_from_slice(&new);
        let mut end = finish.map(End::Done);
        let mut delta = text.as_mut().map(|d| d.push(&new)).unwrap_or_default();
        if !p.stop_sequences.is_empty() {
            let before = full_text.len();
            full_text.push_str(&delta);
            if let Some(at) = find_stop(&full_text, &p.stop_sequences) {
                delta = full_text[before.min(at)..at].to_string();
                end = Some(End::StopSequence);
            }
        }
        if end.is_some() && !matches!(end, Some(End::StopSequence)) {
            if let Some(d) = text.as_mut() {
                delta.push_str(&d.finish());
            }
        }
        let now = Instant::now();
        gen.first_at.get_or_insert(now);
        gen.last_at = Some(now);
        shared.recorder.append(&req.session_id, &new).await.map_err(blockserve_runtime::status::from_store)?;
        let chunk = TokenChunk { offset, token_ids: new, text: delta };
        if tx.send(Ok(RunEvent { kind: Some(run_event::Kind::Tokens(chunk)) })).await.is_err() {
            return Ok(End::Cancelled);
        }
        open.consumed(blocks);
        if let Some(end) = end {
            return Ok(end);
        }
    }
}

pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(3600);

/// One traced chunk in this many (see the block span in `run`).
const BLOCK_SPAN_EVERY: u64 = 16;

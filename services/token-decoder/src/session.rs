//! One session, start to end: stream the prompt to a block decoder, decode each
//! block locally as its context arrives, publish the tokens (store + stream), send
//! the block back up, until a stop condition, a cancel or an error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockserve_model::prompt::PaddedPrompt;
use blockserve_model::FinishReason as ModelFinish;
use blockserve_proto::v1::block_decoder_client::BlockDecoderClient;
use blockserve_proto::v1::{
    block_up, run_event, Block, BlockUp, ContextDown, Embedding, FinishReason, Finished, OpenBlocks, RunEvent, RunRequest, Timings, TokenChunk, Usage,
};
use blockserve_runtime::{codec, params};
use blockserve_store::{Outcome, SessionState};
use blockserve_text::{find_stop, IncrementalDecoder};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::engine::BlockJob;
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

async fn next_context(down: &mut Streaming<ContextDown>, want: u32, shared: &Shared, wire: &mut u64) -> Result<Embedding, Status> {
    let msg = down.message().await?.ok_or_else(|| Status::unavailable("block decoder closed the session stream"))?;
    *wire += msg.encoded_len() as u64;
    if msg.block_index != want {
        return Err(Status::internal(format!("block decoder sent the context of block {}, expected {want}", msg.block_index)));
    }
    let e = msg.context.ok_or_else(|| Status::internal("context message without an embedding"))?;
    codec::check(&e, shared.model.config.block_decoder.hidden_size).map_err(|e| Status::internal(format!("from block decoder: {e}")))?;
    Ok(e)
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
    let prompt_blocks = padded.num_blocks(l) as u32;

    let channel = shared.channel(&req.block_decoder).await?;
    let (up, up_rx) = mpsc::channel::<BlockUp>(2);
    let open = BlockUp {
        kind: Some(block_up::Kind::Open(OpenBlocks {
            session_id: req.session_id.clone(),
            prompt_ids: padded.ids.clone(),
            max_new_blocks: p.stop.max_new_tokens.div_ceil(l) as u32,
        })),
    };
    gen.wire_bytes += open.encoded_len() as u64;
    up.send(open).await.map_err(|_| Status::internal("block stream closed"))?;
    shared.store.set_progress(&req.session_id, SessionState::Prefilling).await.map_err(blockserve_runtime::status::from_store)?;
    let mut down = BlockDecoderClient::new(channel).decode(ReceiverStream::new(up_rx)).await?.into_inner();
    let mut context = next_context(&mut down, prompt_blocks - 1, shared, &mut gen.wire_bytes).await?;
    shared.store.set_progress(&req.session_id, SessionState::Decoding).await.map_err(blockserve_runtime::status::from_store)?;

    // Prompt + output, kept only for the repetition penalty.
    let mut history = if p.sampling.uses_history() { req.prompt_ids.clone() } else { vec![] };
    let mut text = shared.tokenizer.as_ref().map(|t| IncrementalDecoder::new(t));
    let mut full_text = String::new();
    let _decoding = crate::engine::Decoding::new(&shared.engine);
    for block_index in prompt_blocks.. {
        let job = BlockJob {
            context,
            job: blockserve_engine::BlockJob { sampling: p.sampling.clone(), history: history.clone(), generated: gen.tokens.len() as u64 },
        };
        let block = shared.engine.decode_block(job).await.map_err(blockserve_runtime::status::from_model)?;
        let offset = gen.tokens.len() as u64;
        let mut end = None;
        let mut new = vec![];
        for &t in &block {
            gen.tokens.push(t);
            new.push(t);
            if let Some(r) = p.stop.check(&gen.tokens) {
                end = Some(End::Done(r));
                break;
            }
        }
        let mut delta = text.as_mut().map(|d| d.push(&new)).unwrap_or_default();
        if !p.stop_sequences.is_empty() {
            let before = full_text.len();
            full_text.push_str(&delta);
            if let Some(at) = find_stop(&full_text, &p.stop_sequences) {
                delta = full_text[before.min(at)..at].to_string();
                end = Some(End::StopSequence);
            }
        }
        if end.is_some() {
            if let Some(d) = text.as_mut() {
                if !matches!(end, Some(End::StopSequence)) {
                    delta.push_str(&d.finish());
                }
            }
        }
        let now = Instant::now();
        gen.first_at.get_or_insert(now);
        gen.last_at = Some(now);
        if end.is_none() {
            // The next context is the critical path: send the block up first, so
            // the block decoder's pass overlaps with recording and relaying it.
            let msg = BlockUp { kind: Some(block_up::Kind::Block(Block { index: block_index, token_ids: block })) };
            gen.wire_bytes += msg.encoded_len() as u64;
            up.send(msg).await.map_err(|_| Status::unavailable("block decoder stream closed"))?;
        }
        shared.store.append_tokens(&req.session_id, &new).await.map_err(blockserve_runtime::status::from_store)?;
        let chunk = TokenChunk { offset, token_ids: new.clone(), text: delta };
        if tx.send(Ok(RunEvent { kind: Some(run_event::Kind::Tokens(chunk)) })).await.is_err() {
            return Ok(End::Cancelled);
        }
        if let Some(end) = end {
            return Ok(end);
        }
        if p.sampling.uses_history() {
            history.extend_from_slice(&new);
        }
        context = next_context(&mut down, block_index, shared, &mut gen.wire_bytes).await?;
    }
    unreachable!("the block loop only ends by returning")
}

pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(3600);

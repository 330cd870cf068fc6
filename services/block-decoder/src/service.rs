//! The `BlockDecoder` gRPC service: one bidirectional stream per session.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blockserve_model::BlockTransformer;
use blockserve_proto::v1::block_decoder_server::BlockDecoder;
use blockserve_proto::v1::{block_up, BlockUp, ContextDown, ContextsRequest, ContextsResponse};
use blockserve_runtime::status;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::engine::Engine;

pub struct BlockDecoderService {
    pub engine: Engine,
    pub model: Arc<BlockTransformer>,
    pub max_sessions: u32,
    next_key: AtomicU64,
}

impl BlockDecoderService {
    pub fn new(engine: Engine, model: Arc<BlockTransformer>, max_sessions: u32) -> Self {
        Self { engine, model, max_sessions, next_key: AtomicU64::new(1) }
    }
}

/// Frees the session's cache however the stream ends.
struct CloseOnDrop(Engine, u64);
impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(self.1);
    }
}

fn check_ids(ids: &[u32], vocab: usize, field: &str) -> Result<(), Status> {
    match ids.iter().find(|&&i| i as usize >= vocab) {
        Some(bad) => Err(Status::invalid_argument(format!("{field}: token id {bad} is out of range (vocab size {vocab})"))),
        None => Ok(()),
    }
}

fn context_msg(index: u32, e: blockserve_proto::v1::Embedding) -> ContextDown {
    ContextDown { block_index: index, context: Some(e) }
}

/// Serve one session stream: `open`, then blocks, one context back for each.
async fn session(
    engine: Engine,
    model: Arc<BlockTransformer>,
    key: u64,
    mut inbound: Streaming<BlockUp>,
    tx: mpsc::Sender<Result<ContextDown, Status>>,
) -> Result<(), Status> {
    let _close = CloseOnDrop(engine.clone(), key);
    let l = model.block_length();
    let vocab = model.config.vocab_size;
    let max_blocks = model.block_decoder.max_blocks();
    let open = match inbound.message().await? {
        Some(BlockUp { kind: Some(block_up::Kind::Open(o)) }) => o,
        _ => return Err(Status::invalid_argument("the first message of a Decode stream must be `open`")),
    };
    if open.prompt_ids.is_empty() || open.prompt_ids.len() % l != 0 {
        return Err(Status::invalid_argument(format!("open.prompt_ids: {} ids is not a positive whole number of {l}-token blocks", open.prompt_ids.len())));
    }
    check_ids(&open.prompt_ids, vocab, "open.prompt_ids")?;
    let mut next = (open.prompt_ids.len() / l) as u32;
    if next as usize > max_blocks {
        return Err(Status::invalid_argument(format!("open.prompt_ids: {next} blocks exceed the limit of {max_blocks}")));
    }
    let ctx = engine.open(key, open.prompt_ids, open.max_new_blocks as usize).await.map_err(status::from_model)?;
    tx.send(Ok(context_msg(next - 1, ctx))).await.map_err(|_| Status::cancelled("receiver gone"))?;
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m?,
            _ = tx.closed() => return Ok(()),
        };
        let block = match msg {
            None => return Ok(()),
            Some(BlockUp { kind: Some(block_up::Kind::Block(b)) }) => b,
            Some(_) => return Err(Status::invalid_argument("only `block` messages may follow `open`")),
        };
        if block.index != next {
            return Err(Status::invalid_argument(format!("block.index is {}, expected {next}", block.index)));
        }
        if block.token_ids.len() != l {
            return Err(Status::invalid_argument(format!("block.token_ids has {} ids, a block holds {l}", block.token_ids.len())));
        }
        check_ids(&block.token_ids, vocab, "block.token_ids")?;
        if next as usize >= max_blocks {
            return Err(Status::out_of_range(format!("session reached the limit of {max_blocks} blocks")));
        }
        let ctx = engine.step(key, block.token_ids).await.map_err(status::from_model)?;
        if tx.send(Ok(context_msg(next, ctx))).await.is_err() {
            return Ok(());
        }
        next += 1;
    }
}

#[tonic::async_trait]
impl BlockDecoder for BlockDecoderService {
    type DecodeStream = ReceiverStream<Result<ContextDown, Status>>;

    async fn decode(&self, req: Request<Streaming<BlockUp>>) -> Result<Response<Self::DecodeStream>, Status> {
        let active = self.engine.active.load(Ordering::Relaxed) + self.engine.queued.load(Ordering::Relaxed);
        if active >= self.max_sessions {
            return Err(Status::resource_exhausted(format!("block decoder is at its limit of {} sessions", self.max_sessions)));
        }
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(4);
        let (engine, model) = (self.engine.clone(), self.model.clone());
        let inbound = req.into_inner();
        tokio::spawn(async move {
            if let Err(st) = session(engine, model, key, inbound, tx.clone()).await {
                let _ = tx.send(Err(st)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn contexts(&self, req: Request<ContextsRequest>) -> Result<Response<ContextsResponse>, Status> {
        let ids = req.into_inner().token_ids;
        let l = self.model.block_length();
        if ids.is_empty() || ids.len() % l != 0 {
            return Err(Status::invalid_argument(format!("token_ids: {} ids is not a positive whole number of {l}-token blocks", ids.len())));
        }
        check_ids(&ids, self.model.config.vocab_size, "token_ids")?;
        let contexts = self.engine.contexts(ids).await.map_err(status::from_model)?;
        Ok(Response::new(ContextsResponse { contexts }))
    }
}

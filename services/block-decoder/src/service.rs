//! The `BlockDecoder` gRPC service: one link stream per token decoder. The
//! link handler checks every open, block and close against what the link has
//! open and hands the checked work to the engine in one piece per message;
//! what fails a check goes straight back as that session's error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use blockserve_model::BlockTransformer;
use blockserve_proto::v1::block_decoder_server::BlockDecoder;
use blockserve_proto::v1::{ContextsRequest, ContextsResponse, LinkDown, LinkUp, OpenBlocks, SessionError};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::model_thread::{session_error, LinkId, ModelThread, Open, Up};

pub struct BlockDecoderService {
    pub engine: ModelThread,
    pub model: Arc<BlockTransformer>,
    pub max_sessions: u32,
    /// Sessions open on all links.
    open: Arc<AtomicU32>,
    next_link: AtomicU64,
}

impl BlockDecoderService {
    pub fn new(engine: ModelThread, model: Arc<BlockTransformer>, max_sessions: u32) -> Self {
        Self { engine, model, max_sessions, open: Arc::new(AtomicU32::new(0)), next_link: AtomicU64::new(1) }
    }

    /// The count of sessions open on all links (live).
    pub fn open_sessions(&self) -> Arc<AtomicU32> {
        self.open.clone()
    }
}

fn check_ids(ids: &[u32], vocab: usize, field: &str) -> Result<(), Status> {
    match ids.iter().find(|&&i| i as usize >= vocab) {
        Some(bad) => Err(Status::invalid_argument(format!("{field}: token id {bad} is out of range (vocab size {vocab})"))),
        None => Ok(()),
    }
}

/// What one link has open: the index each session's next block must carry.
struct LinkState {
    model: Arc<BlockTransformer>,
    next: HashMap<u64, u32>,
    open: Arc<AtomicU32>,
    max_sessions: u32,
}

impl LinkState {
    fn check_open(&self, o: &OpenBlocks) -> Result<u32, Status> {
        let l = self.model.block_length();
        if self.next.contains_key(&o.key) {
            return Err(Status::already_exists(format!("opens.key {} is already open on this link", o.key)));
        }
        if o.prompt_ids.is_empty() || !o.prompt_ids.len().is_multiple_of(l) {
            return Err(Status::invalid_argument(format!("opens.prompt_ids: {} ids is not a positive whole number of {l}-token blocks", o.prompt_ids.len())));
        }
        check_ids(&o.prompt_ids, self.model.config.vocab_size, "opens.prompt_ids")?;
        let blocks = o.prompt_ids.len() / l;
        let max_blocks = self.model.block_decoder().max_blocks();
        if blocks > max_blocks {
            return Err(Status::invalid_argument(format!("opens.prompt_ids: {blocks} blocks exceed the limit of {max_blocks}")));
        }
        if self.open.load(Ordering::Relaxed) >= self.max_sessions {
            return Err(Status::resource_exhausted(format!("block decoder is at its limit of {} sessions", self.max_sessions)));
        }
        Ok(blocks as u32)
    }

    fn check_block(&self, key: u64, index: u32, ids: &[u32]) -> Result<(), Status> {
        let Some(&next) = self.next.get(&key) else {
            return Err(Status::not_found(format!("blocks.keys: session key {key} is not open on this link")));
        };
        if index != next {
            return Err(Status::invalid_argument(format!("blocks.indices: block index is {index}, expected {next}")));
        }
        check_ids(ids, self.model.config.vocab_size, "blocks.token_ids")?;
        let max_blocks = self.model.block_decoder().max_blocks();
        if next as usize >= max_blocks {
            return Err(Status::out_of_range(format!("session reached the limit of {max_blocks} blocks")));
        }
        Ok(())
    }

    fn forget(&mut self, key: u64) -> bool {
        let had = self.next.remove(&key).is_some();
        if had {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
        had
    }

    /// Check one message: the work to do, and the failures to report (whose
    /// sessions are closed as part of the work).
    fn check(&mut self, msg: LinkUp) -> (Up, Vec<SessionError>) {
        let l = self.model.block_length();
        let (mut up, mut errors) = (Up { held_back: msg.held_back as usize, at: Some(std::time::Instant::now()), ..Up::default() }, vec![]);
        for o in msg.opens {
            // The session's span on this tier: a child of the token decoder's.
            let span = tracing::info_span!("block_decoder.open", session_id = %o.session_id, key = o.key);
            let parent: std::collections::HashMap<String, String> = [("traceparent".to_string(), o.traceparent.clone())].into();
            blockserve_runtime::telemetry::set_parent(&span, &parent);
            let _entered = span.enter();
            match self.check_open(&o) {
                Ok(blocks) => {
                    self.next.insert(o.key, blocks);
                    self.open.fetch_add(1, Ordering::Relaxed);
                    up.opens.push(Open { key: o.key, ids: o.prompt_ids, max_new_blocks: o.max_new_blocks as usize });
                }
                Err(st) => {
                    // A second open of a key leaves its session's state in doubt:
                    // that session ends too (the error names its key).
                    if st.code() == tonic::Code::AlreadyExists && self.forget(o.key) {
                        up.closes.push(o.key);
                    }
                    errors.push(session_error(o.key, &st));
                }
            }
        }
        let b = msg.blocks.unwrap_or_default();
        let shape_ok = b.indices.len() == b.keys.len() && b.token_ids.len() == b.keys.len() * l;
        for (i, &key) in b.keys.iter().enumerate() {
            let checked = if shape_ok {
                self.check_block(key, b.indices[i], &b.token_ids[i * l..(i + 1) * l])
            } else {
                Err(Status::invalid_argument(format!(
                    "blocks: {} keys need as many indices and {} token_ids ({l} per block); got {} and {}",
                    b.keys.len(),
                    b.keys.len() * l,
                    b.indices.len(),
                    b.token_ids.len()
                )))
            };
            match checked {
                Ok(()) => {
                    *self.next.get_mut(&key).expect("checked") += 1;
                    up.blocks.push((key, b.token_ids[i * l..(i + 1) * l].to_vec()));
                }
                Err(st) => {
                    if self.forget(key) {
                        up.closes.push(key);
                    }
                    errors.push(session_error(key, &st));
                }
            }
        }
        for key in msg.closes {
            if self.forget(key) {
                up.closes.push(key);
            }
        }
        (up, errors)
    }
}

/// Serve one link until the token decoder closes it; then free what it left open.
async fn serve_link(engine: ModelThread, mut state: LinkState, link: LinkId, mut inbound: Streaming<LinkUp>, down: mpsc::UnboundedSender<LinkDown>) {
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            _ = down.closed() => break,
        };
        let msg = match msg {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(st) => {
                tracing::debug!(link, error = %st, "link stream ended");
                break;
            }
        };
        let (up, errors) = state.check(msg);
        if !errors.is_empty() {
            let _ = down.send(LinkDown { errors, ..Default::default() });
        }
        if engine.up(link, up).is_err() {
            break;
        }
    }
    state.open.fetch_sub(state.next.len() as u32, Ordering::Relaxed);
    engine.detach(link);
}

type LinkStream = tokio_stream::adapters::Map<UnboundedReceiverStream<LinkDown>, fn(LinkDown) -> Result<LinkDown, Status>>;

#[tonic::async_trait]
impl BlockDecoder for BlockDecoderService {
    type LinkStream = LinkStream;

    async fn link(&self, req: Request<Streaming<LinkUp>>) -> Result<Response<Self::LinkStream>, Status> {
        blockserve_runtime::metrics::rpc("block_decoder", "Link", blockserve_runtime::telemetry::from_metadata(req.metadata()), async move {
            let link = self.next_link.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::unbounded_channel();
            self.engine.attach(link, tx.clone()).map_err(blockserve_worker::status::from_engine)?;
            let state = LinkState { model: self.model.clone(), next: HashMap::new(), open: self.open.clone(), max_sessions: self.max_sessions };
            tokio::spawn(serve_link(self.engine.clone(), state, link, req.into_inner(), tx));
            let ok: fn(LinkDown) -> Result<LinkDown, Status> = Ok;
            Ok(Response::new(UnboundedReceiverStream::new(rx).map(ok)))
        })
        .await
    }

    async fn contexts(&self, req: Request<ContextsRequest>) -> Result<Response<ContextsResponse>, Status> {
        blockserve_runtime::metrics::rpc("block_decoder", "Contexts", blockserve_runtime::telemetry::from_metadata(req.metadata()), async move {
            let ids = req.into_inner().token_ids;
            let l = self.model.block_length();
            if ids.is_empty() || !ids.len().is_multiple_of(l) {
                return Err(Status::invalid_argument(format!("token_ids: {} ids is not a positive whole number of {l}-token blocks", ids.len())));
            }
            check_ids(&ids, self.model.config.vocab_size, "token_ids")?;
            let contexts = self.engine.contexts(ids).await.map_err(blockserve_worker::status::from_engine)?;
            Ok(Response::new(ContextsResponse { contexts: Some(contexts) }))
        })
        .await
    }
}

//! The `TokenDecoder` gRPC service.

use std::sync::Arc;

use blockserve_model::prompt::PaddedPrompt;
use blockserve_proto::v1::block_decoder_client::BlockDecoderClient;
use blockserve_proto::v1::token_decoder_server::TokenDecoder;
use blockserve_proto::v1::{
    CancelRequest, CancelResponse, ContextsRequest, RelayDown, RelayUp, RunEvent, RunRequest, ScoreIdsRequest, ScoreResponse, SessionState,
};
use blockserve_worker::{status, wire};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{session, Shared};

pub struct TokenDecoderService {
    pub shared: Arc<Shared>,
}

/// Removes a session from the running set however its task ends.
struct Running(Arc<Shared>, String);
impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}

/// Admit a run: room for it, and not already running here. Returns the
/// switch that cancels it.
pub(crate) fn admit(shared: &Shared, req: &RunRequest) -> Result<watch::Receiver<bool>, Status> {
    if *shared.stopping.borrow() {
        return Err(Status::unavailable("token decoder is shutting down"));
    }
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let mut running = shared.running.lock().unwrap_or_else(|p| p.into_inner());
    if running.len() as u32 >= shared.max_sessions {
        return Err(Status::resource_exhausted(format!("token decoder is at its limit of {} sessions", shared.max_sessions)));
    }
    if running.contains_key(&req.session_id) {
        return Err(Status::already_exists(format!("session {} is already running here", req.session_id)));
    }
    running.insert(req.session_id.clone(), cancel_tx);
    Ok(cancel_rx)
}

/// Run an admitted session as a task of its own, in `span`.
pub(crate) fn spawn_session(shared: Arc<Shared>, req: RunRequest, events: session::Events, cancel: watch::Receiver<bool>, span: tracing::Span) {
    tokio::spawn(async move {
        let _running = Running(shared.clone(), req.session_id.clone());
        let _active = blockserve_runtime::metrics::ActiveSession::new(crate::model_thread::TIER);
        session::run(shared, req, events, cancel).instrument(span).await;
    });
}

/// Stop a running session (false when it does not run here).
pub(crate) fn cancel(shared: &Shared, id: &str) -> bool {
    shared.running.lock().unwrap_or_else(|p| p.into_inner()).get(id).map(|c| c.send(true)).is_some()
}

#[tonic::async_trait]
impl TokenDecoder for TokenDecoderService {
    type RunStream = ReceiverStream<Result<RunEvent, Status>>;
    type RelayStream = ReceiverStream<Result<RelayDown, Status>>;

    async fn relay(&self, req: Request<Streaming<RelayUp>>) -> Result<Response<Self::RelayStream>, Status> {
        blockserve_runtime::metrics::rpc(crate::model_thread::TIER, "Relay", blockserve_runtime::telemetry::from_metadata(req.metadata()), async move {
            Ok(Response::new(crate::relay::serve(self.shared.clone(), req.into_inner())))
        })
        .await
    }

    async fn run(&self, req: Request<RunRequest>) -> Result<Response<Self::RunStream>, Status> {
        blockserve_runtime::metrics::rpc(crate::model_thread::TIER, "Run", blockserve_runtime::telemetry::from_metadata(req.metadata()), async move {
            // The RPC's span lasts as long as the session (the session task
            // holds it), as a child of the router's (from `traceparent`).
            let span = tracing::Span::current();
            let req = req.into_inner();
            let cancel = admit(&self.shared, &req)?;
            let (tx, rx) = mpsc::channel(16);
            spawn_session(self.shared.clone(), req, session::Events::Stream(tx), cancel, span);
            Ok(Response::new(ReceiverStream::new(rx)))
        })
        .await
    }

    async fn cancel(&self, req: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        blockserve_runtime::metrics::rpc(crate::model_thread::TIER, "Cancel", blockserve_runtime::telemetry::from_metadata(req.metadata()), async move {
            let id = req.into_inner().session_id;
            let found = cancel(&self.shared, &id);
            let state = if found { SessionState::Cancelled } else { SessionState::Unspecified };
            Ok(Response::new(CancelResponse { state: state as i32 }))
        })
        .await
    }

    async fn score(&self, req: Request<ScoreIdsRequest>) -> Result<Response<ScoreResponse>, Status> {
        blockserve_runtime::metrics::rpc(crate::model_thread::TIER, "Score", blockserve_runtime::telemetry::from_metadata(req.metadata()), async move {
            let req = req.into_inner();
            let m = &self.shared.model;
            let l = m.block_length();
            let padded = PaddedPrompt::new(&req.token_ids, l).map_err(status::from_model)?;
            let n = padded.num_blocks(l);
            let first_scored = (l - padded.pad) as u32;
            if n < 2 {
                let msg = format!("token_ids: scoring needs more than one block ({} tokens), got {}", l, req.token_ids.len());
                return Err(Status::invalid_argument(msg));
            }
            let channel = self.shared.channel(&req.block_decoder).await?;
            let mut contexts_req = Request::new(ContextsRequest { token_ids: padded.ids.clone() });
            blockserve_runtime::telemetry::to_metadata(&tracing::Span::current(), contexts_req.metadata_mut());
            let ctx = BlockDecoderClient::new(channel).contexts(contexts_req).await?.into_inner();
            let d = m.config.block_decoder.hidden_size;
            let e = ctx.contexts.ok_or_else(|| Status::internal("block decoder sent no contexts"))?;
            if e.rows as usize != n {
                return Err(Status::internal(format!("block decoder sent {} contexts for {n} blocks", e.rows)));
            }
            let all = wire::decode(&e, d, self.shared.dtype, &self.shared.device).map_err(|e| Status::internal(format!("from block decoder: {e}")))?;
            let contexts = all.narrow(0, 0, n - 1).map_err(|e| Status::internal(e.to_string()))?;
            let logprobs = self.shared.engine.score(contexts, padded.ids[l..].to_vec()).await.map_err(status::from_engine)?;
            let mean = logprobs.iter().map(|&x| x as f64).sum::<f64>() / logprobs.len() as f64;
            Ok(Response::new(ScoreResponse { token_ids: req.token_ids, logprobs, first_scored, perplexity: (-mean).exp() }))
        })
        .await
    }
}

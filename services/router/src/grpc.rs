//! The public `Generation` service: tonic's face of the session core. Each
//! method reads its request, calls the core and shapes the answer.

use std::sync::Arc;
use std::time::Duration;

use blockserve_proto::v1::generation_server::Generation;
use blockserve_proto::v1::token_decoder_client::TokenDecoderClient;
use blockserve_proto::v1::*;
use blockserve_runtime::metrics;
use blockserve_runtime::status;
use blockserve_store::Outcome;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::sessions::{reason_from_name, wire_state, Router};
use crate::validate;

/// The `tier` label of this service's metrics.
const TIER: &str = "router";

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
            let (session_id, rx) = self.0.start(req.into_inner(), deadline).await?;
            let (token_ids, text, finished) = crate::sessions::collect(rx).await?;
            Ok(Response::new(GenerateUnaryResponse { session_id, token_ids, text, finished }))
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
                reused_prompt_blocks: rec.reused_prompt_blocks,
            }))
        })
        .await
    }

    async fn score(&self, req: Request<ScoreRequest>) -> Result<Response<ScoreResponse>, Status> {
        metrics::rpc(TIER, "Score", blockserve_runtime::telemetry::from_metadata(req.metadata()), async move {
            let r = &self.0;
            let ids = r.prompt_ids(validate::score_input(&req.into_inner().input)?).await?;
            Ok(Response::new(r.score(ids).await?))
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

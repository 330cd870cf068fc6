//! A new session: validate, route, record, start it on a token decoder and
//! hand it to the relay; or attach to the session a client-chosen id names.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockserve_proto::v1::*;
use blockserve_runtime::{params, status};
use blockserve_store::{now_ms, Assignment, Outcome, SessionRecord, SessionSpec, Tier};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::Instrument;

use crate::sessions::{event, EventTx, Router};
use crate::{relay, validate};

impl Router {
    /// Validate, route, record and start a session; events arrive on the
    /// receiver. It runs as a task of its own: a client that goes away in the
    /// middle (the RPC future is dropped) must not leave a session recorded
    /// and never run, or running with nobody to stop it; the task finishes,
    /// then sees the receiver gone and cancels the session.
    pub(crate) async fn start(
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
        let parameters = params::validate(&req.parameters.clone().unwrap_or_default(), m.vocab, self.prompt_layout)?;
        let max_new = parameters.max_new_tokens.unwrap_or_default() as usize;
        validate::lengths(prompt.len(), max_new, self.max_new_tokens, m.max_total_tokens)?;
        let spec = SessionSpec { id: req.session_id.clone(), prompt_ids: prompt.clone(), parameters: parameters.clone(), created_at_ms: now_ms() };
        if !req.session_id.is_empty() {
            if let Some(rec) = self.store.session(&req.session_id).await.map_err(status::from_store)? {
                return self.attach(rec, &spec, tx, rx, slot).await;
            }
        }
        let (td, td_routed) = self.pick(Tier::TokenDecoder, &[]).await?;
        let (bd, bd_routed) = self.pick_block_decoder(&prompt, params::resolve(&parameters, m.eos).layout).await?;
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
        let events = match self.run_on(&td.address, run).await {
            Ok(r) => r,
            Err(e) => {
                let outcome = Outcome { state: blockserve_store::SessionState::Failed, finish_reason: "error".into(), error: Some(e.message().into()) };
                let _ = self.store.finish(&id, None, &outcome, self.session_ttl).await;
                return Err(e);
            }
        };
        let started = Started { prompt_tokens: prompt.len() as u32, attached: false };
        let _ = tx.send(event(&id, generate_response::Event::Started(started))).await;
        let relay =
            relay::Relay { id: id.clone(), events, tx, token_decoder: td.address, token_decoder_id: td.id, arrived, deadline: deadline.map(|d| arrived + d) };
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

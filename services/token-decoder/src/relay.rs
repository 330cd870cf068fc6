//! Relay streams: one stream per router carries the runs and cancels of all
//! its sessions up and their events down. Sessions put their events in the
//! stream's outbox; one writer takes everything waiting there into one message,
//! so the blocks of one engine round reach a router in one message (one
//! encode, one HTTP/2 frame) instead of one per session.
//!
//! A router that goes away ends the stream; its sessions run on, recording
//! their output, as with `Run` (clients resume them through any router).

use std::sync::Arc;

use blockserve_proto::v1::{run_event, session_event, Accepted, RelayDown, RelayUp, RunEvent, SessionEnd, SessionEvent};
use blockserve_runtime::status::session_end_kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::service::{admit, cancel, spawn_session};
use crate::session::Events;
use crate::Shared;

/// Events waiting for a relay stream's writer. A full outbox (a router that
/// reads slowly) makes the sessions wait, and so holds their next blocks back.
const OUTBOX: usize = 1 << 16;

/// A relay stream's outbox, shared by its sessions.
#[derive(Clone)]
pub struct Outbox(mpsc::Sender<SessionEvent>);

impl Outbox {
    /// False once the stream is gone.
    pub async fn send(&self, e: SessionEvent) -> bool {
        self.0.send(e).await.is_ok()
    }
}

/// A session's event as a relay stream carries it. An error status becomes
/// the session's end, with the mark that says what it means (`failed`,
/// `moved`; none for any other failure, which the router treats as lost).
pub fn session_event(session_id: &str, e: Result<RunEvent, Status>) -> SessionEvent {
    let kind = match e {
        Ok(RunEvent { kind: Some(run_event::Kind::Tokens(c)) }) => session_event::Kind::Tokens(c),
        Ok(RunEvent { kind: Some(run_event::Kind::Finished(f)) }) => session_event::Kind::Finished(f),
        Ok(RunEvent { kind: None }) => session_event::Kind::Tokens(Default::default()),
        Err(st) => session_event::Kind::End(SessionEnd {
            code: st.code() as i32,
            message: st.message().to_string(),
            kind: session_end_kind(&st).unwrap_or_default().to_string(),
        }),
    };
    SessionEvent { session_id: session_id.to_string(), kind: Some(kind) }
}

/// Serve one relay stream: admit the runs that come up (each answered by
/// `accepted` or a `refused` end), pass on cancels, and send the sessions'
/// events down in batches.
pub fn serve(shared: Arc<Shared>, mut inbound: Streaming<RelayUp>) -> ReceiverStream<Result<RelayDown, Status>> {
    let (down_tx, down_rx) = mpsc::channel(4);
    let (outbox_tx, mut outbox) = mpsc::channel::<SessionEvent>(OUTBOX);
    tokio::spawn(async move {
        while let Some(first) = outbox.recv().await {
            let mut events = vec![first];
            while let Ok(e) = outbox.try_recv() {
                events.push(e);
            }
            let t = std::time::Instant::now();
            let sent = down_tx.send(Ok(RelayDown { events })).await;
            crate::lag::LAG.router_wait(t);
            if sent.is_err() {
                // The router is gone: sessions see a closed outbox and run on.
                return;
            }
        }
    });
    tokio::spawn(async move {
        let outbox = Outbox(outbox_tx);
        while let Ok(Some(up)) = inbound.message().await {
            for run in up.runs {
                let id = run.session_id.clone();
                match admit(&shared, &run) {
                    Ok(cancelled) => {
                        let accepted = SessionEvent { session_id: id.clone(), kind: Some(session_event::Kind::Accepted(Accepted {})) };
                        if !outbox.send(accepted).await {
                            // Gone before the session started: it is not run
                            // here (the router that sent it moves it).
                            shared.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                            continue;
                        }
                        // The session's span, as a `Run` call's: a child of the router's.
                        let span = tracing::info_span!(parent: None, "session", otel.name = "token_decoder.Run", otel.kind = "server", session_id = %id);
                        blockserve_runtime::telemetry::set_parent(&span, &[("traceparent".to_string(), run.traceparent.clone())].into());
                        spawn_session(shared.clone(), run, Events::Relay { session_id: id, to: outbox.clone() }, cancelled, span);
                    }
                    Err(st) => {
                        let refused = SessionEnd { code: st.code() as i32, message: st.message().to_string(), kind: "refused".into() };
                        outbox.send(SessionEvent { session_id: id, kind: Some(session_event::Kind::End(refused)) }).await;
                    }
                }
            }
            for id in up.cancels {
                cancel(&shared, &id);
            }
        }
    });
    ReceiverStream::new(down_rx)
}

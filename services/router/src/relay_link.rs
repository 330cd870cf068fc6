//! The router's side of relay streams: one `TokenDecoder.Relay` stream per
//! token decoder carries the runs and cancels of every session this router
//! relays from it, and brings their events back, a round's worth per message.
//! A reader task hands each event to its session's [`SessionStream`], which
//! reads like the per-session `Run` stream it replaces. When a relay stream
//! breaks, each of its sessions sees the failure (and migrates, as when a
//! `Run` stream broke); the next run opens a new stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use blockserve_proto::v1::token_decoder_client::TokenDecoderClient;
use blockserve_proto::v1::{run_event, session_event, RelayUp, RunEvent, RunRequest};
use blockserve_runtime::channels::Channels;
use blockserve_runtime::status;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;

/// What the reader hands a session.
enum Down {
    Event(session_event::Kind),
    Lost(Status),
}

type Routes = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Down>>>>;

/// One relay stream to a token decoder.
struct Link {
    up: mpsc::UnboundedSender<RelayUp>,
    routes: Routes,
    /// False once the stream ended (set before its sessions are told).
    alive: Arc<AtomicBool>,
}

/// This router's relay streams, one per token decoder address.
#[derive(Default)]
pub struct RelayLinks {
    links: tokio::sync::Mutex<HashMap<String, Arc<Link>>>,
}

/// One session's events from its token decoder.
pub struct SessionStream {
    id: String,
    link: Arc<Link>,
    rx: mpsc::UnboundedReceiver<Down>,
}

impl SessionStream {
    /// The session's next event, as a `Run` stream gives it: its own end
    /// (`failed`, `moved`) as an error status with that mark, a lost relay
    /// stream as an error without one.
    pub async fn message(&mut self) -> Result<Option<RunEvent>, Status> {
        match self.rx.recv().await {
            Some(Down::Event(session_event::Kind::Tokens(c))) => Ok(Some(RunEvent { kind: Some(run_event::Kind::Tokens(c)) })),
            Some(Down::Event(session_event::Kind::Finished(f))) => Ok(Some(RunEvent { kind: Some(run_event::Kind::Finished(f)) })),
            Some(Down::Event(session_event::Kind::Accepted(_))) => Ok(Some(RunEvent { kind: None })),
            Some(Down::Event(session_event::Kind::End(e))) => Err(end_status(e)),
            Some(Down::Lost(st)) => Err(st),
            None => Ok(None),
        }
    }

    /// Stop the session on its token decoder (best effort).
    pub fn cancel(&self) {
        let _ = self.link.up.send(RelayUp { cancels: vec![self.id.clone()], ..Default::default() });
    }
}

impl Drop for SessionStream {
    fn drop(&mut self) {
        self.link.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// A session's end as the status a `Run` stream would have ended with.
fn end_status(e: blockserve_proto::v1::SessionEnd) -> Status {
    let st = Status::new(tonic::Code::from_i32(e.code), e.message);
    match e.kind.as_str() {
        "failed" => status::session_end(st, "failed"),
        "moved" => status::session_end(st, "moved"),
        _ => st,
    }
}

impl RelayLinks {
    /// Start `run` on the token decoder at `address`: its events follow once
    /// it is admitted; a refusal is the error.
    pub async fn run(&self, channels: &Channels, address: &str, run: RunRequest) -> Result<SessionStream, Status> {
        let link = self.link(channels, address).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        link.routes.lock().unwrap_or_else(|p| p.into_inner()).insert(run.session_id.clone(), tx);
        let mut stream = SessionStream { id: run.session_id.clone(), link: link.clone(), rx };
        // (Checked after the route is in: a stream that ends from now on tells it.)
        if !link.alive.load(Ordering::SeqCst) || link.up.send(RelayUp { runs: vec![run], ..Default::default() }).is_err() {
            self.forget(address, &link).await;
            return Err(Status::unavailable(format!("token decoder {address}: relay stream closed")));
        }
        match stream.rx.recv().await {
            Some(Down::Event(session_event::Kind::Accepted(_))) => Ok(stream),
            Some(Down::Event(session_event::Kind::End(e))) => Err(end_status(e)),
            Some(Down::Lost(st)) => Err(st),
            Some(Down::Event(_)) => Err(Status::internal(format!("token decoder {address} sent a session's events before accepting it"))),
            None => Err(Status::unavailable(format!("token decoder {address}: relay stream closed"))),
        }
    }

    /// The live relay stream to `address`, opened on first use.
    async fn link(&self, channels: &Channels, address: &str) -> Result<Arc<Link>, Status> {
        let mut links = self.links.lock().await;
        if let Some(l) = links.get(address).filter(|l| l.alive.load(Ordering::SeqCst)) {
            return Ok(l.clone());
        }
        let mut client = TokenDecoderClient::new(channels.get(address).await?).max_decoding_message_size(usize::MAX);
        let (up, up_rx) = mpsc::unbounded_channel();
        let mut down =
            client.relay(UnboundedReceiverStream::new(up_rx)).await.map_err(|e| status::from_peer(&format!("token decoder {address}"), e))?.into_inner();
        let routes: Routes = Default::default();
        let alive = Arc::new(AtomicBool::new(true));
        let link = Arc::new(Link { up, routes: routes.clone(), alive: alive.clone() });
        let address_owned = address.to_string();
        tokio::spawn(async move {
            let lost = loop {
                match down.message().await {
                    Ok(Some(msg)) => {
                        let routes = routes.lock().unwrap_or_else(|p| p.into_inner());
                        for e in msg.events {
                            if let (Some(to), Some(kind)) = (routes.get(&e.session_id), e.kind) {
                                let _ = to.send(Down::Event(kind));
                            }
                        }
                    }
                    Ok(None) => break Status::unavailable(format!("token decoder {address_owned} closed the relay stream")),
                    Err(st) => break Status::unavailable(format!("relay stream to token decoder {address_owned} lost: {}", st.message())),
                }
            };
            tracing::warn!(token_decoder = %address_owned, error = %lost.message(), "relay stream ended");
            alive.store(false, Ordering::SeqCst);
            for (_, to) in routes.lock().unwrap_or_else(|p| p.into_inner()).drain() {
                let _ = to.send(Down::Lost(lost.clone()));
            }
        });
        links.insert(address.to_string(), link.clone());
        Ok(link)
    }

    /// Drop a dead link so the next run opens a new one.
    async fn forget(&self, address: &str, dead: &Arc<Link>) {
        let mut links = self.links.lock().await;
        if links.get(address).is_some_and(|l| Arc::ptr_eq(l, dead)) {
            links.remove(address);
        }
    }
}

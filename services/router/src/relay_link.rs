//! The router's side of relay streams: one `TokenDecoder.Relay` stream per
//! token decoder carries the runs and cancels of every session this router
//! relays from it, and brings their events back, a round's worth per message.
//! A reader task hands each event to its session's [`SessionStream`], which
//! reads like the per-session `Run` stream it replaces. When a relay stream
//! breaks, each of its sessions sees the failure (and migrates, as when a
//! `Run` stream broke); the next run opens a new stream.
//!
//! Token chunks skip the session's task once it has asked for that
//! ([`SessionStream::deliver_directly`]): the reader passes them to the
//! session's [`Deliver`], which sends them on to the client when its buffer
//! has room. That task's wake-up per chunk was a quarter of the router's CPU
//! under load. A chunk whose client buffer is full, and every event after it
//! until the task has sent the queue on, goes through the task, in order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use blockserve_proto::v1::token_decoder_client::TokenDecoderClient;
use blockserve_proto::v1::{run_event, session_event, RelayUp, RunEvent, RunRequest, TokenChunk};
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

/// Hands a session's token chunks to its client without a task in between.
pub(crate) trait Deliver: Send + Sync {
    /// Send `chunk` on now if the client can take it; give it back if the
    /// client's buffer is full. (A client gone away drops it: the session's
    /// task sees that and cancels the session.)
    fn try_deliver(&self, chunk: TokenChunk) -> Result<(), TokenChunk>;
}

/// Where the reader puts one session's events.
struct Route {
    queue: mpsc::UnboundedSender<Down>,
    /// Events put in `queue` that the session's task has not finished with:
    /// while any is, chunks queue behind it (they must reach the client in order).
    queued: Arc<AtomicUsize>,
    direct: Option<Arc<dyn Deliver>>,
}

impl Route {
    fn put(&self, kind: session_event::Kind) {
        let kind = match (kind, &self.direct) {
            (session_event::Kind::Tokens(c), Some(d)) if self.queued.load(Ordering::Acquire) == 0 => match d.try_deliver(c) {
                Ok(()) => return,
                Err(c) => session_event::Kind::Tokens(c),
            },
            (kind, _) => kind,
        };
        self.queued.fetch_add(1, Ordering::AcqRel);
        let _ = self.queue.send(Down::Event(kind));
    }
}

type Routes = Arc<Mutex<HashMap<String, Route>>>;

/// One relay stream to a token decoder.
struct Link {
    up: mpsc::UnboundedSender<RelayUp>,
    routes: Routes,
    /// False once the stream ended (set before its sessions are told).
    alive: Arc<AtomicBool>,
}

impl Link {
    /// A route for session `id`'s events, read through the returned stream
    /// (whose drop removes the route).
    fn open_route(link: &Arc<Link>, id: &str) -> SessionStream {
        let (queue, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        link.routes.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), Route { queue, queued: queued.clone(), direct: None });
        SessionStream { id: id.to_string(), link: link.clone(), rx, queued, holding: false }
    }
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
    queued: Arc<AtomicUsize>,
    /// Whether the last event taken counts in `queued` (it is done with once
    /// the caller asks for the next one).
    holding: bool,
}

impl SessionStream {
    /// The session's next event, as a `Run` stream gives it: its own end
    /// (`failed`, `moved`) as an error status with that mark, a lost relay
    /// stream as an error without one.
    pub async fn message(&mut self) -> Result<Option<RunEvent>, Status> {
        if std::mem::take(&mut self.holding) {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        let down = self.rx.recv().await;
        self.holding = matches!(down, Some(Down::Event(_)));
        match down {
            Some(Down::Event(session_event::Kind::Tokens(c))) => Ok(Some(RunEvent { kind: Some(run_event::Kind::Tokens(c)) })),
            Some(Down::Event(session_event::Kind::Finished(f))) => Ok(Some(RunEvent { kind: Some(run_event::Kind::Finished(f)) })),
            Some(Down::Event(session_event::Kind::Accepted(_))) => Ok(Some(RunEvent { kind: None })),
            Some(Down::Event(session_event::Kind::End(e))) => Err(end_status(e)),
            Some(Down::Lost(st)) => Err(st),
            None => Ok(None),
        }
    }

    /// From now on the reader hands token chunks to `to` itself while the
    /// client keeps up; they no longer come out of [`Self::message`].
    pub(crate) fn deliver_directly(&self, to: Arc<dyn Deliver>) {
        if let Some(route) = self.link.routes.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&self.id) {
            route.direct = Some(to);
        }
    }

    /// Take no more events for this session: the reader drops them from now
    /// on, so nothing reaches the client after the event its task sends last.
    pub(crate) fn close(&self) {
        self.link.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }

    /// Stop the session on its token decoder (best effort).
    pub fn cancel(&self) {
        let _ = self.link.up.send(RelayUp { cancels: vec![self.id.clone()], ..Default::default() });
    }
}

impl Drop for SessionStream {
    fn drop(&mut self) {
        self.close();
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
        let mut stream = Link::open_route(&link, &run.session_id);
        // (Checked after the route is in: a stream that ends from now on tells it.)
        if !link.alive.load(Ordering::SeqCst) || link.up.send(RelayUp { runs: vec![run], ..Default::default() }).is_err() {
            self.forget(address, &link).await;
            return Err(Status::unavailable(format!("token decoder {address}: relay stream closed")));
        }
        let first = stream.rx.recv().await;
        if matches!(first, Some(Down::Event(_))) {
            stream.queued.fetch_sub(1, Ordering::AcqRel);
        }
        match first {
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
                                to.put(kind);
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
                let _ = to.queue.send(Down::Lost(lost.clone()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::error::TrySendError;

    /// A client with room for two chunks, as the router's event channel is to
    /// a client that stopped reading. It records each chunk's offset.
    struct Client(mpsc::Sender<u64>);

    impl Deliver for Client {
        fn try_deliver(&self, c: TokenChunk) -> Result<(), TokenChunk> {
            match self.0.try_reserve() {
                Ok(permit) => {
                    permit.send(c.offset);
                    Ok(())
                }
                Err(TrySendError::Full(())) => Err(c),
                Err(TrySendError::Closed(())) => Ok(()),
            }
        }
    }

    fn chunk(offset: u64) -> session_event::Kind {
        session_event::Kind::Tokens(TokenChunk { offset, token_ids: vec![offset as u32], text: String::new() })
    }

    #[tokio::test]
    async fn chunks_reach_a_slow_client_in_order_and_go_direct_again_once_it_catches_up() {
        let link = Arc::new(Link { up: mpsc::unbounded_channel().0, routes: Default::default(), alive: Arc::new(AtomicBool::new(true)) });
        let mut stream = Link::open_route(&link, "s");
        let (tx, mut rx) = mpsc::channel(2);
        stream.deliver_directly(Arc::new(Client(tx.clone())));
        let put = |offset| link.routes.lock().unwrap()["s"].put(chunk(offset));
        let queued = || link.routes.lock().unwrap()["s"].queued.load(Ordering::Acquire);
        // 0 and 1 fill the client; 2..=9 wait in the session's queue.
        (0..10).for_each(put);
        assert_eq!(queued(), 8);
        assert_eq!((rx.recv().await, rx.recv().await), (Some(0), Some(1)));
        // The client has room again, but 10 must not pass 2..=9.
        put(10);
        assert_eq!(queued(), 9);
        // The session's task sends its queue on, as the relay does.
        let relay = tokio::spawn(async move {
            while let Ok(Some(RunEvent { kind: Some(run_event::Kind::Tokens(c)) })) = stream.message().await {
                tx.send(c.offset).await.unwrap();
            }
        });
        let mut got = vec![];
        for _ in 2..=10 {
            got.push(rx.recv().await.unwrap());
        }
        assert_eq!(got, (2..=10).collect::<Vec<u64>>());
        // Once the task is back for more, the queue is empty: chunks go direct.
        while queued() != 0 {
            tokio::task::yield_now().await;
        }
        put(11);
        assert_eq!(queued(), 0);
        assert_eq!(rx.recv().await, Some(11));
        relay.abort();
    }
}

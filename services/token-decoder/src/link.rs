//! This token decoder's links: one long-lived `BlockDecoder.Link` stream per
//! block decoder, on its own connection, shared by every session that uses
//! that block decoder. Whatever comes down goes to the links' [`Sink`] (the
//! engine's command channel) as is; when the stream ends, the sink hears so,
//! the engine fails the link's sessions, and the next session connects a new
//! link.
//!
//! The links' connections and tasks run on a runtime of their own: they are the
//! critical path between two passes, and on the main runtime each message would
//! queue behind the thousands of session tasks that one batch wakes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockserve_proto::v1::block_decoder_client::BlockDecoderClient;
use blockserve_proto::v1::{LinkDown, LinkUp};
use blockserve_runtime::tls::Dialer;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;

/// What comes down the links.
pub enum Downward {
    /// A message from link `link`, and when it arrived.
    Message { link: u64, msg: LinkDown, at: Instant },
    /// Link `link`'s stream ended: its sessions fail with `status`.
    Lost { link: u64, status: Status },
}

/// Where the links hand what comes down.
pub type Sink = Arc<dyn Fn(Downward) + Send + Sync>;

pub struct Link {
    pub id: u64,
    pub address: String,
    up: mpsc::UnboundedSender<LinkUp>,
    alive: AtomicBool,
}

impl Link {
    /// A link whose messages up go to `up`.
    pub fn new(id: u64, address: String, up: mpsc::UnboundedSender<LinkUp>) -> Self {
        Self { id, address, up, alive: AtomicBool::new(true) }
    }

    /// Queue a message up; false once the link is gone.
    pub fn send(&self, m: LinkUp) -> bool {
        self.up.send(m).is_ok()
    }
}

pub struct Links {
    map: tokio::sync::Mutex<HashMap<String, Arc<Link>>>,
    next: AtomicU64,
    io: tokio::runtime::Handle,
    dialer: Arc<Dialer>,
    sink: Sink,
}

impl Links {
    pub fn new(dialer: Arc<Dialer>, sink: Sink) -> Self {
        // A thread that runs the links' runtime for the life of the process
        // (a runtime cannot be dropped from async code, so it is never dropped).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("link-io".into())
            .spawn(move || {
                blockserve_runtime::thread::make_critical("link-io");
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("link runtime");
                let _ = tx.send(rt.handle().clone());
                rt.block_on(std::future::pending::<()>());
            })
            .expect("spawn link thread");
        Self { map: Default::default(), next: AtomicU64::new(0), io: rx.recv().expect("link runtime starts"), dialer, sink }
    }

    /// The live link to `address`, connecting it on first use.
    pub async fn get(&self, address: &str) -> Result<Arc<Link>, Status> {
        let mut map = self.map.lock().await;
        if let Some(l) = map.get(address).filter(|l| l.alive.load(Ordering::Relaxed)) {
            return Ok(l.clone());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let link = self
            .io
            .spawn(connect(id, address.to_string(), self.sink.clone(), self.dialer.clone()))
            .await
            .map_err(|e| Status::internal(format!("link task: {e}")))??;
        map.insert(address.to_string(), link.clone());
        Ok(link)
    }
}

/// Open a link and start the task that hands what comes down to `sink`.
async fn connect(id: u64, address: String, sink: Sink, dialer: Arc<Dialer>) -> Result<Arc<Link>, Status> {
    let channel = dialer
        .endpoint(&address)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(blockserve_runtime::LINK_STREAM_WINDOW)
        .initial_connection_window_size(blockserve_runtime::LINK_CONNECTION_WINDOW)
        .max_frame_size(blockserve_runtime::LINK_MAX_FRAME)
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("block decoder {address} unreachable: {}", blockserve_runtime::status::source_chain(&e))))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let mut down = BlockDecoderClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .link(UnboundedReceiverStream::new(rx))
        .await
        .map_err(|e| blockserve_runtime::status::from_peer(&format!("block decoder {address}"), e))?
        .into_inner();
    let link = Arc::new(Link::new(id, address, tx));
    let l = link.clone();
    tokio::spawn(async move {
        let end = loop {
            match down.message().await {
                Ok(Some(msg)) => sink(Downward::Message { link: l.id, msg, at: Instant::now() }),
                Ok(None) => break Status::unavailable(format!("block decoder {} closed the link", l.address)),
                Err(st) => break Status::unavailable(format!("link to block decoder {} lost: {}", l.address, st.message())),
            }
        };
        l.alive.store(false, Ordering::Relaxed);
        tracing::warn!(block_decoder = %l.address, error = %end.message(), "link ended");
        sink(Downward::Lost { link: l.id, status: end });
    });
    Ok(link)
}

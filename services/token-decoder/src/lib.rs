//! The token-decoder tier: runs sessions. It shares one link stream per block
//! decoder among its sessions and holds only the local R+L-1-position cache of
//! the blocks being decoded.

pub mod lag;
pub mod link;
pub mod model_thread;
pub mod recorder;
pub mod relay;
pub mod service;
pub mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use blockserve_model::{BlockTransformer, Parts};
use blockserve_proto::v1::token_decoder_server::TokenDecoderServer;
use blockserve_runtime::lease::{Lease, LoadReport};
use blockserve_runtime::server::{serve, ServeArgs};
use blockserve_runtime::tls::{DialTlsArgs, Dialer};
use blockserve_store::{SessionStore, Tier};
use blockserve_text::Tokenizer;
use blockserve_worker::model_args::{parse_device, parse_dtype, ModelArgs};
use candle_core::{DType, Device};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::Status;

/// Default of `--worker-threads` for a token decoder: its sessions' per-block
/// work runs on few threads best (docs/performance.md).
pub const DEFAULT_WORKER_THREADS: u16 = 2;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub dial: DialTlsArgs,
    /// Most sessions running at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "BLOCKSERVE_MAX_SESSIONS", default_value_t = 1024)]
    pub max_sessions: u32,
    /// Most sessions decoded together in one token-decoder batch (the local
    /// cache is preallocated for this many rows).
    #[arg(long, env = "BLOCKSERVE_MAX_BATCH", default_value_t = 1024)]
    pub max_batch: usize,
    /// Blocks a session may run ahead of its own recording and relaying; at the
    /// limit its next block waits (a slow client holds up only itself).
    #[arg(long, env = "BLOCKSERVE_MAX_UNREAD_BLOCKS", default_value_t = model_thread::MAX_UNREAD)]
    pub max_unread_blocks: u32,
    /// Replay greedy blocks from CUDA graphs captured once per batch shape
    /// (CUDA only; `false` launches every kernel, e.g. to compare).
    #[arg(long, env = "BLOCKSERVE_CUDA_GRAPHS", default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_graphs: bool,
    /// Launch a round of greedy blocks behind the one the GPU is running and
    /// settle the earlier round (stop checks, blocks up, session events) while
    /// the later one computes (CUDA graphs only; `false` decodes and settles
    /// each round before the next, e.g. to compare).
    #[arg(long, env = "BLOCKSERVE_LAUNCH_AHEAD", default_value_t = true, action = clap::ArgAction::Set)]
    pub launch_ahead: bool,
    /// Session-store writes (state changes, blocks of tokens) that may wait
    /// while the store is unreachable. Sessions go on generating meanwhile;
    /// when the buffer is full they pause until the store is back.
    #[arg(long, env = "BLOCKSERVE_STORE_BUFFER", default_value_t = recorder::DEFAULT_CAPACITY)]
    pub store_buffer: usize,
    /// Least milliseconds from one batch of session-store appends to the next
    /// (state changes and ends go at once, and so does a batch once half of
    /// `--store-buffer` waits). Longer pauses put more tokens in
    /// each of the store's entries and cut its work per token, while the
    /// store runs further behind the streams (0: write back to back).
    #[arg(long, env = "BLOCKSERVE_STORE_APPEND_EVERY_MS", default_value_t = recorder::DEFAULT_APPEND_EVERY_MS)]
    pub store_append_every_ms: u64,
    /// Seconds a finished session stays in the store.
    #[arg(long, env = "BLOCKSERVE_SESSION_TTL_S", default_value_t = 3600)]
    pub session_ttl_s: u64,
    /// Seconds a session waits for its block decoder's next context (the
    /// first one includes the prompt's prefill) before it counts the block
    /// decoder as lost and moves to another (0: wait for ever).
    #[arg(long, env = "BLOCKSERVE_BLOCK_TIMEOUT_S", default_value_t = 60.0)]
    pub block_timeout_s: f64,
}

/// State every session task of this process shares.
pub struct Shared {
    pub model: Arc<BlockTransformer>,
    pub engine: model_thread::ModelThread,
    pub store: Arc<dyn SessionStore>,
    /// Batches the sessions' token appends.
    pub recorder: recorder::Recorder,
    pub tokenizer: Option<Tokenizer>,
    pub dtype: DType,
    pub device: Device,
    pub session_ttl: Duration,
    /// How long a session waits for its next context (None: for ever).
    pub block_timeout: Option<Duration>,
    pub max_sessions: u32,
    /// Running sessions and the switch that cancels each.
    pub running: Mutex<HashMap<String, watch::Sender<bool>>>,
    channels: blockserve_runtime::channels::Channels,
    /// Links to block decoders, shared by the sessions.
    pub links: link::Links,
    /// The model thread's key of the next session.
    pub next_key: std::sync::atomic::AtomicU64,
    /// True once the process drains (SIGTERM): no new session is admitted.
    pub stopping: watch::Receiver<bool>,
}

impl Shared {
    /// The (cached, multiplexed) channel to a block decoder, for unary calls.
    pub async fn channel(&self, address: &str) -> Result<Channel, Status> {
        self.channels.get(address).await
    }
}

struct Load(Arc<Shared>);
impl LoadReport for Load {
    fn load(&self) -> (u32, u32, u32) {
        let active = self.0.running.lock().unwrap_or_else(|p| p.into_inner()).len() as u32;
        let queued = self.0.engine.queued.load(std::sync::atomic::Ordering::Relaxed);
        (active, queued, self.0.max_sessions.saturating_sub(active))
    }
}

pub async fn run(args: Args, store: Arc<dyn SessionStore>, stop: watch::Receiver<bool>, ready: Option<tokio::sync::oneshot::Sender<String>>) -> Result<()> {
    // Only the token decoder: contexts (also for scoring) come from block decoders.
    let model = Arc::new(args.model.load_part(Parts::Local, "token decoder")?);
    let tokenizer = Tokenizer::load(&args.model.model, args.model.tokenizer.as_deref())?;
    let dialer = Arc::new(Dialer::from_args(&args.dial)?);
    let engine = model_thread::ModelThread::start(model.clone(), args.max_batch, args.max_unread_blocks, args.cuda_graphs, args.launch_ahead)?;
    blockserve_worker::model_args::log_device_memory(&args.model.device, "the weights and the local cache");
    let shared = Arc::new(Shared {
        engine: engine.clone(),
        model,
        store: store.clone(),
        recorder: recorder::Recorder::start(store.clone(), args.store_buffer, Duration::from_millis(args.store_append_every_ms)),
        tokenizer,
        dtype: parse_dtype(&args.model.dtype)?,
        device: parse_device(&args.model.device)?,
        session_ttl: Duration::from_secs(args.session_ttl_s),
        block_timeout: Duration::try_from_secs_f64(args.block_timeout_s).ok().filter(|d| !d.is_zero()),
        max_sessions: args.max_sessions,
        running: Mutex::new(HashMap::new()),
        channels: blockserve_runtime::channels::Channels::new(dialer.clone()),
        links: link::Links::new(dialer, engine.link_sink()),
        next_key: Default::default(),
        stopping: stop.clone(),
    });
    let listening = args.serve.bind().await?;
    blockserve_runtime::metrics::start(args.serve.metrics_listen, stop.clone()).await?;
    let address = listening.address.clone();
    tracing::info!(%address, "token decoder listening");
    let router = blockserve_runtime::server::builder().add_service(TokenDecoderServer::new(service::TokenDecoderService { shared: shared.clone() }));
    let lease = Lease::new(Tier::TokenDecoder, address.clone(), Duration::from_secs(args.serve.lease_ttl_s));
    let lease_task = tokio::spawn(lease.run(store, Arc::new(Load(shared.clone())), stop.clone()));
    if let Some(r) = ready {
        let _ = r.send(address);
    }
    // Draining ends when no session runs here: routers' relay streams stay
    // open as long as the routers live and would hold the whole grace period.
    let idle = Box::new(move || shared.running.lock().unwrap_or_else(|p| p.into_inner()).is_empty());
    let served = serve(router, &["blockserve.v1.TokenDecoder"], listening, stop, Duration::from_secs(args.serve.grace_period_s), Some(idle)).await;
    engine.stop();
    lag::LAG.log();
    served?;
    let _ = lease_task.await;
    Ok(())
}

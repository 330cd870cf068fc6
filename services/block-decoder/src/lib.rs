//! The block-decoder tier: holds the block-level KV cache of every session it
//! serves and answers each block with the context embedding of the next.

pub mod model_thread;
pub mod service;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use blockserve_engine::SchedulerConfig;
use blockserve_model::Parts;
use blockserve_proto::v1::block_decoder_server::BlockDecoderServer;
use blockserve_runtime::lease::{Lease, LoadReport};
use blockserve_runtime::server::{serve, ServeArgs};
use blockserve_store::{SessionStore, Tier};
use blockserve_worker::model_args::ModelArgs;
use tokio::sync::watch;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Most sessions held at once (over all links); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "BLOCKSERVE_MAX_SESSIONS", default_value_t = 1024)]
    pub max_sessions: u32,
    /// Memory for the block-level KV cache, in MiB; sessions are admitted while it
    /// has room for their prompt and the blocks they may generate.
    #[arg(long, env = "BLOCKSERVE_KV_CACHE_MIB", default_value_t = 1024)]
    pub kv_cache_mib: usize,
    /// Most new blocks (one per running session plus prompt chunks) in one
    /// forward pass; prompts longer than what is left are prefilled in chunks.
    #[arg(long, env = "BLOCKSERVE_TOKEN_BUDGET", default_value_t = 8192)]
    pub token_budget: usize,
    /// Microseconds a pass of decode blocks may wait for the rest of its
    /// micro-batch (it runs at once when prompt work is queued).
    #[arg(long, env = "BLOCKSERVE_MAX_BATCH_WAIT_US", default_value_t = 2000)]
    pub max_batch_wait_us: u64,
    /// Micro-batches the decoding sessions are split into; a decode pass takes
    /// one. With 2, one micro-batch is decoded by the token decoders (and its
    /// blocks travel) while the other's pass runs; 1 runs every session in one
    /// pass and then waits for the round trip.
    #[arg(long, env = "BLOCKSERVE_MICRO_BATCHES", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub micro_batches: u32,
    /// With two or more token decoders linked, form each decode pass from the
    /// blocks of whole links (once all of a link's decoding sessions have sent
    /// theirs), so every token decoder decodes all of its sessions as one batch
    /// per cycle; false splits the sessions by arrival only.
    #[arg(long, env = "BLOCKSERVE_MICRO_BATCH_BY_LINK", default_value_t = true, action = clap::ArgAction::Set)]
    pub micro_batch_by_link: bool,
    /// Keep the KV pages of whole prompt pages (16 blocks each) in a cache
    /// shared by later sessions whose prompt starts the same way: they prefill
    /// only the rest. Idle cached pages are evicted, least recently used
    /// first, when the pool needs them. Output is unchanged. Off by default
    /// until it is checked on the GPU (see docs/prefix-cache.md).
    #[arg(long, env = "BLOCKSERVE_PREFIX_CACHE", default_value_t = false, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,
}

struct Load(model_thread::ModelThread, u32);
impl LoadReport for Load {
    fn load(&self) -> (u32, u32, u32) {
        let a = self.0.active.load(Ordering::Relaxed);
        (a, self.0.queued.load(Ordering::Relaxed), self.1.saturating_sub(a))
    }

    fn cache_limit_pages(&self) -> u32 {
        self.0.cache_limit_pages.load(Ordering::Relaxed)
    }
}

/// Load the model, serve, register, and run until `stop` turns true.
pub async fn run(args: Args, store: Arc<dyn SessionStore>, stop: watch::Receiver<bool>, ready: Option<tokio::sync::oneshot::Sender<String>>) -> Result<()> {
    // Only the embedder and the block decoder: the token decoders hold the rest.
    let model = Arc::new(args.model.load_part(Parts::Global, "embedder and block decoder")?);
    let config = SchedulerConfig { prefix_cache: args.prefix_cache, ..SchedulerConfig::for_memory(&model, args.kv_cache_mib << 20, args.token_budget) };
    tracing::info!(
        kv_pages = config.kv_pages,
        page_blocks = config.page_size,
        token_budget = config.token_budget,
        prefix_cache = config.prefix_cache,
        "block-level KV pool"
    );
    let engine = model_thread::ModelThread::start(
        model.clone(),
        config,
        model_thread::Gather {
            max_wait: Duration::from_micros(args.max_batch_wait_us),
            micro_batches: args.micro_batches as usize,
            by_link: args.micro_batch_by_link,
        },
    )?;
    blockserve_worker::model_args::log_device_memory(&args.model.device, "the weights and the KV pool");
    let listening = args.serve.bind().await?;
    blockserve_runtime::metrics::start(args.serve.metrics_listen, stop.clone()).await?;
    let address = listening.address.clone();
    tracing::info!(%address, "block decoder listening");
    let service = service::BlockDecoderService::new(engine.clone(), model, args.max_sessions);
    let open = service.open_sessions();
    // Link messages carry a pass's contexts for thousands of sessions (or their
    // prompts): large windows and no 4 MiB message limit.
    let server = BlockDecoderServer::new(service).max_decoding_message_size(usize::MAX);
    let router = blockserve_runtime::server::builder()
        .initial_stream_window_size(blockserve_runtime::LINK_STREAM_WINDOW)
        .initial_connection_window_size(blockserve_runtime::LINK_CONNECTION_WINDOW)
        .max_frame_size(blockserve_runtime::LINK_MAX_FRAME)
        .add_service(server);
    let lease = Lease::new(Tier::BlockDecoder, address.clone(), Duration::from_secs(args.serve.lease_ttl_s));
    let lease_task = tokio::spawn(lease.run(store, Arc::new(Load(engine, args.max_sessions)), stop.clone()));
    if let Some(r) = ready {
        let _ = r.send(address);
    }
    // Draining ends when no session is open: links of token decoders that
    // have nothing on them would otherwise hold the whole grace period.
    let idle = Box::new(move || open.load(Ordering::Relaxed) == 0);
    serve(router, &["blockserve.v1.BlockDecoder"], listening, stop, Duration::from_secs(args.serve.grace_period_s), Some(idle)).await?;
    let _ = lease_task.await;
    Ok(())
}

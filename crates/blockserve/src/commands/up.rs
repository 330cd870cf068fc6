//! `blockserve up`: the whole stack in one process on loopback (router, one block
//! decoder, N token decoders), talking gRPC to each other exactly as separate
//! processes would, with an in-process session store unless --redis-url is given.

use std::path::PathBuf;

use anyhow::Result;
use blockserve_runtime::server::ServeArgs;
use blockserve_runtime::store::StoreArgs;
use blockserve_worker::model_args::ModelArgs;
use tokio::sync::{oneshot, watch};

/// The bundled model: a Block Transformer trained on the Python standard
/// library (`models/code-block`; see docs/models.md).
pub fn bundled_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/code-block")
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory (default: the bundled code model, models/code-block).
    #[arg(long, env = "BLOCKSERVE_MODEL")]
    model: Option<PathBuf>,
    /// Preset describing a bare reference checkpoint that has no config file
    /// (see `blockserve token-decoder --help` for the names).
    #[arg(long, env = "BLOCKSERVE_PRESET")]
    preset: Option<String>,
    /// The tokenizer when it is not the model directory's tokenizer.json: a
    /// tokenizer.json file or a directory holding one.
    #[arg(long, env = "BLOCKSERVE_TOKENIZER")]
    tokenizer: Option<PathBuf>,
    /// Where to run the decoders: cpu, cuda or cuda:N.
    #[arg(long, env = "BLOCKSERVE_DEVICE", default_value = "cpu")]
    device: String,
    /// Compute dtype of the decoders: f32, bf16 or f16.
    #[arg(long, env = "BLOCKSERVE_DTYPE", default_value = "f32")]
    dtype: String,
    /// Address of the public router endpoint.
    #[arg(long, env = "BLOCKSERVE_LISTEN", default_value = "127.0.0.1:50051")]
    listen: std::net::SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (/v1/completions,
    /// /v1/chat/completions, /v1/models), with the TLS and token of the gRPC
    /// endpoint.
    #[arg(long, env = "BLOCKSERVE_HTTP_LISTEN", default_value = "127.0.0.1:8000")]
    http_listen: std::net::SocketAddr,
    /// Number of token-decoder instances.
    #[arg(long, env = "BLOCKSERVE_TOKEN_DECODERS", default_value_t = 2)]
    token_decoders: usize,
    /// Threads of the async runtime every tier of this process shares (each
    /// tier run on its own defaults to 4).
    #[arg(long, env = "BLOCKSERVE_WORKER_THREADS", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: u16,
    /// Memory of the block decoder's KV cache, in MiB.
    #[arg(long, env = "BLOCKSERVE_KV_CACHE_MIB", default_value_t = 1024)]
    kv_cache_mib: usize,
    /// Share the KV pages of common prompt prefixes between sessions (see
    /// `blockserve block-decoder --help`).
    #[arg(long, env = "BLOCKSERVE_PREFIX_CACHE", default_value_t = false, action = clap::ArgAction::Set)]
    prefix_cache: bool,
    /// How prompts are cut into blocks when a request does not say: reference
    /// or aligned (see `blockserve router --help`).
    #[arg(long, env = "BLOCKSERVE_PROMPT_LAYOUT", default_value_t = blockserve_model::PromptLayout::Reference)]
    prompt_layout: blockserve_model::PromptLayout,
    /// Most sessions each decoder tier instance holds.
    #[arg(long, env = "BLOCKSERVE_MAX_SESSIONS", default_value_t = 1024)]
    max_sessions: u32,
    /// Most rows in one token-decoder batch.
    #[arg(long, env = "BLOCKSERVE_MAX_BATCH", default_value_t = 1024)]
    max_batch: usize,
    /// Micro-batches the block decoder splits the decoding sessions into (see
    /// `blockserve block-decoder --help`).
    #[arg(long, env = "BLOCKSERVE_MICRO_BATCHES", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    micro_batches: u32,
    /// Largest max_new_tokens a request may ask for.
    #[arg(long, env = "BLOCKSERVE_MAX_NEW_TOKENS", default_value_t = 1024)]
    max_new_tokens: usize,
    /// Require `authorization: Bearer <token>` on the public API.
    #[arg(long, env = "BLOCKSERVE_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Serve Prometheus metrics of every tier (one process, `tier` label) at
    /// http://ADDR/metrics. Off when not given.
    #[arg(long, env = "BLOCKSERVE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// TLS on the public router endpoint (the tiers talk plain gRPC over
    /// loopback inside the process).
    #[command(flatten)]
    tls: blockserve_runtime::tls::ServerTlsArgs,
    #[command(flatten)]
    store: StoreArgs,
}

pub async fn run(args: Args) -> Result<()> {
    let model = args.model.clone().unwrap_or_else(bundled_model);
    let model_args = || ModelArgs {
        model: model.clone(),
        preset: args.preset.clone(),
        tokenizer: args.tokenizer.clone(),
        device: args.device.clone(),
        dtype: args.dtype.clone(),
    };
    let store = args.store.connect().await?;
    let (stop_tx, stop) = watch::channel(false);
    let loopback = "127.0.0.1:0".parse().unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = blockserve_runtime::metrics::start(args.metrics_listen, stop.clone()).await? {
        eprintln!("metrics at http://{addr}/metrics");
    }

    let (ready, bd_addr) = oneshot::channel();
    let bd = blockserve_block_decoder::Args {
        serve: ServeArgs::local(loopback),
        model: model_args(),
        max_sessions: args.max_sessions,
        kv_cache_mib: args.kv_cache_mib,
        token_budget: 8192,
        max_batch_wait_us: 2000,
        micro_batches: args.micro_batches,
        micro_batch_by_link: true,
        prefix_cache: args.prefix_cache,
    };
    tasks.spawn(blockserve_block_decoder::run(bd, store.clone(), stop.clone(), Some(ready)));
    eprintln!("block decoder at {}", bd_addr.await?);
    for i in 0..args.token_decoders {
        let (ready, addr) = oneshot::channel();
        let td = blockserve_token_decoder::Args {
            serve: ServeArgs::local(loopback),
            model: model_args(),
            dial: Default::default(),
            max_sessions: args.max_sessions,
            max_batch: args.max_batch,
            max_unread_blocks: blockserve_token_decoder::model_thread::MAX_UNREAD,
            cuda_graphs: true,
            launch_ahead: true,
            store_buffer: blockserve_token_decoder::recorder::DEFAULT_CAPACITY,
            store_append_every_ms: blockserve_token_decoder::recorder::DEFAULT_APPEND_EVERY_MS,
            session_ttl_s: 3600,
            block_timeout_s: 60.0,
        };
        tasks.spawn(blockserve_token_decoder::run(td, store.clone(), stop.clone(), Some(ready)));
        eprintln!("token decoder {i} at {}", addr.await?);
    }
    let (ready, addr) = oneshot::channel();
    let router = blockserve_router::Args {
        serve: ServeArgs { tls: args.tls.clone(), ..ServeArgs::local(args.listen) },
        dial: Default::default(),
        model: model.clone(),
        preset: args.preset.clone(),
        tokenizer: args.tokenizer.clone(),
        http_listen: Some(args.http_listen),
        max_new_tokens: args.max_new_tokens,
        prefix_routing: args.prefix_cache,
        prompt_layout: args.prompt_layout,
        session_ttl_s: 3600,
        api_token: args.api_token.clone(),
        max_migrations: blockserve_router::sessions::DEFAULT_MAX_MIGRATIONS,
        max_streams: blockserve_router::sessions::DEFAULT_MAX_STREAMS,
        orphan_sweep_s: 5,
    };
    tasks.spawn(blockserve_router::run(router, store, stop.clone(), Some(ready)));
    let endpoint = addr.await?;
    println!("blockserve is up: router at {endpoint} (model {})", model.display());
    let tls = if endpoint.starts_with("https://") { " --tls-ca <the CA of --tls-cert>" } else { "" };
    let token = if args.api_token.is_some() { " --api-token <token>" } else { "" };
    println!("try: blockserve client generate \"def fibonacci(n):\" --addr {endpoint}{tls}{token}");
    let scheme = if endpoint.starts_with("https://") { "https" } else { "http" };
    println!("OpenAI-compatible HTTP API at {scheme}://{}/v1 (try: curl {scheme}://{}/v1/models)", args.http_listen, args.http_listen);

    tokio::select! {
        _ = blockserve_runtime::server::shutdown_signal() => eprintln!("shutting down"),
        Some(r) = tasks.join_next() => {
            // A tier ended on its own: that is an error (e.g. a bad model dir).
            let _ = stop_tx.send(true);
            r??;
            anyhow::bail!("a tier stopped unexpectedly");
        }
    }
    let _ = stop_tx.send(true);
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

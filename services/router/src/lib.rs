//! The router tier: the public `Generation` API. Stateless apart from live
//! streams: sessions and instances live in the session store, so any replica can
//! serve, resume, cancel or inspect any session.

pub mod auth;
mod grpc;
pub mod http;
pub mod prefix_routing;
mod relay;
mod relay_link;
pub mod sessions;
mod start;
mod sweep;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use blockserve_config::resolve_config;
use blockserve_config::ModelConfig;
use blockserve_proto::v1::generation_server::GenerationServer;
use blockserve_runtime::server::{serve, ServeArgs};
use blockserve_runtime::tls::{DialTlsArgs, Dialer};
use blockserve_store::SessionStore;
use blockserve_text::Tokenizer;
use tokio::sync::watch;

/// Default of `--worker-threads` for a router: relaying every session's
/// chunks costs least CPU per token on few threads (docs/performance.md).
pub const DEFAULT_WORKER_THREADS: u16 = 2;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub dial: DialTlsArgs,
    /// Model directory (the router reads only its config and tokenizer.json).
    #[arg(long, env = "BLOCKSERVE_MODEL")]
    pub model: PathBuf,
    /// Preset for a model directory without a config file.
    #[arg(long, env = "BLOCKSERVE_PRESET")]
    pub preset: Option<String>,
    /// The tokenizer when it is not the model directory's tokenizer.json: a
    /// tokenizer.json file or a directory holding one (released checkpoints
    /// keep the Pythia tokenizer apart from their weights).
    #[arg(long, env = "BLOCKSERVE_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// Also serve the OpenAI-compatible HTTP API (/v1/models, /v1/completions,
    /// /v1/chat/completions, resumable streams) on this address, with the same
    /// sessions, auth and TLS as the gRPC API. Off unless set.
    #[arg(long, env = "BLOCKSERVE_HTTP_LISTEN")]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Largest max_new_tokens a request may ask for.
    #[arg(long, env = "BLOCKSERVE_MAX_NEW_TOKENS", default_value_t = 1024)]
    pub max_new_tokens: usize,
    /// Send a new session to the block decoder that most likely holds the
    /// longest cached prefix of its prompt (by a model of each one's cache:
    /// the prompt pages this router sent there, as many as its cache keeps),
    /// among those with at most a quarter (or two) more sessions than the
    /// least loaded; between equals, the least loaded. For block decoders run
    /// with --prefix-cache; off: the least loaded always.
    #[arg(long, env = "BLOCKSERVE_PREFIX_ROUTING", default_value_t = false, action = clap::ArgAction::Set)]
    pub prefix_routing: bool,
    /// How prompts are cut into blocks when a request does not say
    /// (parameters.prompt_layout): "reference", left-padded with id 0 to whole
    /// blocks as the reference implementation does (outputs equal its), or
    /// "aligned", blocks from the prompt's first token with the last
    /// partial block starting the first generated one, so that the block
    /// decoders' prefix caches find a shared prefix whatever the prompt's
    /// length (docs/prefix-cache.md).
    #[arg(long, env = "BLOCKSERVE_PROMPT_LAYOUT", default_value_t = blockserve_config::PromptLayout::Reference)]
    pub prompt_layout: blockserve_config::PromptLayout,
    /// Seconds a finished session stays queryable.
    #[arg(long, env = "BLOCKSERVE_SESSION_TTL_S", default_value_t = 3600)]
    pub session_ttl_s: u64,
    /// Most times a session may move to another token or block decoder after
    /// one fails (its output so far is kept; greedy and seeded output is
    /// unchanged). Beyond it the session fails with UNAVAILABLE.
    #[arg(long, env = "BLOCKSERVE_MAX_MIGRATIONS", default_value_t = sessions::DEFAULT_MAX_MIGRATIONS)]
    pub max_migrations: u32,
    /// Most streams (Generate, Resume) this router relays at once; more get
    /// RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "BLOCKSERVE_MAX_STREAMS", default_value_t = sessions::DEFAULT_MAX_STREAMS)]
    pub max_streams: usize,
    /// Require `authorization: Bearer <token>` on every Generation call
    /// (health and reflection stay open). Prefer the environment variable to
    /// keep the token out of process listings.
    #[arg(long, env = "BLOCKSERVE_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Seconds between looks for orphaned sessions: unfinished sessions whose
    /// token decoder died while no router followed them, moved to a live
    /// token decoder after two looks without progress (0: off).
    #[arg(long, env = "BLOCKSERVE_ORPHAN_SWEEP_S", default_value_t = 5)]
    pub orphan_sweep_s: u64,
}

/// The model's name in ModelInfo and /v1/models: its directory's name, or
/// for a trainer checkpoint (`results/<run>/checkpoint-<step>`) the run's.
fn served_name(model: &std::path::Path) -> String {
    let name = |p: &std::path::Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match model.parent() {
        Some(run) if name(model).starts_with("checkpoint-") => name(run),
        _ => name(model),
    }
}

pub async fn run(args: Args, store: Arc<dyn SessionStore>, stop: watch::Receiver<bool>, ready: Option<tokio::sync::oneshot::Sender<String>>) -> Result<()> {
    let (config, _) = resolve_config(&args.model, args.preset.as_deref())?;
    let ModelConfig::Block(c) = config else {
        bail!("the serving tiers serve Block Transformers; {} holds a vanilla model", args.model.display());
    };
    let facts = sessions::ModelFacts {
        name: served_name(&args.model),
        vocab: c.vocab_size,
        block_length: c.block_length,
        // The block decoder sees prompt blocks and all but the last generated one.
        max_total_tokens: (c.block_decoder.max_position_embeddings - 1) * c.block_length,
        eos: c.eos_token_id,
        dtype: c.dtype.clone().unwrap_or_default(),
    };
    let tokenizer = Tokenizer::load(&args.model, args.tokenizer.as_deref())?;
    let mut router = sessions::Router::new(store, facts, tokenizer, args.max_new_tokens, Duration::from_secs(args.session_ttl_s));
    router.channels = blockserve_runtime::channels::Channels::new(Arc::new(Dialer::from_args(&args.dial)?));
    router.max_migrations = args.max_migrations;
    if args.prefix_routing {
        router.prefix_index = Some(std::sync::Mutex::new(prefix_routing::PrefixIndex::default()));
    }
    router.prompt_layout = args.prompt_layout;
    router.max_streams = args.max_streams.max(1);
    router.streams = Arc::new(tokio::sync::Semaphore::new(router.max_streams));
    let router = Arc::new(router);
    tokio::spawn(sweep::run(router.clone(), Duration::from_secs(args.orphan_sweep_s), stop.clone()));
    let listening = args.serve.bind().await?;
    blockserve_runtime::metrics::start(args.serve.metrics_listen, stop.clone()).await?;
    let address = listening.address.clone();
    tracing::info!(%address, "router listening");
    if let Some(listen) = args.http_listen {
        let template = http::chat_template(&args.model);
        http::serve(router.clone(), listen, listening.tls.clone(), args.api_token.clone(), template, stop.clone()).await?;
    }
    let server = blockserve_runtime::server::builder()
        .add_service(GenerationServer::with_interceptor(grpc::GenerationService(router), auth::BearerToken(args.api_token.clone())));
    if let Some(r) = ready {
        let _ = r.send(address);
    }
    serve(server, &["blockserve.v1.Generation"], listening, stop, Duration::from_secs(args.serve.grace_period_s), None).await
}

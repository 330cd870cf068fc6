use blockserve_runtime::store::StoreArgs;
use clap::Parser;

/// mimalloc instead of glibc malloc: fewer cycles per allocation on the
/// per-message paths (glibc's bookkeeping was about 8% of a router's CPU).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// blockserve router: the public Generation API. Validates requests, routes them to
/// the least-loaded token and block decoders, and keeps sessions in the store.
#[derive(Parser)]
#[command(name = "blockserve-router", version)]
struct Cli {
    #[command(flatten)]
    args: blockserve_router::Args,
    #[command(flatten)]
    store: StoreArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = blockserve_runtime::server::runtime(cli.args.serve.worker_threads.unwrap_or(blockserve_runtime::server::DEFAULT_WORKER_THREADS), None);
    runtime.block_on(blockserve_runtime::server::run_process(&cli.store, |store, stop| blockserve_router::run(cli.args, store, stop, None)))
}

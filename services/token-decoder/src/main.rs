use blockserve_runtime::store::StoreArgs;
use clap::Parser;

/// mimalloc instead of glibc malloc: fewer cycles per allocation on the
/// per-message paths (glibc's bookkeeping was about 8% of a router's CPU).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// blockserve token decoder: runs sessions, decoding the tokens of each block from
/// the context embeddings a block decoder streams to it.
#[derive(Parser)]
#[command(name = "blockserve-token-decoder", version)]
struct Cli {
    #[command(flatten)]
    args: blockserve_token_decoder::Args,
    #[command(flatten)]
    store: StoreArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = blockserve_runtime::server::runtime(cli.args.serve.worker_threads.unwrap_or(blockserve_token_decoder::DEFAULT_WORKER_THREADS), None);
    runtime.block_on(blockserve_runtime::server::run_process(&cli.store, |store, stop| blockserve_token_decoder::run(cli.args, store, stop, None)))
}

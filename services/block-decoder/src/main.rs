use blockserve_runtime::store::StoreArgs;
use clap::Parser;

/// mimalloc instead of glibc malloc: fewer cycles per allocation on the
/// per-message paths (glibc's bookkeeping was about 8% of a router's CPU).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// blockserve block decoder: prefills prompts and turns each finished block into
/// the next context embedding, for token decoders that stream to it.
#[derive(Parser)]
#[command(name = "blockserve-block-decoder", version)]
struct Cli {
    #[command(flatten)]
    args: blockserve_block_decoder::Args,
    #[command(flatten)]
    store: StoreArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = blockserve_runtime::server::runtime(
        cli.args.serve.worker_threads.unwrap_or(blockserve_runtime::server::DEFAULT_WORKER_THREADS),
        Some("block-decoder-worker"),
    );
    runtime.block_on(blockserve_runtime::server::run_process(&cli.store, |store, stop| blockserve_block_decoder::run(cli.args, store, stop, None)))
}

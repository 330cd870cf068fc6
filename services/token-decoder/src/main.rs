use blockserve_runtime::store::StoreArgs;
use clap::Parser;

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    blockserve_runtime::server::run_process(&cli.store, |store, stop| blockserve_token_decoder::run(cli.args, store, stop, None)).await
}

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
    blockserve_runtime::init_tracing();
    let cli = Cli::parse();
    let store = cli.store.connect().await?;
    blockserve_token_decoder::run(cli.args, store, blockserve_runtime::server::stop_on_signal(), None).await
}

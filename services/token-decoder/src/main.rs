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
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        blockserve_runtime::server::shutdown_signal().await;
        tracing::info!("shutting down: draining");
        let _ = stop_tx.send(true);
    });
    blockserve_token_decoder::run(cli.args, store, stop, None).await
}

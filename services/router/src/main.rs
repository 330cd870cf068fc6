use blockserve_runtime::store::StoreArgs;
use clap::Parser;

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
    blockserve_router::run(cli.args, store, stop, None).await
}

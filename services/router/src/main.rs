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
    blockserve_router::run(cli.args, store, blockserve_runtime::server::stop_on_signal(), None).await
}

//! One tier per subcommand (`blockserve router|block-decoder|token-decoder`),
//! the same as the standalone service binaries.

use anyhow::Result;
use blockserve_runtime::store::StoreArgs;
use blockserve_runtime::server::stop_on_signal;

#[derive(clap::Args, Debug)]
pub struct RouterArgs {
    #[command(flatten)]
    pub args: blockserve_router::Args,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(clap::Args, Debug)]
pub struct BlockDecoderArgs {
    #[command(flatten)]
    pub args: blockserve_block_decoder::Args,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(clap::Args, Debug)]
pub struct TokenDecoderArgs {
    #[command(flatten)]
    pub args: blockserve_token_decoder::Args,
    #[command(flatten)]
    pub store: StoreArgs,
}

pub async fn router(a: RouterArgs) -> Result<()> {
    blockserve_router::run(a.args, a.store.connect().await?, stop_on_signal(), None).await
}

pub async fn block_decoder(a: BlockDecoderArgs) -> Result<()> {
    blockserve_block_decoder::run(a.args, a.store.connect().await?, stop_on_signal(), None).await
}

pub async fn token_decoder(a: TokenDecoderArgs) -> Result<()> {
    blockserve_token_decoder::run(a.args, a.store.connect().await?, stop_on_signal(), None).await
}

//! One tier per subcommand (`blockserve router|block-decoder|token-decoder`),
//! the same as the standalone service binaries.

use anyhow::Result;
use blockserve_runtime::server::run_process;
use blockserve_runtime::store::StoreArgs;

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
    run_process(&a.store, |store, stop| blockserve_router::run(a.args, store, stop, None)).await
}

pub async fn block_decoder(a: BlockDecoderArgs) -> Result<()> {
    run_process(&a.store, |store, stop| blockserve_block_decoder::run(a.args, store, stop, None)).await
}

pub async fn token_decoder(a: TokenDecoderArgs) -> Result<()> {
    run_process(&a.store, |store, stop| blockserve_token_decoder::run(a.args, store, stop, None)).await
}

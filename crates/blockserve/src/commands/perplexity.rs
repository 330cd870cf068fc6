//! `blockserve perplexity`: held-out perplexity of a model over a token file,
//! with the scoring code the Score RPC runs (`BlockTransformer::score_blocks`
//! behind the block decoder's contexts; `CausalLm::score_rows` for vanilla
//! models), in this process.
//!
//! The tokens are cut into consecutive windows; in each, the tokens from
//! position L (the block length, 4 unless --skip says otherwise) on are
//! scored, so a Block Transformer and a vanilla model are judged on the same
//! tokens with the same context.

use std::path::PathBuf;

use anyhow::{bail, Result};
use blockserve_model::Model;
use blockserve_worker::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Token file (little-endian u16 ids, as `blockserve corpus` writes).
    #[arg(long)]
    tokens: PathBuf,
    /// Tokens per window.
    #[arg(long, default_value_t = 512)]
    window: usize,
    /// Most windows scored (from the start of the file).
    #[arg(long, default_value_t = 1024)]
    max_windows: usize,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Leading tokens of each window left unscored (the first block).
    #[arg(long, default_value_t = 4)]
    skip: usize,
}

pub fn run(a: Args) -> Result<()> {
    let ids = blockserve_train::bpe::read_tokens(&a.tokens)?;
    let windows = blockserve_train::data::windows(&ids, a.window, a.max_windows);
    if windows.is_empty() {
        bail!("{}: {} tokens do not fill one --window of {}", a.tokens.display(), ids.len(), a.window);
    }
    let model = a.model.load()?;
    let (mut sum, mut count) = (0f64, 0usize);
    for rows in windows.chunks(a.batch.max(1)) {
        // Log probs from position `first` of each window on.
        let (scored, first) = match &model {
            Model::Block(m) => (m.score_rows(rows)?, m.block_length()),
            Model::Vanilla(m) => (m.score_rows(rows)?, 1),
        };
        if a.skip < first {
            bail!("--skip {}: this model scores from position {first}", a.skip);
        }
        for row in scored {
            for lp in &row[a.skip - first..] {
                sum -= *lp as f64;
                count += 1;
            }
        }
    }
    let mean = sum / count as f64;
    println!("{} windows of {}, {count} tokens scored: loss {mean:.4} nats/token, perplexity {:.3}", windows.len(), a.window, mean.exp());
    Ok(())
}

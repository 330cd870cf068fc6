//! `blockserve logits`: the reference forward pass, for checking a model against
//! another implementation.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use blockserve_model::Model;
use candle_core::DType;
use serde::Deserialize;

use blockserve_worker::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// JSON file `{"input_ids": [[...], ...]}`: rows of equal length; for a Block
    /// Transformer each row is a whole number of blocks (at least two).
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors. Block Transformer: `logits` [batch, n_blocks-1, L, V]
    /// (the context of block b predicts block b+1) and `context` [batch, n_blocks, D_b];
    /// vanilla: `logits` [batch, T, V]. Always float32.
    #[arg(long)]
    output: PathBuf,
}

#[derive(Deserialize)]
struct Input {
    input_ids: Vec<Vec<u32>>,
}

pub fn run(args: Args) -> Result<()> {
    let text = std::fs::read_to_string(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let input: Input = serde_json::from_str(&text).with_context(|| format!("{}: expected {{\"input_ids\": [[ids...], ...]}}", args.input.display()))?;
    let model = args.model.load()?;
    let mut out = HashMap::new();
    match &model {
        Model::Block(m) => {
            let f = m.forward(&input.input_ids)?;
            out.insert("logits".to_string(), f.logits.to_dtype(DType::F32)?);
            out.insert("context".to_string(), f.context.to_dtype(DType::F32)?);
        }
        Model::Vanilla(m) => {
            out.insert("logits".to_string(), m.forward(&input.input_ids)?.to_dtype(DType::F32)?);
        }
    }
    candle_core::safetensors::save(&out, &args.output).with_context(|| format!("writing {}", args.output.display()))?;
    for (k, v) in &out {
        eprintln!("wrote {k} {:?} to {}", v.dims(), args.output.display());
    }
    Ok(())
}

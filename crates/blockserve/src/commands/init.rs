//! `blockserve init`: a random-weight model of any preset, as the reference
//! benchmarks use.

use std::path::PathBuf;

use anyhow::{bail, Result};
use blockserve_model::init::{random_weights, save_model};
use blockserve_model::presets::preset;

use blockserve_worker::model_args::parse_dtype;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Shape to build: block_main_b4_5, _19, _85, _300, _800, _1.2b, or vanilla_70,
    /// vanilla_160, vanilla_410, vanilla_1b (Pythia shapes), or block_demo_bytes (the
    /// bundled demo shape).
    #[arg(long)]
    preset: String,
    /// Seed of the weights; the same seed writes the same file.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (created; an existing model there is not overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Also write a byte-level tokenizer.json (257 ids: end of text, then the 256
    /// bytes); the vocabulary must have 257 entries (preset block_demo_bytes).
    #[arg(long)]
    byte_tokenizer: bool,
    /// Storage dtype of the weights: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn run(args: Args) -> Result<()> {
    let config = preset(&args.preset)?;
    let dtype = parse_dtype(&args.dtype)?;
    if args.out.join("model.safetensors").exists() {
        bail!("{} already holds a model.safetensors; choose another --out", args.out.display());
    }
    let tensors = random_weights(&config, args.seed, dtype)?;
    if args.byte_tokenizer && config.vocab_size() != 257 {
        bail!("--byte-tokenizer needs a 257-entry vocabulary; preset {} has {}", args.preset, config.vocab_size());
    }
    save_model(&args.out, &config, &tensors)?;
    if args.byte_tokenizer {
        std::fs::write(args.out.join("tokenizer.json"), blockserve_text::byte_level_tokenizer_json())?;
    }
    let params: usize = tensors.values().map(|t| t.elem_count()).sum();
    eprintln!("wrote {} ({} parameters, {}) to {}", args.preset, params, args.dtype, args.out.display());
    Ok(())
}

//! Finding and loading a model directory in any of the layouts users have:
//!
//! 1. `config.json` with `model_type: "block_transformer"` (the project's format)
//!    + a reference-layout `model.safetensors`;
//! 2. `config.yaml`: the reference trainer yaml + `model.safetensors`;
//! 3. no config at all, with a preset name given by the caller;
//! 4. a Hugging Face Pythia directory (`config.json` with `model_type: "gpt_neox"`,
//!    `model.safetensors` or sharded files with an index).

use std::path::Path;

use candle_core::{DType, Device};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::{safetensors_files, Weights};
use crate::{BlockTransformer, CausalLm, Model, Parts};

pub use blockserve_config::source::{parse_config_json, resolve_config, ConfigSource};

/// Build a model from a config and a weight source.
pub fn build(config: &ModelConfig, weights: &Weights) -> Result<Model> {
    Ok(match config {
        ModelConfig::Block(c) => Model::Block(BlockTransformer::load(weights, c)?),
        ModelConfig::Vanilla(c) => Model::Vanilla(CausalLm::load(weights, c)?),
    })
}

/// Load `parts` of the Block Transformer in `dir` onto `device` in `dtype`
/// (an error for a vanilla model).
pub fn load_block_transformer(dir: &Path, preset: Option<&str>, dtype: DType, device: &Device, parts: Parts) -> Result<BlockTransformer> {
    let (config, _) = resolve_config(dir, preset)?;
    let ModelConfig::Block(c) = config else {
        return Err(ModelError::Config(format!("{} holds a vanilla model; the serving tiers serve Block Transformers", dir.display())));
    };
    let weights = Weights::from_files(&safetensors_files(dir)?, dtype, device)?;
    BlockTransformer::load_parts(&weights, &c, parts)
}

/// Load the model in `dir` onto `device` in `dtype`.
pub fn load_model(dir: &Path, preset: Option<&str>, dtype: DType, device: &Device) -> Result<Model> {
    let (config, _) = resolve_config(dir, preset)?;
    let weights = Weights::from_files(&safetensors_files(dir)?, dtype, device)?;
    build(&config, &weights)
}

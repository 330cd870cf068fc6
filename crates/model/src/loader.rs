//! Finding and loading a model directory in any of the layouts users have:
//!
//! 1. `config.json` with `model_type: "block_transformer"` (the project's format)
//!    + a reference-layout `model.safetensors`;
//! 2. `config.yaml`: the reference trainer yaml + `model.safetensors`;
//! 3. no config at all, with a preset name given by the caller;
//! 4. a Hugging Face Pythia directory (`config.json` with `model_type: "gpt_neox"`,
//!    `model.safetensors` or sharded files with an index).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::{safetensors_files, Weights};
use crate::{presets, reference_yaml, BlockTransformer, CausalLm, Model};

/// Where a config came from (reported by `--help`-level tooling and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    ConfigJson(PathBuf),
    TrainerYaml(PathBuf),
    Preset(String),
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| ModelError::File { path: path.to_path_buf(), msg: e.to_string() })
}

/// Parse a `config.json`: the project's Block Transformer format or HF GPT-NeoX.
pub fn parse_config_json(path: &Path) -> Result<ModelConfig> {
    ModelConfig::from_json(&read(path)?).map_err(|e| ModelError::File { path: path.to_path_buf(), msg: e.to_string() })
}

/// Decide the config of `dir`. A preset, when given, describes a checkpoint that
/// has no config file; it is refused if the directory has one, so the two can't
/// silently disagree.
pub fn resolve_config(dir: &Path, preset: Option<&str>) -> Result<(ModelConfig, ConfigSource)> {
    let json = dir.join("config.json");
    let yaml = dir.join("config.yaml");
    if let Some(name) = preset {
        if let Some(existing) = [&json, &yaml].into_iter().find(|p| p.exists()) {
            return Err(ModelError::File { path: existing.clone(), msg: format!("the directory has its own config; drop the preset {name:?} or the file") });
        }
        return Ok((presets::preset(name)?, ConfigSource::Preset(name.into())));
    }
    if json.exists() {
        return Ok((parse_config_json(&json)?, ConfigSource::ConfigJson(json)));
    }
    if yaml.exists() {
        let c = reference_yaml::parse_trainer_yaml(&read(&yaml)?).map_err(|e| ModelError::File { path: yaml.clone(), msg: e.to_string() })?;
        return Ok((ModelConfig::Block(c), ConfigSource::TrainerYaml(yaml)));
    }
    Err(ModelError::File {
        path: dir.to_path_buf(),
        msg: format!("no config.json or config.yaml; for a bare reference checkpoint name its preset ({})", presets::preset_names().join(", ")),
    })
}

/// Build a model from a config and a weight source.
pub fn build(config: &ModelConfig, weights: &Weights) -> Result<Model> {
    Ok(match config {
        ModelConfig::Block(c) => Model::Block(BlockTransformer::load(weights, c)?),
        ModelConfig::Vanilla(c) => Model::Vanilla(CausalLm::load(weights, c)?),
    })
}

/// Load the model in `dir` onto `device` in `dtype`.
pub fn load_model(dir: &Path, preset: Option<&str>, dtype: DType, device: &Device) -> Result<Model> {
    let (config, _) = resolve_config(dir, preset)?;
    let weights = Weights::from_files(&safetensors_files(dir)?, dtype, device)?;
    build(&config, &weights)
}

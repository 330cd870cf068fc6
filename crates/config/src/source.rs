//! Where the config of a model directory comes from, in the layouts users
//! have: `config.json` (the project's format, or a Hugging Face GPT-NeoX
//! config), the reference trainer's `config.yaml`, or a preset the caller
//! names for a bare reference checkpoint.

use std::path::{Path, PathBuf};

use crate::error::{ConfigError, Result};
use crate::model::ModelConfig;
use crate::{presets, reference_yaml};

/// Where a config came from (reported by `--help`-level tooling and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    ConfigJson(PathBuf),
    TrainerYaml(PathBuf),
    Preset(String),
}

pub(crate) fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::File { path: path.to_path_buf(), msg: e.to_string() })
}

/// Parse a `config.json`: the project's Block Transformer format or HF GPT-NeoX.
pub fn parse_config_json(path: &Path) -> Result<ModelConfig> {
    ModelConfig::from_json(&read(path)?).map_err(|e| ConfigError::File { path: path.to_path_buf(), msg: e.to_string() })
}

/// Decide the config of `dir`. A preset, when given, describes a checkpoint that
/// has no config file; it is refused if the directory has one, so the two can't
/// silently disagree.
pub fn resolve_config(dir: &Path, preset: Option<&str>) -> Result<(ModelConfig, ConfigSource)> {
    let json = dir.join("config.json");
    let yaml = dir.join("config.yaml");
    if let Some(name) = preset {
        if let Some(existing) = [&json, &yaml].into_iter().find(|p| p.exists()) {
            return Err(ConfigError::File { path: existing.clone(), msg: format!("the directory has its own config; drop the preset {name:?} or the file") });
        }
        return Ok((presets::preset(name)?, ConfigSource::Preset(name.into())));
    }
    if json.exists() {
        return Ok((parse_config_json(&json)?, ConfigSource::ConfigJson(json)));
    }
    if yaml.exists() {
        let c = reference_yaml::parse_trainer_yaml(&read(&yaml)?).map_err(|e| ConfigError::File { path: yaml.clone(), msg: e.to_string() })?;
        return Ok((ModelConfig::Block(c), ConfigSource::TrainerYaml(yaml)));
    }
    Err(ConfigError::File {
        path: dir.to_path_buf(),
        msg: format!("no config.json or config.yaml; for a bare reference checkpoint name its preset ({})", presets::preset_names().join(", ")),
    })
}

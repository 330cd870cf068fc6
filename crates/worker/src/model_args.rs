//! Flags shared by every command that loads a model.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use blockserve_model::loader::{load_block_transformer, load_model};
use blockserve_model::{BlockTransformer, Model, Parts};
use candle_core::{DType, Device};

#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// Model directory: config.json (blockserve or Hugging Face GPT-NeoX format) or a
    /// reference trainer config.yaml, plus model.safetensors (or sharded safetensors).
    #[arg(long, env = "BLOCKSERVE_MODEL")]
    pub model: PathBuf,
    /// Preset describing a bare reference checkpoint that has no config file
    /// (block_main_b4_5, _19, _85, _300, _800, _1.2b, vanilla_70, vanilla_160, vanilla_410, vanilla_1b,
    /// block_demo_bytes).
    #[arg(long, env = "BLOCKSERVE_PRESET")]
    pub preset: Option<String>,
    /// The tokenizer when it is not the model directory's tokenizer.json: a
    /// tokenizer.json file or a directory holding one (released checkpoints
    /// keep the Pythia tokenizer apart from their weights). The block decoder
    /// reads no text and ignores it.
    #[arg(long, env = "BLOCKSERVE_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// Where to run: cpu, cuda or cuda:N (cuda needs a build with --features cuda).
    #[arg(long, env = "BLOCKSERVE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, bf16 or f16 (bf16 and f16 are meant for CUDA).
    #[arg(long, env = "BLOCKSERVE_DTYPE", default_value = "f32")]
    pub dtype: String,
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => bail!("--dtype {other:?}: expected f32, bf16 or f16"),
    })
}

pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().with_context(|| format!("--device {s:?}: bad GPU ordinal"))?,
                None => 0,
            };
            blockserve_model::cuda_device(ordinal).with_context(|| format!("--device {s}: CUDA is not available in this build or machine"))
        }
        other => bail!("--device {other:?}: expected cpu, cuda or cuda:N"),
    }
}

impl ModelArgs {
    pub fn load(&self) -> Result<Model> {
        let dtype = parse_dtype(&self.dtype)?;
        let device = parse_device(&self.device)?;
        load_model(&self.model, self.preset.as_deref(), dtype, &device).with_context(|| format!("loading model from {}", self.model.display()))
    }

    /// A serving tier's part of the Block Transformer; logs the device memory
    /// its weights took (`what` names the part in the log).
    pub fn load_part(&self, parts: Parts, what: &str) -> Result<BlockTransformer> {
        let dtype = parse_dtype(&self.dtype)?;
        let device = parse_device(&self.device)?;
        let before = blockserve_model::device_memory(&device);
        let m = load_block_transformer(&self.model, self.preset.as_deref(), dtype, &device, parts)
            .with_context(|| format!("loading the {what} of {}", self.model.display()))?;
        match (before, blockserve_model::device_memory(&device)) {
            (Some((free_before, _)), Some((free, total))) => tracing::info!(
                part = what,
                device = %self.device,
                weights_mib = (free_before.saturating_sub(free)) >> 20,
                used_mib = (total - free) >> 20,
                total_mib = total >> 20,
                "loaded this tier's weights"
            ),
            _ => tracing::info!(part = what, device = %self.device, "loaded this tier's weights"),
        }
        Ok(m)
    }
}

/// Log the device memory in use once a tier has allocated what it keeps
/// (weights, KV pool or local cache).
pub fn log_device_memory(device: &str, what: &str) {
    let Ok(d) = parse_device(device) else { return };
    if let Some((free, total)) = blockserve_model::device_memory(&d) {
        tracing::info!(device, used_mib = (total - free) >> 20, total_mib = total >> 20, "GPU memory in use with {what}");
    }
}

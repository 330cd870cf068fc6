//! Flags shared by every command that loads a model.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use blockserve_model::loader::load_model;
use blockserve_model::Model;
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
}

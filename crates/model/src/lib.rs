//! blockserve's model math: Block Transformer (global-to-local LM) and GPT-NeoX
//! (Pythia) inference on candle, matching the reference implementation.
//!
//! Pure computation: no async runtime, no networking. The serving tiers own the
//! scheduling and pass caches in and out of these calls.
//!
//! - [`config`], [`presets`], [`reference_yaml`] (re-exported from
//!   `blockserve-config`, which holds them as plain data), [`loader`]: what a
//!   model is and how to load it from disk.
//! - [`gpt_neox`]: the transformer stack every decoder is made of.
//! - [`paged`]: the paged KV pool every incremental pass reads and writes.
//! - [`block_transformer`], [`causal_lm`]: the two model kinds, with incremental,
//!   batched entry points over caller-owned pools.
//! - [`prompt`], [`sampling`], [`generation`]: prompt layout, token choice, and a
//!   synchronous multi-session driver.

pub mod argmax;
mod block_transformer;
mod causal_lm;
#[cfg(feature = "cuda")]
mod cuda_util;
mod error;
mod fused;
mod generation;
mod gpt_neox;
pub mod init;
pub mod loader;
#[cfg(feature = "cuda")]
mod lt_linear;
pub mod paged;
pub mod prompt;
pub mod sampling;
pub mod weights;

pub use blockserve_config::{model as config, presets, reference_yaml, ConfigError};

pub use block_transformer::LocalKv;
pub use block_transformer::{BlockTransformer, Parts};
pub use causal_lm::CausalLm;
pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use generation::{FinishReason, GenerationOutput, GenerationRequest, StopCriteria};
pub use paged::{KvPool, PagedPass, SeqKv};
pub use prompt::PromptLayout;
pub use sampling::SamplingParams;

/// A loaded model of either kind.
// One per process, built once: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Model {
    Block(BlockTransformer),
    Vanilla(CausalLm),
}

impl Model {
    pub fn config(&self) -> ModelConfig {
        match self {
            Model::Block(m) => ModelConfig::Block(m.config.clone()),
            Model::Vanilla(m) => ModelConfig::Vanilla(m.config.clone()),
        }
    }
}

/// The CUDA device `ordinal`, set up for serving: one stream, so candle's
/// per-tensor event tracking (a record and a wait per kernel argument) is turned
/// off before any tensor exists on it.
pub fn cuda_device(ordinal: usize) -> Result<candle_core::Device> {
    let device = candle_core::Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = &device {
        // SAFETY: blockserve uses only this device's default stream, so work on
        // every tensor is ordered without events.
        unsafe { d.disable_event_tracking() };
    }
    Ok(device)
}

/// The elements of a float tensor as row-major little-endian bytes, copied to
/// the host (what the wire and the block decoder's downloads carry).
pub fn host_bytes(t: &candle_core::Tensor) -> candle_core::Result<Vec<u8>> {
    use candle_core::DType;
    let flat = t.flatten_all()?.to_device(&candle_core::Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F32 => bytemuck::cast_slice(&flat.to_vec1::<f32>()?).to_vec(),
        DType::BF16 => bytemuck::cast_slice(&flat.to_vec1::<half::bf16>()?).to_vec(),
        DType::F16 => bytemuck::cast_slice(&flat.to_vec1::<half::f16>()?).to_vec(),
        other => candle_core::bail!("no host bytes for {other:?}"),
    })
}

/// Free and total memory of `device` in bytes (None on the CPU).
pub fn device_memory(device: &candle_core::Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        return d.cuda_stream().context().mem_get_info().ok();
    }
    let _ = device;
    None
}

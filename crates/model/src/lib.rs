//! blockserve's model math: Block Transformer (global-to-local LM) and GPT-NeoX
//! (Pythia) inference on candle, matching the reference implementation.
//!
//! Pure computation: no async runtime, no networking. The serving tiers own the
//! scheduling and pass caches in and out of these calls.
//!
//! - [`config`], [`presets`], [`reference_yaml`], [`loader`]: what a model is and
//!   how to find it on disk.
//! - [`gpt_neox`]: the transformer stack every decoder is made of.
//! - [`block_transformer`], [`causal_lm`]: the two model kinds, with incremental,
//!   batched entry points and caller-owned [`KvCache`]s.
//! - [`prompt`], [`sampling`], [`generation`]: prompt layout, token choice, and a
//!   synchronous multi-session driver.

pub mod block_transformer;
pub mod causal_lm;
pub mod config;
pub mod error;
pub mod generation;
pub mod gpt_neox;
pub mod init;
pub mod kv_cache;
pub mod loader;
pub mod presets;
pub mod prompt;
pub mod reference_yaml;
pub mod sampling;
pub mod weights;

pub use block_transformer::BlockTransformer;
pub use causal_lm::CausalLm;
pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use generation::{FinishReason, GenerationOutput, GenerationRequest, StopCriteria};
pub use kv_cache::KvCache;
pub use sampling::SamplingParams;

/// A loaded model of either kind.
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

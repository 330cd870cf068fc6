//! What a blockserve model is and what a request asks of it, as plain data:
//! no tensors, no runtime. The model crate builds on it; the router uses it
//! alone (it reads a model's config and validates requests, and holds no
//! weights).
//!
//! - [`model`]: the configs of the GPT-NeoX stack, the Block Transformer and the
//!   vanilla Pythia LM;
//! - [`presets`], [`reference_yaml`]: the reference implementation's shapes and
//!   its trainer's yaml;
//! - [`source`]: where a model directory's config comes from;
//! - [`request`]: sampling and stop settings.

pub mod error;
pub mod model;
pub mod prefix;
pub mod presets;
pub mod reference_yaml;
pub mod request;
pub mod source;

pub use error::{ConfigError, Result};
pub use model::ModelConfig;
pub use request::{FinishReason, PromptLayout, SamplingParams, StopCriteria};
pub use source::{resolve_config, ConfigSource};

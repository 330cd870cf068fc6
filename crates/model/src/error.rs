//! Errors of the model crate. Messages name the file, key or field at fault, since
//! they reach operators verbatim.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("weights: missing tensor `{key}` (expected shape {expected:?})")]
    MissingTensor { key: String, expected: Vec<usize> },
    #[error("weights: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { key: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("invalid input: {0}")]
    Input(String),
    /// Not enough KV memory right now; the request may be retried later.
    #[error("out of capacity: {0}")]
    Capacity(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

pub(crate) fn input_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(ModelError::Input(msg.into()))
}

/// Config and request-setting errors keep their kind (and message) in the model crate.
impl From<blockserve_config::ConfigError> for ModelError {
    fn from(e: blockserve_config::ConfigError) -> Self {
        use blockserve_config::ConfigError as C;
        match e {
            C::Config(m) => ModelError::Config(m),
            C::File { path, msg } => ModelError::File { path, msg },
            C::Input(m) => ModelError::Input(m),
        }
    }
}

//! The engines' errors: one kind per way work can fail, so each reaches a
//! caller as the one status that fits it (the services map them in
//! `blockserve-worker`).

use blockserve_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine's thread has ended: the tier is stopping, or it failed.
    #[error("{0} engine stopped")]
    Stopped(&'static str),
    /// No room now (KV pages, sessions); the same work may succeed later.
    #[error("out of capacity: {0}")]
    Capacity(String),
    /// The model refused the work (`ModelError::Input`: the request does not
    /// fit it) or failed.
    #[error(transparent)]
    Model(ModelError),
    /// Context embeddings that cannot be put on or taken off the wire as they
    /// are (dtype, dimension, byte count, layout).
    #[error("{0}")]
    Wire(String),
}

impl From<ModelError> for EngineError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Capacity(m) => EngineError::Capacity(m),
            other => EngineError::Model(other),
        }
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Model(ModelError::Candle(e))
    }
}

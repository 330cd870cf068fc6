//! blockserve's trainer. Everything a newcomer's model needs, built with the
//! same model code that serves it:
//!
//! - [`corpus`]: a code corpus from a directory of Python sources (the
//!   standard library that ships with python3), deduplicated and split into
//!   train and validation by file, with a manifest of every file used;
//! - [`bpe`]: a byte-level BPE tokenizer trained on the training split (id 0 =
//!   end of text), and the split encoded into token files;
//! - [`data`]: batches of random windows drawn from the token files by a
//!   generator seeded per step, so a resumed run sees exactly the batches an
//!   uninterrupted one does;
//! - [`objective`]: the losses. A Block Transformer is trained as the
//!   reference trains it: the token decoder's cross-entropy over blocks 1..n,
//!   block b's context predicting block b+1. A vanilla model predicts each
//!   next token;
//! - [`optim`]: AdamW with decoupled weight decay, warm-up plus cosine
//!   schedule and global-norm gradient clipping, with its state in tensors
//!   that checkpoints save;
//! - [`trainer`]: the loop: gradient accumulation, periodic held-out loss,
//!   checkpoints that resume exactly, progress lines, and export as a
//!   servable model directory;
//! - [`shapes`]: the model shapes trained for the bundled model and its
//!   comparisons.

pub mod bpe;
pub mod corpus;
pub mod data;
pub mod objective;
pub mod optim;
pub mod shapes;
pub mod trainer;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] blockserve_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;

/// A config error, as the model crate reports it.
impl From<blockserve_model::ConfigError> for TrainError {
    fn from(e: blockserve_model::ConfigError) -> Self {
        TrainError::Model(e.into())
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::File { path: path.to_path_buf(), msg: e.to_string() }
}

pub(crate) fn input<T>(msg: impl Into<String>) -> Result<T> {
    Err(TrainError::Input(msg.into()))
}

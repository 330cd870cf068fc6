//! blockserve's engines: the schedulers between the model math and the services.
//! Synchronous, no async runtime: each runs on a model thread that a service (or
//! the bench) drives.
//!
//! - [`block_scheduler`]: the block decoder's continuous batching. Every
//!   iteration is one paged pass holding one block of every running session plus
//!   prompt chunks of new sessions, up to a token budget. Sessions are admitted
//!   by free KV pages.
//! - [`gather`]: how the block decoder forms each decode pass from the blocks
//!   its links send back (micro-batches, whole links).
//! - [`token_batcher`]: the token decoder's block-synchronous batches over a
//!   preallocated local cache, with per-row sampling.
//! - `cuda_graph` (CUDA builds): the token batcher's greedy blocks captured
//!   once per batch shape and replayed as CUDA graphs.
//! - `ahead` (CUDA builds): the token decoder's greedy rounds queued behind
//!   the one the GPU is running, two lanes used alternately.
//! - [`download`]: a pass's contexts to the host without waiting for the
//!   next pass, which the block decoder launches behind it.
//! - [`token_thread`]: a token batcher on a thread (and so a CUDA stream) of
//!   its own, for the pipeline's overlap of the two tiers.
//! - [`pipeline`]: both in one process, driving requests to completion with
//!   per-session timings (what `blockserve bench` measures).

#[cfg(feature = "cuda")]
pub mod ahead;
pub mod block_scheduler;
#[cfg(feature = "cuda")]
pub mod cuda_graph;
pub mod download;
pub mod error;
pub mod gather;
pub mod pipeline;
pub mod prefix_cache;
pub mod token_batcher;
pub mod token_thread;

pub use block_scheduler::{BlockScheduler, Contexts, SchedulerConfig};
pub use error::EngineError;
pub use token_batcher::{BlockJob, DoneSignal, HostContexts, Launched, TokenBatcher};
pub use token_thread::TokenThread;

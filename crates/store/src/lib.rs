//! Shared state of a blockserve deployment behind one trait: instance leases
//! (who is alive, how loaded) and session records (state, parameters, tokens).
//!
//! [`RedisStore`] is what a multi-process deployment uses; [`MemoryStore`] is the
//! embedded default for a single process (`blockserve up`) and has the same
//! semantics, lease expiry included.

mod memory;
pub mod redis_store;
mod types;

use std::time::Duration;

pub use memory::MemoryStore;
pub use redis_store::RedisStore;
pub use types::*;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    #[error("session store data is corrupt: {0}")]
    Corrupt(String),
}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// How a final state is recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub state: SessionState,
    pub finish_reason: String,
    pub error: Option<String>,
}

#[async_trait::async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Create or renew an instance's lease; it disappears `ttl` after the last call.
    async fn register(&self, info: &InstanceInfo, ttl: Duration) -> Result<()>;
    /// Remove an instance now (graceful shutdown).
    async fn deregister(&self, tier: Tier, id: &str) -> Result<()>;
    /// Live instances of a tier.
    async fn instances(&self, tier: Tier) -> Result<Vec<InstanceInfo>>;

    /// Record a new session in state `queued`, epoch 0. Returns false (and
    /// changes nothing) when a session with this id exists.
    async fn create_session(&self, spec: &SessionSpec, assignment: &Assignment) -> Result<bool>;
    async fn session(&self, id: &str) -> Result<Option<SessionRecord>>;
    /// Move a running session to a non-final state (fenced by `epoch`).
    async fn set_progress(&self, id: &str, epoch: Epoch, state: SessionState) -> Result<Write>;
    /// The session moved to block decoder `address` (its token decoder stays):
    /// records it and counts a migration (fenced by `epoch`).
    async fn set_block_decoder(&self, id: &str, epoch: Epoch, address: &str) -> Result<Write>;
    /// The session's block decoder found `blocks` prompt blocks in its prefix
    /// cache at the session's latest start there (fenced by `epoch`).
    async fn set_reused_blocks(&self, id: &str, epoch: Epoch, blocks: u32) -> Result<Write>;
    /// Record generated tokens, one result per entry; entries of one session
    /// apply in order (one round trip where the store allows it). An entry whose
    /// offset is past the recorded output is an error (a write went missing).
    async fn append_many(&self, batch: &[Append]) -> Result<Vec<Write>>;
    /// Generated tokens from index `from` on.
    async fn tokens(&self, id: &str, from: usize) -> Result<Vec<u32>>;
    /// Record the final state unless one is recorded already (or, with an
    /// epoch, unless the session moved on); returns whether this call set it.
    /// Final sessions expire after `ttl`.
    async fn finish(&self, id: &str, epoch: Option<Epoch>, outcome: &Outcome, ttl: Duration) -> Result<bool>;
    /// Migrate a session that is at `expected` to `to`: the epoch and the
    /// migration count go up by one. `known` is output that was relayed to the
    /// client; what of it the store lacks (its writer died before writing it)
    /// is appended first, so the resumed output continues after all of it.
    async fn reassign(&self, id: &str, expected: Epoch, to: &Assignment, known: &[u32]) -> Result<Reassigned>;
    /// The sessions not yet in a final state, as (session id, instance id of
    /// its token decoder): what an orphan sweep looks through.
    async fn unfinished(&self) -> Result<Vec<(String, String)>>;
}

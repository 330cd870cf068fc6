//! What the store holds: live instances of each tier and session records.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    BlockDecoder,
    TokenDecoder,
}

impl Tier {
    pub fn as_str(&self) -> &'static str {
        match self {
            Tier::BlockDecoder => "block_decoder",
            Tier::TokenDecoder => "token_decoder",
        }
    }
}

/// A registered instance and its load, renewed under a lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Unique per process start (a restarted process registers anew).
    pub id: String,
    pub tier: Tier,
    /// gRPC address others dial (`http://host:port`).
    pub address: String,
    pub active_sessions: u32,
    /// Work waiting for the model (prefills, blocks).
    pub queued: u32,
    /// Sessions it can still admit.
    pub free_capacity: u32,
    pub updated_at_ms: u64,
    /// Block decoders with a prefix cache: the pages the cache kept when it
    /// last had to evict, i.e. about what it holds under the current load
    /// (0: it has not had to evict; other tiers: 0). Prefix routing sizes its
    /// model of the cache by it.
    #[serde(default)]
    pub cache_limit_pages: u32,
}

impl InstanceInfo {
    /// Ordering key for "least loaded": most free capacity, then fewest active.
    pub fn load_key(&self) -> (u32, u32, u32) {
        (self.active_sessions + self.queued, u32::MAX - self.free_capacity, self.queued)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Queued,
    Prefilling,
    Decoding,
    Finished,
    Cancelled,
    Failed,
}

impl SessionState {
    pub fn is_final(&self) -> bool {
        matches!(self, SessionState::Finished | SessionState::Cancelled | SessionState::Failed)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            SessionState::Queued => "queued",
            SessionState::Prefilling => "prefilling",
            SessionState::Decoding => "decoding",
            SessionState::Finished => "finished",
            SessionState::Cancelled => "cancelled",
            SessionState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => SessionState::Queued,
            "prefilling" => SessionState::Prefilling,
            "decoding" => SessionState::Decoding,
            "finished" => SessionState::Finished,
            "cancelled" => SessionState::Cancelled,
            "failed" => SessionState::Failed,
            _ => return None,
        })
    }
}

/// The parts of a session fixed at creation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSpec {
    pub id: String,
    pub prompt_ids: Vec<u32>,
    /// The request's parameters as the router validated them, every default
    /// filled in: what the token decoder runs and a migration runs again.
    pub parameters: blockserve_proto::v1::GenerationParameters,
    pub created_at_ms: u64,
}

/// Which instances serve a session now. A migration replaces it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Assignment {
    /// Address of the token decoder that drives the session.
    pub token_decoder: String,
    /// Its instance id (unique per process start), so a follower can tell a
    /// dead token decoder from a new process on the same address.
    pub token_decoder_id: String,
    pub block_decoder: String,
}

/// Fencing token of a session's assignment: 0 at creation, one more at every
/// migration. Every write a token decoder makes carries the epoch it was given
/// and is refused once the session moved on, so a token decoder that was
/// thought dead and comes back cannot overwrite its successor's progress.
pub type Epoch = u64;

/// Generated tokens to record at `offset` of a session's output.
#[derive(Debug, Clone, PartialEq)]
pub struct Append {
    pub id: String,
    pub epoch: Epoch,
    /// Tokens the session had recorded before these. A write that was applied
    /// already (its reply lost, then retried) is recognised and not repeated.
    pub offset: usize,
    pub tokens: Vec<u32>,
}

/// Whether a fenced write took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Applied,
    /// Refused: the session is final, gone, or assigned to a newer epoch.
    Fenced,
}

/// What [`crate::SessionStore::reassign`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Reassigned {
    /// The session now belongs to the new assignment under `epoch`; `tokens`
    /// is its whole output so far (what the new token decoder resumes after).
    Moved { epoch: Epoch, migrations: u32, tokens: Vec<u32> },
    /// It is final already; nothing changed.
    Final,
    /// Someone else moved it first (the epoch was not the expected one).
    Stale,
    /// No such session (unknown or expired).
    Missing,
}

/// Everything known about a session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub spec: SessionSpec,
    pub assignment: Assignment,
    pub epoch: Epoch,
    /// How many times it moved to another token or block decoder.
    pub migrations: u32,
    pub state: SessionState,
    /// Why it ended (`eos`, `length`, `stop`, `cancelled`, `error`), once final.
    pub finish_reason: Option<String>,
    pub error: Option<String>,
    pub updated_at_ms: u64,
    pub first_token_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub generated: usize,
    /// Prompt blocks the block decoder found in its prefix cache (latest start).
    pub reused_prompt_blocks: u32,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

//! The Redis store. Keys (under a configurable prefix, default `blockserve:`):
//!
//! - `inst:{tier}:{id}`: JSON of the instance, expiring with its lease;
//!   `insts:{tier}`: set of registered ids (stale ids are dropped on listing);
//! - `sess:{id}`: hash with `spec` (JSON), `state`, `finish_reason`, `error`,
//!   `updated_at_ms`, `first_token_at_ms`, `finished_at_ms`;
//!   `sess:{id}:tokens`: list of generated token ids.
//!
//! State changes run as Lua scripts so a final state is never overwritten, whichever
//! tier gets there first.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::{now_ms, InstanceInfo, Outcome, Result, SessionRecord, SessionSpec, SessionState, SessionStore, StoreError, Tier};

const FINAL: &str = "local s = redis.call('HGET', KEYS[1], 'state') \
    if s == 'finished' or s == 'cancelled' or s == 'failed' or s == false then return 0 end";

/// A small pool of multiplexed, auto-reconnecting connections, used round-robin:
/// each connection pipelines many concurrent commands, and several keep one slow
/// reply from delaying everything behind it.
#[derive(Clone)]
pub struct RedisStore {
    pool: std::sync::Arc<Vec<ConnectionManager>>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    prefix: String,
}

/// Connections per process unless told otherwise.
pub const DEFAULT_POOL_SIZE: usize = 4;

impl RedisStore {
    /// Connect to `url` (e.g. `redis://127.0.0.1:6379`) with the default pool size.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self> {
        Self::connect_pool(url, prefix, DEFAULT_POOL_SIZE).await
    }

    pub async fn connect_pool(url: &str, prefix: &str, size: usize) -> Result<Self> {
        let client = redis::Client::open(url).map_err(|e| StoreError::Unavailable(format!("{url}: {e}")))?;
        let mut pool = Vec::with_capacity(size.max(1));
        for _ in 0..size.max(1) {
            pool.push(ConnectionManager::new(client.clone()).await.map_err(|e| StoreError::Unavailable(format!("{url}: {e}")))?);
        }
        Ok(Self { pool: std::sync::Arc::new(pool), next: Default::default(), prefix: prefix.to_string() })
    }

    fn conn(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.pool.len();
        self.pool[i].clone()
    }

    fn inst_key(&self, tier: Tier, id: &str) -> String {
        format!("{}inst:{}:{id}", self.prefix, tier.as_str())
    }
    fn insts_key(&self, tier: Tier) -> String {
        format!("{}insts:{}", self.prefix, tier.as_str())
    }
    fn sess_key(&self, id: &str) -> String {
        format!("{}sess:{id}", self.prefix)
    }
    fn tokens_key(&self, id: &str) -> String {
        format!("{}sess:{id}:tokens", self.prefix)
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

#[async_trait::async_trait]
impl SessionStore for RedisStore {
    async fn register(&self, info: &InstanceInfo, ttl: Duration) -> Result<()> {
        let mut c = self.conn();
        let json = serde_json::to_string(info).map_err(corrupt)?;
        redis::pipe()
            .set_options(self.inst_key(info.tier, &info.id), json, redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ttl.as_millis() as u64)))
            .ignore()
            .sadd(self.insts_key(info.tier), &info.id)
            .ignore()
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    async fn deregister(&self, tier: Tier, id: &str) -> Result<()> {
        let mut c = self.conn();
        redis::pipe().del(self.inst_key(tier, id)).ignore().srem(self.insts_key(tier), id).ignore().query_async::<()>(&mut c).await?;
        Ok(())
    }

    async fn instances(&self, tier: Tier) -> Result<Vec<InstanceInfo>> {
        let mut c = self.conn();
        let ids: Vec<String> = c.smembers(self.insts_key(tier)).await?;
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let keys: Vec<String> = ids.iter().map(|id| self.inst_key(tier, id)).collect();
        let vals: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
        let mut out = Vec::new();
        for (id, v) in ids.iter().zip(vals) {
            match v {
                Some(json) => out.push(serde_json::from_str(&json).map_err(corrupt)?),
                // The lease expired: forget the id too.
                None => c.srem::<_, _, ()>(self.insts_key(tier), id).await?,
            }
        }
        Ok(out)
    }

    async fn create_session(&self, spec: &SessionSpec) -> Result<bool> {
        let mut c = self.conn();
        let json = serde_json::to_string(spec).map_err(corrupt)?;
        let script = redis::Script::new(
            "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end \
             redis.call('HSET', KEYS[1], 'spec', ARGV[1], 'state', 'queued', 'updated_at_ms', ARGV[2]) return 1",
        );
        let created: i32 = script.key(self.sess_key(&spec.id)).arg(json).arg(now_ms()).invoke_async(&mut c).await?;
        Ok(created == 1)
    }

    async fn session(&self, id: &str) -> Result<Option<SessionRecord>> {
        let mut c = self.conn();
        let (h, generated): (std::collections::HashMap<String, String>, usize) =
            redis::pipe().hgetall(self.sess_key(id)).llen(self.tokens_key(id)).query_async(&mut c).await?;
        let Some(spec) = h.get("spec") else {
            return Ok(None);
        };
        let num = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok());
        Ok(Some(SessionRecord {
            spec: serde_json::from_str(spec).map_err(corrupt)?,
            state: h.get("state").and_then(|s| SessionState::parse(s)).ok_or_else(|| corrupt(format!("session {id}: bad state")))?,
            finish_reason: h.get("finish_reason").cloned(),
            error: h.get("error").cloned().filter(|e| !e.is_empty()),
            updated_at_ms: num("updated_at_ms").unwrap_or(0),
            first_token_at_ms: num("first_token_at_ms"),
            finished_at_ms: num("finished_at_ms"),
            generated,
        }))
    }

    async fn set_progress(&self, id: &str, state: SessionState) -> Result<()> {
        let mut c = self.conn();
        let script = redis::Script::new(&format!("{FINAL} redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_at_ms', ARGV[2]) return 1"));
        script.key(self.sess_key(id)).arg(state.as_str()).arg(now_ms()).invoke_async::<i32>(&mut c).await?;
        Ok(())
    }

    async fn append_tokens(&self, id: &str, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Ok(());
        }
        let mut c = self.conn();
        let now = now_ms();
        redis::pipe()
            .rpush(self.tokens_key(id), tokens)
            .ignore()
            .hset(self.sess_key(id), "updated_at_ms", now)
            .ignore()
            .hset_nx(self.sess_key(id), "first_token_at_ms", now)
            .ignore()
            .query_async::<()>(&mut c)
            .await?;
        Ok(())
    }

    async fn append_many(&self, batch: &[(String, Vec<u32>)]) -> Result<()> {
        if batch.iter().all(|(_, t)| t.is_empty()) {
            return Ok(());
        }
        let now = now_ms();
        let mut pipe = redis::pipe();
        for (id, tokens) in batch.iter().filter(|(_, t)| !t.is_empty()) {
            pipe.rpush(self.tokens_key(id), tokens)
                .ignore()
                .hset(self.sess_key(id), "updated_at_ms", now)
                .ignore()
                .hset_nx(self.sess_key(id), "first_token_at_ms", now)
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await?;
        Ok(())
    }

    async fn tokens(&self, id: &str, from: usize) -> Result<Vec<u32>> {
        let mut c = self.conn();
        Ok(c.lrange(self.tokens_key(id), from as isize, -1).await?)
    }

    async fn finish(&self, id: &str, outcome: &Outcome, ttl: Duration) -> Result<bool> {
        let mut c = self.conn();
        let script = redis::Script::new(&format!(
            "{FINAL} redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finish_reason', ARGV[2], 'error', ARGV[3], \
             'updated_at_ms', ARGV[4], 'finished_at_ms', ARGV[4]) \
             redis.call('PEXPIRE', KEYS[1], ARGV[5]) redis.call('PEXPIRE', KEYS[2], ARGV[5]) return 1"
        ));
        let set: i32 = script
            .key(self.sess_key(id))
            .key(self.tokens_key(id))
            .arg(outcome.state.as_str())
            .arg(&outcome.finish_reason)
            .arg(outcome.error.clone().unwrap_or_default())
            .arg(now_ms())
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(set == 1)
    }
}

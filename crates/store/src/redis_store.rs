//! The Redis store. Keys (under a configurable prefix, default `blockserve:`):
//!
//! - `inst:{tier}:{id}`: JSON of the instance, expiring with its lease;
//!   `insts:{tier}`: set of registered ids (stale ids are dropped on listing);
//! - `sess:{id}`: hash with `spec` (JSON), `state`, the assignment (`td`,
//!   `td_id`, `bd`), its fencing `epoch`, `migrations`, `finish_reason`, `error`,
//!   `updated_at_ms`, `first_token_at_ms`, `finished_at_ms`, `reused_blocks`;
//!   `sess:{id}:out`: the generated token ids, packed as 4-byte little-endian
//!   words in one string (an append is one `APPEND` of one argument however
//!   many tokens it carries: Redis does constant work per session and batch,
//!   where a list took one element, and one argument to parse, per token).
//!
//! State changes run as Lua scripts so a final state is never overwritten, whichever
//! tier gets there first, and a write of a stale epoch is refused.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Cmd, Pipeline, RedisFuture, Value};

use crate::{
    now_ms, Append, Assignment, Epoch, InstanceInfo, Outcome, Reassigned, Result, SessionRecord, SessionSpec, SessionState, SessionStore, StoreError, Tier,
    Write,
};

/// Lua: true when the session `KEYS[1]` may take a write of epoch `e` (any
/// epoch when `e` is empty): it exists, is not final, and is at that epoch.
const WRITABLE: &str = "local function writable(key, e) \
    local h = redis.call('HMGET', key, 'state', 'epoch') \
    if h[1] == false or h[1] == 'finished' or h[1] == 'cancelled' or h[1] == 'failed' then return false end \
    return e == '' or h[2] == e end ";

/// Appends of a batch: KEYS are (session, tokens) pairs; ARGV is `now`, then
/// per entry its epoch, offset (in tokens) and tokens (packed). Returns per
/// entry 1 (applied, now or by an earlier try), 0 (fenced), or -1-n for a gap
/// (n tokens recorded, fewer than the offset). It runs for every session's
/// every block, so it does the least it can: the fencing check, the length
/// check and the append; the first append also stamps the first token's time.
/// (`updated_at_ms` moves with state changes, the first token and the end,
/// not with every block.)
static APPEND: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        "{WRITABLE} local out = {{}} local a = 2 \
        for i = 1, #KEYS, 2 do \
          local sk, tk = KEYS[i], KEYS[i + 1] \
          local e, off, packed = ARGV[a], 4 * tonumber(ARGV[a + 1]), ARGV[a + 2] \
          a = a + 3 \
          if not writable(sk, e) then out[#out + 1] = 0 else \
            local n = redis.call('STRLEN', tk) \
            if n >= off + #packed then out[#out + 1] = 1 \
            elseif n ~= off then out[#out + 1] = -1 - n / 4 \
            else \
              redis.call('APPEND', tk, packed) \
              if off == 0 and #packed > 0 then redis.call('HSET', sk, 'first_token_at_ms', ARGV[1], 'updated_at_ms', ARGV[1]) end \
              out[#out + 1] = 1 end end end \
        return out"
    ))
});

/// Token ids as the store keeps them (4-byte little-endian words).
fn pack(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn unpack(bytes: &[u8]) -> Result<Vec<u32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(corrupt(format!("a session's output is {} bytes, not whole 4-byte tokens", bytes.len())));
    }
    Ok(bytes.chunks_exact(4).map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]])).collect())
}

static PROGRESS: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        "{WRITABLE} if not writable(KEYS[1], ARGV[1]) then return 0 end \
        redis.call('HSET', KEYS[1], 'state', ARGV[2], 'updated_at_ms', ARGV[3]) return 1"
    ))
});

static MOVE_BD: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        "{WRITABLE} if not writable(KEYS[1], ARGV[1]) then return 0 end \
        redis.call('HSET', KEYS[1], 'bd', ARGV[2], 'updated_at_ms', ARGV[3]) redis.call('HINCRBY', KEYS[1], 'migrations', 1) return 1"
    ))
});

static REUSED: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        "{WRITABLE} if not writable(KEYS[1], ARGV[1]) then return 0 end \
        redis.call('HSET', KEYS[1], 'reused_blocks', ARGV[2]) return 1"
    ))
});

static FINISH: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        "{WRITABLE} if not writable(KEYS[1], ARGV[6]) then return 0 end \
        redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finish_reason', ARGV[2], 'error', ARGV[3], \
          'updated_at_ms', ARGV[4], 'finished_at_ms', ARGV[4]) \
        redis.call('PEXPIRE', KEYS[1], ARGV[5]) redis.call('PEXPIRE', KEYS[2], ARGV[5]) \
        redis.call('HDEL', KEYS[3], ARGV[7]) return 1"
    ))
});

/// The unfinished sessions (hash KEYS[1]: id -> token decoder's instance id)
/// as a flat id, instance list, less entries whose record is gone (deleted by
/// hand or evicted); ARGV[1] is the session key prefix. (It builds keys in the
/// script, which a single Redis allows and Redis Cluster would not.)
static UNFINISHED: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "local all = redis.call('HGETALL', KEYS[1]) local out = {} \
        for i = 1, #all, 2 do \
          if redis.call('EXISTS', ARGV[1] .. all[i]) == 1 then out[#out + 1] = all[i] out[#out + 1] = all[i + 1] \
          else redis.call('HDEL', KEYS[1], all[i]) end end \
        return out",
    )
});

/// KEYS: session, tokens, unfinished. ARGV: expected epoch, td, td_id, bd,
/// now, id, the known output (packed). Returns
/// {1, epoch, migrations} when moved, {0} final, {-1} stale, {-2} missing.
static REASSIGN: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "local h = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'migrations') \
        if h[1] == false then return {-2} end \
        if h[1] == 'finished' or h[1] == 'cancelled' or h[1] == 'failed' then return {0} end \
        if h[2] ~= ARGV[1] then return {-1} end \
        local n = redis.call('STRLEN', KEYS[2]) \
        if #ARGV[7] > n then redis.call('APPEND', KEYS[2], string.sub(ARGV[7], n + 1)) end \
        local e = tonumber(h[2]) + 1 local m = tonumber(h[3] or '0') + 1 \
        redis.call('HSET', KEYS[1], 'epoch', e, 'migrations', m, 'td', ARGV[2], 'td_id', ARGV[3], 'bd', ARGV[4], 'updated_at_ms', ARGV[5]) \
        redis.call('HSET', KEYS[3], ARGV[6], ARGV[3]) \
        return {1, e, m}",
    )
});

/// A small pool of multiplexed, auto-reconnecting connections, used round-robin:
/// each connection pipelines many concurrent commands, and several keep one slow
/// reply from delaying everything behind it.
#[derive(Clone)]
pub struct RedisStore {
    pool: std::sync::Arc<Vec<Retrying>>,
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
            let manager = ConnectionManager::new_with_config(client.clone(), manager_config()).await;
            pool.push(Retrying(manager.map_err(|e| StoreError::Unavailable(format!("{url}: {e}")))?));
        }
        Ok(Self { pool: std::sync::Arc::new(pool), next: Default::default(), prefix: prefix.to_string() })
    }

    fn conn(&self) -> Retrying {
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
        format!("{}sess:{id}:out", self.prefix)
    }
    /// Sessions not final yet: id -> token decoder's instance id.
    fn unfinished_key(&self) -> String {
        format!("{}sessions:unfinished", self.prefix)
    }
}

/// Reconnection and timeouts of each connection. Redis back after a restart
/// is found within half a second (the default backoff grows to 3.2 s); a
/// store that does not answer fails calls instead of holding them for ever.
fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500))
        .set_number_of_retries(4)
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(10)))
}

/// A connection that sends a command a second time when the first try finds
/// the connection dropped. After Redis restarts, every pooled connection is
/// dead until a command fails on it (the manager then reconnects); without the
/// second try that first command on each connection fails with "broken pipe",
/// although Redis is back. Every write of the store is safe to repeat: appends
/// carry their offset and state changes their epoch.
#[derive(Clone)]
struct Retrying(ConnectionManager);

fn dropped<T>(r: &redis::RedisResult<T>) -> bool {
    r.as_ref().is_err_and(|e| e.is_connection_dropped() || e.is_unrecoverable_error())
}

/// A restarted Redis that reads its data back (an append-only file) answers
/// LOADING, having run nothing, until it is done: the command is sent again
/// every LOADING_POLL for up to LOADING_WAIT. The answer comes as an error,
/// or, for a pipeline, as error values among the replies (which the pipeline
/// turns into an error only after this layer).
fn loading<T: Replies>(r: &redis::RedisResult<T>) -> bool {
    match r {
        Err(e) => e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading),
        Ok(v) => v.any_loading(),
    }
}

trait Replies {
    fn any_loading(&self) -> bool;
}

impl Replies for Value {
    fn any_loading(&self) -> bool {
        matches!(self, Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::BusyLoading))
    }
}

impl Replies for Vec<Value> {
    fn any_loading(&self) -> bool {
        self.iter().any(Value::any_loading)
    }
}
const LOADING_WAIT: Duration = Duration::from_secs(10);
const LOADING_POLL: Duration = Duration::from_millis(50);

impl Retrying {
    /// `send` once, again if the connection was dropped, and again while
    /// Redis is loading. (Clones of the manager share its connection.)
    async fn send<T: Replies, F>(&self, send: impl Fn(ConnectionManager) -> F) -> redis::RedisResult<T>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let mut r = send(self.0.clone()).await;
        if dropped(&r) {
            r = send(self.0.clone()).await;
        }
        let start = std::time::Instant::now();
        while loading(&r) && start.elapsed() < LOADING_WAIT {
            tokio::time::sleep(LOADING_POLL).await;
            r = send(self.0.clone()).await;
        }
        r
    }
}

impl ConnectionLike for Retrying {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.send(move |mut c| async move { c.req_packed_command(cmd).await }))
    }

    fn req_packed_commands<'a>(&'a mut self, cmd: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(self.send(move |mut c| async move { c.req_packed_commands(cmd, offset, count).await }))
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
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

    async fn create_session(&self, spec: &SessionSpec, to: &Assignment) -> Result<bool> {
        let mut c = self.conn();
        let json = serde_json::to_string(spec).map_err(corrupt)?;
        let script = redis::Script::new(
            "if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end \
             redis.call('HSET', KEYS[1], 'spec', ARGV[1], 'state', 'queued', 'updated_at_ms', ARGV[2], 'epoch', 0, 'migrations', 0, \
               'td', ARGV[3], 'td_id', ARGV[4], 'bd', ARGV[5]) redis.call('HSET', KEYS[2], ARGV[6], ARGV[4]) return 1",
        );
        let created: i32 = script
            .key(self.sess_key(&spec.id))
            .key(self.unfinished_key())
            .arg(json)
            .arg(now_ms())
            .arg(&to.token_decoder)
            .arg(&to.token_decoder_id)
            .arg(&to.block_decoder)
            .arg(&spec.id)
            .invoke_async(&mut c)
            .await?;
        Ok(created == 1)
    }

    async fn session(&self, id: &str) -> Result<Option<SessionRecord>> {
        let mut c = self.conn();
        let (h, bytes): (std::collections::HashMap<String, String>, usize) =
            redis::pipe().hgetall(self.sess_key(id)).strlen(self.tokens_key(id)).query_async(&mut c).await?;
        let generated = bytes / 4;
        let Some(spec) = h.get("spec") else {
            return Ok(None);
        };
        let num = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok());
        let text = |k: &str| h.get(k).cloned().unwrap_or_default();
        Ok(Some(SessionRecord {
            spec: serde_json::from_str(spec).map_err(corrupt)?,
            assignment: Assignment { token_decoder: text("td"), token_decoder_id: text("td_id"), block_decoder: text("bd") },
            epoch: num("epoch").unwrap_or(0),
            migrations: num("migrations").unwrap_or(0) as u32,
            state: h.get("state").and_then(|s| SessionState::parse(s)).ok_or_else(|| corrupt(format!("session {id}: bad state")))?,
            finish_reason: h.get("finish_reason").cloned(),
            error: h.get("error").cloned().filter(|e| !e.is_empty()),
            updated_at_ms: num("updated_at_ms").unwrap_or(0),
            first_token_at_ms: num("first_token_at_ms"),
            finished_at_ms: num("finished_at_ms"),
            generated,
            reused_prompt_blocks: num("reused_blocks").unwrap_or(0) as u32,
        }))
    }

    async fn set_progress(&self, id: &str, epoch: Epoch, state: SessionState) -> Result<Write> {
        let mut c = self.conn();
        let set: i32 = PROGRESS.key(self.sess_key(id)).arg(epoch.to_string()).arg(state.as_str()).arg(now_ms()).invoke_async(&mut c).await?;
        Ok(if set == 1 { Write::Applied } else { Write::Fenced })
    }

    async fn set_block_decoder(&self, id: &str, epoch: Epoch, address: &str) -> Result<Write> {
        let mut c = self.conn();
        let set: i32 = MOVE_BD.key(self.sess_key(id)).arg(epoch.to_string()).arg(address).arg(now_ms()).invoke_async(&mut c).await?;
        Ok(if set == 1 { Write::Applied } else { Write::Fenced })
    }

    async fn set_reused_blocks(&self, id: &str, epoch: Epoch, blocks: u32) -> Result<Write> {
        let mut c = self.conn();
        let set: i32 = REUSED.key(self.sess_key(id)).arg(epoch.to_string()).arg(blocks).invoke_async(&mut c).await?;
        Ok(if set == 1 { Write::Applied } else { Write::Fenced })
    }

    async fn append_many(&self, batch: &[Append]) -> Result<Vec<Write>> {
        if batch.is_empty() {
            return Ok(vec![]);
        }
        let mut inv = APPEND.prepare_invoke();
        inv.arg(now_ms());
        for a in batch {
            inv.key(self.sess_key(&a.id)).key(self.tokens_key(&a.id));
            inv.arg(a.epoch.to_string()).arg(a.offset).arg(pack(&a.tokens));
        }
        let codes: Vec<i64> = inv.invoke_async(&mut self.conn()).await?;
        batch
            .iter()
            .zip(codes)
            .map(|(a, code)| match code {
                1 => Ok(Write::Applied),
                0 => Ok(Write::Fenced),
                n => Err(crate::memory::gap(a, (-1 - n) as usize)),
            })
            .collect()
    }

    async fn tokens(&self, id: &str, from: usize) -> Result<Vec<u32>> {
        let mut c = self.conn();
        let bytes: Vec<u8> = c.getrange(self.tokens_key(id), 4 * from as isize, -1).await?;
        unpack(&bytes)
    }

    async fn finish(&self, id: &str, epoch: Option<Epoch>, outcome: &Outcome, ttl: Duration) -> Result<bool> {
        let mut c = self.conn();
        let set: i32 = FINISH
            .key(self.sess_key(id))
            .key(self.tokens_key(id))
            .key(self.unfinished_key())
            .arg(outcome.state.as_str())
            .arg(&outcome.finish_reason)
            .arg(outcome.error.clone().unwrap_or_default())
            .arg(now_ms())
            .arg(ttl.as_millis() as u64)
            .arg(epoch.map(|e| e.to_string()).unwrap_or_default())
            .arg(id)
            .invoke_async(&mut c)
            .await?;
        Ok(set == 1)
    }

    async fn reassign(&self, id: &str, expected: Epoch, to: &Assignment, known: &[u32]) -> Result<Reassigned> {
        let mut c = self.conn();
        let reply: Vec<i64> = REASSIGN
            .key(self.sess_key(id))
            .key(self.tokens_key(id))
            .key(self.unfinished_key())
            .arg(expected.to_string())
            .arg(&to.token_decoder)
            .arg(&to.token_decoder_id)
            .arg(&to.block_decoder)
            .arg(now_ms())
            .arg(id)
            .arg(pack(known))
            .invoke_async(&mut c)
            .await?;
        Ok(match reply.as_slice() {
            [1, e, m] => Reassigned::Moved { epoch: *e as Epoch, migrations: *m as u32, tokens: self.tokens(id, 0).await? },
            [0] => Reassigned::Final,
            [-1] => Reassigned::Stale,
            [-2] => Reassigned::Missing,
            other => return Err(corrupt(format!("reassign {id}: unexpected reply {other:?}"))),
        })
    }

    async fn unfinished(&self) -> Result<Vec<(String, String)>> {
        let prefix = format!("{}sess:", self.prefix);
        let flat: Vec<String> = UNFINISHED.key(self.unfinished_key()).arg(prefix).invoke_async(&mut self.conn()).await?;
        Ok(flat.chunks_exact(2).map(|p| (p[0].clone(), p[1].clone())).collect())
    }
}

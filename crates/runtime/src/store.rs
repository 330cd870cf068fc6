//! Choosing the session store from flags. A Redis store's calls are timed in
//! the `blockserve_store_round_trip_seconds` metric.

use std::sync::Arc;
use std::time::Duration;

use blockserve_store::{
    Append, Assignment, Epoch, InstanceInfo, MemoryStore, Outcome, Reassigned, RedisStore, SessionRecord, SessionSpec, SessionState, SessionStore, Tier, Write,
};

#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Redis URL of the shared session store (e.g. redis://127.0.0.1:6379). Without
    /// it the store is in-process: only tiers in the same process (`blockserve up`)
    /// see each other.
    #[arg(long, visible_alias = "redis", env = "BLOCKSERVE_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Connections to Redis per process (each one multiplexed).
    #[arg(long, env = "BLOCKSERVE_REDIS_CONNECTIONS", default_value_t = blockserve_store::redis_store::DEFAULT_POOL_SIZE)]
    pub redis_connections: usize,
    /// Key prefix in Redis, so several deployments can share one server.
    #[arg(long, env = "BLOCKSERVE_REDIS_PREFIX", default_value = "blockserve:")]
    pub redis_prefix: String,
}

impl StoreArgs {
    pub async fn connect(&self) -> anyhow::Result<Arc<dyn SessionStore>> {
        Ok(match &self.redis_url {
            Some(url) => Arc::new(Timed(RedisStore::connect_pool(url, &self.redis_prefix, self.redis_connections).await?)),
            None => {
                tracing::warn!("no --redis-url: using an in-process session store (single-process deployments only)");
                Arc::new(MemoryStore::new())
            }
        })
    }
}

/// A store whose every call is timed in `blockserve_store_round_trip_seconds`
/// and traced as a `redis.<op>` span.
struct Timed<S>(S);

async fn timed<T>(op: &str, call: impl std::future::Future<Output = blockserve_store::Result<T>>) -> blockserve_store::Result<T> {
    use tracing::Instrument;
    let t0 = std::time::Instant::now();
    let out = call.instrument(tracing::info_span!("store", otel.name = %format!("redis.{op}"), otel.kind = "client")).await;
    let outcome = if out.is_ok() { "ok" } else { "error" };
    crate::metrics::METRICS.store_seconds.with_label_values(&[op, outcome]).observe(t0.elapsed().as_secs_f64());
    out
}

#[async_trait::async_trait]
impl<S: SessionStore> SessionStore for Timed<S> {
    async fn register(&self, info: &InstanceInfo, ttl: Duration) -> blockserve_store::Result<()> {
        timed("register", self.0.register(info, ttl)).await
    }
    async fn deregister(&self, tier: Tier, id: &str) -> blockserve_store::Result<()> {
        timed("deregister", self.0.deregister(tier, id)).await
    }
    async fn instances(&self, tier: Tier) -> blockserve_store::Result<Vec<InstanceInfo>> {
        timed("instances", self.0.instances(tier)).await
    }
    async fn create_session(&self, spec: &SessionSpec, to: &Assignment) -> blockserve_store::Result<bool> {
        timed("create_session", self.0.create_session(spec, to)).await
    }
    async fn session(&self, id: &str) -> blockserve_store::Result<Option<SessionRecord>> {
        timed("session", self.0.session(id)).await
    }
    async fn set_progress(&self, id: &str, epoch: Epoch, state: SessionState) -> blockserve_store::Result<Write> {
        timed("set_progress", self.0.set_progress(id, epoch, state)).await
    }
    async fn set_block_decoder(&self, id: &str, epoch: Epoch, address: &str) -> blockserve_store::Result<Write> {
        timed("set_block_decoder", self.0.set_block_decoder(id, epoch, address)).await
    }
    async fn set_reused_blocks(&self, id: &str, epoch: Epoch, blocks: u32) -> blockserve_store::Result<Write> {
        timed("set_reused_blocks", self.0.set_reused_blocks(id, epoch, blocks)).await
    }
    async fn append_many(&self, batch: &[Append]) -> blockserve_store::Result<Vec<Write>> {
        timed("append_many", self.0.append_many(batch)).await
    }
    async fn tokens(&self, id: &str, from: usize) -> blockserve_store::Result<Vec<u32>> {
        timed("tokens", self.0.tokens(id, from)).await
    }
    async fn finish(&self, id: &str, epoch: Option<Epoch>, outcome: &Outcome, ttl: Duration) -> blockserve_store::Result<bool> {
        timed("finish", self.0.finish(id, epoch, outcome, ttl)).await
    }
    async fn reassign(&self, id: &str, expected: Epoch, to: &Assignment, known: &[u32]) -> blockserve_store::Result<Reassigned> {
        timed("reassign", self.0.reassign(id, expected, to, known)).await
    }
    async fn unfinished(&self) -> blockserve_store::Result<Vec<(String, String)>> {
        timed("unfinished", self.0.unfinished()).await
    }
}

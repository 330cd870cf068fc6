//! Choosing the session store from flags.

use std::sync::Arc;

use blockserve_store::{MemoryStore, RedisStore, SessionStore};

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
            Some(url) => Arc::new(RedisStore::connect_pool(url, &self.redis_prefix, self.redis_connections).await?),
            None => {
                tracing::warn!("no --redis-url: using an in-process session store (single-process deployments only)");
                Arc::new(MemoryStore::new())
            }
        })
    }
}

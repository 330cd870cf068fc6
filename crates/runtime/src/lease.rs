//! Instance registration: every block decoder and token decoder publishes its
//! address and load under a lease it renews; a dead process disappears when the
//! lease runs out.

use std::sync::Arc;
use std::time::Duration;

use blockserve_store::{now_ms, InstanceInfo, SessionStore, Tier};
use tokio::sync::watch;

/// What an instance reports about its load at each renewal.
pub trait LoadReport: Send + Sync + 'static {
    /// (active sessions, queued work, free capacity in sessions)
    fn load(&self) -> (u32, u32, u32);

    /// The prefix cache's size when it last evicted (block decoders; 0: none).
    fn cache_limit_pages(&self) -> u32 {
        0
    }
}

pub struct Lease {
    pub id: String,
    pub tier: Tier,
    pub address: String,
    pub ttl: Duration,
}

impl Lease {
    pub fn new(tier: Tier, address: String, ttl: Duration) -> Self {
        Self { id: format!("{}-{}", tier.as_str(), uuid::Uuid::new_v4().simple()), tier, address, ttl }
    }

    fn info(&self, load: &dyn LoadReport) -> InstanceInfo {
        let (active, queued, free) = load.load();
        InstanceInfo {
            id: self.id.clone(),
            tier: self.tier,
            address: self.address.clone(),
            active_sessions: active,
            queued,
            free_capacity: free,
            updated_at_ms: now_ms(),
            cache_limit_pages: load.cache_limit_pages(),
        }
    }

    /// Renew every ttl/3 until `stop` turns true, then deregister.
    pub async fn run(self, store: Arc<dyn SessionStore>, load: Arc<dyn LoadReport>, mut stop: watch::Receiver<bool>) {
        let every = self.ttl / 3;
        loop {
            if let Err(e) = store.register(&self.info(load.as_ref()), self.ttl).await {
                tracing::warn!(error = %e, "lease renewal failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        if let Err(e) = store.deregister(self.tier, &self.id).await {
            tracing::warn!(error = %e, "deregistration failed");
        }
    }
}

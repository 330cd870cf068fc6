//! How far the session tasks run behind the engine, and what they wait on,
//! logged when the process stops. A block is settled on the model thread and
//! handed to its session's task; the time until the task takes it is the
//! task's lag. Lag that grows to `--max-unread-blocks` holds the session's
//! next block back, so these figures say why blocks were held back: the tasks'
//! share of the runtime's threads (lag without waits), the store's write
//! queue (`store`), or a router reading slowly (`relay`, `router`). The
//! counts are the process's: the token decoders of one `blockserve up` share
//! them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// Upper bounds of the lag histogram's buckets, in milliseconds (the last
/// bucket takes the rest).
const BOUNDS_MS: [u64; 7] = [1, 2, 5, 10, 20, 50, 100];

#[derive(Default)]
pub struct Lag {
    /// Blocks taken by tasks, their summed and largest lag.
    blocks: AtomicU64,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
    buckets: [AtomicU64; BOUNDS_MS.len() + 1],
    /// Time tasks waited for room in the store's write queue.
    store_ns: AtomicU64,
    /// Time tasks waited for room in their relay stream's outbox.
    relay_ns: AtomicU64,
    /// Time relay writers waited for a router to take a message, and messages.
    router_ns: AtomicU64,
    router_messages: AtomicU64,
}

pub static LAG: LazyLock<Lag> = LazyLock::new(Lag::default);

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

impl Lag {
    /// A task took a block settled at `at`.
    pub fn taken(&self, at: Instant) {
        let d = ns(at.elapsed());
        self.blocks.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d, Ordering::Relaxed);
        self.max_ns.fetch_max(d, Ordering::Relaxed);
        let i = BOUNDS_MS.iter().position(|&b| d <= b * 1_000_000).unwrap_or(BOUNDS_MS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn store_wait(&self, since: Instant) {
        self.store_ns.fetch_add(ns(since.elapsed()), Ordering::Relaxed);
    }

    pub fn relay_wait(&self, since: Instant) {
        self.relay_ns.fetch_add(ns(since.elapsed()), Ordering::Relaxed);
    }

    pub fn router_wait(&self, since: Instant) {
        self.router_ns.fetch_add(ns(since.elapsed()), Ordering::Relaxed);
        self.router_messages.fetch_add(1, Ordering::Relaxed);
    }

    /// One log line with everything above.
    pub fn log(&self) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let blocks = get(&self.blocks);
        let ms = |n: u64| format!("{:.2}", n as f64 / 1e6);
        let secs = |n: u64| format!("{:.2}", n as f64 / 1e9);
        let mut hist = String::new();
        for (i, b) in self.buckets.iter().enumerate() {
            let label = BOUNDS_MS.get(i).map_or_else(|| format!(">{}", BOUNDS_MS[BOUNDS_MS.len() - 1]), |b| format!("<={b}"));
            hist.push_str(&format!("{}{label}ms:{}", if i == 0 { "" } else { " " }, get(b)));
        }
        tracing::info!(
            blocks,
            mean_ms = ms(get(&self.sum_ns) / blocks.max(1)),
            max_ms = ms(get(&self.max_ns)),
            histogram = %hist,
            store_wait_s = secs(get(&self.store_ns)),
            relay_wait_s = secs(get(&self.relay_ns)),
            router_wait_s = secs(get(&self.router_ns)),
            relay_messages = get(&self.router_messages),
            "session task lag behind the engine"
        );
    }
}

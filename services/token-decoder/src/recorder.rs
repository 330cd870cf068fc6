//! Write-behind of a token decoder's session progress to the store.
//!
//! Sessions queue their writes (state changes, each block's tokens, the final
//! state). A block's tokens are queued and the session goes on at once: its
//! stream runs ahead of the store by at most the batch being written and the
//! pause between batches of appends (`--store-append-every-ms`, 100 ms by
//! default), and writing never sets the pace of generation. A state change
//! and the final state wait for their write while the store answers promptly,
//! so a session recorded as finished has all its tokens recorded. Once a batch
//! fails, or takes longer than [`STALLED`], the store counts as unhealthy
//! until a batch succeeds, and nothing waits: those already waiting are
//! released, and a session keeps generating and streaming while the store is
//! down or slow.
//!
//! What runs ahead is never lost to a client: a migration starts from what the
//! router relayed (it writes that output first), and a client that resumes
//! through another router waits for the store to catch up; greedy and seeded
//! output regenerated after a token decoder's death is the same. One writer task applies what is queued in
//! batches, one store round trip for every session's tokens, and keeps a
//! session's writes in order. When the store is unreachable it keeps the batch
//! and retries with backoff, so everything is written once the store is back
//! (appends carry their offset, so a retried write is never applied twice).
//!
//! The queue is bounded (`capacity` writes). When it is full, a session's next
//! write waits for room: the session stops consuming blocks, the engine holds
//! its next block back, and its generation pauses until the store returns.
//! Nothing is dropped.
//!
//! A write refused by fencing (the session was migrated away, or is final)
//! flags the session: its task stops without writing anything more.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use blockserve_runtime::metrics::METRICS;
use blockserve_store::{Append, Epoch, Outcome, SessionState, SessionStore, StoreError, Write};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

/// Default of the most writes that may wait for the store.
pub const DEFAULT_CAPACITY: usize = 65_536;

enum Op {
    Progress { id: String, epoch: Epoch, state: SessionState },
    Append(Append),
    MovedTo { id: String, epoch: Epoch, block_decoder: String },
    Reused { id: String, epoch: Epoch, blocks: u32 },
    Finish { id: String, epoch: Epoch, outcome: Outcome, ttl: Duration },
}

/// A batch's appends, a session's blocks joined into one entry when they
/// continue each other: the blocks that queued while the last batch was being
/// written cost one entry of the next instead of one each. (The store's work
/// per batch then grows with sessions, not with sessions times blocks: the
/// slower it is, the more each entry carries.)
#[derive(Default)]
struct Appends<'a> {
    list: Vec<Append>,
    /// Each session's entry in `list`.
    at: HashMap<&'a str, usize>,
}

impl<'a> Appends<'a> {
    fn push(&mut self, a: &'a Append) {
        if let Some(last) = self.at.get(a.id.as_str()).map(|&i| &mut self.list[i]) {
            if last.epoch == a.epoch && last.offset + last.tokens.len() == a.offset {
                last.tokens.extend_from_slice(&a.tokens);
                return;
            }
        }
        self.at.insert(&a.id, self.list.len());
        self.list.push(a.clone());
    }
}

/// A queued write, its room in the queue, and who waits for it.
type Queued = (Op, OwnedSemaphorePermit, oneshot::Sender<()>);

/// Default of the pause between batches of appends, in milliseconds: batches
/// of appends alone start at most this often. Each entry costs the store a
/// fencing check and an append whatever it carries, so a store fed back to
/// back does work per session and batch: at 4,096 sessions and 1.3M tokens/s
/// that kept a Redis 70-80% busy for one token decoder. Paced, an entry
/// carries more blocks and the store's work shrinks with it (at 100 ms that
/// Redis used 2.7-2.9 CPU s per run against 4.8-5.2 at 0 and 20 ms, at the
/// same throughput and latency; docs/performance.md); the store runs behind
/// the streams by at most this much more.
pub const DEFAULT_APPEND_EVERY_MS: u64 = 100;

/// A batch still unanswered after this long marks the store unhealthy: an
/// outage shows as calls that hang (while the connection is rebuilt) before
/// they fail, and sessions must not wait through that.
pub const STALLED: Duration = Duration::from_millis(25);

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::UnboundedSender<Queued>,
    room: Arc<Semaphore>,
    /// False from a failed or stalled batch until one succeeds.
    healthy: Arc<watch::Sender<bool>>,
    /// Sessions whose writes are refused from now on, and the flag each watches.
    fenced: Arc<std::sync::Mutex<HashMap<String, watch::Sender<bool>>>>,
    /// Least time from one batch of appends alone to the next.
    append_every: Duration,
    /// Most writes that may wait (the room's permits).
    capacity: usize,
}

/// A session's handle on the recorder. `fenced` turns true when the store
/// refuses its writes; dropping the handle forgets the session.
pub struct SessionWrites {
    recorder: Recorder,
    id: String,
    epoch: Epoch,
    pub fenced: watch::Receiver<bool>,
}

impl Recorder {
    /// Start the writer task (on the current runtime): at most `capacity`
    /// writes wait, and batches of appends alone start at most every
    /// `append_every`.
    pub fn start(store: Arc<dyn SessionStore>, capacity: usize, append_every: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let capacity = capacity.max(1);
        let room = Arc::new(Semaphore::new(capacity));
        let r = Self { tx, room, healthy: Arc::new(watch::channel(true).0), fenced: Default::default(), append_every, capacity };
        tokio::spawn(r.clone().write(store, rx));
        r
    }

    /// Writes of session `id` under `epoch`.
    pub fn session(&self, id: &str, epoch: Epoch) -> SessionWrites {
        let (flag, fenced) = watch::channel(false);
        self.fenced.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), flag);
        SessionWrites { recorder: self.clone(), id: id.to_string(), epoch, fenced }
    }

    /// Queue `op` (waiting for room when the queue is full), then, when
    /// `wait`, wait for it to be written unless the store is failing.
    async fn queue(&self, op: Op, wait: bool) -> Result<(), StoreError> {
        let stopped = || StoreError::Unavailable("token recorder stopped".into());
        let permit = self.room.clone().acquire_owned().await.map_err(|_| stopped())?;
        METRICS.buffered_writes.inc();
        let (done, written) = oneshot::channel();
        self.tx.send((op, permit, done)).map_err(|_| stopped())?;
        // No timer of its own per write: a batch that takes longer than
        // STALLED turns `healthy` false, which releases every waiter at once.
        let mut healthy = self.healthy.subscribe();
        if wait && *healthy.borrow_and_update() {
            tokio::select! {
                _ = written => {}
                _ = healthy.wait_for(|h| !h) => {}
            }
        }
        Ok(())
    }

    async fn write(self, store: Arc<dyn SessionStore>, mut rx: mpsc::UnboundedReceiver<Queued>) {
        let mut last: Option<tokio::time::Instant> = None;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            drain(&mut rx, &mut batch);
            if let Some(t) = last {
                self.pause(&mut rx, &mut batch, t + self.append_every).await;
            }
            last = Some(tokio::time::Instant::now());
            let n = batch.len();
            let (ops, held): (Vec<Op>, Vec<_>) = batch.into_iter().map(|(op, permit, done)| (op, (permit, done))).unzip();
            let mut backoff = Duration::from_millis(50);
            loop {
                let applied = self.apply(store.as_ref(), &ops);
                tokio::pin!(applied);
                let result = tokio::select! {
                    r = &mut applied => r,
                    _ = tokio::time::sleep(STALLED) => {
                        self.healthy.send_replace(false);
                        applied.await
                    }
                };
                match result {
                    Ok(()) => {
                        self.healthy.send_replace(true);
                        break;
                    }
                    Err(StoreError::Unavailable(e)) => {
                        self.healthy.send_replace(false);
                        tracing::warn!(error = %e, writes = n, "session store unreachable; keeping the writes and retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, writes = n, "session store refused a batch of writes; dropping it");
                        break;
                    }
                }
            }
            METRICS.buffered_writes.sub(n as i64);
            for (_permit, done) in held {
                let _ = done.send(());
            }
        }
    }

    /// Appends alone wait until `due`, gathering more blocks per session; a
    /// write someone waits for (a state change, an end), or a queue half
    /// full, ends the wait.
    async fn pause(&self, rx: &mut mpsc::UnboundedReceiver<Queued>, batch: &mut Vec<Queued>, due: tokio::time::Instant) {
        let is_append = |q: &Queued| matches!(q.0, Op::Append(_));
        let mut appends_only = batch.iter().all(is_append);
        while appends_only && batch.len() < self.capacity / 2 {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => break,
                next = rx.recv() => match next {
                    Some(q) => {
                        appends_only = is_append(&q);
                        batch.push(q);
                    }
                    None => break,
                },
            }
        }
        drain(rx, batch);
    }

    /// One batch, in an order that keeps each session's writes in order: its
    /// latest state change, its moves, then all appends (one round trip), then ends.
    async fn apply(&self, store: &dyn SessionStore, ops: &[Op]) -> Result<(), StoreError> {
        let mut progress: HashMap<&str, (Epoch, SessionState)> = HashMap::new();
        let mut appends = Appends::default();
        let mut finishes = vec![];
        let mut moves = vec![];
        let mut reused = vec![];
        for op in ops {
            match op {
                Op::Reused { id, epoch, blocks } => reused.push((id, *epoch, *blocks)),
                Op::MovedTo { id, epoch, block_decoder } => moves.push((id, *epoch, block_decoder)),
                Op::Progress { id, epoch, state } => drop(progress.insert(id, (*epoch, *state))),
                Op::Append(a) => appends.push(a),
                Op::Finish { .. } => finishes.push(op),
            }
        }
        let progressed = futures::future::join_all(progress.iter().map(|(id, (epoch, state))| store.set_progress(id, *epoch, *state))).await;
        for ((id, _), w) in progress.iter().zip(progressed) {
            if w? == Write::Fenced {
                self.fence(id);
            }
        }
        for (id, epoch, block_decoder) in moves {
            if store.set_block_decoder(id, epoch, block_decoder).await? == Write::Fenced {
                self.fence(id);
            }
        }
        for (id, epoch, blocks) in reused {
            if store.set_reused_blocks(id, epoch, blocks).await? == Write::Fenced {
                self.fence(id);
            }
        }
        for (a, w) in appends.list.iter().zip(store.append_many(&appends.list).await?) {
            if w == Write::Fenced {
                self.fence(&a.id);
            }
        }
        let ends = finishes.iter().filter_map(|op| match op {
            Op::Finish { id, epoch, outcome, ttl } => Some(store.finish(id, Some(*epoch), outcome, *ttl)),
            _ => None,
        });
        for r in futures::future::join_all(ends).await {
            r?;
        }
        Ok(())
    }

    fn fence(&self, id: &str) {
        if let Some(flag) = self.fenced.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            let _ = flag.send(true);
        }
    }
}

/// Everything queued now, onto `batch`.
fn drain(rx: &mut mpsc::UnboundedReceiver<Queued>, batch: &mut Vec<Queued>) {
    while let Ok(e) = rx.try_recv() {
        batch.push(e);
    }
}

impl SessionWrites {
    pub async fn progress(&self, state: SessionState) -> Result<(), StoreError> {
        self.recorder.queue(Op::Progress { id: self.id.clone(), epoch: self.epoch, state }, true).await
    }

    /// The session moved to another block decoder.
    pub async fn moved(&self, block_decoder: &str) -> Result<(), StoreError> {
        self.recorder.queue(Op::MovedTo { id: self.id.clone(), epoch: self.epoch, block_decoder: block_decoder.to_string() }, true).await
    }

    /// The block decoder found `blocks` prompt blocks in its prefix cache.
    pub async fn reused(&self, blocks: u32) -> Result<(), StoreError> {
        self.recorder.queue(Op::Reused { id: self.id.clone(), epoch: self.epoch, blocks }, false).await
    }

    /// Record `tokens` after the first `offset` of the output (queued; waits
    /// only for room in the queue).
    pub async fn append(&self, offset: usize, tokens: &[u32]) -> Result<(), StoreError> {
        self.recorder.queue(Op::Append(Append { id: self.id.clone(), epoch: self.epoch, offset, tokens: tokens.to_vec() }), false).await
    }

    pub async fn finish(&self, outcome: Outcome, ttl: Duration) -> Result<(), StoreError> {
        self.recorder.queue(Op::Finish { id: self.id.clone(), epoch: self.epoch, outcome, ttl }, true).await
    }
}

impl Drop for SessionWrites {
    fn drop(&mut self) {
        // Forget the flag unless a later handle of the same id replaced it.
        let mut m = self.recorder.fenced.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&self.id).is_some_and(|f| self.fenced.same_channel(&f.subscribe())) {
            m.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(id: &str, epoch: Epoch, offset: usize, tokens: &[u32]) -> Append {
        Append { id: id.into(), epoch, offset, tokens: tokens.to_vec() }
    }

    #[test]
    fn a_sessions_consecutive_blocks_join_into_one_entry() {
        let queued = [
            append("a", 0, 0, &[1, 2, 3, 4]),
            append("b", 0, 8, &[9, 9, 9, 9]),
            append("a", 0, 4, &[5, 6, 7, 8]),
            // Another epoch (the session moved): a separate entry.
            append("b", 1, 12, &[7, 7, 7, 7]),
            append("a", 0, 8, &[9]),
        ];
        let mut joined = Appends::default();
        for a in &queued {
            joined.push(a);
        }
        assert_eq!(joined.list, vec![append("a", 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8, 9]), append("b", 0, 8, &[9, 9, 9, 9]), append("b", 1, 12, &[7, 7, 7, 7])]);
    }
}

//! The block decoder's model thread: it owns the [`BlockScheduler`] (paged KV
//! pool, admission, chunked prefill) and runs one scheduler iteration after
//! another while there is work. Async handlers talk to it through a queue; each
//! waits for its session's next context, which comes back already in wire
//! form (one device-to-host copy per iteration, not per session).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockserve_engine::{BlockScheduler, SchedulerConfig};
use blockserve_model::{BlockTransformer, ModelError};
use blockserve_proto::v1::Embedding;
use blockserve_runtime::codec;
use tokio::sync::{mpsc, oneshot};

type Reply = oneshot::Sender<Result<Embedding, ModelError>>;

enum Command {
    Open { key: u64, ids: Vec<u32>, max_new_blocks: usize, reply: Reply },
    Step { key: u64, block: Vec<u32>, reply: Reply },
    Close { key: u64 },
    Contexts { ids: Vec<u32>, reply: oneshot::Sender<Result<Vec<Embedding>, ModelError>> },
}

/// Handle to the model thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<Command>,
    /// Sessions holding KV pages or waiting for them.
    pub active: Arc<AtomicU32>,
    /// Commands waiting for the model thread.
    pub queued: Arc<AtomicU32>,
}

fn stopped() -> ModelError {
    ModelError::Input("block decoder engine stopped".into())
}

impl Engine {
    /// Start the model thread. Decode blocks wait up to `max_wait` for more to
    /// join their pass (see `ready`).
    pub fn start(model: Arc<BlockTransformer>, config: SchedulerConfig, max_wait: Duration) -> Result<Self, ModelError> {
        let mut sched = BlockScheduler::new(model, config)?;
        sched.warm_up()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let active = Arc::new(AtomicU32::new(0));
        let queued = Arc::new(AtomicU32::new(0));
        let (a, q) = (active.clone(), queued.clone());
        std::thread::Builder::new().name("block-decoder-engine".into()).spawn(move || run(sched, rx, a, q, max_wait)).expect("spawn engine thread");
        Ok(Self { tx, active, queued })
    }

    fn send(&self, c: Command) -> Result<(), ModelError> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(c).map_err(|_| stopped())
    }

    async fn call(&self, make: impl FnOnce(Reply) -> Command) -> Result<Embedding, ModelError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        rx.await.map_err(|_| stopped())?
    }

    /// Queue a session's padded prompt; resolves with the last prompt block's
    /// context once the session was admitted and prefilled.
    pub async fn open(&self, key: u64, ids: Vec<u32>, max_new_blocks: usize) -> Result<Embedding, ModelError> {
        self.call(|reply| Command::Open { key, ids, max_new_blocks, reply }).await
    }

    /// Append one block; resolves with its context.
    pub async fn step(&self, key: u64, block: Vec<u32>) -> Result<Embedding, ModelError> {
        self.call(|reply| Command::Step { key, block, reply }).await
    }

    /// Contexts of every block of whole-block ids, no session kept.
    pub async fn contexts(&self, ids: Vec<u32>) -> Result<Vec<Embedding>, ModelError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Contexts { ids, reply })?;
        rx.await.map_err(|_| stopped())?
    }

    /// End a session and free its pages (idempotent).
    pub fn close(&self, key: u64) {
        let _ = self.send(Command::Close { key });
    }
}

/// Whether to run a pass now: prompt work never waits; decode blocks wait
/// (up to `max_wait`) until at least half of the decoding sessions sent theirs,
/// so passes stay large and the sessions settle into about two groups that
/// alternate between this tier and the token decoders.
fn ready(sched: &BlockScheduler, waited: Duration, max_wait: Duration) -> bool {
    sched.has_prefill() || (sched.pending_blocks() > 0 && (2 * sched.pending_blocks() >= sched.decoding() || waited >= max_wait))
}

fn run(mut sched: BlockScheduler, mut rx: mpsc::UnboundedReceiver<Command>, active: Arc<AtomicU32>, queued: Arc<AtomicU32>, max_wait: Duration) {
    let mut replies: HashMap<u64, Reply> = HashMap::new();
    let mut busy = blockserve_runtime::busy::Busy::new("block-decoder");
    loop {
        // Block for commands only when there is nothing to compute.
        let mut cmds = vec![];
        if !sched.has_work() {
            match rx.blocking_recv() {
                Some(c) => cmds.push(c),
                None => return,
            }
        }
        while let Ok(c) = rx.try_recv() {
            cmds.push(c);
        }
        queued.fetch_sub(cmds.len() as u32, Ordering::Relaxed);
        apply(&mut sched, &mut replies, cmds);
        let started = Instant::now();
        while !ready(&sched, started.elapsed(), max_wait) && sched.has_work() {
            std::thread::sleep(Duration::from_micros(50));
            let cmds: Vec<Command> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
            queued.fetch_sub(cmds.len() as u32, Ordering::Relaxed);
            apply(&mut sched, &mut replies, cmds);
        }
        let t = Instant::now();
        if sched.has_work() {
            let mut pass_rows = 0;
            match sched.iterate().and_then(|out| out.map(|c| codec::encode_rows(&c.tensor).map(|e| (c.rows, e)).map_err(ModelError::Input)).transpose()) {
                Ok(Some((rows, embeddings))) => {
                    pass_rows = rows.len();
                    for ((key, _), e) in rows.into_iter().zip(embeddings) {
                        if let Some(r) = replies.remove(&key) {
                            let _ = r.send(Ok(e));
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    // A failed pass fails every session waiting on it.
                    tracing::error!(error = %e, "block decoder pass failed");
                    for (key, r) in replies.drain() {
                        sched.close(key);
                        let _ = r.send(Err(ModelError::Input(format!("block decoder pass failed: {e}"))));
                    }
                }
            }
            busy.add(t.elapsed(), pass_rows);
        }
        active.store(sched.sessions() as u32, Ordering::Relaxed);
    }
}

/// Apply queued commands to the scheduler.
fn apply(sched: &mut BlockScheduler, replies: &mut HashMap<u64, Reply>, cmds: Vec<Command>) {
    for c in cmds {
        match c {
            Command::Close { key } => {
                sched.close(key);
                replies.remove(&key);
            }
            Command::Open { key, ids, max_new_blocks, reply } => match sched.submit(key, ids, max_new_blocks) {
                Ok(()) => {
                    replies.insert(key, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Step { key, block, reply } => match sched.push_block(key, block) {
                Ok(()) => {
                    replies.insert(key, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Contexts { ids, reply } => {
                let r = sched.contexts(&ids).and_then(|t| codec::encode_rows(&t).map_err(ModelError::Input));
                let _ = reply.send(r);
            }
        }
    }
}

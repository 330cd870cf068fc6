//! The block decoder's model thread. It owns the model and every session's
//! block-level KV cache; async handlers talk to it through a queue. Each
//! iteration takes everything queued: closes, then prefills, then one batched
//! block step for all sessions that sent a block (of whatever cache lengths).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use blockserve_model::{BlockTransformer, KvPool, ModelError, SeqKv};
use candle_core::Tensor;
use tokio::sync::{mpsc, oneshot};

type Reply = oneshot::Sender<Result<Tensor, ModelError>>;

enum Command {
    Open { key: u64, ids: Vec<u32>, reply: Reply },
    Step { key: u64, block: Vec<u32>, reply: Reply },
    Close { key: u64 },
    Contexts { ids: Vec<u32>, reply: Reply },
}

/// Handle to the model thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<Command>,
    /// Sessions holding a cache.
    pub active: Arc<AtomicU32>,
    /// Commands waiting for the model thread.
    pub queued: Arc<AtomicU32>,
}

impl Engine {
    /// Start the model thread with a KV pool of `kv_pages` pages of `PAGE_SIZE` blocks.
    pub fn start(model: Arc<BlockTransformer>, kv_pages: usize) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let active = Arc::new(AtomicU32::new(0));
        let queued = Arc::new(AtomicU32::new(0));
        let (a, q) = (active.clone(), queued.clone());
        std::thread::Builder::new()
            .name("block-decoder-engine".into())
            .spawn(move || match model.block_decoder.new_pool(kv_pages, PAGE_SIZE, model.dtype(), model.device()) {
                Ok(pool) => run(model, pool, rx, a, q),
                Err(e) => tracing::error!("allocating the KV pool: {e}"),
            })
            .expect("spawn engine thread");
        Self { tx, active, queued }
    }

    async fn call(&self, make: impl FnOnce(Reply) -> Command) -> Result<Tensor, ModelError> {
        let (reply, rx) = oneshot::channel();
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(make(reply)).map_err(|_| ModelError::Input("block decoder engine stopped".into()))?;
        rx.await.map_err(|_| ModelError::Input("block decoder engine stopped".into()))?
    }

    /// Prefill a session's padded prompt; returns the last block's context `[D_b]`.
    pub async fn open(&self, key: u64, ids: Vec<u32>) -> Result<Tensor, ModelError> {
        self.call(|reply| Command::Open { key, ids, reply }).await
    }

    /// Append one block; returns its context `[D_b]`.
    pub async fn step(&self, key: u64, block: Vec<u32>) -> Result<Tensor, ModelError> {
        self.call(|reply| Command::Step { key, block, reply }).await
    }

    /// Contexts of every block of whole-block ids, `[n, D_b]`, no session kept.
    pub async fn contexts(&self, ids: Vec<u32>) -> Result<Tensor, ModelError> {
        self.call(|reply| Command::Contexts { ids, reply }).await
    }

    /// Free a session's cache (idempotent).
    pub fn close(&self, key: u64) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let _ = self.tx.send(Command::Close { key });
    }
}

fn last_row(t: Tensor) -> Result<Tensor, ModelError> {
    let n = t.dim(0)?;
    Ok(t.get(n - 1)?)
}

/// Block positions per KV page.
pub const PAGE_SIZE: usize = 16;

/// Append `counts[i]` blocks of `ids` to session `keys[i]` in one paged pass and
/// return the contexts of all new blocks.
fn pass(m: &BlockTransformer, pool: &mut KvPool, seqs: &mut [&mut SeqKv], counts: &[usize], ids: &[u32]) -> Result<Tensor, ModelError> {
    let plan = pool.plan(seqs, counts, m.device())?;
    m.block_decoder.forward_paged(&m.embed_ids(ids)?, pool, &plan)
}

fn run(model: Arc<BlockTransformer>, mut pool: KvPool, mut rx: mpsc::UnboundedReceiver<Command>, active: Arc<AtomicU32>, queued: Arc<AtomicU32>) {
    let mut caches: HashMap<u64, SeqKv> = HashMap::new();
    let m = model.as_ref();
    let l = m.block_length();
    while let Some(cmds) = blockserve_runtime::next_batch(&mut rx, &queued) {
        let mut steps: Vec<(u64, Vec<u32>, Reply)> = vec![];
        for c in cmds {
            match c {
                Command::Close { key } => {
                    if let Some(mut kv) = caches.remove(&key) {
                        pool.release(&mut kv);
                    }
                }
                Command::Open { key, ids, reply } => {
                    let mut kv = SeqKv::default();
                    let r = pass(m, &mut pool, &mut [&mut kv], &[ids.len() / l], &ids).and_then(last_row);
                    if r.is_ok() {
                        caches.insert(key, kv);
                    } else {
                        pool.release(&mut kv);
                    }
                    let _ = reply.send(r);
                }
                Command::Contexts { ids, reply } => {
                    let mut kv = SeqKv::default();
                    let _ = reply.send(pass(m, &mut pool, &mut [&mut kv], &[ids.len() / l], &ids));
                    pool.release(&mut kv);
                }
                Command::Step { key, block, reply } => steps.push((key, block, reply)),
            }
        }
        // One batched step over every session that sent a block.
        let mut batch: Vec<(u64, SeqKv, Vec<u32>, Reply)> = vec![];
        for (key, block, reply) in steps {
            match caches.remove(&key) {
                Some(kv) => batch.push((key, kv, block, reply)),
                None => {
                    let _ = reply.send(Err(ModelError::Input("block for a session with no open cache".into())));
                }
            }
        }
        if !batch.is_empty() {
            let ids: Vec<u32> = batch.iter().flat_map(|b| b.2.iter().copied()).collect();
            let counts = vec![1; batch.len()];
            let mut refs: Vec<&mut SeqKv> = batch.iter_mut().map(|b| &mut b.1).collect();
            let out = pass(m, &mut pool, &mut refs, &counts, &ids);
            for (i, (key, kv, _, reply)) in batch.into_iter().enumerate() {
                let r = match &out {
                    Ok(ctx) => ctx.get(i).map_err(ModelError::from),
                    Err(e) => Err(ModelError::Input(e.to_string())),
                };
                caches.insert(key, kv);
                let _ = reply.send(r);
            }
        }
        active.store(caches.len() as u32, Ordering::Relaxed);
    }
}

//! The token decoder's model thread: every session whose context embedding has
//! arrived is decoded together by the engine's [`TokenBatcher`] (block-
//! synchronous, fixed-size batches over one preallocated local cache), each row
//! with its own sampling. The contexts of a batch reach the device in one copy.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockserve_engine::TokenBatcher;
use blockserve_model::{BlockTransformer, ModelError};
use blockserve_proto::v1::Embedding;
use blockserve_runtime::codec;
use candle_core::{DType, Tensor, D};
use tokio::sync::{mpsc, oneshot};

/// One session's request for its next block.
pub struct BlockJob {
    /// The context embedding as it came from the block decoder (checked).
    pub context: Embedding,
    pub job: blockserve_engine::BlockJob,
}

enum Command {
    Block(BlockJob, oneshot::Sender<Result<Vec<u32>, ModelError>>),
    Score { contexts: Tensor, blocks: Vec<u32>, reply: oneshot::Sender<Result<Vec<f32>, ModelError>> },
}

#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<Command>,
    pub queued: Arc<AtomicU32>,
    /// Sessions in their block loop (each has a block here or a context on
    /// its way); a batch waits for half of them.
    pub decoding: Arc<AtomicU32>,
}

/// Counts a session as decoding while it lives.
pub struct Decoding(Arc<AtomicU32>);

impl Decoding {
    pub fn new(engine: &Engine) -> Self {
        engine.decoding.fetch_add(1, Ordering::Relaxed);
        Self(engine.decoding.clone())
    }
}

impl Drop for Decoding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Engine {
    /// Start the model thread; blocks are decoded in batches of at most `max_batch`.
    pub fn start(model: Arc<BlockTransformer>, max_batch: usize, max_wait: Duration) -> Result<Self, ModelError> {
        let mut batcher = TokenBatcher::new(model.clone(), max_batch)?;
        batcher.warm_up()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicU32::new(0));
        let decoding = Arc::new(AtomicU32::new(0));
        let (q, d) = (queued.clone(), decoding.clone());
        std::thread::Builder::new().name("token-decoder-engine".into()).spawn(move || run(model, batcher, rx, q, d, max_wait)).expect("spawn engine thread");
        Ok(Self { tx, queued, decoding })
    }

    fn stopped() -> ModelError {
        ModelError::Input("token decoder engine stopped".into())
    }

    /// The L tokens of this session's next block.
    pub async fn decode_block(&self, job: BlockJob) -> Result<Vec<u32>, ModelError> {
        let (reply, rx) = oneshot::channel();
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Command::Block(job, reply)).map_err(|_| Self::stopped())?;
        rx.await.map_err(|_| Self::stopped())?
    }

    /// log p of each token of blocks 1..n given `contexts` `[n-1, D_b]` of blocks
    /// 0..n-2 and the flat ids of blocks 1..n-1.
    pub async fn score(&self, contexts: Tensor, blocks: Vec<u32>) -> Result<Vec<f32>, ModelError> {
        let (reply, rx) = oneshot::channel();
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Command::Score { contexts, blocks, reply }).map_err(|_| Self::stopped())?;
        rx.await.map_err(|_| Self::stopped())?
    }
}

fn decode_batch(batcher: &mut TokenBatcher, m: &BlockTransformer, jobs: Vec<BlockJob>) -> Result<Vec<Vec<u32>>, ModelError> {
    let (contexts, rows): (Vec<Embedding>, Vec<blockserve_engine::BlockJob>) = jobs.into_iter().map(|j| (j.context, j.job)).unzip();
    let contexts: Vec<&Embedding> = contexts.iter().collect();
    let ctx = codec::decode_rows(&contexts, m.config.block_decoder.hidden_size, m.dtype(), m.device()).map_err(ModelError::Input)?;
    batcher.decode(&ctx, &rows)
}

fn score(m: &BlockTransformer, contexts: &Tensor, blocks: &[u32]) -> Result<Vec<f32>, ModelError> {
    let l = m.block_length();
    let n = contexts.dim(0)?;
    let ids = Tensor::from_slice(blocks, (n, l), contexts.device())?;
    let logits = m.token_decoder.forward(contexts, &ids.narrow(1, 0, l - 1)?.contiguous()?)?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let picked = logp.gather(&ids.unsqueeze(2)?, 2)?.squeeze(2)?;
    Ok(picked.flatten_all()?.to_vec1::<f32>()?)
}

/// The first command, then more until half of the decoding sessions have a
/// block queued (contexts of one block-decoder pass arrive spread over a few
/// milliseconds), or `max_wait` after the first.
fn gather(rx: &mut mpsc::UnboundedReceiver<Command>, queued: &AtomicU32, decoding: &AtomicU32, max_wait: Duration) -> Option<Vec<Command>> {
    let mut cmds = vec![rx.blocking_recv()?];
    let start = Instant::now();
    let blocks = |cmds: &[Command]| cmds.iter().filter(|c| matches!(c, Command::Block(..))).count() as u32;
    loop {
        while let Ok(c) = rx.try_recv() {
            cmds.push(c);
        }
        if 2 * blocks(&cmds) >= decoding.load(Ordering::Relaxed) || start.elapsed() >= max_wait {
            break;
        }
        std::thread::sleep(Duration::from_micros(20));
    }
    queued.fetch_sub(cmds.len() as u32, Ordering::Relaxed);
    Some(cmds)
}

fn run(
    model: Arc<BlockTransformer>,
    mut batcher: TokenBatcher,
    mut rx: mpsc::UnboundedReceiver<Command>,
    queued: Arc<AtomicU32>,
    decoding: Arc<AtomicU32>,
    max_wait: Duration,
) {
    let m = model.as_ref();
    let mut busy = blockserve_runtime::busy::Busy::new("token-decoder");
    while let Some(cmds) = gather(&mut rx, &queued, &decoding, max_wait) {
        let mut jobs = vec![];
        let mut replies = vec![];
        for c in cmds {
            match c {
                Command::Block(job, reply) => {
                    jobs.push(job);
                    replies.push(reply);
                }
                Command::Score { contexts, blocks, reply } => {
                    let _ = reply.send(score(m, &contexts, &blocks));
                }
            }
        }
        if jobs.is_empty() {
            continue;
        }
        let (t, rows) = (Instant::now(), jobs.len());
        let decoded = decode_batch(&mut batcher, m, jobs);
        busy.add(t.elapsed(), rows);
        match decoded {
            Ok(blocks) => {
                for (b, r) in blocks.into_iter().zip(replies) {
                    let _ = r.send(Ok(b));
                }
            }
            Err(e) => {
                for r in replies {
                    let _ = r.send(Err(ModelError::Input(e.to_string())));
                }
            }
        }
    }
}

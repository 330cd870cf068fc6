//! The token decoder's model thread: every session whose context embedding has
//! arrived is decoded together, block-synchronously (one prefix pass and L-1
//! token steps for the whole batch), each row with its own sampling.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use blockserve_model::sampling::{read_rows, sample, Row};
use blockserve_model::{BlockTransformer, ModelError, SamplingParams};
use candle_core::{DType, Tensor, D};
use tokio::sync::{mpsc, oneshot};

/// One session's request for its next block.
pub struct BlockJob {
    /// `[D_b]` on the model's device and dtype.
    pub context: Tensor,
    pub sampling: SamplingParams,
    /// Prompt followed by every token generated so far (empty when the sampling
    /// does not use history).
    pub history: Vec<u32>,
    /// Tokens generated so far (index of the first token of this block).
    pub generated: u64,
}

enum Command {
    Block(BlockJob, oneshot::Sender<Result<Vec<u32>, ModelError>>),
    Score { contexts: Tensor, blocks: Vec<u32>, reply: oneshot::Sender<Result<Vec<f32>, ModelError>> },
}

#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<Command>,
    pub queued: Arc<AtomicU32>,
}

impl Engine {
    pub fn start(model: Arc<BlockTransformer>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicU32::new(0));
        let q = queued.clone();
        std::thread::Builder::new().name("token-decoder-engine".into()).spawn(move || run(model, rx, q)).expect("spawn engine thread");
        Self { tx, queued }
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

fn decode_batch(m: &BlockTransformer, jobs: &[BlockJob]) -> Result<Vec<Vec<u32>>, ModelError> {
    let l = m.block_length();
    let ctx = Tensor::stack(&jobs.iter().map(|j| &j.context).collect::<Vec<_>>(), 0)?;
    let mut local = m.token_decoder.new_local(jobs.len(), m.dtype(), m.device())?;
    let mut logits = m.token_decoder.begin_block(&ctx, &mut local)?;
    let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(l); jobs.len()];
    // Plain greedy rows bring back one id per step, not a row of logits.
    let on_host: Vec<bool> = jobs.iter().map(|j| !j.sampling.is_plain_greedy()).collect();
    for k in 0..l {
        let rows = read_rows(&logits, &on_host)?;
        let mut toks = Vec::with_capacity(jobs.len());
        for ((job, row), block) in jobs.iter().zip(rows).zip(out.iter_mut()) {
            let n = job.generated + k as u64;
            let t = match row {
                Row::Token(t) => t,
                Row::Logits(row) if job.sampling.uses_history() => {
                    let mut history = job.history.clone();
                    history.extend_from_slice(block);
                    sample(&job.sampling, &row, &history, n)
                }
                Row::Logits(row) => sample(&job.sampling, &row, &[], n),
            };
            block.push(t);
            toks.push(t);
        }
        if k + 1 < l {
            let t = Tensor::from_vec(toks, jobs.len(), ctx.device())?;
            logits = m.token_decoder.next_token(&t, &mut local)?;
        }
    }
    Ok(out)
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

fn run(model: Arc<BlockTransformer>, mut rx: mpsc::UnboundedReceiver<Command>, queued: Arc<AtomicU32>) {
    let m = model.as_ref();
    while let Some(cmds) = blockserve_runtime::next_batch(&mut rx, &queued) {
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
        match decode_batch(m, &jobs) {
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

//! A token batcher on a host thread of its own, so that the in-process
//! pipeline's two tiers run on the GPU at the same time.
//!
//! candle's CUDA device launches on the per-thread default stream
//! (`CU_STREAM_PER_THREAD`): every host thread that launches work gets a
//! stream of its own. A block-decoder pass issued from the caller's thread and
//! a token-decoder block issued from this one therefore overlap on the device,
//! and they want different things from it: the block decoder's pass is bound by
//! memory (paged KV reads), the token decoder's block by the matrix units and
//! by launch latency. One after the other on one stream, each leaves the
//! other's resource idle.
//!
//! What crosses between the streams, and how it is kept safe:
//! - the contexts: [`TokenThread::submit`] waits for the caller's stream
//!   before handing them over, so this thread's stream never reads a context
//!   still being written;
//! - the weights: written once at load, before either thread launches;
//! - matmuls: in bf16/f16 the linear layers go through the model's cuBLASLt
//!   path, with a handle and workspace per thread, so candle's one cuBLAS
//!   handle (shared by all threads) is not used. The exception is a layer
//!   with a dimension that is not a multiple of 8, which falls back to
//!   candle's matmul (`BlockTransformer::linears_on_lt` says whether a model
//!   has one; `blockserve bench` overlaps on CUDA only if not);
//! - each tier's KV cache is its own.
//!
//! The batcher is built on the thread and never leaves it: its CUDA graphs are
//! not `Send`.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use blockserve_model::{BlockTransformer, ModelError};
use candle_core::{Device, Tensor};

use crate::token_batcher::{BlockJob, TokenBatcher};

type Result<T> = std::result::Result<T, ModelError>;

/// One pass's contexts for the token decoder: row i of `contexts` is decoded
/// with `jobs[i]`; `rows` goes back with the blocks.
pub struct Group {
    pub contexts: Tensor,
    pub jobs: Vec<BlockJob>,
    pub rows: Vec<(u64, u32)>,
}

impl Group {
    /// Decode the group on `batcher`, timing it. The contexts are dropped
    /// here, on the decoding thread: freed on its stream, after its reads.
    pub(crate) fn decode(self, batcher: &mut TokenBatcher) -> Result<Decoded> {
        let t = Instant::now();
        let blocks = batcher.decode(&self.contexts, &self.jobs)?;
        Ok(Decoded { rows: self.rows, blocks, busy_s: t.elapsed().as_secs_f64() })
    }
}

/// A group's blocks (one per row, in order) and the decoding thread's time on it.
pub struct Decoded {
    pub rows: Vec<(u64, u32)>,
    pub blocks: Vec<Vec<u32>>,
    pub busy_s: f64,
}

pub struct TokenThread {
    device: Device,
    to_thread: Option<mpsc::Sender<Group>>,
    from_thread: mpsc::Receiver<Result<Decoded>>,
    handle: Option<JoinHandle<()>>,
}

fn gone() -> ModelError {
    ModelError::Input("the token-decoder thread ended".into())
}

impl TokenThread {
    /// Start the thread with a batcher of at most `max_batch` rows (greedy
    /// blocks from CUDA graphs when `cuda_graphs`).
    pub fn spawn(model: Arc<BlockTransformer>, max_batch: usize, cuda_graphs: bool) -> Result<Self> {
        let device = model.device().clone();
        let (to_thread, groups) = mpsc::channel::<Group>();
        let (done, from_thread) = mpsc::channel();
        let (ready_tx, ready) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("token-decoder".into())
            .spawn(move || {
                let mut batcher = match TokenBatcher::new(model, max_batch) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                batcher.set_cuda_graphs(cuda_graphs);
                let _ = ready_tx.send(Ok(()));
                for g in groups {
                    if done.send(g.decode(&mut batcher)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| ModelError::Input(format!("cannot start the token-decoder thread: {e}")))?;
        ready.recv().map_err(|_| gone())??;
        Ok(Self { device, to_thread: Some(to_thread), from_thread, handle: Some(handle) })
    }

    /// Queue a group. Its contexts were computed on the caller's stream: wait
    /// for it, so that the thread's stream reads finished contexts.
    pub fn submit(&self, group: Group) -> Result<()> {
        self.device.synchronize()?;
        self.to_thread.as_ref().expect("open until dropped").send(group).map_err(|_| gone())
    }

    /// The next decoded group, in submission order (blocks until it is done).
    pub fn recv(&self) -> Result<Decoded> {
        self.from_thread.recv().map_err(|_| gone())?
    }
}

impl Drop for TokenThread {
    fn drop(&mut self) {
        self.to_thread = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

//! The token decoder's batches: every session whose context has arrived decodes
//! its next block together, block-synchronously (the prefix pass, then L-1 token
//! steps), in batches of at most `max_batch` rows over one preallocated local
//! cache. Plain greedy rows take their argmax on the device; other rows read
//! their logits back and sample on the host with their own seed stream. A row
//! may start with forced tokens (the aligned prompt layout's prompt tail): the
//! decoder reads them in place of its own choice.

use std::sync::Arc;

use blockserve_model::argmax::argmax_rows;
use blockserve_model::sampling::{read_rows, sample, Row};
use blockserve_model::{BlockTransformer, LocalKv, ModelError, SamplingParams};
use candle_core::{DType, Device, Tensor};

type Result<T> = std::result::Result<T, ModelError>;

/// One row of a block batch: how its tokens are chosen.
#[derive(Debug, Clone)]
pub struct BlockJob {
    pub sampling: SamplingParams,
    /// Prompt followed by every token generated so far (empty unless the
    /// sampling uses history).
    pub history: Vec<u32>,
    /// Tokens generated before this block (the index of its first draw).
    pub generated: u64,
    /// The block's first tokens, given rather than chosen (fewer than L; the
    /// returned block holds them too).
    pub forced: Vec<u32>,
}

impl BlockJob {
    pub fn greedy(generated: u64) -> Self {
        Self { sampling: SamplingParams::greedy(), history: vec![], generated, forced: vec![] }
    }

    /// Whether the block is the device's plain argmax all through.
    pub fn is_plain_greedy(&self) -> bool {
        plain_greedy(&self.sampling, &self.forced)
    }
}

/// Whether a block drawn with `sampling`, starting with `forced` tokens, is
/// the device's plain argmax all through (what CUDA graphs and rounds
/// launched ahead decode); a caller that has no job yet asks this directly.
pub fn plain_greedy(sampling: &SamplingParams, forced: &[u32]) -> bool {
    sampling.is_plain_greedy() && forced.is_empty()
}

pub struct TokenBatcher {
    model: Arc<BlockTransformer>,
    local: LocalKv,
    max_batch: usize,
    /// Greedy blocks replayed from CUDA graphs (None: launched op by op).
    #[cfg(feature = "cuda")]
    graphs: Option<crate::cuda_graph::GreedyGraphs>,
    /// Rounds launched ahead ([`Self::launch`]), made on first use.
    #[cfg(feature = "cuda")]
    ahead: Option<crate::ahead::Lanes>,
}

/// A round's contexts as they came over the wire: `rows` rows of `dtype`,
/// row-major little-endian bytes.
pub struct HostContexts<'a> {
    pub bytes: &'a [u8],
    pub dtype: DType,
    pub rows: usize,
}

/// A round of plain greedy blocks started by [`TokenBatcher::launch`]; its
/// blocks come from [`TokenBatcher::finish`].
pub struct Launched {
    state: LaunchState,
}

enum LaunchState {
    /// Decoded at launch (no CUDA graphs): the blocks.
    Decoded(Vec<Vec<u32>>),
    /// Queued on the device in one of the launched-ahead lanes.
    #[cfg(feature = "cuda")]
    InFlight(crate::ahead::Ticket),
}

impl Launched {
    /// What another thread can block on until the round's blocks are on the
    /// host (already so for a round decoded at launch).
    pub fn done(&self) -> DoneSignal {
        match &self.state {
            LaunchState::Decoded(_) => DoneSignal {
                #[cfg(feature = "cuda")]
                inner: None,
            },
            #[cfg(feature = "cuda")]
            LaunchState::InFlight(t) => DoneSignal { inner: Some(t.done()) },
        }
    }
}

/// Blocks until a launched round's blocks are on the host; `Send`, so that a
/// helper thread can wait while the engine thread goes on.
pub struct DoneSignal {
    #[cfg(feature = "cuda")]
    inner: Option<blockserve_model::pinned::Done>,
}

impl DoneSignal {
    pub fn wait(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.inner {
            d.wait()?;
        }
        Ok(())
    }
}

impl TokenBatcher {
    pub fn new(model: Arc<BlockTransformer>, max_batch: usize) -> Result<Self> {
        let max_batch = max_batch.max(1);
        let local = model.token_decoder().new_local(max_batch, model.dtype(), model.device())?;
        #[cfg(feature = "cuda")]
        let graphs = model.device().is_cuda().then(Default::default);
        Ok(Self {
            model,
            local,
            max_batch,
            #[cfg(feature = "cuda")]
            graphs,
            #[cfg(feature = "cuda")]
            ahead: None,
        })
    }

    /// Replay greedy blocks from CUDA graphs (the default on CUDA) or launch
    /// them op by op. Without CUDA this does nothing.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn set_cuda_graphs(&mut self, on: bool) {
        #[cfg(feature = "cuda")]
        {
            self.graphs = (on && self.model.device().is_cuda()).then(Default::default);
        }
    }

    /// Decode one block for a greedy row and a sampled row from a zero context,
    /// so device modules are loaded before the first request.
    pub fn warm_up(&mut self) -> Result<()> {
        let m = &self.model;
        let ctx = Tensor::zeros((1, m.config.block_decoder.hidden_size), m.dtype(), m.device())?;
        let sampled = BlockJob { sampling: SamplingParams { temperature: 0.8, top_k: 5, ..SamplingParams::greedy() }, ..BlockJob::greedy(0) };
        self.decode(&ctx, &[BlockJob::greedy(0)])?;
        self.decode(&ctx, &[sampled])?;
        Ok(())
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The L tokens of the next block of every row: `contexts` `[b, D_b]`, one
    /// job per row.
    pub fn decode(&mut self, contexts: &Tensor, jobs: &[BlockJob]) -> Result<Vec<Vec<u32>>> {
        let b = contexts.dim(0)?;
        if b != jobs.len() {
            return Err(ModelError::Input(format!("{b} contexts for {} jobs", jobs.len())));
        }
        let mut out = Vec::with_capacity(b);
        for start in (0..b).step_by(self.max_batch) {
            let n = self.max_batch.min(b - start);
            out.extend(self.decode_chunk(&contexts.narrow(0, start, n)?, &jobs[start..start + n])?);
        }
        Ok(out)
    }

    /// Start a round of plain greedy blocks for `contexts` (at most
    /// `max_batch` rows) without waiting for it. With CUDA graphs the round
    /// is queued behind whatever the device is running, and the host is free
    /// until [`Self::finish`]; at most two rounds may be launched and not yet
    /// finished, and they finish in launch order. Otherwise it is decoded
    /// here.
    pub fn launch(&mut self, contexts: HostContexts) -> Result<Launched> {
        let m = self.model.clone();
        let d = m.config.block_decoder.hidden_size;
        if contexts.rows > self.max_batch || contexts.bytes.len() != contexts.rows * d * contexts.dtype.size_in_bytes() {
            return Err(ModelError::Input(format!("{} bytes of {} rows of {d} for a batcher of {} rows", contexts.bytes.len(), contexts.rows, self.max_batch)));
        }
        #[cfg(feature = "cuda")]
        if contexts.dtype == m.dtype() {
            if let Some(lanes) = self.lanes()? {
                return Ok(Launched { state: LaunchState::InFlight(lanes.launch(&m, contexts)?) });
            }
        }
        let ctx = self.upload(&contexts)?;
        let jobs = vec![BlockJob::greedy(0); contexts.rows];
        Ok(Launched { state: LaunchState::Decoded(self.decode(&ctx, &jobs)?) })
    }

    /// Contexts from the host onto the model's device, in its dtype.
    pub fn upload(&self, contexts: &HostContexts) -> Result<Tensor> {
        let m = &self.model;
        let shape = [contexts.rows, m.config.block_decoder.hidden_size];
        Ok(Tensor::from_raw_buffer(contexts.bytes, contexts.dtype, &shape, &Device::Cpu)?.to_dtype(m.dtype())?.to_device(m.device())?)
    }

    /// The lanes of rounds launched ahead, made on first use; None without
    /// CUDA graphs.
    #[cfg(feature = "cuda")]
    fn lanes(&mut self) -> Result<Option<&mut crate::ahead::Lanes>> {
        if self.graphs.is_none() || !self.model.device().is_cuda() {
            return Ok(None);
        }
        if self.ahead.is_none() {
            self.ahead = Some(crate::ahead::Lanes::new(&self.model, self.max_batch)?);
        }
        Ok(self.ahead.as_mut())
    }

    /// Make the lanes that launched rounds use now rather than at the first
    /// launch, so that the memory they hold (two more local caches) is in
    /// use from the start. Does nothing without CUDA graphs.
    pub fn prepare_launches(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        self.lanes()?;
        Ok(())
    }

    /// The blocks of a launched round (waiting for them if need be).
    pub fn finish(&mut self, launched: Launched) -> Result<Vec<Vec<u32>>> {
        match launched.state {
            LaunchState::Decoded(blocks) => Ok(blocks),
            #[cfg(feature = "cuda")]
            LaunchState::InFlight(t) => self.ahead.as_mut().expect("a launched round's lanes").finish(t, self.model.block_length()),
        }
    }

    fn decode_chunk(&mut self, ctx: &Tensor, jobs: &[BlockJob]) -> Result<Vec<Vec<u32>>> {
        if jobs.iter().all(BlockJob::is_plain_greedy) {
            return self.decode_greedy(ctx);
        }
        let m = &self.model;
        let l = m.block_length();
        let mut logits = m.token_decoder().begin_block(ctx, &mut self.local)?;
        let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(l); jobs.len()];
        let on_host: Vec<bool> = jobs.iter().map(|j| !j.sampling.is_plain_greedy()).collect();
        for k in 0..l {
            let rows = read_rows(&logits, &on_host)?;
            let mut toks = Vec::with_capacity(jobs.len());
            for ((job, row), block) in jobs.iter().zip(rows).zip(out.iter_mut()) {
                let forced = job.forced.len();
                // The draw's index in the output (forced tokens are not drawn).
                let n = (job.generated + k as u64).wrapping_sub(forced as u64);
                let t = match row {
                    _ if k < forced => job.forced[k],
                    Row::Token(t) => t,
                    Row::Logits(row) if job.sampling.uses_history() => {
                        // The history (prompt and output) holds the forced tokens.
                        let mut history = job.history.clone();
                        history.extend_from_slice(&block[forced..]);
                        sample(&job.sampling, &row, &history, n)
                    }
                    Row::Logits(row) => sample(&job.sampling, &row, &[], n),
                };
                block.push(t);
                toks.push(t);
            }
            if k + 1 < l {
                let t = Tensor::from_vec(toks, jobs.len(), ctx.device())?;
                logits = m.token_decoder().next_token(&t, &mut self.local)?;
            }
        }
        Ok(out)
    }

    /// All rows plain greedy: each step's argmax stays on the device and feeds
    /// the next step, and the block's `[b, L]` ids come back in one read, so the
    /// host queues the whole block without waiting for the device in between.
    fn decode_greedy(&mut self, ctx: &Tensor) -> Result<Vec<Vec<u32>>> {
        let (model, local) = (&self.model, &mut self.local);
        #[cfg(feature = "cuda")]
        if let Some(graphs) = &mut self.graphs {
            return graphs.decode(ctx, self.max_batch, &mut |ctx| greedy_block(model, local, ctx));
        }
        Ok(blockserve_model::settled(&greedy_block(model, local, ctx)?, |t| t.to_vec2::<u32>())?)
    }
}

/// The `[b, L]` ids of a plain greedy block over `ctx` `[b, D_b]`, left on the
/// device. A fixed sequence of kernels with no host reads, so that it can be
/// captured as a CUDA graph.
pub(crate) fn greedy_block(m: &BlockTransformer, local: &mut LocalKv, ctx: &Tensor) -> Result<Tensor> {
    let l = m.block_length();
    let mut ids = Vec::with_capacity(l);
    let logits = m.token_decoder().begin_block(ctx, local)?;
    ids.push(argmax_rows(&logits)?);
    for _ in 1..l {
        let logits = m.token_decoder().next_token(ids.last().expect("one step done"), local)?;
        ids.push(argmax_rows(&logits)?);
    }
    Ok(Tensor::stack(&ids, 1)?)
}

/// The row count a batch of `rows` is padded to: powers of two up to 512, then
/// multiples of 256, never above `max` (the local cache's rows). Greedy
/// blocks replayed from CUDA graphs run at these row counts.
pub fn bucket(rows: usize, max: usize) -> usize {
    let b = if rows <= 512 { rows.next_power_of_two().max(8) } else { rows.div_ceil(256) * 256 };
    b.min(max)
}

#[cfg(test)]
mod tests {
    use super::bucket;

    #[test]
    fn buckets_pad_to_few_sizes_within_the_cache() {
        let got: Vec<usize> = [1, 8, 9, 100, 512, 513, 1019, 1024, 1025, 2048].iter().map(|&r| bucket(r, 2048)).collect();
        assert_eq!(got, [8, 8, 16, 128, 512, 768, 1024, 1024, 1280, 2048]);
        assert_eq!(bucket(1000, 1000), 1000);
        assert_eq!(bucket(3, 4), 4);
    }
}

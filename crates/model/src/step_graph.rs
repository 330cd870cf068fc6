//! CUDA graphs of the vanilla model's greedy decode step (the paged driver's
//! `decode_greedy`).
//!
//! Why: a step of vanilla_160 at batch 256 is about fifty launches through
//! candle (a norm, two GEMMs and attention a layer, then the head and the
//! argmax), each with its host-side work: tensor bookkeeping, allocation,
//! argument packing. On a quick host that hides behind the 3 ms the GPU
//! takes; on a slower one the same build ran 3% slower (the H200 calls of
//! 2026-12-01, `docs/performance.md`). Replayed from a graph, a step costs
//! the host one launch, one upload of the step's page tables and one read of
//! its tokens.
//!
//! What a capture needs, and how this module provides it:
//! - fixed addresses: the input ids, the pass's index and the rows to pick
//!   are buffers allocated once per graph; each step's index is copied into
//!   its buffer (page-locked, asynchronous) before the replay; the pool and
//!   the weights never move;
//! - one layout for every step: page tables padded to the most pages any
//!   session of the batch can reach, and the longest history set to what
//!   those pages hold, so that every kernel choice the pass's shape makes
//!   (which attention kernel, how many warps) is the same for every step;
//! - its own input: the graph's last node copies the step's argmax into its
//!   ids buffer, which the next replay reads; a batch that loses sessions
//!   gets a graph of its own, fed from the selected rows;
//! - no host-to-device copies while capturing: candle's htod cache is on for
//!   the warm-up step and the capture (as in the engine's token-decoder
//!   graphs); stream-ordered allocations become graph allocations, freed and
//!   made again at the same addresses by each replay (auto-free-on-launch).
//!
//! The warm-up step is a real step: its tokens are that step's, and the
//! capture (which runs nothing) follows it.

use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::{CudaDevice, Tensor};

use crate::causal_lm::CausalLm;
use crate::error::{ModelError, Result};
use crate::paged::{KvPool, SeqKv};
use crate::pinned::Pinned;

/// One captured step. Fields drop in order: the output (a graph allocation)
/// before the graph.
struct Captured {
    rows: usize,
    next: Tensor,
    /// The input buffer the graph reads (and writes its output into): kept
    /// alive with it.
    _ids: Tensor,
    index: Tensor,
    graph: CudaGraph,
}

/// The graph of the batch now decoding, and what every step shares.
pub(crate) struct StepGraphs {
    current: Option<Captured>,
    /// The ids of a step that warmed up a new graph (an ordinary allocation).
    warm: Option<Tensor>,
    /// Page-table width of every step (the most pages a session reaches).
    max_pages: usize,
    upload: Pinned,
}

fn graph_err(what: &str, e: impl std::fmt::Debug) -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(format!("CUDA graph {what}: {e:?}")))
}

/// Whether the driver captures decode steps (`BLOCKSERVE_VANILLA_GRAPH=0`
/// launches them op by op, for A/B runs).
pub(crate) fn enabled() -> bool {
    std::env::var("BLOCKSERVE_VANILLA_GRAPH").as_deref() != Ok("0")
}

impl StepGraphs {
    /// For batches of at most `max_rows` sessions whose page tables never
    /// exceed `max_pages`.
    pub(crate) fn new(dev: &CudaDevice, max_rows: usize, max_pages: usize) -> Result<Self> {
        let index_len = max_rows * (5 + max_pages);
        Ok(Self { current: None, warm: None, max_pages, upload: Pinned::new(dev, 4 * index_len)? })
    }

    /// One greedy step of `seqs` (one new token each): plans it on `pool`,
    /// runs it, and returns its argmax ids `[rows]`, valid until the next
    /// step. `fresh` holds the step's input ids when the batch changed since
    /// the last step (and on the first); None continues from the last step's
    /// output, which the graph already fed back.
    pub(crate) fn step(&mut self, m: &CausalLm, pool: &mut KvPool, seqs: &mut [&mut SeqKv], fresh: Option<Tensor>) -> Result<&Tensor> {
        let rows = seqs.len();
        let (index, mut pass) = pool.plan_host(seqs, &vec![1; rows], self.max_pages)?;
        if pass.max_pages != self.max_pages {
            return Err(ModelError::Input(format!("a session needs {} pages, more than the {} its graph was sized for", pass.max_pages, self.max_pages)));
        }
        pass.max_keys = self.max_pages * pool.page_size();
        self.warm = None;
        match (&self.current, fresh) {
            (Some(c), None) if c.rows == rows => {
                self.upload.upload_into(bytemuck::cast_slice(&index), &c.index)?;
            }
            (_, Some(ids)) => {
                // A new batch: drop the old graph first (its memory), then a
                // real step that also warms up, then the capture.
                self.current = None;
                let candle_core::Device::Cuda(dev) = m.device() else { return Err(ModelError::Input("step graphs need a CUDA device".into())) };
                let ids = ids.copy()?;
                let n = index.len();
                pass.index = Tensor::from_vec(index, n, m.device())?;
                let pick = Tensor::arange(0u32, rows as u32, m.device())?;
                let run = || -> Result<Tensor> { crate::argmax::argmax_rows(&m.forward_paged_pick(&ids, pool, &pass, &pick)?) };
                let _cache = dev.enable_cuda_graph_htod_cache();
                let warm = run()?;
                let stream = dev.cuda_stream();
                stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(|e| graph_err("capture", e))?;
                let next = run().and_then(|next| {
                    ids.slice_set(&next, 0, 0)?;
                    Ok(next)
                });
                let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
                let next = next?;
                let graph = graph.map_err(|e| graph_err("instantiate", e))?.ok_or_else(|| graph_err("capture", "nothing was captured"))?;
                // The warm-up was this step: feed its ids to the next replay.
                ids.slice_set(&warm, 0, 0)?;
                self.current = Some(Captured { rows, next, _ids: ids, index: pass.index.clone(), graph });
                return Ok(self.warm.insert(warm));
            }
            _ => return Err(ModelError::Input(format!("a decode step of {rows} rows without its input ids"))),
        }
        let c = self.current.as_mut().expect("matched above");
        c.graph.launch().map_err(|e| graph_err("launch", e))?;
        Ok(&c.next)
    }
}

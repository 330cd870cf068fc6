//! CUDA graphs of the token decoder's greedy block.
//!
//! A greedy block is a fixed sequence of about a hundred small kernels per
//! token step (six layers of norm, four matmuls, bias, KV write, attention,
//! residual; then the head and an argmax). At the batch sizes the token
//! decoder runs, the host needs about as long to issue them through candle as
//! the GPU needs to run them, so a block costs its launch time rather than its
//! device time. Captured once per batch shape and replayed, the block costs one
//! launch.
//!
//! What a capture needs, and how this module provides it:
//! - fixed addresses: the contexts are copied into an input buffer owned by the
//!   graph; the local cache and the passes' index tensors are allocated once by
//!   [`LocalKv`](blockserve_model::LocalKv); the weights never move;
//! - no host-to-device copies while capturing: candle's htod cache is on for
//!   the warm-up run and the capture, so the shape and stride vectors its
//!   kernels upload are uploaded once, before the capture, and reused;
//! - stream-ordered memory: candle allocates with `cuMemAllocAsync`, which a
//!   capture records as graph allocations. The block's `[rows, L]` ids are one
//!   of them; the graph is instantiated with auto-free-on-launch, so each
//!   replay frees and re-allocates it at the same address, where it is read.
//!
//! Batches are padded to a few row counts (buckets) so that a handful of graphs
//! serve every batch size; padded rows decode whatever context their slot last
//! held, and their ids are not read.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use candle_core::cuda_backend::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::{Device, Tensor};

use blockserve_model::ModelError;

use crate::token_batcher::bucket;

type Result<T> = std::result::Result<T, ModelError>;

/// One captured block: its input buffer, its output ids and the graph. Fields
/// drop in order, so the ids (a graph allocation) are freed before the graph.
struct Captured {
    input: Tensor,
    ids: Tensor,
    graph: CudaGraph,
}

/// The graphs of one token batcher, by bucket.
#[derive(Default)]
pub struct GreedyGraphs {
    captured: HashMap<usize, Captured>,
}

fn driver_err(what: &str, e: impl std::fmt::Debug) -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(format!("CUDA graph {what}: {e:?}")))
}

impl GreedyGraphs {
    /// The `[b, L]` ids of a greedy block over `contexts` `[b, D_b]`, where
    /// `block` runs the block on a `[rows, D_b]` context tensor and returns its
    /// ids on the device. Captures the bucket's graph on first use.
    pub fn decode(&mut self, contexts: &Tensor, max_rows: usize, block: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<Vec<Vec<u32>>> {
        let b = contexts.dim(0)?;
        let ids = self.launch(contexts, max_rows, block)?;
        Ok(blockserve_model::settled(&ids.narrow(0, 0, b)?, |t| t.to_vec2::<u32>())?)
    }

    /// Queue the block (replay its bucket's graph) without waiting for it; the
    /// returned `[rows, L]` ids (rows padded to the bucket) are valid until
    /// the same graph is launched again.
    pub fn launch(&mut self, contexts: &Tensor, max_rows: usize, block: &mut dyn FnMut(&Tensor) -> Result<Tensor>) -> Result<&Tensor> {
        let b = contexts.dim(0)?;
        let rows = bucket(b, max_rows);
        let Device::Cuda(dev) = contexts.device() else {
            return Err(ModelError::Input("CUDA graphs need a CUDA device".into()));
        };
        let c = match self.captured.entry(rows) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(slot) => {
                let input = Tensor::zeros((rows, contexts.dim(1)?), contexts.dtype(), contexts.device())?;
                let _cache = dev.enable_cuda_graph_htod_cache();
                // The warm-up run loads modules, plans the bucket's passes, sizes
                // cuBLAS's workspace and fills the htod cache, none of which may
                // happen inside a capture.
                block(&input)?;
                let stream = dev.cuda_stream();
                stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(|e| driver_err("capture", e))?;
                let ids = block(&input);
                let graph = stream.end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
                let ids = ids?;
                let graph = graph.map_err(|e| driver_err("instantiate", e))?.ok_or_else(|| driver_err("capture", "nothing was captured"))?;
                slot.insert(Captured { input, ids, graph })
            }
        };
        c.input.slice_set(contexts, 0, 0)?;
        c.graph.launch().map_err(|e| driver_err("launch", e))?;
        Ok(&c.ids)
    }

    /// How many graphs are held (one per bucket used so far).
    pub fn len(&self) -> usize {
        self.captured.len()
    }

    pub fn is_empty(&self) -> bool {
        self.captured.is_empty()
    }
}

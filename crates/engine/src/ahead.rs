//! Greedy rounds launched ahead (CUDA builds): the token decoder queues a
//! round behind the one the GPU is running and settles the earlier round's
//! blocks (stop checks, the blocks up, the session events) while the later one
//! computes.
//!
//! A round needs its own local cache, graphs (whose ids buffer a replay
//! overwrites) and page-locked buffers for the upload and the readback, so
//! two rounds in flight take two lanes, used alternately. A lane is free again
//! once its round is finished; rounds finish in launch order.

use blockserve_model::pinned::{Done, Pinned};
use blockserve_model::{BlockTransformer, LocalKv, ModelError};
use candle_core::Device;

use crate::cuda_graph::GreedyGraphs;
use crate::token_batcher::{greedy_block, HostContexts};

type Result<T> = std::result::Result<T, ModelError>;

struct Lane {
    local: LocalKv,
    graphs: GreedyGraphs,
    upload: Pinned,
    ids: Pinned,
    /// Launched and not yet finished.
    busy: bool,
}

/// The two lanes and which one the next launch takes.
pub struct Lanes {
    lanes: [Lane; 2],
    next: usize,
    max_batch: usize,
}

/// A round in flight: its lane, its rows and what signals its blocks' arrival.
pub struct Ticket {
    lane: usize,
    rows: usize,
    done: Done,
}

impl Ticket {
    pub fn done(&self) -> Done {
        self.done.clone()
    }
}

impl Lanes {
    pub fn new(m: &BlockTransformer, max_batch: usize) -> Result<Self> {
        let Device::Cuda(dev) = m.device() else { return Err(ModelError::Input("rounds launched ahead need a CUDA device".into())) };
        let d = m.config.block_decoder.hidden_size;
        let lane = || -> Result<Lane> {
            Ok(Lane {
                local: m.token_decoder().new_local(max_batch, m.dtype(), m.device())?,
                graphs: GreedyGraphs::default(),
                upload: Pinned::new(dev, max_batch * d * m.dtype().size_in_bytes())?,
                ids: Pinned::new(dev, max_batch * m.block_length() * 4)?,
                busy: false,
            })
        };
        Ok(Self { lanes: [lane()?, lane()?], next: 0, max_batch })
    }

    /// Upload the contexts and replay the greedy block's graph in the next lane.
    pub fn launch(&mut self, m: &BlockTransformer, contexts: HostContexts) -> Result<Ticket> {
        let Device::Cuda(dev) = m.device() else { unreachable!("lanes are made on CUDA only") };
        let i = self.next;
        let lane = &mut self.lanes[i];
        if lane.busy {
            return Err(ModelError::Input("a third round launched before the first finished".into()));
        }
        let d = m.config.block_decoder.hidden_size;
        let ctx = lane.upload.upload(contexts.bytes, contexts.dtype, (contexts.rows, d), dev)?;
        let local = &mut lane.local;
        let ids = lane.graphs.launch(&ctx, self.max_batch, &mut |ctx| greedy_block(m, local, ctx))?;
        lane.ids.read(&ids.narrow(0, 0, contexts.rows)?)?;
        lane.busy = true;
        self.next = 1 - i;
        Ok(Ticket { lane: i, rows: contexts.rows, done: lane.ids.done() })
    }

    /// The round's `[rows]` blocks of `l` tokens, once they are on the host.
    pub fn finish(&mut self, t: Ticket, l: usize) -> Result<Vec<Vec<u32>>> {
        let lane = &mut self.lanes[t.lane];
        let flat = lane.ids.take_u32()?;
        lane.busy = false;
        debug_assert_eq!(flat.len(), t.rows * l);
        Ok(flat.chunks(l).map(<[u32]>::to_vec).collect())
    }
}

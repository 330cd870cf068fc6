//! Paged key/value storage shared by every GPT-NeoX stack of a model.
//!
//! One [`KvPool`] holds, per layer, a preallocated tensor of `pages * page_size`
//! slots; each slot is one position's keys and values for all heads. A sequence
//! owns a list of pages ([`SeqKv`]) taken from the pool's free list and returned
//! when it ends, so admission is a question of free pages, a step writes only
//! the new positions, and attention reads every row's history in place, whatever
//! its length (no padding to the longest row, no copies of old positions).
//!
//! A forward pass is described once by a [`PagedPass`]: for each new token its
//! slot, its position and its row, and for each row its page table. Its index is
//! uploaded to the device once and read by every layer's two kernels
//! ([`ops`]): write the rotated key and the value of each new token into its
//! slot, then attend for each new token over its row's positions `0..=pos`.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod ops;

use candle_core::{DType, Device, Tensor};

use crate::config::GptNeoXConfig;
use crate::error::{ModelError, Result};

/// Most consecutive tokens of one row that the attention kernels take together
/// (the tensor-core kernel's tile of queries: four warps of 16).
const QUERY_GROUP: usize = 64;

/// Pages of KV storage for one GPT-NeoX stack.
pub struct KvPool {
    /// Per layer `[pages * page_size, 2, heads, head_dim]`: keys then values.
    layers: Vec<Tensor>,
    page_size: usize,
    num_pages: usize,
    free: Vec<u32>,
    max_positions: usize,
}

/// What a pool's storage is shaped by.
#[derive(Debug, Clone, Copy)]
pub struct PoolShape {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub max_positions: usize,
}

/// One sequence's pages (in order) and how many positions it holds. Owned by the
/// caller; give the pages back with [`KvPool::release`].
#[derive(Debug, Default)]
pub struct SeqKv {
    pages: Vec<u32>,
    len: usize,
}

impl SeqKv {
    /// A sequence over fixed pages (e.g. one page per row of a local cache).
    pub(crate) fn on_pages(pages: Vec<u32>) -> Self {
        Self { pages, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forget every position from `len` on (the pages stay with the sequence).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// A sequence whose first `len` positions are already in `pages` (pages
    /// another sequence wrote, shared through a prefix cache).
    pub fn from_prefix(pages: Vec<u32>, len: usize) -> Self {
        Self { pages, len }
    }

    /// The sequence's pages, in position order.
    pub fn pages(&self) -> &[u32] {
        &self.pages
    }

    /// Take every page out (the sequence is empty afterwards), for a caller
    /// that gives some back to the pool and keeps others.
    pub fn take_pages(&mut self) -> Vec<u32> {
        self.len = 0;
        std::mem::take(&mut self.pages)
    }
}

/// The layout of one forward pass over a pool (see the module docs).
pub struct PagedPass {
    /// u32: `[n, 3]` (slot, position, row) then `[rows, max_pages]` page tables.
    pub(crate) index: Tensor,
    pub(crate) tokens: usize,
    pub(crate) max_pages: usize,
    /// Longest history any new token attends over.
    pub(crate) max_keys: usize,
    /// Rows of the page tables, and the query groups after them.
    pub(crate) rows: usize,
    pub(crate) groups: usize,
    /// Positions per page of the pool the pass was planned on.
    pub(crate) page_size: usize,
    /// Largest query group (1 when every row adds one token).
    pub(crate) max_group: usize,
}

impl PagedPass {
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

impl KvPool {
    /// Bytes one position costs across all layers of `cfg` in `dtype`.
    pub(crate) fn bytes_per_position(cfg: &GptNeoXConfig, dtype: DType) -> usize {
        cfg.num_hidden_layers * 2 * cfg.hidden_size * dtype.size_in_bytes()
    }

    /// Preallocate `num_pages` pages of `page_size` positions for a stack.
    pub fn new(cfg: &GptNeoXConfig, num_pages: usize, page_size: usize, dtype: DType, device: &Device) -> Result<Self> {
        let shape =
            PoolShape { layers: cfg.num_hidden_layers, heads: cfg.num_attention_heads, head_dim: cfg.head_dim(), max_positions: cfg.max_position_embeddings };
        Self::with_shape(shape, num_pages, page_size, dtype, device)
    }

    /// A pool for any stack shape (kernel tests use it without a model).
    pub fn with_shape(shape: PoolShape, num_pages: usize, page_size: usize, dtype: DType, device: &Device) -> Result<Self> {
        if page_size == 0 || num_pages == 0 {
            return crate::error::input_err("a KV pool needs at least one page of at least one position");
        }
        let dims = (num_pages * page_size, 2, shape.heads, shape.head_dim);
        let layers = (0..shape.layers).map(|_| Tensor::zeros(dims, dtype, device)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { layers, page_size, num_pages, free: (0..num_pages as u32).rev().collect(), max_positions: shape.max_positions })
    }

    /// Layer `i`'s storage `[pages * page_size, 2, heads, head_dim]`.
    pub fn layer(&self, i: usize) -> &Tensor {
        &self.layers[i]
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    pub fn num_pages(&self) -> usize {
        self.num_pages
    }

    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Pages a sequence of `positions` positions needs.
    pub fn pages_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.page_size)
    }

    /// Make `seq` able to hold `positions` positions. Returns false, taking
    /// nothing, when the pool has too few free pages.
    pub fn reserve(&mut self, seq: &mut SeqKv, positions: usize) -> bool {
        let need = self.pages_for(positions).saturating_sub(seq.pages.len());
        if need > self.free.len() {
            return false;
        }
        let at = self.free.len() - need;
        seq.pages.extend(self.free.drain(at..));
        true
    }

    /// Give pages taken out of sequences back to the free list.
    pub fn give_back(&mut self, pages: impl IntoIterator<Item = u32>) {
        self.free.extend(pages);
    }

    /// Give a sequence's pages back; the sequence is empty afterwards.
    pub fn release(&mut self, seq: &mut SeqKv) {
        self.free.append(&mut seq.pages);
        seq.len = 0;
    }

    /// Lay out a pass in which row `i` appends `counts[i]` positions to `seqs[i]`
    /// (tokens in row order, each row's in position order). Takes pages as needed
    /// and advances every sequence's length.
    pub fn plan(&mut self, seqs: &mut [&mut SeqKv], counts: &[usize], device: &Device) -> Result<PagedPass> {
        let (index, mut pass) = self.plan_host(seqs, counts, 0)?;
        let n = index.len();
        pass.index = Tensor::from_vec(index, n, device)?;
        Ok(pass)
    }

    /// [`Self::plan`] without the upload: the index on the host, and the pass
    /// whose `index` the caller fills in (an empty placeholder here). Page
    /// tables are at least `min_pages` wide, so that passes of different
    /// lengths can share one layout (a captured decode step's).
    pub(crate) fn plan_host(&mut self, seqs: &mut [&mut SeqKv], counts: &[usize], min_pages: usize) -> Result<(Vec<u32>, PagedPass)> {
        if seqs.len() != counts.len() {
            return crate::error::input_err(format!("{} sequences but {} counts", seqs.len(), counts.len()));
        }
        let mut max_keys = 0;
        for (s, &c) in seqs.iter_mut().zip(counts) {
            let end = s.len + c;
            if end > self.max_positions {
                return crate::error::input_err(format!("position {} exceeds max_position_embeddings {}", end - 1, self.max_positions));
            }
            if !self.reserve(s, end) {
                return Err(ModelError::Capacity(format!(
                    "KV pool is full: {} more pages needed, {} free of {}",
                    self.pages_for(end) - s.pages.len(),
                    self.free.len(),
                    self.num_pages
                )));
            }
            max_keys = max_keys.max(end);
        }
        let tokens: usize = counts.iter().sum();
        let max_pages = seqs.iter().map(|s| s.pages.len()).max().unwrap_or(0).max(min_pages).max(1);
        let ps = self.page_size;
        let mut index = Vec::with_capacity(3 * tokens + seqs.len() * max_pages);
        for (row, (s, &c)) in seqs.iter().zip(counts).enumerate() {
            for p in s.len..s.len + c {
                index.extend([s.pages[p / ps] * ps as u32 + (p % ps) as u32, p as u32, row as u32]);
            }
        }
        for s in seqs.iter() {
            index.extend_from_slice(&s.pages);
            index.extend(std::iter::repeat_n(0, max_pages - s.pages.len()));
        }
        // Query groups: each row's new tokens in runs of up to QUERY_GROUP.
        let max_group = counts.iter().copied().max().unwrap_or(1).clamp(1, QUERY_GROUP);
        let mut groups = 0;
        let mut first = 0u32;
        for &c in counts {
            for start in (0..c).step_by(max_group) {
                index.extend([first + start as u32, (max_group.min(c - start)) as u32]);
                groups += 1;
            }
            first += c as u32;
        }
        for (s, &c) in seqs.iter_mut().zip(counts) {
            s.len += c;
        }
        let placeholder = Tensor::zeros(0, candle_core::DType::U32, &Device::Cpu)?;
        Ok((index, PagedPass { index: placeholder, tokens, max_pages, max_keys, rows: seqs.len(), groups, page_size: ps, max_group }))
    }
}

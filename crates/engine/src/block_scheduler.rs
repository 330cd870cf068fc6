//! The block decoder's scheduler (continuous batching with chunked prefill).
//!
//! A session is submitted with its padded prompt and the most blocks it may
//! generate. It waits until the KV pool has pages for all of them (admission by
//! free memory, first come first served, so nothing is preempted or runs out
//! mid-generation), then its prompt is prefilled in chunks. Each [`iterate`]
//! is one forward pass: first one block for every running session that sent one
//! (decode never waits behind a long prompt), then prompt chunks, oldest first,
//! until the pass holds `token_budget` blocks.
//!
//! [`iterate`]: BlockScheduler::iterate

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use blockserve_model::{BlockTransformer, KvPool, ModelError, SeqKv};
use candle_core::Tensor;

type Result<T> = std::result::Result<T, ModelError>;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Pages in the block-level KV pool.
    pub kv_pages: usize,
    /// Blocks per page.
    pub page_size: usize,
    /// Most new blocks (decode rows plus prompt chunks) in one pass.
    pub token_budget: usize,
}

impl SchedulerConfig {
    /// A pool of `kv_bytes` for `model` with 16-block pages.
    pub fn for_memory(model: &BlockTransformer, kv_bytes: usize, token_budget: usize) -> Self {
        let page_size = 16;
        let page = model.block_decoder().bytes_per_block(model.dtype()) * page_size;
        Self { kv_pages: (kv_bytes / page).max(1), page_size, token_budget: token_budget.max(1) }
    }
}

struct Session {
    kv: SeqKv,
    /// The padded prompt's ids (whole blocks).
    prompt: Vec<u32>,
    /// Prompt blocks already in the cache.
    prefilled: usize,
    /// Blocks to reserve at admission: prompt plus the most it may generate.
    reserve: usize,
}

impl Session {
    fn prompt_blocks(&self, l: usize) -> usize {
        self.prompt.len() / l
    }
}

/// The contexts one iteration produced: row i of `tensor` `[k, D_b]` belongs to
/// session `rows[i].0` and is the output at its block `rows[i].1` (so it
/// conditions block `rows[i].1 + 1`).
pub struct Contexts {
    pub tensor: Tensor,
    pub rows: Vec<(u64, u32)>,
    /// New blocks the pass held: decode rows and prompt blocks.
    pub decode_rows: usize,
    pub prefill_blocks: usize,
}

pub struct BlockScheduler {
    model: Arc<BlockTransformer>,
    pool: KvPool,
    config: SchedulerConfig,
    sessions: HashMap<u64, Session>,
    /// Submitted, waiting for pages.
    waiting: VecDeque<u64>,
    /// Admitted, prompt not wholly in the cache yet.
    prefilling: VecDeque<u64>,
    /// One block per running session, for the next pass.
    pending: Vec<(u64, Vec<u32>)>,
}

impl BlockScheduler {
    pub fn new(model: Arc<BlockTransformer>, config: SchedulerConfig) -> Result<Self> {
        let pool = model.block_decoder().new_pool(config.kv_pages, config.page_size, model.dtype(), model.device())?;
        Ok(Self { model, pool, config, sessions: HashMap::new(), waiting: VecDeque::new(), prefilling: VecDeque::new(), pending: vec![] })
    }

    /// KV pages in use and free.
    pub fn kv_pages(&self) -> (usize, usize) {
        let free = self.pool.free_pages();
        (self.pool.num_pages() - free, free)
    }

    pub fn model(&self) -> &Arc<BlockTransformer> {
        &self.model
    }

    /// Sessions holding KV pages or waiting for them.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Sessions whose prompt is in the cache (they send blocks).
    pub fn decoding(&self) -> usize {
        self.sessions.len() - self.waiting.len() - self.prefilling.len()
    }

    /// Blocks queued for the next pass.
    pub fn pending_blocks(&self) -> usize {
        self.pending.len()
    }

    /// Whether the next pass has prompt work (admission or prefill chunks).
    pub fn has_prefill(&self) -> bool {
        !self.prefilling.is_empty() || (!self.waiting.is_empty() && self.can_admit_head())
    }

    /// Whether an iteration would do anything.
    pub fn has_work(&self) -> bool {
        !self.pending.is_empty() || !self.prefilling.is_empty() || (!self.waiting.is_empty() && self.can_admit_head())
    }

    /// Move the pending blocks of sessions `first` picks ahead of the others
    /// (each group keeps its order), so that [`iterate_with`] takes them;
    /// returns how many were picked.
    ///
    /// [`iterate_with`]: Self::iterate_with
    pub fn put_first(&mut self, first: impl Fn(u64) -> bool) -> usize {
        let (mut picked, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending).into_iter().partition(|(k, _)| first(*k));
        let n = picked.len();
        picked.extend(rest);
        self.pending = picked;
        n
    }

    /// Queue a session: `prompt` is the padded prompt (whole blocks) and
    /// `max_new_blocks` the most blocks it will send after it.
    pub fn submit(&mut self, key: u64, prompt: Vec<u32>, max_new_blocks: usize) -> Result<()> {
        let l = self.model.block_length();
        if prompt.is_empty() || !prompt.len().is_multiple_of(l) {
            return Err(ModelError::Input(format!("prompt_ids: {} ids is not a positive whole number of {l}-token blocks", prompt.len())));
        }
        if self.sessions.contains_key(&key) {
            return Err(ModelError::Input(format!("session key {key} is already open")));
        }
        let reserve = prompt.len() / l + max_new_blocks;
        let max_blocks = self.model.block_decoder().max_blocks();
        if reserve > max_blocks {
            return Err(ModelError::Input(format!(
                "prompt ({} blocks) + max_new_blocks ({max_new_blocks}) exceeds the block decoder's {max_blocks} blocks",
                prompt.len() / l
            )));
        }
        if self.pool.pages_for(reserve) > self.pool.num_pages() {
            return Err(ModelError::Capacity(format!(
                "a session of {reserve} blocks needs {} KV pages; the pool has {}",
                self.pool.pages_for(reserve),
                self.pool.num_pages()
            )));
        }
        self.sessions.insert(key, Session { kv: SeqKv::default(), prompt, prefilled: 0, reserve });
        self.waiting.push_back(key);
        Ok(())
    }

    /// Queue the next block (L ids) of a running session for the next pass.
    pub fn push_block(&mut self, key: u64, ids: Vec<u32>) -> Result<()> {
        let l = self.model.block_length();
        let s = self.sessions.get(&key).ok_or_else(|| ModelError::Input(format!("no open session {key}")))?;
        if s.prefilled < s.prompt_blocks(l) {
            return Err(ModelError::Input(format!("session {key} is still prefilling")));
        }
        if ids.len() != l {
            return Err(ModelError::Input(format!("a block holds {l} ids, got {}", ids.len())));
        }
        // Past its reservation a session's cache grows page by page while the
        // pool has free pages; the pass fails with a capacity error if not.
        self.pending.push((key, ids));
        Ok(())
    }

    /// End a session wherever it is and return its pages (idempotent).
    pub fn close(&mut self, key: u64) {
        if let Some(mut s) = self.sessions.remove(&key) {
            self.pool.release(&mut s.kv);
            self.waiting.retain(|&k| k != key);
            self.prefilling.retain(|&k| k != key);
            self.pending.retain(|(k, _)| *k != key);
        }
    }

    /// Run a two-block prompt and one decode block through the pool and free
    /// them again, so device modules are loaded (and JIT-compiled) before the
    /// first request instead of during it.
    pub fn warm_up(&mut self) -> Result<()> {
        let l = self.model.block_length();
        let key = u64::MAX;
        self.submit(key, vec![0; 2 * l], 1)?;
        let out = (|| {
            while self.iterate()?.is_some_and(|c| c.rows.is_empty()) {}
            self.push_block(key, vec![0; l])?;
            self.iterate()?;
            Ok(())
        })();
        self.close(key);
        out
    }

    /// Contexts of every block of `ids` (whole blocks) in a pass of their own,
    /// keeping nothing (scoring). Needs free pages for them.
    pub fn contexts(&mut self, ids: &[u32]) -> Result<Tensor> {
        let l = self.model.block_length();
        if ids.is_empty() || !ids.len().is_multiple_of(l) {
            return Err(ModelError::Input(format!("token_ids: {} ids is not a positive whole number of {l}-token blocks", ids.len())));
        }
        let mut kv = SeqKv::default();
        let out = self.pool.plan(&mut [&mut kv], &[ids.len() / l], self.model.device()).and_then(|pass| {
            let m = &self.model;
            m.block_decoder().forward_paged(&m.embed_ids(ids)?, &self.pool, &pass)
        });
        self.pool.release(&mut kv);
        out
    }

    fn can_admit_head(&self) -> bool {
        self.waiting.front().is_some_and(|k| self.pool.pages_for(self.sessions[k].reserve) <= self.pool.free_pages())
    }

    /// Admit waiting sessions in order while their reservations fit.
    fn admit(&mut self) {
        while self.can_admit_head() {
            let key = self.waiting.pop_front().expect("head checked");
            let s = self.sessions.get_mut(&key).expect("waiting sessions exist");
            let ok = self.pool.reserve(&mut s.kv, s.reserve);
            debug_assert!(ok, "admission checked the free pages");
            self.prefilling.push_back(key);
        }
    }

    /// One pass: pending blocks, then prompt chunks up to the budget. Returns the
    /// contexts that sessions are waiting for (one per decode row, one per prompt
    /// finished), or None when there was nothing to do.
    pub fn iterate(&mut self) -> Result<Option<Contexts>> {
        self.iterate_with(usize::MAX)
    }

    /// [`iterate`](Self::iterate) with at most `max_decode_rows` pending blocks,
    /// the longest waiting first; the rest wait for the next pass (a serving
    /// tier splits its sessions into micro-batches this way).
    pub fn iterate_with(&mut self, max_decode_rows: usize) -> Result<Option<Contexts>> {
        self.admit();
        let l = self.model.block_length();
        let decode_rows = self.pending.len().min(max_decode_rows);
        // (key, new blocks, emits a context)
        let mut rows: Vec<(u64, usize, bool)> = Vec::with_capacity(decode_rows + self.prefilling.len());
        let mut ids: Vec<u32> = Vec::with_capacity((decode_rows + self.config.token_budget) * l);
        for (key, block) in self.pending.drain(..decode_rows) {
            ids.extend_from_slice(&block);
            rows.push((key, 1, true));
        }
        let mut left = self.config.token_budget.saturating_sub(decode_rows);
        let mut prefill_blocks = 0;
        for &key in &self.prefilling {
            if left == 0 {
                break;
            }
            let s = &self.sessions[&key];
            let n = (s.prompt_blocks(l) - s.prefilled).min(left);
            ids.extend_from_slice(&s.prompt[s.prefilled * l..(s.prefilled + n) * l]);
            rows.push((key, n, s.prefilled + n == s.prompt_blocks(l)));
            left -= n;
            prefill_blocks += n;
        }
        if rows.is_empty() {
            return Ok(None);
        }
        // Borrow every row's sequence out of the map for the plan.
        let mut seqs: Vec<SeqKv> = rows.iter().map(|(k, _, _)| std::mem::take(&mut self.sessions.get_mut(k).expect("row of a live session").kv)).collect();
        let counts: Vec<usize> = rows.iter().map(|r| r.1).collect();
        let planned = {
            let mut refs: Vec<&mut SeqKv> = seqs.iter_mut().collect();
            self.pool.plan(&mut refs, &counts, self.model.device())
        };
        let mut out_rows = vec![];
        let mut picks = vec![];
        let mut end = 0u32;
        for ((key, n, emits), kv) in rows.iter().zip(seqs) {
            end += *n as u32;
            let s = self.sessions.get_mut(key).expect("row of a live session");
            s.kv = kv;
            if *emits {
                out_rows.push((*key, s.kv.len() as u32 - 1));
                picks.push(end - 1);
            }
        }
        let pass = planned?;
        for (key, n, _) in &rows[decode_rows..] {
            let s = self.sessions.get_mut(key).expect("row of a live session");
            s.prefilled += n;
        }
        let sessions = &self.sessions;
        self.prefilling.retain(|k| sessions[k].prefilled < sessions[k].prompt_blocks(l));
        let m = &self.model;
        let contexts = m.block_decoder().forward_paged(&m.embed_ids(&ids)?, &self.pool, &pass)?;
        let tensor = contexts.index_select(&Tensor::new(picks, m.device())?, 0)?;
        Ok(Some(Contexts { tensor, rows: out_rows, decode_rows, prefill_blocks }))
    }
}

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
//! With the prefix cache on ([`SchedulerConfig::prefix_cache`]), a session
//! starts from the cached pages of its prompt's longest cached prefix and
//! prefills only the rest; its own whole pages, of prompt and of generated
//! blocks, join the cache as they are written. A session whose next page
//! another session is writing right now waits for it (sessions behind it are
//! admitted meanwhile) rather than computing it twice. Idle cached pages count as free memory: admission and
//! growth evict them, least recently used first.
//!
//! [`iterate`]: BlockScheduler::iterate

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use blockserve_model::{BlockTransformer, KvPool, ModelError, SeqKv};
use candle_core::Tensor;

use crate::prefix_cache::{page_hash, page_hashes, CacheStats, PrefixCache};

type Result<T> = std::result::Result<T, ModelError>;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Pages in the block-level KV pool.
    pub kv_pages: usize,
    /// Blocks per page.
    pub page_size: usize,
    /// Most new blocks (decode rows plus prompt chunks) in one pass.
    pub token_budget: usize,
    /// Keep whole prompt pages for later sessions with the same prefix.
    pub prefix_cache: bool,
}

impl SchedulerConfig {
    /// A pool of `kv_bytes` for `model` with pages of
    /// [`KV_PAGE_BLOCKS`](blockserve_config::prefix::KV_PAGE_BLOCKS) blocks.
    pub fn for_memory(model: &BlockTransformer, kv_bytes: usize, token_budget: usize) -> Self {
        let page_size = blockserve_config::prefix::KV_PAGE_BLOCKS;
        let page = model.block_decoder().bytes_per_block(model.dtype()) * page_size;
        Self { kv_pages: (kv_bytes / page).max(1), page_size, token_budget: token_budget.max(1), prefix_cache: false }
    }
}

struct Session {
    kv: SeqKv,
    /// The prompt's ids (whole blocks), followed, with the cache on, by every
    /// block pushed since (to name the pages they fill).
    ids: Vec<u32>,
    prompt_blocks: usize,
    /// Prompt blocks already in the cache.
    prefilled: usize,
    /// Blocks to reserve at admission: prompt plus the most it may generate.
    reserve: usize,
    /// Chain hashes of the prompt's whole pages, then of each later page
    /// once written (none with the cache off).
    hashes: Vec<u64>,
    /// (page index, hash) of the pages this session holds in the cache.
    held: Vec<(usize, u64)>,
    /// Whole pages offered to the cache so far (or found there).
    offered: usize,
    /// Prompt blocks found in the cache at admission.
    reused_blocks: usize,
}

impl Session {
    /// Page `i`'s ids.
    fn page_ids(&self, i: usize, l: usize, page_size: usize) -> &[u32] {
        let per_page = l * page_size;
        &self.ids[i * per_page..(i + 1) * per_page]
    }

    /// Pages a lookup may take: never the page of the last prompt block,
    /// whose context the session needs from a pass of its own.
    fn reusable_pages(&self, page_size: usize) -> usize {
        self.hashes.len().min((self.prompt_blocks - 1) / page_size)
    }
}

/// Where the head of a queue stands.
enum Admission {
    /// Its next page is being written by another session: wait for it.
    Defer,
    /// Not enough free (or evictable) pages.
    NoRoom,
    /// Admit, starting from `found` cached pages.
    Fits { found: usize },
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
    cache: PrefixCache,
    /// Pages admitted sessions are writing and will offer to the cache, by
    /// hash, with the session writing each.
    inflight: HashMap<u64, u64>,
}

impl BlockScheduler {
    pub fn new(model: Arc<BlockTransformer>, config: SchedulerConfig) -> Result<Self> {
        let pool = model.block_decoder().new_pool(config.kv_pages, config.page_size, model.dtype(), model.device())?;
        Ok(Self {
            model,
            pool,
            config,
            sessions: HashMap::new(),
            waiting: VecDeque::new(),
            prefilling: VecDeque::new(),
            pending: vec![],
            cache: PrefixCache::default(),
            inflight: HashMap::new(),
        })
    }

    /// KV pages in use by sessions, free, and cached with no session holding
    /// them (free at the cost of an eviction).
    pub fn kv_pages(&self) -> (usize, usize, usize) {
        let (free, idle) = (self.pool.free_pages(), self.cache.idle());
        (self.pool.num_pages() - free - idle, free, idle)
    }

    /// The prefix cache's pages (held or idle) and what it did so far.
    pub fn prefix_cache(&self) -> (usize, CacheStats) {
        (self.cache.pages(), self.cache.stats())
    }

    /// Prompt blocks session `key` found in the prefix cache (0 before admission).
    pub fn reused_blocks(&self, key: u64) -> Option<usize> {
        self.sessions.get(&key).map(|s| s.reused_blocks)
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
        !self.prefilling.is_empty() || self.next_admission().is_some()
    }

    /// Whether an iteration would do anything.
    pub fn has_work(&self) -> bool {
        !self.pending.is_empty() || self.has_prefill()
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
        let hashes = if self.config.prefix_cache { page_hashes(&prompt, l, self.config.page_size) } else { vec![] };
        let prompt_blocks = prompt.len() / l;
        let s = Session { kv: SeqKv::default(), ids: prompt, prompt_blocks, prefilled: 0, reserve, hashes, held: vec![], offered: 0, reused_blocks: 0 };
        self.sessions.insert(key, s);
        self.waiting.push_back(key);
        Ok(())
    }

    /// Queue the next block (L ids) of a running session for the next pass.
    pub fn push_block(&mut self, key: u64, ids: Vec<u32>) -> Result<()> {
        let l = self.model.block_length();
        let s = self.sessions.get_mut(&key).ok_or_else(|| ModelError::Input(format!("no open session {key}")))?;
        if s.prefilled < s.prompt_blocks {
            return Err(ModelError::Input(format!("session {key} is still prefilling")));
        }
        if ids.len() != l {
            return Err(ModelError::Input(format!("a block holds {l} ids, got {}", ids.len())));
        }
        if self.config.prefix_cache {
            s.ids.extend_from_slice(&ids);
        }
        // Past its reservation a session's cache grows page by page while the
        // pool has free pages; the pass fails with a capacity error if not.
        self.pending.push((key, ids));
        Ok(())
    }

    /// End a session wherever it is and return its pages (idempotent): those
    /// it holds in the cache stay there, the others go back to the pool.
    pub fn close(&mut self, key: u64) {
        if let Some(mut s) = self.sessions.remove(&key) {
            let mut pages: Vec<Option<u32>> = s.kv.take_pages().into_iter().map(Some).collect();
            for &(i, hash) in &s.held {
                self.cache.release(hash);
                pages[i] = None;
            }
            self.pool.give_back(pages.into_iter().flatten());
            for h in &s.hashes[s.offered.min(s.hashes.len())..] {
                if self.inflight.get(h) == Some(&key) {
                    self.inflight.remove(h);
                }
            }
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
        self.make_room(self.pool.pages_for(ids.len() / l));
        let out = self.pool.plan(&mut [&mut kv], &[ids.len() / l], self.model.device()).and_then(|pass| {
            let m = &self.model;
            m.block_decoder().forward_paged(&m.embed_ids(ids)?, &self.pool, &pass)
        });
        self.pool.release(&mut kv);
        out
    }

    /// Evict idle cached pages until the pool has `pages` free (or no idle
    /// page is left).
    fn make_room(&mut self, pages: usize) {
        while self.pool.free_pages() < pages {
            match self.cache.evict() {
                Some(page) => self.pool.give_back([page]),
                None => break,
            }
        }
    }

    /// Whether waiting session `key` can be admitted now.
    fn admission(&self, key: u64) -> Admission {
        let s = &self.sessions[&key];
        let (l, ps) = (self.model.block_length(), self.config.page_size);
        let usable = s.reusable_pages(ps);
        let pages: Vec<&[u32]> = (0..usable).map(|i| s.page_ids(i, l, ps)).collect();
        let (found, idle_found) = self.cache.lookup(&s.hashes[..usable], &pages);
        if found < usable && self.inflight.contains_key(&s.hashes[found]) {
            return Admission::Defer;
        }
        let need = self.pool.pages_for(s.reserve) - found;
        if need <= self.pool.free_pages() + self.cache.idle() - idle_found {
            Admission::Fits { found }
        } else {
            Admission::NoRoom
        }
    }

    /// The first waiting session that can be admitted now, with its place in
    /// the queue: sessions waiting for a page being written are passed over,
    /// the first that does not fit stops the search (first come, first served).
    fn next_admission(&self) -> Option<(usize, u64, usize)> {
        for (i, &key) in self.waiting.iter().enumerate() {
            match self.admission(key) {
                Admission::Defer => continue,
                Admission::NoRoom => return None,
                Admission::Fits { found } => return Some((i, key, found)),
            }
        }
        None
    }

    /// Admit waiting sessions in order while their reservations fit.
    fn admit(&mut self) {
        let ps = self.config.page_size;
        while let Some((at, key, found)) = self.next_admission() {
            self.waiting.remove(at);
            let s = self.sessions.get_mut(&key).expect("waiting sessions exist");
            let usable = s.reusable_pages(ps);
            let pages = self.cache.acquire(&s.hashes, found, usable);
            s.kv = SeqKv::from_prefix(pages, found * ps);
            s.prefilled = found * ps;
            s.reused_blocks = found * ps;
            s.held = (0..found).map(|i| (i, s.hashes[i])).collect();
            s.offered = found;
            for &h in &s.hashes[found..] {
                self.inflight.entry(h).or_insert(key);
            }
            let need = self.pool.pages_for(s.reserve) - found;
            self.make_room(need);
            let s = self.sessions.get_mut(&key).expect("waiting sessions exist");
            let ok = self.pool.reserve(&mut s.kv, s.reserve);
            debug_assert!(ok, "admission checked the free pages");
            self.prefilling.push_back(key);
        }
    }

    /// Offer the cache the whole pages `keys` filled in the pass that just
    /// ran: prompt pages, and pages of blocks the session generated
    /// (which a migrated or resumed session sends again as its prompt).
    fn offer_pages(&mut self, keys: &[u64]) {
        let (l, ps) = (self.model.block_length(), self.config.page_size);
        for key in keys {
            let s = self.sessions.get_mut(key).expect("row of a live session");
            let done = s.kv.len() / ps;
            for i in s.offered..done {
                let parent = if i == 0 { 0 } else { s.hashes[i - 1] };
                if i == s.hashes.len() {
                    s.hashes.push(page_hash(parent, s.page_ids(i, l, ps)));
                }
                let hash = s.hashes[i];
                if self.inflight.get(&hash) == Some(key) {
                    self.inflight.remove(&hash);
                }
                if self.cache.insert(hash, parent, s.page_ids(i, l, ps), s.kv.pages()[i]) {
                    s.held.push((i, hash));
                }
            }
            s.offered = s.offered.max(done);
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
            let n = (s.prompt_blocks - s.prefilled).min(left);
            ids.extend_from_slice(&s.ids[s.prefilled * l..(s.prefilled + n) * l]);
            rows.push((key, n, s.prefilled + n == s.prompt_blocks));
            left -= n;
            prefill_blocks += n;
        }
        if rows.is_empty() {
            return Ok(None);
        }
        // Borrow every row's sequence out of the map for the plan.
        let mut seqs: Vec<SeqKv> = rows.iter().map(|(k, _, _)| std::mem::take(&mut self.sessions.get_mut(k).expect("row of a live session").kv)).collect();
        let counts: Vec<usize> = rows.iter().map(|r| r.1).collect();
        // Growth past a reservation may take idle cached pages.
        let grow: usize = seqs.iter().zip(&counts).map(|(kv, c)| self.pool.pages_for(kv.len() + c).saturating_sub(kv.pages().len())).sum();
        self.make_room(grow);
        let planned = {
            let mut refs: Vec<&mut SeqKv> = seqs.iter_mut().collect();
            self.pool.plan(&mut refs, &counts, self.model.device())
        };
        let mut out_rows = vec![];
        let mut picks = vec![];
        // Sessions whose pass fills a page: offered to the cache after it.
        let mut filled = vec![];
        let (cache, ps) = (self.config.prefix_cache, self.config.page_size);
        let mut end = 0u32;
        for ((key, n, emits), kv) in rows.iter().zip(seqs) {
            end += *n as u32;
            let s = self.sessions.get_mut(key).expect("row of a live session");
            s.kv = kv;
            if cache && s.kv.len() / ps > s.offered {
                filled.push(*key);
            }
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
        self.prefilling.retain(|k| sessions[k].prefilled < sessions[k].prompt_blocks);
        let m = self.model.clone();
        let contexts = m.block_decoder().forward_paged(&m.embed_ids(&ids)?, &self.pool, &pass)?;
        let tensor = contexts.index_select(&Tensor::new(picks, m.device())?, 0)?;
        self.offer_pages(&filled);
        Ok(Some(Contexts { tensor, rows: out_rows, decode_rows, prefill_blocks }))
    }
}

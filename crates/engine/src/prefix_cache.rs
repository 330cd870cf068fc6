//! The block decoder's prefix cache: whole KV pages, found by content,
//! shared between sessions by reference count, evicted least recently used.
//!
//! A page holds `page_size` blocks. Page `i` of a prompt is named by a hash
//! chain, `h_i = H(h_{i-1}, ids of the page's blocks)`, so a page is found only
//! together with everything before it: its keys and values depend on every
//! earlier position, and on the positions themselves, which the chain fixes.
//! Each entry also keeps its parent and its ids, and a lookup compares them, so
//! a hash collision is a miss, never wrong keys.
//!
//! Only whole pages are cached, of prompt blocks and of the blocks a session
//! generated after them (a migrated or resumed session sends its output
//! again as part of its prompt); a page is never written again once whole.
//! Pages nobody holds stay in the cache until the pool needs them:
//! [`PrefixCache::evict`] hands back the least recently used one. A page some
//! session holds is never evicted, so an admitted session never loses its
//! prefix.

use std::collections::{BTreeMap, HashMap};

pub use blockserve_config::prefix::page_hash;

/// The chain hash of every whole page of `ids` (blocks of `block_len` ids,
/// pages of `page_size` blocks).
pub fn page_hashes(ids: &[u32], block_len: usize, page_size: usize) -> Vec<u64> {
    blockserve_config::prefix::page_chain(ids, block_len * page_size)
}

struct Entry {
    page: u32,
    parent: u64,
    ids: Box<[u32]>,
    /// Sessions holding the page.
    refs: u32,
    /// When it was last released (its key in the LRU while nobody holds it).
    tick: u64,
}

/// What the cache did, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Prompt pages looked up at admission, and found.
    pub looked_up: u64,
    pub hits: u64,
    pub evictions: u64,
}

#[derive(Default)]
pub struct PrefixCache {
    entries: HashMap<u64, Entry>,
    /// Entries nobody holds, by the tick they were released at (oldest first).
    idle: BTreeMap<u64, u64>,
    tick: u64,
    stats: CacheStats,
}

impl PrefixCache {
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Pages the cache holds (held by sessions or idle).
    pub fn pages(&self) -> usize {
        self.entries.len()
    }

    /// Pages nobody holds: free for the pool at the cost of an eviction.
    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    fn matches(&self, hash: u64, parent: u64, ids: &[u32]) -> Option<&Entry> {
        self.entries.get(&hash).filter(|e| e.parent == parent && *e.ids == *ids)
    }

    /// How many leading pages of a prompt are cached, and how many of those
    /// are idle (admitting the prompt takes them off the idle list).
    /// `pages[i]` is page i's ids, `hashes` their chain.
    pub fn lookup(&self, hashes: &[u64], pages: &[&[u32]]) -> (usize, usize) {
        let (mut found, mut idle) = (0, 0);
        let mut parent = 0;
        for (&h, ids) in hashes.iter().zip(pages) {
            match self.matches(h, parent, ids) {
                Some(e) => {
                    found += 1;
                    idle += usize::from(e.refs == 0);
                }
                None => break,
            }
            parent = h;
        }
        (found, idle)
    }

    /// Hold the first `n` pages of a prompt that [`lookup`](Self::lookup)
    /// found; returns them in order.
    pub fn acquire(&mut self, hashes: &[u64], n: usize, asked: usize) -> Vec<u32> {
        self.stats.looked_up += asked as u64;
        self.stats.hits += n as u64;
        hashes[..n]
            .iter()
            .map(|h| {
                let e = self.entries.get_mut(h).expect("acquired pages were looked up");
                if e.refs == 0 {
                    self.idle.remove(&e.tick);
                }
                e.refs += 1;
                e.page
            })
            .collect()
    }

    /// Offer a page a session has just completed, held by that session. False
    /// (the page stays the session's own) when an equal page is already cached.
    pub fn insert(&mut self, hash: u64, parent: u64, ids: &[u32], page: u32) -> bool {
        if self.entries.contains_key(&hash) {
            return false;
        }
        self.entries.insert(hash, Entry { page, parent, ids: ids.into(), refs: 1, tick: 0 });
        true
    }

    /// A session lets go of a cached page; nobody holding it makes it idle.
    pub fn release(&mut self, hash: u64) {
        let e = self.entries.get_mut(&hash).expect("released pages are cached");
        e.refs -= 1;
        if e.refs == 0 {
            self.tick += 1;
            e.tick = self.tick;
            self.idle.insert(self.tick, hash);
        }
    }

    /// Drop the least recently used idle page; returns it for the pool.
    pub fn evict(&mut self) -> Option<u32> {
        let (_, hash) = self.idle.pop_first()?;
        self.stats.evictions += 1;
        self.entries.remove(&hash).map(|e| e.page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_found_only_with_its_whole_prefix() {
        // Pages of 2 blocks of 2 ids.
        let a: Vec<u32> = (1..=12).collect();
        let mut b = a.clone();
        b[1] = 99; // differs in page 0 only
        let (ha, hb) = (page_hashes(&a, 2, 2), page_hashes(&b, 2, 2));
        assert_eq!(ha.len(), 3);
        assert_ne!(ha[0], hb[0]);
        assert_ne!(ha[2], hb[2], "page 2's ids agree, its prefix does not");
        let pages = |v: &[u32]| v.chunks(4).map(|c| c.to_vec()).collect::<Vec<_>>();
        let (pa, pb) = (pages(&a), pages(&b));
        fn refs(p: &[Vec<u32>]) -> Vec<&[u32]> {
            p.iter().map(Vec::as_slice).collect()
        }

        let mut c = PrefixCache::default();
        let mut parent = 0;
        for (i, &h) in ha.iter().enumerate() {
            assert!(c.insert(h, parent, &pa[i], 10 + i as u32));
            parent = h;
        }
        assert_eq!(c.lookup(&ha, &refs(&pa)), (3, 0));
        assert_eq!(c.lookup(&hb, &refs(&pb)), (0, 0));
        // The same hash with other ids (a collision) is a miss.
        assert_eq!(c.lookup(&ha, &[&[0, 0, 0, 0][..], &pa[1], &pa[2]]), (0, 0));
    }

    #[test]
    fn held_pages_are_never_evicted_and_idle_ones_go_oldest_first() {
        let ids: Vec<u32> = (0..8).collect();
        let h = page_hashes(&ids, 2, 2);
        let mut c = PrefixCache::default();
        assert!(c.insert(h[0], 0, &ids[..4], 7));
        assert!(c.insert(h[1], h[0], &ids[4..], 8));
        assert!(!c.insert(h[1], h[0], &ids[4..], 9), "an equal page is cached already");
        assert_eq!(c.evict(), None, "both held by their writer");
        c.release(h[1]);
        c.release(h[0]);
        assert_eq!((c.pages(), c.idle()), (2, 2));
        // A second session takes page 0 again: only page 1 can go.
        assert_eq!(c.lookup(&h, &[&ids[..4], &ids[4..]]), (2, 2));
        assert_eq!(c.acquire(&h, 1, 2), vec![7]);
        assert_eq!(c.evict(), Some(8));
        assert_eq!(c.evict(), None);
        c.release(h[0]);
        assert_eq!(c.evict(), Some(7));
        assert_eq!(c.stats(), CacheStats { looked_up: 2, hits: 1, evictions: 2 });
    }
}

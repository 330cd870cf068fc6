//! Prefix-aware choice of block decoder (`--prefix-routing`): a session goes
//! to the block decoder that most likely holds its prompt's longest cached
//! prefix, unless that one is overloaded.
//!
//! The router does not ask the block decoders what they cache. It remembers
//! where it sent each prompt page (the block decoder's unit of caching: 16
//! blocks of the prompt as the token decoder lays it out), by a hash chain over the pages, in a bounded map that
//! forgets the least recently routed pages first. Like any router-side index
//! it is a guess: a block decoder may have evicted a page, and another router
//! may have sent the same prefix elsewhere. A wrong guess costs only a
//! prefill, never a wrong token.

use std::collections::{BTreeMap, HashMap};

use blockserve_config::prefix::{page_chain, KV_PAGE_BLOCKS as PAGE_BLOCKS};
use blockserve_config::PromptLayout;

/// Pages the index remembers (about 60 MB at most).
pub const DEFAULT_CAPACITY: usize = 1 << 20;

/// The chain hashes of the whole prompt pages the block decoder could reuse
/// for `prompt`: laid out in whole blocks of `block_length` as the token
/// decoder sends it (padded in front, or not, by `layout`), and never the page
/// of the last whole block (which the block decoder always computes).
pub fn page_hashes(prompt: &[u32], block_length: usize, layout: PromptLayout) -> Vec<u64> {
    let pad = layout.pad(prompt.len(), block_length);
    let blocks = (pad + prompt.len()) / block_length;
    let pages = blocks.saturating_sub(1) / PAGE_BLOCKS;
    let padded: Vec<u32> = std::iter::repeat_n(0, pad).chain(prompt.iter().copied()).take(pages * PAGE_BLOCKS * block_length).collect();
    page_chain(&padded, PAGE_BLOCKS * block_length)
}

/// Where the router sent each prompt page last.
pub struct PrefixIndex {
    /// Page hash -> (block decoder address, tick of its last use).
    pages: HashMap<u64, (String, u64)>,
    /// Tick -> page hash, oldest first.
    by_age: BTreeMap<u64, u64>,
    tick: u64,
    capacity: usize,
}

impl PrefixIndex {
    pub fn new(capacity: usize) -> Self {
        Self { pages: HashMap::new(), by_age: BTreeMap::new(), tick: 0, capacity: capacity.max(1) }
    }

    /// The block decoder the prompt's first page went to last, and how many
    /// leading pages went there with it.
    pub fn longest(&self, hashes: &[u64]) -> Option<(&str, usize)> {
        let (first, _) = self.pages.get(hashes.first()?)?;
        let n = hashes.iter().take_while(|h| self.pages.get(h).is_some_and(|(a, _)| a == first)).count();
        Some((first.as_str(), n))
    }

    /// Remember that the prompt's pages went to `address`. With `keep`, a
    /// page already placed elsewhere keeps its place (the session was sent
    /// elsewhere only because that block decoder was busy, and it still
    /// holds the page): otherwise every diversion would move a prefix's home
    /// and, under a burst, spread each prefix over every block decoder.
    pub fn record(&mut self, hashes: &[u64], address: &str, keep: bool) {
        for &h in hashes {
            self.tick += 1;
            let kept = keep && self.pages.get(&h).is_some_and(|(a, _)| a != address);
            let place = if kept { self.pages[&h].0.clone() } else { address.to_string() };
            if let Some((_, old)) = self.pages.insert(h, (place, self.tick)) {
                self.by_age.remove(&old);
            }
            self.by_age.insert(self.tick, h);
        }
        while self.pages.len() > self.capacity {
            let Some((_, h)) = self.by_age.pop_first() else { break };
            self.pages.remove(&h);
        }
    }
}

/// Whether an instance with `load` running sessions is not overloaded next to
/// the least loaded one's `least`: at most a quarter more, or two sessions.
pub fn within_slack(load: u32, least: u32) -> bool {
    load <= least + (least / 4).max(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_the_block_decoders_layout() {
        // L = 4: 257 ids get 3 pads -> 65 blocks -> 4 pages before the last block.
        let hashes = |p: &[u32]| page_hashes(p, 4, PromptLayout::Reference);
        let p: Vec<u32> = (1..=257).collect();
        assert_eq!(hashes(&p).len(), 4);
        // 256 ids: 64 blocks, the last in page 3: 3 pages.
        assert_eq!(hashes(&p[..256]).len(), 3);
        // Same ids, another padding: no page in common.
        let q: Vec<u32> = (1..=258).collect();
        assert!(hashes(&p).iter().all(|h| !hashes(&q).contains(h)));
        // A common prefix of the same padding: the same first pages.
        let mut r = p.clone();
        r[200] = 9999;
        let (hp, hr) = (hashes(&p), hashes(&r));
        assert_eq!(hp[..3], hr[..3]);
        assert_ne!(hp[3], hr[3]);
        // Aligned: the whole blocks from the first id, whatever the length.
        let aligned = |p: &[u32]| page_hashes(p, 4, PromptLayout::Aligned);
        assert_eq!(aligned(&p), aligned(&q)[..4]);
        assert_eq!(aligned(&q).len(), 4);
        assert_eq!(aligned(&p[..259 - 3]), aligned(&p)[..3]);
    }

    #[test]
    fn the_longest_run_on_one_block_decoder_and_the_oldest_forgotten() {
        let mut ix = PrefixIndex::new(4);
        ix.record(&[1, 2, 3], "a", false);
        assert_eq!(ix.longest(&[1, 2, 3, 4]), Some(("a", 3)));
        ix.record(&[1, 2, 5], "b", true);
        assert_eq!(ix.longest(&[1, 2, 3]), Some(("a", 3)), "a diversion to b leaves the pages with a");
        assert_eq!(ix.longest(&[5]), Some(("b", 1)), "a new page goes where it was sent");
        ix.record(&[1, 2, 5], "b", false);
        assert_eq!(ix.longest(&[1, 2, 3]), Some(("b", 2)), "a is gone: the pages moved to b");
        assert_eq!(ix.longest(&[7]), None);
        // Capacity 4: a fifth page makes the least recently routed (3) go.
        ix.record(&[6], "a", false);
        assert_eq!(ix.pages.len(), 4);
        assert!(!ix.pages.contains_key(&3));
    }

    #[test]
    fn slack_is_a_quarter_or_two() {
        assert!(within_slack(2, 0) && !within_slack(3, 0));
        assert!(within_slack(125, 100) && !within_slack(126, 100));
    }
}

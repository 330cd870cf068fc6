//! Prefix-aware choice of block decoder (`--prefix-routing`): among the
//! block decoders that are not overloaded, a session goes to the one that
//! most likely holds the longest cached prefix of its prompt; between equals,
//! to the least loaded.
//!
//! The router does not ask the block decoders what they cache. It keeps a
//! model of each one's cache: the prompt pages (the block decoder's unit of
//! caching: 16 blocks of the prompt as the token decoder lays it out) this
//! router sent there, named by the same hash chain, least recently sent
//! first out once the model holds as many pages as that block decoder's
//! cache kept when it last had to evict (it reports that in its instance
//! record; until it has evicted, the model forgets nothing but the oldest
//! pages beyond a bound). So a prefix that two block decoders both computed
//! is known on both, and its sessions are spread between them by load while
//! no cache has had to evict (then it keeps to the one it went to last); one
//! a block decoder has most likely evicted is known nowhere, and its session
//! goes to the least loaded. Like any router-side index it is a guess: another
//! router's sessions fill the caches too. A wrong guess costs only a
//! prefill, never a wrong token.

use std::collections::{BTreeMap, HashMap};

use blockserve_config::prefix::{page_chain, KV_PAGE_BLOCKS as PAGE_BLOCKS};
use blockserve_config::PromptLayout;

/// Most pages the index remembers per block decoder (about 60 MB).
pub const DEFAULT_CAPACITY: usize = 1 << 20;

/// The chain hashes of the whole prompt pages the block decoder could reuse
/// for `prompt`: laid out in whole blocks of `block_length` as the token
/// decoder sends it (padded in front, or not, by `layout`), and never the page
/// of the last whole block (which the block decoder always computes).
pub fn page_hashes(prompt: &[u32], block_length: usize, layout: PromptLayout) -> Vec<u64> {
    let pad = layout.pad(prompt.len(), block_length);
    let blocks = (pad + prompt.len()) / block_length;
    let page_len = PAGE_BLOCKS * block_length;
    let len = blocks.saturating_sub(1) / PAGE_BLOCKS * page_len;
    if pad == 0 {
        return page_chain(&prompt[..len], page_len);
    }
    let padded: Vec<u32> = std::iter::repeat_n(0, pad).chain(prompt.iter().copied()).take(len).collect();
    page_chain(&padded, page_len)
}

/// What this router believes each block decoder's prefix cache holds.
#[derive(Default)]
pub struct PrefixIndex {
    decoders: HashMap<String, CacheModel>,
    tick: u64,
}

/// The pages this router sent to one block decoder, least recently sent first.
#[derive(Default)]
struct CacheModel {
    /// Page hash -> tick of the last send.
    pages: HashMap<u64, u64>,
    /// Tick -> page hash.
    by_age: BTreeMap<u64, u64>,
}

impl PrefixIndex {
    /// How many leading pages of `hashes` `address` most likely holds, and
    /// when (index tick) the first was last sent there (0: none).
    pub fn known(&self, address: &str, hashes: &[u64]) -> (usize, u64) {
        let Some(m) = self.decoders.get(address) else { return (0, 0) };
        let n = hashes.iter().take_while(|h| m.pages.contains_key(h)).count();
        (n, hashes.first().and_then(|h| m.pages.get(h)).copied().unwrap_or(0))
    }

    /// Remember that the prompt's pages went to `address`, whose cache keeps
    /// about `limit` pages (0: no limit seen yet; the model then keeps at
    /// most [`DEFAULT_CAPACITY`]).
    pub fn record(&mut self, hashes: &[u64], address: &str, limit: usize) {
        let m = self.decoders.entry(address.to_string()).or_default();
        for &h in hashes {
            self.tick += 1;
            if let Some(old) = m.pages.insert(h, self.tick) {
                m.by_age.remove(&old);
            }
            m.by_age.insert(self.tick, h);
        }
        let capacity = if limit == 0 { DEFAULT_CAPACITY } else { limit.min(DEFAULT_CAPACITY) };
        while m.pages.len() > capacity {
            let Some((_, h)) = m.by_age.pop_first() else { break };
            m.pages.remove(&h);
        }
    }

    /// Forget block decoders that are no longer registered (`live` says
    /// which addresses are).
    pub fn retain(&mut self, live: impl Fn(&str) -> bool) {
        self.decoders.retain(|a, _| live(a));
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
        // 257 and 258 ids: 64 whole blocks, 3 pages before the last; padded,
        // they had nothing in common.
        assert_eq!((aligned(&p).len(), aligned(&p)), (3, aligned(&q)));
        // 300 ids: 75 blocks, 4 pages, the first 3 the same.
        let long: Vec<u32> = (1..=300).collect();
        assert_eq!((aligned(&long).len(), &aligned(&long)[..3]), (4, &aligned(&p)[..]));
    }

    #[test]
    fn each_block_decoder_keeps_what_was_sent_to_it_up_to_its_limit() {
        let mut ix = PrefixIndex::default();
        let pages = |ix: &PrefixIndex, a: &str, h: &[u64]| ix.known(a, h).0;
        ix.record(&[1, 2, 3], "a", 0);
        assert_eq!((ix.known("a", &[1, 2, 3, 4]), ix.known("b", &[1, 2, 3])), ((3, 1), (0, 0)));
        // Sent to b as well: known on both, sent to b last.
        ix.record(&[1, 2, 5], "b", 0);
        assert_eq!((ix.known("a", &[1, 2, 3]), ix.known("b", &[1, 2, 3]), ix.known("b", &[1, 2, 5])), ((3, 1), (2, 4), (3, 4)));
        // A chain is known only from its first page.
        assert_eq!(pages(&ix, "a", &[2, 3]), 2);
        assert_eq!(pages(&ix, "a", &[7, 1]), 0);
        // b reports a cache of 4 pages: a fifth page sent there pushes out the
        // least recently sent (1), and with it every chain through it.
        ix.record(&[6, 7], "b", 4);
        assert_eq!((pages(&ix, "b", &[1, 2, 5]), pages(&ix, "b", &[6, 7])), (0, 2));
        assert_eq!(pages(&ix, "a", &[1, 2, 3]), 3, "a's model is a's alone");
        ix.retain(|a| a == "b");
        assert_eq!(pages(&ix, "a", &[1, 2, 3]), 0);
    }

    #[test]
    fn slack_is_a_quarter_or_two() {
        assert!(within_slack(2, 0) && !within_slack(3, 0));
        assert!(within_slack(125, 100) && !within_slack(126, 100));
    }
}

//! How the block decoder forms its decode passes from the blocks that come
//! back up its links.
//!
//! The decoding sessions are split into `micro_batches` groups so that one
//! group's blocks are on their way through the token decoders while another
//! group's pass runs, and neither tier waits for the round trip.
//!
//! With one link, a pass takes the longest-waiting pending blocks once a
//! micro-batch of them is there (or `max_wait` has passed). With several links
//! (`by_link`), a pass takes the blocks of whole links, each once every one of
//! its decoding sessions has sent its block. Each token decoder then receives
//! all of its sessions' contexts in one message and decodes them as one batch,
//! instead of decoding a fraction of them per pass: a token-decoder batch costs
//! nearly as much at half the rows, so halves cost nearly twice as much.

use std::collections::HashMap;
use std::time::Duration;

use crate::BlockScheduler;

/// How long a pass waits for an incomplete link when no link is complete.
/// Token decoders send a round's blocks in one message and report the sessions
/// they hold back, so a link stays incomplete only while the rest of its blocks
/// are on their way (the link then heals into one batch) or if a message was
/// lost; the longest-waiting blocks then go ahead.
const STRAGGLER_WAIT: Duration = Duration::from_millis(50);

/// A token decoder's link; its sessions' keys are its own.
pub type LinkId = u64;

#[derive(Clone, Copy, Debug)]
pub struct Gather {
    /// Longest a decode pass waits for the rest of its micro-batch.
    pub max_wait: Duration,
    pub micro_batches: usize,
    /// Form passes from whole links when two or more links have decoding sessions.
    pub by_link: bool,
}

/// Which pending blocks the next pass takes.
#[derive(Debug, PartialEq)]
pub enum Take {
    /// The longest-waiting blocks, at most this many.
    Oldest(usize),
    /// Every pending block of these links.
    Links(Vec<LinkId>),
}

/// One link's decoding sessions and how many of them have a block pending.
#[derive(Default, Debug)]
struct Load {
    decoding: usize,
    pending: usize,
    /// Decoding sessions whose block the token decoder holds back.
    held_back: usize,
    /// When every decoding session's block was in (an order, not a time).
    complete: Option<u64>,
}

/// Per-link counts the engine keeps up to date as sessions start decoding,
/// send blocks, have them taken by a pass, and end.
#[derive(Default, Debug)]
pub struct Loads {
    links: HashMap<LinkId, Load>,
    completions: u64,
}

impl Loads {
    fn update(&mut self, link: LinkId, f: impl FnOnce(&mut Load)) {
        let l = self.links.entry(link).or_default();
        f(l);
        let complete = l.pending > 0 && l.pending + l.held_back >= l.decoding;
        match (complete, l.complete) {
            (true, None) => {
                self.completions += 1;
                l.complete = Some(self.completions);
            }
            (false, Some(_)) => l.complete = None,
            _ => {}
        }
        if l.decoding == 0 && l.pending == 0 && l.held_back == 0 {
            self.links.remove(&link);
        }
    }

    /// A session of `link` finished its prompt: it sends blocks from now on.
    pub fn started_decoding(&mut self, link: LinkId) {
        self.update(link, |l| l.decoding += 1);
    }

    pub fn block_pushed(&mut self, link: LinkId) {
        self.update(link, |l| l.pending += 1);
    }

    pub fn block_taken(&mut self, link: LinkId) {
        self.update(link, |l| l.pending = l.pending.saturating_sub(1));
    }

    /// A session of `link` ended; it was decoding and had a block pending as given.
    pub fn session_ended(&mut self, link: LinkId, decoding: bool, pending: bool) {
        self.update(link, |l| {
            l.decoding = l.decoding.saturating_sub(decoding as usize);
            l.pending = l.pending.saturating_sub(pending as usize);
        });
    }

    /// The link's token decoder holds back `n` of its sessions' blocks.
    pub fn held_back(&mut self, link: LinkId, n: usize) {
        if n > 0 || self.links.contains_key(&link) {
            self.update(link, |l| l.held_back = n);
        }
    }

    /// Whether every decoding session of `link` has its block in.
    pub fn is_complete(&self, link: LinkId) -> bool {
        self.links.get(&link).is_some_and(|l| l.complete.is_some())
    }

    pub fn clear(&mut self) {
        self.links.clear();
    }

    fn decoding_links(&self) -> usize {
        self.links.values().filter(|l| l.decoding > 0).count()
    }

    /// Links whose every decoding session has a block pending, in the order
    /// they got there, with their block counts.
    fn complete(&self) -> Vec<(LinkId, usize)> {
        let mut c: Vec<(u64, LinkId, usize)> = self.links.iter().filter_map(|(&id, l)| Some((l.complete?, id, l.pending))).collect();
        c.sort_unstable();
        c.into_iter().map(|(_, id, n)| (id, n)).collect()
    }
}

impl Gather {
    /// Decode rows of one micro-batch.
    fn rows(&self, sched: &BlockScheduler) -> usize {
        sched.decoding().div_ceil(self.micro_batches.max(1)).max(1)
    }

    /// What the next pass takes, or None to wait for more blocks. Prompt work
    /// never waits; decode blocks wait up to `max_wait` (`waited` so far).
    pub fn next(&self, sched: &BlockScheduler, loads: &Loads, waited: Duration) -> Option<Take> {
        let rows = self.rows(sched);
        let pending = sched.pending_blocks();
        if sched.has_prefill() {
            return Some(Take::Oldest(rows));
        }
        if pending == 0 {
            return None;
        }
        let links = loads.decoding_links();
        if self.by_link && links >= 2 {
            // Whole links, oldest complete first, until a micro-batch (at most
            // a link's share of the sessions) is full: with equal links, one
            // link per pass.
            let rows = sched.decoding().div_ceil(self.micro_batches.max(links));
            let mut picked = vec![];
            let mut n = 0;
            for (link, blocks) in loads.complete() {
                if n >= rows {
                    break;
                }
                picked.push(link);
                n += blocks;
            }
            if !picked.is_empty() {
                return Some(Take::Links(picked));
            }
            return (waited >= STRAGGLER_WAIT.max(self.max_wait)).then_some(Take::Oldest(rows));
        }
        (pending >= rows || waited >= self.max_wait).then_some(Take::Oldest(rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_complete_in_order_and_reopen_when_a_block_is_taken() {
        let mut loads = Loads::default();
        for link in [1, 2] {
            for _ in 0..3 {
                loads.started_decoding(link);
            }
        }
        assert_eq!(loads.decoding_links(), 2);
        for _ in 0..3 {
            loads.block_pushed(2);
        }
        loads.block_pushed(1);
        loads.block_pushed(1);
        assert_eq!(loads.complete(), vec![(2, 3)]);
        // The third session of link 1 ends instead of sending its block.
        loads.session_ended(1, true, false);
        assert_eq!(loads.complete(), vec![(2, 3), (1, 2)]);
        loads.block_taken(2);
        assert_eq!(loads.complete(), vec![(1, 2)]);
        loads.block_taken(2);
        loads.block_taken(2);
        loads.block_pushed(2);
        loads.block_pushed(2);
        loads.block_pushed(2);
        assert_eq!(loads.complete(), vec![(1, 2), (2, 3)]);
        // Link 2's token decoder holds one session back: the link is complete
        // with the other two blocks.
        loads.block_taken(2);
        loads.block_taken(2);
        loads.block_taken(2);
        loads.block_pushed(2);
        loads.block_pushed(2);
        assert_eq!(loads.complete(), vec![(1, 2)]);
        loads.held_back(2, 1);
        assert_eq!(loads.complete(), vec![(1, 2), (2, 2)]);
        loads.block_pushed(2);
        loads.held_back(2, 0);
        assert_eq!(loads.complete(), vec![(1, 2), (2, 3)]);
        // A link's sessions all gone: nothing of it is kept.
        loads.session_ended(1, true, true);
        loads.session_ended(1, true, true);
        assert_eq!(loads.complete(), vec![(2, 3)]);
        assert_eq!(loads.decoding_links(), 1);
        assert!(!loads.links.contains_key(&1));
    }
}

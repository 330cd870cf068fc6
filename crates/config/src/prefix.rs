//! How the block decoder's prefix cache names prompt pages, shared by the
//! cache itself and the router's guess of where a prefix is cached.

use std::hash::{Hash, Hasher};

/// Blocks per page of the block decoder's KV pool: the unit of its prefix cache.
pub const KV_PAGE_BLOCKS: usize = 16;

/// The chain hash of every whole `page_len`-id page of `ids`:
/// `h_i = H(h_(i-1), page i)`, so equal hashes mean equal pages after equal
/// prefixes (up to collisions, which the cache checks for). The ids that do
/// not fill a last page are ignored.
pub fn page_chain(ids: &[u32], page_len: usize) -> Vec<u64> {
    let mut parent = 0u64;
    ids.chunks_exact(page_len)
        .map(|page| {
            parent = page_hash(parent, page);
            parent
        })
        .collect()
}

/// One link of the chain: the hash of `page` after the page hashed `parent`
/// (0 before the first page).
pub fn page_hash(parent: u64, page: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (parent, page).hash(&mut h);
    h.finish()
}

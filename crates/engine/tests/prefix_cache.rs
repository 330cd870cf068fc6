//! The block decoder's prefix cache, on the CPU with the bundled model
//! (`models/code-block`, f32):
//! - the same requests with the cache on and off give the same tokens, greedy
//!   and seeded, for prompts sharing prefixes of several lengths and of every
//!   length modulo L, prefilled in small chunks, in both prompt layouts (and
//!   in the aligned layout the same tokens as the model's own driver);
//! - a later session finds exactly the whole pages an earlier one left, and in
//!   the aligned layout whatever its prompt's length modulo L;
//! - with a pool too small to keep everything, idle pages are evicted and every
//!   session still gets its tokens;
//! - a session waiting for a page another is writing is admitted when that one
//!   is closed mid-prefill;
//! - after every run, no page is lost: free plus idle cached pages are the pool.

use std::path::PathBuf;
use std::sync::Arc;

use blockserve_engine::pipeline::{self, Outcome};
use blockserve_engine::prefix_cache::CacheStats;
use blockserve_engine::{BlockScheduler, SchedulerConfig, TokenBatcher};
use blockserve_model::loader::load_model;
use blockserve_model::prompt::PaddedPrompt;
use blockserve_model::{BlockTransformer, GenerationRequest, Model, PromptLayout, SamplingParams, StopCriteria};
use candle_core::{DType, Device};

/// Blocks per page (what serving uses).
const PAGE: usize = 16;

fn model() -> Arc<BlockTransformer> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/code-block");
    let Model::Block(m) = load_model(&dir, None, DType::F32, &Device::Cpu).expect("the bundled model loads") else { panic!("a block model") };
    Arc::new(m)
}

/// `n` pseudo-random ids of the model's vocabulary (no 0: that is EOS and pad).
fn ids(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|j| 1 + (seed.wrapping_mul(7919).wrapping_add(j.wrapping_mul(104_729)) % 8191)).collect()
}

fn request(prompt: Vec<u32>, seeded: Option<u64>, max_new_tokens: usize) -> GenerationRequest {
    let sampling = match seeded {
        Some(seed) => SamplingParams { temperature: 0.8, seed, ..Default::default() },
        None => SamplingParams::greedy(),
    };
    GenerationRequest { prompt, sampling, stop: StopCriteria { max_new_tokens, eos_token_id: None, stop_token_ids: vec![] }, layout: PromptLayout::Reference }
}

fn in_layout(reqs: Vec<GenerationRequest>, layout: PromptLayout) -> Vec<GenerationRequest> {
    reqs.into_iter().map(|r| GenerationRequest { layout, ..r }).collect()
}

fn scheduler(m: &Arc<BlockTransformer>, kv_pages: usize, token_budget: usize, prefix_cache: bool) -> BlockScheduler {
    BlockScheduler::new(m.clone(), SchedulerConfig { kv_pages, page_size: PAGE, token_budget, prefix_cache }).unwrap()
}

fn run(sched: &mut BlockScheduler, batcher: &mut TokenBatcher, reqs: &[GenerationRequest]) -> Vec<Vec<u32>> {
    let (outs, _) = pipeline::run(sched, batcher, reqs, &|| None).unwrap();
    outs.into_iter().map(|o: Outcome| o.tokens).collect()
}

/// No session is left, and every page is free or idle in the cache.
fn assert_no_page_lost(sched: &BlockScheduler, pages: usize) {
    let (used, free, idle) = sched.kv_pages();
    assert_eq!((used, free + idle), (0, pages), "used {used}, free {free}, idle {idle}");
    assert_eq!(sched.prefix_cache().0, idle, "every cached page is idle once no session runs");
}

/// Prompts over three shared prefixes (one page, two pages and a bit, four
/// pages and a bit), each followed by suffixes of 1 to 8 ids: every prompt
/// length modulo L = 4, so the left padding of the reference layout differs
/// too. Half are seeded.
fn shared_prefix_requests() -> Vec<GenerationRequest> {
    let mut reqs = vec![];
    for (p, len) in [64usize, 130, 263].into_iter().enumerate() {
        let prefix = ids(p as u32 + 1, len);
        for s in 1..=8usize {
            let prompt = [prefix.clone(), ids(100 + s as u32, s)].concat();
            reqs.push(request(prompt, (s % 2 == 0).then_some(s as u64), 12));
        }
    }
    reqs
}

#[test]
fn the_cache_changes_no_token_and_reuses_pages() {
    cache_changes_no_token(PromptLayout::Reference);
}

#[test]
fn the_cache_changes_no_token_and_reuses_pages_in_the_aligned_layout() {
    let reqs = cache_changes_no_token(PromptLayout::Aligned);
    // The model's block-synchronous driver, with its own handling of the
    // forced start, gives the engine's tokens.
    let m = Model::Block(Arc::into_inner(model()).unwrap());
    let driver: Vec<Vec<u32>> = m.generate(&in_layout(shared_prefix_requests(), PromptLayout::Aligned), false).unwrap().into_iter().map(|o| o.tokens).collect();
    assert_eq!(driver, reqs);
}

/// The shared-prefix requests in `layout`, with the cache off, on, and on
/// again warm: the same tokens (returned).
fn cache_changes_no_token(layout: PromptLayout) -> Vec<Vec<u32>> {
    let m = model();
    let reqs = in_layout(shared_prefix_requests(), layout);
    let mut batcher = TokenBatcher::new(m.clone(), 64).unwrap();
    // Small prefill chunks: pages complete over several passes.
    let want = run(&mut scheduler(&m, 256, 24, false), &mut batcher, &reqs);
    let mut cached = scheduler(&m, 256, 24, true);
    let got = run(&mut cached, &mut batcher, &reqs);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "request {i} (prompt of {} ids)", reqs[i].prompt.len());
    }
    let stats = cached.prefix_cache().1;
    assert!(stats.hits > 0, "{stats:?}");
    assert_no_page_lost(&cached, 256);

    // The same requests again on the warm cache: still the same tokens.
    assert_eq!(run(&mut cached, &mut batcher, &reqs), want);
    assert!(cached.prefix_cache().1.hits > stats.hits);
    assert_no_page_lost(&cached, 256);
    want
}

#[test]
fn a_later_session_finds_exactly_the_whole_pages_an_earlier_one_left() {
    let m = model();
    let mut batcher = TokenBatcher::new(m.clone(), 8).unwrap();
    let mut sched = scheduler(&m, 64, 8192, true);
    // 256 shared ids = 64 blocks = 4 whole pages; the prompts' lengths are
    // multiples of L, so there is no padding.
    let prefix = ids(7, 256);
    let first = request([prefix.clone(), ids(8, 4)].concat(), None, 8);
    run(&mut sched, &mut batcher, std::slice::from_ref(&first));
    assert_eq!(sched.prefix_cache(), (4, CacheStats { looked_up: 4, hits: 0, evictions: 0 }));

    let later: Vec<GenerationRequest> = [4usize, 8, 12].iter().map(|&s| request([prefix.clone(), ids(9 + s as u32, s)].concat(), Some(3), 8)).collect();
    let got = run(&mut sched, &mut batcher, &later);
    assert_eq!(sched.prefix_cache().1, CacheStats { looked_up: 16, hits: 12, evictions: 0 });
    let mut plain = scheduler(&m, 64, 8192, false);
    assert_eq!(got, run(&mut plain, &mut batcher, &later));
    assert_no_page_lost(&sched, 64);
}

/// A session sent again with its output so far as part of its prompt (as a
/// migrated or resumed session is) finds the pages of its prompt and of its
/// output, and goes on as the first run did.
#[test]
fn a_resent_session_finds_its_output_pages_too() {
    let m = model();
    let mut batcher = TokenBatcher::new(m.clone(), 8).unwrap();
    let mut sched = scheduler(&m, 64, 8192, true);
    let prompt = [ids(7, 256), ids(8, 4)].concat();
    let first = run(&mut sched, &mut batcher, &[request(prompt.clone(), None, 140)]).remove(0);
    // 65 prompt blocks and 34 of the 35 generated were written (the last ends
    // the session): 6 whole pages, all cached.
    assert_eq!(sched.prefix_cache(), (6, CacheStats { looked_up: 4, hits: 0, evictions: 0 }));
    // Again after 128 tokens (32 blocks): 97 blocks, 6 pages before the last.
    let resent = request([prompt, first[..128].to_vec()].concat(), None, 12);
    let got = run(&mut sched, &mut batcher, &[resent]).remove(0);
    assert_eq!(sched.prefix_cache().1, CacheStats { looked_up: 4 + 6, hits: 6, evictions: 0 });
    assert_eq!(got, first[128..]);
    assert_no_page_lost(&sched, 64);
}

#[test]
fn aligned_prompts_of_every_length_find_the_prefix() {
    let m = model();
    let mut batcher = TokenBatcher::new(m.clone(), 8).unwrap();
    let prefix = ids(7, 256);
    let first = request([prefix.clone(), ids(8, 4)].concat(), None, 8);
    // Own parts of 5 to 8 ids: 261..264 ids, every length modulo 4.
    let later: Vec<GenerationRequest> = [5usize, 6, 7, 8].iter().map(|&s| request([prefix.clone(), ids(9 + s as u32, s)].concat(), Some(3), 8)).collect();
    for (layout, hits) in [(PromptLayout::Reference, 4), (PromptLayout::Aligned, 16)] {
        let mut sched = scheduler(&m, 64, 8192, true);
        run(&mut sched, &mut batcher, &in_layout(vec![first.clone()], layout));
        let later = in_layout(later.clone(), layout);
        let got = run(&mut sched, &mut batcher, &later);
        // Each later prompt has 65 or 66 whole blocks (in the reference layout,
        // after 3, 2, 1 or no pads): the 4 pages before its last block are
        // looked up. Aligned, they are the first session's 4 pages; padded,
        // only the unpadded prompt's are.
        assert_eq!(sched.prefix_cache().1, CacheStats { looked_up: 4 + 16, hits, evictions: 0 }, "{layout}");
        assert_eq!(got, run(&mut scheduler(&m, 64, 8192, false), &mut batcher, &later), "{layout}");
        assert_no_page_lost(&sched, 64);
    }
}

#[test]
fn a_small_pool_evicts_idle_pages_and_keeps_every_session_whole() {
    let m = model();
    let mut batcher = TokenBatcher::new(m.clone(), 64).unwrap();
    // Twelve distinct prefixes of 4 pages and a bit, two prompts each (of
    // 272 and 276 ids: the same padding): a session needs 5 pages, so a
    // 14-page pool holds two at once and cannot keep every prefix.
    let reqs: Vec<GenerationRequest> = (0..12u32)
        .flat_map(|p| {
            let prefix = ids(50 + p, 270);
            (0..2u32).map(move |s| request([prefix.clone(), ids(200 + s, 2 + 4 * s as usize)].concat(), (s == 1).then_some(p as u64), 20))
        })
        .collect();
    let want = run(&mut scheduler(&m, 1024, 64, false), &mut batcher, &reqs);
    let mut small = scheduler(&m, 14, 64, true);
    assert_eq!(run(&mut small, &mut batcher, &reqs), want);
    let stats = small.prefix_cache().1;
    assert!(stats.evictions > 0 && stats.hits > 0, "{stats:?}");
    assert_no_page_lost(&small, 14);
}

#[test]
fn a_session_waiting_for_a_page_is_admitted_when_its_writer_is_closed() {
    let m = model();
    let l = m.block_length();
    // One page per pass, so the first session writes its pages one by one.
    let mut sched = scheduler(&m, 32, PAGE, true);
    let prompt = PaddedPrompt::new(&ids(3, 260), l).unwrap().ids;
    sched.submit(1, prompt.clone(), 2).unwrap();
    sched.submit(2, prompt, 2).unwrap();
    sched.iterate().unwrap();
    // Session 1 wrote page 0; session 2 waits for page 1, which 1 writes next.
    assert_eq!((sched.reused_blocks(1), sched.reused_blocks(2)), (Some(0), Some(0)));
    let (used, _, _) = sched.kv_pages();
    assert_eq!(used, 5, "only session 1 holds pages (65 blocks + 2: 5 pages)");
    sched.close(1);
    sched.iterate().unwrap();
    // Admitted from the one page written, it writes the rest itself.
    assert_eq!(sched.reused_blocks(2), Some(PAGE));
    sched.close(2);
    assert_no_page_lost(&sched, 32);
}

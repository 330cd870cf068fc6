//! Prefix-aware routing over two block decoders with their prefix cache on,
//! every tier a process, real Redis: a router with `--prefix-routing` sends
//! every session of a prefix to the block decoder that cached it, so each
//! later session finds its four prompt pages; a least-loaded router over the
//! same block decoders spreads a prefix's sessions and finds fewer. Tokens are
//! the in-process engine's either way, and GetSession reports the blocks
//! each session reused.

mod common;

use blockserve_proto::v1::generation_client::GenerationClient;
use blockserve_proto::v1::*;
use blockserve_testkit::{metric_sum, scrape_metrics};
use common::*;

/// Prompt blocks the block decoders found in their prefix caches, in all.
fn hits(cluster: &Cluster) -> f64 {
    cluster
        .of("block-decoder")
        .iter()
        .map(|&i| metric_sum(&scrape_metrics(cluster.procs[i].metrics_port), "blockserve_prefix_cache_blocks_total", &[("result", "hit")]))
        .sum()
}

/// 256 ids of prefix `p` (64 blocks: four whole pages), then 4 of request `r`.
fn prompt(p: u32, r: u32) -> Vec<u32> {
    (0..256u32).map(|j| 1 + (p * 131 + j * 29) % 511).chain((0..4).map(|j| 1 + (r * 17 + j) % 511)).collect()
}

/// Run three sessions of each of three prefixes, one after another, prefixes
/// in turn, through `router`; returns each session's (prefix, block decoder,
/// tokens, prompt blocks reused as GetSession reports them).
async fn run(router: &str, first_prefix: u32) -> Vec<(u32, String, Vec<u32>, u32)> {
    let mut c = GenerationClient::connect(router.to_string()).await.unwrap();
    let mut out = vec![];
    for r in 0..9u32 {
        let p = first_prefix + r % 3;
        let params = GenerationParameters { max_new_tokens: Some(8), ignore_eos: true, temperature: Some(0.0), ..Default::default() };
        let resp = c.generate_unary(ids_request(prompt(p, r), params)).await.unwrap().into_inner();
        let info = c.get_session(GetSessionRequest { session_id: resp.session_id.clone() }).await.unwrap().into_inner();
        out.push((p, info.block_decoder, resp.token_ids, info.reused_prompt_blocks));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_go_where_their_prefix_is_cached() {
    let model = fixture_model();
    let cluster = Cluster::start(
        &model,
        &[
            ("block-decoder", 2, &["--prefix-cache", "true"]),
            ("token-decoder", 1, &[]),
            ("router", 1, &["--prefix-routing", "true"]),
            ("router", 1, &["--prefix-routing", "false"]),
        ],
    )
    .await;
    let routers = cluster.routers();

    let by_prefix = run(&routers[0], 0).await;
    for p in 0..3 {
        let places: Vec<&String> = by_prefix.iter().filter(|s| s.0 == p).map(|s| &s.1).collect();
        assert!(places.iter().all(|b| *b == places[0]), "prefix {p} went to {places:?}");
    }
    // Each prefix's second and third sessions found its 4 pages (64 blocks).
    let routed_hits = hits(&cluster);
    assert_eq!(routed_hits, 3.0 * 2.0 * 64.0);
    // GetSession says which: none for the first of each prefix, 64 blocks after.
    let reused: Vec<u32> = by_prefix.iter().map(|s| s.3).collect();
    assert_eq!(reused, [0, 0, 0, 64, 64, 64, 64, 64, 64]);

    // Three new prefixes through the least-loaded router.
    let spread = run(&routers[1], 10).await;
    let least_loaded_hits = hits(&cluster) - routed_hits;
    assert!(least_loaded_hits < routed_hits, "least loaded found {least_loaded_hits} blocks, by prefix {routed_hits}");
    let places: std::collections::HashSet<&String> = spread.iter().map(|s| &s.1).collect();
    assert_eq!(places.len(), 2, "least loaded uses both block decoders");

    // The tokens are the engine's, cached prefix or not.
    let all: Vec<(u32, u32)> = (0..9u32).map(|r| (r % 3, r)).chain((0..9u32).map(|r| (10 + r % 3, r))).collect();
    let prompts: Vec<Vec<u32>> = all.iter().map(|&(p, r)| prompt(p, r)).collect();
    let want = greedy_reference(&model, &prompts, 8);
    let got: Vec<Vec<u32>> = by_prefix.into_iter().chain(spread).map(|s| s.2).collect();
    assert_eq!(got, want);
}

/// A session whose token decoder dies moves to the other one, which sends
/// its prompt and output so far to the same block decoder: the prompt's four
/// cached pages are found there, and so are the pages of its output (after
/// 200 tokens or more, at least 50 blocks: GetSession says more than the
/// prompt's 64 blocks were reused after the move, in whole pages), and the
/// tokens are still the in-process engine's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_session_finds_its_prompt_and_output_in_the_cache() {
    let model = fixture_model();
    let mut cluster =
        Cluster::start(&model, &[("block-decoder", 1, &["--prefix-cache", "true"]), ("token-decoder", 2, &[]), ("router", 1, &["--max-new-tokens", "4000"])])
            .await;
    let mut c = GenerationClient::connect(cluster.routers()[0].clone()).await.unwrap();
    let params = GenerationParameters { max_new_tokens: Some(3000), ignore_eos: true, temperature: Some(0.0), ..Default::default() };
    let req = GenerateRequest { session_id: "moved".into(), ..ids_request(prompt(5, 0), params) };
    let mut stream = c.generate(req).await.unwrap().into_inner();
    let mut tokens = vec![];
    let mut killed = false;
    while let Some(m) = stream.message().await.unwrap() {
        match m.event {
            Some(generate_response::Event::Tokens(t)) => {
                tokens.extend(t.token_ids);
                if !killed && tokens.len() >= 200 {
                    let info = c.get_session(GetSessionRequest { session_id: "moved".into() }).await.unwrap().into_inner();
                    assert_eq!(info.reused_prompt_blocks, 0, "the first start found nothing");
                    let victim = cluster.of("token-decoder").into_iter().find(|&i| cluster.procs[i].address() == info.token_decoder).unwrap();
                    cluster.procs[victim].kill();
                    killed = true;
                }
            }
            Some(generate_response::Event::Finished(_)) => break,
            _ => {}
        }
    }
    assert!(killed && tokens.len() == 3000, "{} tokens", tokens.len());
    let info = c.get_session(GetSessionRequest { session_id: "moved".into() }).await.unwrap().into_inner();
    assert_eq!(info.migrations, 1);
    let reused = info.reused_prompt_blocks;
    assert!(reused > 64 && reused % 16 == 0 && reused <= (65 + 3000 / 4) / 16 * 16, "{reused} blocks reused after the move");
    assert_eq!(tokens, greedy_reference(&model, &[prompt(5, 0)], 3000)[0]);
}

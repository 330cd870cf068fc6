//! Tiers as if on separate hosts: `blockserve-latency-proxy` adds a round
//! trip between the token decoders and the block decoder (the block decoder
//! advertises the proxy's address, so that is what token decoders dial).
//! The output is token for token what the in-process engine produces.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use blockserve_proto::v1::generation_client::GenerationClient;
use blockserve_proto::v1::*;
use blockserve_testkit::{free_port, wait_for_port, workspace_bin, ChildGuard};
use common::{collect, fixture_model, greedy_reference, ids_request, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_are_identical_through_a_latency_proxy() {
    let proxy_port = free_port();
    let advertise = format!("http://127.0.0.1:{proxy_port}");
    let bd_flags = ["--advertise", advertise.as_str()];
    let cluster = Cluster::start(&fixture_model(), &[("block-decoder", 1, &bd_flags), ("token-decoder", 2, &[]), ("router", 1, &[])]).await;
    let bd_port = cluster.procs[cluster.of("block-decoder")[0]].port;
    let proxy = Command::new(workspace_bin(env!("CARGO_BIN_EXE_blockserve"), "blockserve-latency-proxy"))
        .args(["--listen", &format!("127.0.0.1:{proxy_port}"), "--upstream", &format!("127.0.0.1:{bd_port}"), "--rtt-ms", "2"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _proxy = ChildGuard(proxy);
    wait_for_port(proxy_port, Duration::from_secs(10));

    let prompts: Vec<Vec<u32>> = (0..6u32).map(|i| (0..5 + i).map(|j| (j * 7 + i) % 11 + 1).collect()).collect();
    let want = greedy_reference(&fixture_model(), &prompts, 24);
    let router = cluster.routers()[0].clone();
    let runs: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| {
            let router = router.clone();
            tokio::spawn(async move {
                let mut c = GenerationClient::connect(router).await.unwrap();
                let params = GenerationParameters { max_new_tokens: Some(24), ignore_eos: true, ..Default::default() };
                let (id, tokens, _) = collect(c.generate(ids_request(p, params)).await.unwrap().into_inner()).await.unwrap();
                (id, tokens)
            })
        })
        .collect();
    let store = cluster.store().await;
    for (run, want) in runs.into_iter().zip(want) {
        let (id, tokens) = run.await.unwrap();
        assert_eq!(tokens, want);
        // Its block decoder is the proxy's address: the token decoder dialed the proxy.
        let rec = blockserve_store::SessionStore::session(&store, &id).await.unwrap().unwrap();
        assert_eq!(rec.assignment.block_decoder, advertise);
    }
}

/// The block decoder driven on its own by synthetic token decoders over the
/// real link (`blockserve-loadtest --synthetic-block-decoder`): two links,
/// sessions of 8 blocks replaced by fresh ones as they end, every context
/// answered; the report names the run and counts blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_synthetic_link_load_drives_a_block_decoder() {
    let cluster = Cluster::start(&fixture_model(), &[("block-decoder", 1, &[])]).await;
    let bd = cluster.procs[cluster.of("block-decoder")[0]].address();
    let out = Command::new(workspace_bin(env!("CARGO_BIN_EXE_blockserve"), "blockserve-loadtest"))
        .args(["--synthetic-block-decoder", &bd, "--links", "2", "--concurrency", "8", "--prompt-len", "6", "--session-blocks", "8"])
        .args(["--warmup-s", "0.5", "--duration-s", "1.5", "--td-tokens-per-s", "1000"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8_lossy(&out.stdout);
    let row = report.lines().find(|l| l.starts_with("| 2 | 8 | 6 |")).unwrap_or_else(|| panic!("{report}"));
    let blocks: f64 = row.split('|').nth(4).unwrap().trim().parse().unwrap();
    // More blocks than 8 sessions of 8 hold: sessions ended and fresh ones
    // took their place (a refused block or open fails the run).
    assert!(blocks * 1.5 > 64.0, "{report}");
}

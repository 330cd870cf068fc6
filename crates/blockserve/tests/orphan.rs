//! Sessions nobody follows: their router is killed and their clients never
//! come back, then the token decoder running half of them is killed too. The
//! other router's orphan sweep must move those sessions to the surviving token
//! decoder, and every session must finish in the store with exactly the
//! fault-free output.

mod common;

use std::time::{Duration, Instant};

use blockserve_proto::v1::generation_client::GenerationClient;
use blockserve_proto::v1::*;
use blockserve_store::{SessionState, SessionStore};
use common::*;

const SESSIONS: usize = 16;
const TOKENS: u32 = 2000;

fn prompt(i: usize) -> Vec<u32> {
    vec![7 + i as u32, 40, 3 * i as u32 + 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweep_finishes_sessions_whose_router_and_token_decoder_both_died() {
    let model = fixture_model();
    let want = greedy_reference(&model, &(0..SESSIONS).map(prompt).collect::<Vec<_>>(), TOKENS);
    let fast_lease: &[&str] = &["--lease-ttl-s", "2"];
    let mut cluster = Cluster::start(
        &model,
        &[("block-decoder", 1, &[]), ("token-decoder", 2, fast_lease), ("router", 2, &["--orphan-sweep-s", "1", "--max-new-tokens", "2000"])],
    )
    .await;
    let store = cluster.store().await;
    let routers = cluster.of("router");

    // Start every session through the first router and wait for its first tokens.
    let mut client = GenerationClient::connect(cluster.procs[routers[0]].address()).await.unwrap();
    let mut streams = vec![];
    for i in 0..SESSIONS {
        let params = GenerationParameters { max_new_tokens: Some(TOKENS), ignore_eos: true, ..Default::default() };
        let mut req = ids_request(prompt(i), params);
        req.session_id = format!("orphan-{i}");
        let mut s = client.generate(req).await.unwrap().into_inner();
        loop {
            if let Some(generate_response::Event::Tokens(_)) = s.message().await.unwrap().unwrap().event {
                break;
            }
        }
        streams.push(s);
    }

    // The router dies and its clients go away for good.
    cluster.procs[routers[0]].kill();
    drop((streams, client));
    // Then the token decoder that runs the first session dies too.
    let first = store.session("orphan-0").await.unwrap().unwrap();
    let victim = cluster.of("token-decoder").into_iter().find(|&i| first.assignment.token_decoder == cluster.procs[i].address()).unwrap();
    let orphaned: Vec<usize> = {
        let mut v = vec![];
        for i in 0..SESSIONS {
            let r = store.session(&format!("orphan-{i}")).await.unwrap().unwrap();
            if r.assignment.token_decoder == first.assignment.token_decoder && !r.state.is_final() {
                v.push(i);
            }
        }
        v
    };
    cluster.procs[victim].kill();
    let killed_at = Instant::now();

    // Every session finishes in the store, with the fault-free output.
    let mut last_done = Duration::ZERO;
    for (i, want) in want.iter().enumerate() {
        let id = format!("orphan-{i}");
        let rec = loop {
            let r = store.session(&id).await.unwrap().unwrap();
            if r.state.is_final() {
                break r;
            }
            assert!(killed_at.elapsed() < Duration::from_secs(120), "{id} is still {:?} two minutes after its token decoder died", r.state);
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        last_done = last_done.max(killed_at.elapsed());
        assert_eq!((rec.state, rec.finish_reason.as_deref()), (SessionState::Finished, Some("length")), "{id}");
        assert_eq!(&store.tokens(&id, 0).await.unwrap(), want, "{id}");
        if orphaned.contains(&i) {
            assert!(rec.migrations >= 1 && rec.assignment.token_decoder != first.assignment.token_decoder, "{id} finished without moving");
        }
    }
    assert!(!orphaned.is_empty());
    assert!(store.unfinished().await.unwrap().is_empty());
    println!("{} of {SESSIONS} sessions orphaned; all finished {:.1} s after their token decoder died", orphaned.len(), last_done.as_secs_f64());
}

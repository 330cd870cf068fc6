//! Migrations one at a time (the chaos test has them all at once):
//!
//! - a token decoder dies under sessions whose router relays them: their
//!   streams continue from the surviving token decoder with the fault-free
//!   output; the time each client waited is printed (`RELAYED_SESSIONS`,
//!   default 8, sets the number of sessions; `RESTART=1` restarts the killed
//!   process on its address at once, as the chaos test does); every other
//!   session has a prompt of 6 ids in the aligned layout, whose first block
//!   starts with the prompt's last 2, and the killed token decoder is one
//!   such session's;
//! - sessions nobody follows: their router is killed and their clients never
//!   come back, then the token decoder running half of them is killed too.
//!   The other router's orphan sweep must move those sessions to the
//!   surviving token decoder, and every session must finish in the store with
//!   exactly the fault-free output.

mod common;

use std::time::{Duration, Instant};

use blockserve_model::PromptLayout;
use blockserve_proto::v1::generation_client::GenerationClient;
use blockserve_proto::v1::*;
use blockserve_store::{SessionState, SessionStore};
use common::*;

const SESSIONS: usize = 16;
const TOKENS: u32 = 2000;

fn prompt(i: usize) -> Vec<u32> {
    vec![7 + i as u32, 40, 3 * i as u32 + 1]
}

/// The relayed test's sessions: odd ones in the aligned layout, with a prompt
/// of a whole block and 2 ids more.
fn relayed_prompt(i: usize) -> (Vec<u32>, PromptLayout) {
    match i % 2 {
        0 => (prompt(i), PromptLayout::Reference),
        _ => ([prompt(i), vec![11, 12, 13]].concat(), PromptLayout::Aligned),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relayed_session_moves_when_its_token_decoder_dies() {
    let n: usize = std::env::var("RELAYED_SESSIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    const LONG: u32 = 1000;
    let model = fixture_model();
    let want = greedy_reference_in(&model, &(0..n).map(relayed_prompt).collect::<Vec<_>>(), LONG);
    let mut cluster = Cluster::start(&model, &[("block-decoder", 1, &[]), ("token-decoder", 2, &[]), ("router", 1, &[])]).await;
    let store = cluster.store().await;
    let router = cluster.procs[cluster.of("router")[0]].address();
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let router = router.clone();
            tokio::spawn(async move {
                let mut client = GenerationClient::connect(router).await.unwrap();
                let (prompt, layout) = relayed_prompt(i);
                let layout = match layout {
                    PromptLayout::Reference => blockserve_proto::v1::PromptLayout::Reference,
                    PromptLayout::Aligned => blockserve_proto::v1::PromptLayout::Aligned,
                };
                let params = GenerationParameters { max_new_tokens: Some(LONG), ignore_eos: true, prompt_layout: layout as i32, ..Default::default() };
                let mut req = ids_request(prompt, params);
                req.session_id = format!("relayed-{i}");
                let mut s = client.generate(req).await.unwrap().into_inner();
                let (mut tokens, mut arrivals) = (vec![], vec![]);
                while let Some(m) = s.message().await.unwrap() {
                    match m.event {
                        Some(generate_response::Event::Tokens(c)) => {
                            assert_eq!(c.offset as usize, tokens.len());
                            tokens.extend(c.token_ids);
                            arrivals.push(Instant::now());
                        }
                        Some(generate_response::Event::Finished(_)) => break,
                        _ => {}
                    }
                }
                (tokens, arrivals)
            })
        })
        .collect();
    // Once every session has output, kill the token decoder of one of them.
    loop {
        let mut started = 0;
        for i in 0..n {
            started += store.session(&format!("relayed-{i}")).await.unwrap().is_some_and(|r| r.generated >= 40) as usize;
        }
        if started == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A burst of sessions from one router spreads over both token decoders.
    let mut per_td = std::collections::HashMap::<String, usize>::new();
    for i in 0..n {
        *per_td.entry(store.session(&format!("relayed-{i}")).await.unwrap().unwrap().assignment.token_decoder).or_default() += 1;
    }
    let counts: Vec<usize> = per_td.values().copied().collect();
    println!("relayed migration: sessions per token decoder {counts:?}");
    assert!(counts.len() == 2 && counts.iter().max().unwrap() - counts.iter().min().unwrap() <= n / 4, "uneven routing: {per_td:?}");
    // The token decoder of session 1 (aligned layout) dies, so at least one
    // aligned session moves.
    let moved = format!("relayed-{}", n.min(2) - 1);
    let first = store.session(&moved).await.unwrap().unwrap();
    let victim = cluster.of("token-decoder").into_iter().find(|&i| first.assignment.token_decoder == cluster.procs[i].address()).unwrap();
    cluster.procs[victim].kill();
    let killed_at = Instant::now();
    if std::env::var("RESTART").is_ok() {
        cluster.procs[victim].start();
    }
    let mut waits = vec![];
    for (i, c) in clients.into_iter().enumerate() {
        let (tokens, arrivals) = c.await.unwrap();
        assert_eq!(tokens, want[i], "relayed-{i}");
        let rec = store.session(&format!("relayed-{i}")).await.unwrap().unwrap();
        if rec.migrations > 0 {
            // From the kill to the first chunk after it.
            waits.push(arrivals.iter().find(|&&t| t > killed_at).map_or(f64::NAN, |t| (*t - killed_at).as_secs_f64() * 1e3));
        }
    }
    assert!(!waits.is_empty());
    assert!(store.session(&moved).await.unwrap().unwrap().migrations > 0, "{moved} moved");
    waits.sort_by(f64::total_cmp);
    println!(
        "relayed migration: {} sessions moved; from the kill to their next chunk: min {:.0} ms, max {:.0} ms",
        waits.len(),
        waits[0],
        waits[waits.len() - 1]
    );
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

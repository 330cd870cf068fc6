//! The tiers as processes against a real redis-server that goes away:
//! - after Redis restarts, the first calls on every router succeed (pooled
//!   connections that died with the old server are rebuilt by the call that
//!   finds them dead, which then goes through);
//! - while Redis is down for 2 s, running streams go on: the longest gap
//!   between tokens stays within 100 ms of the longest gap of the same load
//!   without an outage.

mod common;

use std::time::{Duration, Instant};

use blockserve_proto::v1::generation_client::GenerationClient;
use blockserve_proto::v1::*;
use common::{demo_model, ids_request, Cluster};

fn greedy(n: u32) -> GenerationParameters {
    GenerationParameters { max_new_tokens: Some(n), ignore_eos: true, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_calls_after_redis_restarts_succeed() {
    let mut cluster = Cluster::start(&demo_model(), &[("block-decoder", 1, &[]), ("token-decoder", 1, &[]), ("router", 2, &[])]).await;
    let mut clients = vec![];
    for r in cluster.routers() {
        clients.push(GenerationClient::connect(r).await.unwrap());
    }
    let id = clients[0].generate_unary(ids_request(vec![1, 2, 3], greedy(8))).await.unwrap().into_inner().session_id;
    for restart in 0..5 {
        // Use every pooled connection of every router, so all of them die.
        for c in clients.iter_mut() {
            for _ in 0..8 {
                c.get_session(GetSessionRequest { session_id: id.clone() }).await.unwrap();
            }
        }
        cluster.redis.stop();
        tokio::time::sleep(Duration::from_millis(200)).await;
        cluster.redis.restart();
        for (r, c) in clients.iter_mut().enumerate() {
            for call in 0..8 {
                let got = c.get_session(GetSessionRequest { session_id: id.clone() }).await;
                let info = got.unwrap_or_else(|e| panic!("restart {restart}, router {r}, call {call}: {e:?}")).into_inner();
                assert_eq!(info.token_ids.len(), 8);
            }
        }
    }
}

/// The longest gap between two chunks of any of `n` streams of `tokens`
/// tokens each; with `outage`, Redis is stopped for that long once the
/// streams are under way.
async fn longest_gap(cluster: &mut Cluster, n: usize, tokens: u32, outage: Option<Duration>) -> (Duration, u32) {
    let router = cluster.routers()[0].clone();
    let streams: Vec<_> = (0..n)
        .map(|i| {
            let router = router.clone();
            tokio::spawn(async move {
                let mut c = GenerationClient::connect(router).await.unwrap();
                let mut s = c.generate(ids_request(vec![3, 1, 4, i as u32], greedy(tokens))).await.unwrap().into_inner();
                let (mut last, mut gap, mut got) = (None::<Instant>, Duration::ZERO, 0u32);
                while let Some(m) = s.message().await.unwrap() {
                    if let Some(generate_response::Event::Tokens(t)) = m.event {
                        let now = Instant::now();
                        gap = gap.max(last.map_or(Duration::ZERO, |l| now - l));
                        last = Some(now);
                        got += t.token_ids.len() as u32;
                    }
                }
                (gap, got)
            })
        })
        .collect();
    if let Some(d) = outage {
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!streams.iter().any(|s| s.is_finished()), "the streams ended before the outage: make them longer");
        cluster.redis.stop();
        tokio::time::sleep(d).await;
        cluster.redis.restart();
    }
    let mut worst = (Duration::ZERO, u32::MAX);
    for s in streams {
        let (gap, got) = s.await.unwrap();
        worst = (worst.0.max(gap), worst.1.min(got));
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_keep_their_pace_through_a_redis_outage() {
    let mut cluster =
        Cluster::start(&demo_model(), &[("block-decoder", 1, &[]), ("token-decoder", 1, &[]), ("router", 1, &["--max-new-tokens", "2000"])]).await;
    let (n, tokens) = (8, 2000);
    let (calm, got) = longest_gap(&mut cluster, n, tokens, None).await;
    assert_eq!(got, tokens);
    let (outage, got) = longest_gap(&mut cluster, n, tokens, Some(Duration::from_secs(2))).await;
    assert_eq!(got, tokens, "every stream runs to its end through the outage");
    eprintln!("longest gap between tokens: {:.1} ms without an outage, {:.1} ms across a 2 s Redis outage", ms(calm), ms(outage));
    assert!(outage <= calm + Duration::from_millis(100), "longest gap {:.1} ms across the outage, {:.1} ms without", ms(outage), ms(calm));
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

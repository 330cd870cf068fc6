//! Faults under load: 200 concurrent greedy sessions through 2 routers,
//! 2 block decoders and 3 token decoders (separate processes) with a real
//! redis-server, while token decoders are SIGKILLed and restarted every few
//! seconds for the whole run, a block decoder and a router are killed once,
//! and Redis restarts once. Every session must finish with exactly the tokens of a fault-free
//! run (the in-process engine), and Redis must show every one finished.
//!
//! The figures (migrations, resumes, added latency) are printed; run with
//! `--nocapture` to see them.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use blockserve_proto::v1::generation_client::GenerationClient;
use blockserve_proto::v1::*;
use blockserve_store::SessionStore;
use common::*;

const SESSIONS: usize = 200;
/// Token-decoder kills after the fixed schedule, one every 4 s while sessions run.
const EXTRA_KILLS: usize = 10;

/// Tokens per session: enough that every fault lands while sessions run.
fn tokens() -> u32 {
    std::env::var("CHAOS_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
}

fn prompt(i: usize) -> Vec<u32> {
    (0..3 + i % 5).map(|k| ((i * 7 + k * 13) % 250) as u32 + 1).collect()
}

/// What a client saw of its session.
struct Seen {
    tokens: Vec<u32>,
    finished: Finished,
    /// Arrival time of every chunk.
    chunks: Vec<Instant>,
    resumes: u32,
}

/// One client: Generate through its router; when the stream breaks (its
/// router died), Resume from where it was through the other one.
async fn client(routers: Vec<String>, i: usize, max_new_tokens: u32) -> Seen {
    let id = format!("chaos-{i}");
    let params = GenerationParameters { max_new_tokens: Some(max_new_tokens), ignore_eos: true, ..Default::default() };
    let req = GenerateRequest { session_id: id.clone(), ..ids_request(prompt(i), params) };
    let (mut r, mut resumes) = (i % routers.len(), 0);
    let mut seen = Seen { tokens: vec![], finished: Finished::default(), chunks: vec![], resumes: 0 };
    let start = Instant::now();
    let mut stream = None;
    loop {
        assert!(start.elapsed() < Duration::from_secs(240), "session {id}: no end after 240 s ({} tokens, {resumes} resumes)", seen.tokens.len());
        let Some(s) = stream.as_mut() else {
            // (Re)attach: Generate again with the same id attaches to the
            // session if it exists; Resume continues from the offset.
            let attach = async {
                let mut c = GenerationClient::connect(routers[r].clone()).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                if seen.tokens.is_empty() && resumes == 0 {
                    c.generate(req.clone()).await
                } else {
                    c.resume(ResumeRequest { session_id: id.clone(), offset: seen.tokens.len() as u64 }).await
                }
            };
            match attach.await {
                Ok(s) => stream = Some(s.into_inner()),
                Err(e) => {
                    assert!(matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Unknown), "session {id}: {e:?}");
                    r = (r + 1) % routers.len();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            continue;
        };
        match s.message().await {
            Ok(Some(m)) => match m.event {
                Some(generate_response::Event::Tokens(c)) => {
                    assert_eq!(c.offset as usize, seen.tokens.len(), "session {id}: chunks are contiguous");
                    seen.tokens.extend(c.token_ids);
                    seen.chunks.push(Instant::now());
                }
                Some(generate_response::Event::Finished(f)) => {
                    seen.finished = f;
                    seen.resumes = resumes;
                    return seen;
                }
                _ => {}
            },
            // The router went away: go on through another one.
            Ok(None) | Err(_) => {
                stream = None;
                resumes += 1;
                r = (r + 1) % routers.len();
            }
        }
    }
}

/// Expected output of every session, from the in-process engine.
fn fault_free(model: &Path, max_new_tokens: u32) -> Vec<Vec<u32>> {
    greedy_reference(model, &(0..SESSIONS).map(prompt).collect::<Vec<_>>(), max_new_tokens)
}

/// A small deterministic generator for the fault schedule.
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_session_survives_killed_token_decoders_block_decoder_router_and_a_redis_restart() {
    let model = fixture_model();
    let n_tokens = tokens();
    let want = fault_free(&model, n_tokens);
    let lease = ["--lease-ttl-s", "2"];
    let mut cluster = Cluster::start(
        &model,
        &[("block-decoder", 2, &lease), ("token-decoder", 3, &lease), ("router", 2, &["--max-migrations", "50", "--max-new-tokens", "4096"])],
    )
    .await;
    let store = cluster.store().await;
    let routers = cluster.routers();
    let t0 = Instant::now();
    let clients: Vec<_> = (0..SESSIONS).map(|i| tokio::spawn(client(routers.clone(), i, n_tokens))).collect();

    // The faults, while the sessions run.
    let unfinished = |store: blockserve_store::RedisStore| async move {
        let mut n = 0;
        for i in 0..SESSIONS {
            if store.session(&format!("chaos-{i}")).await.ok().flatten().is_none_or(|r| !r.state.is_final()) {
                n += 1;
            }
        }
        n
    };
    let mut rng = Lcg(7);
    // Metrics of the router that is killed, scraped just before.
    let mut router_metrics = vec![];
    let mut log = vec![];
    let tds = cluster.of("token-decoder");
    let at = |secs: f64| async move { tokio::time::sleep_until((t0 + Duration::from_secs_f64(secs)).into()).await };
    let mut fault = |what: String, running: usize| {
        println!("{:6.2}s  {what} ({running} sessions running)", t0.elapsed().as_secs_f64());
        log.push((what, running));
    };
    let schedule: Vec<(f64, &str)> =
        vec![(2.0, "td"), (4.0, "bd"), (5.0, "td"), (6.5, "router"), (8.0, "td"), (10.0, "redis"), (13.0, "td"), (16.0, "td"), (19.0, "td")];
    for (secs, what) in schedule {
        at(secs).await;
        let running = unfinished(store.clone()).await;
        match what {
            "td" => {
                let i = tds[rng.below(tds.len())];
                cluster.procs[i].kill();
                cluster.procs[i].start();
                fault(format!("SIGKILL token decoder :{} (restarted)", cluster.procs[i].port), running);
            }
            "bd" => {
                let i = cluster.of("block-decoder")[0];
                cluster.procs[i].kill();
                fault(format!("SIGKILL block decoder :{}", cluster.procs[i].port), running);
            }
            "router" => {
                let i = cluster.of("router")[0];
                router_metrics.push(blockserve_testkit::scrape_metrics(cluster.procs[i].metrics_port));
                cluster.procs[i].kill();
                fault(format!("SIGKILL router :{}", cluster.procs[i].port), running);
            }
            _ => {
                cluster.redis.stop();
                tokio::time::sleep(Duration::from_millis(1500)).await;
                cluster.redis.restart();
                fault("Redis killed, restarted 1.5 s later".into(), running);
            }
        }
    }
    // Then a token decoder every 4 s for as long as sessions run (at most
    // EXTRA_KILLS more), so the faults span the whole run.
    let mut next = 23.0;
    for _ in 0..EXTRA_KILLS {
        at(next).await;
        next += 4.0;
        let running = unfinished(store.clone()).await;
        if running == 0 {
            break;
        }
        let i = tds[rng.below(tds.len())];
        cluster.procs[i].kill();
        cluster.procs[i].start();
        fault(format!("SIGKILL token decoder :{} (restarted)", cluster.procs[i].port), running);
    }
    let mut seen = vec![];
    for c in clients {
        seen.push(c.await.unwrap());
    }
    let elapsed = t0.elapsed();
    // Every fault hit running sessions.
    for (what, running) in &log {
        assert!(*running > 0, "no session was running at: {what}; raise CHAOS_TOKENS");
    }
    // Every session finished with the fault-free output, in the stream and in Redis.
    let store = cluster.store().await;
    let (mut migrations, mut migrated, mut resumes, mut added, mut per_relayed) = (0, 0, 0, vec![], vec![]);
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s.finished.reason, FinishReason::Length as i32, "session {i}: {}", s.finished.error);
        assert_eq!(s.tokens, want[i], "session {i}: output differs from the fault-free run");
        let rec = store.session(&format!("chaos-{i}")).await.unwrap().unwrap();
        assert_eq!(rec.state, blockserve_store::SessionState::Finished, "session {i} in Redis");
        assert_eq!(store.tokens(&format!("chaos-{i}"), 0).await.unwrap(), want[i], "session {i}'s tokens in Redis");
        migrations += rec.migrations;
        resumes += s.resumes;
        // Added latency of a disrupted session: its longest gap between
        // chunks over its median gap.
        if rec.migrations > 0 || s.resumes > 0 {
            migrated += 1;
            let mut gaps: Vec<f64> = s.chunks.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).collect();
            gaps.sort_by(f64::total_cmp);
            let median = percentile(&gaps, 0.5);
            added.push(gaps.last().copied().unwrap_or(0.0) - median);
            // A client that stayed on its router saw each of the session's
            // migrations as one of its longest gaps: one sample per migration.
            if s.resumes == 0 {
                per_relayed.extend(gaps.iter().rev().take(rec.migrations as usize).map(|g| g - median));
            }
        }
    }
    added.sort_by(f64::total_cmp);
    per_relayed.sort_by(f64::total_cmp);
    println!("chaos: {SESSIONS} sessions x {n_tokens} tokens in {:.1} s, all finished with the fault-free output", elapsed.as_secs_f64());
    println!("chaos: {migrations} migrations over {migrated} disrupted sessions, {resumes} client resumes");
    println!(
        "chaos: added latency per disrupted session (longest gap - median gap): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&added, 0.5),
        percentile(&added, 0.99),
        added.last().copied().unwrap_or(0.0)
    );
    println!(
        "chaos: added latency per migration relayed to a client that kept its router ({} migrations): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        per_relayed.len(),
        percentile(&per_relayed, 0.5),
        percentile(&per_relayed, 0.99),
        per_relayed.last().copied().unwrap_or(0.0)
    );
    // The routers' own measure of a relayed migration: from the broken
    // stream to the first token from the new token decoder.
    router_metrics.push(blockserve_testkit::scrape_metrics(cluster.procs[cluster.of("router")[1]].metrics_port));
    let (n, q) = blockserve_testkit::histogram_quantiles(&router_metrics, "blockserve_migration_seconds", &[("tier", "router")], &[0.5, 0.99]);
    println!("chaos: the routers' migration_seconds over {n} relayed migrations: p50 <= {} s, p99 <= {} s (bucket bounds)", q[0], q[1]);
    assert!(migrations > 0 && resumes > 0, "the faults must have moved sessions and clients");
}

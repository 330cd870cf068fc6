//! Nothing leaks when sessions end early: 1,000 long sessions are cancelled
//! through the API, time out (gRPC deadline) or lose their client, each at a
//! random point; afterwards every tier reports zero active sessions, the
//! block decoder's KV pages and the token decoders' local cache rows are back
//! to their idle level, and Redis holds every session in a final state. The
//! block decoder runs its prefix cache, and the prompts share five prefixes of
//! two pages: the pages sessions held in it are idle again, none is lost.

mod common;

use std::time::{Duration, Instant};

use blockserve_proto::v1::generation_client::GenerationClient;
use blockserve_proto::v1::*;
use blockserve_store::SessionStore;
use blockserve_testkit::{metric_sum, scrape_metrics};
use common::*;

const SESSIONS: usize = 1000;
const AT_ONCE: usize = 100;

/// Sessions by how they end early.
#[derive(Clone, Copy, Debug)]
enum Ending {
    Cancel,
    Deadline,
    Disconnect,
}

/// Run session `i` and end it early; `chunks` (0..6) is when. A deadline
/// ends the call either on the server (DEADLINE_EXCEEDED: the router cancels
/// the session) or on the client's own timer (the router sees the client go);
/// returns true for the first.
async fn session(router: String, i: usize, ending: Ending, chunks: usize) -> bool {
    let mut c = GenerationClient::connect(router.clone()).await.unwrap();
    let params = GenerationParameters { max_new_tokens: Some(4000), ignore_eos: true, ..Default::default() };
    // One of five prefixes of 128 ids (two whole pages of 16 blocks once
    // padded), then ids of its own.
    let group = (i % 5) as u32;
    let prompt: Vec<u32> = (0..128u32).map(|j| 1 + (group * 97 + j * 31) % 511).chain([1 + (i % 200) as u32, 2, 3]).collect();
    let mut req = tonic::Request::new(GenerateRequest { session_id: format!("leak-{i}"), ..ids_request(prompt, params) });
    if let Ending::Deadline = ending {
        req.set_timeout(Duration::from_millis(20 + 40 * chunks as u64));
    }
    let mut s = match c.generate(req).await {
        Ok(s) => s.into_inner(),
        Err(e) => {
            assert!(matches!(ending, Ending::Deadline), "session {i}: {e:?}");
            return e.code() == tonic::Code::DeadlineExceeded;
        }
    };
    let mut seen = 0;
    loop {
        if seen >= chunks {
            match ending {
                Ending::Cancel => {
                    let st = c.cancel(CancelRequest { session_id: format!("leak-{i}") }).await.unwrap().into_inner().state;
                    assert_eq!(st, SessionState::Cancelled as i32, "session {i}");
                    return false;
                }
                Ending::Disconnect => return false,
                Ending::Deadline => {}
            }
        }
        match s.message().await {
            Ok(Some(m)) => {
                if let Some(generate_response::Event::Tokens(_)) = m.event {
                    seen += 1;
                }
            }
            Ok(None) => panic!("session {i}: the stream ended before the session did"),
            Err(e) => {
                assert!(matches!(ending, Ending::Deadline), "session {i} ({ending:?}): {e:?}");
                return e.code() == tonic::Code::DeadlineExceeded;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_sessions_ended_early_leave_nothing_behind() {
    let cluster = Cluster::start(
        &fixture_model(),
        &[("block-decoder", 1, &["--prefix-cache", "true"]), ("token-decoder", 2, &[]), ("router", 2, &["--max-new-tokens", "4000"])],
    )
    .await;
    let store = cluster.store().await;
    let bd_metrics = || scrape_metrics(cluster.procs[0].metrics_port);
    let pages_in = |m: &str, state: &str| metric_sum(m, "blockserve_kv_cache_pages", &[("state", state)]);
    let idle_pages = pages_in(&bd_metrics(), "used");
    // The pool's size, once the block decoder has reported it (after a pass).
    let mut all_pages = None;
    let routers = cluster.routers();
    let mut seed = 11u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    let t0 = Instant::now();
    let (mut endings, mut server_deadlines) = ([0usize; 3], 0);
    for wave in 0..SESSIONS / AT_ONCE {
        let mut tasks = vec![];
        for k in 0..AT_ONCE {
            let i = wave * AT_ONCE + k;
            let ending = [Ending::Cancel, Ending::Deadline, Ending::Disconnect][next() % 3];
            endings[ending as usize] += 1;
            tasks.push(tokio::spawn(session(routers[i % 2].clone(), i, ending, next() % 6)));
        }
        for t in tasks {
            server_deadlines += t.await.unwrap() as usize;
        }
        let m = bd_metrics();
        all_pages.get_or_insert(pages_in(&m, "used") + pages_in(&m, "free") + pages_in(&m, "cached_idle"));
    }
    let all_pages = all_pages.expect("at least one wave");
    assert!(all_pages > 0.0);
    let ended = Instant::now();
    // Every tier drains to idle, and every session is final in Redis.
    loop {
        let mut active = 0.0;
        let (mut pages, mut rows) = (0.0, 0.0);
        for p in &cluster.procs {
            let m = scrape_metrics(p.metrics_port);
            active += metric_sum(&m, "blockserve_active_sessions", &[]);
            pages += metric_sum(&m, "blockserve_kv_cache_pages", &[("state", "used")]);
            rows += metric_sum(&m, "blockserve_local_kv_rows", &[("state", "used")]);
        }
        let mut unfinished = vec![];
        for i in 0..SESSIONS {
            // (None: the client left before its request reached a router.)
            let rec = store.session(&format!("leak-{i}")).await.unwrap();
            if rec.as_ref().is_some_and(|r| r.state != blockserve_store::SessionState::Cancelled) {
                unfinished.push((i, rec.map(|r| r.state)));
            }
        }
        if active == 0.0 && pages == idle_pages && rows == 0.0 && unfinished.is_empty() {
            break;
        }
        assert!(
            ended.elapsed() < Duration::from_secs(30),
            "not idle 30 s after the last client: {active} active sessions, {pages} KV pages used (idle {idle_pages}), {rows} local rows used, not cancelled: {:?}",
            &unfinished[..unfinished.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The prefix cache was used, and its pages are all idle: free and cached
    // pages make up the pool again.
    let m = bd_metrics();
    assert!(metric_sum(&m, "blockserve_prefix_cache_blocks_total", &[("result", "hit")]) > 0.0, "the prefix cache found nothing");
    assert_eq!(pages_in(&m, "used") + pages_in(&m, "free") + pages_in(&m, "cached_idle"), all_pages);
    assert_eq!(pages_in(&m, "cached_idle"), metric_sum(&m, "blockserve_prefix_cache_pages", &[]));
    let mut never_started = 0;
    for i in 0..SESSIONS {
        never_started += store.session(&format!("leak-{i}")).await.unwrap().is_none() as usize;
    }
    let [cancel, deadline, disconnect] = endings;
    println!(
        "leak: {SESSIONS} sessions ({cancel} cancelled, {deadline} deadlines ({server_deadlines} enforced by the router), {disconnect} disconnects) in {:.1} s; every tier idle {:.2} s after the last client; {never_started} never reached a router",
        (ended - t0).as_secs_f64(),
        ended.elapsed().as_secs_f64()
    );
}

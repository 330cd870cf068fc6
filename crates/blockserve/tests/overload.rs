//! Sustained overload: ten times the configured capacity for 60 s
//! (`OVERLOAD_SECS` to change it). The router admits at most `--max-streams`
//! streams; every request beyond that gets RESOURCE_EXHAUSTED at once, every
//! admitted session finishes with the exact greedy output, and the resident
//! memory of every process stays within the bound stated below.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockserve_proto::v1::generation_client::GenerationClient;
use blockserve_proto::v1::*;
use blockserve_testkit::rss_bytes;
use common::*;

const CAPACITY: usize = 8;
const CLIENTS: usize = 10 * CAPACITY;
const TOKENS: u32 = 48;
const PROMPTS: usize = 8;

/// Bound on memory: after a 10 s warm-up, no process's RSS may grow by more
/// than 25% + 32 MiB over its RSS at the end of the warm-up.
fn rss_bound(at_warm_up: u64) -> u64 {
    at_warm_up + at_warm_up / 4 + (32 << 20)
}

fn prompt(i: usize) -> Vec<u32> {
    vec![1 + i as u32 * 17, 2, 3 + i as u32]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_times_capacity_is_refused_at_once_and_memory_stays_flat() {
    let secs: u64 = std::env::var("OVERLOAD_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let model = fixture_model();
    let want = Arc::new(greedy_reference(&model, &(0..PROMPTS).map(prompt).collect::<Vec<_>>(), TOKENS));

    let cap = CAPACITY.to_string();
    let cluster = Cluster::start(&model, &[("block-decoder", 1, &[]), ("token-decoder", 1, &[]), ("router", 1, &["--max-streams", &cap])]).await;
    let router = cluster.routers()[0].clone();
    let (finished, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let refusal_ms = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(secs);
    let mut clients = vec![];
    for c in 0..CLIENTS {
        let (router, want, finished, refused, refusal_ms) = (router.clone(), want.clone(), finished.clone(), refused.clone(), refusal_ms.clone());
        clients.push(tokio::spawn(async move {
            let mut client = GenerationClient::connect(router).await.unwrap();
            let mut n = c;
            while Instant::now() < end {
                n += 1;
                let p = n % PROMPTS;
                let params = GenerationParameters { max_new_tokens: Some(TOKENS), ignore_eos: true, ..Default::default() };
                let asked = Instant::now();
                match client.generate(ids_request(prompt(p), params)).await {
                    Ok(s) => {
                        let (_, tokens, fin) = collect(s.into_inner()).await.unwrap();
                        assert_eq!(fin.reason, FinishReason::Length as i32, "{}", fin.error);
                        assert_eq!(tokens, want[p], "an admitted session's output");
                        finished.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                        assert!(e.message().contains("--max-streams"), "{}", e.message());
                        refusal_ms.lock().unwrap().push(asked.elapsed().as_secs_f64() * 1e3);
                        refused.fetch_add(1, Ordering::Relaxed);
                        // A client that backs off a little, as a real one would.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    // Resident memory of every process, once a second.
    let pids: Vec<(&str, u32)> = cluster.procs.iter().map(|p| (p.tier, p.pid().unwrap())).collect();
    let mut samples: Vec<Vec<u64>> = vec![vec![]; pids.len()];
    let (mut at_warm_up, mut warm) = (vec![0u64; pids.len()], 0);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (k, (_, pid)) in pids.iter().enumerate() {
            samples[k].push(rss_bytes(*pid).expect("the process is running"));
        }
        if t0.elapsed() < Duration::from_secs(10.min(secs / 2)) {
            at_warm_up = samples.iter().map(|s| *s.last().unwrap()).collect();
            warm = samples[0].len();
        }
    }
    for c in clients {
        c.await.unwrap();
    }
    let (finished, refused) = (finished.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    let mut ms = refusal_ms.lock().unwrap().clone();
    ms.sort_by(f64::total_cmp);
    let p = |q: f64| ms.get(((ms.len().max(1) - 1) as f64 * q) as usize).copied().unwrap_or(0.0);
    println!("overload: {CLIENTS} clients against a capacity of {CAPACITY} streams for {secs} s: {finished} sessions finished, {refused} refused");
    println!("overload: refusal latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms", p(0.5), p(0.99), p(1.0));
    assert!(finished > 0 && refused > finished, "the excess must be refused ({finished} finished, {refused} refused)");
    for (k, (tier, _)) in pids.iter().enumerate() {
        let max = samples[k][warm..].iter().copied().max().unwrap_or(0);
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        println!("overload: {tier} RSS after warm-up {:.1} MiB, max {:.1} MiB, bound {:.1} MiB", mib(at_warm_up[k]), mib(max), mib(rss_bound(at_warm_up[k])));
        assert!(max <= rss_bound(at_warm_up[k]), "{tier}: RSS grew from {} to {max} bytes", at_warm_up[k]);
    }
}

//! Running a ghz config against the router, and the ghz-style report: count,
//! total, slowest/fastest/average, requests/s, a response-time histogram,
//! latency percentiles and the status code distribution, plus what ghz cannot
//! see in a stream (time to first token, inter-token latency, tokens/s per
//! stream and in aggregate). Printed as text or as JSON.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockserve_proto::v1::generate_response;
use blockserve_proto::v1::generation_client::GenerationClient;
use serde_json::json;
use tokio::sync::{mpsc, Mutex};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::ghz::{generate_request, score_request, Call, Config};
use crate::stats::{percentile, sorted, StreamClock};

/// One finished call.
struct Outcome {
    latency: f64,
    code: String,
    ttft: Option<f64>,
    itl: Vec<f64>,
    tokens: usize,
}

/// ghz's name of a status code (`OK`, `InvalidArgument`, `Unavailable`, ...).
fn code_name(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".into(),
        other => format!("{other:?}"),
    }
}

/// A request carrying the config's metadata (checked when the run starts).
fn with_metadata<T>(msg: T, config: &Config) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    for (k, v) in &config.metadata {
        if let (Ok(k), Ok(v)) = (k.parse::<tonic::metadata::MetadataKey<_>>(), v.parse()) {
            req.metadata_mut().insert(k, v);
        }
    }
    req
}

async fn call_once(client: &mut GenerationClient<Channel>, call: Call, config: &Config) -> Outcome {
    let t0 = Instant::now();
    let mut out = Outcome { latency: 0.0, code: "OK".into(), ttft: None, itl: vec![], tokens: 0 };
    let result: std::result::Result<(), tonic::Status> = async {
        match call {
            Call::Generate => {
                let req = generate_request(&config.data).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
                let mut stream = client.generate(with_metadata(req, config)).await?.into_inner();
                let mut clock = StreamClock::new(t0);
                while let Some(msg) = stream.message().await? {
                    match msg.event {
                        Some(generate_response::Event::Tokens(c)) if !c.token_ids.is_empty() => clock.chunk(c.token_ids.len()),
                        Some(generate_response::Event::Finished(f)) if !f.error.is_empty() => return Err(tonic::Status::unknown(f.error)),
                        _ => {}
                    }
                }
                (out.ttft, out.itl, out.tokens) = (clock.ttft, clock.itl, clock.tokens);
            }
            Call::GenerateUnary => {
                let req = generate_request(&config.data).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
                out.tokens = client.generate_unary(with_metadata(req, config)).await?.into_inner().token_ids.len();
            }
            Call::Score => {
                let req = score_request(&config.data).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
                client.score(with_metadata(req, config)).await?;
            }
        }
        Ok(())
    }
    .await;
    if let Err(s) = result {
        out.code = code_name(s.code());
    }
    out.latency = t0.elapsed().as_secs_f64();
    out
}

/// ghz's TLS keys as a client configuration.
fn tls(config: &Config) -> Result<ClientTlsConfig> {
    let read = |key: &str, path: &str| std::fs::read(path).with_context(|| format!("\"{key}\": reading {path}"));
    let mut tls = match &config.cacert {
        Some(path) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("cacert", path)?)),
        None => ClientTlsConfig::new().with_native_roots(),
    };
    match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(read("cert", cert)?, read("key", key)?)),
        (None, None) => {}
        _ => bail!("\"cert\" and \"key\" go together"),
    }
    if let Some(name) = &config.cname {
        tls = tls.domain_name(name.clone());
    }
    Ok(tls)
}

/// Run `config` against `target` (or the config's `host`).
pub async fn run(config: Config, target: Option<String>) -> Result<serde_json::Value> {
    let call = config.call()?;
    let host = match (target, &config.host) {
        (Some(t), _) => t,
        (None, Some(h)) => h.clone(),
        (None, None) => bail!("no host: give \"host\" in the config or --target"),
    };
    for (k, v) in &config.metadata {
        if k.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>().is_err()
            || v.parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>().is_err()
        {
            bail!("metadata {k:?}: {v:?} is not a valid ASCII gRPC metadata entry");
        }
    }
    let scheme = if config.insecure { "http" } else { "https" };
    let url = if host.contains("://") { host.clone() } else { format!("{scheme}://{host}") };
    let mut endpoint = Endpoint::from_shared(url.clone())?.connect_timeout(Duration::from_secs(10));
    if url.starts_with("https://") {
        endpoint = endpoint.tls_config(tls(&config)?)?;
    }
    let channel = endpoint.connect().await.with_context(|| format!("connecting to {url}"))?;
    let schedule = config.schedule()?;
    let duration = config.duration()?;
    let (total, concurrency) = (config.total(), config.concurrency());
    let config = Arc::new(config);
    let (tx, rx) = mpsc::channel::<usize>(concurrency);
    let rx = Arc::new(Mutex::new(rx));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut workers = vec![];
    for _ in 0..concurrency {
        let (rx, outcomes, config) = (rx.clone(), outcomes.clone(), config.clone());
        let mut client = GenerationClient::new(channel.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                if next.is_none() {
                    break;
                }
                let o = call_once(&mut client, call, &config).await;
                outcomes.lock().await.push(o);
            }
        }));
    }
    // The dispatcher: one permit per request, at the schedule's rate.
    let mut issued = 0usize;
    let mut next_at = tokio::time::Instant::now();
    loop {
        match duration {
            Some(d) if start.elapsed() >= d => break,
            None if issued >= total => break,
            _ => {}
        }
        match schedule.rate_at(start.elapsed()) {
            Err(()) => break,
            Ok(None) => {}
            Ok(Some(rate)) => {
                next_at += Duration::from_secs_f64(1.0 / rate);
                tokio::time::sleep_until(next_at).await;
            }
        }
        if tx.send(issued).await.is_err() {
            break;
        }
        issued += 1;
    }
    drop(tx);
    for w in workers {
        w.await?;
    }
    let wall = start.elapsed().as_secs_f64();
    let outcomes = std::mem::take(&mut *outcomes.lock().await);
    Ok(report(&outcomes, wall, call == Call::Generate))
}

fn report(outcomes: &[Outcome], wall: f64, streams: bool) -> serde_json::Value {
    let lat = sorted(outcomes.iter().map(|o| o.latency).collect());
    let ms = |s: f64| (s * 1e6).round() / 1e3;
    let (fastest, slowest) = (lat.first().copied().unwrap_or(0.0), lat.last().copied().unwrap_or(0.0));
    let average = if lat.is_empty() { 0.0 } else { lat.iter().sum::<f64>() / lat.len() as f64 };
    // ghz's histogram: ten equal buckets from fastest to slowest, each marked
    // by its upper edge.
    let mut histogram = vec![];
    if !lat.is_empty() {
        let width = (slowest - fastest) / 10.0;
        for b in 0..=10 {
            let mark = fastest + width * b as f64;
            let lo = if b == 0 { f64::NEG_INFINITY } else { fastest + width * (b - 1) as f64 };
            let count = lat.iter().filter(|&&x| x > lo && x <= mark || (b == 0 && x <= mark)).count();
            histogram.push(json!({"mark_ms": ms(mark), "count": count}));
        }
    }
    let latency_distribution: Vec<_> =
        [10, 25, 50, 75, 90, 95, 99].iter().map(|&p| json!({"percentage": p, "latency_ms": ms(percentile(&lat, p as f64 / 100.0).unwrap_or(0.0))})).collect();
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for o in outcomes {
        *codes.entry(o.code.clone()).or_default() += 1;
    }
    let tokens: usize = outcomes.iter().map(|o| o.tokens).sum();
    let mut out = json!({
        "count": outcomes.len(),
        "total_ms": ms(wall),
        "slowest_ms": ms(slowest),
        "fastest_ms": ms(fastest),
        "average_ms": ms(average),
        "rps": outcomes.len() as f64 / wall.max(1e-9),
        "histogram": histogram,
        "latency_distribution": latency_distribution,
        "status_code_distribution": codes,
        "tokens": tokens,
        "tokens_per_s": tokens as f64 / wall.max(1e-9),
    });
    if streams {
        let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.code == "OK").collect();
        let ttft = sorted(ok.iter().filter_map(|o| o.ttft).collect());
        let itl = sorted(ok.iter().flat_map(|o| o.itl.iter().copied()).collect());
        let per_stream = sorted(ok.iter().map(|o| o.tokens as f64 / o.latency.max(1e-9)).collect());
        let q = |v: &[f64], p: f64| percentile(v, p).unwrap_or(0.0);
        let pcts = |v: &[f64], scale: f64| json!({"p50": q(v, 0.5) * scale, "p90": q(v, 0.9) * scale, "p99": q(v, 0.99) * scale});
        out["streams"] = json!({
            "time_to_first_token_ms": pcts(&ttft, 1e3),
            "inter_token_latency_ms": pcts(&itl, 1e3),
            "tokens_per_s_per_stream": pcts(&per_stream, 1.0),
        });
    }
    out
}

/// The report as ghz prints its summary.
pub fn print_summary(r: &serde_json::Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    println!(
        "\nSummary:\n  Count:\t{}\n  Total:\t{:.2} ms\n  Slowest:\t{:.2} ms\n  Fastest:\t{:.2} ms\n  Average:\t{:.2} ms\n  Requests/sec:\t{:.2}",
        r["count"],
        f("total_ms"),
        f("slowest_ms"),
        f("fastest_ms"),
        f("average_ms"),
        f("rps")
    );
    println!("\nResponse time histogram:");
    let hist = r["histogram"].as_array().cloned().unwrap_or_default();
    let most = hist.iter().filter_map(|h| h["count"].as_u64()).max().unwrap_or(1).max(1);
    for h in &hist {
        let n = h["count"].as_u64().unwrap_or(0);
        println!("  {:.3} [{n}]\t|{}", h["mark_ms"].as_f64().unwrap_or(0.0), "∎".repeat((40 * n / most) as usize));
    }
    println!("\nLatency distribution:");
    for d in r["latency_distribution"].as_array().into_iter().flatten() {
        println!("  {} % in {:.2} ms", d["percentage"], d["latency_ms"].as_f64().unwrap_or(0.0));
    }
    println!("\nStatus code distribution:");
    for (code, n) in r["status_code_distribution"].as_object().into_iter().flatten() {
        println!("  [{code}]\t{n} responses");
    }
    println!("\nTokens:\t{} generated, {:.1} tokens/s in aggregate", r["tokens"], f("tokens_per_s"));
    if let Some(s) = r.get("streams") {
        let p = |k: &str| {
            format!("{:.2} / {:.2} / {:.2}", s[k]["p50"].as_f64().unwrap_or(0.0), s[k]["p90"].as_f64().unwrap_or(0.0), s[k]["p99"].as_f64().unwrap_or(0.0))
        };
        println!("Streams (p50 / p90 / p99):");
        println!("  time to first token:\t{} ms", p("time_to_first_token_ms"));
        println!("  inter-token latency:\t{} ms", p("inter_token_latency_ms"));
        println!("  tokens/s per stream:\t{}", p("tokens_per_s_per_stream"));
    }
}

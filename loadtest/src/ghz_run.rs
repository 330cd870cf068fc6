//! Running a ghz config against the router, and its report in ghz's own JSON
//! schema (`-O json`: durations in nanoseconds, `latencyDistribution`,
//! `statusCodeDistribution`, `errorDistribution`, `histogram`, `details`,
//! `options`, `date`, `endReason`), so tools that read ghz reports read this
//! one. What ghz cannot see in a stream is added under keys of its own:
//! `tokens`, `tokensPerSecond` and `streams` (time to first token,
//! inter-token latency and tokens/s per stream; durations in nanoseconds).
//! Printed as ghz's summary text or as that JSON.

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
    started: std::time::SystemTime,
    latency: f64,
    code: String,
    /// ghz's error string (`rpc error: code = ... desc = ...`); empty when OK.
    error: String,
    ttft: Option<f64>,
    itl: Vec<f64>,
    tokens: usize,
}

/// ghz's name of a status code: Go's `codes.Code` names (`OK`, `Canceled`,
/// `InvalidArgument`, `Unavailable`, ...).
fn code_name(code: tonic::Code) -> String {
    match code {
        tonic::Code::Ok => "OK".into(),
        tonic::Code::Cancelled => "Canceled".into(),
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
    let mut out = Outcome { started: std::time::SystemTime::now(), latency: 0.0, code: "OK".into(), error: String::new(), ttft: None, itl: vec![], tokens: 0 };
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
        out.error = format!("rpc error: code = {} desc = {}", out.code, s.message());
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
    let options = options(&config, &host);
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
    let end_reason = if duration.is_some() { "timeout" } else { "normal" };
    let mut r = report(&outcomes, wall, call == Call::Generate);
    r["options"] = options;
    r["endReason"] = json!(end_reason);
    Ok(r)
}

/// ghz's `options` of a report: the run's settings under ghz's keys.
fn options(config: &Config, host: &str) -> serde_json::Value {
    let mut o = json!({
        "host": host,
        "call": config.call,
        "insecure": config.insecure,
        "total": config.total(),
        "concurrency": config.concurrency(),
        "data": config.data,
        "binary": false,
        "CPUs": std::thread::available_parallelism().map_or(1, |n| n.get()),
    });
    let set = |o: &mut serde_json::Value, k: &str, v: Option<serde_json::Value>| {
        if let Some(v) = v {
            o[k] = v;
        }
    };
    set(&mut o, "cacert", config.cacert.clone().map(Into::into));
    set(&mut o, "cert", config.cert.clone().map(Into::into));
    set(&mut o, "key", config.key.clone().map(Into::into));
    set(&mut o, "cname", config.cname.clone().map(Into::into));
    set(&mut o, "qps", config.rps.filter(|r| *r > 0.0).map(|r| json!(r as u64)));
    set(&mut o, "duration", config.duration().ok().flatten().map(|d| json!(d.as_nanos() as u64)));
    if !config.metadata.is_empty() {
        o["metadata"] = json!(config.metadata);
    }
    o
}

/// Seconds as a Go `time.Duration` in JSON: whole nanoseconds.
fn ns(s: f64) -> u64 {
    (s * 1e9).round() as u64
}

/// A time as Go's `time.Time` marshals it (RFC 3339, UTC, `nanos` digits
/// of the second when asked).
fn rfc3339(t: std::time::SystemTime, nanos: bool) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (days, secs) = ((d.as_secs() / 86_400) as i64, d.as_secs() % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let frac = match (nanos, d.subsec_nanos()) {
        (false, _) | (true, 0) => String::new(),
        (true, n) => format!(".{n:09}").trim_end_matches('0').to_string(),
    };
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{frac}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// ghz's report of the outcomes (as its `Finalize`: fastest, slowest, the
/// histogram and the percentiles from the calls that succeeded; the average
/// over all), plus the stream figures.
fn report(outcomes: &[Outcome], wall: f64, streams: bool) -> serde_json::Value {
    let ok_lat = sorted(outcomes.iter().filter(|o| o.error.is_empty()).map(|o| o.latency).collect());
    let (fastest, slowest) = (ok_lat.first().copied().unwrap_or(0.0), ok_lat.last().copied().unwrap_or(0.0));
    let average = if outcomes.is_empty() { 0.0 } else { outcomes.iter().map(|o| o.latency).sum::<f64>() / outcomes.len() as f64 };
    // ghz's histogram: eleven marks from fastest to slowest (in seconds), each
    // counting the latencies above the previous mark up to it.
    let mut histogram = vec![];
    if !ok_lat.is_empty() {
        let width = (slowest - fastest) / 10.0;
        let marks: Vec<f64> = (0..=10).map(|b| if b == 10 { slowest } else { fastest + width * b as f64 }).collect();
        let mut counts = [0usize; 11];
        let mut b = 0;
        for &x in &ok_lat {
            while x > marks[b] && b < 10 {
                b += 1;
            }
            counts[b] += 1;
        }
        for (mark, count) in marks.iter().zip(counts) {
            histogram.push(json!({"mark": mark, "count": count, "frequency": count as f64 / ok_lat.len() as f64}));
        }
    }
    // ghz's percentiles: the value at rank floor(p * n), one lower when that
    // is a whole number.
    let latency_distribution: Vec<_> = if ok_lat.is_empty() {
        vec![]
    } else {
        [10, 25, 50, 75, 90, 95, 99]
            .iter()
            .map(|&p| {
                let ip = p as f64 / 100.0 * ok_lat.len() as f64;
                let i = if ip == ip.floor() { (ip as usize).saturating_sub(1) } else { ip as usize };
                json!({"percentage": p, "latency": ns(ok_lat[i.min(ok_lat.len() - 1)])})
            })
            .collect()
    };
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for o in outcomes {
        *codes.entry(o.code.clone()).or_default() += 1;
        if !o.error.is_empty() {
            *errors.entry(o.error.clone()).or_default() += 1;
        }
    }
    let details: Vec<_> =
        outcomes.iter().map(|o| json!({"timestamp": rfc3339(o.started, true), "latency": ns(o.latency), "error": o.error, "status": o.code})).collect();
    let tokens: usize = outcomes.iter().map(|o| o.tokens).sum();
    let mut out = json!({
        "date": rfc3339(std::time::SystemTime::now(), false),
        "count": outcomes.len(),
        "total": ns(wall),
        "average": ns(average),
        "fastest": ns(fastest),
        "slowest": ns(slowest),
        "rps": outcomes.len() as f64 / wall.max(1e-9),
        "errorDistribution": errors,
        "statusCodeDistribution": codes,
        "latencyDistribution": latency_distribution,
        "histogram": histogram,
        "details": details,
        "tokens": tokens,
        "tokensPerSecond": tokens as f64 / wall.max(1e-9),
    });
    if streams {
        let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.code == "OK").collect();
        let ttft = sorted(ok.iter().filter_map(|o| o.ttft).collect());
        let itl = sorted(ok.iter().flat_map(|o| o.itl.iter().copied()).collect());
        let per_stream = sorted(ok.iter().map(|o| o.tokens as f64 / o.latency.max(1e-9)).collect());
        let q = |v: &[f64], p: f64| percentile(v, p).unwrap_or(0.0);
        let durations = |v: &[f64]| json!({"p50": ns(q(v, 0.5)), "p90": ns(q(v, 0.9)), "p99": ns(q(v, 0.99))});
        out["streams"] = json!({
            "timeToFirstToken": durations(&ttft),
            "interTokenLatency": durations(&itl),
            "tokensPerSecondPerStream": {"p50": q(&per_stream, 0.5), "p90": q(&per_stream, 0.9), "p99": q(&per_stream, 0.99)},
        });
    }
    out
}

/// The report as ghz prints its summary.
pub fn print_summary(r: &serde_json::Value) {
    let ms = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64 / 1e6;
    println!(
        "\nSummary:\n  Count:\t{}\n  Total:\t{:.2} ms\n  Slowest:\t{:.2} ms\n  Fastest:\t{:.2} ms\n  Average:\t{:.2} ms\n  Requests/sec:\t{:.2}",
        r["count"],
        ms(&r["total"]),
        ms(&r["slowest"]),
        ms(&r["fastest"]),
        ms(&r["average"]),
        r["rps"].as_f64().unwrap_or(0.0)
    );
    println!("\nResponse time histogram:");
    let hist = r["histogram"].as_array().cloned().unwrap_or_default();
    let most = hist.iter().filter_map(|h| h["count"].as_u64()).max().unwrap_or(1).max(1);
    for h in &hist {
        let n = h["count"].as_u64().unwrap_or(0);
        println!("  {:.3} [{n}]\t|{}", h["mark"].as_f64().unwrap_or(0.0) * 1e3, "∎".repeat((40 * n / most) as usize));
    }
    println!("\nLatency distribution:");
    for d in r["latencyDistribution"].as_array().into_iter().flatten() {
        println!("  {} % in {:.2} ms", d["percentage"], ms(&d["latency"]));
    }
    println!("\nStatus code distribution:");
    for (code, n) in r["statusCodeDistribution"].as_object().into_iter().flatten() {
        println!("  [{code}]\t{n} responses");
    }
    if let Some(errors) = r["errorDistribution"].as_object().filter(|e| !e.is_empty()) {
        println!("\nError distribution:");
        for (e, n) in errors {
            println!("  [{n}]\t{e}");
        }
    }
    println!("\nTokens:\t{} generated, {:.1} tokens/s in aggregate", r["tokens"], r["tokensPerSecond"].as_f64().unwrap_or(0.0));
    if let Some(s) = r.get("streams") {
        let p = |k: &str, scale: f64| {
            let v = |q: &str| s[k][q].as_f64().unwrap_or(0.0) * scale;
            format!("{:.2} / {:.2} / {:.2}", v("p50"), v("p90"), v("p99"))
        };
        println!("Streams (p50 / p90 / p99):");
        println!("  time to first token:\t{} ms", p("timeToFirstToken", 1e-6));
        println!("  inter-token latency:\t{} ms", p("interTokenLatency", 1e-6));
        println!("  tokens/s per stream:\t{}", p("tokensPerSecondPerStream", 1.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(latency: f64, code: &str) -> Outcome {
        let error = if code == "OK" { String::new() } else { format!("rpc error: code = {code} desc = no") };
        Outcome { started: std::time::UNIX_EPOCH, latency, code: code.into(), error, ttft: None, itl: vec![], tokens: 4 }
    }

    #[test]
    fn writes_ghz_json_report_keys_and_units() {
        // Ten OK calls of 1..10 ms and one failure.
        let mut o: Vec<Outcome> = (1..=10).map(|i| outcome(i as f64 * 1e-3, "OK")).collect();
        o.push(outcome(0.5, "Unavailable"));
        let r = report(&o, 2.0, false);
        assert_eq!(r["count"], 11);
        assert_eq!(r["total"], 2_000_000_000u64);
        assert_eq!(r["fastest"], 1_000_000u64);
        assert_eq!(r["slowest"], 10_000_000u64);
        // The average is over every call: (55 ms + 500 ms) / 11.
        assert_eq!(r["average"], 50_454_545u64);
        assert_eq!(r["statusCodeDistribution"], json!({"OK": 10, "Unavailable": 1}));
        assert_eq!(r["errorDistribution"], json!({"rpc error: code = Unavailable desc = no": 1}));
        // ghz's ranks over 10 samples: p10 -> the 1st, p25 -> the 3rd, p50 -> the 5th, p99 -> the 10th.
        let lat: Vec<(u64, u64)> =
            r["latencyDistribution"].as_array().unwrap().iter().map(|d| (d["percentage"].as_u64().unwrap(), d["latency"].as_u64().unwrap())).collect();
        assert_eq!(lat, vec![(10, 1_000_000), (25, 3_000_000), (50, 5_000_000), (75, 8_000_000), (90, 9_000_000), (95, 10_000_000), (99, 10_000_000)]);
        let counts: Vec<u64> = r["histogram"].as_array().unwrap().iter().map(|h| h["count"].as_u64().unwrap()).collect();
        assert_eq!(counts.iter().sum::<u64>(), 10);
        assert_eq!(r["histogram"][0]["mark"], 0.001);
        assert_eq!(r["histogram"][10]["mark"], 0.01);
        assert_eq!(r["details"].as_array().unwrap().len(), 11);
        assert_eq!(
            r["details"][10],
            json!({"timestamp": "1970-01-01T00:00:00Z", "latency": 500_000_000u64, "error": "rpc error: code = Unavailable desc = no", "status": "Unavailable"})
        );
        assert_eq!(r["tokens"], 44);
    }

    #[test]
    fn formats_times_as_go_does() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_795_996_800 + 3_661, 120_000_000);
        assert_eq!(rfc3339(t, false), "2026-11-30T01:01:01Z");
        assert_eq!(rfc3339(t, true), "2026-11-30T01:01:01.12Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400), false), "2000-02-29T00:00:00Z");
    }
}

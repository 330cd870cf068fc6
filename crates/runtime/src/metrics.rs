//! Prometheus metrics of a process, served on their own HTTP port
//! (`--metrics-listen`, `GET /metrics`, text format 0.0.4).
//!
//! One registry per process. `blockserve up` runs every tier in one process, so
//! the families carry a `tier` label (`router`, `block_decoder`,
//! `token_decoder`). Names follow Prometheus conventions: a `blockserve_`
//! prefix, base units (seconds, bytes), `_total` on counters.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Instant;

/// The type of one labelled counter (what a hot path keeps instead of looking its labels up each time).
pub use prometheus::IntCounter;
use prometheus::{Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use tokio::sync::watch;

pub struct Metrics {
    registry: Registry,
    /// RPCs answered, by tier, method and gRPC status code.
    pub requests: IntCounterVec,
    /// Time from an RPC's arrival to its answer (for streams: to the stream's start).
    pub request_seconds: HistogramVec,
    /// Router: time from a Generate call's arrival to its first token.
    pub time_to_first_token: Histogram,
    /// Router: time between consecutive token chunks of a stream.
    pub inter_token_latency: Histogram,
    /// Tokens generated, by tier (the router counts what it relays).
    pub generated_tokens: IntCounterVec,
    /// Sessions running now, by tier.
    pub active_sessions: IntGaugeVec,
    /// Engine iterations (block-decoder passes, token-decoder batches), by tier.
    pub iterations: IntCounterVec,
    /// Rows per engine iteration, by tier.
    pub batch_rows: HistogramVec,
    /// Commands waiting for an engine, by tier.
    pub queue_depth: IntGaugeVec,
    /// Block decoder: KV-cache pages by state (used by sessions, free,
    /// cached with no session holding them).
    pub kv_pages: IntGaugeVec,
    /// Block decoder: prompt blocks looked up in the prefix cache, by result
    /// (hit, miss), and pages evicted from it.
    pub prefix_cache_blocks: IntCounterVec,
    pub prefix_cache_evictions: IntCounterVec,
    /// Block decoder: pages the prefix cache holds (held by sessions or idle).
    pub prefix_cache_pages: IntGaugeVec,
    /// Router: instances chosen, by tier and reason (least_loaded, prefix,
    /// prefix_overloaded).
    pub routing_choices: IntCounterVec,
    /// Token decoder: rows of the preallocated local cache by state (used, free).
    pub local_kv_rows: IntGaugeVec,
    /// Context-embedding payload bytes, by tier and direction (sent, received).
    pub context_bytes: IntCounterVec,
    /// Session-store calls (Redis round trips), by operation and outcome.
    pub store_seconds: HistogramVec,
    /// Sessions moved after a failure, by the tier that moved them and why
    /// (`token_decoder_lost`, `block_decoder_lost`, `orphaned`), and those
    /// failed because they reached the migration limit (`limit`).
    pub migrations: IntCounterVec,
    /// Time from a failure's detection to the first token from the new
    /// instance, by tier.
    pub migration_seconds: HistogramVec,
    /// Token decoder: session-store writes waiting to be applied (they pile up
    /// while the store is unreachable).
    pub buffered_writes: IntGauge,
}

fn seconds_buckets() -> Vec<f64> {
    vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("registered once");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("registered once");
            g
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid histogram");
            registry.register(Box::new(h.clone())).expect("registered once");
            h
        };
        let histogram = |name: &str, help: &str| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(seconds_buckets())).expect("valid histogram");
            registry.register(Box::new(h.clone())).expect("registered once");
            h
        };
        let rows = vec![1.0, 8.0, 32.0, 128.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];
        Self {
            requests: counter("blockserve_requests_total", "RPCs answered, by tier, method and gRPC status code.", &["tier", "method", "code"]),
            request_seconds: histogram_vec(
                "blockserve_request_duration_seconds",
                "Time from an RPC's arrival to its answer (streams: to the stream's start).",
                &["tier", "method"],
                seconds_buckets(),
            ),
            time_to_first_token: histogram("blockserve_time_to_first_token_seconds", "Time from a Generate call's arrival to its first token (router)."),
            inter_token_latency: histogram("blockserve_inter_token_latency_seconds", "Time between consecutive token chunks of a stream (router)."),
            generated_tokens: counter("blockserve_generated_tokens_total", "Tokens generated (the router counts those it relays).", &["tier"]),
            active_sessions: gauge("blockserve_active_sessions", "Sessions running now.", &["tier"]),
            iterations: counter("blockserve_engine_iterations_total", "Engine iterations: block-decoder passes, token-decoder batches.", &["tier"]),
            batch_rows: histogram_vec("blockserve_batch_rows", "Rows per engine iteration.", &["tier"], rows),
            queue_depth: gauge("blockserve_queue_depth", "Commands waiting for an engine.", &["tier"]),
            kv_pages: gauge("blockserve_kv_cache_pages", "Block decoder: KV-cache pages by state (used, free, cached_idle).", &["state"]),
            prefix_cache_blocks: counter(
                "blockserve_prefix_cache_blocks_total",
                "Block decoder: prompt blocks looked up in the prefix cache at admission, by result (hit, miss).",
                &["result"],
            ),
            prefix_cache_evictions: counter("blockserve_prefix_cache_evictions_total", "Block decoder: pages evicted from the prefix cache.", &["tier"]),
            prefix_cache_pages: gauge("blockserve_prefix_cache_pages", "Block decoder: pages the prefix cache holds (held by sessions or idle).", &["tier"]),
            routing_choices: counter(
                "blockserve_routing_choices_total",
                "Router: instances chosen for new sessions, by tier and reason (least_loaded, prefix, prefix_overloaded).",
                &["tier", "reason"],
            ),
            local_kv_rows: gauge("blockserve_local_kv_rows", "Token decoder: rows of the local cache by state.", &["state"]),
            context_bytes: counter("blockserve_context_embedding_bytes_total", "Context-embedding payload bytes.", &["tier", "direction"]),
            store_seconds: histogram_vec(
                "blockserve_store_round_trip_seconds",
                "Session-store calls (Redis round trips), by operation and outcome.",
                &["op", "outcome"],
                seconds_buckets(),
            ),
            migrations: counter("blockserve_migrations_total", "Sessions moved to another instance after a failure, by tier and cause.", &["tier", "cause"]),
            migration_seconds: histogram_vec(
                "blockserve_migration_seconds",
                "Time from a failure's detection to the first token from the new instance.",
                &["tier"],
                seconds_buckets(),
            ),
            buffered_writes: {
                let g = IntGauge::new("blockserve_store_buffered_writes", "Session-store writes waiting to be applied (token decoder).").expect("valid gauge");
                registry.register(Box::new(g.clone())).expect("registered once");
                g
            },
            registry,
        }
    }

    /// The text exposition of every family, and the process's CPU time as
    /// the standard `process_cpu_seconds_total` (what the load generator
    /// divides by the tokens generated: CPU per token, per tier).
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding");
        let mut text = String::from_utf8(buf).expect("the text format is UTF-8");
        if let Some(cpu) = process_cpu_seconds() {
            text.push_str(&format!(
                "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}\n"
            ));
        }
        text
    }
}

/// User plus system CPU time of this process so far, in seconds.
pub fn process_cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage writes the struct it is given and nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Some(secs(u.ru_utime) + secs(u.ru_stime))
}

/// This process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The gRPC code name Prometheus users expect (`OK`, `INVALID_ARGUMENT`, ...).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Run an RPC handler inside its span (`TIER.Method`, a child of the caller's
/// span when `trace` holds its W3C context), counting its answer by code and
/// timing it.
pub async fn rpc<T>(
    tier: &str,
    method: &str,
    trace: std::collections::HashMap<String, String>,
    handler: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    use tracing::Instrument;
    let span = tracing::info_span!("rpc", otel.name = %format!("{tier}.{method}"), otel.kind = "server", rpc.method = method);
    crate::telemetry::set_parent(&span, &trace);
    let t0 = Instant::now();
    let out = handler.instrument(span).await;
    let code = match &out {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    METRICS.requests.with_label_values(&[tier, method, code_name(code)]).inc();
    METRICS.request_seconds.with_label_values(&[tier, method]).observe(t0.elapsed().as_secs_f64());
    out
}

/// Counts a running session in `blockserve_active_sessions{tier}` while it lives.
pub struct ActiveSession(&'static str);

impl ActiveSession {
    pub fn new(tier: &'static str) -> Self {
        METRICS.active_sessions.with_label_values(&[tier]).inc();
        Self(tier)
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        METRICS.active_sessions.with_label_values(&[self.0]).dec();
    }
}

/// Serve `GET /metrics` and `GET /healthz` (200 while the process serves; an
/// HTTP probe for deployments whose gRPC port takes only TLS, which
/// Kubernetes' gRPC probes do not speak) on `listener` until `stop` turns
/// true. A minimal HTTP/1.1 responder: one request per connection, any other
/// path is 404.
pub async fn serve(listener: tokio::net::TcpListener, mut stop: watch::Receiver<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut conn, _) = tokio::select! {
            c = listener.accept() => match c { Ok(c) => c, Err(_) => continue },
            _ = stop.wait_for(|s| *s) => return,
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (up to the blank line).
            while n < buf.len() {
                match conn.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let get = head.starts_with("GET ");
            let (status, body) = if get && (path == "/metrics" || path.starts_with("/metrics?")) {
                ("200 OK", METRICS.render())
            } else if get && path == "/healthz" {
                ("200 OK", "ok\n".to_string())
            } else {
                ("404 Not Found", "not found: the metrics are at GET /metrics, the health check at GET /healthz\n".to_string())
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        });
    }
}

/// Start the metrics endpoint when `addr` is given; returns the bound address.
pub async fn start(addr: Option<SocketAddr>, stop: watch::Receiver<bool>) -> anyhow::Result<Option<SocketAddr>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(address = %bound, "metrics at http://{bound}/metrics");
    tokio::spawn(serve(listener, stop));
    Ok(Some(bound))
}

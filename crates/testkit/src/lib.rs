//! Helpers for tests that run real servers on loopback: a free port, a real
//! `redis-server` child process, and child processes that die with the test.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// Taken below Linux's ephemeral range (32768-60999): a port the kernel hands
/// out for `bind(0)` can be given again as the source port of an outgoing
/// connection (to Redis, between tiers) before the server meant for it binds
/// it, which fails that server with "address already in use". Ports are
/// tried in a sequence that starts somewhere different in each process, so
/// test binaries running at once rarely try the same ones, and that never
/// repeats within a process (a step coprime to the span): a port handed to
/// one test but not bound yet is never handed to a test running beside it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static SEED: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let seed = *SEED.get_or_init(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        std::process::id().wrapping_mul(7_919).wrapping_add(nanos) % SPAN
    });
    for _ in 0..SPAN {
        let port = (LOW + (seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(4_099))) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0").expect("bind loopback").local_addr().unwrap().port()
}

/// Wait until something accepts connections on `port`, or panic after `timeout`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < timeout, "nothing listens on port {port} after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The path of a workspace binary `name` in the target dir that holds
/// `sibling` (a binary cargo built for this test, e.g.
/// `env!("CARGO_BIN_EXE_blockserve")`).
///
/// `cargo test` builds only the binaries of the package under test, so a
/// binary of another package is there only if something built it:
/// `scripts/test` runs `cargo build --workspace --bins` first. Panics, saying
/// so, when the binary is missing, instead of failing later with a bare
/// "No such file or directory".
pub fn workspace_bin(sibling: &str, name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(sibling).with_file_name(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does), so that tests never run a leftover binary",
        path.display()
    );
    path
}

/// A child process killed when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A throwaway `redis-server` on a free port: without persistence, or (for
/// tests that restart it) with an append-only file synced on every write in
/// a directory of its own, so a restart keeps everything.
pub struct RedisServer {
    pub port: u16,
    child: Option<ChildGuard>,
    dir: Option<std::path::PathBuf>,
}

impl RedisServer {
    pub fn start() -> Self {
        let mut r = Self { port: free_port(), child: None, dir: None };
        r.restart();
        r
    }

    /// A server whose data survives [`RedisServer::stop`] and [`RedisServer::restart`].
    pub fn persistent() -> Self {
        let dir = std::env::temp_dir().join(format!("blockserve-redis-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("redis data dir");
        let mut r = Self { port: free_port(), child: None, dir: Some(dir) };
        r.restart();
        r
    }

    /// Stop the server now (SIGKILL).
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// (Re)start the server on its port.
    pub fn restart(&mut self) {
        self.child = None;
        let mut args = vec!["--port".to_string(), self.port.to_string(), "--bind".into(), "127.0.0.1".into(), "--save".into(), String::new()];
        match &self.dir {
            Some(d) => args.extend(["--dir", d.to_str().unwrap(), "--appendonly", "yes", "--appendfsync", "always"].map(String::from)),
            None => args.extend(["--appendonly", "no"].map(String::from)),
        }
        let child = Command::new("redis-server").args(&args).stdout(Stdio::null()).spawn().expect("redis-server must be installed (scripts/test installs it)");
        self.child = Some(ChildGuard(child));
        wait_for_port(self.port, Duration::from_secs(10));
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.child = None;
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Resident memory of process `pid` in bytes (Linux), if it is running.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

/// `GET /metrics` of a process serving Prometheus metrics on `port`: the body.
pub fn scrape_metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics port");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out.split_once("\r\n\r\n").expect("an HTTP response").1.to_string()
}

/// The sum of the samples of `name` in Prometheus text whose labels include
/// every `labels` pair (0 when there are none).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))).then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

/// Count of a Prometheus histogram over several scrapes (e.g. of processes
/// that were later killed), and the upper bound of the bucket that holds each
/// quantile in `qs` (`inf` past the last bucket).
pub fn histogram_quantiles(texts: &[String], name: &str, labels: &[(&str, &str)], qs: &[f64]) -> (u64, Vec<f64>) {
    let mut buckets: std::collections::BTreeMap<u64, (f64, f64)> = Default::default(); // le bits -> (le, count)
    let bucket = format!("{name}_bucket");
    for text in texts {
        for l in text.lines().filter(|l| l.starts_with(&bucket)) {
            let Some((series, value)) = l.rsplit_once(' ') else { continue };
            if !labels.iter().all(|(k, v)| series.contains(&format!("{k}=\"{v}\""))) {
                continue;
            }
            let Some(le) = series.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
            let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
            let e = buckets.entry(le.to_bits()).or_insert((le, 0.0));
            e.1 += value.parse::<f64>().unwrap();
        }
    }
    let mut sorted: Vec<(f64, f64)> = buckets.into_values().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = sorted.last().map_or(0.0, |b| b.1);
    let at = |q: f64| sorted.iter().find(|b| b.1 >= q * total).map_or(f64::INFINITY, |b| b.0);
    (total as u64, qs.iter().map(|&q| at(q)).collect())
}

/// A fresh directory under the system temp dir, removed (with what is in it)
/// when dropped, also when the test fails.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    /// `blockserve-<tag>-<pid>`, emptied if it exists.
    pub fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("blockserve-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create temp dir");
        Self(d)
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

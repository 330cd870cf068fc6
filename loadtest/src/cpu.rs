//! CPU time of the stack's processes over a run, read from their metrics
//! endpoints (`process_cpu_seconds_total`, which every tier serves), so the
//! summary can say how much host work each tier spends per generated token.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A process to watch: its name in the table and its metrics endpoint.
#[derive(Clone, Debug)]
pub struct Watched {
    pub name: String,
    pub address: String,
}

impl std::str::FromStr for Watched {
    type Err = anyhow::Error;
    /// `NAME=HOST:PORT`.
    fn from_str(s: &str) -> Result<Self> {
        let Some((name, address)) = s.split_once('=') else { bail!("--metrics {s:?}: expected NAME=HOST:PORT (e.g. router=127.0.0.1:9100)") };
        Ok(Self { name: name.to_string(), address: address.trim_start_matches("http://").trim_end_matches("/metrics").to_string() })
    }
}

/// `process_cpu_seconds_total` of the process serving metrics at `address`.
pub fn cpu_seconds(address: &str) -> Result<f64> {
    let mut conn = std::net::TcpStream::connect(address).with_context(|| format!("metrics endpoint {address}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.write_all(format!("GET /metrics HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    text.lines()
        .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("{address} serves no process_cpu_seconds_total"))
}

/// CPU seconds of each watched process now.
pub fn sample(watched: &[Watched]) -> Result<Vec<f64>> {
    watched.iter().map(|w| cpu_seconds(&w.address)).collect()
}

/// The table of CPU used between two samples, per generated token.
pub fn print_table(watched: &[Watched], before: &[f64], after: &[f64], tokens: usize, wall: f64) {
    println!("\n| process | CPU s | cores busy | CPU per generated token |");
    println!("|---|---:|---:|---:|");
    for (w, (b, a)) in watched.iter().zip(before.iter().zip(after)) {
        let cpu = a - b;
        println!("| {} | {cpu:.2} | {:.2} | {:.2} us |", w.name, cpu / wall.max(1e-9), cpu * 1e6 / tokens.max(1) as f64);
    }
}

//! `blockserve-latency-proxy`: a TCP proxy that adds a fixed delay to every
//! byte in each direction, so tiers on one machine see the round trip of tiers
//! on separate hosts. Put it between token decoders and a block decoder by
//! starting the block decoder with `--advertise http://PROXY` (token decoders
//! dial the address it registers):
//!
//!   blockserve-latency-proxy --listen 127.0.0.1:7101 --upstream 127.0.0.1:7001 --rtt-ms 1
//!
//! Half of `--rtt-ms` is added on the way there and half on the way back.
//! Bytes keep their order and are never merged across the delay: each read is
//! forwarded as one write once it is old enough. Bandwidth is not limited.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(version, about = "TCP proxy that adds a round-trip delay (for measuring the stack as if its tiers were on separate hosts).")]
struct Args {
    /// Address to accept connections on.
    #[arg(long, env = "LATENCY_PROXY_LISTEN")]
    listen: SocketAddr,
    /// Address every connection is forwarded to.
    #[arg(long, env = "LATENCY_PROXY_UPSTREAM")]
    upstream: String,
    /// Added round trip in milliseconds (half each way); 0 forwards at once.
    #[arg(long, env = "LATENCY_PROXY_RTT_MS", default_value_t = 1.0)]
    rtt_ms: f64,
}

// Plain threads, not an async runtime: tokio's timers tick in whole
// milliseconds, too coarse for a 0.25 ms one-way delay; a sleeping thread
// wakes within tens of microseconds. Connections are few (one per link).
fn main() -> Result<()> {
    let a = Args::parse();
    let listener = TcpListener::bind(a.listen).with_context(|| format!("listening on {}", a.listen))?;
    let one_way = Duration::from_secs_f64(a.rtt_ms.max(0.0) / 2e3);
    eprintln!("latency proxy {} -> {}, +{:.3} ms round trip", listener.local_addr()?, a.upstream, a.rtt_ms);
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        match TcpStream::connect(&a.upstream) {
            Ok(server) => relay(client, server, one_way)?,
            Err(e) => eprintln!("upstream {}: {e}", a.upstream),
        }
    }
    Ok(())
}

/// Copy both ways with `one_way` added to each direction.
fn relay(client: TcpStream, server: TcpStream, one_way: Duration) -> Result<()> {
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    delayed_copy(client.try_clone()?, server.try_clone()?, one_way);
    delayed_copy(server, client, one_way);
    Ok(())
}

/// Forward what `from` reads to `to`, each read `delay` after it arrived: a
/// reader thread stamps what it reads, a writer thread writes each piece once
/// it is due. When `from` closes, `to` is shut for writing after the rest.
fn delayed_copy(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, bytes) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

//! `--http`: the same load through the router's OpenAI-compatible HTTP API
//! (streamed `/v1/completions` over HTTP/1.1, one keep-alive connection per
//! worker), so the two faces of one router can be compared under one load.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use serde_json::Value;

use crate::stats::StreamClock;

/// One worker's connection to the HTTP API.
pub struct Conn {
    host: String,
    sender: SendRequest<Full<Bytes>>,
}

/// `http://host:port` (a trailing `/v1` is allowed) as `host:port`.
fn host_of(base: &str) -> String {
    base.trim_start_matches("http://").trim_end_matches('/').trim_end_matches("/v1").to_string()
}

pub async fn connect(base: &str) -> Result<Conn> {
    let host = host_of(base);
    let tcp = tokio::net::TcpStream::connect(&host).await.with_context(|| format!("connecting to {host}"))?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { host, sender })
}

/// The served model's (name, vocabulary size, block length) from `/v1/models`.
pub async fn model(base: &str) -> Result<(String, u32, u32)> {
    let host = host_of(base);
    let tcp = tokio::net::TcpStream::connect(&host).await.with_context(|| format!("connecting to {host}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(hyper::Request::get("/v1/models").header("host", &host).body(Empty::new())?).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("GET /v1/models: HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    let v: Value = serde_json::from_slice(&body)?;
    let m = &v["data"][0];
    let n = |k: &str| m[k].as_u64().map(|x| x as u32).with_context(|| format!("/v1/models has no {k}: {v}"));
    Ok((m["id"].as_str().unwrap_or_default().to_string(), n("vocab_size")?, n("block_length")?))
}

/// One streamed completion of `gen_len` tokens (EOS ignored, greedy), timed
/// from `start`.
pub async fn generate(conn: &mut Conn, prompt: Vec<u32>, gen_len: usize, start: Instant) -> Result<StreamClock> {
    let body = serde_json::json!({"prompt": prompt, "max_tokens": gen_len, "temperature": 0, "ignore_eos": true, "stream": true});
    let req = hyper::Request::post("/v1/completions")
        .header("host", &conn.host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    conn.sender.ready().await?;
    let resp = conn.sender.send_request(req).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = body.collect().await?.to_bytes();
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&text));
    }
    let mut clock = StreamClock::new(start);
    let mut buf: Vec<u8> = vec![];
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        buf.extend_from_slice(&data);
        // Whole events end with a blank line.
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = std::str::from_utf8(&event)?;
            let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
            if data == "[DONE]" {
                return Ok(clock);
            }
            let v: Value = serde_json::from_str(data)?;
            if v.get("error").is_some() {
                bail!("the stream ended with an error: {}", v["error"]);
            }
            let n = v["choices"][0]["token_ids"].as_array().map_or(0, Vec::len);
            if n > 0 {
                clock.chunk(n);
            }
            if v["choices"][0]["finish_reason"] == "error" {
                bail!("the session failed");
            }
        }
    }
    bail!("the stream ended without [DONE]")
}

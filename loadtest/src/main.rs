//! `blockserve-loadtest`: drive a running stack (router, block decoder, token
//! decoders) over gRPC with `--concurrency` streams at once, in the benchmark
//! settings of `blockserve bench` (EOS ignored, greedy), and print generated
//! tokens/s with time-to-first-token and inter-token-latency percentiles.
//!
//!   blockserve-loadtest --target http://127.0.0.1:50051 --setting decode-heavy --concurrency 256
//!
//! Tokens arrive a block at a time; a token's inter-token latency is the gap
//! since the previous chunk divided by the tokens in its chunk.
//!
//! With `--http http://127.0.0.1:8000` the same load goes through the
//! router's OpenAI-compatible HTTP API (streamed completions) instead.
//!
//! With `--config FILE` it runs a ghz JSON config instead (see `ghz.rs`) and
//! prints a ghz-style summary (`--format json` for JSON):
//!
//!   blockserve-loadtest --config loadtest/ghz/generate.json --target 127.0.0.1:50051

mod cpu;
mod ghz;
mod ghz_run;
mod http_load;
mod stats;
mod synthetic;

use stats::{percentile, sorted, StreamClock};

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blockserve_proto::v1::generation_client::GenerationClient;
use blockserve_proto::v1::{generate_request, generate_response, GenerateRequest, GenerationParameters, ModelInfoRequest, TokenIds};
use clap::Parser;
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint};

/// mimalloc instead of glibc malloc: fewer cycles per allocation on the
/// per-message paths (glibc's bookkeeping was about 8% of a router's CPU).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(version, about = "Load generator for a blockserve stack (talks to the router over gRPC).")]
struct Args {
    /// Router address.
    #[arg(long, env = "LOADTEST_TARGET", default_value = "http://127.0.0.1:50051")]
    target: String,
    /// Drive the router's OpenAI-compatible HTTP API at this address instead
    /// of the gRPC API (streamed /v1/completions, one HTTP/1.1 connection per
    /// concurrent stream; --connections is ignored).
    #[arg(long, env = "LOADTEST_HTTP")]
    http: Option<String>,
    /// Streams open at once.
    #[arg(long, env = "LOADTEST_CONCURRENCY", default_value_t = 64)]
    concurrency: usize,
    /// Requests in all (0: one per stream).
    #[arg(long, env = "LOADTEST_REQUESTS", default_value_t = 0)]
    requests: usize,
    /// prefill-heavy (prompt 2048, generate 128), decode-heavy (prompt 128,
    /// generate 2048) or shared-prefix (request i: prefix i mod --prefixes of
    /// --prefix-len tokens, then 64 of its own; generate 128).
    #[arg(long, env = "LOADTEST_SETTING", default_value = "decode-heavy")]
    setting: String,
    /// shared-prefix: distinct prefixes.
    #[arg(long, default_value_t = 16)]
    prefixes: usize,
    /// shared-prefix: tokens of each prefix.
    #[arg(long, default_value_t = 2048)]
    prefix_len: usize,
    /// shared-prefix: the k-th request of each prefix (request i is the
    /// (i / prefixes)-th of prefix i mod prefixes) has an own part (k mod
    /// this) tokens shorter, so that with 4 the prompts sharing a prefix take
    /// every length modulo L = 4 (see the router's --prompt-layout).
    #[arg(long, default_value_t = 1)]
    suffix_spread: usize,
    /// Prompt tokens per request (overrides the setting's).
    #[arg(long)]
    prompt_len: Option<usize>,
    /// Tokens generated per request (overrides the setting's).
    #[arg(long)]
    gen_len: Option<usize>,
    /// HTTP/2 connections to the router; streams are spread over them.
    #[arg(long, env = "LOADTEST_CONNECTIONS", default_value_t = 8)]
    connections: usize,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run a ghz JSON config (call, host, total, concurrency, rps, duration,
    /// data, metadata, load-schedule ...) instead of a setting. --target, when
    /// given, overrides its host.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// With --config: summary (ghz-style text) or json.
    #[arg(long, default_value = "summary")]
    format: String,
    /// A process of the stack to measure, as NAME=HOST:PORT of its metrics
    /// endpoint (`--metrics-listen`); repeatable, or comma-separated in the
    /// variable. The summary adds each one's CPU time over the run and per
    /// generated token.
    #[arg(long = "metrics", env = "LOADTEST_METRICS", value_delimiter = ',')]
    metrics: Vec<cpu::Watched>,
    /// Drive the block decoder at this address (http://HOST:PORT) on its own,
    /// as synthetic token decoders over the real link protocol: `--links`
    /// links, `--concurrency` sessions with `--prompt-len` prompts, each
    /// context answered at once. Prints blocks/s.
    #[arg(long)]
    synthetic_block_decoder: Option<String>,
    /// With --synthetic-block-decoder: links (token decoders) to open.
    #[arg(long, default_value_t = 1)]
    links: usize,
    /// With --synthetic-block-decoder: seconds measured, after --warmup-s.
    #[arg(long, default_value_t = 20.0)]
    duration_s: f64,
    /// With --synthetic-block-decoder: seconds before measuring (prefill).
    #[arg(long, default_value_t = 10.0)]
    warmup_s: f64,
    /// With --synthetic-block-decoder: blocks each synthetic session
    /// generates before a fresh one replaces it.
    #[arg(long, default_value_t = 1024)]
    session_blocks: u32,
    /// With --synthetic-block-decoder: one token-decoder GPU's measured
    /// tokens/s; the report then says how many such GPUs the block decoder feeds.
    #[arg(long)]
    td_tokens_per_s: Option<f64>,
}

#[derive(Default)]
struct Samples {
    ttft: Vec<f64>,
    itl: Vec<f64>,
    tokens: usize,
    ok: usize,
    errors: Vec<String>,
}

/// One request, start to finish, timed.
async fn one(mut client: GenerationClient<Channel>, prompt: Vec<u32>, gen_len: usize) -> Result<StreamClock> {
    let req = GenerateRequest {
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds { ids: prompt })),
        parameters: Some(GenerationParameters { max_new_tokens: Some(gen_len as u32), ignore_eos: true, temperature: Some(0.0), ..Default::default() }),
        session_id: String::new(),
    };
    let start = Instant::now();
    let mut stream = client.generate(req).await?.into_inner();
    let mut clock = StreamClock::new(start);
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(generate_response::Event::Tokens(chunk)) if !chunk.token_ids.is_empty() => clock.chunk(chunk.token_ids.len()),
            Some(generate_response::Event::Finished(f)) if !f.error.is_empty() => {
                bail!("finished with error: {}", f.error)
            }
            _ => {}
        }
    }
    Ok(clock)
}

/// Record a finished request's latencies.
async fn record(clock: StreamClock, gen_len: usize, samples: &Mutex<Samples>) -> Result<()> {
    if clock.tokens != gen_len {
        bail!("got {} tokens, asked for {gen_len}", clock.tokens);
    }
    let mut s = samples.lock().await;
    s.ttft.push(clock.ttft.unwrap_or(f64::NAN));
    s.itl.extend(clock.itl);
    s.tokens += clock.tokens;
    s.ok += 1;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if let Some(path) = &a.config {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config = ghz::Config::parse(&text).with_context(|| path.display().to_string())?;
        let target = std::env::args().any(|x| x == "--target" || x.starts_with("--target=")).then(|| a.target.clone());
        let report = ghz_run::run(config, target).await?;
        match a.format.as_str() {
            "json" => println!("{}", serde_json::to_string_pretty(&report)?),
            "summary" => ghz_run::print_summary(&report),
            other => bail!("--format {other:?}: expected summary or json"),
        }
        return Ok(());
    }
    if let Some(address) = a.synthetic_block_decoder.clone() {
        return run_synthetic(&a, address).await;
    }
    let (p, g) = match a.setting.as_str() {
        "prefill-heavy" => (2048, 128),
        "decode-heavy" => (128, 2048),
        "shared-prefix" => (a.prefix_len + 64, 128),
        other => bail!("--setting {other:?}: expected prefill-heavy, decode-heavy or shared-prefix"),
    };
    let (prompt_len, gen_len) = (a.prompt_len.unwrap_or(p), a.gen_len.unwrap_or(g));
    let shared = (a.setting == "shared-prefix").then_some((a.prefixes.max(1), a.prefix_len.min(prompt_len)));
    let requests = if a.requests == 0 { a.concurrency } else { a.requests };
    let mut channels = vec![];
    let vocab = match &a.http {
        Some(base) => {
            let (name, vocab, block_length) = http_load::model(base).await?;
            eprintln!("target {base} (HTTP) serves {name} (vocab {vocab}, block length {block_length})");
            vocab.max(2)
        }
        None => {
            for _ in 0..a.connections.max(1) {
                let ch = Endpoint::from_shared(a.target.clone())?
                    .connect_timeout(Duration::from_secs(10))
                    .connect()
                    .await
                    .with_context(|| format!("connecting to {}", a.target))?;
                channels.push(ch);
            }
            let info = GenerationClient::new(channels[0].clone()).model_info(ModelInfoRequest {}).await?.into_inner();
            eprintln!("target {} serves {} (vocab {}, block length {})", a.target, info.model_name, info.vocab_size, info.block_length);
            info.vocab_size.max(2)
        }
    };
    let samples = Arc::new(Mutex::new(Samples::default()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cpu_before = cpu::sample(&a.metrics)?;
    let t0 = Instant::now();
    let mut workers = vec![];
    for w in 0..a.concurrency {
        let client = (!channels.is_empty()).then(|| GenerationClient::new(channels[w % channels.len()].clone()));
        let (samples, next, http) = (samples.clone(), next.clone(), a.http.clone());
        let (seed, spread) = (a.seed as usize, a.suffix_spread.max(1));
        workers.push(tokio::spawn(async move {
            let mut conn = None;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                // shared-prefix: the first prefix_len ids are prefix i mod prefixes.
                let id = |a: usize, j: usize| 1 + ((a * 7919 + j * 104729 + seed) as u32 % (vocab - 1));
                let prompt: Vec<u32> = match shared {
                    Some((prefixes, prefix_len)) => (0..(prompt_len - (i / prefixes) % spread).max(prefix_len))
                        .map(|j| if j < prefix_len { id(i % prefixes, j) } else { id(1_000_003 + i, j) })
                        .collect(),
                    None => (0..prompt_len).map(|j| id(i, j)).collect(),
                };
                let start = Instant::now();
                let clock = match (&client, &http) {
                    (Some(c), _) => one(c.clone(), prompt, gen_len).await,
                    (None, Some(base)) => {
                        // A connection that failed is opened again for the next request.
                        let c = match conn.take() {
                            Some(c) => Ok(c),
                            None => http_load::connect(base).await,
                        };
                        match c {
                            Ok(mut c) => {
                                let r = http_load::generate(&mut c, prompt, gen_len, start).await;
                                if r.is_ok() {
                                    conn = Some(c);
                                }
                                r
                            }
                            Err(e) => Err(e),
                        }
                    }
                    (None, None) => unreachable!("a gRPC channel or an HTTP address"),
                };
                if let Err(e) = match clock {
                    Ok(clock) => record(clock, gen_len, &samples).await,
                    Err(e) => Err(e),
                } {
                    samples.lock().await.errors.push(format!("{e:#}"));
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu_after = cpu::sample(&a.metrics)?;
    let mut s = samples.lock().await;
    let ms = |x: f64| x * 1e3;
    println!("| setting | concurrency | requests | ok | errors | wall s | tokens/s | TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|---|---|");
    let (ttft, itl) = (sorted(std::mem::take(&mut s.ttft)), sorted(std::mem::take(&mut s.itl)));
    let pct = |v: &[f64], p: f64| percentile(v, p).unwrap_or(f64::NAN);
    let (t50, t90, t99) = (pct(&ttft, 0.5), pct(&ttft, 0.9), pct(&ttft, 0.99));
    let (i50, i90, i99) = (pct(&itl, 0.5), pct(&itl, 0.9), pct(&itl, 0.99));
    println!(
        "| {prompt_len}/{gen_len} | {} | {requests} | {} | {} | {wall:.2} | {:.0} | {:.0} / {:.0} / {:.0} | {:.2} / {:.2} / {:.2} |",
        a.concurrency,
        s.ok,
        s.errors.len(),
        s.tokens as f64 / wall,
        ms(t50),
        ms(t90),
        ms(t99),
        ms(i50),
        ms(i90),
        ms(i99)
    );
    if !a.metrics.is_empty() {
        cpu::print_table(&a.metrics, &cpu_before, &cpu_after, s.tokens, wall);
    }
    if let Some(e) = s.errors.first() {
        eprintln!("first error: {e}");
        bail!("{} of {requests} requests failed", s.errors.len());
    }
    Ok(())
}

/// `--synthetic-block-decoder`: the block decoder's capacity on its own.
async fn run_synthetic(a: &Args, address: String) -> Result<()> {
    let block_length = 4;
    let prompt_len = a.prompt_len.unwrap_or(128);
    let s = synthetic::Synthetic {
        address,
        session_blocks: a.session_blocks.max(1),
        links: a.links,
        sessions: a.concurrency,
        prompt_len,
        block_length,
        warmup: Duration::from_secs_f64(a.warmup_s),
        duration: Duration::from_secs_f64(a.duration_s),
    };
    let blocks = synthetic::run(s).await?;
    let tokens = blocks * block_length as f64;
    println!("| links | sessions | prompt | blocks/s | tokens/s it can feed | token-decoder GPUs fed |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let gpus = a.td_tokens_per_s.map_or("(give --td-tokens-per-s)".to_string(), |t| format!("{:.2} at {t:.0} tokens/s each", tokens / t));
    println!("| {} | {} | {prompt_len} | {blocks:.0} | {tokens:.0} | {gpus} |", a.links, a.concurrency);
    Ok(())
}

//! Helpers shared by the tests that run blockserve's tiers as processes.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use blockserve_proto::v1::*;
use blockserve_testkit::{free_port, wait_for_port, ChildGuard};

pub fn fixture_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/official-tiny-b4")
}

pub fn demo_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

/// `blockserve up` with the bundled model on a free port (plus `extra`
/// flags), ready; returns its address and the process.
pub fn up(extra: &[&str]) -> (String, ChildGuard) {
    let (listen, _, guard) = up_http(extra);
    (listen, guard)
}

/// [`up`], also returning the address of its HTTP API.
pub fn up_http(extra: &[&str]) -> (String, String, ChildGuard) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let http = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_blockserve"))
        .args(["up", "--listen", &listen, "--http-listen", &http])
        .args(extra)
        .env_remove("BLOCKSERVE_MODEL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = ChildGuard(child);
    wait_for_port(port, Duration::from_secs(60));
    (listen, http, guard)
}

/// Start `blockserve ARGS` with `env` (killed when the guard drops).
pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> ChildGuard {
    let child = Command::new(env!("CARGO_BIN_EXE_blockserve"))
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .env_remove("BLOCKSERVE_MODEL")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    ChildGuard(child)
}

/// Greedy output of each prompt from the in-process engine (f32, CPU): what
/// the stack must produce, faults or not.
pub fn greedy_reference(model: &std::path::Path, prompts: &[Vec<u32>], max_new_tokens: u32) -> Vec<Vec<u32>> {
    let prompts: Vec<_> = prompts.iter().map(|p| (p.clone(), blockserve_model::PromptLayout::Reference)).collect();
    greedy_reference_in(model, &prompts, max_new_tokens)
}

/// [`greedy_reference`] for prompts each in its own layout.
pub fn greedy_reference_in(model: &std::path::Path, prompts: &[(Vec<u32>, blockserve_model::PromptLayout)], max_new_tokens: u32) -> Vec<Vec<u32>> {
    use blockserve_model::{loader::load_model, GenerationRequest, SamplingParams, StopCriteria};
    let engine = load_model(model, None, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let stop = StopCriteria { max_new_tokens: max_new_tokens as usize, eos_token_id: None, stop_token_ids: vec![] };
    let reqs: Vec<GenerationRequest> = prompts
        .iter()
        .map(|(p, layout)| GenerationRequest { prompt: p.clone(), sampling: SamplingParams::greedy(), stop: stop.clone(), layout: *layout })
        .collect();
    engine.generate(&reqs, false).unwrap().into_iter().map(|o| o.tokens).collect()
}

pub fn ids_request(ids: Vec<u32>, params: GenerationParameters) -> GenerateRequest {
    GenerateRequest { prompt: Some(generate_request::Prompt::TokenIds(TokenIds { ids })), parameters: Some(params), session_id: String::new() }
}

/// Tokens and finish reason of a whole stream.
pub async fn collect(mut s: tonic::Streaming<GenerateResponse>) -> Result<(String, Vec<u32>, Finished), tonic::Status> {
    let mut tokens = vec![];
    while let Some(m) = s.message().await? {
        match m.event {
            Some(generate_response::Event::Tokens(c)) => {
                assert_eq!(c.offset as usize, tokens.len(), "chunks are contiguous");
                tokens.extend(c.token_ids);
            }
            Some(generate_response::Event::Finished(f)) => return Ok((m.session_id, tokens, f)),
            _ => {}
        }
    }
    panic!("stream ended without `finished`")
}

/// Like `collect`, for a stream whose first chunk starts at `offset`.
pub async fn collect_from(mut s: tonic::Streaming<GenerateResponse>, offset: usize) -> (String, Vec<u32>, Finished) {
    let mut tokens = vec![];
    while let Some(m) = s.message().await.unwrap() {
        match m.event {
            Some(generate_response::Event::Tokens(c)) => {
                assert_eq!(c.offset as usize, offset + tokens.len());
                tokens.extend(c.token_ids);
            }
            Some(generate_response::Event::Finished(f)) => return (m.session_id, tokens, f),
            _ => {}
        }
    }
    panic!("no finished message")
}

/// The tiers as separate processes that a test may kill and restart, with a
/// real redis-server that keeps its data across restarts.
pub struct Cluster {
    pub redis: blockserve_testkit::RedisServer,
    pub prefix: String,
    pub procs: Vec<Proc>,
}

/// One service process: its tier, port, arguments and (while running) child.
pub struct Proc {
    pub tier: &'static str,
    pub port: u16,
    pub metrics_port: u16,
    args: Vec<String>,
    pub child: Option<ChildGuard>,
}

impl Proc {
    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.0.id())
    }

    /// SIGKILL it (no drain, no deregistration).
    pub fn kill(&mut self) {
        self.child = None;
    }

    /// Start it (again) on its port.
    pub fn start(&mut self) {
        self.child = None;
        self.child = Some(spawn(&self.args.iter().map(String::as_str).collect::<Vec<_>>(), &[("RUST_LOG", "error")]));
    }
}

impl Cluster {
    /// `tiers`: (tier, count, extra flags) in start order; every process gets
    /// the model, the store and a metrics port.
    pub async fn start(model: &std::path::Path, tiers: &[(&'static str, usize, &[&str])]) -> Self {
        let redis = blockserve_testkit::RedisServer::persistent();
        let prefix = format!("c{}:", blockserve_testkit::free_port());
        let mut procs = vec![];
        for &(tier, n, extra) in tiers {
            for _ in 0..n {
                let (port, metrics_port) = (blockserve_testkit::free_port(), blockserve_testkit::free_port());
                let mut args: Vec<String> = vec![tier.into(), "--listen".into(), format!("127.0.0.1:{port}"), "--metrics-listen".into()];
                args.extend([format!("127.0.0.1:{metrics_port}"), "--redis-url".into(), redis.url(), "--redis-prefix".into(), prefix.clone()]);
                args.extend(["--model".into(), model.to_str().unwrap().into()]);
                args.extend(extra.iter().map(|s| s.to_string()));
                let mut p = Proc { tier, port, metrics_port, args, child: None };
                p.start();
                procs.push(p);
            }
        }
        for p in &procs {
            blockserve_testkit::wait_for_port(p.port, std::time::Duration::from_secs(60));
        }
        let c = Self { redis, prefix, procs };
        let store = c.store().await;
        let want = |tier: &str| c.procs.iter().filter(|p| p.tier == tier).count();
        let start = std::time::Instant::now();
        use blockserve_store::{SessionStore, Tier};
        while store.instances(Tier::TokenDecoder).await.unwrap().len() < want("token-decoder")
            || store.instances(Tier::BlockDecoder).await.unwrap().len() < want("block-decoder")
        {
            assert!(start.elapsed() < std::time::Duration::from_secs(30), "instances did not register");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        c
    }

    pub async fn store(&self) -> blockserve_store::RedisStore {
        blockserve_store::RedisStore::connect(&self.redis.url(), &self.prefix).await.unwrap()
    }

    /// Indices of the processes of `tier`.
    pub fn of(&self, tier: &str) -> Vec<usize> {
        (0..self.procs.len()).filter(|&i| self.procs[i].tier == tier).collect()
    }

    pub fn routers(&self) -> Vec<String> {
        self.of("router").into_iter().map(|i| self.procs[i].address()).collect()
    }
}

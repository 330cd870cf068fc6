//! The three tiers as separate processes over loopback gRPC, with a real
//! redis-server: one block decoder, two token decoders, two routers.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blockserve_model::{loader::load_model, GenerationRequest, Model, PromptLayout, SamplingParams, StopCriteria};
use blockserve_proto::v1::generation_client::GenerationClient;
use blockserve_proto::v1::*;
use blockserve_store::{RedisStore, SessionStore, Tier};
mod common;

use blockserve_testkit::{free_port, metric_sum, scrape_metrics, wait_for_port, ChildGuard, RedisServer};
use candle_core::{DType, Device};
use common::*;
use tonic::transport::Channel;
use tonic::Code;

struct Stack {
    redis: RedisServer,
    prefix: String,
    routers: Vec<String>,
    /// (tier, port, process) of every service.
    procs: Vec<(&'static str, u16, ChildGuard)>,
    /// (tier, metrics port) of every service, in the order of `procs`.
    metrics: Vec<(&'static str, u16)>,
}

impl Stack {
    /// Start every tier for `model`; `router_extra` goes to both routers.
    async fn start(model: &Path, router_extra: &[&str]) -> Self {
        Self::start_with(model, router_extra, &[], false).await
    }

    /// `start`, with extra environment variables for every process and, when
    /// `metrics`, a metrics port each. (Only the tests that scrape ask for
    /// one: every extra port picked is another chance of two processes
    /// racing for the same one.)
    async fn start_with(model: &Path, router_extra: &[&str], env: &[(&str, &str)], with_metrics: bool) -> Self {
        let redis = RedisServer::start();
        let prefix = format!("t{}:", free_port());
        let url = redis.url();
        let m = model.to_str().unwrap();
        let common = |port: u16| {
            vec![
                "--listen".to_string(),
                format!("127.0.0.1:{port}"),
                "--redis-url".into(),
                url.clone(),
                "--redis-prefix".into(),
                prefix.clone(),
                "--model".into(),
                m.to_string(),
            ]
        };
        let mut procs = vec![];
        let mut routers = vec![];
        let mut metrics = vec![];
        for tier in ["block-decoder", "token-decoder", "token-decoder", "router", "router"] {
            let port = free_port();
            let mut a = vec![tier.to_string()];
            a.extend(common(port));
            if with_metrics {
                let metrics_port = free_port();
                a.extend(["--metrics-listen".to_string(), format!("127.0.0.1:{metrics_port}")]);
                metrics.push((tier, metrics_port));
            }
            if tier == "router" {
                a.extend(router_extra.iter().map(|s| s.to_string()));
                routers.push(format!("http://127.0.0.1:{port}"));
            }
            procs.push((tier, port, spawn(&a.iter().map(String::as_str).collect::<Vec<_>>(), env)));
        }
        for (_, port, _) in &procs {
            wait_for_port(*port, Duration::from_secs(60));
        }
        let stack = Stack { redis, prefix, routers, procs, metrics };
        let store = stack.store().await;
        let start = Instant::now();
        while store.instances(Tier::TokenDecoder).await.unwrap().len() < 2 || store.instances(Tier::BlockDecoder).await.unwrap().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(30), "instances did not register");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stack
    }

    async fn store(&self) -> RedisStore {
        RedisStore::connect(&self.redis.url(), &self.prefix).await.unwrap()
    }

    async fn client(&self, i: usize) -> GenerationClient<Channel> {
        GenerationClient::connect(self.routers[i].clone()).await.unwrap()
    }
}

/// 20 sessions at once, greedy and seeded, against the in-process engine;
/// prompts of every length modulo L, the last ten in the aligned layout.
async fn matches_engine(model: &Path) {
    let stack = Stack::start(model, &[]).await;
    let engine = load_model(model, None, DType::F32, &Device::Cpu).unwrap();
    let Model::Block(ref bt) = engine else { panic!() };
    let vocab = bt.config.vocab_size as u32;
    let mut cases = vec![];
    for i in 0..20u32 {
        let prompt: Vec<u32> = (0..(3 + i * 3)).map(|j| 1 + (i * 31 + j * 17) % (vocab - 1)).collect();
        let sampled = i % 2 == 1;
        let layout = if i >= 10 { PromptLayout::Aligned } else { PromptLayout::Reference };
        let params = GenerationParameters {
            max_new_tokens: Some(5 + i),
            temperature: Some(if sampled { 0.8 } else { 0.0 }),
            top_k: Some(if sampled { 40 } else { 0 }),
            top_p: Some(if sampled { 0.95 } else { 1.0 }),
            // Every third session also penalises repeats (history-dependent sampling).
            repetition_penalty: Some(if i % 3 == 0 { 1.3 } else { 1.0 }),
            seed: Some(100 + i as u64),
            prompt_layout: if i >= 10 { 2 } else { 0 },
            ..Default::default()
        };
        let want = engine
            .generate(
                &[GenerationRequest {
                    prompt: prompt.clone(),
                    sampling: SamplingParams {
                        temperature: params.temperature.unwrap(),
                        top_k: params.top_k.unwrap() as usize,
                        top_p: params.top_p.unwrap(),
                        repetition_penalty: params.repetition_penalty.unwrap(),
                        seed: params.seed.unwrap(),
                    },
                    stop: StopCriteria { max_new_tokens: 5 + i as usize, eos_token_id: bt.config.eos_token_id, stop_token_ids: vec![] },
                    layout,
                }],
                false,
            )
            .unwrap()
            .remove(0);
        cases.push((prompt, params, want, layout));
    }
    // The penalty must matter somewhere, or the history path goes untested.
    let penalised_differs = cases.iter().filter(|c| c.1.repetition_penalty != Some(1.0)).any(|(prompt, params, want, layout)| {
        let plain = GenerationRequest {
            prompt: prompt.clone(),
            sampling: SamplingParams {
                temperature: params.temperature.unwrap(),
                top_k: params.top_k.unwrap() as usize,
                top_p: params.top_p.unwrap(),
                repetition_penalty: 1.0,
                seed: params.seed.unwrap(),
            },
            stop: StopCriteria { max_new_tokens: params.max_new_tokens.unwrap() as usize, eos_token_id: bt.config.eos_token_id, stop_token_ids: vec![] },
            layout: *layout,
        };
        engine.generate(&[plain], false).unwrap()[0].tokens != want.tokens
    });
    assert!(penalised_differs, "repetition penalty changed no output");
    let mut handles = vec![];
    for (i, (prompt, params, ..)) in cases.iter().enumerate() {
        let mut c = stack.client(i % 2).await;
        let req = ids_request(prompt.clone(), params.clone());
        handles.push(tokio::spawn(async move { collect(c.generate(req).await?.into_inner()).await }));
    }
    let store = stack.store().await;
    let (l, d) = (bt.block_length(), bt.config.block_decoder.hidden_size);
    let (mut wire, mut generated) = (0u64, 0u64);
    for (h, (prompt, _, want, layout)) in handles.into_iter().zip(&cases) {
        let (id, tokens, finished) = h.await.unwrap().unwrap();
        assert_eq!(tokens, want.tokens);
        let want_reason = match want.finish_reason {
            blockserve_model::FinishReason::Eos => FinishReason::Eos,
            blockserve_model::FinishReason::Length => FinishReason::Length,
            blockserve_model::FinishReason::StopToken => FinishReason::Stop,
        };
        assert_eq!(finished.reason, want_reason as i32);
        assert_eq!(finished.usage.unwrap().generated_tokens as usize, tokens.len());
        let rec = store.session(&id).await.unwrap().unwrap();
        assert_eq!(rec.state, blockserve_store::SessionState::Finished);
        assert_eq!(store.tokens(&id, 0).await.unwrap(), tokens);
        // Only the prompt, block ids and context embeddings cross between the tiers:
        // the byte count equals those messages' sizes, rebuilt here.
        let usage = finished.usage.unwrap();
        assert_eq!(usage.internal_wire_bytes, expected_wire_bytes(prompt, &tokens, l, d, *layout));
        wire += usage.internal_wire_bytes;
        generated += tokens.len() as u64;
    }
    eprintln!("{}: {wire} bytes between tiers for {generated} generated tokens = {:.1} bytes/token", model.display(), wire as f64 / generated as f64);
}

/// Payload bytes of one session on the link: the prompt's blocks up, every
/// decoded block but the last up (the session ends with it), 4 bytes per id,
/// and one f32 context per decoded block down. In the aligned layout the
/// prompt's partial block is not sent alone: it starts the first decoded block.
fn expected_wire_bytes(prompt: &[u32], tokens: &[u32], l: usize, d: usize, layout: PromptLayout) -> u64 {
    let (blocks, forced) = match layout {
        PromptLayout::Aligned if prompt.len() >= l => (prompt.len() / l, prompt.len() % l),
        _ => (prompt.len().div_ceil(l), 0),
    };
    let decoded = (forced + tokens.len()).div_ceil(l);
    (4 * blocks * l + decoded * 4 * d + decoded.saturating_sub(1) * 4 * l) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stack_matches_engine_on_fixture_model() {
    matches_engine(&fixture_model()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stack_matches_engine_on_bundled_model() {
    matches_engine(&demo_model()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_from_another_router_and_text_streaming() {
    let stack = Stack::start(&demo_model(), &[]).await;
    let mut r0 = stack.client(0).await;
    let mut r1 = stack.client(1).await;
    let params = GenerationParameters { max_new_tokens: Some(60), ignore_eos: true, ..Default::default() };
    let req =
        GenerateRequest { prompt: Some(generate_request::Prompt::Text("def fibonacci(n):".into())), parameters: Some(params), session_id: "resume-1".into() };
    let mut s = r0.generate(req.clone()).await.unwrap().into_inner();
    // Read until at least one chunk has arrived, then resume elsewhere from 5.
    let mut first = vec![];
    while first.len() < 8 {
        if let Some(generate_response::Event::Tokens(c)) = s.message().await.unwrap().unwrap().event {
            first.extend(c.token_ids);
        }
    }
    let resumed = r1.resume(ResumeRequest { session_id: "resume-1".into(), offset: 5 }).await.unwrap().into_inner();
    let (_, rest, fin) = collect_from(resumed, 5).await;
    let (_, all, _) = collect(r1.resume(ResumeRequest { session_id: "resume-1".into(), offset: 0 }).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(all.len(), 60);
    assert_eq!(rest, all[5..].to_vec());
    assert_eq!(&all[..first.len()], &first[..]);
    assert_eq!(fin.reason, FinishReason::Length as i32);
    // The same session id again attaches instead of starting another.
    let again = r1.generate(req).await.unwrap().into_inner();
    let (id, tokens, _) = collect(again).await.unwrap();
    assert_eq!((id.as_str(), tokens), ("resume-1", all.clone()));
    // GetSession from either router.
    let info = r0.get_session(GetSessionRequest { session_id: "resume-1".into() }).await.unwrap().into_inner();
    assert_eq!(info.token_ids, all);
    assert_eq!(info.state, SessionState::Finished as i32);
    assert_eq!(info.prompt_ids.len(), "def fibonacci(n):".len());
}

fn assert_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, msg: &str) {
    let e = r.expect_err("the call must fail");
    assert_eq!(e.code(), code, "{}", e.message());
    assert!(e.message().contains(msg), "message {:?} lacks {msg:?}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_status_and_message() {
    let stack = Stack::start(&fixture_model(), &["--max-new-tokens", "256"]).await;
    let mut c = stack.client(0).await;
    let p = GenerationParameters::default;
    assert_status(c.generate(ids_request(vec![], p())).await, Code::InvalidArgument, "prompt must not be empty");
    assert_status(c.generate(ids_request(vec![1; 8188], p())).await, Code::InvalidArgument, "prompt has 8188 tokens; the model's context allows at most 8187");
    assert_status(
        c.generate(ids_request(vec![1; 8000], GenerationParameters { max_new_tokens: Some(200), ..p() })).await,
        Code::InvalidArgument,
        "prompt (8000 tokens) + max_new_tokens (200) exceeds the model's context of 8188 tokens",
    );
    assert_status(
        c.generate(ids_request(vec![1], GenerationParameters { max_new_tokens: Some(300), ..p() })).await,
        Code::InvalidArgument,
        "max_new_tokens 300 exceeds the limit of 256",
    );
    assert_status(
        c.generate(ids_request(vec![1], GenerationParameters { temperature: Some(-0.5), ..p() })).await,
        Code::InvalidArgument,
        "temperature must be finite and >= 0, got -0.5",
    );
    for top_p in [0.0, 1.5] {
        assert_status(
            c.generate(ids_request(vec![1], GenerationParameters { top_p: Some(top_p), ..p() })).await,
            Code::InvalidArgument,
            "top_p must be in (0, 1]",
        );
    }
    assert_status(c.generate(ids_request(vec![1, 512], p())).await, Code::InvalidArgument, "prompt.token_ids: token id 512 is out of range (vocab size 512)");
    let text = GenerateRequest { prompt: Some(generate_request::Prompt::Text("hi".into())), ..Default::default() };
    assert_status(c.generate(text).await, Code::InvalidArgument, "prompt.text needs a tokenizer.json");
    let bad_id = GenerateRequest { session_id: "a b".into(), ..ids_request(vec![1], p()) };
    assert_status(c.generate(bad_id).await, Code::InvalidArgument, "session_id must be 1..128 characters");
    for r in [
        c.resume(ResumeRequest { session_id: "nope".into(), offset: 0 }).await.map(|_| ()),
        c.cancel(CancelRequest { session_id: "nope".into() }).await.map(|_| ()),
        c.get_session(GetSessionRequest { session_id: "nope".into() }).await.map(|_| ()),
    ] {
        assert_status(r, Code::NotFound, "session \"nope\" not found");
    }
    // No live instance: a router on a prefix where nothing registered.
    let port = free_port();
    let m = fixture_model();
    let _lonely = spawn(
        &["router", "--listen", &format!("127.0.0.1:{port}"), "--redis-url", &stack.redis.url(), "--redis-prefix", "empty:", "--model", m.to_str().unwrap()],
        &[],
    );
    wait_for_port(port, Duration::from_secs(30));
    let mut lonely = GenerationClient::connect(format!("http://127.0.0.1:{port}")).await.unwrap();
    assert_status(lonely.generate(ids_request(vec![1], p())).await, Code::Unavailable, "no live token decoder instance is registered");
    // Over capacity: every registered token decoder reports no free capacity.
    let full = RedisStore::connect(&stack.redis.url(), "empty:").await.unwrap();
    let inst = blockserve_store::InstanceInfo {
        id: "full".into(),
        tier: Tier::TokenDecoder,
        address: "http://127.0.0.1:1".into(),
        active_sessions: 8,
        queued: 0,
        free_capacity: 0,
        updated_at_ms: 0,
        cache_limit_pages: 0,
    };
    full.register(&inst, Duration::from_secs(60)).await.unwrap();
    assert_status(lonely.generate(ids_request(vec![1], p())).await, Code::ResourceExhausted, "every token decoder is at capacity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_and_disconnected_sessions_are_freed_everywhere() {
    // Sessions long enough (8000 tokens, near the model's 2048 blocks) to be
    // running on every tier when they are cancelled.
    let stack = Stack::start(&fixture_model(), &["--max-new-tokens", "8000"]).await;
    let store = stack.store().await;
    let mut streams = vec![];
    for i in 0..50u32 {
        let mut c = stack.client((i % 2) as usize).await;
        let req = GenerateRequest {
            session_id: format!("c{i}"),
            ..ids_request(vec![1 + i, 2, 3], GenerationParameters { max_new_tokens: Some(8000), ignore_eos: true, ..Default::default() })
        };
        let mut s = c.generate(req).await.unwrap().into_inner();
        // Wait for the first tokens: the session is running on every tier.
        loop {
            if let Some(generate_response::Event::Tokens(_)) = s.message().await.unwrap().unwrap().event {
                break;
            }
        }
        streams.push((c, s));
    }
    // Half cancelled through the API (via the other router), half by disconnecting.
    let mut other = stack.client(1).await;
    for (i, (c, s)) in streams.into_iter().enumerate() {
        if i % 2 == 0 {
            let st = other.cancel(CancelRequest { session_id: format!("c{i}") }).await.unwrap().into_inner().state;
            assert_eq!(st, SessionState::Cancelled as i32);
        }
        drop((c, s));
    }
    let start = Instant::now();
    loop {
        let mut busy = 0;
        for tier in [Tier::TokenDecoder, Tier::BlockDecoder] {
            busy += store.instances(tier).await.unwrap().iter().map(|i| i.active_sessions).sum::<u32>();
        }
        let mut states = vec![];
        for i in 0..50 {
            states.push(store.session(&format!("c{i}")).await.unwrap().unwrap().state);
        }
        if busy == 0 && states.iter().all(|s| *s == blockserve_store::SessionState::Cancelled) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "still busy {busy}, states {states:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_sessions_and_deregisters() {
    let mut stack = Stack::start(&fixture_model(), &["--max-new-tokens", "4096"]).await;
    let store = stack.store().await;
    let mut c = stack.client(0).await;
    let req = GenerateRequest {
        session_id: "drain".into(),
        ..ids_request(vec![5, 6, 7], GenerationParameters { max_new_tokens: Some(2000), ignore_eos: true, ..Default::default() })
    };
    let mut s = c.generate(req).await.unwrap().into_inner();
    let seen = loop {
        if let Some(generate_response::Event::Tokens(t)) = s.message().await.unwrap().unwrap().event {
            break t.token_ids.len();
        }
    };
    // SIGTERM the token decoder that runs the session.
    let serving = store.session("drain").await.unwrap().unwrap().assignment.token_decoder;
    let i = stack.procs.iter().position(|(t, p, _)| *t == "token-decoder" && serving.ends_with(&format!(":{p}"))).unwrap();
    let pid = stack.procs[i].2 .0.id();
    let before = store.session("drain").await.unwrap().unwrap();
    assert!(!before.state.is_final() && before.generated < 1000, "the session must still be running when SIGTERM arrives");
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    // It leaves the registry at once, while the session runs to its end.
    let start = Instant::now();
    while store.instances(Tier::TokenDecoder).await.unwrap().len() != 1 {
        assert!(start.elapsed() < Duration::from_secs(10), "did not deregister");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, rest, fin) = collect_from(s, seen).await;
    assert_eq!(fin.reason, FinishReason::Length as i32);
    assert_eq!(fin.usage.unwrap().generated_tokens, 2000);
    assert!(!rest.is_empty());
    // Then the process exits by itself, successfully.
    let start = Instant::now();
    loop {
        if let Some(st) = stack.procs[i].2 .0.try_wait().unwrap() {
            assert!(st.success(), "exit status {st}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "token decoder still running after its sessions ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // New sessions go to the remaining token decoder.
    let (id, tokens, _) =
        collect(c.generate(ids_request(vec![1, 2], GenerationParameters { max_new_tokens: Some(4), ..Default::default() })).await.unwrap().into_inner())
            .await
            .unwrap();
    assert_eq!(tokens.len(), 4);
    assert_ne!(store.session(&id).await.unwrap().unwrap().assignment.token_decoder, serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{server_reflection_request::MessageRequest, server_reflection_response::MessageResponse, ServerReflectionRequest};
    let stack = Stack::start(&fixture_model(), &[]).await;
    let expected = [("block-decoder", "blockserve.v1.BlockDecoder"), ("token-decoder", "blockserve.v1.TokenDecoder"), ("router", "blockserve.v1.Generation")];
    for (tier, service) in expected {
        let port = stack.procs.iter().find(|(t, _, _)| *t == tier).unwrap().1;
        let addr = format!("http://127.0.0.1:{port}");
        let channel = Channel::from_shared(addr).unwrap().connect().await.unwrap();
        let mut health = HealthClient::new(channel.clone());
        let st = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(st, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{tier}");
        let mut refl = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
        let mut resp = refl.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message().await.unwrap().unwrap().message_response else {
            panic!("{tier}: no service list")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(names.contains(&service.to_string()) && names.contains(&"grpc.health.v1.Health".to_string()), "{tier}: {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn score_matches_reference_logits_and_model_info_reports_limits() {
    let stack = Stack::start(&fixture_model(), &[]).await;
    let mut c = stack.client(1).await;
    let g = candle_core::safetensors::load(fixture_model().join("golden.safetensors"), &Device::Cpu).unwrap();
    // Row 0 of the reference forward: 6 blocks; blocks 1..5 are predicted.
    let row: Vec<u32> = g["forward.input_ids"].get(0).unwrap().flatten_all().unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect();
    let req = ScoreRequest { input: Some(score_request::Input::TokenIds(TokenIds { ids: row.clone() })) };
    let s = c.score(req).await.unwrap().into_inner();
    assert_eq!(s.token_ids, row);
    assert_eq!(s.first_scored, 4);
    let logits = g["forward.logits"].get(0).unwrap().reshape((20, 512)).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, 1).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(s.logprobs.len(), 20);
    for (i, (&lp, &tok)) in s.logprobs.iter().zip(&row[4..]).enumerate() {
        let want = logp[i][tok as usize];
        assert!((lp - want).abs() < 1e-4, "token {i}: {lp} vs {want}");
    }
    let mean: f64 = s.logprobs.iter().map(|&x| x as f64).sum::<f64>() / 20.0;
    assert!((s.perplexity - (-mean).exp()).abs() < 1e-9);
    // A prompt that is not a whole number of blocks is left-padded like a prompt.
    let req = ScoreRequest { input: Some(score_request::Input::TokenIds(TokenIds { ids: row[1..].to_vec() })) };
    let s = c.score(req).await.unwrap().into_inner();
    assert_eq!((s.first_scored, s.logprobs.len()), (3, 20));

    let info = c.model_info(ModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (info.model_type.as_str(), info.vocab_size, info.block_length, info.max_total_tokens, info.max_new_tokens, info.eos_token_id, info.has_tokenizer),
        ("block_transformer", 512, 4, 8188, 1024, Some(0), false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn text_stop_sequences_cut_the_text() {
    let stack = Stack::start(&demo_model(), &[]).await;
    let mut c = stack.client(0).await;
    let text_req = |stop: Vec<String>| GenerateRequest {
        prompt: Some(generate_request::Prompt::Text("def fibonacci(n):".into())),
        parameters: Some(GenerationParameters { max_new_tokens: Some(64), ignore_eos: true, stop, ..Default::default() }),
        session_id: String::new(),
    };
    let full = c.generate_unary(text_req(vec![])).await.unwrap().into_inner();
    // The first two ASCII letters in a row in the (random-model) output make the stop.
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    let at = chars
        .windows(2)
        .position(|w| w[0].0 > 0 && w[0].1.is_ascii_alphabetic() && w[1].1.is_ascii_alphabetic())
        .expect("the demo output has two letters in a row");
    let (start, _) = chars[at];
    let stop: String = full.text[start..].chars().take(2).collect();
    let first = full.text.find(&stop).unwrap();
    let cut = c.generate_unary(text_req(vec![stop.clone()])).await.unwrap().into_inner();
    assert_eq!(cut.text, full.text[..first], "text ends right before {stop:?}");
    assert_eq!(cut.finished.unwrap().reason, FinishReason::Stop as i32);
    // Token ids run through the end of the block that completed the stop sequence.
    assert!(cut.token_ids.len() % 4 == 0 && cut.token_ids.len() < full.token_ids.len());
    assert_eq!(cut.token_ids[..], full.token_ids[..cut.token_ids.len()]);
}

/// The block decoder's link, driven directly: every bad open, block or close
/// gets an error naming its session key, the field and the limit; good
/// sessions on the same link go on, and their contexts equal the unary
/// `Contexts` path's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_decoder_link_checks_every_message() {
    use blockserve_proto::v1::block_decoder_client::BlockDecoderClient;

    let port = free_port();
    let model = fixture_model();
    let _bd = spawn(&["block-decoder", "--listen", &format!("127.0.0.1:{port}"), "--model", model.to_str().unwrap()], &[]);
    wait_for_port(port, Duration::from_secs(60));
    let mut client = BlockDecoderClient::connect(format!("http://127.0.0.1:{port}")).await.unwrap();
    let (up, rx) = tokio::sync::mpsc::unbounded_channel::<LinkUp>();
    let mut down = client.link(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).await.unwrap().into_inner();
    let open = |key: u64, ids: Vec<u32>| OpenBlocks { key, session_id: format!("s{key}"), prompt_ids: ids, max_new_blocks: 4, traceparent: String::new() };
    let blocks = |keys: Vec<u64>, indices: Vec<u32>, token_ids: Vec<u32>| Some(BlockBatch { keys, indices, token_ids });
    let errors = |m: LinkDown| m.errors.into_iter().map(|e| (e.key, Code::from_i32(e.code), e.message)).collect::<Vec<_>>();
    let invalid = Code::InvalidArgument;
    // Contexts of the same ids through the unary path: the expected rows.
    let prompt: Vec<u32> = vec![5, 6, 7, 8, 9, 10, 11, 12];
    let want = client.contexts(ContextsRequest { token_ids: [prompt.clone(), vec![1, 2, 3, 4]].concat() }).await.unwrap().into_inner().contexts.unwrap();
    let row = |e: &Embeddings, i: usize| -> Vec<f32> {
        let n = e.dim as usize * 4;
        e.data[i * n..(i + 1) * n].chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let close_to = |a: Vec<f32>, b: Vec<f32>| assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4), "{a:?} vs {b:?}");

    up.send(LinkUp {
        opens: vec![open(1, prompt.clone()), open(2, vec![1, 2, 3]), open(3, vec![1, 2, 3, 99999])],
        blocks: blocks(vec![9], vec![0], vec![1, 2, 3, 4]),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        errors(down.message().await.unwrap().unwrap()),
        vec![
            (2, invalid, "opens.prompt_ids: 3 ids is not a positive whole number of 4-token blocks".to_string()),
            (3, invalid, "opens.prompt_ids: token id 99999 is out of range (vocab size 512)".to_string()),
            (9, Code::NotFound, "blocks.keys: session key 9 is not open on this link".to_string()),
        ]
    );
    let m = down.message().await.unwrap().unwrap();
    assert_eq!((m.keys.clone(), m.block_indices.clone(), m.contexts.as_ref().unwrap().rows), (vec![1], vec![1], 1));
    close_to(row(m.contexts.as_ref().unwrap(), 0), row(&want, 1));

    // The next block of session 1, then its context; then a wrong index ends it.
    up.send(LinkUp { blocks: blocks(vec![1], vec![2], vec![1, 2, 3, 4]), ..Default::default() }).unwrap();
    let m = down.message().await.unwrap().unwrap();
    assert_eq!((m.keys.clone(), m.block_indices.clone()), (vec![1], vec![2]));
    close_to(row(m.contexts.as_ref().unwrap(), 0), row(&want, 2));
    up.send(LinkUp { blocks: blocks(vec![1], vec![5], vec![1, 2, 3, 4]), ..Default::default() }).unwrap();
    assert_eq!(errors(down.message().await.unwrap().unwrap()), vec![(1, invalid, "blocks.indices: block index is 5, expected 3".to_string())]);
    up.send(LinkUp { blocks: blocks(vec![1], vec![3], vec![1, 2, 3, 4]), ..Default::default() }).unwrap();
    assert_eq!(errors(down.message().await.unwrap().unwrap()), vec![(1, Code::NotFound, "blocks.keys: session key 1 is not open on this link".to_string())]);

    // A key may be opened again once closed; a batch whose shape is wrong fails
    // each of its sessions; a second open of a key ends that session.
    up.send(LinkUp { opens: vec![open(1, vec![1, 2, 3, 4])], ..Default::default() }).unwrap();
    assert_eq!(down.message().await.unwrap().unwrap().keys, vec![1]);
    up.send(LinkUp { blocks: blocks(vec![1], vec![1, 2], vec![1, 2, 3, 4]), ..Default::default() }).unwrap();
    let shape = "blocks: 1 keys need as many indices and 4 token_ids (4 per block); got 2 and 4".to_string();
    assert_eq!(errors(down.message().await.unwrap().unwrap()), vec![(1, invalid, shape)]);
    up.send(LinkUp { opens: vec![open(4, vec![1, 2, 3, 4]), open(4, vec![1, 2, 3, 4])], ..Default::default() }).unwrap();
    assert_eq!(errors(down.message().await.unwrap().unwrap()), vec![(4, Code::AlreadyExists, "opens.key 4 is already open on this link".to_string())]);
    up.send(LinkUp { opens: vec![open(5, vec![1, 2, 3, 4])], closes: vec![5], ..Default::default() }).unwrap();
    up.send(LinkUp { blocks: blocks(vec![5, 4], vec![1, 1], vec![1, 2, 3, 4, 1, 2, 3, 4]), ..Default::default() }).unwrap();
    let e = errors(down.message().await.unwrap().unwrap());
    assert_eq!(e.iter().map(|(k, c, _)| (*k, *c)).collect::<Vec<_>>(), vec![(5, Code::NotFound), (4, Code::NotFound)]);
    // Ending the link frees what it left open: the stream closes cleanly.
    drop(up);
    assert!(down.message().await.unwrap().is_none());
}

/// When the block decoder dies, its sessions wait for one to come back (here
/// the same one, restarted on its address), are prefilled there again from
/// prompt + output, and go on: the client sees the same tokens as a run
/// without the fault, and the store counts one migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_block_decoder_s_sessions_move_to_a_new_one_without_losing_a_token() {
    let mut stack = Stack::start(&fixture_model(), &["--max-new-tokens", "8000"]).await;
    let store = stack.store().await;
    let mut c = stack.client(0).await;
    let long = GenerationParameters { max_new_tokens: Some(3000), ignore_eos: true, ..Default::default() };
    let mut s = c.generate(GenerateRequest { session_id: "orphan".into(), ..ids_request(vec![5, 6, 7], long.clone()) }).await.unwrap().into_inner();
    let mut tokens = vec![];
    while tokens.is_empty() {
        if let Some(generate_response::Event::Tokens(t)) = s.message().await.unwrap().unwrap().event {
            tokens.extend(t.token_ids);
        }
    }
    let i = stack.procs.iter().position(|(t, _, _)| *t == "block-decoder").unwrap();
    let port = stack.procs[i].1;
    stack.procs[i].2 .0.kill().unwrap();
    stack.procs[i].2 .0.wait().unwrap();
    // The same block decoder again, on the same address.
    let url = stack.redis.url();
    let (listen, model) = (format!("127.0.0.1:{port}"), fixture_model());
    let args = ["block-decoder", "--listen", &listen, "--redis-url", &url, "--redis-prefix", &stack.prefix, "--model", model.to_str().unwrap()];
    stack.procs[i].2 = spawn(&args, &[]);
    let (_, rest, fin) = collect_from(s, tokens.len()).await;
    tokens.extend(rest);
    assert_eq!((fin.reason, tokens.len()), (FinishReason::Length as i32, 3000), "{}", fin.error);
    let rec = store.session("orphan").await.unwrap().unwrap();
    assert_eq!((rec.state, rec.migrations), (blockserve_store::SessionState::Finished, 1));
    // The same request without a fault gives the same tokens.
    let (_, again, _) = collect(c.generate(ids_request(vec![5, 6, 7], long)).await.unwrap().into_inner()).await.unwrap();
    assert_eq!(tokens, again);
}

/// Every tier's `/metrics` against what the clients saw: requests by method
/// and code, tokens, time-to-first-token and inter-token samples, Redis round
/// trips, sessions back to zero, and the context bytes the block decoder sent
/// equal to those the token decoders received.
#[tokio::test(flavor = "multi_thread")]
async fn metrics_of_every_tier_agree_with_what_clients_saw() {
    let stack = Stack::start_with(&demo_model(), &[], &[], true).await;
    let mut client = stack.client(0).await;
    let (mut tokens, mut later_tokens) = (0usize, 0usize);
    for i in 0..6u32 {
        let params = GenerationParameters { max_new_tokens: Some(9 + i), ignore_eos: true, ..Default::default() };
        let mut s = client.generate(ids_request(vec![1 + i, 2, 3, 4, 5], params)).await.unwrap().into_inner();
        let mut chunks = 0;
        while let Some(m) = s.message().await.unwrap() {
            if let Some(generate_response::Event::Tokens(c)) = m.event {
                tokens += c.token_ids.len();
                if chunks > 0 {
                    later_tokens += c.token_ids.len();
                }
                chunks += 1;
            }
        }
    }
    assert_eq!(tokens, (9..15).sum::<usize>());
    let bad = client.generate(ids_request(vec![], GenerationParameters::default())).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    let text = |tier: &str| {
        let ports: Vec<u16> = stack.metrics.iter().filter(|(t, _)| *t == tier).map(|(_, p)| *p).collect();
        async move {
            let mut all = String::new();
            for p in ports {
                all += &scrape_metrics(p);
            }
            all
        }
    };
    // Sessions end on every tier shortly after their last chunk.
    let start = Instant::now();
    loop {
        let (r, t) = (text("router").await, text("token-decoder").await);
        if metric_sum(&r, "blockserve_active_sessions", &[]) == 0.0 && metric_sum(&t, "blockserve_active_sessions", &[]) == 0.0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "sessions still active:\n{r}\n{t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (router, td, bd) = (text("router").await, text("token-decoder").await, text("block-decoder").await);
    let ok = [("tier", "router"), ("method", "Generate"), ("code", "OK")];
    assert_eq!(metric_sum(&router, "blockserve_requests_total", &ok), 6.0);
    assert_eq!(metric_sum(&router, "blockserve_requests_total", &[("method", "Generate"), ("code", "INVALID_ARGUMENT")]), 1.0);
    assert_eq!(metric_sum(&router, "blockserve_generated_tokens_total", &[("tier", "router")]), tokens as f64);
    assert_eq!(metric_sum(&router, "blockserve_time_to_first_token_seconds_count", &[]), 6.0);
    assert_eq!(metric_sum(&router, "blockserve_inter_token_latency_seconds_count", &[]), later_tokens as f64);
    // One Redis round trip creates each session (the bad request never got there).
    assert_eq!(metric_sum(&router, "blockserve_store_round_trip_seconds_count", &[("op", "create_session"), ("outcome", "ok")]), 6.0);
    assert!(metric_sum(&td, "blockserve_store_round_trip_seconds_count", &[("op", "append_many")]) >= 1.0, "{td}");
    // The router's sessions share one relay stream per token decoder: the six
    // sessions alternate over the two, so two streams in all.
    assert_eq!(metric_sum(&td, "blockserve_requests_total", &[("method", "Relay"), ("code", "OK")]), 2.0);
    assert_eq!(metric_sum(&td, "blockserve_generated_tokens_total", &[("tier", "token_decoder")]), tokens as f64);
    assert!(metric_sum(&td, "blockserve_engine_iterations_total", &[("tier", "token_decoder")]) >= 1.0, "{td}");
    assert!(metric_sum(&bd, "blockserve_engine_iterations_total", &[("tier", "block_decoder")]) >= 1.0, "{bd}");
    assert!(metric_sum(&bd, "blockserve_kv_cache_pages", &[("state", "free")]) > 0.0, "{bd}");
    let sent = metric_sum(&bd, "blockserve_context_embedding_bytes_total", &[("direction", "sent")]);
    assert!(sent > 0.0);
    assert_eq!(metric_sum(&td, "blockserve_context_embedding_bytes_total", &[("direction", "received")]), sent);
}

/// SIGTERM to a token decoder under load: 12 sessions run over both token
/// decoders; the one serving the most is stopped while every session is still
/// generating. It leaves the registry, finishes each of its sessions, and
/// exits successfully within its grace period; no session loses a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_loses_no_session_and_exits_within_the_grace_period() {
    const SESSIONS: usize = 12;
    const TOKENS: u32 = 2000;
    let mut stack = Stack::start(&fixture_model(), &["--max-new-tokens", "4096"]).await;
    let store = stack.store().await;
    let mut streams = vec![];
    for i in 0..SESSIONS {
        let mut c = stack.client(i % 2).await;
        let req = GenerateRequest {
            session_id: format!("load-{i}"),
            ..ids_request(vec![5, 6, 7 + i as u32], GenerationParameters { max_new_tokens: Some(TOKENS), ignore_eos: true, ..Default::default() })
        };
        streams.push(c.generate(req).await.unwrap().into_inner());
    }
    // Every session has produced its first chunk.
    let mut seen = vec![];
    for s in &mut streams {
        seen.push(loop {
            if let Some(generate_response::Event::Tokens(t)) = s.message().await.unwrap().unwrap().event {
                break t.token_ids.len();
            }
        });
    }
    let mut by_td: std::collections::HashMap<String, usize> = Default::default();
    for i in 0..SESSIONS {
        *by_td.entry(store.session(&format!("load-{i}")).await.unwrap().unwrap().assignment.token_decoder).or_default() += 1;
    }
    let (serving, n) = by_td.into_iter().max_by_key(|(_, n)| *n).unwrap();
    let i = stack.procs.iter().position(|(t, p, _)| *t == "token-decoder" && serving.ends_with(&format!(":{p}"))).unwrap();
    let pid = stack.procs[i].2 .0.id();
    let sigterm = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let unfinished = unfinished_sessions(&store, SESSIONS).await;
    assert!(unfinished >= n, "{unfinished} sessions running at SIGTERM, {n} of them on the stopped token decoder");
    // Every session, on either token decoder, runs to its end with all its tokens.
    for (k, s) in streams.into_iter().enumerate() {
        let (_, rest, fin) = collect_from(s, seen[k]).await;
        assert_eq!(fin.reason, FinishReason::Length as i32, "session {k}: {}", fin.error);
        assert_eq!(seen[k] + rest.len(), TOKENS as usize, "session {k}");
        let rec = store.session(&format!("load-{k}")).await.unwrap().unwrap();
        assert_eq!(rec.generated, TOKENS as usize, "session {k} in the store");
    }
    // The stopped instance exits by itself, successfully, within its grace
    // period (the default, 30 s).
    loop {
        if let Some(st) = stack.procs[i].2 .0.try_wait().unwrap() {
            assert!(st.success(), "exit status {st}");
            break;
        }
        assert!(sigterm.elapsed() < Duration::from_secs(30), "token decoder still running 30 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(store.instances(Tier::TokenDecoder).await.unwrap().len(), 1);
}

/// Sessions `load-0..n` not yet final.
async fn unfinished_sessions(store: &RedisStore, n: usize) -> usize {
    let mut running = 0;
    for i in 0..n {
        if !store.session(&format!("load-{i}")).await.unwrap().unwrap().state.is_final() {
            running += 1;
        }
    }
    running
}

/// An OTLP/HTTP trace receiver: `POST /v1/traces` bodies, decoded.
async fn otlp_receiver() -> (u16, std::sync::Arc<tokio::sync::Mutex<Vec<opentelemetry_proto::tonic::trace::v1::ResourceSpans>>>) {
    use prost::Message;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = std::sync::Arc::new(tokio::sync::Mutex::new(vec![]));
    let sink = got.clone();
    tokio::spawn(async move {
        loop {
            let (conn, _) = listener.accept().await.unwrap();
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut conn = BufReader::new(conn);
                // Requests on a kept-alive connection, one after another.
                loop {
                    let mut len = None;
                    loop {
                        let mut line = String::new();
                        if conn.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((k, v)) = line.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse::<usize>().ok();
                            }
                        }
                    }
                    let mut body = vec![0; len.expect("the exporter sends a content-length")];
                    conn.read_exact(&mut body).await.unwrap();
                    let req = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(&body[..]).unwrap();
                    sink.lock().await.extend(req.resource_spans);
                    let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    conn.get_mut().write_all(reply.as_bytes()).await.unwrap();
                }
            });
        }
    });
    (port, got)
}

/// One Generate makes one trace: the router's RPC span, the token decoder's
/// RPC span as its child, and the block decoder's span as the token decoder's
/// child, each exported by its own process (service.name) over OTLP; plus a
/// sampled block span and the router's Redis call under their parents.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_generate_is_one_trace_across_the_tiers() {
    let (port, got) = otlp_receiver().await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    let stack = Stack::start_with(&fixture_model(), &[], &env, false).await;
    let mut c = stack.client(0).await;
    let (id, tokens, _) =
        collect(c.generate(ids_request(vec![1, 2, 3], GenerationParameters { max_new_tokens: Some(8), ..Default::default() })).await.unwrap().into_inner())
            .await
            .unwrap();
    assert_eq!(tokens.len(), 8);
    // (service, span name, trace id, span id, parent span id) of every span.
    let start = Instant::now();
    let spans = loop {
        let mut spans = vec![];
        for rs in got.lock().await.iter() {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                for sp in &ss.spans {
                    spans.push((service.clone(), sp.name.clone(), sp.trace_id.clone(), sp.span_id.clone(), sp.parent_span_id.clone()));
                }
            }
        }
        let names: Vec<&str> = spans.iter().map(|s| s.1.as_str()).collect();
        if ["router.Generate", "token_decoder.Run", "block_decoder.open"].iter().all(|n| names.contains(n)) {
            break spans;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "spans so far: {spans:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let find = |name: &str| spans.iter().find(|s| s.1 == name).unwrap_or_else(|| panic!("no {name} in {spans:?}")).clone();
    let (router, td, bd) = (find("router.Generate"), find("token_decoder.Run"), find("block_decoder.open"));
    assert!(router.0.contains("blockserve-router") && td.0.contains("blockserve-token-decoder") && bd.0.contains("blockserve-block-decoder"), "{spans:?}");
    assert_eq!(router.2.len(), 16);
    assert!(router.4.is_empty(), "the router's span is the root: {router:?}");
    assert_eq!((&td.2, &td.4), (&router.2, &router.3), "token decoder under the router");
    assert_eq!((&bd.2, &bd.4), (&td.2, &td.3), "block decoder under the token decoder");
    // Block spans are sampled: 8 tokens in 2 chunks give one, under the session's span.
    let blocks: Vec<_> = spans.iter().filter(|s| s.1 == "token_decoder.block").collect();
    assert_eq!(blocks.len(), 1, "{spans:?}");
    assert_eq!((&blocks[0].2, &blocks[0].4), (&td.2, &td.3));
    // Redis calls are spans too: the router records the session inside its RPC.
    let create = spans.iter().find(|s| s.1 == "redis.create_session" && s.2 == router.2).unwrap_or_else(|| panic!("{spans:?}"));
    assert_eq!(create.4, router.3);
    // Engine iterations are sampled root spans: each tier's first one is traced.
    for (service, name) in [("blockserve-block-decoder", "block_decoder.iteration"), ("blockserve-token-decoder", "token_decoder.iteration")] {
        let start = Instant::now();
        loop {
            let got = got.lock().await;
            let found = got.iter().any(|rs| {
                format!("{:?}", rs.resource).contains(service)
                    && rs.scope_spans.iter().any(|ss| ss.spans.iter().any(|sp| sp.name == name && sp.parent_span_id.is_empty()))
            });
            drop(got);
            if found {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no root span {name} from {service}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(!id.is_empty());
}

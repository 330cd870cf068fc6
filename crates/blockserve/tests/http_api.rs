//! The router's OpenAI-compatible HTTP API, driven by the clients people use
//! with it: the official `openai` Python package and `curl`
//! (`scripts/test-tools.sh` installs them). Everything is checked against the
//! gRPC API on the same server:
//! - completions, whole and streamed, greedy and seeded, give the gRPC API's
//!   tokens and text; `logprobs` equal `Score`'s; chat applies the model's
//!   template; `usage` counts exactly;
//! - every error code the API documents, with its body;
//! - a stream dropped mid-way and resumed with `Last-Event-ID` through the
//!   other router gives the uninterrupted text;
//! - the README's `curl` and `openai` examples, run as written;
//! - a released checkpoint's layout (`results/<name>/checkpoint-570000/
//!   model.safetensors`, the tokenizer kept elsewhere) served with --preset
//!   and --tokenizer.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use blockserve_proto::v1::generation_client::GenerationClient;
use blockserve_proto::v1::*;
use blockserve_testkit::TempDir;
use common::{demo_model, up_http, Cluster};
use serde_json::{json, Value};
use tonic::transport::Channel;

/// A client tool `scripts/test-tools.sh` installed.
fn tool(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run the tests with scripts/test, or eval \"$(scripts/test-tools.sh)\" first"))
}

fn bundled_model() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/code-block")
}

/// The chat template the tests give a model, and what it makes of one user message.
const TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";
fn templated(user: &str) -> String {
    format!("<|user|>\n{user}\n<|assistant|>\n")
}

/// A directory named `name` under `dir` with `model`'s files linked in.
fn linked_model(dir: &Path, model: &Path, name: &str) -> std::path::PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for f in std::fs::read_dir(model).unwrap() {
        let f = f.unwrap().path();
        std::os::unix::fs::symlink(&f, to.join(f.file_name().unwrap())).unwrap();
    }
    to
}

struct Grpc {
    client: GenerationClient<Channel>,
    token: Option<String>,
}

impl Grpc {
    async fn connect(listen: &str, token: Option<&str>) -> Self {
        let channel = Channel::from_shared(format!("http://{listen}")).unwrap().connect().await.unwrap();
        Self { client: GenerationClient::new(channel), token: token.map(String::from) }
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    }

    /// Text and token ids of a text prompt.
    async fn generate(&mut self, text: &str, params: GenerationParameters) -> (String, Vec<u32>, Finished) {
        let req = GenerateRequest { prompt: Some(generate_request::Prompt::Text(text.into())), parameters: Some(params), session_id: String::new() };
        let r = self.client.generate_unary(self.request(req)).await.unwrap().into_inner();
        (r.text, r.token_ids, r.finished.unwrap())
    }

    async fn generate_ids(&mut self, ids: Vec<u32>, params: GenerationParameters) -> (String, Vec<u32>) {
        let r = self.client.generate_unary(self.request(common::ids_request(ids, params))).await.unwrap().into_inner();
        (r.text, r.token_ids)
    }

    async fn score(&mut self, input: score_request::Input) -> ScoreResponse {
        self.client.score(self.request(ScoreRequest { input: Some(input) })).await.unwrap().into_inner()
    }

    async fn session(&mut self, id: &str) -> SessionInfo {
        self.client.get_session(self.request(GetSessionRequest { session_id: id.into() })).await.unwrap().into_inner()
    }
}

fn greedy(max: u32) -> GenerationParameters {
    GenerationParameters { max_new_tokens: Some(max), temperature: Some(0.0), ..Default::default() }
}

fn seeded(max: u32) -> GenerationParameters {
    GenerationParameters { max_new_tokens: Some(max), temperature: Some(0.8), seed: Some(7), ..Default::default() }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The OpenAI error body: (HTTP status, type, param, code), message checked apart.
fn error_of(v: &Value) -> (u64, &str, Option<&str>, Option<&str>) {
    let e = &v["body"]["error"];
    (v["status"].as_u64().unwrap(), e["type"].as_str().unwrap(), e["param"].as_str(), e["code"].as_str())
}

fn message(v: &Value) -> &str {
    v["body"]["error"]["message"].as_str().unwrap()
}

/// `(status, headers, body)` of `curl -si ARGS`.
fn curl(args: &[&str]) -> (u16, String, String) {
    let out = Command::new("curl").args(["-si", "--max-time", "60"]).args(args).output().expect("curl runs");
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer: {text}"));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_lowercase(), body.to_string())
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The `openai` package against one `up` (bundled model plus a chat
/// template, an API token): every answer equals the gRPC API's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_openai_package_gets_what_the_grpc_api_gives() {
    let dir = TempDir::new("http-openai");
    let model = linked_model(&dir, &bundled_model(), "code-block");
    std::fs::write(model.join("chat_template.jinja"), TEMPLATE).unwrap();
    let (listen, http, _up) = up_http(&["--model", model.to_str().unwrap(), "--api-token", "s3cret"]);
    let out = Command::new(tool("BLOCKSERVE_PYTHON"))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/openai_client.py"))
        .args([&format!("http://{http}/v1"), "s3cret", "code-block"])
        .output()
        .unwrap();
    assert!(out.status.success(), "openai_client.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut g = Grpc::connect(&listen, Some("s3cret")).await;

    // Greedy and seeded, whole and streamed: the gRPC API's tokens and text.
    let fib = "def fibonacci(n):";
    let prompt_len = g.score(score_request::Input::Text(fib.into())).await.token_ids.len();
    let (text, tokens, f) = g.generate(fib, greedy(24)).await;
    assert_eq!(tokens.len(), 24);
    for case in ["greedy", "greedy_stream"] {
        assert_eq!(ids(&r[case]["token_ids"]), tokens, "{case}");
        assert_eq!(r[case]["text"], text, "{case}");
        assert_eq!(r[case]["finish_reason"], "length", "{case}");
    }
    assert_eq!(f.reason, FinishReason::Length as i32);
    assert_eq!(r["greedy"]["usage"], usage(prompt_len, 24));
    assert_eq!(r["greedy_stream"]["usage"], usage(prompt_len, 24), "stream_options.include_usage");
    // The session the header names is the one that ran.
    let session = g.session(r["greedy"]["session"].as_str().unwrap()).await;
    assert_eq!(session.token_ids, tokens);

    let (text, tokens, _) = g.generate("import os", seeded(16)).await;
    for case in ["seeded", "seeded_stream"] {
        assert_eq!(ids(&r[case]["token_ids"]), tokens, "{case}");
        assert_eq!(r[case]["text"], text, "{case}");
    }
    assert_eq!(r["seeded_stream"]["usage"], Value::Null, "usage only when asked for");

    let (text, tokens) = g.generate_ids(vec![100, 101, 102, 103, 104], greedy(8)).await;
    assert_eq!((ids(&r["ids_prompt"]["token_ids"]), r["ids_prompt"]["text"].as_str().unwrap()), (tokens, text.as_str()));
    assert_eq!(r["ids_prompt"]["usage"], usage(5, 8));

    // echo: the prompt, then the completion.
    let greedy_text = r["greedy"]["text"].as_str().unwrap();
    assert_eq!(r["echo"]["text"], format!("{fib}{greedy_text}"));
    // stop: cut before the first newline (the whole text has one).
    let cut = greedy_text.split('\n').next().unwrap();
    assert!(greedy_text.contains('\n'), "{greedy_text:?}");
    assert_eq!((r["stop"]["text"].as_str().unwrap(), r["stop"]["finish_reason"].as_str().unwrap()), (cut, "stop"));

    // logprobs: Score's numbers for the generated tokens (None before the
    // first scored token).
    let generated = ids(&r["logprobs"]["token_ids"]);
    let prompt_ids = g.score(score_request::Input::Text(fib.into())).await.token_ids;
    let all: Vec<u32> = prompt_ids.iter().chain(&generated).copied().collect();
    let scored = g.score(score_request::Input::TokenIds(TokenIds { ids: all })).await;
    let want: Vec<Option<f32>> =
        (0..generated.len()).map(|j| (prompt_ids.len() + j).checked_sub(scored.first_scored as usize).map(|i| scored.logprobs[i])).collect();
    let lp = &r["logprobs"]["logprobs"];
    let got: Vec<Option<f32>> = lp["token_logprobs"].as_array().unwrap().iter().map(|v| v.as_f64().map(|x| x as f32)).collect();
    assert_eq!(got, want);
    assert!(want.iter().all(Option::is_some), "a prompt longer than a block: every generated token is scored");
    let strings: Vec<&str> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(strings.len(), generated.len());
    assert_eq!(lp["top_logprobs"][0], json!({ strings[0]: want[0] }));

    // Chat: the template applied, then the same generation.
    let (text, tokens, _) = g.generate(&templated("def add(a, b):"), greedy(12)).await;
    for case in ["chat", "chat_stream", "chat_parts"] {
        assert_eq!((ids(&r[case]["token_ids"]), r[case]["text"].as_str().unwrap()), (tokens.clone(), text.as_str()), "{case}");
    }
    let chat_prompt = g.score(score_request::Input::Text(templated("def add(a, b):"))).await.token_ids.len();
    assert_eq!(r["chat"]["usage"], usage(chat_prompt, 12));

    let m = &r["models"]["data"][0];
    assert_eq!((m["id"].as_str(), m["max_model_len"].as_u64(), m["block_length"].as_u64()), (Some("code-block"), Some(8188), Some(4)));

    // Errors, in OpenAI's body.
    let e = &r["errors"];
    for (case, param) in [("n", "n"), ("best_of", "best_of"), ("suffix", "suffix"), ("presence_penalty", "presence_penalty"), ("logprobs", "logprobs")] {
        assert_eq!(error_of(&e[case]), (400, "invalid_request_error", Some(param), None), "{case}: {}", e[case]);
    }
    assert_eq!(error_of(&e["max_tokens"]), (400, "invalid_request_error", Some("max_tokens"), None), "{}", e["max_tokens"]);
    assert!(message(&e["max_tokens"]).contains("1024"), "names the limit: {}", e["max_tokens"]);
    assert_eq!(error_of(&e["temperature"]), (400, "invalid_request_error", Some("temperature"), None), "{}", e["temperature"]);
    assert_eq!(error_of(&e["unknown_field"]), (400, "invalid_request_error", Some("guided_json"), None));
    assert_eq!(message(&e["unknown_field"]), "guided_json: this server does not support this parameter");
    assert_eq!(error_of(&e["model"]), (404, "invalid_request_error", None, Some("model_not_found")));
    assert_eq!(message(&e["model"]), "the model `gpt-4` does not exist; this server serves `code-block`");
    assert_eq!(error_of(&e["unauthorized"]), (401, "invalid_request_error", None, Some("invalid_api_key")));
    assert_eq!(error_of(&e["deadline"]), (504, "server_error", None, Some("timeout")), "{}", e["deadline"]);
    assert_eq!(error_of(&e["image_part"]), (400, "invalid_request_error", Some("messages"), None));
    assert_eq!(message(&e["image_part"]), "messages[0].content[1]: parts of type \"image_url\" are not supported; this model reads text only");

    // The aligned prompt layout, asked for by name: the gRPC API's tokens
    // (and not the reference layout's); a name it does not know is a 400.
    let prompt: Vec<u32> = (100..110).collect();
    let aligned = GenerationParameters { prompt_layout: PromptLayout::Aligned as i32, ..greedy(8) };
    let (_, want) = g.generate_ids(prompt.clone(), aligned).await;
    let (_, reference) = g.generate_ids(prompt.clone(), greedy(8)).await;
    assert_ne!(want, reference, "the layout changes this output");
    let completion = |layout: &str| {
        let body = json!({ "prompt": prompt, "max_tokens": 8, "temperature": 0, "prompt_layout": layout }).to_string();
        curl(&[&format!("http://{http}/v1/completions"), "-H", "authorization: Bearer s3cret", "-H", "content-type: application/json", "-d", &body])
    };
    let (status, _, body) = completion("aligned");
    assert_eq!((status, ids(&serde_json::from_str::<Value>(&body).unwrap()["choices"][0]["token_ids"])), (200, want), "{body}");
    let (status, _, body) = completion("left");
    let e = &serde_json::from_str::<Value>(&body).unwrap()["error"];
    assert_eq!((status, e["type"].as_str(), e["param"].as_str()), (400, Some("invalid_request_error"), Some("prompt_layout")), "{body}");
    assert_eq!(e["message"], "prompt_layout must be \"reference\" or \"aligned\", got \"left\"");

    // curl: no token is a 401 that says so; an unknown session a 404.
    let (status, _, body) = curl(&[&format!("http://{http}/v1/models")]);
    assert_eq!(status, 401);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["message"], "authorization: missing; this router needs \"Bearer <token>\"");
    let (status, _, body) = curl(&[
        &format!("http://{http}/v1/completions"),
        "-H",
        "authorization: Bearer s3cret",
        "-H",
        "Last-Event-ID: nosuchsession:3",
        "-d",
        r#"{"prompt": "x", "stream": true}"#,
    ]);
    assert_eq!(status, 404, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], "session_not_found");
}

/// The `data:` payloads and event ids of an SSE body.
fn sse_events(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let id = e.lines().find_map(|l| l.strip_prefix("id: ")).map(String::from);
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or_else(|| panic!("no data in {e:?}")).to_string();
            (id, data)
        })
        .collect()
}

/// Text and token ids of SSE `data:` payloads (up to `[DONE]`).
fn sse_text(events: &[(Option<String>, String)]) -> (String, Vec<u32>) {
    let (mut text, mut tokens) = (String::new(), vec![]);
    for (_, data) in events {
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(c) = v["choices"].get(0) {
            text.push_str(c["text"].as_str().unwrap_or(""));
            tokens.extend(ids(&c["token_ids"]));
        }
    }
    (text, tokens)
}

/// Two routers over one store: a stream dropped after three events and
/// resumed at the other router with `Last-Event-ID` gives the uninterrupted
/// text. Also the codes a cluster produces: 503 with no token decoder, 429
/// with every token decoder full (and Retry-After), 400 for chat on a model
/// without a template.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_stream_resumes_at_the_other_router() {
    let (p1, p2) = (blockserve_testkit::free_port(), blockserve_testkit::free_port());
    let (h1, h2) = (format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}"));
    let model = demo_model();
    let c = Cluster::start(
        &model,
        &[("block-decoder", 1, &[]), ("token-decoder", 1, &[]), ("router", 1, &["--http-listen", &h1]), ("router", 1, &["--http-listen", &h2])],
    )
    .await;
    let routers = c.routers();
    let request = r#"{"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0.8, "seed": 11, "stream": true}"#;

    // The uninterrupted run.
    let (status, _, body) = curl(&["-N", &format!("http://{h1}/v1/completions"), "-H", "content-type: application/json", "-d", request]);
    assert_eq!(status, 200);
    let whole = sse_events(&body);
    assert_eq!(whole.last().unwrap().1, "[DONE]");
    let (want_text, want_tokens) = sse_text(&whole);
    assert!(want_tokens.len() > 50, "a long stream to cut: {}", want_tokens.len());
    let mut g = Grpc::connect(routers[0].trim_start_matches("http://"), None).await;
    let seeded = GenerationParameters { max_new_tokens: Some(200), temperature: Some(0.8), seed: Some(11), ..Default::default() };
    assert_eq!(g.generate("Once upon a time", seeded).await.1, want_tokens, "the HTTP stream gives the gRPC API's tokens");

    // The same request, dropped after three events.
    let mut child = Command::new("curl")
        .args(["-sN", &format!("http://{h1}/v1/completions"), "-H", "content-type: application/json", "-d", request])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut first = String::new();
    let mut seen = 0;
    while seen < 3 {
        let line = lines.next().unwrap().unwrap();
        first.push_str(&line);
        first.push('\n');
        if line.is_empty() {
            seen += 1;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let first = sse_events(&first);
    let last_id = first.last().unwrap().0.clone().unwrap();
    let (session, offset) = last_id.rsplit_once(':').unwrap();
    let (head_text, head_tokens) = sse_text(&first);
    assert_eq!(offset.parse::<usize>().unwrap(), head_tokens.len());
    assert!(head_tokens.len() < 200, "dropped mid-stream");

    let (status, headers, body) = curl(&[
        "-N",
        &format!("http://{h2}/v1/completions"),
        "-H",
        "content-type: application/json",
        "-H",
        &format!("Last-Event-ID: {last_id}"),
        "-d",
        request,
    ]);
    assert_eq!(status, 200);
    assert!(headers.contains(&format!("x-session-id: {}", session.to_lowercase())), "{headers}");
    let rest = sse_events(&body);
    let (tail_text, tail_tokens) = sse_text(&rest);
    assert_eq!(format!("{head_text}{tail_text}"), want_text);
    assert_eq!([head_tokens, tail_tokens].concat(), want_tokens);
    let finish =
        |events: &[(Option<String>, String)]| serde_json::from_str::<Value>(&events[events.len() - 2].1).unwrap()["choices"][0]["finish_reason"].clone();
    assert_eq!(finish(&rest), finish(&whole));
    assert_eq!(rest.last().unwrap().1, "[DONE]");

    // The demo model has no chat template.
    let (status, _, body) = curl(&[
        &format!("http://{h2}/v1/chat/completions"),
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
    ]);
    assert_eq!(status, 400);
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["param"], "messages");
    assert!(e["error"]["message"].as_str().unwrap().starts_with("the model `demo` has no chat template"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_and_missing_token_decoders_are_429_and_503() {
    let (p1, p2) = (blockserve_testkit::free_port(), blockserve_testkit::free_port());
    let (full, none) = (format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}"));
    let model = demo_model();
    // A token decoder that takes no session: every instance is full.
    let _a =
        Cluster::start(&model, &[("block-decoder", 1, &[]), ("token-decoder", 1, &["--max-sessions", "0"]), ("router", 1, &["--http-listen", &full])]).await;
    // No token decoder at all.
    let _b = Cluster::start(&model, &[("router", 1, &["--http-listen", &none])]).await;
    let body = r#"{"prompt": "hi", "max_tokens": 4}"#;
    let (status, headers, text) = curl(&[&format!("http://{full}/v1/completions"), "-H", "content-type: application/json", "-d", body]);
    assert_eq!(status, 429, "{text}");
    assert!(headers.contains("retry-after: 1"), "{headers}");
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        e["error"],
        json!({"message": "every token decoder is at capacity; retry later", "type": "rate_limit_error", "param": null, "code": "rate_limit_exceeded"})
    );
    let (status, _, text) = curl(&[&format!("http://{none}/v1/completions"), "-H", "content-type: application/json", "-d", body]);
    assert_eq!(status, 503, "{text}");
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["error"], json!({"message": "no live token decoder instance is registered", "type": "server_error", "param": null, "code": "unavailable"}));
}

/// The README's `curl` and `openai` examples, as written (only the address
/// changed), against `up` with the bundled model: each answers what the gRPC
/// API answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_http_examples_run_as_written() {
    let (listen, http, _up) = up_http(&[]);
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let section = readme.split("## Calling it over HTTP").nth(1).expect("the README has an HTTP section").split("\n## ").next().unwrap();
    let blocks: Vec<&str> = section.split("```").skip(1).step_by(2).collect();
    let (sh, py) = (blocks[0].strip_prefix("sh\n").unwrap(), blocks[1].strip_prefix("python\n").unwrap());
    let sh = sh.replace("127.0.0.1:8000", &http);
    let commands: Vec<String> = sh.replace("\\\n", "").lines().map(String::from).collect();
    assert_eq!(commands.len(), 3, "{commands:?}");
    let run = |cmd: &str| {
        let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let mut g = Grpc::connect(&listen, None).await;
    let models: Value = serde_json::from_str(&run(&commands[0])).unwrap();
    assert_eq!(models["data"][0]["id"], "code-block");
    let whole: Value = serde_json::from_str(&run(&commands[1])).unwrap();
    let (fib_text, fib_tokens, _) = g.generate("def fibonacci(n):", greedy(24)).await;
    assert_eq!((whole["choices"][0]["text"].as_str().unwrap(), ids(&whole["choices"][0]["token_ids"])), (fib_text.as_str(), fib_tokens));
    let (os_text, os_tokens, _) = g.generate("import os", seeded(16)).await;
    let streamed = sse_events(&run(&commands[2]));
    assert_eq!(sse_text(&streamed), (os_text.clone(), os_tokens));
    assert!(streamed.iter().all(|(id, data)| id.is_some() || data == "[DONE]"), "every event but [DONE] has an id");

    let py = py.replace("127.0.0.1:8000", &http);
    let out = Command::new(tool("BLOCKSERVE_PYTHON")).args(["-c", &py]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{fib_text}\n{os_text}"));
}

/// A released checkpoint as the reference lays it out: the weights alone in
/// `results/<name>/checkpoint-570000/model.safetensors`, the tokenizer
/// elsewhere. Served with --preset and --tokenizer, it answers as the same
/// model with its own directory does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_released_checkpoint_layout_is_served_with_preset_and_tokenizer() {
    let dir = TempDir::new("http-checkpoint");
    let ckpt = dir.join("results/block_demo_bytes/checkpoint-570000");
    let tokenizer = dir.join("pythia-tokenizer");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::create_dir_all(&tokenizer).unwrap();
    std::fs::copy(demo_model().join("model.safetensors"), ckpt.join("model.safetensors")).unwrap();
    std::fs::copy(demo_model().join("tokenizer.json"), tokenizer.join("tokenizer.json")).unwrap();
    let (listen, http, _up) = up_http(&[
        "--model",
        ckpt.to_str().unwrap(),
        "--preset",
        "block_demo_bytes",
        "--tokenizer",
        tokenizer.join("tokenizer.json").to_str().unwrap(),
        "--token-decoders",
        "1",
    ]);
    let (ref_listen, _, _ref_up) = up_http(&["--model", demo_model().to_str().unwrap(), "--token-decoders", "1"]);
    let (text, tokens, _) = Grpc::connect(&ref_listen, None).await.generate("Once upon a time", greedy(20)).await;
    assert_eq!(Grpc::connect(&listen, None).await.generate("Once upon a time", greedy(20)).await.1, tokens);
    let (status, _, body) = curl(&[
        &format!("http://{http}/v1/completions"),
        "-d",
        r#"{"model": "block_demo_bytes", "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}"#,
    ]);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["choices"][0]["text"].as_str().unwrap(), ids(&v["choices"][0]["token_ids"])), (text.as_str(), tokens));
}

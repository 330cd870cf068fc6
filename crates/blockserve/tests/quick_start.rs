//! The README's quick start on the bundled model: `blockserve up` (every tier
//! in one process, in-process session store), then `blockserve client generate
//! "def fibonacci(n):"` prints the trained model's greedy continuation.

use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use blockserve_testkit::{free_port, metric_sum, scrape_metrics};
use common::up;

#[test]
fn up_then_client_generate_prints_the_bundled_models_continuation() {
    let (listen, _up) = up(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_blockserve"))
        .args(["client", "generate", "def fibonacci(n):", "--max-new-tokens", "32", "--addr", &format!("http://{listen}")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Greedy on CPU in f32: the tokens are fixed by the bundled weights.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "\n    \"\"\"Test a bogus-in-in-in-in-in-in-in-in-in-in-in-in-\n");
    assert!(stderr.starts_with("[FINISH_REASON_LENGTH | 9 prompt + 32 generated tokens |"), "{stderr}");
}

/// The load generator runs a ghz config against `blockserve up`; /metrics,
/// scraped during the run, shows sessions running, and afterwards its
/// counters agree with the generator's JSON report on requests and tokens.
#[test]
fn the_load_generator_runs_a_ghz_config_and_the_metrics_agree() {
    let metrics_port = free_port();
    let (listen, _up) = up(&["--metrics-listen", &format!("127.0.0.1:{metrics_port}")]);
    let dir = std::env::temp_dir().join(format!("blockserve-ghz-{metrics_port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("generate.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"call": "blockserve.v1.Generation.Generate", "host": "{listen}", "insecure": true, "total": 12, "concurrency": 3,
                "data": {{"text": "def f(x):", "parameters": {{"max_new_tokens": 8, "ignore_eos": true}}}}}}"#
        ),
    )
    .unwrap();
    let loadtest = blockserve_testkit::workspace_bin(env!("CARGO_BIN_EXE_blockserve"), "blockserve-loadtest");
    let run = Command::new(loadtest).args(["--config", config.to_str().unwrap(), "--format", "json"]).stdout(Stdio::piped()).spawn().unwrap();
    // Scraped during the run: sessions are running on the token decoders.
    let mut peak = 0.0f64;
    let start = std::time::Instant::now();
    while peak == 0.0 && start.elapsed() < Duration::from_secs(30) {
        peak = peak.max(metric_sum(&scrape_metrics(metrics_port), "blockserve_active_sessions", &[("tier", "token_decoder")]));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(peak >= 1.0, "no running session seen during the load run");
    let out = run.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["count"], 12);
    assert_eq!(report["statusCodeDistribution"], serde_json::json!({"OK": 12}));
    assert_eq!(report["tokens"], 96);
    let m = scrape_metrics(metrics_port);
    assert_eq!(metric_sum(&m, "blockserve_requests_total", &[("code", "OK"), ("method", "Generate"), ("tier", "router")]), 12.0);
    assert_eq!(metric_sum(&m, "blockserve_generated_tokens_total", &[("tier", "router")]), 96.0);
    assert_eq!(metric_sum(&m, "blockserve_generated_tokens_total", &[("tier", "token_decoder")]), 96.0);
    assert_eq!(metric_sum(&m, "blockserve_time_to_first_token_seconds_count", &[]), 12.0);
    let _ = std::fs::remove_dir_all(dir);
}

/// With `--api-token`, the public API refuses a client without the token or
/// with a wrong one (UNAUTHENTICATED, and the message says which), and serves
/// one that has it.
#[test]
fn a_router_with_an_api_token_refuses_unauthenticated_clients() {
    let (listen, _up) = up(&["--api-token", "s3cret"]);
    let generate = |token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_blockserve"));
        cmd.args(["client", "generate", "def f(x):", "--max-new-tokens", "4", "--addr", &format!("http://{listen}")]).env_remove("BLOCKSERVE_API_TOKEN");
        if let Some(t) = token {
            cmd.args(["--api-token", t]);
        }
        cmd.output().unwrap()
    };
    let none = generate(None);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("authorization: missing"), "{}", String::from_utf8_lossy(&none.stderr));
    let wrong = generate(Some("guess"));
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("the bearer token is not valid"), "{}", String::from_utf8_lossy(&wrong.stderr));
    let right = generate(Some("s3cret"));
    assert!(right.status.success(), "{}", String::from_utf8_lossy(&right.stderr));
    assert!(String::from_utf8_lossy(&right.stderr).contains("4 generated tokens"));
}

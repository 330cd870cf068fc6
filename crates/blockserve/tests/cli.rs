//! The `blockserve` command as scripts use it: real process, real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures").join(name)
}

fn blockserve(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockserve")).args(args).env_remove("BLOCKSERVE_MODEL").output().unwrap()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "exit {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn golden(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("golden.safetensors"), &Device::Cpu).unwrap()
}

fn ids(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn tmp(tag: &str) -> blockserve_testkit::TempDir {
    blockserve_testkit::TempDir::new(&format!("cli-{tag}"))
}

fn csv(v: &[i64]) -> String {
    v.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn generate_json_matches_reference_greedy_tokens() {
    let g = golden("official-tiny-b4");
    // p1 has 9 tokens: not a multiple of L, so it is left-padded.
    let prompt = csv(&ids(&g["greedy.p1.prompt"]));
    let model = fixture("official-tiny-b4");
    let out = ok(blockserve(&["generate", "--model", model.to_str().unwrap(), "--prompt-ids", &prompt, "--max-new-tokens", "12", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let want: Vec<i64> = ids(&g["greedy.p1.tokens"]);
    assert_eq!(v, serde_json::json!({ "tokens": want, "finish_reason": "length" }));
}

fn logits_file(model: &Path, rows: &[Vec<i64>], tag: &str) -> std::collections::HashMap<String, Tensor> {
    let dir = tmp(tag);
    let input = dir.join("in.json");
    std::fs::write(&input, serde_json::json!({ "input_ids": rows }).to_string()).unwrap();
    let output = dir.join("out.safetensors");
    ok(blockserve(&["logits", "--model", model.to_str().unwrap(), "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()]));
    candle_core::safetensors::load(&output, &Device::Cpu).unwrap()
}

#[test]
fn logits_match_reference_forward() {
    let g = golden("official-tiny-b4");
    let rows: Vec<Vec<i64>> = (0..2).map(|b| ids(&g["forward.input_ids"].get(b).unwrap())).collect();
    let out = logits_file(&fixture("official-tiny-b4"), &rows, "block");
    assert!(max_abs_diff(&out["logits"], &g["forward.logits"]) <= 1e-4);
    assert!(max_abs_diff(&out["context"], &g["forward.context"]) <= 2e-5);

    let g = golden("pythia-tiny");
    let rows: Vec<Vec<i64>> = (0..2).map(|b| ids(&g["forward.input_ids"].get(b).unwrap())).collect();
    let out = logits_file(&fixture("pythia-tiny"), &rows, "pythia");
    assert_eq!(out.len(), 1);
    assert!(max_abs_diff(&out["logits"], &g["forward.logits"]) <= 1e-4);
}

#[test]
fn errors_name_the_problem_and_exit_nonzero() {
    let model = fixture("official-tiny-b4");
    let m = model.to_str().unwrap();
    let out = blockserve(&["generate", "--model", m, "--prompt-ids", "1,2,999", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("prompt: token id 999 is out of range (vocab size 512)"), "{err}");

    let out = blockserve(&["generate", "--model", m, "--prompt-ids", "1", "--top-p", "0"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p must be in (0, 1], got 0"));

    let out = blockserve(&["generate", "--model", m, "--prompt-ids", "1", "--dtype", "f8"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dtype \"f8\": expected f32, bf16 or f16"));

    let out = blockserve(&["init", "--preset", "nope", "--out", "/nonexistent"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown preset \"nope\""));
}

#[test]
fn init_writes_a_deterministic_loadable_preset_model() {
    let dir = tmp("init");
    let (a, b) = (dir.join("a"), dir.join("b"));
    for d in [&a, &b] {
        ok(blockserve(&["init", "--preset", "block_main_b4_5", "--seed", "7", "--out", d.to_str().unwrap()]));
    }
    let fa = std::fs::read(a.join("model.safetensors")).unwrap();
    assert_eq!(fa, std::fs::read(b.join("model.safetensors")).unwrap(), "same seed, same bytes");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(a.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["block_decoder"]["num_attention_heads"], 8);
    assert_eq!(cfg["token_decoder"]["intermediate_size"], 1024);
    let t = candle_core::safetensors::load(a.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(t["embedder.embeddings.weight"].dims(), &[50304, 64]);
    assert_eq!(t["embedder.embeddings.weight"].dtype(), DType::F32);
    // Refuses to overwrite.
    assert!(!blockserve(&["init", "--preset", "block_main_b4_5", "--out", a.to_str().unwrap()]).status.success());
    // The command's output equals the library's on the same files (random weights
    // give near-uniform logits, so the ids themselves are not pinned across CPUs).
    let out = ok(blockserve(&["generate", "--model", a.to_str().unwrap(), "--prompt-ids", "5,6,7", "--max-new-tokens", "8", "--ignore-eos", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let model = blockserve_model::loader::load_model(&a, None, DType::F32, &Device::Cpu).unwrap();
    let req = blockserve_model::GenerationRequest {
        prompt: vec![5, 6, 7],
        sampling: blockserve_model::SamplingParams::greedy(),
        stop: blockserve_model::StopCriteria { max_new_tokens: 8, eos_token_id: None, stop_token_ids: vec![] },
        layout: Default::default(),
    };
    let want = model.generate(&[req], false).unwrap().remove(0);
    assert_eq!(want.tokens.len(), 8);
    assert_eq!(v, serde_json::json!({ "tokens": want.tokens, "finish_reason": "length" }));
}

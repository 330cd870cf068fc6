//! The definition of a correct model: the reference's golden outputs for the two
//! bundled fixtures, in f32 (see tests/fixtures/README.md for what they hold).

mod common;

use blockserve_model::{FinishReason, GenerationRequest, Model, SamplingParams, StopCriteria};
use candle_core::DType;
use common::*;

fn greedy(prompt: Vec<u32>, n: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        sampling: SamplingParams::greedy(),
        stop: StopCriteria { max_new_tokens: n, eos_token_id: Some(0), stop_token_ids: vec![] },
        layout: Default::default(),
    }
}

#[test]
fn block_transformer_forward_matches_reference() {
    let Model::Block(m) = load(BLOCK, DType::F32) else { panic!("fixture is a block transformer") };
    let g = golden(BLOCK);
    let input = &g["forward.input_ids"]; // [2, 6, 4]
    let rows: Vec<Vec<u32>> = (0..2).map(|b| ids(&input.get(b).unwrap())).collect();

    let embeds = m.embed_ids(&rows[0]).unwrap();
    assert_eq!(max_abs_diff(&embeds, &g["forward.block_embeds"].get(0).unwrap()), 0.0, "embedder is a gather");

    let out = m.forward(&rows).unwrap();
    let ctx_err = max_abs_diff(&out.context, &g["forward.context"]);
    let logit_err = max_abs_diff(&out.logits, &g["forward.logits"]);
    assert!(ctx_err <= 2e-5, "context max abs diff {ctx_err}");
    assert!(logit_err <= 1e-4, "logits max abs diff {logit_err}");

    let ctx = out.context.narrow(1, 0, 5).unwrap().reshape((10, 64)).unwrap();
    let prefix = m.token_decoder().prefix(&ctx).unwrap().reshape((2, 5, 2, 64)).unwrap();
    let prefix_err = max_abs_diff(&prefix, &g["forward.prefix"]);
    assert!(prefix_err <= 2e-5, "prefix max abs diff {prefix_err}");
}

#[test]
fn block_transformer_greedy_matches_reference_loop() {
    let model = load(BLOCK, DType::F32);
    let g = golden(BLOCK);
    for p in prompts(BLOCK) {
        let prompt = ids(&g[&format!("greedy.{p}.prompt")]);
        let want = ids(&g[&format!("greedy.{p}.tokens")]);
        let out = model.generate(&[greedy(prompt, want.len())], true).unwrap().remove(0);
        assert_eq!(out.tokens, want, "greedy tokens of {p}");
        assert_eq!(out.finish_reason, FinishReason::Length);
        let err = rows_diff(&out.logits, &g[&format!("greedy.{p}.logits")]);
        assert!(err <= 1e-4, "{p}: per-step logits max abs diff {err}");
    }
}

#[test]
fn block_transformer_padding_matches_reference_layout() {
    let g = golden(BLOCK);
    for p in prompts(BLOCK) {
        let prompt = ids(&g[&format!("greedy.{p}.prompt")]);
        let padded = blockserve_model::prompt::PaddedPrompt::new(&prompt, 4).unwrap();
        assert_eq!(padded.ids, ids(&g[&format!("greedy.{p}.padded_input_ids")]), "{p}");
        let mask: Vec<u32> = padded.attention_mask().into_iter().map(u32::from).collect();
        assert_eq!(mask, ids(&g[&format!("greedy.{p}.padded_attention_mask")]), "{p}");
    }
}

#[test]
fn pythia_forward_and_greedy_match_transformers() {
    let model = load(PYTHIA, DType::F32);
    let Model::Vanilla(m) = &model else { panic!("fixture is GPT-NeoX") };
    let g = golden(PYTHIA);
    let input = &g["forward.input_ids"];
    let rows: Vec<Vec<u32>> = (0..2).map(|b| ids(&input.get(b).unwrap())).collect();
    let err = max_abs_diff(&m.forward(&rows).unwrap(), &g["forward.logits"]);
    assert!(err <= 1e-4, "logits max abs diff {err}");

    for p in prompts(PYTHIA) {
        let prompt = ids(&g[&format!("greedy.{p}.prompt")]);
        let want = ids(&g[&format!("greedy.{p}.tokens")]);
        let out = model.generate(&[greedy(prompt, want.len())], true).unwrap().remove(0);
        assert_eq!(out.tokens, want, "greedy tokens of {p}");
        let err = rows_diff(&out.logits, &g[&format!("greedy.{p}.logits")]);
        assert!(err <= 1e-4, "{p}: per-step logits max abs diff {err}");
    }
}

/// Plain greedy vanilla sessions without logits (the argmax on the device,
/// only token ids read back): in one batch, sessions of every prompt stop on
/// EOS, on a stop id and on length exactly where the reference's tokens say.
/// (Branch `wip/greedy-readback` reads each step's tokens while the next step
/// runs; this is the test it has to pass.)
#[test]
fn pythia_greedy_without_logits_stops_where_the_reference_does() {
    let model = load(PYTHIA, DType::F32);
    let g = golden(PYTHIA);
    let (mut reqs, mut want) = (vec![], vec![]);
    for p in prompts(PYTHIA) {
        let prompt = ids(&g[&format!("greedy.{p}.prompt")]);
        let tokens = ids(&g[&format!("greedy.{p}.tokens")]);
        reqs.push(greedy(prompt.clone(), tokens.len()));
        want.push((tokens.clone(), FinishReason::Length));
        reqs.push(greedy(prompt.clone(), tokens.len() - 3));
        want.push((tokens[..tokens.len() - 3].to_vec(), FinishReason::Length));
        // The token at index 2 as EOS, and the one at index 5 as a stop id:
        // each stops at its first occurrence.
        let first = |t: u32| tokens.iter().position(|&x| x == t).unwrap();
        let mut eos = greedy(prompt.clone(), tokens.len());
        eos.stop.eos_token_id = Some(tokens[2]);
        reqs.push(eos);
        want.push((tokens[..=first(tokens[2])].to_vec(), FinishReason::Eos));
        let mut stop = greedy(prompt, tokens.len());
        stop.stop.stop_token_ids = vec![tokens[5]];
        reqs.push(stop);
        want.push((tokens[..=first(tokens[5])].to_vec(), FinishReason::StopToken));
    }
    let out = model.generate(&reqs, false).unwrap();
    for (i, (o, (tokens, reason))) in out.iter().zip(&want).enumerate() {
        assert_eq!((&o.tokens, o.finish_reason), (tokens, *reason), "request {i}");
    }
}

#[test]
fn stops_on_eos_and_stop_ids_with_reason() {
    let model = load(BLOCK, DType::F32);
    let g = golden(BLOCK);
    let prompt = ids(&g["greedy.p2.prompt"]);
    let want = ids(&g["greedy.p2.tokens"]); // 363, 290, 55, 229, 202, ...
                                            // Pretend 55 is EOS: generation stops after it, mid-block, and keeps it.
    let mut req = greedy(prompt.clone(), 20);
    req.stop.eos_token_id = Some(55);
    let out = model.generate(&[req], false).unwrap().remove(0);
    assert_eq!((out.tokens.as_slice(), out.finish_reason), (&want[..3], FinishReason::Eos));
    // A caller stop id first reached at index 8 (229 also appears at index 3).
    let mut req = greedy(prompt.clone(), 20);
    req.stop.stop_token_ids = vec![308];
    let out = model.generate(&[req], false).unwrap().remove(0);
    assert_eq!((out.tokens.as_slice(), out.finish_reason), (&want[..10], FinishReason::StopToken));
    // max_new_tokens that is not a multiple of L.
    let out = model.generate(&[greedy(prompt.clone(), 6)], false).unwrap().remove(0);
    assert_eq!((out.tokens.as_slice(), out.finish_reason), (&want[..6], FinishReason::Length));
    let out = model.generate(&[greedy(prompt, 0)], false).unwrap().remove(0);
    assert_eq!((out.tokens.len(), out.finish_reason), (0, FinishReason::Length));
}

#[test]
fn bad_requests_are_refused_with_the_field_named() {
    let model = load(BLOCK, DType::F32);
    let e = model.generate(&[greedy(vec![], 4)], false).unwrap_err().to_string();
    assert!(e.contains("prompt must hold at least one token"), "{e}");
    let e = model.generate(&[greedy(vec![1, 512], 4)], false).unwrap_err().to_string();
    assert!(e.contains("token id 512 is out of range (vocab size 512)"), "{e}");
    let e = model.generate(&[greedy(vec![1], 8188)], false).unwrap_err().to_string();
    assert!(e.contains("max_new_tokens (8188) exceeds"), "{e}");
}

//! Batching must change nothing: a session decoded alone and inside a batch with
//! sessions of other cache lengths gives the same tokens and logits, greedy or
//! seeded.

mod common;

use blockserve_model::{GenerationOutput, GenerationRequest, Model, SamplingParams, StopCriteria};
use candle_core::DType;
use common::*;

fn request(prompt: Vec<u32>, n: usize, sampling: SamplingParams) -> GenerationRequest {
    GenerationRequest { prompt, sampling, stop: StopCriteria { max_new_tokens: n, eos_token_id: None, stop_token_ids: vec![] }, layout: Default::default() }
}

/// Prompts of 8, 9, 20 tokens (2, 3 and 5 blocks) plus two more lengths.
fn prompts_of(name: &str) -> Vec<Vec<u32>> {
    let g = golden(name);
    let mut p: Vec<Vec<u32>> = prompts(name).iter().map(|p| ids(&g[&format!("greedy.{p}.prompt")])).collect();
    p.push(vec![7; 1]);
    p.push((1..=33).collect());
    p
}

fn alone_vs_batched(model: &Model, reqs: &[GenerationRequest]) -> (Vec<GenerationOutput>, Vec<GenerationOutput>) {
    let alone: Vec<GenerationOutput> = reqs.iter().map(|r| model.generate(std::slice::from_ref(r), true).unwrap().remove(0)).collect();
    let batched = model.generate(reqs, true).unwrap();
    (alone, batched)
}

fn assert_same(alone: &[GenerationOutput], batched: &[GenerationOutput], tol: f32) {
    for (i, (a, b)) in alone.iter().zip(batched).enumerate() {
        assert_eq!(a.tokens, b.tokens, "session {i}: tokens");
        assert_eq!(a.finish_reason, b.finish_reason, "session {i}");
        let err = rows_diff(&a.logits, &candle_core::Tensor::new(b.logits.clone(), &candle_core::Device::Cpu).unwrap());
        assert!(err <= tol, "session {i}: logits differ by {err}");
    }
}

#[test]
fn greedy_is_the_same_alone_and_batched() {
    for name in [BLOCK, PYTHIA] {
        let model = load(name, DType::F32);
        // Different max_new_tokens too, so sessions leave the batch at different times.
        let reqs: Vec<_> = prompts_of(name).into_iter().enumerate().map(|(i, p)| request(p, 9 + 4 * i, SamplingParams::greedy())).collect();
        let (alone, batched) = alone_vs_batched(&model, &reqs);
        assert_same(&alone, &batched, 1e-5);
        let lens: Vec<usize> = batched.iter().map(|o| o.tokens.len()).collect();
        assert_eq!(lens, (0..reqs.len()).map(|i| 9 + 4 * i).collect::<Vec<_>>());
    }
}

#[test]
fn seeded_sampling_repeats_across_runs_and_batch_compositions() {
    for name in [BLOCK, PYTHIA] {
        let model = load(name, DType::F32);
        let reqs: Vec<_> = prompts_of(name)
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let s = SamplingParams { temperature: 0.9, top_k: 50, top_p: 0.95, repetition_penalty: 1.1, seed: 1000 + i as u64 };
                request(p, 16, s)
            })
            .collect();
        let (alone, batched) = alone_vs_batched(&model, &reqs);
        assert_same(&alone, &batched, 1e-5);
        // A second run and a batch in another order and membership agree too.
        let again = model.generate(&reqs, false).unwrap();
        let subset = model.generate(&[reqs[3].clone(), reqs[0].clone()], false).unwrap();
        for (a, b) in batched.iter().zip(&again) {
            assert_eq!(a.tokens, b.tokens);
        }
        assert_eq!(subset[0].tokens, batched[3].tokens);
        assert_eq!(subset[1].tokens, batched[0].tokens);
        // Sampling really samples: it leaves the greedy path for some session.
        let greedy: Vec<_> = reqs.iter().map(|r| request(r.prompt.clone(), 16, SamplingParams::greedy())).collect();
        let greedy = model.generate(&greedy, false).unwrap();
        assert!(greedy.iter().zip(&batched).any(|(g, s)| g.tokens != s.tokens), "{name}: sampling never diverged from greedy");
        // And another seed changes the draw.
        let mut other = reqs[0].clone();
        other.sampling.seed += 1;
        assert_ne!(model.generate(&[other], false).unwrap()[0].tokens, batched[0].tokens, "{name}");
    }
}

/// The aligned prompt layout hands the token decoder the prompt's last
/// partial block as the start of the first generated block: the decoder must
/// read those tokens as if it had chosen them. So a greedy session of prompt
/// `p` with output `o` and one of prompt `p + o[..k]`, still inside the same
/// block, go on the same way, logits included.
#[test]
fn the_aligned_layout_reads_the_prompt_tail_as_if_it_had_chosen_it() {
    use blockserve_model::PromptLayout;
    let model = load(BLOCK, DType::F32);
    let aligned = |prompt: Vec<u32>, n: usize| GenerationRequest { layout: PromptLayout::Aligned, ..request(prompt, n, SamplingParams::greedy()) };
    let mut differs_from_reference = false;
    // 9, 10 and 11 ids: 2 whole blocks and 1, 2 or 3 forced tokens.
    for n in 9..12u32 {
        let prompt: Vec<u32> = (1..=n).map(|i| i * 37 % 97 + 1).collect();
        let whole = model.generate(&[aligned(prompt.clone(), 12)], true).unwrap().remove(0);
        for k in 1..(4 - n as usize % 4) {
            let longer = [prompt.clone(), whole.tokens[..k].to_vec()].concat();
            let rest = model.generate(&[aligned(longer, 12 - k)], true).unwrap().remove(0);
            assert_eq!(rest.tokens, whole.tokens[k..], "prompt of {n} ids, {k} more");
            let err = rows_diff(&rest.logits, &candle_core::Tensor::new(whole.logits[k..].to_vec(), &candle_core::Device::Cpu).unwrap());
            assert!(err <= 1e-5, "prompt of {n} ids, {k} more: logits differ by {err}");
        }
        let reference = model.generate(&[request(prompt, 12, SamplingParams::greedy())], false).unwrap().remove(0);
        differs_from_reference |= reference.tokens != whole.tokens;
    }
    assert!(differs_from_reference, "the layout changed no output");
}

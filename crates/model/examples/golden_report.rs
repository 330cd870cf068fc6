//! Compare the bundled fixtures with this build on any device and dtype, and print
//! what differs instead of failing: the tool for checking a CUDA or bf16 build,
//! where f32 tolerances do not apply.
//!
//!   BLOCKSERVE_TEST_DEVICE=cuda cargo run --release --features cuda --example golden_report -- bf16

#[path = "../tests/common/mod.rs"]
mod common;

use blockserve_model::{GenerationRequest, Model, SamplingParams, StopCriteria};
use candle_core::DType;
use common::*;

fn main() {
    let dtype = match std::env::args().nth(1).as_deref() {
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        _ => DType::F32,
    };
    println!("device {:?}, dtype {dtype:?}", device());
    for name in [BLOCK, PYTHIA] {
        let model = load(name, dtype);
        let g = golden(name);
        let rows: Vec<Vec<u32>> = (0..2).map(|b| ids(&g["forward.input_ids"].get(b).unwrap())).collect();
        match &model {
            Model::Block(m) => {
                let f = m.forward(&rows).unwrap();
                println!(
                    "{name}: forward logits max |diff| {:.3e}, context {:.3e}",
                    max_abs_diff(&f.logits, &g["forward.logits"]),
                    max_abs_diff(&f.context, &g["forward.context"])
                );
            }
            Model::Vanilla(m) => {
                let l = m.forward(&rows).unwrap();
                println!("{name}: forward logits max |diff| {:.3e}", max_abs_diff(&l, &g["forward.logits"]));
            }
        }
        for p in prompts(name) {
            let prompt = ids(&g[&format!("greedy.{p}.prompt")]);
            let want = ids(&g[&format!("greedy.{p}.tokens")]);
            let req = GenerationRequest {
                prompt,
                sampling: SamplingParams::greedy(),
                stop: StopCriteria { max_new_tokens: want.len(), eos_token_id: None, stop_token_ids: vec![] },
                layout: Default::default(),
            };
            let out = model.generate(&[req], true).unwrap().remove(0);
            let verdict = match out.tokens.iter().zip(&want).position(|(a, b)| a != b) {
                None => format!("all {} greedy tokens match", want.len()),
                Some(i) => format!(
                    "first divergence at token {i}: ours {} vs reference {} (reference top-2 margin there {:.4})",
                    out.tokens[i],
                    want[i],
                    g[&format!("greedy.{p}.top2_margin")].get(i).unwrap().to_scalar::<f32>().unwrap()
                ),
            };
            // Logits are comparable up to the first divergence only.
            let n = out.tokens.iter().zip(&want).take_while(|(a, b)| a == b).count().min(out.logits.len());
            let err = if n > 0 { rows_diff(&out.logits[..n], &g[&format!("greedy.{p}.logits")].narrow(0, 0, n).unwrap()) } else { f32::NAN };
            println!("{name} {p}: {verdict}; step logits max |diff| {err:.3e} over {n} steps");
        }
    }
}

//! The fused GPT-NeoX layer (`src/fused_layer.rs`) against the unfused one on
//! the GPU, at vanilla_160's layer shape (hidden 768, 12 heads of 64, MLP
//! 3072; two layers, random weights): a prefill pass, then decode passes at a
//! batch below a wave of `decode_rows` CTAs (the per-head kernel) and at one
//! above (`decode_rows`), so every attention kernel a paged pass takes reads
//! its projections from and writes its output into the fused layer's row
//! buffer.
//!
//! - f32: fused and unfused agree to 2e-4 (the folded norms and the single
//!   rounding of the residual are all that differ).
//! - bf16: the fused logits are no further from the f32 logits than the
//!   unfused bf16 logits are, give or take a quarter, and pick the same
//!   greedy token nearly everywhere.
//!
//! Run with the other CUDA checks (`bench/headline.sh`); it needs a GPU, so it
//! is compiled only with the `cuda` feature. One test in its own binary: it
//! sets `BLOCKSERVE_FUSED_LAYER` between loads.
#![cfg(feature = "cuda")]

use blockserve_model::config::ModelConfig;
use blockserve_model::weights::Weights;
use blockserve_model::{loader, presets, CausalLm, Model, SeqKv};
use candle_core::{DType, Device, Tensor};

/// vanilla_160's layers, two of them, over a small vocabulary.
fn config() -> ModelConfig {
    let ModelConfig::Vanilla(mut c) = presets::preset("vanilla_160").unwrap() else { panic!("a vanilla preset") };
    c.stack.num_hidden_layers = 2;
    c.stack.vocab_size = 1024;
    ModelConfig::Vanilla(c)
}

fn build(fused: bool, dtype: DType, device: &Device) -> CausalLm {
    // SAFETY: the only test of this binary, so no other thread reads the
    // environment while it changes.
    std::env::set_var("BLOCKSERVE_FUSED_LAYER", if fused { "1" } else { "0" });
    let cfg = config();
    let w = blockserve_model::init::random_weights(&cfg, 7, DType::F32).unwrap();
    let Model::Vanilla(m) = loader::build(&cfg, &Weights::from_tensors(w, dtype, device)).unwrap() else { panic!("vanilla") };
    m
}

/// Logits `[rows, vocab]` (f32, on the host) of a prompt pass for `batch`
/// sessions, then of three decode passes.
fn run(m: &CausalLm, batch: usize) -> Vec<Tensor> {
    let device = m.device();
    let vocab = m.config.stack.vocab_size as u32;
    let prompt = |s: usize| -> Vec<u32> { (0..(5 + s % 13)).map(|j| ((s * 131 + j * 17) as u32) % vocab).collect() };
    let mut pool = m.new_pool(batch * 3, 16, m.dtype(), device).unwrap();
    let mut seqs: Vec<SeqKv> = (0..batch).map(|_| SeqKv::default()).collect();
    let lens: Vec<usize> = (0..batch).map(|s| prompt(s).len()).collect();
    let ids: Vec<u32> = (0..batch).flat_map(prompt).collect();
    let last: Vec<u32> = lens
        .iter()
        .scan(0u32, |end, &n| {
            *end += n as u32;
            Some(*end - 1)
        })
        .collect();
    let mut refs: Vec<&mut SeqKv> = seqs.iter_mut().collect();
    let pass = pool.plan(&mut refs, &lens, device).unwrap();
    let mut out = vec![m.forward_paged(&ids, &pool, &pass, &last).unwrap()];
    for step in 0..3u32 {
        let ids: Vec<u32> = (0..batch as u32).map(|s| (s * 7 + step * 101) % vocab).collect();
        let mut refs: Vec<&mut SeqKv> = seqs.iter_mut().collect();
        let pass = pool.plan(&mut refs, &vec![1; batch], device).unwrap();
        let rows: Vec<u32> = (0..batch as u32).collect();
        out.push(m.forward_paged(&ids, &pool, &pass, &rows).unwrap());
    }
    out.into_iter().map(|t| t.to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap()).collect()
}

fn max_diff(a: &[Tensor], b: &[Tensor]) -> f32 {
    a.iter().zip(b).map(|(a, b)| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()).fold(0f32, f32::max)
}

/// Rows (of all passes) whose argmax differs.
fn argmax_mismatches(a: &[Tensor], b: &[Tensor]) -> usize {
    let am = |t: &Tensor| t.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    a.iter().zip(b).map(|(a, b)| am(a).iter().zip(am(b)).filter(|(x, y)| **x != *y).count()).sum()
}

#[test]
fn fused_layer_matches_the_unfused_layer() {
    let device = blockserve_model::cuda_device(0).expect("a CUDA device");
    // 300 decode rows take the per-head kernel, 1200 fill a wave of decode_rows.
    for batch in [300, 1200] {
        let reference = run(&build(false, DType::F32, &device), batch);
        let fused_f32 = run(&build(true, DType::F32, &device), batch);
        let f32_err = max_diff(&fused_f32, &reference);
        assert!(f32_err <= 2e-4, "batch {batch}: f32 fused against unfused, max abs diff {f32_err}");

        let unfused = run(&build(false, DType::BF16, &device), batch);
        let fused = run(&build(true, DType::BF16, &device), batch);
        let (unfused_err, fused_err) = (max_diff(&unfused, &reference), max_diff(&fused, &reference));
        let rows = (batch * 4) as f64;
        let (unfused_miss, fused_miss) = (argmax_mismatches(&unfused, &reference), argmax_mismatches(&fused, &reference));
        println!("batch {batch}: f32 {f32_err:.2e}; bf16 against f32: unfused {unfused_err:.3e} ({unfused_miss} argmax differ), fused {fused_err:.3e} ({fused_miss})");
        assert!(fused_err <= 1.25 * unfused_err, "batch {batch}: bf16 fused {fused_err} against unfused {unfused_err} from f32");
        assert!(
            (fused_miss as f64) <= (unfused_miss as f64 * 1.5).max(rows * 0.01),
            "batch {batch}: argmax differs in {fused_miss} rows (unfused {unfused_miss})"
        );
    }
}

//! `blockserve bench`: the model engine in this process (no gRPC) on random
//! weights of any preset, in the reference's two benchmark settings, EOS disabled.
//! Prints one table row per run; throughput counts generated tokens only.

use std::time::Instant;

use anyhow::{bail, Result};
use blockserve_model::init::random_weights;
use blockserve_model::loader::build;
use blockserve_model::weights::Weights;
use blockserve_model::{presets, GenerationRequest, SamplingParams, StopCriteria};
use blockserve_runtime::model_args::{parse_device, parse_dtype};
use candle_core::DType;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model shape (random weights): block_main_b4_* or vanilla_* presets.
    #[arg(long, default_value = "block_main_b4_5")]
    preset: String,
    /// prefill-heavy (prompt 2048, generate 128) or decode-heavy (prompt 128,
    /// generate 2048); --prompt-len/--gen-len override either.
    #[arg(long, default_value = "decode-heavy")]
    setting: String,
    #[arg(long)]
    prompt_len: Option<usize>,
    #[arg(long)]
    gen_len: Option<usize>,
    /// Batch sizes to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "BLOCKSERVE_DEVICE", default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16.
    #[arg(long, env = "BLOCKSERVE_DTYPE", default_value = "f32")]
    dtype: String,
    /// Seed of the random weights and prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(a: Args) -> Result<()> {
    let (p, g) = match a.setting.as_str() {
        "prefill-heavy" => (2048, 128),
        "decode-heavy" => (128, 2048),
        other => bail!("--setting {other:?}: expected prefill-heavy or decode-heavy"),
    };
    let (prompt_len, gen_len) = (a.prompt_len.unwrap_or(p), a.gen_len.unwrap_or(g));
    let device = parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype)?;
    let config = presets::preset(&a.preset)?;
    let t0 = Instant::now();
    let weights = Weights::from_tensors(random_weights(&config, a.seed, DType::F32)?, dtype, &device);
    let model = build(&config, &weights)?;
    eprintln!("built {} (random weights) on {:?} {:?} in {:.1} s", a.preset, device, dtype, t0.elapsed().as_secs_f64());
    let vocab = config.vocab_size() as u32;
    // Warm-up: the first call loads device modules and allocates; keep it out of the timings.
    let warm = GenerationRequest {
        prompt: vec![1; 8],
        sampling: SamplingParams::greedy(),
        stop: StopCriteria { max_new_tokens: 8, eos_token_id: None, stop_token_ids: vec![] },
    };
    model.generate(&[warm], false)?;
    device.synchronize()?;
    println!("| preset | device | dtype | prompt | generate | batch | wall s | tokens/s | first token s |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|");
    for &b in &a.batch {
        let reqs: Vec<GenerationRequest> = (0..b)
            .map(|i| GenerationRequest {
                prompt: (0..prompt_len).map(|j| 1 + ((i * 7919 + j * 104729 + a.seed as usize) as u32 % (vocab - 1))).collect(),
                sampling: SamplingParams::greedy(),
                stop: StopCriteria { max_new_tokens: gen_len, eos_token_id: None, stop_token_ids: vec![] },
            })
            .collect();
        // Time to first token: the same batch asked for one block only.
        let first_reqs: Vec<GenerationRequest> =
            reqs.iter().map(|r| GenerationRequest { stop: StopCriteria { max_new_tokens: 1, ..r.stop.clone() }, ..r.clone() }).collect();
        let t = Instant::now();
        model.generate(&first_reqs, false)?;
        device.synchronize()?;
        let ttft = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let out = model.generate(&reqs, false)?;
        device.synchronize()?;
        let wall = t.elapsed().as_secs_f64();
        let generated: usize = out.iter().map(|o| o.tokens.len()).sum();
        println!(
            "| {} | {} | {} | {prompt_len} | {gen_len} | {b} | {wall:.2} | {:.0} | {ttft:.3} |",
            a.preset, a.device, a.dtype, generated as f64 / wall
        );
    }
    Ok(())
}

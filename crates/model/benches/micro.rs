//! Micro-benchmark of the two decoders of a `block_main_b4_5`-shaped model with
//! random weights (not a test: it prints a table and asserts nothing).
//!
//!   cargo bench -p blockserve-model --bench micro
//!
//! Environment: BENCH_DEVICE=cpu|cuda, BENCH_DTYPE=f32|bf16|f16,
//! BENCH_BATCHES=1,64,256, BENCH_CONTEXT_BLOCKS=32 (cache length of every session
//! before the measured block-decoder steps), BENCH_PRESET=block_main_b4_5.

use std::time::{Duration, Instant};

use blockserve_model::init::random_weights;
use blockserve_model::loader::build;
use blockserve_model::weights::Weights;
use blockserve_model::{presets, Model, SeqKv};
use candle_core::{DType, Device, Tensor};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn sync(d: &Device) {
    d.synchronize().expect("device sync");
}

/// Run `f` until at least `min` has passed (after one warm-up call); seconds per call.
fn time_per_call(d: &Device, min: Duration, mut f: impl FnMut()) -> f64 {
    f();
    sync(d);
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < min || n < 3 {
        f();
        n += 1;
        sync(d);
    }
    start.elapsed().as_secs_f64() / n as f64
}

fn main() {
    let device = match env("BENCH_DEVICE", "cpu").as_str() {
        "cuda" => blockserve_model::cuda_device(0).expect("CUDA device"),
        _ => Device::Cpu,
    };
    let dtype = match env("BENCH_DTYPE", "f32").as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => DType::F32,
    };
    let preset = env("BENCH_PRESET", "block_main_b4_5");
    let batches: Vec<usize> = env("BENCH_BATCHES", "1,64,256").split(',').map(|s| s.parse().unwrap()).collect();
    let ctx_blocks: usize = env("BENCH_CONTEXT_BLOCKS", "32").parse().unwrap();
    let min = Duration::from_millis(env("BENCH_MIN_MS", "1500").parse().unwrap());

    let config = presets::preset(&preset).unwrap();
    let weights = Weights::from_tensors(random_weights(&config, 0, DType::F32).unwrap(), dtype, &device);
    let Model::Block(m) = build(&config, &weights).unwrap() else { panic!("{preset} is not a Block Transformer") };
    let (l, d_b) = (m.block_length(), m.config.block_decoder.hidden_size);

    println!("model {preset} (random weights), device {device:?}, dtype {dtype:?}, L = {l}, cache {ctx_blocks} blocks before each step");
    println!("| part | batch | ms / call | blocks/s | tokens/s |");
    println!("|---|---:|---:|---:|---:|");
    for &b in &batches {
        // Block decoder: every session holds ctx_blocks blocks, then one step each.
        let prompt = Tensor::randn(0f32, 1.0, (b * ctx_blocks, d_b), &device).unwrap().to_dtype(dtype).unwrap();
        let pages = b * (ctx_blocks + 32).div_ceil(16);
        let mut pool = m.block_decoder().new_pool(pages, 16, dtype, &device).unwrap();
        let mut seqs: Vec<SeqKv> = (0..b).map(|_| SeqKv::default()).collect();
        let mut refs: Vec<&mut SeqKv> = seqs.iter_mut().collect();
        let pass = pool.plan(&mut refs, &vec![ctx_blocks; b], &device).unwrap();
        m.block_decoder().forward_paged(&prompt, &pool, &pass).unwrap();
        let embeds = Tensor::randn(0f32, 1.0, (b, d_b), &device).unwrap().to_dtype(dtype).unwrap();
        let mut steps = 0;
        let t = time_per_call(&device, min, || {
            // Keep lengths bounded: rewind to the prefilled state every 32 steps.
            if steps == 32 {
                seqs.iter_mut().for_each(|c| c.truncate(ctx_blocks));
                steps = 0;
            }
            let mut refs: Vec<&mut SeqKv> = seqs.iter_mut().collect();
            let pass = pool.plan(&mut refs, &vec![1; b], &device).unwrap();
            m.block_decoder().forward_paged(&embeds, &pool, &pass).unwrap();
            steps += 1;
        });
        println!("| block-decoder step | {b} | {:.3} | {:.0} | {:.0} |", t * 1e3, b as f64 / t, (b * l) as f64 / t);

        // Token decoder: one whole block (prefix + L-1 further steps) per session.
        let ctx = Tensor::randn(0f32, 1.0, (b, d_b), &device).unwrap().to_dtype(dtype).unwrap();
        let toks = Tensor::from_vec(vec![7u32; b], b, &device).unwrap();
        let mut local = m.token_decoder().new_local(b, dtype, &device).unwrap();
        let t = time_per_call(&device, min, || {
            let mut logits = m.token_decoder().begin_block(&ctx, &mut local).unwrap();
            for _ in 1..l {
                logits = m.token_decoder().next_token(&toks, &mut local).unwrap();
            }
            // Sampling reads the logits back, as serving does.
            logits.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        });
        println!("| token-decoder block | {b} | {:.3} | {:.0} | {:.0} |", t * 1e3, b as f64 / t, (b * l) as f64 / t);
    }
}

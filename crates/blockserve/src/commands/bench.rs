//! `blockserve bench`: the serving engine in this process (no gRPC) on random
//! weights of any preset, in the reference's two settings, EOS disabled.
//!
//! Block Transformers run through the engine's continuous batching (block
//! scheduler with chunked prefill + token batcher); vanilla presets through the
//! model's paged driver. Prints one table row per batch: generated tokens/s,
//! time to first token, peak device memory, and the model's FLOP and byte counts
//! over the wall time against the card's measured ceilings.
//!
//! `--setting shared-prefix` is the prefix cache's scenario: `--prefixes`
//! distinct prompt prefixes of `--prefix-len` tokens, each request one of them
//! (in turn) followed by a suffix of its own; `--prefix-cache off,on` runs the
//! same requests without and with the block decoder's prefix cache, and
//! `--prompt-layout reference,aligned` in both prompt layouts
//! (`--suffix-spread 4` gives the requests' own parts every length modulo L).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use blockserve_engine::pipeline::{self, RunStats, Tokens};
use blockserve_engine::{BlockScheduler, SchedulerConfig, TokenBatcher, TokenThread};
use blockserve_model::init::random_weights;
use blockserve_model::loader::build;
use blockserve_model::weights::Weights;
use blockserve_model::{device_memory, presets, BlockTransformer, GenerationRequest, Model, ModelConfig, PromptLayout, SamplingParams, StopCriteria};
use blockserve_worker::model_args::{parse_device, parse_dtype};
use candle_core::{DType, Device, Tensor};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model shape (random weights): block_main_b4_* or vanilla_* presets.
    #[arg(long, env = "BENCH_PRESET", default_value = "block_main_b4_5")]
    preset: String,
    /// Benchmark this model directory (its config and weights, e.g. a trained
    /// model) instead of a preset with random weights.
    #[arg(long, env = "BENCH_MODEL")]
    model: Option<std::path::PathBuf>,
    /// prefill-heavy (prompt 2048, generate 128), decode-heavy (prompt 128,
    /// generate 2048) or shared-prefix (prompt 2112 = a 2048-token prefix
    /// shared with other requests + 64 of its own, generate 128);
    /// --prompt-len/--gen-len override any.
    #[arg(long, env = "BENCH_SETTING", default_value = "decode-heavy")]
    setting: String,
    /// shared-prefix: distinct prefixes (request i takes prefix i mod this).
    #[arg(long, default_value_t = 16)]
    prefixes: usize,
    /// shared-prefix: tokens of each prefix (the rest of the prompt is the
    /// request's own).
    #[arg(long, default_value_t = 2048)]
    prefix_len: usize,
    /// Run each batch with the block decoder's prefix cache off, on, or both
    /// (comma separated, in that order).
    #[arg(long, value_delimiter = ',', default_value = "off")]
    prefix_cache: Vec<String>,
    /// shared-prefix: the k-th request of each prefix (request i is the
    /// (i / prefixes)-th of prefix i mod prefixes) has an own part (k mod
    /// this) tokens shorter than the setting's 64, so that with 4 the prompts
    /// sharing a prefix take every length modulo L = 4.
    #[arg(long, default_value_t = 1)]
    suffix_spread: usize,
    /// How prompts are cut into blocks: reference (left-padded, as the
    /// reference implementation), aligned (blocks from the first token), or
    /// both, comma separated (each runs every --prefix-cache setting).
    #[arg(long, value_delimiter = ',', default_value = "reference")]
    prompt_layout: Vec<PromptLayout>,
    /// Prompt tokens per request (overrides the setting's).
    #[arg(long)]
    prompt_len: Option<usize>,
    /// Tokens generated per request (overrides the setting's).
    #[arg(long)]
    gen_len: Option<usize>,
    /// Batch sizes (requests submitted at once), comma separated; 0 means the
    /// largest batch whose block-level KV cache fits in 80% of the free device
    /// memory (capped at 8192).
    #[arg(long, env = "BENCH_BATCH", value_delimiter = ',', default_value = "1")]
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
    /// Most new blocks (decode rows + prompt chunks) in one block-decoder pass.
    #[arg(long, env = "BLOCKSERVE_TOKEN_BUDGET", default_value_t = 32768)]
    token_budget: usize,
    /// Most rows in one token-decoder batch (0: the whole batch).
    #[arg(long, env = "BLOCKSERVE_TOKEN_BATCH", default_value_t = 0)]
    token_batch: usize,
    /// Run the token decoder on a thread of its own, so that on CUDA its blocks
    /// (on that thread's stream) overlap the block decoder's passes: on, off,
    /// or auto (on for CUDA in bf16/f16 when every layer dimension is a
    /// multiple of 8: the matmuls then go through per-thread cuBLASLt handles;
    /// on CUDA other runs cannot overlap, their matmuls sharing candle's one
    /// cuBLAS handle).
    #[arg(long, env = "BENCH_OVERLAP", default_value = "auto")]
    overlap: String,
    /// Replay the token decoder's greedy blocks from CUDA graphs (CUDA only).
    #[arg(long, env = "BLOCKSERVE_CUDA_GRAPHS", default_value_t = true, action = clap::ArgAction::Set)]
    cuda_graphs: bool,
    /// Block-level KV pool in GiB (0: exactly what the batch needs).
    #[arg(long, env = "BLOCKSERVE_KV_CACHE_GIB", default_value_t = 0.0)]
    kv_cache_gib: f64,
    /// Also measure the card's copy bandwidth and bf16 matmul rate, and report
    /// achieved rates against them.
    #[arg(long)]
    ceilings: bool,
}

/// Measured device ceilings: bytes/s of a large device-to-device copy (read +
/// write) and FLOP/s of a large bf16 matmul.
struct Ceilings {
    bytes_per_s: f64,
    flop_per_s: f64,
}

fn time_it(device: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / reps as f64)
}

fn measure_ceilings(device: &Device) -> Result<Ceilings> {
    let n = 1usize << 29; // 1 GiB of bf16
    let src = Tensor::randn(0f32, 1.0, n / 1024, device)?.to_dtype(DType::BF16)?.repeat(1024)?;
    let copy = time_it(device, 10, || {
        src.copy()?;
        Ok(())
    })?;
    let k = 8192;
    let a = Tensor::randn(0f32, 1.0, (k, k), device)?.to_dtype(DType::BF16)?;
    let b = Tensor::randn(0f32, 1.0, (k, k), device)?.to_dtype(DType::BF16)?;
    let mm = time_it(device, 10, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(Ceilings { bytes_per_s: (4 * n) as f64 / copy, flop_per_s: 2.0 * (k * k * k) as f64 / mm })
}

fn requests(b: usize, prompt_len: usize, gen_len: usize, vocab: u32, seed: u64) -> Vec<GenerationRequest> {
    (0..b)
        .map(|i| GenerationRequest {
            prompt: (0..prompt_len).map(|j| 1 + ((i * 7919 + j * 104729 + seed as usize) as u32 % (vocab - 1))).collect(),
            sampling: SamplingParams::greedy(),
            stop: StopCriteria { max_new_tokens: gen_len, eos_token_id: None, stop_token_ids: vec![] },
            layout: PromptLayout::Reference,
        })
        .collect()
}

/// What the shared-prefix scenario's requests look like.
struct SharedPrefix {
    prefixes: usize,
    prefix_len: usize,
    /// The k-th request of a prefix has an own part `k % spread` ids shorter.
    spread: usize,
}

/// The shared-prefix scenario's requests: request i is prefix `i % prefixes`
/// (`prefix_len` ids) followed by ids of its own, up to `prompt_len` less
/// `(i / prefixes) % spread`.
fn shared_prefix_requests(b: usize, s: &SharedPrefix, prompt_len: usize, gen_len: usize, vocab: u32, seed: u64) -> Vec<GenerationRequest> {
    let id = |a: usize, j: usize| 1 + ((a * 7919 + j * 104729 + seed as usize) as u32 % (vocab - 1));
    (0..b)
        .map(|i| {
            let own = s.prefix_len..prompt_len - (i / s.prefixes) % s.spread;
            GenerationRequest {
                prompt: (0..s.prefix_len).map(|j| id(i % s.prefixes, j)).chain(own.map(|j| id(1_000_003 + i, j))).collect(),
                sampling: SamplingParams::greedy(),
                stop: StopCriteria { max_new_tokens: gen_len, eos_token_id: None, stop_token_ids: vec![] },
                layout: PromptLayout::Reference,
            }
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Parameters of a GPT-NeoX stack's layers (no embeddings).
fn stack_params(c: &blockserve_model::config::GptNeoXConfig) -> f64 {
    let d = c.hidden_size as f64;
    c.num_hidden_layers as f64 * (4.0 * d * d + 2.0 * d * c.intermediate_size as f64)
}

/// FLOPs and device bytes a Block Transformer run must at least spend: every
/// matmul once, every block's attention over its history, weights read once per
/// pass, KV written once and read by every later position.
fn block_work(m: &BlockTransformer, b: usize, prompt: usize, gen: usize, stats: &RunStats, dtype: DType) -> (f64, f64) {
    let c = &m.config;
    let l = c.block_length as f64;
    let e = dtype.size_in_bytes() as f64;
    let (pb, gb) = ((prompt as f64 / l).ceil(), (gen as f64 / l).ceil());
    let (bd, td) = (&c.block_decoder, &c.token_decoder.stack);
    let bd_params = stack_params(bd);
    let td_params = stack_params(td) + (td.hidden_size * td.vocab_size) as f64;
    let blocks = b as f64 * (pb + gb - 1.0);
    // Keys attended: sum over a session's blocks of its position + 1.
    let keys = b as f64 * ((pb + gb - 1.0) * (pb + gb) / 2.0);
    let bd_layers = bd.num_hidden_layers as f64;
    let kv_row = 2.0 * bd.hidden_size as f64 * bd_layers; // elements per block position
    let block_flops = 2.0 * bd_params * blocks + 4.0 * bd.hidden_size as f64 * bd_layers * keys;
    let tokens = b as f64 * gb * l;
    let token_flops = 2.0 * td_params * tokens;
    let flops = block_flops + token_flops;
    let weight_reads = (bd_params * stats.passes as f64 + td_params * (stats.token_rows as f64 / b as f64).max(1.0) * l) * e;
    let kv = (keys + blocks) * kv_row * e;
    (flops, weight_reads + kv)
}

pub fn run(a: Args) -> Result<()> {
    let (p, g) = match a.setting.as_str() {
        "prefill-heavy" => (2048, 128),
        "decode-heavy" => (128, 2048),
        "shared-prefix" => (a.prefix_len + 64, 128),
        other => bail!("--setting {other:?}: expected prefill-heavy, decode-heavy or shared-prefix"),
    };
    let (prompt_len, gen_len) = (a.prompt_len.unwrap_or(p), a.gen_len.unwrap_or(g));
    let shared = a.setting == "shared-prefix";
    if shared && (a.prefixes == 0 || a.suffix_spread == 0 || a.prefix_len + a.suffix_spread > prompt_len + 1) {
        bail!(
            "--setting shared-prefix needs --prefixes > 0, --suffix-spread > 0 and --prefix-len ({}) + --suffix-spread ({}) - 1 <= the prompt length ({prompt_len})",
            a.prefix_len,
            a.suffix_spread
        );
    }
    let shape = SharedPrefix { prefixes: a.prefixes, prefix_len: a.prefix_len, spread: a.suffix_spread };
    let caches: Vec<bool> = a
        .prefix_cache
        .iter()
        .map(|c| match c.as_str() {
            "off" | "false" => Ok(false),
            "on" | "true" => Ok(true),
            other => bail!("--prefix-cache {other:?}: expected off, on or off,on"),
        })
        .collect::<Result<_>>()?;
    let device = parse_device(&a.device)?;
    let dtype = parse_dtype(&a.dtype)?;
    // None: auto, resolved once the model is built.
    let overlap_choice = match a.overlap.as_str() {
        "on" | "true" => Some(true),
        "off" | "false" => Some(false),
        "auto" => None,
        other => bail!("--overlap {other:?}: expected on, off or auto"),
    };
    let (mut config, name) = match &a.model {
        Some(dir) => (blockserve_model::loader::resolve_config(dir, None)?.0, dir.display().to_string()),
        None => (presets::preset(&a.preset)?, a.preset.clone()),
    };
    if let ModelConfig::Vanilla(c) = &mut config {
        // Pythia's table stops at 2048 positions; like the transformers baseline,
        // give random-weight benchmarks room for prompt + generation.
        c.stack.max_position_embeddings = c.stack.max_position_embeddings.max(prompt_len + gen_len);
    }
    let t0 = Instant::now();
    let weights = match &a.model {
        Some(dir) => Weights::from_files(&blockserve_model::weights::safetensors_files(dir)?, dtype, &device)?,
        None => Weights::from_tensors(random_weights(&config, a.seed, DType::F32)?, dtype, &device),
    };
    let model = build(&config, &weights)?;
    drop(weights);
    let source = if a.model.is_some() { "its weights" } else { "random weights" };
    eprintln!("built {name} ({source}) on {:?} {:?} in {:.1} s", device, dtype, t0.elapsed().as_secs_f64());
    let ceilings = if a.ceilings { Some(measure_ceilings(&device)?) } else { None };
    if let Some(c) = &ceilings {
        println!("ceilings: copy {:.0} GB/s (read + write), bf16 matmul {:.0} TFLOP/s", c.bytes_per_s / 1e9, c.flop_per_s / 1e12);
    }
    let vocab = config.vocab_size() as u32;
    println!(
        "| preset | setting | batch | prompt layout | prefix cache | wall s | tokens/s | TTFT mean s | TTFT p50 s | TTFT p99 s | peak GiB | TFLOP/s (% ceil) | GB/s (% ceil) |"
    );
    println!("|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let model = match model {
        Model::Block(m) => Arc::new(m),
        Model::Vanilla(_) => return bench_vanilla(&a, &name, &model, &device, prompt_len, gen_len, vocab),
    };
    // On CUDA the overlap needs every matmul on per-thread cuBLASLt handles:
    // bf16/f16, and layer dimensions that are multiples of 8. Other matmuls
    // share candle's one cuBLAS handle across the two threads.
    let lt_matmuls = matches!(dtype, DType::BF16 | DType::F16) && model.linears_on_lt();
    let overlap = match overlap_choice {
        Some(true) if device.is_cuda() && !lt_matmuls => {
            bail!("--overlap on: on CUDA the overlap needs --dtype bf16 or f16 and layer dimensions that are multiples of 8 (other matmuls share one cuBLAS handle)")
        }
        Some(on) => on,
        None => device.is_cuda() && lt_matmuls,
    };
    for &b in &a.batch {
        let b = if b > 0 {
            b
        } else {
            let per_session = ((prompt_len + gen_len).div_ceil(model.block_length()) + 16) * model.block_decoder().bytes_per_block(dtype);
            let free = device_memory(&device).map_or(1 << 30, |(free, _)| free);
            let fit = (free as f64 * 0.8) as usize / per_session;
            eprintln!("batch 0: {fit} sessions of {per_session} KV bytes fit in 80% of {free} free bytes; running {}", fit.min(8192));
            fit.clamp(1, 8192)
        };
        let kv_bytes = if a.kv_cache_gib > 0.0 {
            (a.kv_cache_gib * (1u64 << 30) as f64) as usize
        } else {
            let blocks = (prompt_len + gen_len).div_ceil(model.block_length()) + 16;
            b * blocks * model.block_decoder().bytes_per_block(dtype)
        };
        for &layout in &a.prompt_layout {
            // The tokens of the layout's first run, to compare the others with.
            let mut first_tokens: Option<Vec<Vec<u32>>> = None;
            for &cache in &caches {
                let mut sched = BlockScheduler::new(
                    model.clone(),
                    SchedulerConfig { prefix_cache: cache, ..SchedulerConfig::for_memory(&model, kv_bytes, a.token_budget) },
                )?;
                let token_batch = if a.token_batch == 0 { b } else { a.token_batch };
                let (mut batcher, thread);
                let mut tokens = if overlap {
                    thread = TokenThread::spawn(model.clone(), token_batch, a.cuda_graphs)?;
                    Tokens::Thread(&thread)
                } else {
                    batcher = TokenBatcher::new(model.clone(), token_batch)?;
                    batcher.set_cuda_graphs(a.cuda_graphs);
                    Tokens::Inline(&mut batcher)
                };
                // Warm-up: module loads, cuBLAS handles and the batch's local passes.
                pipeline::run_with(&mut sched, tokens.reborrow(), &requests(b.min(token_batch), 8, 8, vocab, a.seed), &|| None)?;
                device.synchronize()?;
                let mut reqs = if shared {
                    shared_prefix_requests(b, &shape, prompt_len, gen_len, vocab, a.seed)
                } else {
                    requests(b, prompt_len, gen_len, vocab, a.seed)
                };
                for r in &mut reqs {
                    r.layout = layout;
                }
                let memory = || device_memory(&device).map(|(free, total)| total - free);
                let (outs, stats) = pipeline::run_with(&mut sched, tokens, &reqs, &memory)?;
                device.synchronize()?;
                let generated: usize = outs.iter().map(|o| o.tokens.len()).sum();
                if generated != b * gen_len {
                    bail!("generated {generated} tokens, expected {}", b * gen_len);
                }
                let mut ttft: Vec<f64> = outs.iter().map(|o| o.first_token_s).collect();
                ttft.sort_by(f64::total_cmp);
                let (flops, bytes) = block_work(&model, b, prompt_len, gen_len, &stats, dtype);
                // The work counts assume every prompt is prefilled: not with the cache.
                let rates = match &ceilings {
                    _ if cache => ("-".into(), "-".into()),
                    Some(c) => (
                        format!("{:.1} ({:.0}%)", flops / stats.wall_s / 1e12, 100.0 * flops / stats.wall_s / c.flop_per_s),
                        format!("{:.0} ({:.0}%)", bytes / stats.wall_s / 1e9, 100.0 * bytes / stats.wall_s / c.bytes_per_s),
                    ),
                    None => (format!("{:.1}", flops / stats.wall_s / 1e12), format!("{:.0}", bytes / stats.wall_s / 1e9)),
                };
                println!(
                    "| {} | {prompt_len}/{gen_len} | {b} | {layout} | {} | {:.2} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {} | {} |",
                    name,
                    if cache { "on" } else { "off" },
                    stats.wall_s,
                    generated as f64 / stats.wall_s,
                    ttft.iter().sum::<f64>() / ttft.len() as f64,
                    percentile(&ttft, 0.5),
                    percentile(&ttft, 0.99),
                    stats.peak_memory_bytes.map_or("-".into(), |m| format!("{:.1}", m as f64 / (1u64 << 30) as f64)),
                    rates.0,
                    rates.1,
                );
                let tokens: Vec<Vec<u32>> = outs.iter().map(|o| o.tokens.clone()).collect();
                let same = match &first_tokens {
                    None => {
                        first_tokens = Some(tokens);
                        String::new()
                    }
                    Some(first) => {
                        let differ = first.iter().zip(&tokens).filter(|(a, b)| a != b).count();
                        format!("; tokens: {differ} of {b} requests differ from the first run's")
                    }
                };
                let cached = sched.prefix_cache().1;
                eprintln!(
                "  passes {} (decode rows {}, prompt blocks {}), host time in block passes {:.2} s, in token blocks (incl. device wait{}) {:.2} s; prefix cache: {} of {} pages found, {} evicted{same}",
                stats.passes, stats.decode_rows, stats.prefill_blocks, stats.block_phase_s, if overlap { ", on the token thread" } else { "" }, stats.token_phase_s, cached.hits, cached.looked_up, cached.evictions
            );
            }
        }
    }
    Ok(())
}

/// Vanilla presets: the model's paged driver (all requests together).
fn bench_vanilla(a: &Args, name: &str, model: &Model, device: &Device, prompt_len: usize, gen_len: usize, vocab: u32) -> Result<()> {
    model.generate(&requests(1, 8, 8, vocab, a.seed), false)?;
    device.synchronize()?;
    for &b in &a.batch {
        let reqs = requests(b, prompt_len, gen_len, vocab, a.seed);
        // Time to first token: the same batch asked for one token only.
        let first: Vec<GenerationRequest> =
            reqs.iter().map(|r| GenerationRequest { stop: StopCriteria { max_new_tokens: 1, ..r.stop.clone() }, ..r.clone() }).collect();
        let t = Instant::now();
        model.generate(&first, false)?;
        device.synchronize()?;
        let ttft = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let out = model.generate(&reqs, false)?;
        device.synchronize()?;
        let wall = t.elapsed().as_secs_f64();
        let generated: usize = out.iter().map(|o| o.tokens.len()).sum();
        let peak = device_memory(device).map_or("-".into(), |(f, t)| format!("{:.1}", (t - f) as f64 / (1u64 << 30) as f64));
        println!(
            "| {name} | {prompt_len}/{gen_len} | {b} | {wall:.2} | {:.0} | {ttft:.3} (whole batch) | - | - | {peak} (end) | - | - |",
            generated as f64 / wall
        );
    }
    Ok(())
}

//! Where a decode step's device time goes: each piece of one block of
//! `block_main_b4_85`-shaped work timed alone (synchronised, median of runs),
//! on random weights and inputs. Prints a table; asserts nothing.
//!
//!   cargo run --release --features cuda --example step_profile -- cuda bf16 2048 288
//!
//! `PROFILE=block|prefill|token` brackets one block-decoder step, one prefill
//! pass or one whole token-decoder block for `ncu --profile-from-start off`.

use std::time::Instant;

use blockserve_model::init::random_weights;
use blockserve_model::loader::build;
use blockserve_model::paged::ops::{attend_paged, HeadShape};
use blockserve_model::weights::Weights;
use blockserve_model::{presets, Model, SeqKv};
use candle_core::{DType, Device, Tensor, D};

fn median_ms(device: &Device, mut f: impl FnMut()) -> f64 {
    f();
    device.synchronize().unwrap();
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            f();
            device.synchronize().unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[3]
}

/// Bracket one run of `f` for `ncu --profile-from-start off` (CUDA builds).
fn profiled(device: &Device, f: impl FnOnce()) {
    device.synchronize().unwrap();
    #[cfg(feature = "cuda")]
    unsafe {
        candle_core::cuda_backend::cudarc::driver::sys::cuProfilerStart();
    }
    f();
    device.synchronize().unwrap();
    #[cfg(feature = "cuda")]
    unsafe {
        candle_core::cuda_backend::cudarc::driver::sys::cuProfilerStop();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device = match args.get(1).map(String::as_str) {
        Some("cuda") => blockserve_model::cuda_device(0).unwrap(),
        _ => Device::Cpu,
    };
    let dtype = if args.get(2).map(String::as_str) == Some("f32") { DType::F32 } else { DType::BF16 };
    let b: usize = args.get(3).map_or(1024, |s| s.parse().unwrap());
    let keys: usize = args.get(4).map_or(288, |s| s.parse().unwrap());
    let preset = args.get(5).cloned().unwrap_or_else(|| "block_main_b4_85".into());
    let config = presets::preset(&preset).unwrap();
    let weights = Weights::from_tensors(random_weights(&config, 0, DType::F32).unwrap(), dtype, &device);
    let Model::Block(m) = build(&config, &weights).unwrap() else { panic!("block preset expected") };
    let c = m.config.block_decoder.clone();
    let (d, v) = (c.hidden_size, c.vocab_size);
    let rnd = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &device).unwrap().to_dtype(dtype).unwrap();
    println!("{preset}, {dtype:?}, batch {b}, {keys} cached blocks per row");
    println!("| piece | ms |");
    println!("|---|---:|");

    // Block decoder: fill every row with `keys` blocks, then time one step.
    let mut pool = m.block_decoder().new_pool(b * (keys + 16).div_ceil(16), 16, dtype, &device).unwrap();
    let mut seqs: Vec<SeqKv> = (0..b).map(|_| SeqKv::default()).collect();
    for _ in 0..keys.div_ceil(512) {
        let n = 512.min(keys - seqs[0].len());
        let mut refs: Vec<&mut SeqKv> = seqs.iter_mut().collect();
        let pass = pool.plan(&mut refs, &vec![n; b], &device).unwrap();
        m.block_decoder().forward_paged(&rnd(&[b * n, d]), &pool, &pass).unwrap();
    }
    let x = rnd(&[b, d]);
    let step = |pool: &mut blockserve_model::KvPool, seqs: &mut Vec<SeqKv>| {
        seqs.iter_mut().for_each(|s| s.truncate(keys));
        let mut refs: Vec<&mut SeqKv> = seqs.iter_mut().collect();
        pool.plan(&mut refs, &vec![1; b], &device).unwrap()
    };
    let t = median_ms(&device, || {
        let pass = step(&mut pool, &mut seqs);
        m.block_decoder().forward_paged(&x, &pool, &pass).unwrap();
    });
    println!("| block-decoder step (all {} layers) | {t:.3} |", c.num_hidden_layers);
    if std::env::var("PROFILE").as_deref() == Ok("block") {
        let pass = step(&mut pool, &mut seqs);
        profiled(&device, || {
            m.block_decoder().forward_paged(&x, &pool, &pass).unwrap();
        });
    }
    let shape = HeadShape { heads: c.num_attention_heads, head_dim: c.head_dim(), rot: c.rotary_dim(), rope_base: c.rotary_emb_base as f32 };
    let qkv = rnd(&[b, 3 * d]);
    let pass = step(&mut pool, &mut seqs);
    let t = median_ms(&device, || {
        attend_paged(shape, &qkv, pool.layer(0), &pass).unwrap();
    });
    let bytes = (b * (keys + 1) * 2 * d * dtype.size_in_bytes()) as f64;
    println!("| paged attention, one layer ({:.0} GB/s of KV) | {t:.3} |", bytes / t / 1e6);
    let w = rnd(&[3 * d, d]);
    let t = median_ms(&device, || {
        x.matmul(&w.t().unwrap()).unwrap();
    });
    println!("| qkv matmul [{b},{d}]x[{d},{}] | {t:.3} |", 3 * d);
    let w1 = rnd(&[4 * d, d]);
    let w2 = rnd(&[d, 4 * d]);
    let t = median_ms(&device, || {
        let h = x.matmul(&w1.t().unwrap()).unwrap().gelu_erf().unwrap();
        h.matmul(&w2.t().unwrap()).unwrap();
    });
    println!("| MLP (up, gelu, down) | {t:.3} |");
    let head = rnd(&[v, d]);
    let t = median_ms(&device, || {
        x.matmul(&head.t().unwrap()).unwrap();
    });
    println!("| LM head matmul [{b},{d}]x[{d},{v}] | {t:.3} |");
    let logits = x.matmul(&head.t().unwrap()).unwrap();
    let t = median_ms(&device, || {
        logits.argmax(D::Minus1).unwrap();
    });
    println!("| candle argmax over [{b},{v}] | {t:.3} |");
    let t = median_ms(&device, || {
        blockserve_model::argmax::argmax_rows(&logits).unwrap();
    });
    println!("| argmax_rows kernel over [{b},{v}] | {t:.3} |");
    let ln = candle_nn::LayerNorm::new(rnd(&[d]), rnd(&[d]), 1e-5);
    let t = median_ms(&device, || {
        candle_core::Module::forward(&ln, &x).unwrap();
    });
    println!("| layer norm [{b},{d}] | {t:.3} |");
    let t = median_ms(&device, || {
        ((&x + &x).unwrap() + &x).unwrap();
    });
    println!("| two residual adds | {t:.3} |");

    // Prefill: a pass of fresh prompts, as chunked prefill packs them.
    let (sessions, blocks): (usize, usize) = (args.get(6).map_or(32, |s| s.parse().unwrap()), args.get(7).map_or(512, |s| s.parse().unwrap()));
    let mut ppool = m.block_decoder().new_pool(sessions * blocks.div_ceil(16), 16, dtype, &device).unwrap();
    let px = rnd(&[sessions * blocks, d]);
    let pqkv = rnd(&[sessions * blocks, 3 * d]);
    let plan = |pool: &mut blockserve_model::KvPool| {
        let mut seqs: Vec<SeqKv> = (0..sessions).map(|_| SeqKv::default()).collect();
        let mut refs: Vec<&mut SeqKv> = seqs.iter_mut().collect();
        let pass = pool.plan(&mut refs, &vec![blocks; sessions], &device).unwrap();
        drop(refs);
        seqs.iter_mut().for_each(|s| pool.release(s));
        pass
    };
    let t = median_ms(&device, || {
        let pass = plan(&mut ppool);
        m.block_decoder().forward_paged(&px, &ppool, &pass).unwrap();
    });
    println!("| prefill pass, {sessions} prompts x {blocks} blocks | {t:.3} |");
    if std::env::var("PROFILE").as_deref() == Ok("prefill") {
        let pass = plan(&mut ppool);
        profiled(&device, || {
            m.block_decoder().forward_paged(&px, &ppool, &pass).unwrap();
        });
    }
    let pass = plan(&mut ppool);
    let t = median_ms(&device, || {
        attend_paged(shape, &pqkv, ppool.layer(0), &pass).unwrap();
    });
    println!("| prefill paged attention, one layer | {t:.3} |");

    // Token decoder: one whole block.
    let ctx = rnd(&[b, d]);
    let mut local = m.token_decoder().new_local(b, dtype, &device).unwrap();
    let l = m.block_length();
    let mut block = || {
        let mut ids = vec![blockserve_model::argmax::argmax_rows(&m.token_decoder().begin_block(&ctx, &mut local).unwrap()).unwrap()];
        for _ in 1..l {
            let next = m.token_decoder().next_token(ids.last().unwrap(), &mut local).unwrap();
            ids.push(blockserve_model::argmax::argmax_rows(&next).unwrap());
        }
        Tensor::stack(&ids, 1).unwrap().to_vec2::<u32>().unwrap();
    };
    let t = median_ms(&device, &mut block);
    println!("| token-decoder block ({l} steps, argmax on device, one read) | {t:.3} |");
    if std::env::var("PROFILE").as_deref() == Ok("token") {
        profiled(&device, &mut block);
    }
    let ids = Tensor::zeros(b, DType::U32, &device).unwrap();
    m.token_decoder().begin_block(&ctx, &mut local).unwrap();
    let t = median_ms(&device, || {
        m.token_decoder().begin_block(&ctx, &mut local).unwrap();
        m.token_decoder().next_token(&ids, &mut local).unwrap();
    });
    println!("| token-decoder prefix pass + one step (no argmax) | {t:.3} |");
}

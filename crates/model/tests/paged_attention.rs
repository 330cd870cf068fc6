//! The paged kernels (key/value write + attention) against a dense reference
//! written without pages: random queries, keys and values; rows of different
//! lengths; a first pass of prompt chunks and a second pass that continues each
//! row by one token or a chunk. On `BLOCKSERVE_TEST_DEVICE=cuda` this checks the
//! CUDA kernels (the CUDA-core one, and the tensor-core one for bf16/f16 prefill
//! groups at head_dim 64/128 over 16-position pages); otherwise the CPU twins.

mod common;

use blockserve_model::paged::ops::{attend_paged, HeadShape};
use blockserve_model::paged::PoolShape;
use blockserve_model::{KvPool, SeqKv};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

/// Rotate-half over the first `rot` channels for position `pos`, as the model does.
fn rope(x: &[f32], rot: usize, base: f32, pos: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    let half = rot / 2;
    for i in 0..half {
        let a = pos as f32 * (1.0 / base.powf((2 * i) as f32 / rot as f32));
        let (s, c) = (a.sin(), a.cos());
        out[i] = x[i] * c - x[i + half] * s;
        out[i + half] = x[i + half] * c + x[i] * s;
    }
    out
}

/// Every key of a row rotated to its position: `[len * heads][hd]`.
fn rotated_keys(row: &[f32], s: &HeadShape) -> Vec<Vec<f32>> {
    let (h, hd) = (s.heads, s.head_dim);
    (0..row.len() / (3 * h * hd) * h).map(|th| rope(&row[(th * 3 + 1) * hd..][..hd], s.rot, s.rope_base, th / h)).collect()
}

/// Dense causal attention of token `t` of a row over tokens 0..=t of the same
/// row, from the row's `[len, heads, 3, hd]` projections and its rotated keys.
fn reference(row: &[f32], keys: &[Vec<f32>], t: usize, s: &HeadShape) -> Vec<f32> {
    let (h, hd) = (s.heads, s.head_dim);
    let at = |tok: usize, head: usize, part: usize| &row[((tok * h + head) * 3 + part) * hd..][..hd];
    let mut out = vec![0f32; h * hd];
    for head in 0..h {
        let q = rope(at(t, head, 0), s.rot, s.rope_base, t);
        let scores: Vec<f32> = (0..=t).map(|k| q.iter().zip(&keys[k * h + head]).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()).collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let w: Vec<f32> = scores.iter().map(|x| (x - max).exp()).collect();
        let total: f32 = w.iter().sum();
        for (k, wk) in w.iter().enumerate() {
            for (o, v) in out[head * hd..(head + 1) * hd].iter_mut().zip(at(k, head, 2)) {
                *o += wk / total * v;
            }
        }
    }
    out
}

fn check(heads: usize, head_dim: usize, page_size: usize, dtype: DType, tol: f32) {
    // Row lengths and the split into two passes (first chunk, then the rest).
    check_rows(heads, head_dim, page_size, dtype, tol, &[5, 40, 17, 4, 33], &[3, 33, 16, 1, 1]);
}

/// Prompts longer than one query group (64 tokens) and than one key tile, in
/// chunks that start and end inside groups and pages, next to a one-token row:
/// the tensor-core kernel's shared key tiles, its causal mask inside a tile and
/// its zero-filled positions past a row's end.
fn check_long(heads: usize, head_dim: usize, page_size: usize, dtype: DType, tol: f32) {
    check_long_rot(heads, head_dim, page_size, dtype, tol, head_dim / 4);
}

/// check_long with `rot` rotated channels: the tensor-core kernel rotates its
/// queries 8 channels at a time when rot / 2 is a multiple of 8, element by
/// element otherwise.
fn check_long_rot(heads: usize, head_dim: usize, page_size: usize, dtype: DType, tol: f32, rot: usize) {
    let shape = HeadShape { heads, head_dim, rot, rope_base: 10000.0 };
    check_rows_shape(shape, page_size, dtype, tol, &[200, 151, 2, 71, 131], &[130, 64, 1, 70, 3]);
}

/// Decode passes over long rows: every row adds exactly one token.
fn check_decode(heads: usize, head_dim: usize, page_size: usize, dtype: DType, tol: f32) {
    check_rows(heads, head_dim, page_size, dtype, tol, &[40, 100, 17, 70, 9], &[39, 99, 16, 69, 8]);
    check_rows(heads, head_dim, page_size, dtype, tol, &[130, 90, 9], &[129, 89, 8]);
}

/// A decode pass of 600 rows fills a wave of the CUDA build's CTA-per-token
/// kernel on an H200 (528 CTAs at 12 heads of 64, 15 of 64 or 8 of 128), which
/// smaller batches do not take. At 15 heads of 64 a lane's V pieces were
/// copied in by other lanes (120 pieces a slot's K, not a multiple of 32).
fn check_decode_full_wave(heads: usize, head_dim: usize, page_size: usize, dtype: DType, tol: f32) {
    let totals: Vec<usize> = (0..600).map(|r| 9 + r % 8).collect();
    let prior: Vec<usize> = totals.iter().map(|t| t - 1).collect();
    check_rows(heads, head_dim, page_size, dtype, tol, &totals, &prior);
}

/// Rows of at most eight positions, as the token decoder's local cache holds
/// (the CUDA build's warp-per-token kernel): a two-position prefix, then steps.
fn check_short(heads: usize, head_dim: usize, page_size: usize, dtype: DType, tol: f32) {
    check_rows(heads, head_dim, page_size, dtype, tol, &[5, 2, 8, 1, 3], &[2, 2, 7, 1, 2]);
    // Then one new token in every row: the CUDA kernel also writes that token's
    // key and value (no separate write launch).
    check_rows(heads, head_dim, page_size, dtype, tol, &[5, 3, 8, 2, 4], &[4, 2, 7, 1, 3]);
}

fn check_rows(heads: usize, head_dim: usize, page_size: usize, dtype: DType, tol: f32, lens: &[usize], first: &[usize]) {
    check_rows_shape(HeadShape { heads, head_dim, rot: head_dim / 4, rope_base: 10000.0 }, page_size, dtype, tol, lens, first);
}

fn check_rows_shape(shape: HeadShape, page_size: usize, dtype: DType, tol: f32, lens: &[usize], first: &[usize]) {
    let device = common::device();
    let (heads, head_dim) = (shape.heads, shape.head_dim);
    let mut rng = rand::rngs::StdRng::seed_from_u64((heads * 1000 + head_dim * 10 + page_size + lens[0]) as u64);
    let width = heads * 3 * head_dim;
    let rows: Vec<Vec<f32>> = lens.iter().map(|&n| (0..n * width).map(|_| rng.gen_range(-2.0f32..2.0)).collect()).collect();
    // Round the inputs to the run dtype so the reference sees what the kernel sees.
    let rounded: Vec<Vec<f32>> = rows
        .iter()
        .map(|r| Tensor::new(r.as_slice(), &candle_core::Device::Cpu).unwrap().to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap())
        .collect();
    let keys: Vec<Vec<Vec<f32>>> = rounded.iter().map(|r| rotated_keys(r, &shape)).collect();
    let pool_shape = PoolShape { layers: 1, heads, head_dim, max_positions: 256 };
    let pages: usize = lens.iter().map(|n| n.div_ceil(page_size)).sum();
    let mut pool = KvPool::with_shape(pool_shape, pages + 4, page_size, dtype, &device).unwrap();
    let mut seqs: Vec<SeqKv> = lens.iter().map(|_| SeqKv::default()).collect();
    for (pass_no, counts) in [first.to_vec(), lens.iter().zip(first).map(|(l, f)| l - f).collect::<Vec<_>>()].into_iter().enumerate() {
        let starts: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let mut refs: Vec<&mut SeqKv> = seqs.iter_mut().collect();
        let pass = pool.plan(&mut refs, &counts, &device).unwrap();
        let qkv: Vec<f32> = rounded.iter().zip(&starts).zip(&counts).flat_map(|((r, &s), &c)| r[s * width..(s + c) * width].to_vec()).collect();
        let n = qkv.len() / width;
        let qkv = Tensor::from_vec(qkv, (n, width), &device).unwrap().to_dtype(dtype).unwrap();
        let out = attend_paged(shape, &qkv, pool.layer(0), &pass).unwrap();
        let out: Vec<Vec<f32>> = out.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        let mut i = 0;
        for (r, (&s, &c)) in starts.iter().zip(&counts).enumerate() {
            for t in s..s + c {
                let want = reference(&rounded[r], &keys[r], t, &shape);
                let err: f32 = out[i].iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt();
                let norm: f32 = want.iter().map(|b| b * b).sum::<f32>().sqrt();
                assert!(
                    err <= tol * norm && err.is_finite(),
                    "{dtype:?} heads {heads} head_dim {head_dim} page {page_size}, pass {pass_no}, row {r}, token {t}: relative error {}",
                    err / norm
                );
                i += 1;
            }
        }
    }
}

#[test]
fn paged_attention_matches_dense_reference_f32() {
    check(4, 16, 16, DType::F32, 1e-5);
    check(12, 64, 16, DType::F32, 1e-5);
    check(2, 128, 4, DType::F32, 1e-5);
}

#[test]
fn short_rows_match_dense_reference() {
    check_short(12, 64, 5, DType::F32, 1e-5);
    check_short(4, 32, 16, DType::F32, 1e-5);
    check_short(2, 128, 4, DType::F32, 1e-5);
    check_short(12, 64, 5, DType::BF16, 2e-2);
    check_short(2, 128, 8, DType::BF16, 2e-2);
}

#[test]
fn long_prompts_match_dense_reference() {
    check_long(4, 64, 16, DType::F32, 1e-5);
    check_long(4, 64, 16, DType::BF16, 2e-2);
    check_long(2, 128, 16, DType::BF16, 2e-2);
    check_long(2, 128, 16, DType::F16, 1e-2);
    check_long(2, 64, 8, DType::BF16, 2e-2);
    // Rotary widths other than a quarter of the head: 12 channels (pairs 6
    // apart, element by element), the whole head (pairs 32 apart).
    check_long_rot(4, 64, 16, DType::BF16, 2e-2, 12);
    check_long_rot(4, 64, 16, DType::BF16, 2e-2, 64);
    check_long_rot(2, 128, 16, DType::F16, 1e-2, 128);
    check_long_rot(2, 64, 16, DType::F32, 1e-5, 12);
}

#[test]
fn decode_passes_over_long_rows_match_dense_reference() {
    check_decode(12, 64, 16, DType::F32, 1e-5);
    check_decode(12, 64, 16, DType::BF16, 2e-2);
    check_decode_full_wave(12, 64, 16, DType::BF16, 2e-2);
    check_decode_full_wave(8, 128, 16, DType::F16, 1e-2);
    check_decode_full_wave(15, 64, 8, DType::BF16, 2e-2);
    check_decode(2, 128, 16, DType::BF16, 2e-2);
    check_decode(8, 128, 16, DType::F16, 1e-2);
    check_decode(5, 64, 8, DType::BF16, 2e-2);
}

#[test]
fn paged_attention_matches_dense_reference_bf16() {
    check(4, 16, 16, DType::BF16, 2e-2);
    check(12, 64, 16, DType::BF16, 2e-2);
    check(2, 128, 16, DType::BF16, 2e-2);
    check(2, 128, 4, DType::BF16, 2e-2);
}

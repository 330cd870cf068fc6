//! CUDA graphs replay exactly what op-by-op launches compute: the greedy blocks
//! of the tiny Block Transformer fixture, decoded by a batcher that replays
//! graphs and by one that launches every kernel, agree token for token at batch
//! sizes that hit several buckets, over repeated replays with new contexts. A
//! graph runs its bucket's row count, so the launches get the same count
//! (padding rows of their own): cuBLAS may pick another algorithm for another
//! shape, which would change the rounding, not the graph's correctness. Run by `bench/device-bench.sh` with BLOCKSERVE_TEST_DEVICE=cuda;
//! it needs a GPU, so it is compiled only with the `cuda` feature.
#![cfg(feature = "cuda")]

use std::path::PathBuf;
use std::sync::Arc;

use blockserve_engine::token_batcher::bucket;
use blockserve_engine::{BlockJob, HostContexts, TokenBatcher};
use blockserve_model::loader::load_model;
use blockserve_model::{BlockTransformer, Model};
use candle_core::{DType, Tensor};

fn fixture() -> PathBuf {
    let root =
        std::env::var_os("BLOCKSERVE_FIXTURES").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures"));
    root.join("official-tiny-b4")
}

/// The fixture model on the first CUDA device, in `dtype`.
fn fixture_model(dtype: DType) -> (candle_core::Device, Arc<BlockTransformer>) {
    let device = blockserve_model::cuda_device(0).expect("a CUDA device");
    let Model::Block(m) = load_model(&fixture(), None, dtype, &device).expect("fixture loads") else { panic!("a block model") };
    (device, Arc::new(m))
}

fn graphs_match_launches(dtype: DType) {
    let (device, m) = fixture_model(dtype);
    let d = m.config.block_decoder.hidden_size;
    let mut graphs = TokenBatcher::new(m.clone(), 1024).unwrap();
    let mut launches = TokenBatcher::new(m.clone(), 1024).unwrap();
    launches.set_cuda_graphs(false);
    for (round, b) in [3usize, 37, 600, 3, 1024, 600].into_iter().enumerate() {
        // Contexts of the scale the block decoder produces (after its final norm).
        let ctx = Tensor::randn(0f32, 1.0, (b, d), &device).unwrap().to_dtype(dtype).unwrap();
        let jobs = vec![BlockJob::greedy(0); b];
        let rows = bucket(b, 1024);
        let padded = if rows > b {
            let padding = Tensor::randn(0f32, 1.0, (rows - b, d), &device).unwrap().to_dtype(dtype).unwrap();
            Tensor::cat(&[&ctx, &padding], 0).unwrap()
        } else {
            ctx.clone()
        };
        let mut want = launches.decode(&padded, &vec![BlockJob::greedy(0); rows]).unwrap();
        want.truncate(b);
        let got = graphs.decode(&ctx, &jobs).unwrap();
        assert_eq!(got.len(), b);
        let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
        assert_eq!(differ, 0, "round {round}, batch {b}: {differ} rows differ, e.g. {:?} vs {:?}", got[0], want[0]);
    }
}

#[test]
fn graphs_match_launches_f32() {
    graphs_match_launches(DType::F32);
}

#[test]
fn graphs_match_launches_bf16() {
    graphs_match_launches(DType::BF16);
}

/// Rounds launched ahead (the token decoder's pipelined rounds: two lanes,
/// each with its own graphs, local cache and page-locked buffers) give the
/// blocks that a synchronous decode of the same contexts gives, whether a
/// round is finished before the next launch or after it; a third round
/// before the first is finished is refused; a round's done signal can be
/// waited on from another thread.
fn rounds_launched_ahead_match(dtype: DType) {
    let (device, m) = fixture_model(dtype);
    let d = m.config.block_decoder.hidden_size;
    let mut sync = TokenBatcher::new(m.clone(), 1024).unwrap();
    let mut ahead = TokenBatcher::new(m.clone(), 1024).unwrap();
    let contexts: Vec<Tensor> =
        [600usize, 37, 1024, 600, 3].iter().map(|&b| Tensor::randn(0f32, 1.0, (b, d), &device).unwrap().to_dtype(dtype).unwrap()).collect();
    let want: Vec<Vec<Vec<u32>>> = contexts.iter().map(|c| sync.decode(c, &vec![BlockJob::greedy(0); c.dim(0).unwrap()]).unwrap()).collect();
    let bytes: Vec<Vec<u8>> = contexts.iter().map(|c| blockserve_model::host_bytes(c).unwrap()).collect();
    let launch = |b: &mut TokenBatcher, i: usize| b.launch(HostContexts { bytes: &bytes[i], dtype, rows: contexts[i].dim(0).unwrap() }).unwrap();
    // 0 alone; then 1 and 2 in flight together, 3 launched behind 2 once 1 is
    // finished, and 4 behind 3.
    let r0 = launch(&mut ahead, 0);
    assert_eq!(ahead.finish(r0).unwrap(), want[0], "round 0");
    let r1 = launch(&mut ahead, 1);
    let r2 = launch(&mut ahead, 2);
    let third = ahead.launch(HostContexts { bytes: &bytes[3], dtype, rows: 600 });
    assert_eq!(third.err().map(|e| e.to_string()), Some("invalid input: a third round launched before the first finished".to_string()));
    let signal = r1.done();
    std::thread::spawn(move || signal.wait().unwrap()).join().unwrap();
    assert_eq!(ahead.finish(r1).unwrap(), want[1], "round 1");
    let r3 = launch(&mut ahead, 3);
    assert_eq!(ahead.finish(r2).unwrap(), want[2], "round 2");
    let r4 = launch(&mut ahead, 4);
    assert_eq!(ahead.finish(r3).unwrap(), want[3], "round 3");
    assert_eq!(ahead.finish(r4).unwrap(), want[4], "round 4");
}

#[test]
fn rounds_launched_ahead_match_f32() {
    rounds_launched_ahead_match(DType::F32);
}

#[test]
fn rounds_launched_ahead_match_bf16() {
    rounds_launched_ahead_match(DType::BF16);
}

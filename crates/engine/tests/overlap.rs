//! The in-process pipeline with the token decoder on its own thread (the two
//! tiers overlapping), on the CPU with the bundled model (`models/code-block`,
//! f32): the same tokens as the inline pipeline and as the model's own
//! driver, greedy and seeded, for requests of different prompt and output
//! lengths prefilled in small chunks; afterwards no KV page is held.

use std::path::PathBuf;
use std::sync::Arc;

use blockserve_engine::pipeline::{self, Tokens};
use blockserve_engine::{BlockScheduler, SchedulerConfig, TokenBatcher, TokenThread};
use blockserve_model::loader::load_model;
use blockserve_model::{BlockTransformer, GenerationRequest, Model, PromptLayout, SamplingParams, StopCriteria};
use candle_core::{DType, Device};

/// A bundled model: `code-block` (the trained one) or `demo`.
fn load(name: &str) -> Arc<BlockTransformer> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models").join(name);
    let Model::Block(m) = load_model(&dir, None, DType::F32, &Device::Cpu).expect("the bundled model loads") else { panic!("a block model") };
    Arc::new(m)
}

fn model() -> Arc<BlockTransformer> {
    load("code-block")
}

/// 24 requests: prompts of 5 to 40 ids (1..=`ids`), 3 to 25 new tokens, every
/// third seeded (temperature 0.8, top-k 20), in the aligned layout.
fn requests(ids: u32) -> Vec<GenerationRequest> {
    (0..24u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..5 + (i * 7) % 36).map(|j| 1 + (i * 7919 + j * 104_729) % ids).collect();
            let sampling =
                if i % 3 == 0 { SamplingParams { temperature: 0.8, top_k: 20, seed: i as u64, ..Default::default() } } else { SamplingParams::greedy() };
            let stop = StopCriteria { max_new_tokens: 3 + (i as usize * 5) % 23, eos_token_id: None, stop_token_ids: vec![] };
            GenerationRequest { prompt, sampling, stop, layout: PromptLayout::Aligned }
        })
        .collect()
}

fn scheduler(m: &Arc<BlockTransformer>) -> BlockScheduler {
    // 16 blocks a pass: the prompts take several passes, interleaved with decode rows.
    BlockScheduler::new(m.clone(), SchedulerConfig { kv_pages: 64, page_size: 16, token_budget: 16, prefix_cache: false }).unwrap()
}

#[test]
fn the_token_thread_gives_the_inline_pipelines_tokens() {
    let m = model();
    let reqs = requests(8191);
    let mut batcher = TokenBatcher::new(m.clone(), 32).unwrap();
    let (inline, _) = pipeline::run(&mut scheduler(&m), &mut batcher, &reqs, &|| None).unwrap();
    let inline: Vec<Vec<u32>> = inline.into_iter().map(|o| o.tokens).collect();
    for (i, (t, r)) in inline.iter().zip(&reqs).enumerate() {
        assert_eq!(t.len(), r.stop.max_new_tokens, "request {i}");
    }

    let thread = TokenThread::spawn(m.clone(), 32, true).unwrap();
    let mut sched = scheduler(&m);
    // Twice on the same thread: it serves run after run.
    for run in 0..2 {
        let (outs, stats) = pipeline::run_with(&mut sched, Tokens::Thread(&thread), &reqs, &|| None).unwrap();
        let got: Vec<Vec<u32>> = outs.into_iter().map(|o| o.tokens).collect();
        for (i, (g, w)) in got.iter().zip(&inline).enumerate() {
            assert_eq!(g, w, "run {run}, request {i}");
        }
        assert_eq!(stats.token_rows, stats.decode_rows + reqs.len(), "every context decoded once");
        assert_eq!(sched.kv_pages(), (0, 64, 0), "no page held after the run");
    }

    // The model's own block-synchronous driver agrees.
    let driver: Vec<Vec<u32>> = Model::Block(Arc::into_inner(model()).unwrap()).generate(&reqs, false).unwrap().into_iter().map(|o| o.tokens).collect();
    assert_eq!(driver, inline);
}

/// A run whose token decoder fails (the demo model's, whose contexts are
/// narrower than the bundled model's) ends with the error instead of hanging,
/// with two groups in flight when it came; the thread's next run, against a
/// matching scheduler, receives none of the failed run's groups and gives the
/// inline pipeline's tokens.
#[test]
fn a_failed_run_leaves_the_token_thread_clean() {
    let demo = load("demo");
    let thread = TokenThread::spawn(demo.clone(), 32, true).unwrap();
    let reqs = requests(256);
    let failed = pipeline::run_with(&mut scheduler(&model()), Tokens::Thread(&thread), &reqs, &|| None);
    assert!(failed.is_err(), "contexts of 256 channels cannot feed a token decoder of 128");

    let mut batcher = TokenBatcher::new(demo.clone(), 32).unwrap();
    let (want, _) = pipeline::run(&mut scheduler(&demo), &mut batcher, &reqs, &|| None).unwrap();
    let (got, _) = pipeline::run_with(&mut scheduler(&demo), Tokens::Thread(&thread), &reqs, &|| None).unwrap();
    let tokens = |outs: Vec<pipeline::Outcome>| outs.into_iter().map(|o| o.tokens).collect::<Vec<_>>();
    assert_eq!(tokens(got), tokens(want));
}

/// Which models may overlap on CUDA: the bundled model's layer dimensions
/// (256, 1024, 8192) are all multiples of 8, the demo model's 257-token head
/// is not, so its matmul would use candle's shared cuBLAS handle.
#[test]
fn only_models_whose_matmuls_all_take_cublaslt_may_overlap_on_cuda() {
    assert!(model().linears_on_lt());
    assert!(!load("demo").linears_on_lt());
}

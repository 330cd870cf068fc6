//! A synchronous driver over the incremental API: runs a set of sessions together,
//! block-synchronously for the Block Transformer (one block-decoder step, then L
//! token-decoder steps, for every live session at once) and token-synchronously for
//! the vanilla LM. It is what the `generate` command and the model tests use; the
//! serving engine schedules the same calls itself.

use candle_core::Tensor;

use crate::block_transformer::{check_ids, BlockTransformer};
use crate::causal_lm::CausalLm;
use crate::error::{input_err, Result};
use crate::paged::SeqKv;
use crate::prompt::{PaddedPrompt, PromptLayout};
use crate::sampling::{read_rows, sample, Row, SamplingParams};
use crate::Model;

pub use blockserve_config::request::{FinishReason, StopCriteria};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopCriteria,
    /// How the prompt is cut into blocks (Block Transformers only).
    pub layout: PromptLayout,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationOutput {
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Raw logits of every generated token, when asked for.
    pub logits: Vec<Vec<f32>>,
}

/// One session's progress inside a driver.
struct Session<'r> {
    req: &'r GenerationRequest,
    /// Prompt followed by generated tokens (the repetition-penalty history).
    history: Vec<u32>,
    out: GenerationOutput,
    done: bool,
    kv: SeqKv,
    /// The forced start of the next block (the aligned layout's prompt tail).
    forced: Vec<u32>,
}

impl<'r> Session<'r> {
    fn new(req: &'r GenerationRequest) -> Self {
        Self {
            req,
            history: req.prompt.clone(),
            out: GenerationOutput { tokens: vec![], finish_reason: FinishReason::Length, logits: vec![] },
            done: false,
            kv: SeqKv::default(),
            forced: vec![],
        }
    }

    /// Token `k` of the session's current block: forced, or chosen from `row`.
    fn next(&mut self, k: usize, row: Row, record: bool) -> u32 {
        match self.forced.get(k) {
            Some(&t) => t,
            None => self.push(row, record),
        }
    }

    /// Take the next token (from the device's argmax, or by sampling the row on
    /// the host), record it, and settle the stop condition.
    fn push(&mut self, row: Row, record: bool) -> u32 {
        let n = self.out.tokens.len() as u64;
        let (tok, logits) = match row {
            Row::Token(t) => (t, None),
            Row::Logits(l) => (sample(&self.req.sampling, &l, &self.history, n), Some(l)),
        };
        if !self.done {
            self.history.push(tok);
            self.out.tokens.push(tok);
            if record {
                self.out.logits.push(logits.expect("recording reads every row back"));
            }
            if let Some(r) = self.req.stop.check(&self.out.tokens) {
                self.out.finish_reason = r;
                self.done = true;
            }
        }
        tok
    }

    /// Whether this session needs its logits row on the host.
    fn on_host(&self, record: bool) -> bool {
        record || !self.req.sampling.is_plain_greedy()
    }
}

fn validate(req: &GenerationRequest, vocab: usize, max_tokens: usize, what: &str) -> Result<()> {
    req.sampling.validate()?;
    check_ids(&req.prompt, vocab, "prompt")?;
    check_ids(&req.stop.stop_token_ids, vocab, "stop_token_ids")?;
    if req.prompt.len() + req.stop.max_new_tokens > max_tokens {
        return input_err(format!(
            "prompt ({} tokens) + max_new_tokens ({}) exceeds the {what} of {max_tokens} tokens",
            req.prompt.len(),
            req.stop.max_new_tokens
        ));
    }
    Ok(())
}

impl Model {
    /// Generate for every request together; outputs are in request order.
    pub fn generate(&self, reqs: &[GenerationRequest], record_logits: bool) -> Result<Vec<GenerationOutput>> {
        match self {
            Model::Block(m) => generate_blocks(m, reqs, record_logits),
            Model::Vanilla(m) => generate_tokens(m, reqs, record_logits),
        }
    }
}

/// Positions per page of the driver's pools.
const PAGE_SIZE: usize = 16;
/// Most new positions one prefill pass of the driver takes (whole prompts are
/// packed up to it; a longer prompt goes alone).
const PREFILL_BUDGET: usize = 4096;

/// Groups of consecutive sessions whose prompt lengths sum to at most the budget.
fn prefill_groups(lens: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut groups = vec![];
    let (mut start, mut sum) = (0, 0);
    for (i, &n) in lens.iter().enumerate() {
        if i > start && sum + n > PREFILL_BUDGET {
            groups.push(start..i);
            (start, sum) = (i, 0);
        }
        sum += n;
    }
    if start < lens.len() {
        groups.push(start..lens.len());
    }
    groups
}

/// The row of each group member's last new position in a pass of `lens`.
fn last_rows(lens: &[usize]) -> Vec<u32> {
    lens.iter()
        .scan(0u32, |end, &n| {
            *end += n as u32;
            Some(*end - 1)
        })
        .collect()
}

fn generate_blocks(m: &BlockTransformer, reqs: &[GenerationRequest], record: bool) -> Result<Vec<GenerationOutput>> {
    let l = m.block_length();
    let (device, dtype) = (m.device(), m.dtype());
    // The block decoder sees prompt blocks plus all but the last generated block;
    // keeping one block of slack makes the limit easy to state in tokens.
    let max_tokens = (m.block_decoder().max_blocks() - 1) * l;
    let mut sessions = Vec::with_capacity(reqs.len());
    let mut prompts = Vec::with_capacity(reqs.len());
    let mut pages = 0;
    for req in reqs {
        validate(req, m.config.vocab_size, max_tokens, "block decoder's context")?;
        let padded = PaddedPrompt::lay_out(&req.prompt, &[], l, req.layout)?;
        pages += (padded.num_blocks(l) + padded.new_blocks(req.stop.max_new_tokens, l)).div_ceil(PAGE_SIZE);
        let mut s = Session::new(req);
        s.done = req.stop.max_new_tokens == 0;
        s.forced = padded.forced;
        sessions.push(s);
        prompts.push(padded.ids);
    }
    let mut pool = m.block_decoder().new_pool(pages.max(1), PAGE_SIZE, dtype, device)?;
    // Prefill: whole prompts packed into passes.
    let lens: Vec<usize> = prompts.iter().map(|p| p.len() / l).collect();
    let mut contexts = Vec::with_capacity(reqs.len());
    for g in prefill_groups(&lens) {
        let ids: Vec<u32> = prompts[g.clone()].concat();
        let mut seqs: Vec<&mut SeqKv> = sessions[g.clone()].iter_mut().map(|s| &mut s.kv).collect();
        let pass = pool.plan(&mut seqs, &lens[g.clone()], device)?;
        let ctx = m.block_decoder().forward_paged(&m.embed_ids(&ids)?, &pool, &pass)?;
        contexts.push(ctx.index_select(&Tensor::new(last_rows(&lens[g]), device)?, 0)?);
    }
    let contexts = Tensor::cat(&contexts, 0)?;
    let mut live: Vec<usize> = (0..sessions.len()).filter(|&i| !sessions[i].done).collect();
    let mut context =
        if live.is_empty() { None } else { Some(contexts.index_select(&Tensor::new(live.iter().map(|&i| i as u32).collect::<Vec<_>>(), device)?, 0)?) };
    let mut local = m.token_decoder().new_local(live.len(), dtype, device)?;
    while let Some(ctx) = context.take() {
        // One block for every live session: L token-decoder steps.
        let mut logits = m.token_decoder().begin_block(&ctx, &mut local)?;
        let mut blocks: Vec<Vec<u32>> = vec![Vec::with_capacity(l); live.len()];
        let on_host: Vec<bool> = live.iter().map(|&i| sessions[i].on_host(record)).collect();
        for k in 0..l {
            let rows = read_rows(&logits, &on_host)?;
            let toks: Vec<u32> = live.iter().zip(rows).map(|(&i, r)| sessions[i].next(k, r, record)).collect();
            for (b, t) in blocks.iter_mut().zip(&toks) {
                b.push(*t);
            }
            if k + 1 < l {
                let t = Tensor::from_vec(toks, live.len(), device)?;
                logits = m.token_decoder().next_token(&t, &mut local)?;
            }
        }
        for &i in &live {
            sessions[i].forced.clear();
        }
        // Sessions still running feed their new block to the block decoder.
        let keep: Vec<usize> = (0..live.len()).filter(|&j| !sessions[live[j]].done).collect();
        if keep.is_empty() {
            break;
        }
        let ids: Vec<u32> = keep.iter().flat_map(|&j| blocks[j].iter().copied()).collect();
        live = keep.iter().map(|&j| live[j]).collect();
        let mut seqs: Vec<&mut SeqKv> = sessions.iter_mut().filter(|s| !s.done).map(|s| &mut s.kv).collect();
        let pass = pool.plan(&mut seqs, &vec![1; live.len()], device)?;
        context = Some(m.block_decoder().forward_paged(&m.embed_ids(&ids)?, &pool, &pass)?);
    }
    Ok(sessions.into_iter().map(|s| s.out).collect())
}

fn generate_tokens(m: &CausalLm, reqs: &[GenerationRequest], record: bool) -> Result<Vec<GenerationOutput>> {
    let vocab = m.config.stack.vocab_size;
    let (device, dtype) = (m.device(), m.dtype());
    let mut sessions = Vec::with_capacity(reqs.len());
    let mut pages = 0;
    for req in reqs {
        validate(req, vocab, m.max_positions(), "model's context")?;
        if req.prompt.is_empty() {
            return input_err("prompt must hold at least one token");
        }
        pages += (req.prompt.len() + req.stop.max_new_tokens).div_ceil(PAGE_SIZE);
        let mut s = Session::new(req);
        s.done = req.stop.max_new_tokens == 0;
        sessions.push(s);
    }
    let mut pool = m.new_pool(pages.max(1), PAGE_SIZE, dtype, device)?;
    let lens: Vec<usize> = reqs.iter().map(|r| r.prompt.len()).collect();
    let mut logits = Vec::with_capacity(reqs.len());
    for g in prefill_groups(&lens) {
        let ids: Vec<u32> = reqs[g.clone()].iter().flat_map(|r| r.prompt.iter().copied()).collect();
        let mut seqs: Vec<&mut SeqKv> = sessions[g.clone()].iter_mut().map(|s| &mut s.kv).collect();
        let pass = pool.plan(&mut seqs, &lens[g.clone()], device)?;
        let out = m.forward_paged(&ids, &pool, &pass, &last_rows(&lens[g.clone()]))?;
        let on_host: Vec<bool> = sessions[g].iter().map(|s| s.on_host(record)).collect();
        logits.extend(read_rows(&out, &on_host)?);
    }
    let mut live: Vec<usize> = (0..sessions.len()).filter(|&i| !sessions[i].done).collect();
    let mut logits: Vec<Row> = live.iter().map(|&i| std::mem::replace(&mut logits[i], Row::Token(0))).collect();
    // (`BLOCKSERVE_GREEDY_READBACK=sync` keeps the loop below for them too:
    // A/B measurements on the device.)
    if live.iter().all(|&i| !sessions[i].on_host(record)) && std::env::var("BLOCKSERVE_GREEDY_READBACK").as_deref() != Ok("sync") {
        let first: Vec<u32> = live.iter().zip(logits).map(|(&i, r)| sessions[i].push(r, false)).collect();
        decode_greedy(m, &mut sessions, &mut pool, live, &first)?;
        return Ok(sessions.into_iter().map(|s| s.out).collect());
    }
    while !live.is_empty() {
        let toks: Vec<u32> = live.iter().zip(std::mem::take(&mut logits)).map(|(&i, r)| sessions[i].push(r, record)).collect();
        let keep: Vec<usize> = (0..live.len()).filter(|&j| !sessions[live[j]].done).collect();
        if keep.is_empty() {
            break;
        }
        let toks: Vec<u32> = keep.iter().map(|&j| toks[j]).collect();
        live = keep.iter().map(|&j| live[j]).collect();
        let mut seqs: Vec<&mut SeqKv> = sessions.iter_mut().filter(|s| !s.done).map(|s| &mut s.kv).collect();
        let pass = pool.plan(&mut seqs, &vec![1; live.len()], device)?;
        let rows: Vec<u32> = (0..live.len() as u32).collect();
        let on_host: Vec<bool> = live.iter().map(|&i| sessions[i].on_host(record)).collect();
        logits = read_rows(&m.forward_paged(&toks, &pool, &pass, &rows)?, &on_host)?;
    }
    Ok(sessions.into_iter().map(|s| s.out).collect())
}

/// The decode steps of plain greedy sessions (`live`, whose first tokens
/// `first` are already taken). Each step's argmax stays on the device as the
/// next step's input, and the host reads a step's tokens while the next step
/// runs, so the GPU does not wait on the host between steps. A session that
/// stops on a token (EOS, a stop id) is seen one step late: the step already
/// launched computes one more token for it, which is dropped, in a slot its
/// pages already hold (it stopped before `max_new_tokens`).
fn decode_greedy(m: &CausalLm, sessions: &mut [Session], pool: &mut crate::paged::KvPool, mut live: Vec<usize>, first: &[u32]) -> Result<()> {
    let device = m.device();
    // Who needs another step, after the tokens taken so far and `ahead` more.
    let wants = |s: &Session, ahead: usize| !s.done && s.out.tokens.len() + ahead < s.req.stop.max_new_tokens;
    let keep: Vec<usize> = (0..live.len()).filter(|&j| wants(&sessions[live[j]], 0)).collect();
    let toks: Vec<u32> = keep.iter().map(|&j| first[j]).collect();
    live = keep.iter().map(|&j| live[j]).collect();
    if live.is_empty() {
        // (Nothing to decode: and a CUDA tensor of no elements is an error.)
        return Ok(());
    }
    // The step's input ids: always on the eager path; with step graphs only
    // when the batch changed (a replay otherwise feeds itself).
    let mut ids = Some(Tensor::from_slice(&toks, toks.len(), device)?);
    let mut readbacks = Readbacks::new(device, live.len())?;
    #[cfg(feature = "cuda")]
    let mut graphs = match device {
        candle_core::Device::Cuda(dev) if crate::step_graph::enabled() => {
            let positions = live.iter().map(|&i| sessions[i].req.prompt.len() + sessions[i].req.stop.max_new_tokens).max().unwrap_or(1);
            Some(crate::step_graph::StepGraphs::new(dev, live.len(), pool.pages_for(positions))?)
        }
        _ => None,
    };
    // Whether each step's graph feeds its output to the next replay itself.
    #[cfg(feature = "cuda")]
    let fed_back = graphs.is_some();
    #[cfg(not(feature = "cuda"))]
    let fed_back = false;
    // The step in flight: its sessions, and which readback holds its tokens.
    let mut in_flight: Option<(Vec<usize>, usize)> = None;
    let mut step = 0;
    while !live.is_empty() {
        // (`live` is ascending, so the filter yields the sessions in its order.)
        let mut seqs: Vec<&mut SeqKv> = sessions.iter_mut().enumerate().filter(|(i, _)| live.binary_search(i).is_ok()).map(|(_, s)| &mut s.kv).collect();
        let eager;
        #[allow(unused_mut)]
        let mut next: Option<&Tensor> = None;
        #[cfg(feature = "cuda")]
        if let Some(g) = graphs.as_mut() {
            next = Some(g.step(m, pool, &mut seqs, ids.take())?);
        }
        let next = match next {
            Some(next) => next,
            None => {
                let pass = pool.plan(&mut seqs, &vec![1; live.len()], device)?;
                let rows: Vec<u32> = (0..live.len() as u32).collect();
                let input = ids.take().expect("the eager path always has its input");
                eager = crate::argmax::argmax_rows(&m.forward_paged_ids(&input, pool, &pass, &rows)?)?;
                &eager
            }
        };
        readbacks.start(step % 2, next)?;
        // Settle the step before this one (done once this one is queued).
        if let Some((was, slot)) = in_flight.replace((live.clone(), step % 2)) {
            settle(sessions, &was, readbacks.finish(slot)?);
        }
        let keep: Vec<usize> = (0..live.len()).filter(|&j| wants(&sessions[live[j]], 1)).collect();
        ids = if keep.is_empty() {
            // The loop ends: no rows to select (and a CUDA tensor of no
            // elements fails to allocate: the H200's CUDA_ERROR_INVALID_VALUE
            // when every session stopped at the same step).
            None
        } else if keep.len() == live.len() {
            // (A graph's replay reads its own last output.)
            (!fed_back).then(|| next.clone())
        } else {
            let rows: Vec<u32> = keep.iter().map(|&j| j as u32).collect();
            Some(next.index_select(&Tensor::from_slice(&rows, rows.len(), device)?, 0)?)
        };
        live = keep.iter().map(|&j| live[j]).collect();
        step += 1;
    }
    if let Some((was, slot)) = in_flight {
        settle(sessions, &was, readbacks.finish(slot)?);
    }
    Ok(())
}

/// Hand a step's tokens to its sessions (those that stopped ignore theirs).
fn settle(sessions: &mut [Session], live: &[usize], tokens: Vec<u32>) {
    for (&i, t) in live.iter().zip(tokens) {
        sessions[i].push(Row::Token(t), false);
    }
}

/// Two host buffers that steps' tokens are copied into while the next step
/// runs: page-locked memory and an asynchronous copy on CUDA
/// ([`crate::pinned`]); on the CPU the tokens are simply read.
enum Readbacks {
    Host([Vec<u32>; 2]),
    #[cfg(feature = "cuda")]
    Pinned(Box<[crate::pinned::Pinned; 2]>),
}

impl Readbacks {
    fn new(device: &candle_core::Device, capacity: usize) -> Result<Self> {
        match device {
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(d) => {
                let buf = || crate::pinned::Pinned::new(d, 4 * capacity);
                Ok(Self::Pinned(Box::new([buf()?, buf()?])))
            }
            _ => {
                let _ = capacity;
                Ok(Self::Host([vec![], vec![]]))
            }
        }
    }

    /// Start copying `ids` (u32 `[n]`, n at most the capacity) into buffer `slot`.
    fn start(&mut self, slot: usize, ids: &Tensor) -> Result<()> {
        match self {
            Self::Host(bufs) => bufs[slot] = ids.to_vec1::<u32>()?,
            #[cfg(feature = "cuda")]
            Self::Pinned(bufs) => bufs[slot].read(ids)?,
        }
        Ok(())
    }

    /// The tokens of buffer `slot`, once its copy is done.
    fn finish(&mut self, slot: usize) -> Result<Vec<u32>> {
        match self {
            Self::Host(bufs) => Ok(std::mem::take(&mut bufs[slot])),
            #[cfg(feature = "cuda")]
            Self::Pinned(bufs) => bufs[slot].take_u32(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extend_stops_at_the_first_stopping_token() {
        let stop = StopCriteria { max_new_tokens: 6, eos_token_id: Some(0), stop_token_ids: vec![7] };
        let mut out = vec![1, 2];
        assert_eq!(stop.extend(&mut out, &[3, 7, 4, 5]), Some(FinishReason::StopToken));
        assert_eq!(out, vec![1, 2, 3, 7]);
        let mut out = vec![];
        assert_eq!(stop.extend(&mut out, &[1, 0, 4]), Some(FinishReason::Eos));
        assert_eq!(out, vec![1, 0]);
        let mut out = vec![1, 2, 3];
        assert_eq!(stop.extend(&mut out, &[4, 5, 6, 8]), Some(FinishReason::Length));
        assert_eq!(out, vec![1, 2, 3, 4, 5, 6]);
        let mut out = vec![];
        assert_eq!(stop.extend(&mut out, &[4, 5]), None);
        assert_eq!(out, vec![4, 5]);
    }
}

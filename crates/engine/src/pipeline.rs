//! Both tiers in one process, no gRPC: the block scheduler's passes feed the
//! token batcher, whose blocks go back to the scheduler, until every request
//! has finished. This is the engine `blockserve bench` measures.
//!
//! The token batcher runs either inline (a pass, then its block, one after the
//! other) or on a [`TokenThread`], where the decoding sessions form two
//! groups: one group's block decodes on the token thread's stream while the
//! other group's pass runs on the caller's, so both tiers keep the GPU busy.

use std::time::Instant;

use blockserve_model::prompt::PaddedPrompt;
use blockserve_model::{FinishReason, GenerationRequest, ModelError};

use crate::block_scheduler::BlockScheduler;
use crate::token_batcher::{BlockJob, TokenBatcher};
use crate::token_thread::{Decoded, Group, TokenThread};

type Result<T> = std::result::Result<T, ModelError>;

/// One request's result and timings (seconds from the start of the run).
#[derive(Debug, Clone)]
pub struct Outcome {
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub first_token_s: f64,
    pub finished_s: f64,
}

/// Where a run's time went, as seen from the host.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    pub wall_s: f64,
    /// Block-decoder passes (host time; the GPU queue drains during the token phase).
    pub passes: usize,
    pub block_phase_s: f64,
    /// Token-decoder blocks, including waiting for the device to finish (on
    /// the token thread, if there is one).
    pub token_phase_s: f64,
    pub decode_rows: usize,
    pub prefill_blocks: usize,
    /// Sum over passes of the blocks every decode row attended over.
    pub attended_blocks: u64,
    /// Token-decoder rows decoded (each is L tokens).
    pub token_rows: usize,
    pub peak_memory_bytes: Option<usize>,
}

struct Live<'r> {
    req: &'r GenerationRequest,
    out: Option<Outcome>,
    tokens: Vec<u32>,
    history: Vec<u32>,
    first_token_s: Option<f64>,
    /// The forced start of the first block (aligned prompt layout).
    forced: Vec<u32>,
}

/// Where the token decoder's blocks run.
pub enum Tokens<'a> {
    /// On the calling thread, after each pass.
    Inline(&'a mut TokenBatcher),
    /// On their own thread, while the calling thread runs the next pass.
    Thread(&'a TokenThread),
}

impl Tokens<'_> {
    /// The same place, for another run.
    pub fn reborrow(&mut self) -> Tokens<'_> {
        match self {
            Tokens::Inline(b) => Tokens::Inline(b),
            Tokens::Thread(t) => Tokens::Thread(t),
        }
    }
}

/// The token side of one run: where blocks decode, and the group an inline
/// batcher decoded at submission and has not handed back yet.
struct Stage<'a> {
    tokens: Tokens<'a>,
    inline: Option<Decoded>,
}

impl Stage<'_> {
    /// Groups in flight at once: the overlap needs two.
    fn depth(&self) -> usize {
        match self.tokens {
            Tokens::Inline(_) => 1,
            Tokens::Thread(_) => 2,
        }
    }

    fn submit(&mut self, group: Group) -> Result<()> {
        match &mut self.tokens {
            Tokens::Inline(batcher) => {
                self.inline = Some(group.decode(batcher)?);
                Ok(())
            }
            Tokens::Thread(thread) => thread.submit(group),
        }
    }

    /// The oldest group in flight, decoded.
    fn recv(&mut self) -> Result<Decoded> {
        match &self.tokens {
            Tokens::Inline(_) => Ok(self.inline.take().expect("inline groups decode at submit")),
            Tokens::Thread(thread) => thread.recv(),
        }
    }
}

/// Run `reqs` to completion with the token batcher inline; outcomes are in
/// request order. `memory` samples the device's used memory after each pass
/// (for the peak).
pub fn run(
    sched: &mut BlockScheduler,
    batcher: &mut TokenBatcher,
    reqs: &[GenerationRequest],
    memory: &dyn Fn() -> Option<usize>,
) -> Result<(Vec<Outcome>, RunStats)> {
    run_with(sched, Tokens::Inline(batcher), reqs, memory)
}

/// [`run`] with the token decoder where `tokens` says.
pub fn run_with(
    sched: &mut BlockScheduler,
    tokens: Tokens,
    reqs: &[GenerationRequest],
    memory: &dyn Fn() -> Option<usize>,
) -> Result<(Vec<Outcome>, RunStats)> {
    let model = sched.model().clone();
    let l = model.block_length();
    let t0 = Instant::now();
    let mut stats = RunStats::default();
    let mut live: Vec<Live> = Vec::with_capacity(reqs.len());
    for (i, req) in reqs.iter().enumerate() {
        let padded = PaddedPrompt::lay_out(&req.prompt, &[], l, req.layout)?;
        let history = if req.sampling.uses_history() { req.prompt.clone() } else { vec![] };
        let new_blocks = padded.new_blocks(req.stop.max_new_tokens, l);
        live.push(Live { req, out: None, tokens: vec![], history, first_token_s: None, forced: padded.forced });
        if req.stop.max_new_tokens == 0 {
            live[i].out = Some(Outcome { tokens: vec![], finish_reason: FinishReason::Length, first_token_s: 0.0, finished_s: 0.0 });
            continue;
        }
        sched.submit(i as u64, padded.ids, new_blocks)?;
    }
    let mut stage = Stage { tokens, inline: None };
    let depth = stage.depth();
    let mut in_flight = 0;
    let mut drive = || -> Result<()> {
        loop {
            if in_flight < depth && sched.has_work() {
                // With two groups in flight a pass takes at most half of the
                // decoding sessions' blocks, so that the groups stay apart.
                let most = if depth > 1 { sched.decoding().div_ceil(depth).max(1) } else { usize::MAX };
                let t = Instant::now();
                let Some(ctx) = sched.iterate_with(most)? else { return Ok(()) };
                stats.passes += 1;
                stats.decode_rows += ctx.decode_rows;
                stats.prefill_blocks += ctx.prefill_blocks;
                stats.attended_blocks += ctx.rows.iter().map(|r| r.1 as u64 + 1).sum::<u64>();
                stats.block_phase_s += t.elapsed().as_secs_f64();
                if ctx.rows.is_empty() {
                    continue;
                }
                let jobs: Vec<BlockJob> = ctx
                    .rows
                    .iter()
                    .map(|&(key, _)| {
                        let s = &live[key as usize];
                        BlockJob { sampling: s.req.sampling.clone(), history: s.history.clone(), generated: s.tokens.len() as u64, forced: s.forced.clone() }
                    })
                    .collect();
                stage.submit(Group { contexts: ctx.tensor, jobs, rows: ctx.rows })?;
                in_flight += 1;
                continue;
            }
            if in_flight == 0 {
                return Ok(());
            }
            let decoded = stage.recv();
            in_flight -= 1;
            let Decoded { rows, blocks, busy_s } = decoded?;
            stats.token_rows += blocks.len();
            stats.token_phase_s += busy_s;
            let now = t0.elapsed().as_secs_f64();
            for (&(key, _), block) in rows.iter().zip(blocks) {
                let s = &mut live[key as usize];
                s.first_token_s.get_or_insert(now);
                let new = &block[std::mem::take(&mut s.forced).len()..];
                let finish = s.req.stop.extend(&mut s.tokens, new);
                match finish {
                    Some(reason) => {
                        s.out = Some(Outcome {
                            tokens: std::mem::take(&mut s.tokens),
                            finish_reason: reason,
                            first_token_s: s.first_token_s.unwrap_or(now),
                            finished_s: now,
                        });
                        sched.close(key);
                    }
                    None => {
                        if s.req.sampling.uses_history() {
                            s.history.extend_from_slice(new);
                        }
                        sched.push_block(key, block)?;
                    }
                }
            }
            if let Some(used) = memory() {
                stats.peak_memory_bytes = Some(stats.peak_memory_bytes.unwrap_or(0).max(used));
            }
        }
    };
    let driven = drive();
    if driven.is_err() {
        // Collect what the token thread still holds for this run, so that the
        // next run on it does not receive this one's blocks.
        for _ in 0..in_flight {
            let _ = stage.recv();
        }
    }
    driven?;
    stats.wall_s = t0.elapsed().as_secs_f64();
    let outcomes = live
        .into_iter()
        .map(|s| s.out.ok_or_else(|| ModelError::Input("a request never finished (KV pool too small for it?)".into())))
        .collect::<Result<Vec<_>>>()?;
    Ok((outcomes, stats))
}

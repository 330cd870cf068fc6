//! The token decoder's model thread. It holds every running session's decoding
//! state (sampling, stop criteria, tokens so far) and sits on the critical
//! path between block-decoder passes: the contexts of one pass arrive as one
//! link message, are decoded together by the engine's [`TokenBatcher`]
//! (block-synchronous, fixed-size batches over one preallocated local cache),
//! and the new blocks of the sessions that go on leave in one link message.
//! Session tasks only see the result (to record and relay it), so neither a
//! session task nor a per-session message stands between two passes.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockserve_engine::token_batcher::plain_greedy;
use blockserve_engine::{BlockJob, DoneSignal, EngineError, HostContexts, Launched, TokenBatcher};
use blockserve_model::{BlockTransformer, FinishReason, SamplingParams, StopCriteria};
use blockserve_proto::v1::{BlockBatch, LinkDown, LinkUp, OpenBlocks};
use blockserve_runtime::metrics::METRICS;
use blockserve_worker::wire;
use candle_core::{DType, Tensor};
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};

use crate::link::{Downward, Link};

/// How a session decodes.
pub struct Spec {
    pub sampling: SamplingParams,
    pub stop: StopCriteria,
    /// The prompt, when the sampling uses history (repetition penalty).
    pub history: Vec<u32>,
}

/// What a session task hears from the engine.
pub enum Event {
    /// The tokens of one block, up to the first stop (then `finish` is set and
    /// the session is over here and on the block decoder).
    /// `reused`: with the first block after an open, the prompt blocks the
    /// block decoder found in its prefix cache.
    /// `settled_at`: when the model thread settled it (for [`crate::lag`]).
    Block { tokens: Vec<u32>, finish: Option<FinishReason>, wire_bytes: u64, reused: Option<u32>, settled_at: Instant },
    /// The session ended with an error; nothing of it is left.
    Failed(Status),
}

pub struct OpenRequest {
    pub key: u64,
    pub session_id: String,
    pub link: Arc<Link>,
    /// Laid out in whole blocks; for a migrated session, the prompt followed
    /// by `generated`.
    pub prompt: Vec<u32>,
    /// The first block's forced start (the aligned layout's prompt tail).
    pub forced: Vec<u32>,
    /// Output the session produced before (whole blocks): decoding goes on
    /// after it, with the stop criteria and sampler positions it implies.
    pub generated: Vec<u32>,
    pub max_new_blocks: u32,
    /// W3C traceparent of the session's span ("" when tracing is off).
    pub traceparent: String,
    pub spec: Spec,
    /// Never full: the engine stops a session at `max_unread` unread blocks
    /// instead of waiting for it.
    pub events: mpsc::UnboundedSender<Event>,
}

/// Default of how many blocks a session may have decoded that its task has not
/// yet consumed (recorded and handed to its client). A session whose client
/// reads slowly stops there with its next block held back from the block
/// decoder, so a slow client never holds up the others and its buffer stays
/// bounded.
pub const MAX_UNREAD: u32 = 8;

/// The `tier` label of this service's metrics.
pub const TIER: &str = "token_decoder";

enum Command {
    Open(OpenRequest, Arc<AtomicU32>),
    Close {
        key: u64,
    },
    Resume {
        key: u64,
    },
    Down {
        link: u64,
        msg: LinkDown,
        at: Instant,
    },
    LinkLost {
        link: u64,
        status: Status,
    },
    Score {
        contexts: Tensor,
        blocks: Vec<u32>,
        reply: oneshot::Sender<Result<Vec<f32>, EngineError>>,
    },
    /// The blocks of launched round `id` (and of every round before it) are
    /// on the host.
    RoundDone {
        id: u64,
    },
    Stop,
}

#[derive(Clone)]
pub struct ModelThread {
    tx: mpsc::UnboundedSender<Command>,
    pub queued: Arc<AtomicU32>,
    max_unread: u32,
}

/// Closes its session on the engine (and so on the block decoder) when dropped,
/// however the session task ends.
pub struct OpenSession {
    engine: ModelThread,
    key: u64,
    unread: Arc<AtomicU32>,
}

impl OpenSession {
    /// The task consumed `n` block events; a session held back at the limit
    /// goes on.
    pub fn consumed(&self, n: u32) {
        let before = self.unread.fetch_sub(n, Ordering::SeqCst);
        if before >= self.engine.max_unread && before - n < self.engine.max_unread {
            self.engine.send(Command::Resume { key: self.key });
        }
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.engine.send(Command::Close { key: self.key });
    }
}

impl ModelThread {
    /// Start the model thread; blocks are decoded in batches of at most
    /// `max_batch` (greedy ones replayed from CUDA graphs when `cuda_graphs`,
    /// and launched behind the round in flight when `launch_ahead`), and a
    /// session is held back at `max_unread` unread blocks.
    pub fn start(model: Arc<BlockTransformer>, max_batch: usize, max_unread: u32, cuda_graphs: bool, launch_ahead: bool) -> Result<Self, EngineError> {
        let max_unread = max_unread.max(1);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicU32::new(0));
        // The waiter signals through the command channel without keeping it open.
        let signals = waiter(tx.downgrade(), queued.clone());
        let q = queued.clone();
        // The batcher lives on the engine thread: CUDA graphs are not Send.
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("token-decoder-engine".into())
            .spawn(move || {
                let batcher = TokenBatcher::new(model.clone(), max_batch).and_then(|mut b| {
                    b.set_cuda_graphs(cuda_graphs);
                    b.warm_up()?;
                    if launch_ahead {
                        b.prepare_launches()?;
                    }
                    Ok(b)
                });
                let batcher = match batcher {
                    Ok(b) => b,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                let _ = ready_tx.send(Ok(()));
                Thread {
                    model,
                    batcher,
                    sessions: HashMap::new(),
                    outbox: HashMap::new(),
                    events: vec![],
                    queued: q,
                    max_unread,
                    held_back: 0,
                    phases: Phases::default(),
                    dispatch: dispatcher(),
                    pending: Rows::default(),
                    rounds: VecDeque::new(),
                    next_round: 0,
                    done_upto: None,
                    signals,
                    busy_until: None,
                    launch_ahead,
                }
                .run(rx)
            })
            .expect("spawn engine thread");
        ready_rx.recv().map_err(|_| EngineError::Stopped("token decoder"))??;
        Ok(Self { tx, queued, max_unread })
    }

    fn send(&self, c: Command) -> bool {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(c).is_ok()
    }

    /// Open a session on its link; its blocks come back as [`Event`]s until
    /// the returned guard is dropped or the session ends.
    pub fn open(&self, req: OpenRequest) -> Result<OpenSession, Status> {
        let (key, unread) = (req.key, Arc::new(AtomicU32::new(0)));
        if !self.send(Command::Open(req, unread.clone())) {
            return Err(blockserve_worker::status::from_engine(EngineError::Stopped("token decoder")));
        }
        Ok(OpenSession { engine: self.clone(), key, unread })
    }

    /// End the model thread (after the server drained); it logs its load.
    pub fn stop(&self) {
        self.send(Command::Stop);
    }

    /// Where links hand what comes down: this engine's command channel.
    pub fn link_sink(&self) -> crate::link::Sink {
        let engine = self.clone();
        Arc::new(move |d| {
            engine.send(match d {
                Downward::Message { link, msg, at } => Command::Down { link, msg, at },
                Downward::Lost { link, status } => Command::LinkLost { link, status },
            });
        })
    }

    /// log p of each token of blocks 1..n given `contexts` `[n-1, D_b]` of blocks
    /// 0..n-2 and the flat ids of blocks 1..n-1.
    pub async fn score(&self, contexts: Tensor, blocks: Vec<u32>) -> Result<Vec<f32>, EngineError> {
        let (reply, rx) = oneshot::channel();
        let stopped = || EngineError::Stopped("token decoder");
        if !self.send(Command::Score { contexts, blocks, reply }) {
            return Err(stopped());
        }
        rx.await.map_err(|_| stopped())?
    }
}

/// Characters of a block decoder's error message passed on.
const MAX_PEER_MESSAGE: usize = 512;

struct Session {
    link: Arc<Link>,
    spec: Spec,
    tokens: Vec<u32>,
    /// The forced start of the next block (until the first block is decoded).
    forced: Vec<u32>,
    /// Index of the block whose context comes next.
    next_context: u32,
    events: mpsc::UnboundedSender<Event>,
    unread: Arc<AtomicU32>,
    /// The next block (index, ids), held back while the task is behind.
    parked: Option<(u32, Vec<u32>)>,
    /// Prompt blocks the block decoder reused, until the next event tells.
    reused: Option<u32>,
}

/// Contexts that arrived for live sessions, in one host buffer.
#[derive(Default)]
struct Rows {
    keys: Vec<u64>,
    bytes: Vec<u8>,
    dtype: Option<DType>,
    row_bytes: u64,
    /// When the first message with contexts among them arrived.
    first_at: Option<Instant>,
}

impl Rows {
    /// The first `n` rows, leaving the rest here.
    fn split_front(&mut self, n: usize) -> Rows {
        let n = n.min(self.keys.len());
        let rest_keys = self.keys.split_off(n);
        let rest_bytes = self.bytes.split_off(n * self.row_bytes as usize);
        // Rows left behind wait from the same first arrival; none left, none waits.
        let first_at = if rest_keys.is_empty() { None } else { self.first_at };
        let rest = Rows { keys: rest_keys, bytes: rest_bytes, dtype: self.dtype, row_bytes: self.row_bytes, first_at };
        std::mem::replace(self, rest)
    }
}

/// A round launched on the batcher and not yet settled.
struct Round {
    id: u64,
    keys: Vec<u64>,
    row_bytes: u64,
    launched: Launched,
    first_at: Option<Instant>,
    launched_at: Instant,
}

struct Thread {
    model: Arc<BlockTransformer>,
    batcher: TokenBatcher,
    sessions: HashMap<u64, Session>,
    /// Messages to send up, one per link, flushed after each round.
    outbox: HashMap<u64, (Arc<Link>, LinkUp)>,
    /// Session events of settled rounds, handed to the dispatcher with the flush.
    events: Vec<(mpsc::UnboundedSender<Event>, Event)>,
    queued: Arc<AtomicU32>,
    max_unread: u32,
    /// Blocks held back because their session's task was behind.
    held_back: u64,
    phases: Phases,
    /// Hands each round's events to the session tasks (see [`dispatcher`]).
    dispatch: std::sync::mpsc::Sender<Vec<(mpsc::UnboundedSender<Event>, Event)>>,
    /// Contexts not yet launched.
    pending: Rows,
    /// Rounds launched and not yet settled, in launch order (at most two).
    rounds: VecDeque<Round>,
    next_round: u64,
    /// The last round whose blocks are known to be on the host.
    done_upto: Option<u64>,
    /// Rounds for the waiter to watch (see [`waiter`]).
    signals: std::sync::mpsc::Sender<(u64, DoneSignal)>,
    /// The end of the busy time counted so far (rounds overlap).
    busy_until: Option<Instant>,
    /// Launch greedy rounds behind the one in flight (else each round is
    /// decoded and settled before the next).
    launch_ahead: bool,
}

/// A thread that waits (sleeping) for each launched round's blocks to reach
/// the host and tells the engine thread, which meanwhile settles the round
/// before it and launches the next.
fn waiter(engine: mpsc::WeakUnboundedSender<Command>, queued: Arc<AtomicU32>) -> std::sync::mpsc::Sender<(u64, DoneSignal)> {
    let (tx, rx) = std::sync::mpsc::channel::<(u64, DoneSignal)>();
    std::thread::Builder::new()
        .name("token-decoder-waiter".into())
        .spawn(move || {
            for (id, done) in rx {
                // A failed wait is reported by the engine's own read of the round.
                let _ = done.wait();
                let Some(tx) = engine.upgrade() else { return };
                queued.fetch_add(1, Ordering::Relaxed);
                if tx.send(Command::RoundDone { id }).is_err() {
                    return;
                }
            }
        })
        .expect("spawn the round waiter");
    tx
}

/// A thread that hands a round's events to the session tasks. Waking
/// thousands of tasks takes a millisecond or two; on the model thread that
/// time would stand between this round and the next, whose contexts may
/// already be waiting.
fn dispatcher() -> std::sync::mpsc::Sender<Vec<(mpsc::UnboundedSender<Event>, Event)>> {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<(mpsc::UnboundedSender<Event>, Event)>>();
    std::thread::Builder::new()
        .name("token-decoder-events".into())
        .spawn(move || {
            for events in rx {
                for (to, e) in events {
                    let _ = to.send(e);
                }
            }
        })
        .expect("spawn the event dispatcher");
    tx
}

/// Where the engine thread's busy time goes, logged when it stops.
#[derive(Default, Debug)]
struct Phases {
    /// Contexts to the device (one host-to-device copy per batch), for
    /// rounds decoded in place.
    upload: Duration,
    /// Host time staging and queueing rounds launched ahead.
    launch: Duration,
    /// The token decoder's forward passes and the read of the tokens: for
    /// rounds launched ahead, from the launch until the blocks are on the host
    /// (overlapping rounds each count their own).
    compute: Duration,
    /// Stop checks, events and the blocks going up.
    bookkeeping: Duration,
    /// Rounds with contexts, and the sum over them of the time from the first
    /// context message's arrival to the round's start and to its blocks
    /// going up (the link's share of a block decoder's round trip).
    rounds: u32,
    waited: Duration,
    turnaround: Duration,
}

impl Phases {
    /// A round started at `t` whose first context arrived at `first_at`.
    fn started(&mut self, first_at: Option<Instant>, t: Instant) {
        if let Some(at) = first_at {
            self.rounds += 1;
            self.waited += t.saturating_duration_since(at);
        }
    }
}

impl Thread {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        blockserve_runtime::thread::make_critical("token-decoder-engine");
        let mut busy = blockserve_runtime::busy::Busy::new("token-decoder");
        // Take everything that is queued, decode what arrived, send the blocks up.
        while let Some(first) = rx.blocking_recv() {
            let cmds: Vec<Command> = std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())).collect();
            self.queued.fetch_sub(cmds.len() as u32, Ordering::Relaxed);
            if cmds.iter().any(|c| matches!(c, Command::Stop)) {
                tracing::info!(held_back = self.held_back, max_unread = self.max_unread, "blocks held back for sessions whose task was behind");
                let p = &self.phases;
                use blockserve_runtime::busy::{mean_ms, secs as s};
                let ms = |d: Duration| mean_ms(d, p.rounds);
                tracing::info!(
                    upload_s = s(p.upload),
                    launch_s = s(p.launch),
                    compute_s = s(p.compute),
                    bookkeeping_s = s(p.bookkeeping),
                    rounds = p.rounds,
                    mean_wait_ms = ms(p.waited),
                    mean_turnaround_ms = ms(p.turnaround),
                    "token-decoder engine phases"
                );
                return;
            }
            let first_context =
                cmds.iter().filter_map(|c| if let Command::Down { at, msg, .. } = c { msg.contexts.is_some().then_some(*at) } else { None }).min();
            if let Some(at) = first_context {
                self.pending.first_at.get_or_insert(at);
            }
            for c in cmds {
                self.apply(c);
            }
            self.progress(&mut busy);
            if self.sessions.is_empty() {
                // Idle: no row of the local cache is in use.
                METRICS.local_kv_rows.with_label_values(&["used"]).set(0);
                METRICS.local_kv_rows.with_label_values(&["free"]).set(self.batcher.max_batch() as i64);
            }
            METRICS.queue_depth.with_label_values(&[TIER]).set(self.queued.load(Ordering::Relaxed) as i64);
            self.flush();
        }
    }

    /// Launch the contexts that arrived and settle the rounds whose blocks
    /// are back, in the order that keeps the device busy: a round is launched
    /// before the one ahead of it is settled, so the settling (stop checks,
    /// the blocks up, the session events) overlaps the device's work.
    fn progress(&mut self, busy: &mut blockserve_runtime::busy::Busy) {
        loop {
            let front_done = self.rounds.front().is_some_and(|r| self.done_upto.is_some_and(|d| r.id <= d));
            if front_done && self.rounds.len() == 2 {
                // Both lanes are taken: settle the first to free its lane.
                self.settle_front(busy);
            } else if !self.pending.keys.is_empty() && self.rounds.len() < 2 {
                self.launch_pending(busy);
            } else if front_done {
                self.settle_front(busy);
            } else {
                return;
            }
        }
    }

    /// Launch up to a batch of the pending contexts. Rows that need their
    /// logits on the host (sampling, forced tokens), and every row with
    /// `--launch-ahead false`, are decoded and settled here, after the rounds
    /// in flight.
    fn launch_pending(&mut self, busy: &mut blockserve_runtime::busy::Busy) {
        let rows = self.pending.split_front(self.batcher.max_batch());
        // A batch of n rows holds n rows of a local cache.
        let n = rows.keys.len();
        METRICS.local_kv_rows.with_label_values(&["used"]).set(n as i64);
        METRICS.local_kv_rows.with_label_values(&["free"]).set((self.batcher.max_batch() - n) as i64);
        // (Asked of the sessions directly: the jobs, with their clones of each
        // session's sampling, are built only for rows decoded in place.)
        let greedy = rows.keys.iter().all(|k| self.sessions.get(k).is_none_or(|s| plain_greedy(&s.spec.sampling, &s.forced)));
        if !self.launch_ahead || !greedy {
            while !self.rounds.is_empty() {
                self.settle_front(busy);
            }
            let jobs = self.jobs(&rows.keys);
            let t = Instant::now();
            let span = busy.iteration_span();
            self.decode_in_place(rows, &jobs);
            drop(span);
            busy.add(t.elapsed(), n);
            return;
        }
        let t = Instant::now();
        let dtype = rows.dtype.expect("set with the first row");
        let launched = self.batcher.launch(HostContexts { bytes: &rows.bytes, dtype, rows: n });
        self.phases.launch += t.elapsed();
        self.phases.started(rows.first_at, t);
        match launched {
            Ok(launched) => {
                let id = self.next_round;
                self.next_round += 1;
                // Even a round decoded at launch (no CUDA graphs, e.g. on the
                // CPU) is signalled through the waiter, so every build takes
                // the same path (on the CPU a second round is launched before
                // the first is settled only when its contexts beat the
                // signal: once in a 64-session run here).
                let _ = self.signals.send((id, launched.done()));
                self.rounds.push_back(Round { id, keys: rows.keys, row_bytes: rows.row_bytes, launched, first_at: rows.first_at, launched_at: t });
            }
            Err(e) => self.fail_round(rows.keys, &e),
        }
    }

    /// Take the first round's blocks and settle them; its blocks go up and its
    /// events out at once.
    fn settle_front(&mut self, busy: &mut blockserve_runtime::busy::Busy) {
        let r = self.rounds.pop_front().expect("a round to settle");
        // The round's trace span (one round in TRACE_EVERY) covers its settling.
        let span = busy.iteration_span();
        let blocks = self.batcher.finish(r.launched);
        self.phases.compute += r.launched_at.elapsed();
        let n = r.keys.len();
        match blocks {
            Ok(blocks) => self.settle(r.keys, r.row_bytes, blocks),
            Err(e) => self.fail_round(r.keys, &e),
        }
        if let Some(at) = r.first_at {
            self.phases.turnaround += at.elapsed();
        }
        drop(span);
        // Busy from the launch (or the end of the time already counted) to now.
        let now = Instant::now();
        let from = self.busy_until.map_or(r.launched_at, |u| u.max(r.launched_at));
        busy.add(now.saturating_duration_since(from), n);
        self.busy_until = Some(now);
        self.flush();
    }

    /// Send what is in the outbox up, then hand the settled events out.
    fn flush(&mut self) {
        // The blocks up are the critical path; waking the session tasks
        // (thousands of them) comes after.
        let mut outbox: Vec<_> = self.outbox.drain().collect();
        // Counted only once some session has ever been held back: until
        // then every count is 0 and the sessions need not be walked.
        if !outbox.is_empty() && self.held_back > 0 {
            let mut held: HashMap<u64, u32> = HashMap::new();
            for s in self.sessions.values().filter(|s| s.parked.is_some()) {
                *held.entry(s.link.id).or_default() += 1;
            }
            for (id, (_, msg)) in &mut outbox {
                msg.held_back = held.get(id).copied().unwrap_or(0);
            }
        }
        for (id, (link, msg)) in outbox {
            if !link.send(msg) {
                // The link ended (its loss may have been handled before these
                // sessions joined it): they fail instead of waiting forever.
                self.fail_link(id, Status::unavailable(format!("link to block decoder {} is closed", link.address)));
            }
        }
        if !self.events.is_empty() {
            let _ = self.dispatch.send(std::mem::take(&mut self.events));
        }
    }

    fn up(&mut self, link: &Arc<Link>) -> &mut LinkUp {
        &mut self.outbox.entry(link.id).or_insert_with(|| (link.clone(), LinkUp::default())).1
    }

    fn fail(&mut self, key: u64, status: Status) {
        if let Some(s) = self.sessions.remove(&key) {
            let _ = s.events.send(Event::Failed(status));
        }
    }

    /// Fail a session for a fault found here: the block decoder still holds it.
    fn fail_and_close(&mut self, key: u64, status: Status) {
        if let Some(s) = self.sessions.remove(&key) {
            self.up(&s.link).closes.push(key);
            let _ = s.events.send(Event::Failed(status));
        }
    }

    fn fail_link(&mut self, link: u64, status: Status) {
        let keys: Vec<u64> = self.sessions.iter().filter(|(_, s)| s.link.id == link).map(|(k, _)| *k).collect();
        for k in keys {
            self.fail(k, status.clone());
        }
    }

    fn apply(&mut self, c: Command) {
        match c {
            Command::Open(o, unread) => {
                let prompt_blocks = (o.prompt.len() / self.model.block_length()) as u32;
                let open =
                    OpenBlocks { key: o.key, session_id: o.session_id, prompt_ids: o.prompt, max_new_blocks: o.max_new_blocks, traceparent: o.traceparent };
                self.up(&o.link).opens.push(open);
                let s = Session {
                    link: o.link,
                    spec: o.spec,
                    tokens: o.generated,
                    forced: o.forced,
                    next_context: prompt_blocks - 1,
                    events: o.events,
                    unread,
                    parked: None,
                    reused: None,
                };
                self.sessions.insert(o.key, s);
            }
            Command::Close { key } => {
                if let Some(s) = self.sessions.remove(&key) {
                    self.up(&s.link).closes.push(key);
                }
            }
            Command::Resume { key } => {
                if let Some((link, (index, block))) = self.sessions.get_mut(&key).and_then(|s| Some((s.link.clone(), s.parked.take()?))) {
                    self.send_block(&link, key, index, &block);
                }
            }
            Command::Down { link, msg, .. } => self.receive(link, msg),
            Command::RoundDone { id } => self.done_upto = Some(self.done_upto.map_or(id, |d| d.max(id))),
            Command::LinkLost { link, status } => self.fail_link(link, status),
            Command::Score { contexts, blocks, reply } => {
                let _ = reply.send(self.model.score_blocks(&contexts, &blocks).map_err(EngineError::from));
            }
            Command::Stop => {}
        }
    }

    /// Sort one link message: failures end their sessions, contexts of live
    /// sessions join this round's batch (a session that ended meanwhile is skipped).
    fn receive(&mut self, link: u64, msg: LinkDown) {
        for e in msg.errors {
            // Only this link's sessions: a block decoder cannot end another's.
            if self.sessions.get(&e.key).is_none_or(|s| s.link.id != link) {
                continue;
            }
            // An error must not read as success, nor carry a message too long
            // for a gRPC status header.
            let code = match Code::from_i32(e.code) {
                Code::Ok => Code::Internal,
                c => c,
            };
            let mut message: String = e.message.chars().take(MAX_PEER_MESSAGE).collect();
            if message.is_empty() {
                message = "(no message)".into();
            }
            self.fail(e.key, Status::new(code, format!("block decoder: {message}")));
        }
        // Sent with a session's first context: at most its prompt's blocks.
        for (key, &n) in msg.reused_keys.iter().zip(&msg.reused_blocks) {
            if let Some(s) = self.sessions.get_mut(key).filter(|s| s.link.id == link) {
                s.reused = Some(n.min(s.next_context + 1));
            }
        }
        let Some(ctx) = msg.contexts else { return };
        let d = self.model.config.block_decoder.hidden_size;
        let checked = wire::check(&ctx, d).map_err(|e| e.to_string()).and_then(|dt| {
            if msg.keys.len() != ctx.rows as usize || msg.block_indices.len() != msg.keys.len() {
                return Err(format!("{} keys, {} block indices and {} context rows differ", msg.keys.len(), msg.block_indices.len(), ctx.rows));
            }
            match self.pending.dtype {
                Some(have) if have != dt => Err(format!("contexts in {dt:?} after contexts in {have:?}")),
                _ => Ok(dt),
            }
        });
        let dtype = match checked {
            Ok(dt) => dt,
            Err(e) => {
                let st = Status::internal(format!("from block decoder: {e}"));
                let mine: Vec<u64> = msg.keys.iter().copied().filter(|k| self.sessions.get(k).is_some_and(|s| s.link.id == link)).collect();
                for k in mine {
                    self.fail_and_close(k, st.clone());
                }
                return;
            }
        };
        let n = wire::row_bytes(&ctx);
        let taken = self.pending.keys.len();
        let mut wrong = vec![];
        {
            let rows = &mut self.pending;
            rows.dtype = Some(dtype);
            rows.row_bytes = n as u64;
            for (i, (&key, &block)) in msg.keys.iter().zip(&msg.block_indices).enumerate() {
                let Some(s) = self.sessions.get(&key).filter(|s| s.link.id == link) else { continue };
                if block != s.next_context {
                    wrong.push((key, Status::internal(format!("block decoder sent the context of block {block}, expected {}", s.next_context))));
                    continue;
                }
                rows.keys.push(key);
                rows.bytes.extend_from_slice(&ctx.data[i * n..(i + 1) * n]);
            }
        }
        for (key, st) in wrong {
            self.fail_and_close(key, st);
        }
        // Counted once per message, not per row (this loop is on the critical path).
        METRICS.context_bytes.with_label_values(&[TIER, "received"]).inc_by(((self.pending.keys.len() - taken) * n) as u64);
    }

    /// How each row's block is decoded. A session closed since its context
    /// arrived still has its row; it is decoded as a greedy row and its block
    /// dropped.
    fn jobs(&self, keys: &[u64]) -> Vec<BlockJob> {
        keys.iter()
            .map(|key| match self.sessions.get(key) {
                Some(s) => {
                    BlockJob { sampling: s.spec.sampling.clone(), history: s.spec.history.clone(), generated: s.tokens.len() as u64, forced: s.forced.clone() }
                }
                None => BlockJob::greedy(0),
            })
            .collect()
    }

    /// Decode rows here and now (rows that sample on the host) and settle them.
    fn decode_in_place(&mut self, rows: Rows, jobs: &[BlockJob]) {
        let dtype = rows.dtype.expect("set with the first row");
        let t = Instant::now();
        let uploaded = self.batcher.upload(&HostContexts { bytes: &rows.bytes, dtype, rows: rows.keys.len() });
        self.phases.upload += t.elapsed();
        let t = Instant::now();
        let decoded = uploaded.and_then(|ctx| self.batcher.decode(&ctx, jobs));
        self.phases.compute += t.elapsed();
        self.phases.started(rows.first_at, t);
        match decoded {
            Ok(blocks) => self.settle(rows.keys, rows.row_bytes, blocks),
            Err(e) => self.fail_round(rows.keys, &e),
        }
        if let Some(at) = rows.first_at {
            self.phases.turnaround += at.elapsed();
        }
    }

    /// A batch failed on the device: its sessions end here and on the block decoder.
    fn fail_round(&mut self, keys: Vec<u64>, e: &blockserve_model::ModelError) {
        tracing::error!(error = %e, "token decoder batch failed");
        let st = Status::internal(format!("token decoder batch failed: {e}"));
        for key in keys {
            if let Some(s) = self.sessions.remove(&key) {
                self.up(&s.link).closes.push(key);
                self.events.push((s.events.clone(), Event::Failed(st.clone())));
            }
        }
    }

    /// Settle a round's blocks: stop checks, each session's event (handed out
    /// with the next flush) and its block up to the block decoder.
    fn settle(&mut self, keys: Vec<u64>, row_bytes: u64, blocks: Vec<Vec<u32>>) {
        let t = Instant::now();
        let l = self.model.block_length() as u64;
        let mut generated = 0u64;
        self.events.reserve(blocks.len());
        for (key, block) in keys.into_iter().zip(blocks) {
            let Some(s) = self.sessions.get_mut(&key) else { continue };
            let start = s.tokens.len();
            let chosen = &block[std::mem::take(&mut s.forced).len()..];
            let finish = s.spec.stop.extend(&mut s.tokens, chosen);
            let new = s.tokens[start..].to_vec();
            generated += new.len() as u64;
            let mut wire_bytes = row_bytes;
            if finish.is_none() {
                if s.spec.sampling.uses_history() {
                    s.spec.history.extend_from_slice(chosen);
                }
                s.next_context += 1;
                wire_bytes += 4 * l;
            }
            // Counted before it is sent, so the task's count never goes below
            // zero; a task that catches up after this sees the limit and
            // resumes the session (see `consumed`), after this round parks it.
            let behind = s.unread.fetch_add(1, Ordering::SeqCst) + 1 >= self.max_unread;
            self.events.push((s.events.clone(), Event::Block { tokens: new, finish, wire_bytes, reused: s.reused.take(), settled_at: t }));
            let (link, index) = (s.link.clone(), s.next_context);
            if finish.is_some() {
                self.sessions.remove(&key);
                self.up(&link).closes.push(key);
            } else if behind {
                s.parked = Some((index, block));
                self.held_back += 1;
                // The link hears of it (its held-back count) this round.
                self.up(&link);
            } else {
                self.send_block(&link, key, index, &block);
            }
        }
        METRICS.generated_tokens.with_label_values(&[TIER]).inc_by(generated);
        self.phases.bookkeeping += t.elapsed();
    }

    fn send_block(&mut self, link: &Arc<Link>, key: u64, index: u32, block: &[u32]) {
        let b = self.up(link).blocks.get_or_insert_with(BlockBatch::default);
        b.keys.push(key);
        b.indices.push(index);
        b.token_ids.extend_from_slice(block);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use blockserve_model::{loader::load_model, Model};
    use blockserve_proto::v1::{DType as WireDType, Embeddings};

    use super::*;
    use candle_core::Device;

    fn fixture() -> Arc<BlockTransformer> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../crates/model/tests/fixtures/official-tiny-b4");
        match load_model(&dir, None, DType::F32, &Device::Cpu).unwrap() {
            Model::Block(m) => Arc::new(m),
            Model::Vanilla(_) => unreachable!("a block fixture"),
        }
    }

    async fn next_up(rx: &mut mpsc::UnboundedReceiver<LinkUp>) -> LinkUp {
        tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("a message up").expect("link open")
    }

    /// A greedy session of `max_new_tokens` tokens over a one-block prompt.
    fn greedy_open(key: u64, link: Arc<Link>, max_new_tokens: usize, events: mpsc::UnboundedSender<Event>) -> OpenRequest {
        let stop = StopCriteria { max_new_tokens, eos_token_id: None, stop_token_ids: vec![] };
        OpenRequest {
            key,
            session_id: "s".into(),
            link,
            prompt: vec![1, 2, 3, 4],
            forced: vec![],
            generated: vec![],
            max_new_blocks: max_new_tokens.div_ceil(4) as u32,
            traceparent: String::new(),
            spec: Spec { sampling: SamplingParams::greedy(), stop, history: vec![] },
            events,
        }
    }

    /// A session opened on a link that has already ended fails at once with
    /// UNAVAILABLE instead of waiting for a context that never comes.
    #[tokio::test]
    async fn a_session_on_a_closed_link_fails() {
        let engine = ModelThread::start(fixture(), 4, MAX_UNREAD, true, true).unwrap();
        let (up_tx, up) = mpsc::unbounded_channel();
        drop(up);
        let link = Arc::new(Link::new(1, "http://gone:1".into(), up_tx));
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let _guard = engine.open(greedy_open(1, link, 8, events_tx)).unwrap();
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("an event").expect("open") {
            Event::Failed(st) => assert_eq!((st.code(), st.message()), (Code::Unavailable, "link to block decoder http://gone:1 is closed")),
            Event::Block { .. } => panic!("no block without a block decoder"),
        }
    }

    /// A session whose task does not consume its blocks stops at MAX_UNREAD
    /// with its next block held back, and goes on once the task catches up.
    #[tokio::test]
    async fn a_session_that_falls_behind_is_held_back_and_resumed() {
        let m = fixture();
        let d = m.config.block_decoder.hidden_size;
        let zero = Tensor::zeros((1, d), DType::F32, &Device::Cpu).unwrap();
        let want = TokenBatcher::new(m.clone(), 1).unwrap().decode(&zero, &[BlockJob::greedy(0)]).unwrap().remove(0);
        let engine = ModelThread::start(m.clone(), 4, MAX_UNREAD, true, true).unwrap();
        let (up_tx, mut up) = mpsc::unbounded_channel();
        let link = Arc::new(Link::new(7, "test".into(), up_tx));
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let guard = engine.open(greedy_open(3, link, 1000, events_tx)).unwrap();
        let open = next_up(&mut up).await;
        assert_eq!((open.opens.len(), open.opens[0].key, open.opens[0].prompt_ids.clone()), (1, 3, vec![1, 2, 3, 4]));
        // The context of block b (a zero vector: every block decodes alike).
        let context = |b: u32| LinkDown {
            keys: vec![3],
            block_indices: vec![b],
            contexts: Some(Embeddings { data: vec![0; 4 * d], dtype: WireDType::DtypeF32 as i32, dim: d as u32, rows: 1 }),
            ..Default::default()
        };
        let down = engine.link_sink();
        let send = |msg| down(Downward::Message { link: 7, msg, at: Instant::now() });
        for b in 0..MAX_UNREAD - 1 {
            send(context(b));
            let msg = next_up(&mut up).await;
            let blocks = msg.blocks.expect("a block up");
            assert_eq!((blocks.keys, blocks.indices, blocks.token_ids), (vec![3], vec![b + 1], want.clone()));
        }
        send(context(MAX_UNREAD - 1));
        // The block after the limit is held back; the block decoder hears so.
        let held = next_up(&mut up).await;
        assert_eq!((held.blocks, held.held_back), (None, 1), "the block after the limit is held back");
        assert!(tokio::time::timeout(Duration::from_millis(300), up.recv()).await.is_err(), "nothing more goes up while it is held");
        for _ in 0..MAX_UNREAD {
            match events.recv().await.unwrap() {
                Event::Block { tokens, finish, wire_bytes, reused, .. } => {
                    assert_eq!((tokens, finish, wire_bytes, reused), (want.clone(), None, (4 * d + 4 * 4) as u64, None))
                }
                Event::Failed(st) => panic!("{st}"),
            }
        }
        guard.consumed(1);
        let resumed = next_up(&mut up).await;
        assert_eq!(resumed.held_back, 0);
        let blocks = resumed.blocks.expect("the held block goes up");
        assert_eq!((blocks.keys, blocks.indices), (vec![3], vec![MAX_UNREAD]));
        drop(guard);
        assert_eq!(next_up(&mut up).await.closes, vec![3]);
    }
}

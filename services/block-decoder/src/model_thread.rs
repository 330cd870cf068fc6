//! The block decoder's model thread: it owns the [`BlockScheduler`] (paged KV
//! pool, admission, chunked prefill) and runs one scheduler iteration after
//! another while there is work. Link handlers hand it batches of opens, blocks
//! and closes; after each pass it sends every link one message with the
//! contexts of its sessions (one device-to-host copy per pass).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockserve_engine::download::{Download, Downloads};
use blockserve_engine::prefix_cache::CacheStats;
use blockserve_engine::{BlockScheduler, EngineError, SchedulerConfig};
use blockserve_model::BlockTransformer;
use blockserve_proto::v1::{Embeddings, LinkDown, SessionError};
use blockserve_runtime::metrics::METRICS;
use blockserve_worker::{status, wire};
use tokio::sync::{mpsc, oneshot};

pub use blockserve_engine::gather::{Gather, LinkId};
use blockserve_engine::gather::{Loads, Take};

/// A checked `open`.
pub struct Open {
    pub key: u64,
    pub ids: Vec<u32>,
    pub max_new_blocks: usize,
}

/// One link message's checked work.
#[derive(Default)]
pub struct Up {
    pub opens: Vec<Open>,
    pub blocks: Vec<(u64, Vec<u32>)>,
    pub closes: Vec<u64>,
    /// The link's sessions whose blocks the token decoder holds back.
    pub held_back: usize,
    /// When the message arrived.
    pub at: Option<Instant>,
}

enum Command {
    Attach { link: LinkId, down: mpsc::UnboundedSender<LinkDown> },
    Up { link: LinkId, up: Up },
    Detach { link: LinkId },
    Contexts { ids: Vec<u32>, reply: oneshot::Sender<Result<Embeddings, EngineError>> },
}

/// Handle to the model thread; cheap to clone.
#[derive(Clone)]
pub struct ModelThread {
    /// A std channel: the model thread waits on it with a timeout while a
    /// micro-batch gathers, instead of polling.
    tx: std::sync::mpsc::Sender<Command>,
    /// Sessions holding KV pages or waiting for them.
    pub active: Arc<AtomicU32>,
    /// Commands waiting for the model thread.
    pub queued: Arc<AtomicU32>,
    /// Pages the prefix cache held at its latest eviction (0: none yet).
    pub cache_limit_pages: Arc<AtomicU32>,
}

fn stopped() -> EngineError {
    EngineError::Stopped("block decoder")
}

/// A session's failure in wire form.
pub fn session_error(key: u64, st: &tonic::Status) -> SessionError {
    SessionError { key, code: st.code() as i32, message: st.message().to_string() }
}

impl ModelThread {
    /// Start the model thread. Decode blocks gather as `gather` says (see `ready`).
    pub fn start(model: Arc<BlockTransformer>, config: SchedulerConfig, gather: Gather) -> Result<Self, EngineError> {
        let page_blocks = config.page_size;
        let mut sched = BlockScheduler::new(model, config)?;
        sched.warm_up()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let active = Arc::new(AtomicU32::new(0));
        let queued = Arc::new(AtomicU32::new(0));
        let cache_limit_pages = Arc::new(AtomicU32::new(0));
        let (a, q, c) = (active.clone(), queued.clone(), cache_limit_pages.clone());
        std::thread::Builder::new()
            .name("block-decoder-engine".into())
            .spawn(move || {
                let t = Thread {
                    sched,
                    links: Links::default(),
                    active: a,
                    queued: q,
                    gather,
                    phases: Phases::default(),
                    downloads: Downloads::default(),
                    cache_reported: CacheStats::default(),
                    cache_limit_pages: c,
                    page_blocks,
                };
                t.run(rx)
            })
            .expect("spawn engine thread");
        Ok(Self { tx, active, queued, cache_limit_pages })
    }

    fn send(&self, c: Command) -> Result<(), EngineError> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(c).map_err(|_| stopped())
    }

    /// Start sending contexts of `link`'s sessions to `down`.
    pub fn attach(&self, link: LinkId, down: mpsc::UnboundedSender<LinkDown>) -> Result<(), EngineError> {
        self.send(Command::Attach { link, down })
    }

    /// Apply one link message's checked work.
    pub fn up(&self, link: LinkId, up: Up) -> Result<(), EngineError> {
        self.send(Command::Up { link, up })
    }

    /// The link is gone: free all of its sessions.
    pub fn detach(&self, link: LinkId) {
        let _ = self.send(Command::Detach { link });
    }

    /// Contexts of every block of whole-block ids, no session kept.
    pub async fn contexts(&self, ids: Vec<u32>) -> Result<Embeddings, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Contexts { ids, reply })?;
        rx.await.map_err(|_| stopped())?
    }
}

/// A scheduler session's link and key there, and where it stands.
struct Owner {
    link: LinkId,
    key: u64,
    /// Its prompt is in the cache (it sends blocks).
    decoding: bool,
    /// A block of it waits for the next pass.
    pending: bool,
    /// Prompt blocks it found in the prefix cache, to tell its token decoder
    /// with its first context.
    reused: Option<u32>,
}

/// Which link and key each scheduler session belongs to, and the way back.
#[derive(Default)]
struct Links {
    down: HashMap<LinkId, mpsc::UnboundedSender<LinkDown>>,
    owner: HashMap<u64, Owner>,
    session: HashMap<(LinkId, u64), u64>,
    next: u64,
    /// Failures to report, per link, sent after the commands are applied.
    errors: HashMap<LinkId, Vec<SessionError>>,
    /// Decoding sessions and pending blocks per link, for the micro-batches.
    loads: Loads,
}

impl Links {
    fn fail(&mut self, link: LinkId, key: u64, st: tonic::Status) {
        self.errors.entry(link).or_default().push(session_error(key, &st));
    }

    fn remove(&mut self, link: LinkId, key: u64) -> Option<u64> {
        let s = self.session.remove(&(link, key))?;
        if let Some(o) = self.owner.remove(&s) {
            self.loads.session_ended(link, o.decoding, o.pending);
        }
        Some(s)
    }

    fn flush_errors(&mut self) {
        for (link, errors) in self.errors.drain() {
            if let Some(d) = self.down.get(&link) {
                let _ = d.send(LinkDown { errors, ..Default::default() });
            }
        }
    }
}

struct Thread {
    sched: BlockScheduler,
    links: Links,
    active: Arc<AtomicU32>,
    queued: Arc<AtomicU32>,
    gather: Gather,
    phases: Phases,
    downloads: Downloads,
    /// The prefix cache's counts at the last metrics report.
    cache_reported: CacheStats,
    cache_limit_pages: Arc<AtomicU32>,
    page_blocks: usize,
}

/// Longest the model thread sleeps while a micro-batch gathers before it looks
/// at the gather's deadline again.
const GATHER_TICK: Duration = Duration::from_micros(500);

/// A pass whose kernels are queued: the rows its contexts belong to and their
/// copy to the host.
struct Launched {
    rows: Vec<(u64, u32)>,
    download: Download,
    /// The pass held prompt blocks (for the phase counts).
    prompt: bool,
}

/// A launched pass (or its failure) and the host time spent launching it.
type InFlight = (Duration, Result<Option<Launched>, EngineError>);

/// A finished pass: its rows (session, block index) and their contexts in
/// wire form; `None` when the pass computed nothing to send.
/// One link's share of a pass: keys, block indices, rows of the matrix.
type LinkRows = (Vec<u64>, Vec<u32>, Vec<usize>);

type PassOut = Result<Option<(Vec<(u64, u32)>, Embeddings)>, EngineError>;

/// Where the engine thread's pass time goes, logged when it stops.
#[derive(Default, Debug)]
struct Phases {
    /// Planning the pass and launching its kernels (host time).
    launch: Duration,
    /// Waiting for the device and copying the contexts to the host.
    finish: Duration,
    /// Handing each link its contexts.
    send: Duration,
    /// Contexts sent to each link and not yet answered in whole, and the
    /// round trips measured: from the contexts' send to the arrival of the
    /// link's last block (at the service), and to the engine taking it in.
    sent: HashMap<LinkId, Instant>,
    round_trips: u32,
    to_arrival: Duration,
    to_engine: Duration,
    /// Passes with prompt blocks, and passes of decode rows alone.
    prompt_passes: PassKind,
    decode_passes: PassKind,
    /// Waiting for commands or for a micro-batch to gather, with nothing in flight.
    idle: Duration,
}

/// One kind of pass: how many, what they held, and their host time launching
/// and then waiting for the device. A launch longer than the device's pass
/// before it leaves the device idle; a long wait means the device is the limit.
#[derive(Default, Debug)]
struct PassKind {
    passes: u32,
    decode_rows: usize,
    prompt_blocks: usize,
    launch: Duration,
    finish: Duration,
}

impl Phases {
    fn kind(&mut self, prompt: bool) -> &mut PassKind {
        if prompt {
            &mut self.prompt_passes
        } else {
            &mut self.decode_passes
        }
    }
}

impl PassKind {
    fn log(&self, kind: &str) {
        use blockserve_runtime::busy::mean_ms;
        let n = self.passes.max(1) as usize;
        tracing::info!(
            kind,
            passes = self.passes,
            mean_decode_rows = self.decode_rows / n,
            mean_prompt_blocks = self.prompt_blocks / n,
            mean_launch_ms = mean_ms(self.launch, self.passes),
            mean_finish_ms = mean_ms(self.finish, self.passes),
            "block-decoder passes"
        );
    }
}

impl Thread {
    fn run(mut self, rx: std::sync::mpsc::Receiver<Command>) {
        blockserve_runtime::thread::make_critical("block-decoder-engine");
        let mut busy = blockserve_runtime::busy::Busy::new("block-decoder");
        // At most one pass runs on the device while the next is launched: the
        // host's launch time then overlaps the device's work, and a pass's
        // contexts still leave as soon as that pass (not the next) is done.
        let mut in_flight: Option<InFlight> = None;
        loop {
            // Block for commands only when there is nothing to compute.
            if !self.sched.has_work() && in_flight.is_none() {
                let t = Instant::now();
                let cmd = rx.recv().ok();
                self.phases.idle += t.elapsed();
                match cmd {
                    Some(c) => self.apply(vec![c]),
                    None => {
                        let p = &self.phases;
                        use blockserve_runtime::busy::{mean_ms, secs as s};
                        let ms = |d: Duration| mean_ms(d, p.round_trips);
                        tracing::info!(
                            launch_s = s(p.launch),
                            finish_and_copy_s = s(p.finish),
                            send_s = s(p.send),
                            link_round_trips = p.round_trips,
                            mean_round_trip_ms = ms(p.to_arrival),
                            mean_round_trip_to_engine_ms = ms(p.to_engine),
                            idle_s = s(p.idle),
                            "block-decoder engine phases"
                        );
                        p.prompt_passes.log("with prompt blocks");
                        p.decode_passes.log("decode rows only");
                        return;
                    }
                }
            }
            self.drain(&rx);
            let started = Instant::now();
            let mut take = None;
            while self.sched.has_work() {
                take = self.gather.next(&self.sched, &self.links.loads, started.elapsed());
                // With a pass in flight, launch only what is ready now, else finish it.
                if take.is_some() || in_flight.is_some() {
                    break;
                }
                // Wait for the next command, or for the gather's deadline to come
                // closer (it is checked again either way).
                let t = Instant::now();
                let cmd = rx.recv_timeout(GATHER_TICK);
                self.phases.idle += t.elapsed();
                match cmd {
                    Ok(c) => {
                        self.apply(vec![c]);
                        self.drain(&rx);
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    // Shutting down: the sessions left finish without new commands.
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(GATHER_TICK),
                }
            }
            let span = busy.iteration_span();
            let launched = take.map(|take| {
                let t = Instant::now();
                let l = self.launch(take);
                (t.elapsed(), l)
            });
            if let Some((launch_time, prev)) = in_flight.take() {
                let t = Instant::now();
                let rows = self.finish(prev);
                busy.add(launch_time + t.elapsed(), rows);
            }
            drop(span);
            in_flight = launched;
            self.active.store(self.sched.sessions() as u32, Ordering::Relaxed);
            METRICS.queue_depth.with_label_values(&["block_decoder"]).set(self.queued.load(Ordering::Relaxed) as i64);
            METRICS.active_sessions.with_label_values(&["block_decoder"]).set(self.sched.sessions() as i64);
        }
    }

    fn drain(&mut self, rx: &std::sync::mpsc::Receiver<Command>) {
        let cmds: Vec<Command> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        self.apply(cmds);
    }

    /// Apply queued commands to the scheduler.
    fn apply(&mut self, cmds: Vec<Command>) {
        self.queued.fetch_sub(cmds.len() as u32, Ordering::Relaxed);
        for c in cmds {
            match c {
                Command::Attach { link, down } => {
                    self.links.down.insert(link, down);
                }
                Command::Up { link, up } => self.apply_up(link, up),
                Command::Detach { link } => {
                    let keys: Vec<u64> = self.links.session.keys().filter(|(l, _)| *l == link).map(|(_, k)| *k).collect();
                    for key in keys {
                        if let Some(s) = self.links.remove(link, key) {
                            self.sched.close(s);
                        }
                    }
                    self.links.down.remove(&link);
                    self.links.errors.remove(&link);
                }
                Command::Contexts { ids, reply } => {
                    let r = self.sched.contexts(&ids).map_err(EngineError::from).and_then(|t| wire::encode(&t));
                    let _ = reply.send(r);
                }
            }
        }
        self.links.flush_errors();
        // Closes free pages without a pass: the gauge must show it when idle.
        self.report_kv();
    }

    fn report_kv(&mut self) {
        let (used, free, idle) = self.sched.kv_pages();
        METRICS.kv_pages.with_label_values(&["used"]).set(used as i64);
        METRICS.kv_pages.with_label_values(&["free"]).set(free as i64);
        METRICS.kv_pages.with_label_values(&["cached_idle"]).set(idle as i64);
        // The scheduler counts since it started; the counters take the change.
        let (pages, stats) = self.sched.prefix_cache();
        let (last, ps) = (self.cache_reported, self.page_blocks as u64);
        if stats.evictions > last.evictions {
            self.cache_limit_pages.store(pages as u32, Ordering::Relaxed);
        }
        METRICS.prefix_cache_pages.with_label_values(&["block_decoder"]).set(pages as i64);
        METRICS.prefix_cache_blocks.with_label_values(&["hit"]).inc_by((stats.hits - last.hits) * ps);
        METRICS.prefix_cache_blocks.with_label_values(&["miss"]).inc_by(((stats.looked_up - stats.hits) - (last.looked_up - last.hits)) * ps);
        METRICS.prefix_cache_evictions.with_label_values(&["block_decoder"]).inc_by(stats.evictions - last.evictions);
        self.cache_reported = stats;
    }

    fn apply_up(&mut self, link: LinkId, up: Up) {
        let links = &mut self.links;
        for o in up.opens {
            let s = links.next;
            links.next += 1;
            match self.sched.submit(s, o.ids, o.max_new_blocks) {
                Ok(()) => {
                    links.session.insert((link, o.key), s);
                    links.owner.insert(s, Owner { link, key: o.key, decoding: false, pending: false, reused: None });
                }
                Err(e) => links.fail(link, o.key, status::from_model(e)),
            }
        }
        for (key, block) in up.blocks {
            // A session the engine already ended (its error is on the way) is skipped.
            let Some(&s) = links.session.get(&(link, key)) else { continue };
            match self.sched.push_block(s, block) {
                Ok(()) => {
                    if let Some(o) = links.owner.get_mut(&s).filter(|o| !o.pending) {
                        o.pending = true;
                        links.loads.block_pushed(link);
                    }
                }
                Err(e) => {
                    links.remove(link, key);
                    self.sched.close(s);
                    links.fail(link, key, status::from_model(e));
                }
            }
        }
        for key in up.closes {
            if let Some(s) = links.remove(link, key) {
                self.sched.close(s);
            }
        }
        links.loads.held_back(link, up.held_back);
        if links.loads.is_complete(link) {
            if let (Some(sent), Some(at)) = (self.phases.sent.remove(&link), up.at) {
                self.phases.round_trips += 1;
                self.phases.to_arrival += at.saturating_duration_since(sent);
                self.phases.to_engine += sent.elapsed();
            }
        }
    }

    /// Launch one scheduler iteration taking the pending blocks `take` names,
    /// and queue the copy of its contexts to the host.
    fn launch(&mut self, take: Take) -> Result<Option<Launched>, EngineError> {
        let t = Instant::now();
        let rows = match take {
            Take::Oldest(n) => n,
            Take::Links(picked) => {
                let owner = &self.links.owner;
                self.sched.put_first(|s| owner.get(&s).is_some_and(|o| picked.contains(&o.link)))
            }
        };
        let mut held = None;
        let launched = match self.sched.iterate_with(rows) {
            Ok(Some(c)) => {
                self.count(&c.rows, c.decode_rows);
                let prompt = c.prefill_blocks > 0;
                held = Some((prompt, c.decode_rows, c.prefill_blocks));
                self.downloads.start(&c.tensor).map(|download| Some(Launched { rows: c.rows, download, prompt }))
            }
            other => other.map(|_| None).map_err(EngineError::from),
        };
        let took = t.elapsed();
        self.phases.launch += took;
        if let Some((prompt, decode_rows, prompt_blocks)) = held {
            let kind = self.phases.kind(prompt);
            kind.passes += 1;
            kind.decode_rows += decode_rows;
            kind.prompt_blocks += prompt_blocks;
            kind.launch += took;
        }
        launched
    }

    /// Wait for a launched pass's contexts; each link gets those of its
    /// sessions. Returns the rows computed.
    fn finish(&mut self, launched: Result<Option<Launched>, EngineError>) -> usize {
        let t = Instant::now();
        let prompt = matches!(&launched, Ok(Some(l)) if l.prompt);
        let out: PassOut = launched.and_then(|l| match l {
            Some(l) => Ok(Some((l.rows, self.wire_form(l.download)?))),
            None => Ok(None),
        });
        let took = t.elapsed();
        self.phases.finish += took;
        if let Ok(Some((_, e))) = &out {
            self.phases.kind(prompt).finish += took;
            METRICS.context_bytes.with_label_values(&["block_decoder", "sent"]).inc_by(e.data.len() as u64);
        }
        self.report_kv();
        let t = Instant::now();
        let rows = self.deliver(out);
        self.phases.send += t.elapsed();
        rows
    }

    /// Wait for a download and put it in wire form.
    fn wire_form(&mut self, d: Download) -> Result<Embeddings, EngineError> {
        let h = self.downloads.wait(d)?;
        wire::from_host(h.bytes, h.dtype, h.rows, h.dim)
    }

    /// A pass took the blocks of the first `decode_rows` of `rows`; the rest
    /// finished their prompts and send blocks from now on.
    fn count(&mut self, rows: &[(u64, u32)], decode_rows: usize) {
        let links = &mut self.links;
        for (i, (s, _)) in rows.iter().enumerate() {
            let Some(o) = links.owner.get_mut(s) else { continue };
            if i < decode_rows {
                if std::mem::take(&mut o.pending) {
                    links.loads.block_taken(o.link);
                }
            } else if !std::mem::replace(&mut o.decoding, true) {
                links.loads.started_decoding(o.link);
                o.reused = self.sched.reused_blocks(*s).filter(|&n| n > 0).map(|n| n as u32);
            }
        }
    }

    /// Send each link the contexts of its sessions (or fail them all).
    fn deliver(&mut self, out: PassOut) -> usize {
        match out {
            Ok(Some((rows, contexts))) => {
                // Per link: its keys, their block indices, and their rows in the matrix.
                let mut per_link: HashMap<LinkId, LinkRows> = HashMap::new();
                // Per link: sessions that found prompt blocks in the prefix cache.
                let mut reused: HashMap<LinkId, (Vec<u64>, Vec<u32>)> = HashMap::new();
                for (i, (s, block)) in rows.iter().enumerate() {
                    if let Some(o) = self.links.owner.get_mut(s) {
                        let e = per_link.entry(o.link).or_default();
                        e.0.push(o.key);
                        e.1.push(*block);
                        e.2.push(i);
                        if let Some(n) = o.reused.take() {
                            let r = reused.entry(o.link).or_default();
                            r.0.push(o.key);
                            r.1.push(n);
                        }
                    }
                }
                // The usual case, one link with every row (in order), takes the
                // matrix as it is; otherwise each link gets a copy of its rows.
                let mut whole = Some(contexts);
                for (link, (keys, block_indices, pick)) in per_link {
                    let Some(d) = self.links.down.get(&link) else { continue };
                    let mine = match whole.take_if(|_| pick.len() == rows.len()) {
                        Some(all) => all,
                        None => wire::select(whole.as_ref().expect("only a link with every row takes the matrix"), &pick),
                    };
                    let (reused_keys, reused_blocks) = reused.remove(&link).unwrap_or_default();
                    let _ = d.send(LinkDown { keys, block_indices, contexts: Some(mine), errors: vec![], reused_keys, reused_blocks });
                    self.phases.sent.insert(link, Instant::now());
                }
                rows.len()
            }
            Ok(None) => 0,
            Err(e) => {
                // A failed pass fails every session: their caches may be half written.
                tracing::error!(error = %e, "block decoder pass failed");
                let st = tonic::Status::internal(format!("block decoder pass failed: {e}"));
                for (s, o) in std::mem::take(&mut self.links.owner) {
                    self.sched.close(s);
                    self.links.fail(o.link, o.key, st.clone());
                }
                self.links.session.clear();
                self.links.loads.clear();
                self.links.flush_errors();
                0
            }
        }
    }
}

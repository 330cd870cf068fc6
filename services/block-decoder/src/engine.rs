//! The block decoder's model thread: it owns the [`BlockScheduler`] (paged KV
//! pool, admission, chunked prefill) and runs one scheduler iteration after
//! another while there is work. Link handlers hand it batches of opens, blocks
//! and closes; after each pass it sends every link one message with the
//! contexts of its sessions (one device-to-host copy per pass).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockserve_engine::{BlockScheduler, SchedulerConfig};
use blockserve_model::{BlockTransformer, ModelError};
use blockserve_proto::v1::{Embeddings, LinkDown, SessionError};
use blockserve_runtime::metrics::METRICS;
use blockserve_runtime::{codec, status};
use tokio::sync::{mpsc, oneshot};

/// A token decoder's link; its sessions' keys are its own.
pub type LinkId = u64;

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
}

enum Command {
    Attach { link: LinkId, down: mpsc::UnboundedSender<LinkDown> },
    Up { link: LinkId, up: Up },
    Detach { link: LinkId },
    Contexts { ids: Vec<u32>, reply: oneshot::Sender<Result<Embeddings, ModelError>> },
}

/// How decode passes are formed: the decoding sessions are split into
/// `micro_batches` groups of about equal size; a pass takes one group's
/// blocks, waiting for them up to `max_wait`. With two, one group's blocks are
/// on their way through the token decoders while the other's pass runs, so
/// neither tier waits for the round trip.
#[derive(Clone, Copy, Debug)]
pub struct Gather {
    pub max_wait: Duration,
    pub micro_batches: usize,
}

impl Gather {
    /// Decode rows of one pass: a micro-batch of the decoding sessions.
    fn rows(&self, sched: &BlockScheduler) -> usize {
        sched.decoding().div_ceil(self.micro_batches.max(1)).max(1)
    }
}

/// Handle to the model thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::UnboundedSender<Command>,
    /// Sessions holding KV pages or waiting for them.
    pub active: Arc<AtomicU32>,
    /// Commands waiting for the model thread.
    pub queued: Arc<AtomicU32>,
}

fn stopped() -> ModelError {
    ModelError::Input("block decoder engine stopped".into())
}

/// A session's failure in wire form.
pub fn session_error(key: u64, st: &tonic::Status) -> SessionError {
    SessionError { key, code: st.code() as i32, message: st.message().to_string() }
}

impl Engine {
    /// Start the model thread. Decode blocks gather as `gather` says (see `ready`).
    pub fn start(model: Arc<BlockTransformer>, config: SchedulerConfig, gather: Gather) -> Result<Self, ModelError> {
        let mut sched = BlockScheduler::new(model, config)?;
        sched.warm_up()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let active = Arc::new(AtomicU32::new(0));
        let queued = Arc::new(AtomicU32::new(0));
        let (a, q) = (active.clone(), queued.clone());
        std::thread::Builder::new()
            .name("block-decoder-engine".into())
            .spawn(move || Thread { sched, links: Links::default(), active: a, queued: q, gather, phases: Phases::default() }.run(rx))
            .expect("spawn engine thread");
        Ok(Self { tx, active, queued })
    }

    fn send(&self, c: Command) -> Result<(), ModelError> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.tx.send(c).map_err(|_| stopped())
    }

    /// Start sending contexts of `link`'s sessions to `down`.
    pub fn attach(&self, link: LinkId, down: mpsc::UnboundedSender<LinkDown>) -> Result<(), ModelError> {
        self.send(Command::Attach { link, down })
    }

    /// Apply one link message's checked work.
    pub fn up(&self, link: LinkId, up: Up) -> Result<(), ModelError> {
        self.send(Command::Up { link, up })
    }

    /// The link is gone: free all of its sessions.
    pub fn detach(&self, link: LinkId) {
        let _ = self.send(Command::Detach { link });
    }

    /// Contexts of every block of whole-block ids, no session kept.
    pub async fn contexts(&self, ids: Vec<u32>) -> Result<Embeddings, ModelError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Contexts { ids, reply })?;
        rx.await.map_err(|_| stopped())?
    }
}

/// Which link and key each scheduler session belongs to, and the way back.
#[derive(Default)]
struct Links {
    down: HashMap<LinkId, mpsc::UnboundedSender<LinkDown>>,
    owner: HashMap<u64, (LinkId, u64)>,
    session: HashMap<(LinkId, u64), u64>,
    next: u64,
    /// Failures to report, per link, sent after the commands are applied.
    errors: HashMap<LinkId, Vec<SessionError>>,
}

impl Links {
    fn fail(&mut self, link: LinkId, key: u64, st: tonic::Status) {
        self.errors.entry(link).or_default().push(session_error(key, &st));
    }

    fn remove(&mut self, link: LinkId, key: u64) -> Option<u64> {
        let s = self.session.remove(&(link, key))?;
        self.owner.remove(&s);
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
}

/// Where the engine thread's pass time goes, logged when it stops.
#[derive(Default, Debug)]
struct Phases {
    /// Planning the pass and launching its kernels (host time).
    launch: Duration,
    /// Waiting for the device and copying the contexts to the host.
    finish: Duration,
    /// Handing each link its contexts.
    send: Duration,
}

/// Whether to run a pass now: prompt work never waits; decode blocks wait
/// (up to `max_wait`) until a micro-batch of them is there.
fn ready(sched: &BlockScheduler, waited: Duration, g: Gather) -> bool {
    sched.has_prefill() || (sched.pending_blocks() > 0 && (sched.pending_blocks() >= g.rows(sched) || waited >= g.max_wait))
}

impl Thread {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        blockserve_runtime::thread::make_critical("block-decoder-engine");
        let mut busy = blockserve_runtime::busy::Busy::new("block-decoder");
        loop {
            // Block for commands only when there is nothing to compute.
            if !self.sched.has_work() {
                match rx.blocking_recv() {
                    Some(c) => self.apply(vec![c]),
                    None => {
                        let p = &self.phases;
                        let s = |d: Duration| format!("{:.2}", d.as_secs_f64());
                        tracing::info!(launch_s = s(p.launch), finish_and_copy_s = s(p.finish), send_s = s(p.send), "block-decoder engine phases");
                        return;
                    }
                }
            }
            self.drain(&mut rx);
            let started = Instant::now();
            while !ready(&self.sched, started.elapsed(), self.gather) && self.sched.has_work() {
                std::thread::sleep(Duration::from_micros(50));
                self.drain(&mut rx);
            }
            if self.sched.has_work() {
                let t = Instant::now();
                let span = busy.iteration_span();
                let rows = self.pass();
                drop(span);
                busy.add(t.elapsed(), rows);
            }
            self.active.store(self.sched.sessions() as u32, Ordering::Relaxed);
            METRICS.queue_depth.with_label_values(&["block_decoder"]).set(self.queued.load(Ordering::Relaxed) as i64);
            METRICS.active_sessions.with_label_values(&["block_decoder"]).set(self.sched.sessions() as i64);
        }
    }

    fn drain(&mut self, rx: &mut mpsc::UnboundedReceiver<Command>) {
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
                    let r = self.sched.contexts(&ids).and_then(|t| codec::encode(&t).map_err(ModelError::Input));
                    let _ = reply.send(r);
                }
            }
        }
        self.links.flush_errors();
        // Closes free pages without a pass: the gauge must show it when idle.
        self.report_kv();
    }

    fn report_kv(&self) {
        let (used, free) = self.sched.kv_pages();
        METRICS.kv_pages.with_label_values(&["used"]).set(used as i64);
        METRICS.kv_pages.with_label_values(&["free"]).set(free as i64);
    }

    fn apply_up(&mut self, link: LinkId, up: Up) {
        let links = &mut self.links;
        for o in up.opens {
            let s = links.next;
            links.next += 1;
            match self.sched.submit(s, o.ids, o.max_new_blocks) {
                Ok(()) => {
                    links.session.insert((link, o.key), s);
                    links.owner.insert(s, (link, o.key));
                }
                Err(e) => links.fail(link, o.key, status::from_model(e)),
            }
        }
        for (key, block) in up.blocks {
            // A session the engine already ended (its error is on the way) is skipped.
            let Some(&s) = links.session.get(&(link, key)) else { continue };
            if let Err(e) = self.sched.push_block(s, block) {
                links.remove(link, key);
                self.sched.close(s);
                links.fail(link, key, status::from_model(e));
            }
        }
        for key in up.closes {
            if let Some(s) = links.remove(link, key) {
                self.sched.close(s);
            }
        }
    }

    /// One scheduler iteration; each link gets the contexts of its sessions.
    /// Returns the rows computed.
    fn pass(&mut self) -> usize {
        let t = Instant::now();
        let iterated = self.sched.iterate_with(self.gather.rows(&self.sched));
        self.phases.launch += t.elapsed();
        let t = Instant::now();
        let out = iterated.and_then(|out| out.map(|c| codec::encode(&c.tensor).map(|e| (c.rows, e)).map_err(ModelError::Input)).transpose());
        self.phases.finish += t.elapsed();
        if let Ok(Some((_, e))) = &out {
            METRICS.context_bytes.with_label_values(&["block_decoder", "sent"]).inc_by(e.data.len() as u64);
        }
        self.report_kv();
        let t = Instant::now();
        let rows = self.deliver(out);
        self.phases.send += t.elapsed();
        rows
    }

    /// Send each link the contexts of its sessions (or fail them all).
    fn deliver(&mut self, out: Result<Option<(Vec<(u64, u32)>, Embeddings)>, ModelError>) -> usize {
        match out {
            Ok(Some((rows, contexts))) => {
                let mut per_link: HashMap<LinkId, (Vec<u64>, Vec<u32>, Vec<usize>)> = HashMap::new();
                for (i, (s, block)) in rows.iter().enumerate() {
                    if let Some(&(link, key)) = self.links.owner.get(s) {
                        let e = per_link.entry(link).or_default();
                        e.0.push(key);
                        e.1.push(*block);
                        e.2.push(i);
                    }
                }
                // The usual case, one link with every row (in order), takes the
                // matrix as it is; otherwise each link gets a copy of its rows.
                let mut whole = Some(contexts);
                for (link, (keys, block_indices, pick)) in per_link {
                    let Some(d) = self.links.down.get(&link) else { continue };
                    let mine = match whole.take_if(|_| pick.len() == rows.len()) {
                        Some(all) => all,
                        None => codec::select(whole.as_ref().expect("only a link with every row takes the matrix"), &pick),
                    };
                    let _ = d.send(LinkDown { keys, block_indices, contexts: Some(mine), errors: vec![] });
                }
                rows.len()
            }
            Ok(None) => 0,
            Err(e) => {
                // A failed pass fails every session: their caches may be half written.
                tracing::error!(error = %e, "block decoder pass failed");
                let st = tonic::Status::internal(format!("block decoder pass failed: {e}"));
                for (s, (link, key)) in std::mem::take(&mut self.links.owner) {
                    self.sched.close(s);
                    self.links.fail(link, key, st.clone());
                }
                self.links.session.clear();
                self.links.flush_errors();
                0
            }
        }
    }
}

//! How much of the wall time an engine thread spends computing, logged every
//! ten seconds and when the engine stops: the idle fraction of a tier. Each
//! iteration also counts in the `blockserve_engine_iterations_total` and
//! `blockserve_batch_rows` metrics.

use std::time::{Duration, Instant};

pub struct Busy {
    name: &'static str,
    since: Instant,
    busy: Duration,
    total_since: Instant,
    total_busy: Duration,
    /// Iterations and the rows they held (mean batch size at exit).
    calls: u64,
    rows: u64,
}

impl Busy {
    pub fn new(name: &'static str) -> Self {
        let now = Instant::now();
        Self { name, since: now, busy: Duration::ZERO, total_since: now, total_busy: Duration::ZERO, calls: 0, rows: 0 }
    }

    /// Count one iteration of `rows` rows that took `worked`; log the last
    /// window's busy share when it is over.
    pub fn add(&mut self, worked: Duration, rows: usize) {
        let tier = self.tier();
        crate::metrics::METRICS.iterations.with_label_values(&[tier]).inc();
        crate::metrics::METRICS.batch_rows.with_label_values(&[tier]).observe(rows as f64);
        self.calls += 1;
        self.rows += rows as u64;
        self.busy += worked;
        self.total_busy += worked;
        let wall = self.since.elapsed();
        if wall >= Duration::from_secs(10) {
            tracing::info!(engine = self.name, busy_percent = format!("{:.1}", percent(self.busy, wall)), "engine load over the last 10 s");
            self.since = Instant::now();
            self.busy = Duration::ZERO;
        }
    }
}

/// One engine iteration in this many is traced (a root span of its own: an
/// iteration serves many sessions).
const TRACE_EVERY: u64 = 64;

impl Busy {
    /// A span around the coming iteration, for one iteration in
    /// [`TRACE_EVERY`]; hold it while the iteration runs.
    pub fn iteration_span(&self) -> Option<tracing::span::EnteredSpan> {
        self.calls
            .is_multiple_of(TRACE_EVERY)
            .then(|| tracing::info_span!(parent: None, "iteration", otel.name = %format!("{}.iteration", self.tier()), iteration = self.calls).entered())
    }

    /// The metrics' `tier` label of this engine.
    fn tier(&self) -> &'static str {
        match self.name {
            "block-decoder" => "block_decoder",
            "token-decoder" => "token_decoder",
            other => other,
        }
    }
}

fn percent(busy: Duration, wall: Duration) -> f64 {
    100.0 * busy.as_secs_f64() / wall.as_secs_f64().max(1e-9)
}

impl Drop for Busy {
    fn drop(&mut self) {
        let wall = self.total_since.elapsed();
        tracing::info!(
            engine = self.name,
            busy_percent = format!("{:.1}", percent(self.total_busy, wall)),
            busy_s = format!("{:.2}", self.total_busy.as_secs_f64()),
            wall_s = format!("{:.2}", wall.as_secs_f64()),
            iterations = self.calls,
            mean_rows = format!("{:.1}", self.rows as f64 / self.calls.max(1) as f64),
            "engine load over its lifetime"
        );
    }
}

/// Seconds with two decimals, for the engines' exit logs.
pub fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// Milliseconds per event (two decimals) of `total` over `n` events, for the
/// engines' exit logs.
pub fn mean_ms(total: Duration, n: u32) -> String {
    format!("{:.2}", total.as_secs_f64() * 1e3 / n.max(1) as f64)
}

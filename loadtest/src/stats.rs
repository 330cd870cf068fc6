//! What both load-generator modes measure of a stream, and their percentiles.
//!
//! Tokens arrive a block at a time: the first chunk's delay is the time to
//! first token, and a later chunk's gap since the previous one is shared by its
//! tokens (one inter-token-latency sample each).

use std::time::Instant;

/// The timings of one Generate stream, fed chunk by chunk.
pub struct StreamClock {
    start: Instant,
    last: Instant,
    pub ttft: Option<f64>,
    pub itl: Vec<f64>,
    pub tokens: usize,
}

impl StreamClock {
    /// Start timing at the call's start.
    pub fn new(start: Instant) -> Self {
        Self { start, last: start, ttft: None, itl: vec![], tokens: 0 }
    }

    /// A chunk of `n` tokens arrived now.
    pub fn chunk(&mut self, n: usize) {
        let now = Instant::now();
        match self.ttft {
            None => self.ttft = Some((now - self.start).as_secs_f64()),
            Some(_) => self.itl.extend(std::iter::repeat_n((now - self.last).as_secs_f64() / n as f64, n)),
        }
        self.last = now;
        self.tokens += n;
    }
}

/// Sort samples for [`percentile`].
pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// The `p` quantile (0..=1, nearest rank) of sorted samples; None when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    (!sorted.is_empty()).then(|| sorted[((sorted.len() - 1) as f64 * p).round() as usize])
}

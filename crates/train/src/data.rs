//! Training batches and held-out windows.
//!
//! A batch is `rows` windows of `seq_len` tokens at random offsets of the
//! training tokens. Each (step, micro-step) draws from its own ChaCha stream of
//! the run's seed, so a batch depends only on where the run is, and a resumed
//! run sees the batches an uninterrupted one would.

use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{input, Result};

pub struct Batches {
    tokens: Vec<u16>,
    seq_len: usize,
    rows: usize,
    seed: u64,
}

impl Batches {
    pub fn new(tokens: Vec<u16>, seq_len: usize, rows: usize, seed: u64) -> Result<Self> {
        if tokens.len() <= seq_len {
            return input(format!("{} training tokens cannot fill one window of --seq-len {seq_len}", tokens.len()));
        }
        Ok(Self { tokens, seq_len, rows, seed })
    }

    /// The windows of micro-step `micro` of step `step`.
    pub fn batch(&self, step: u64, micro: u32) -> Vec<Vec<u32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(step * 1024 + micro as u64);
        (0..self.rows)
            .map(|_| {
                let at = rng.gen_range(0..=self.tokens.len() - self.seq_len);
                self.tokens[at..at + self.seq_len].iter().map(|&t| t as u32).collect()
            })
            .collect()
    }

    pub fn tokens(&self) -> usize {
        self.tokens.len()
    }
}

/// The first `max` consecutive, non-overlapping windows of `seq_len` tokens
/// (fewer when the tokens run out): the fixed held-out set of a run.
pub fn windows(tokens: &[u16], seq_len: usize, max: usize) -> Vec<Vec<u32>> {
    tokens.chunks_exact(seq_len).take(max).map(|w| w.iter().map(|&t| t as u32).collect()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_depends_only_on_seed_step_and_micro_step() {
        let tokens: Vec<u16> = (0..1000).map(|i| (i % 97) as u16).collect();
        let b = Batches::new(tokens.clone(), 16, 3, 7).unwrap();
        let again = Batches::new(tokens, 16, 3, 7).unwrap();
        assert_eq!(b.batch(5, 1), again.batch(5, 1));
        assert_ne!(b.batch(5, 1), b.batch(5, 0));
        assert_ne!(b.batch(5, 0), b.batch(6, 0));
        for row in b.batch(3, 0) {
            assert_eq!(row.len(), 16);
            // Windows are consecutive runs of the stream.
            assert!(row.windows(2).all(|w| (w[0] + 1) % 97 == w[1]));
        }
        assert_eq!(windows(&[1, 2, 3, 4, 5, 6, 7], 3, 10), vec![vec![1, 2, 3], vec![4, 5, 6]]);
    }
}

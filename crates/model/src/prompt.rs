//! Prompt layout exactly as the reference's `preprocess_inputs_for_generation`:
//! left-pad with the pad id to a multiple of L, so the last prompt block is full
//! and generation starts on a block boundary. The padding is fewer than L tokens,
//! so no block is ever fully padded and every prompt block is attended to.

use crate::error::{input_err, Result};

/// The id the reference pads prompts with (its eos/bos/pad id).
pub const PROMPT_PAD_ID: u32 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedPrompt {
    /// `pad` pad ids followed by the prompt: a whole number of blocks.
    pub ids: Vec<u32>,
    /// Number of leading pad ids (< L).
    pub pad: usize,
}

impl PaddedPrompt {
    pub fn new(prompt: &[u32], block_length: usize) -> Result<Self> {
        if prompt.is_empty() {
            return input_err("prompt must hold at least one token");
        }
        let pad = (block_length - prompt.len() % block_length) % block_length;
        let mut ids = vec![PROMPT_PAD_ID; pad];
        ids.extend_from_slice(prompt);
        Ok(Self { ids, pad })
    }

    pub fn num_blocks(&self, block_length: usize) -> usize {
        self.ids.len() / block_length
    }

    /// The token mask of the reference: 0 on padding, 1 on prompt tokens.
    pub fn attention_mask(&self) -> Vec<u8> {
        (0..self.ids.len()).map(|i| u8::from(i >= self.pad)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_left_to_whole_blocks() {
        let p = PaddedPrompt::new(&[5, 6, 7, 8, 9], 4).unwrap();
        assert_eq!(p.ids, vec![0, 0, 0, 5, 6, 7, 8, 9]);
        assert_eq!(p.attention_mask(), vec![0, 0, 0, 1, 1, 1, 1, 1]);
        assert_eq!(PaddedPrompt::new(&[1, 2, 3, 4], 4).unwrap().pad, 0);
        assert!(PaddedPrompt::new(&[], 4).is_err());
    }
}

//! How a prompt is cut into blocks of L tokens for the block decoder.
//!
//! - [`PromptLayout::Reference`], exactly as the reference's
//!   `preprocess_inputs_for_generation`: left-pad with the pad id to a
//!   multiple of L, so the last prompt block is full and generation starts on
//!   a block boundary. The padding is fewer than L tokens, so no block is ever
//!   fully padded and every prompt block is attended to.
//! - [`PromptLayout::Aligned`]: block boundaries fixed from the first token.
//!   The block decoder sees the prompt's whole blocks; the `n mod L` tokens
//!   after them are the forced start of the first block the token decoder
//!   decodes (it is causal within a block, so it reads them as if it had
//!   chosen them). A prefix then lands on the same blocks, and the same cached
//!   keys, whatever follows it. A prompt shorter than one block has no whole
//!   block to start from and is laid out as the reference does.

pub use blockserve_config::PromptLayout;

use crate::error::{input_err, Result};

/// The id the reference pads prompts with (its eos/bos/pad id).
pub const PROMPT_PAD_ID: u32 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedPrompt {
    /// What the block decoder prefills: `pad` pad ids, then the prompt (and a
    /// resumed session's output so far) up to its last whole block.
    pub ids: Vec<u32>,
    /// Number of leading pad ids (< L).
    pub pad: usize,
    /// The tokens after the last whole block (fewer than L; only in the
    /// aligned layout, before the first generated block): the forced start
    /// of the first block, which the token decoder reads and does not emit.
    pub forced: Vec<u32>,
}

impl PaddedPrompt {
    /// The reference's layout of a new session's prompt.
    pub fn new(prompt: &[u32], block_length: usize) -> Result<Self> {
        Self::lay_out(prompt, &[], block_length, PromptLayout::Reference)
    }

    /// Lay out `prompt` followed by `generated`, the output a session produced
    /// before (empty for a new session; otherwise it must end on a block
    /// boundary of the layout, as a migrated session's output does). Where the
    /// blocks fall is set by the prompt alone, so a session resumed anywhere
    /// keeps the blocks it started with.
    pub fn lay_out(prompt: &[u32], generated: &[u32], block_length: usize, layout: PromptLayout) -> Result<Self> {
        let l = block_length;
        if prompt.is_empty() {
            return input_err("prompt must hold at least one token");
        }
        let pad = layout.pad(prompt.len(), l);
        let mut ids = Vec::with_capacity(pad + prompt.len() + generated.len());
        ids.resize(pad, PROMPT_PAD_ID);
        ids.extend_from_slice(prompt);
        ids.extend_from_slice(generated);
        let forced = ids.split_off(ids.len() / l * l);
        if !generated.is_empty() && !forced.is_empty() {
            return input_err(format!(
                "generated_ids: {} tokens after a {}-token prompt do not end on a block boundary of the {layout} layout (blocks of {l})",
                generated.len(),
                prompt.len()
            ));
        }
        Ok(Self { ids, pad, forced })
    }

    pub fn num_blocks(&self, block_length: usize) -> usize {
        self.ids.len() / block_length
    }

    /// Blocks the token decoder decodes to give `new_tokens` more tokens
    /// (the forced start shares the first one).
    pub fn new_blocks(&self, new_tokens: usize, block_length: usize) -> usize {
        (self.forced.len() + new_tokens).div_ceil(block_length)
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
        assert_eq!((p.ids.clone(), p.forced.clone()), (vec![0, 0, 0, 5, 6, 7, 8, 9], vec![]));
        assert_eq!(p.attention_mask(), vec![0, 0, 0, 1, 1, 1, 1, 1]);
        assert_eq!(PaddedPrompt::new(&[1, 2, 3, 4], 4).unwrap().pad, 0);
        assert!(PaddedPrompt::new(&[], 4).is_err());
    }

    #[test]
    fn aligned_keeps_boundaries_from_the_first_token() {
        let aligned = |p: &[u32], g: &[u32]| PaddedPrompt::lay_out(p, g, 4, PromptLayout::Aligned);
        let p = aligned(&[5, 6, 7, 8, 9, 10], &[]).unwrap();
        assert_eq!((p.ids.clone(), p.pad, p.forced.clone()), (vec![5, 6, 7, 8], 0, vec![9, 10]));
        // Two generated tokens complete the first block; 5 more take two blocks.
        assert_eq!(p.new_blocks(2, 4), 1);
        assert_eq!(p.new_blocks(5, 4), 2);
        // Whole blocks: the same as the reference's layout.
        assert_eq!(aligned(&[5, 6, 7, 8], &[]).unwrap(), PaddedPrompt::new(&[5, 6, 7, 8], 4).unwrap());
        // Shorter than a block: left-padded, and so on resume.
        assert_eq!(aligned(&[5, 6], &[]).unwrap(), PaddedPrompt::new(&[5, 6], 4).unwrap());
        assert_eq!(aligned(&[5, 6], &[1, 2, 3, 4]).unwrap().ids, vec![0, 0, 5, 6, 1, 2, 3, 4]);
        // Resumed after the first block: prompt and output make whole blocks.
        let r = aligned(&[5, 6, 7, 8, 9, 10], &[1, 2, 3, 4, 11, 12]).unwrap();
        assert_eq!((r.ids, r.forced), (vec![5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 11, 12], vec![]));
        let e = aligned(&[5, 6, 7, 8, 9, 10], &[1, 2, 3, 4]).unwrap_err().to_string();
        assert!(e.contains("generated_ids: 4 tokens after a 6-token prompt do not end on a block boundary of the aligned layout"), "{e}");
        assert!(PaddedPrompt::lay_out(&[5], &[1, 2], 4, PromptLayout::Reference).is_err());
    }
}

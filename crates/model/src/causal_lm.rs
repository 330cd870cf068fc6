//! The vanilla baseline: a plain GPT-NeoX causal LM in the Hugging Face Pythia
//! layout (`gpt_neox.*` + `embed_out`). Same incremental API shape as the block
//! decoder: prefill one session into its cache, step a batch of sessions of any
//! lengths by one token.

use candle_core::{Module, Tensor};
use candle_nn::Linear;

use crate::block_transformer::check_ids;
use crate::config::CausalLmConfig;
use crate::error::{input_err, Result};
use crate::gpt_neox::{linear, Cache, GptNeoX};
use crate::kv_cache::KvCache;
use crate::weights::Weights;

pub struct CausalLm {
    pub config: CausalLmConfig,
    embed_in: Tensor,
    stack: GptNeoX,
    lm_head: Linear,
}

impl CausalLm {
    pub fn load(w: &Weights, config: &CausalLmConfig) -> Result<Self> {
        let c = &config.stack;
        c.validate("gpt_neox")?;
        let embed_in = w.get("gpt_neox.embed_in.weight", &[c.vocab_size, c.hidden_size])?;
        let lm_head = if config.tie_word_embeddings && !w.contains("embed_out.weight") {
            Linear::new(embed_in.clone(), None)
        } else {
            linear(&w.pp("embed_out"), c.hidden_size, c.vocab_size, false)?
        };
        Ok(Self { embed_in, stack: GptNeoX::load(&w.pp("gpt_neox"), c)?, lm_head, config: config.clone() })
    }

    fn embed(&self, ids: &[u32], shape: (usize, usize)) -> Result<Tensor> {
        check_ids(ids, self.config.stack.vocab_size, "input_ids")?;
        let t = Tensor::from_slice(ids, ids.len(), self.embed_in.device())?;
        Ok(self.embed_in.embedding(&t)?.reshape((shape.0, shape.1, ()))?)
    }

    pub fn new_cache(&self, initial_capacity: usize) -> KvCache {
        self.stack.new_cache(initial_capacity)
    }

    pub fn max_positions(&self) -> usize {
        self.config.stack.max_position_embeddings
    }

    /// Full causal forward over equal-length rows: logits `[b, t, V]`.
    pub fn forward(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        let t = rows.first().map_or(0, |r| r.len());
        if t == 0 || rows.iter().any(|r| r.len() != t) {
            return input_err("input_ids must be a non-empty batch of non-empty rows of equal length");
        }
        let x = self.embed(&rows.concat(), (rows.len(), t))?;
        Ok(self.lm_head.forward(&self.stack.forward(&x, Cache::None)?)?)
    }

    /// Append one session's tokens (prompt or a chunk of it) to its cache and return
    /// the logits after the last one `[V]`.
    pub fn prefill(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        if ids.is_empty() {
            return input_err("prompt must hold at least one token");
        }
        let x = self.embed(ids, (1, ids.len()))?;
        let h = self.stack.forward(&x, Cache::Shared(cache))?;
        let last = h.narrow(1, ids.len() - 1, 1)?.squeeze(1)?.contiguous()?;
        Ok(self.lm_head.forward(&last)?.squeeze(0)?)
    }

    /// Feed one token per session (`tokens[i]` into `caches[i]`, any lengths);
    /// returns the next logits `[b, V]`.
    pub fn step(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let x = self.embed(tokens, (tokens.len(), 1))?;
        let h = self.stack.forward(&x, Cache::PerRow(caches))?;
        Ok(self.lm_head.forward(&h.squeeze(1)?)?)
    }
}

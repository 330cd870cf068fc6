//! The vanilla baseline: a plain GPT-NeoX causal LM in the Hugging Face Pythia
//! layout (`gpt_neox.*` + `embed_out`). Same incremental API shape as the block
//! decoder: one paged pass appends prompt chunks and single tokens of many
//! sessions, of any lengths.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;

use crate::block_transformer::check_ids;
use crate::config::CausalLmConfig;
use crate::error::{input_err, Result};
use crate::fused::Epilogue;
use crate::gpt_neox::{linear, GptNeoX};
use crate::paged::{KvPool, PagedPass};
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

    /// A pool of KV pages for this model.
    pub fn new_pool(&self, num_pages: usize, page_size: usize, dtype: DType, device: &Device) -> Result<KvPool> {
        self.stack.new_pool(num_pages, page_size, dtype, device)
    }

    pub fn device(&self) -> &Device {
        self.embed_in.device()
    }

    /// The dtype the weights (and so every activation and cache) use.
    pub fn dtype(&self) -> DType {
        self.embed_in.dtype()
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
        Ok(self.lm_head.forward(&self.stack.forward(&x)?)?)
    }

    /// log p of each token from position 1 on, per row (equal lengths).
    pub fn score_rows(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let t = rows.first().map_or(0, |r| r.len());
        if t < 2 {
            return input_err("scoring takes rows of at least 2 tokens");
        }
        let logits = self.forward(rows)?.narrow(1, 0, t - 1)?;
        let next: Vec<u32> = rows.iter().flat_map(|r| r[1..].iter().copied()).collect();
        let ids = Tensor::from_vec(next, (rows.len(), t - 1), logits.device())?;
        let lp = crate::sampling::logprobs_of(&logits, &ids)?.to_vec2::<f32>()?;
        Ok(lp)
    }

    /// Append tokens to sessions' caches in one pass (`ids` laid out by `pass`:
    /// prompt chunks and single tokens alike) and return the logits after the
    /// tokens at positions `rows` of `ids` `[rows.len(), V]`.
    pub fn forward_paged(&self, ids: &[u32], pool: &KvPool, pass: &PagedPass, rows: &[u32]) -> Result<Tensor> {
        check_ids(ids, self.config.stack.vocab_size, "input_ids")?;
        self.forward_paged_ids(&Tensor::from_slice(ids, ids.len(), self.device())?, pool, pass, rows)
    }

    /// [`Self::forward_paged`] with the ids already on the model's device, as
    /// the previous step's argmax left them (they are not checked).
    pub fn forward_paged_ids(&self, ids: &Tensor, pool: &KvPool, pass: &PagedPass, rows: &[u32]) -> Result<Tensor> {
        self.forward_paged_pick(ids, pool, pass, &Tensor::from_slice(rows, rows.len(), ids.device())?)
    }

    /// [`Self::forward_paged_ids`] with the rows to pick as a device tensor:
    /// no host-to-device copy, so a CUDA graph can capture it.
    pub(crate) fn forward_paged_pick(&self, ids: &Tensor, pool: &KvPool, pass: &PagedPass, pick: &Tensor) -> Result<Tensor> {
        let x = self.embed_in.embedding(ids)?;
        let h = self.stack.forward_paged(&x, pool, pass)?;
        // (Through the fused linear: on CUDA in bf16/f16 the cuBLASLt path
        // that every other layer takes.)
        crate::fused::linear(&self.lm_head, &h.index_select(pick, 0)?, Epilogue::Bias)
    }
}

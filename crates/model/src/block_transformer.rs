//! The Block Transformer: lookup embedder -> block decoder over block embeddings ->
//! expansion layer -> prefix token decoder (arXiv 2406.02657, reference layout).
//!
//! Everything here is incremental and batched for serving: the block decoder
//! appends prompt chunks and single blocks of many sessions, of any lengths, to a
//! paged block-level cache in one pass; the token decoder decodes one block for a
//! batch of context embeddings with a local cache of R+L-1 positions per row.
//! The training-path forward is kept for scoring and golden checks.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::Linear;

use crate::config::BlockTransformerConfig;
use crate::error::{input_err, Result};
use crate::fused::{self, Epilogue};
use crate::gpt_neox::{linear, GptNeoX};
use crate::paged::{KvPool, PagedPass, SeqKv};
use crate::weights::Weights;

/// Check that every id is inside the vocabulary before it indexes a table.
pub(crate) fn check_ids(ids: &[u32], vocab: usize, what: &str) -> Result<()> {
    match ids.iter().find(|&&i| i as usize >= vocab) {
        Some(bad) => input_err(format!("{what}: token id {bad} is out of range (vocab size {vocab})")),
        None => Ok(()),
    }
}

/// `[vocab, D_e]` table; a block's L rows are concatenated into `L * D_e`.
pub struct Embedder {
    table: Tensor,
    block_length: usize,
}

impl Embedder {
    /// `ids` `[n, L]` (u32) -> block embeddings `[n, L * D_e]`.
    pub(crate) fn embed_blocks(&self, ids: &Tensor) -> Result<Tensor> {
        let (n, l) = ids.dims2()?;
        if l != self.block_length {
            return input_err(format!("a block holds {} tokens, got {l}", self.block_length));
        }
        let rows = self.table.embedding(&ids.flatten_all()?)?;
        Ok(rows.reshape((n, l * self.table.dim(1)?))?)
    }
}

/// The GPT-NeoX stack over block embeddings; its output at block b is the context
/// embedding that conditions block b+1.
pub struct BlockDecoder {
    stack: GptNeoX,
}

impl BlockDecoder {
    /// A pool of block-level KV pages for this decoder.
    pub fn new_pool(&self, num_pages: usize, page_size: usize, dtype: DType, device: &Device) -> Result<KvPool> {
        self.stack.new_pool(num_pages, page_size, dtype, device)
    }

    /// Bytes of KV one block position costs.
    pub fn bytes_per_block(&self, dtype: DType) -> usize {
        KvPool::bytes_per_position(self.stack.config(), dtype)
    }

    /// Most blocks (prompt + generated) one session can hold.
    pub fn max_blocks(&self) -> usize {
        self.stack.config().max_position_embeddings
    }

    /// Append blocks to sessions' caches in one pass: `block_embeds` `[n, D_b]`
    /// holds the new blocks laid out by `pass` (prompt chunks, single blocks of
    /// running sessions, or both). Returns the context of every new block
    /// `[n, D_b]`; a session's last one conditions its next block.
    pub fn forward_paged(&self, block_embeds: &Tensor, pool: &KvPool, pass: &PagedPass) -> Result<Tensor> {
        self.stack.forward_paged(block_embeds, pool, pass)
    }

    /// Full causal pass without a cache: `[b, n, D_b]` -> contexts `[b, n, D_b]`.
    pub fn forward(&self, block_embeds: &Tensor) -> Result<Tensor> {
        self.stack.forward(block_embeds)
    }
}

/// The token decoder: own embedding, GPT-NeoX stack, untied LM head, and the
/// expansion layer that turns a context into R prefix vectors.
pub struct TokenDecoder {
    embed_in: Tensor,
    stack: GptNeoX,
    expansion: Linear,
    lm_head: Linear,
    ratio: usize,
    block_length: usize,
}

impl TokenDecoder {
    /// Context embeddings `[n, D_b]` -> prefix vectors `[n, R, D_t]`
    /// (output channels `[0, D_t)` are P1).
    pub fn prefix(&self, context: &Tensor) -> Result<Tensor> {
        let n = context.dim(0)?;
        Ok(fused::linear(&self.expansion, context, Epilogue::Bias)?.reshape((n, self.ratio, ()))?)
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let shape = ids.dims().to_vec();
        let rows = self.embed_in.embedding(&ids.flatten_all()?)?;
        let mut out_shape = shape;
        out_shape.push(rows.dim(1)?);
        Ok(rows.reshape(out_shape)?)
    }

    /// Training-path forward: for each context `[n, D_b]` and the first L-1 tokens
    /// of the block it conditions `[n, L-1]`, the logits of all L tokens `[n, L, V]`.
    /// Input `[P1..PR, e(x1)..e(x_{L-1})]` at positions 0..R+L-2; outputs at
    /// positions R-1..R+L-2.
    pub fn forward(&self, context: &Tensor, tokens: &Tensor) -> Result<Tensor> {
        let x = Tensor::cat(&[&self.prefix(context)?, &self.embed(tokens)?], 1)?;
        let h = self.stack.forward(&x)?;
        // Row-strided views are fine for the CPU matmul but not for cuBLAS.
        let h = h.narrow(1, self.ratio - 1, self.block_length)?.contiguous()?;
        Ok(self.lm_head.forward(&h)?)
    }

    /// Positions of the local cache: R prefix vectors and L-1 tokens.
    fn window(&self) -> usize {
        self.ratio + self.block_length - 1
    }

    /// The local cache for blocks of up to `max_batch` rows, allocated once: one
    /// page of R+L-1 positions per row.
    pub fn new_local(&self, max_batch: usize, dtype: DType, device: &Device) -> Result<LocalKv> {
        let pool = self.stack.new_pool(max_batch.max(1), self.window(), dtype, device)?;
        Ok(LocalKv { pool, passes: HashMap::new(), step: 0, batch: 0 })
    }

    /// Start a block for a batch: feed the prefix of each context `[b, D_b]` into
    /// the local cache (rows 0..b) and return the logits of each block's first
    /// token `[b, V]`.
    pub fn begin_block(&self, context: &Tensor, local: &mut LocalKv) -> Result<Tensor> {
        let b = context.dim(0)?;
        local.start(b, self.ratio, self.block_length)?;
        let prefix = self.prefix(context)?;
        let d = prefix.dim(2)?;
        let h = self.stack.forward_paged(&prefix.reshape((b * self.ratio, d))?, &local.pool, local.pass(0))?;
        // Each row's last prefix position predicts its first token.
        let last = h.reshape((b, self.ratio, d))?.narrow(1, self.ratio - 1, 1)?.squeeze(1)?.contiguous()?;
        fused::linear(&self.lm_head, &last, Epilogue::Bias)
    }

    /// Feed each row's newest token `[b]` (u32) and return the next logits `[b, V]`.
    /// At most L-1 calls follow one `begin_block`.
    pub fn next_token(&self, tokens: &Tensor, local: &mut LocalKv) -> Result<Tensor> {
        if local.step + 1 >= self.block_length {
            return input_err(format!("a block has only {} tokens", self.block_length));
        }
        if tokens.dim(0)? != local.batch {
            return input_err(format!("{} tokens for a block of {} rows", tokens.dim(0)?, local.batch));
        }
        local.step += 1;
        let h = self.stack.forward_paged(&self.embed(tokens)?, &local.pool, local.pass(local.step))?;
        fused::linear(&self.lm_head, &h, Epilogue::Bias)
    }
}

/// The token decoder's local cache: a fixed pool with one page per row, and the
/// passes of a block (prefix, then one token per step) built once per batch size.
pub struct LocalKv {
    pool: KvPool,
    passes: HashMap<usize, Vec<PagedPass>>,
    step: usize,
    batch: usize,
}

impl LocalKv {
    fn start(&mut self, batch: usize, ratio: usize, block_length: usize) -> Result<()> {
        if batch > self.pool.num_pages() {
            return input_err(format!("a block batch of {batch} rows exceeds the local cache's {}", self.pool.num_pages()));
        }
        if !self.passes.contains_key(&batch) {
            let device = self.pool.layer(0).device().clone();
            let mut seqs: Vec<SeqKv> = (0..batch as u32).map(|p| SeqKv::on_pages(vec![p])).collect();
            let mut passes = Vec::with_capacity(block_length);
            for step in 0..block_length {
                let count = if step == 0 { ratio } else { 1 };
                let mut refs: Vec<&mut SeqKv> = seqs.iter_mut().collect();
                passes.push(self.pool.plan(&mut refs, &vec![count; batch], &device)?);
            }
            self.passes.insert(batch, passes);
        }
        self.batch = batch;
        self.step = 0;
        Ok(())
    }

    fn pass(&self, step: usize) -> &PagedPass {
        &self.passes[&self.batch][step]
    }
}

pub struct BlockTransformer {
    pub config: BlockTransformerConfig,
    embedder: Option<Embedder>,
    block_decoder: Option<BlockDecoder>,
    token_decoder: Option<TokenDecoder>,
    device: Device,
    dtype: DType,
}

/// Which parts of a Block Transformer a process loads. Each serving tier
/// needs only its own: the block decoder tier the embedder and the block
/// decoder, the token decoder tier the token decoder (its contexts come from
/// the block decoder, also for scoring).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parts {
    /// Everything (one process runs both tiers, or a test compares).
    Whole,
    /// The embedder and the block decoder.
    Global,
    /// The token decoder.
    Local,
}

impl Parts {
    fn global(self) -> bool {
        self != Parts::Local
    }
    fn local(self) -> bool {
        self != Parts::Global
    }
}

/// Output of [`BlockTransformer::forward`].
pub struct ForwardOutput {
    /// `[b, n_blocks - 1, L, V]`: `logits[:, j, t]` predicts token t of block j+1.
    pub logits: Tensor,
    /// `[b, n_blocks, D_b]`.
    pub context: Tensor,
}

impl BlockTransformer {
    /// Load from a reference state dict. The block decoder's `embed_in` is never
    /// read: the block decoder is fed block embeddings.
    pub fn load(w: &Weights, config: &BlockTransformerConfig) -> Result<Self> {
        Self::load_parts(w, config, Parts::Whole)
    }

    /// Load only `parts`; the others are never read from the weights (a tier
    /// holds only its own weights in device memory).
    pub fn load_parts(w: &Weights, config: &BlockTransformerConfig, parts: Parts) -> Result<Self> {
        config.validate()?;
        let c = config;
        let td = &c.token_decoder.stack;
        let (d_b, d_t) = (c.block_decoder.hidden_size, td.hidden_size);
        let r = c.token_decoder.expansion_ratio;
        // The expansion layer is read first: a checkpoint of another shape
        // fails there, with the same message whatever the parts.
        let expansion = match parts.local() {
            true => {
                let ew = w.pp("token_decoder.expansion_layer");
                Some(Linear::new(ew.get("weight", &[r * d_t, d_b, 1])?.squeeze(2)?, Some(ew.get("bias", &[r * d_t])?)))
            }
            false => None,
        };
        let (embedder, block_decoder) = if parts.global() {
            let table = w.get("embedder.embeddings.weight", &[c.vocab_size, c.embedder.hidden_size])?;
            let stack = GptNeoX::load(&w.pp("block_decoder.gpt_neox"), &c.block_decoder)?;
            (Some(Embedder { table, block_length: c.block_length }), Some(BlockDecoder { stack }))
        } else {
            (None, None)
        };
        let token_decoder = match expansion {
            Some(expansion) => Some(TokenDecoder {
                embed_in: w.get("token_decoder.gpt_neox.embed_in.weight", &[td.vocab_size, d_t])?,
                stack: GptNeoX::load(&w.pp("token_decoder.gpt_neox"), td)?,
                expansion,
                lm_head: linear(&w.pp("token_decoder.embed_out"), d_t, td.vocab_size, false)?,
                ratio: r,
                block_length: c.block_length,
            }),
            None => None,
        };
        Ok(Self { embedder, block_decoder, token_decoder, config: config.clone(), device: w.device().clone(), dtype: w.dtype() })
    }

    /// The embedder (loaded with [`Parts::Whole`] or [`Parts::Global`]).
    pub fn embedder(&self) -> &Embedder {
        self.embedder.as_ref().expect("this process loaded the model without its embedder (Parts::Local)")
    }

    /// The block decoder (loaded with [`Parts::Whole`] or [`Parts::Global`]).
    pub fn block_decoder(&self) -> &BlockDecoder {
        self.block_decoder.as_ref().expect("this process loaded the model without its block decoder (Parts::Local)")
    }

    /// The token decoder (loaded with [`Parts::Whole`] or [`Parts::Local`]).
    pub fn token_decoder(&self) -> &TokenDecoder {
        self.token_decoder.as_ref().expect("this process loaded the model without its token decoder (Parts::Global)")
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the weights (and so every activation and cache) use.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Most blocks (prompt + generated) one session can hold.
    pub fn max_blocks(&self) -> usize {
        self.config.block_decoder.max_position_embeddings
    }

    /// Whether every linear layer's dimensions are multiples of 8: in
    /// bf16/f16 on CUDA they then all take the per-thread cuBLASLt path
    /// (`lt_linear`), and none uses candle's cuBLAS handle, which all threads
    /// share (what running the two tiers on two threads at once needs).
    pub fn linears_on_lt(&self) -> bool {
        let c = &self.config;
        let (b, t) = (&c.block_decoder, &c.token_decoder.stack);
        [b.hidden_size, b.intermediate_size, t.hidden_size, t.intermediate_size, c.vocab_size].iter().all(|d| d.is_multiple_of(8))
    }

    pub fn block_length(&self) -> usize {
        self.config.block_length
    }

    /// Embed whole blocks given as flat ids (a multiple of L) -> `[n_blocks, D_b]`.
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let l = self.block_length();
        if ids.is_empty() || !ids.len().is_multiple_of(l) {
            return input_err(format!("{} ids is not a positive whole number of {l}-token blocks", ids.len()));
        }
        check_ids(ids, self.config.vocab_size, "input_ids")?;
        let t = Tensor::from_slice(ids, (ids.len() / l, l), &self.device)?;
        self.embedder().embed_blocks(&t)
    }

    /// What the Score RPC computes: log p of each token of blocks 1..n given
    /// `contexts` `[n, D_b]` (each the context of the block before) and those
    /// blocks' flat ids (`n * L`, in the same order). Rows may come from any
    /// sequences.
    pub fn score_blocks(&self, contexts: &Tensor, blocks: &[u32]) -> Result<Vec<f32>> {
        let l = self.block_length();
        let n = contexts.dim(0)?;
        if blocks.len() != n * l {
            return input_err(format!("{} ids for {n} blocks of {l}", blocks.len()));
        }
        let ids = Tensor::from_slice(blocks, (n, l), contexts.device())?;
        let logits = self.token_decoder().forward(contexts, &ids.narrow(1, 0, l - 1)?.contiguous()?)?;
        Ok(crate::sampling::logprobs_of(&logits, &ids)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Score rows of whole blocks (equal lengths, at least 2 blocks): the
    /// block decoder's contexts, then [`Self::score_blocks`]. Row r's log
    /// probs cover its tokens from position L on.
    pub fn score_rows(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let l = self.block_length();
        let len = rows.first().map_or(0, |r| r.len());
        if rows.iter().any(|r| r.len() != len) || !len.is_multiple_of(l) || len < 2 * l {
            return input_err(format!("scoring takes rows of equal length holding at least 2 whole blocks of {l}"));
        }
        let (b, nb) = (rows.len(), len / l);
        let embeds = self.embed_ids(&rows.concat())?.reshape((b, nb, ()))?;
        let context = self.block_decoder().forward(&embeds)?;
        let d = context.dim(D::Minus1)?;
        let ctx = context.narrow(1, 0, nb - 1)?.reshape((b * (nb - 1), d))?;
        let blocks: Vec<u32> = rows.iter().flat_map(|r| r[l..].iter().copied()).collect();
        let flat = self.score_blocks(&ctx, &blocks)?;
        Ok(flat.chunks(len - l).map(|c| c.to_vec()).collect())
    }

    /// The reference training forward over rows of whole blocks (`[b, n*L]` ids,
    /// every row the same length): contexts of all blocks and the logits of
    /// blocks 1..n, each conditioned on the previous block's context.
    pub fn forward(&self, rows: &[Vec<u32>]) -> Result<ForwardOutput> {
        let l = self.block_length();
        let b = rows.len();
        let len = rows.first().map_or(0, |r| r.len());
        if b == 0 || rows.iter().any(|r| r.len() != len) {
            return input_err("input_ids must be a non-empty batch of rows of equal length");
        }
        let nb = len / l;
        let flat: Vec<u32> = rows.concat();
        let embeds = self.embed_ids(&flat)?.reshape((b, nb, ()))?;
        let context = self.block_decoder().forward(&embeds)?;
        if nb < 2 {
            return input_err(format!("logits need at least 2 blocks ({} tokens) per row, got {len}", 2 * l));
        }
        let d = context.dim(D::Minus1)?;
        let ctx = context.narrow(1, 0, nb - 1)?.reshape((b * (nb - 1), d))?;
        let ids = Tensor::from_vec(flat, (b, nb, l), &self.device)?;
        let next = ids.narrow(1, 1, nb - 1)?.narrow(2, 0, l - 1)?.reshape((b * (nb - 1), l - 1))?;
        let logits = self.token_decoder().forward(&ctx, &next)?;
        let v = logits.dim(D::Minus1)?;
        Ok(ForwardOutput { logits: logits.reshape((b, nb - 1, l, v))?, context })
    }
}

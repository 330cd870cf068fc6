//! Model configurations: the GPT-NeoX stack shared by every decoder, the Block
//! Transformer built from three parts, and the vanilla Pythia causal LM.
//!
//! The Block Transformer's `config.json` is the project's own format (documented in
//! `docs/model-format.md`); it carries every knob the reference implementation's
//! module tree depends on, so no default hides in code.

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, Result};

/// Activation of the MLP. GPT-NeoX `"gelu"` is the exact erf form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    #[serde(rename = "gelu")]
    GeluErf,
    /// tanh approximation (`gelu_new`, `gelu_fast`, `gelu_pytorch_tanh` in transformers).
    #[serde(rename = "gelu_new", alias = "gelu_fast", alias = "gelu_pytorch_tanh")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

fn default_true() -> bool {
    true
}

/// One GPT-NeoX transformer stack (Pythia layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptNeoXConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub rotary_pct: f64,
    pub rotary_emb_base: f64,
    pub layer_norm_eps: f64,
    pub use_parallel_residual: bool,
    pub hidden_act: Activation,
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
}

impl GptNeoXConfig {
    /// The base config of `EleutherAI/pythia-410m-deduped`, which every reference
    /// trainer yaml names as `model_name_or_path` and then overrides.
    pub fn pythia_410m_base() -> Self {
        Self {
            hidden_size: 1024,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            intermediate_size: 4096,
            rotary_pct: 0.25,
            rotary_emb_base: 10000.0,
            layer_norm_eps: 1e-5,
            use_parallel_residual: true,
            hidden_act: Activation::GeluErf,
            attention_bias: true,
            max_position_embeddings: 2048,
            vocab_size: 50304,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Number of leading dims of each head that are rotated (always even).
    pub fn rotary_dim(&self) -> usize {
        let d = (self.head_dim() as f64 * self.rotary_pct) as usize;
        d - d % 2
    }

    pub fn validate(&self, what: &str) -> Result<()> {
        let bad = |msg: String| Err(ConfigError::Config(format!("{what}: {msg}")));
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.num_hidden_layers == 0 {
            return bad("hidden_size, num_attention_heads and num_hidden_layers must be > 0".into());
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return bad(format!("hidden_size {} is not a multiple of num_attention_heads {}", self.hidden_size, self.num_attention_heads));
        }
        if !(0.0..=1.0).contains(&self.rotary_pct) {
            return bad(format!("rotary_pct {} is outside 0..=1", self.rotary_pct));
        }
        if self.vocab_size == 0 || self.max_position_embeddings == 0 {
            return bad("vocab_size and max_position_embeddings must be > 0".into());
        }
        Ok(())
    }
}

/// The lookup embedder: one table `[vocab, hidden_size]`; the L rows of a block are
/// concatenated into one block embedding of `L * hidden_size`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbedderConfig {
    #[serde(rename = "type", default = "lookup")]
    pub kind: String,
    pub hidden_size: usize,
    #[serde(default = "concat")]
    pub projection: String,
    #[serde(default = "one")]
    pub n_embedding_tokens: usize,
    /// The reference never sets it, so row 0 is an ordinary row; kept for fidelity.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn lookup() -> String {
    "lookup".into()
}
fn concat() -> String {
    "concat".into()
}
fn one() -> usize {
    1
}
fn expansion_layer() -> String {
    "expansion_layer".into()
}
fn prefix() -> String {
    "prefix".into()
}

/// The token decoder: a GPT-NeoX stack plus the expansion layer that turns one
/// context embedding into `expansion_ratio` prefix vectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenDecoderConfig {
    #[serde(flatten)]
    pub stack: GptNeoXConfig,
    #[serde(default = "expansion_layer")]
    pub expansion_method: String,
    pub expansion_ratio: usize,
    #[serde(default = "prefix")]
    pub decoding_strategy: String,
}

/// A whole Block Transformer (`model_type: "block_transformer"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockTransformerConfig {
    pub model_type: String,
    pub block_length: usize,
    pub vocab_size: usize,
    pub embedder: EmbedderConfig,
    pub block_decoder: GptNeoXConfig,
    pub token_decoder: TokenDecoderConfig,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Storage dtype of the weights on disk (informational; the run dtype is chosen at load).
    #[serde(default)]
    pub dtype: Option<String>,
}

pub const BLOCK_TRANSFORMER_TYPE: &str = "block_transformer";

impl BlockTransformerConfig {
    /// Width of one block embedding (`L * D_e`); must equal the block decoder's width.
    pub fn block_embedding_size(&self) -> usize {
        self.block_length * self.embedder.hidden_size
    }

    /// Number of token-decoder positions in one block: R prefix vectors plus L-1 tokens.
    pub fn local_positions(&self) -> usize {
        self.token_decoder.expansion_ratio + self.block_length - 1
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(ConfigError::Config(msg));
        if self.model_type != BLOCK_TRANSFORMER_TYPE {
            return bad(format!("model_type is {:?}, expected {BLOCK_TRANSFORMER_TYPE:?}", self.model_type));
        }
        self.block_decoder.validate("block_decoder")?;
        self.token_decoder.stack.validate("token_decoder")?;
        if self.block_length == 0 {
            return bad("block_length must be > 0".into());
        }
        if self.embedder.kind != "lookup" || self.embedder.projection != "concat" || self.embedder.n_embedding_tokens != 1 {
            return bad(format!(
                "embedder: only type \"lookup\" with projection \"concat\" and n_embedding_tokens 1 is supported, found type {:?}, projection {:?}, n_embedding_tokens {}",
                self.embedder.kind, self.embedder.projection, self.embedder.n_embedding_tokens
            ));
        }
        if self.block_embedding_size() != self.block_decoder.hidden_size {
            return bad(format!(
                "block_length {} x embedder.hidden_size {} = {} must equal block_decoder.hidden_size {}",
                self.block_length,
                self.embedder.hidden_size,
                self.block_embedding_size(),
                self.block_decoder.hidden_size
            ));
        }
        let td = &self.token_decoder;
        if td.expansion_method != "expansion_layer" || td.decoding_strategy != "prefix" {
            return bad(format!(
                "token_decoder: only expansion_method \"expansion_layer\" with decoding_strategy \"prefix\" is supported, found {:?} / {:?}",
                td.expansion_method, td.decoding_strategy
            ));
        }
        if td.expansion_ratio == 0 {
            return bad("token_decoder.expansion_ratio must be > 0".into());
        }
        if self.local_positions() > td.stack.max_position_embeddings {
            return bad(format!(
                "token decoder needs {} positions but max_position_embeddings is {}",
                self.local_positions(),
                td.stack.max_position_embeddings
            ));
        }
        if self.vocab_size != td.stack.vocab_size {
            return bad(format!("vocab_size {} differs from token_decoder.vocab_size {}", self.vocab_size, td.stack.vocab_size));
        }
        Ok(())
    }
}

/// A plain GPT-NeoX causal LM in the Hugging Face layout (`model_type: "gpt_neox"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CausalLmConfig {
    #[serde(flatten)]
    pub stack: GptNeoXConfig,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
}

/// Either kind of model a blockserve process can load.
// One per process, built once: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Block(BlockTransformerConfig),
    Vanilla(CausalLmConfig),
}

impl ModelConfig {
    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            ModelConfig::Block(c) => c.eos_token_id,
            ModelConfig::Vanilla(c) => c.eos_token_id,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Block(c) => c.vocab_size,
            ModelConfig::Vanilla(c) => c.stack.vocab_size,
        }
    }

    /// Parse a `config.json`'s text: the project's Block Transformer format or
    /// Hugging Face GPT-NeoX, told apart by `model_type`, then validated.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| ConfigError::Config(format!("invalid JSON: {e}")))?;
        match v.get("model_type").and_then(|t| t.as_str()) {
            Some(BLOCK_TRANSFORMER_TYPE) => {
                let c: BlockTransformerConfig = serde_json::from_value(v).map_err(|e| ConfigError::Config(e.to_string()))?;
                c.validate()?;
                Ok(ModelConfig::Block(c))
            }
            Some("gpt_neox") => {
                let c: CausalLmConfig = serde_json::from_value(v).map_err(|e| ConfigError::Config(e.to_string()))?;
                c.stack.validate("gpt_neox")?;
                Ok(ModelConfig::Vanilla(c))
            }
            other => Err(ConfigError::Config(format!("model_type is {other:?}; expected \"{BLOCK_TRANSFORMER_TYPE}\" or \"gpt_neox\""))),
        }
    }

    pub fn to_json(&self) -> String {
        match self {
            ModelConfig::Block(c) => serde_json::to_string_pretty(c),
            ModelConfig::Vanilla(c) => {
                let mut v = serde_json::to_value(c).expect("config serialises");
                v["model_type"] = "gpt_neox".into();
                v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
                serde_json::to_string_pretty(&v)
            }
        }
        .expect("config serialises")
    }
}

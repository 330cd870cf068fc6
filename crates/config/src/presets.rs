//! Named model shapes: the reference's `block_main_b4_*` trainer presets (with the
//! reference's autofill applied) and Pythia shapes for the vanilla baselines.

use crate::error::{ConfigError, Result};
use crate::model::{BlockTransformerConfig, CausalLmConfig, EmbedderConfig, GptNeoXConfig, ModelConfig, TokenDecoderConfig, BLOCK_TRANSFORMER_TYPE};

/// The reference's `util/config.py::preprocess_config` rule for a stack whose yaml
/// leaves the head count unset: 32-wide heads up to 256, 64 up to 1536, then 128.
pub fn autofill_heads(hidden: usize) -> usize {
    if hidden <= 256 {
        hidden / 32
    } else if hidden <= 1536 {
        hidden / 64
    } else {
        hidden / 128
    }
}

/// One row of the preset table: (name, D_e, D_b = D_t, layers per decoder).
const BLOCK_PRESETS: &[(&str, usize, usize, usize)] = &[
    ("block_main_b4_5", 64, 256, 3),
    ("block_main_b4_19", 128, 512, 3),
    ("block_main_b4_85", 192, 768, 6),
    ("block_main_b4_300", 256, 1024, 12),
    ("block_main_b4_800", 512, 2048, 8),
    ("block_main_b4_1.2b", 512, 2048, 12),
];

/// Pythia shapes served as vanilla models: (name, hidden, layers, heads).
const VANILLA_PRESETS: &[(&str, usize, usize, usize)] =
    &[("vanilla_70", 512, 6, 8), ("vanilla_160", 768, 12, 12), ("vanilla_410", 1024, 24, 16), ("vanilla_1b", 2048, 16, 8)];

pub fn preset_names() -> Vec<&'static str> {
    BLOCK_PRESETS.iter().map(|p| p.0).chain(VANILLA_PRESETS.iter().map(|p| p.0)).chain(["block_demo_bytes"]).collect()
}

/// A Pythia-410m-based stack with the given width and depth, heads and MLP autofilled.
pub fn pythia_stack(hidden: usize, layers: usize) -> GptNeoXConfig {
    GptNeoXConfig {
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: autofill_heads(hidden),
        intermediate_size: 4 * hidden,
        ..GptNeoXConfig::pythia_410m_base()
    }
}

/// Assemble a Block Transformer config in the reference's shape: lookup/concat
/// embedder, expansion layer with R = 2, prefix decoding, eos = bos = pad = 0.
pub fn block_transformer(block_length: usize, embed_dim: usize, block: GptNeoXConfig, token: GptNeoXConfig) -> BlockTransformerConfig {
    BlockTransformerConfig {
        model_type: BLOCK_TRANSFORMER_TYPE.into(),
        block_length,
        vocab_size: token.vocab_size,
        embedder: EmbedderConfig { kind: "lookup".into(), hidden_size: embed_dim, projection: "concat".into(), n_embedding_tokens: 1, pad_token_id: None },
        block_decoder: block,
        token_decoder: TokenDecoderConfig { stack: token, expansion_method: "expansion_layer".into(), expansion_ratio: 2, decoding_strategy: "prefix".into() },
        eos_token_id: Some(0),
        bos_token_id: Some(0),
        pad_token_id: Some(0),
        dtype: None,
    }
}

/// The bundled demo model's shape: a small Block Transformer over the 257-entry
/// byte-level vocabulary (id 0 = end of text, then the 256 bytes).
fn demo_bytes() -> ModelConfig {
    let stack = GptNeoXConfig { vocab_size: 257, ..pythia_stack(128, 2) };
    ModelConfig::Block(block_transformer(4, 32, stack.clone(), stack))
}

pub fn preset(name: &str) -> Result<ModelConfig> {
    if name == "block_demo_bytes" {
        return Ok(demo_bytes());
    }
    if let Some(&(_, de, d, layers)) = BLOCK_PRESETS.iter().find(|p| p.0 == name) {
        let stack = pythia_stack(d, layers);
        return Ok(ModelConfig::Block(block_transformer(4, de, stack.clone(), stack)));
    }
    if let Some(&(_, d, layers, heads)) = VANILLA_PRESETS.iter().find(|p| p.0 == name) {
        let stack = GptNeoXConfig { num_attention_heads: heads, ..pythia_stack(d, layers) };
        return Ok(ModelConfig::Vanilla(CausalLmConfig { stack, tie_word_embeddings: false, eos_token_id: Some(0), bos_token_id: Some(0) }));
    }
    Err(ConfigError::Config(format!("unknown preset {name:?}; known presets: {}", preset_names().join(", "))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_design_table() {
        // (name, D_e, D, layers, heads) straight from DESIGN.md's table.
        let table = [
            ("block_main_b4_5", 64, 256, 3, 8),
            ("block_main_b4_19", 128, 512, 3, 8),
            ("block_main_b4_85", 192, 768, 6, 12),
            ("block_main_b4_300", 256, 1024, 12, 16),
            ("block_main_b4_800", 512, 2048, 8, 16),
            ("block_main_b4_1.2b", 512, 2048, 12, 16),
        ];
        for (name, de, d, layers, heads) in table {
            let ModelConfig::Block(c) = preset(name).unwrap() else { panic!("{name} is a block preset") };
            c.validate().unwrap();
            assert_eq!(c.embedder.hidden_size, de, "{name}");
            for s in [&c.block_decoder, &c.token_decoder.stack] {
                assert_eq!((s.hidden_size, s.num_hidden_layers, s.num_attention_heads), (d, layers, heads), "{name}");
                assert_eq!(s.intermediate_size, 4 * d, "{name}");
                assert_eq!(s.vocab_size, 50304);
            }
        }
        assert!(preset("block_main_b4_7").unwrap_err().to_string().contains("block_main_b4_85"));
    }
}

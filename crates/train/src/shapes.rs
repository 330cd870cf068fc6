//! Model shapes for training. Any of the model crate's presets (the
//! reference's `block_main_b4_*`, Pythia's `vanilla_*`) with the vocabulary
//! set to the tokenizer's, plus:
//! - `vanilla_s`: a 6-layer, 256-wide GPT-NeoX with the same non-embedding
//!   parameter count as `block_main_b4_5` (4.7 M: two 3-layer stacks of 256);
//! - `vanilla_LxD`: a GPT-NeoX of L layers of width D (Pythia's proportions),
//!   for vanilla baselines smaller than `vanilla_s`;
//! - `tiny_block`, `tiny_vanilla`: one-layer, 32-wide shapes for tests.

use blockserve_model::config::{CausalLmConfig, GptNeoXConfig, ModelConfig};
use blockserve_model::presets::{block_transformer, preset, pythia_stack};

use crate::Result;

/// The training shapes this crate adds to the model presets.
pub const SHAPES: &[&str] = &["vanilla_s", "vanilla_LxD", "tiny_block", "tiny_vanilla"];

/// (layers, width) of a `vanilla_LxD` name.
fn layers_by_width(name: &str) -> Option<(usize, usize)> {
    let (l, d) = name.strip_prefix("vanilla_")?.split_once('x')?;
    let (l, d) = (l.parse().ok()?, d.parse().ok()?);
    (l > 0 && d > 0 && d % 32 == 0).then_some((l, d))
}

fn vanilla(stack: GptNeoXConfig) -> ModelConfig {
    ModelConfig::Vanilla(CausalLmConfig { stack, tie_word_embeddings: false, eos_token_id: Some(0), bos_token_id: Some(0) })
}

fn tiny_stack() -> GptNeoXConfig {
    GptNeoXConfig { num_attention_heads: 2, max_position_embeddings: 256, ..pythia_stack(32, 1) }
}

/// The shape `name` over a vocabulary of `vocab_size` (id 0 = end of text).
pub fn shape(name: &str, vocab_size: usize) -> Result<ModelConfig> {
    let mut config = match name {
        "vanilla_s" => vanilla(pythia_stack(256, 6)),
        "tiny_vanilla" => vanilla(tiny_stack()),
        "tiny_block" => ModelConfig::Block(block_transformer(4, 8, tiny_stack(), tiny_stack())),
        other => match layers_by_width(other) {
            Some((layers, width)) => vanilla(pythia_stack(width, layers)),
            None => preset(other)?,
        },
    };
    match &mut config {
        ModelConfig::Block(c) => {
            c.vocab_size = vocab_size;
            c.block_decoder.vocab_size = vocab_size;
            c.token_decoder.stack.vocab_size = vocab_size;
        }
        ModelConfig::Vanilla(c) => c.stack.vocab_size = vocab_size,
    }
    Ok(config)
}

/// Parameters of a shape: (non-embedding, total). Embeddings are the token
/// tables and output heads; the rest are the stacks and the expansion layer.
pub fn parameter_counts(config: &ModelConfig) -> (usize, usize) {
    let stack = |s: &GptNeoXConfig| {
        let d = s.hidden_size;
        s.num_hidden_layers * (4 * d + 3 * d * d + 3 * d + d * d + d + 2 * d * s.intermediate_size + s.intermediate_size + d) + 2 * d
    };
    match config {
        ModelConfig::Block(c) => {
            let t = &c.token_decoder.stack;
            let r = c.token_decoder.expansion_ratio;
            let body = stack(&c.block_decoder) + stack(t) + r * t.hidden_size * (c.block_decoder.hidden_size + 1);
            (body, body + c.vocab_size * (c.embedder.hidden_size + 2 * t.hidden_size))
        }
        ModelConfig::Vanilla(c) => {
            let body = stack(&c.stack);
            (body, body + 2 * c.stack.vocab_size * c.stack.hidden_size)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vanilla_l_x_d_names_a_stack_and_odd_names_are_refused() {
        let ModelConfig::Vanilla(c) = shape("vanilla_2x128", 8192).unwrap() else { panic!("not vanilla") };
        let s = &c.stack;
        assert_eq!((s.num_hidden_layers, s.hidden_size, s.num_attention_heads, s.intermediate_size, s.vocab_size), (2, 128, 4, 512, 8192));
        // 2 layers of 12 d^2 + 13 d (198,272), plus the final norm's 2 d.
        assert_eq!(parameter_counts(&shape("vanilla_2x128", 8192).unwrap()), (396_800, 396_800 + 2 * 8192 * 128));
        for bad in ["vanilla_2x100", "vanilla_0x128", "vanilla_x128", "vanilla_2x"] {
            assert!(shape(bad, 8192).is_err(), "{bad}");
        }
    }
}

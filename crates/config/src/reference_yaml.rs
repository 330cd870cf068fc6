//! The reference implementation's trainer yaml (`conf/trainer/block_main_b4_*.yaml`),
//! as users of reference checkpoints keep it beside `model.safetensors`.
//!
//! Only the model-shaping keys are read; training keys are ignored. Each decoder's
//! config starts from the Pythia base named by `model_name_or_path`, takes the
//! yaml's `config:` overrides, and then gets the reference's autofill
//! (`num_attention_heads`, `intermediate_size`) where the yaml left them unset.

use serde::Deserialize;
use serde_yaml::Value;

use crate::error::{ConfigError, Result};
use crate::model::{BlockTransformerConfig, GptNeoXConfig};
use crate::presets::{autofill_heads, block_transformer};

#[derive(Debug, Default, Deserialize)]
struct TrainerYaml {
    block_length: Option<usize>,
    precision: Option<String>,
    #[serde(default)]
    embedder: EmbedderYaml,
    block_decoder: DecoderYaml,
    token_decoder: DecoderYaml,
}

#[derive(Debug, Default, Deserialize)]
struct EmbedderYaml {
    cls: Option<String>,
    n_embedding_tokens: Option<usize>,
    projection_method: Option<String>,
    #[serde(default)]
    config: Overrides,
}

#[derive(Debug, Default, Deserialize)]
struct DecoderYaml {
    cls: Option<String>,
    model_name_or_path: Option<String>,
    expansion_method: Option<String>,
    expansion_ratio: Option<usize>,
    decoding_strategy: Option<String>,
    #[serde(default)]
    config: Overrides,
}

/// The `config:` mapping of a part: Hugging Face config keys overriding the base.
#[derive(Debug, Default, Deserialize)]
struct Overrides {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    rotary_pct: Option<f64>,
    rotary_emb_base: Option<f64>,
    layer_norm_eps: Option<f64>,
    use_parallel_residual: Option<bool>,
    max_position_embeddings: Option<usize>,
    hidden_act: Option<Value>,
}

/// Base configs of the `EleutherAI/pythia-*` checkpoints a yaml may name; every
/// Pythia shares rotary 0.25/10000, eps 1e-5, parallel residual, GELU, vocab 50304.
fn pythia_base(name: &str) -> Option<GptNeoXConfig> {
    let short = name.rsplit('/').next()?.trim_end_matches("-deduped");
    let (hidden, layers, heads) = match short {
        "pythia-14m" => (128, 6, 4),
        "pythia-31m" => (256, 6, 8),
        "pythia-70m" => (512, 6, 8),
        "pythia-160m" => (768, 12, 12),
        "pythia-410m" => (1024, 24, 16),
        "pythia-1b" => (2048, 16, 8),
        "pythia-1.4b" => (2048, 24, 16),
        "pythia-2.8b" => (2560, 32, 32),
        "pythia-6.9b" => (4096, 32, 32),
        "pythia-12b" => (5120, 36, 40),
        _ => return None,
    };
    Some(GptNeoXConfig {
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: 4 * hidden,
        ..GptNeoXConfig::pythia_410m_base()
    })
}

fn decoder_config(part: &str, y: &DecoderYaml) -> Result<GptNeoXConfig> {
    if let Some(cls) = &y.cls {
        if cls != "gpt-neo-x" {
            return Err(ConfigError::Config(format!("{part}.cls is {cls:?}; only \"gpt-neo-x\" is supported")));
        }
    }
    let name = y.model_name_or_path.as_deref().unwrap_or("EleutherAI/pythia-410m-deduped");
    let mut c = pythia_base(name)
        .ok_or_else(|| ConfigError::Config(format!("{part}.model_name_or_path {name:?} is not a known EleutherAI Pythia config (pythia-14m .. pythia-12b)")))?;
    let o = &y.config;
    if let Some(v) = o.hidden_size {
        c.hidden_size = v;
    }
    if let Some(v) = o.num_hidden_layers {
        c.num_hidden_layers = v;
    }
    // Autofill happens only when the yaml leaves the knob unset, and follows the
    // (possibly overridden) hidden size.
    c.num_attention_heads = o.num_attention_heads.unwrap_or_else(|| autofill_heads(c.hidden_size));
    c.intermediate_size = o.intermediate_size.unwrap_or(4 * c.hidden_size);
    if let Some(v) = o.vocab_size {
        c.vocab_size = v;
    }
    if let Some(v) = o.rotary_pct {
        c.rotary_pct = v;
    }
    if let Some(v) = o.rotary_emb_base {
        c.rotary_emb_base = v;
    }
    if let Some(v) = o.layer_norm_eps {
        c.layer_norm_eps = v;
    }
    if let Some(v) = o.use_parallel_residual {
        c.use_parallel_residual = v;
    }
    if let Some(v) = o.max_position_embeddings {
        c.max_position_embeddings = v;
    }
    if let Some(v) = &o.hidden_act {
        c.hidden_act = serde_yaml::from_value(v.clone()).map_err(|e| ConfigError::Config(format!("{part}.config.hidden_act: {e}")))?;
    }
    Ok(c)
}

/// Parse a reference trainer yaml into the project's config.
pub fn parse_trainer_yaml(text: &str) -> Result<BlockTransformerConfig> {
    let y: TrainerYaml = serde_yaml::from_str(text).map_err(|e| ConfigError::Config(format!("reference trainer yaml: {e}")))?;
    let block_length = y.block_length.unwrap_or(4);
    let block = decoder_config("block_decoder", &y.block_decoder)?;
    let token = decoder_config("token_decoder", &y.token_decoder)?;
    let embed_dim = y.embedder.config.hidden_size.unwrap_or(block.hidden_size / block_length.max(1));
    let mut c = block_transformer(block_length, embed_dim, block, token);
    if let Some(v) = y.embedder.config.vocab_size {
        if v != c.vocab_size {
            return Err(ConfigError::Config(format!("embedder.config.vocab_size {v} differs from token_decoder vocab {}", c.vocab_size)));
        }
    }
    if let Some(cls) = y.embedder.cls {
        c.embedder.kind = cls;
    }
    if let Some(p) = y.embedder.projection_method {
        c.embedder.projection = p;
    }
    if let Some(n) = y.embedder.n_embedding_tokens {
        c.embedder.n_embedding_tokens = n;
    }
    c.dtype = match y.precision.as_deref() {
        Some("fp32" | "32") => Some("float32".into()),
        Some("bf16" | "bf16-mixed") => Some("bfloat16".into()),
        Some("fp16" | "16" | "16-mixed") => Some("float16".into()),
        _ => None,
    };
    let t = &y.token_decoder;
    if let Some(m) = &t.expansion_method {
        c.token_decoder.expansion_method = m.clone();
    }
    if let Some(r) = t.expansion_ratio {
        c.token_decoder.expansion_ratio = r;
    }
    if let Some(s) = &t.decoding_strategy {
        c.token_decoder.decoding_strategy = s.clone();
    }
    c.validate()?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    #[test]
    fn preset_shaped_yaml_autofills_heads_and_mlp() {
        // The shape of the reference's block_main_b4_85.yaml: widths and depths only.
        let yaml = "block_length: 4\nembedder:\n  cls: lookup\n  config:\n    hidden_size: 192\n\
block_decoder:\n  cls: gpt-neo-x\n  model_name_or_path: EleutherAI/pythia-410m-deduped\n  config:\n    hidden_size: 768\n    num_hidden_layers: 6\n\
token_decoder:\n  cls: gpt-neo-x\n  model_name_or_path: EleutherAI/pythia-410m-deduped\n  expansion_method: expansion_layer\n  expansion_ratio: 2\n  decoding_strategy: prefix\n  config:\n    hidden_size: 768\n    num_hidden_layers: 6\n";
        let c = parse_trainer_yaml(yaml).unwrap();
        let ModelConfig::Block(p) = crate::presets::preset("block_main_b4_85").unwrap() else { unreachable!() };
        assert_eq!(c, p);
    }

    #[test]
    fn unknown_base_is_named() {
        let yaml = "block_decoder:\n  model_name_or_path: gpt2\ntoken_decoder: {}\n";
        let e = parse_trainer_yaml(yaml).unwrap_err().to_string();
        assert!(e.contains("block_decoder.model_name_or_path \"gpt2\""), "{e}");
    }
}

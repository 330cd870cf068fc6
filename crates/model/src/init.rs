//! Random-weight models of any shape, saved in the layout the loader reads (the
//! reference's state-dict keys for Block Transformers, Hugging Face keys for
//! vanilla). The reference benchmarks on random weights, and so do we.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{GptNeoXConfig, ModelConfig};
use crate::error::{ModelError, Result};

/// Deterministic N(0, std) values (Box-Muller over ChaCha8).
struct Normal(ChaCha8Rng);

impl Normal {
    fn tensor(&mut self, shape: &[usize], std: f32, mean: f32, dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let mut v = Vec::with_capacity(n + 1);
        while v.len() < n {
            let u1: f32 = self.0.gen_range(f32::EPSILON..1.0);
            let u2: f32 = self.0.gen();
            let r = (-2.0 * u1.ln()).sqrt();
            let a = std::f32::consts::TAU * u2;
            v.push(mean + std * r * a.cos());
            v.push(mean + std * r * a.sin());
        }
        v.truncate(n);
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?)
    }
}

/// GPT-2/Pythia-style initialisation scaled so activations stay O(1): matrices
/// N(0, 0.02), LayerNorm weights 1 + N(0, 0.02), biases N(0, 0.02).
fn stack(out: &mut HashMap<String, Tensor>, rng: &mut Normal, prefix: &str, c: &GptNeoXConfig, dtype: DType) -> Result<()> {
    let (d, f) = (c.hidden_size, c.intermediate_size);
    let mut put = |name: String, shape: &[usize], std: f32, mean: f32| -> Result<()> {
        out.insert(format!("{prefix}.{name}"), rng.tensor(shape, std, mean, dtype)?);
        Ok(())
    };
    put("embed_in.weight".into(), &[c.vocab_size, d], 0.02, 0.0)?;
    for i in 0..c.num_hidden_layers {
        let p = format!("layers.{i}");
        for ln in ["input_layernorm", "post_attention_layernorm"] {
            put(format!("{p}.{ln}.weight"), &[d], 0.02, 1.0)?;
            put(format!("{p}.{ln}.bias"), &[d], 0.02, 0.0)?;
        }
        for (name, o, i_) in [("attention.query_key_value", 3 * d, d), ("attention.dense", d, d), ("mlp.dense_h_to_4h", f, d), ("mlp.dense_4h_to_h", d, f)] {
            put(format!("{p}.{name}.weight"), &[o, i_], 0.02, 0.0)?;
            put(format!("{p}.{name}.bias"), &[o], 0.02, 0.0)?;
        }
    }
    put("final_layer_norm.weight".into(), &[d], 0.02, 1.0)?;
    put("final_layer_norm.bias".into(), &[d], 0.02, 0.0)?;
    Ok(())
}

/// Every tensor of a model of this config, as the reference would save it
/// (including the block decoder's unused `embed_in`, for compatibility).
pub fn random_weights(config: &ModelConfig, seed: u64, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let mut rng = Normal(ChaCha8Rng::seed_from_u64(seed));
    let mut out = HashMap::new();
    match config {
        ModelConfig::Block(c) => {
            out.insert("embedder.embeddings.weight".into(), rng.tensor(&[c.vocab_size, c.embedder.hidden_size], 0.02, 0.0, dtype)?);
            stack(&mut out, &mut rng, "block_decoder.gpt_neox", &c.block_decoder, dtype)?;
            let t = &c.token_decoder.stack;
            stack(&mut out, &mut rng, "token_decoder.gpt_neox", t, dtype)?;
            out.insert("token_decoder.embed_out.weight".into(), rng.tensor(&[t.vocab_size, t.hidden_size], 0.02, 0.0, dtype)?);
            let rd = c.token_decoder.expansion_ratio * t.hidden_size;
            let db = c.block_decoder.hidden_size;
            out.insert("token_decoder.expansion_layer.weight".into(), rng.tensor(&[rd, db, 1], 0.02, 0.0, dtype)?);
            out.insert("token_decoder.expansion_layer.bias".into(), rng.tensor(&[rd], 0.02, 0.0, dtype)?);
        }
        ModelConfig::Vanilla(c) => {
            stack(&mut out, &mut rng, "gpt_neox", &c.stack, dtype)?;
            out.insert("embed_out.weight".into(), rng.tensor(&[c.stack.vocab_size, c.stack.hidden_size], 0.02, 0.0, dtype)?);
        }
    }
    Ok(out)
}

/// Write `config.json` and `model.safetensors` into `dir` (created if missing).
pub fn save_model(dir: &Path, config: &ModelConfig, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let io = |e: std::io::Error| ModelError::File { path: dir.to_path_buf(), msg: e.to_string() };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("config.json"), config.to_json() + "\n").map_err(io)?;
    candle_core::safetensors::save(tensors, dir.join("model.safetensors"))?;
    Ok(())
}

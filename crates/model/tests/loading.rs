//! Every checkpoint layout the loader accepts, and the errors it gives for broken ones.

mod common;

use std::collections::HashMap;
use std::path::Path;

use blockserve_model::config::ModelConfig;
use blockserve_model::loader::{load_model, resolve_config, ConfigSource};
use blockserve_model::Model;
use candle_core::{DType, Device, Tensor};
use common::*;

fn tempdir(tag: &str) -> blockserve_testkit::TempDir {
    blockserve_testkit::TempDir::new(&format!("test-{tag}"))
}

fn fixture_tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir(name).join("model.safetensors"), &Device::Cpu).unwrap()
}

fn forward_rows() -> Vec<Vec<u32>> {
    let g = golden(BLOCK);
    (0..2).map(|b| ids(&g["forward.input_ids"].get(b).unwrap())).collect()
}

fn block_logits(dir: &Path, preset: Option<&str>) -> Tensor {
    let Model::Block(m) = load_model(dir, preset, DType::F32, &Device::Cpu).unwrap() else { panic!() };
    m.forward(&forward_rows()).unwrap().logits
}

#[test]
fn reference_trainer_yaml_gives_the_same_model_as_config_json() {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture_dir(BLOCK).join("config.json")).unwrap()).unwrap();
    let dir = tempdir("yaml");
    std::fs::write(dir.join("config.yaml"), json["official_yaml"].as_str().unwrap()).unwrap();
    std::fs::copy(fixture_dir(BLOCK).join("model.safetensors"), dir.join("model.safetensors")).unwrap();

    let (from_yaml, src) = resolve_config(&dir, None).unwrap();
    assert!(matches!(src, ConfigSource::TrainerYaml(_)));
    let (from_json, _) = resolve_config(&fixture_dir(BLOCK), None).unwrap();
    assert_eq!(from_yaml, from_json);
    let err = max_abs_diff(&block_logits(&dir, None), &golden(BLOCK)["forward.logits"]);
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn bare_checkpoint_needs_a_preset_and_checks_shapes_against_it() {
    let dir = tempdir("bare");
    std::fs::copy(fixture_dir(BLOCK).join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let e = resolve_config(&dir, None).unwrap_err().to_string();
    assert!(e.contains("no config.json or config.yaml") && e.contains("block_main_b4_5"), "{e}");
    // The tiny checkpoint is not a block_main_b4_5: the first tensor read says why.
    let e = load_model(&dir, Some("block_main_b4_5"), DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert_eq!(e, "weights: tensor `token_decoder.expansion_layer.weight` has shape [128, 64, 1], expected [512, 256, 1]");
    // A preset beside a config file is ambiguous.
    let e = resolve_config(&fixture_dir(BLOCK), Some("block_main_b4_5")).unwrap_err().to_string();
    assert!(e.contains("has its own config"), "{e}");
}

#[test]
fn preset_checkpoint_written_by_init_loads_without_config() {
    // A b4_5-shaped model with the vocabulary cut down keeps the test fast; the
    // preset path itself is exercised by writing only the weights.
    let ModelConfig::Block(mut c) = blockserve_model::presets::preset("block_main_b4_5").unwrap() else { panic!() };
    assert_eq!((c.block_decoder.hidden_size, c.block_decoder.num_attention_heads), (256, 8));
    c.vocab_size = 64;
    c.block_decoder.vocab_size = 64;
    c.token_decoder.stack.vocab_size = 64;
    let cfg = ModelConfig::Block(c);
    let dir = tempdir("init");
    let tensors = blockserve_model::init::random_weights(&cfg, 3, DType::F32).unwrap();
    blockserve_model::init::save_model(&dir, &cfg, &tensors).unwrap();
    let m = load_model(&dir, None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.config(), cfg);
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let dir = tempdir("missing");
    let mut t = fixture_tensors(BLOCK);
    t.remove("token_decoder.gpt_neox.layers.1.mlp.dense_4h_to_h.bias");
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    std::fs::copy(fixture_dir(BLOCK).join("config.json"), dir.join("config.json")).unwrap();
    let e = load_model(&dir, None, DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert_eq!(e, "weights: missing tensor `token_decoder.gpt_neox.layers.1.mlp.dense_4h_to_h.bias` (expected shape [64])");
}

#[test]
fn block_decoder_embed_in_is_never_read() {
    // Replace the unused table by one of a nonsense shape (and then drop it): the
    // model still loads and computes the same logits, so it was never touched.
    for replace in [true, false] {
        let dir = tempdir(if replace { "embed-in-odd" } else { "embed-in-gone" });
        let mut t = fixture_tensors(BLOCK);
        t.remove("block_decoder.gpt_neox.embed_in.weight");
        if replace {
            t.insert("block_decoder.gpt_neox.embed_in.weight".into(), Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap());
        }
        candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
        std::fs::copy(fixture_dir(BLOCK).join("config.json"), dir.join("config.json")).unwrap();
        let err = max_abs_diff(&block_logits(&dir, None), &golden(BLOCK)["forward.logits"]);
        assert!(err <= 1e-4, "{err}");
    }
}

#[test]
fn sharded_hugging_face_checkpoint_loads() {
    let dir = tempdir("sharded");
    let t = fixture_tensors(PYTHIA);
    let mut keys: Vec<&String> = t.keys().collect();
    keys.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in keys.chunks(keys.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let part: HashMap<String, Tensor> = chunk.iter().map(|k| ((*k).clone(), t[*k].clone())).collect();
        candle_core::safetensors::save(&part, dir.join(&file)).unwrap();
        for k in chunk {
            weight_map.insert((*k).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::copy(fixture_dir(PYTHIA).join("config.json"), dir.join("config.json")).unwrap();
    let Model::Vanilla(m) = load_model(&dir, None, DType::F32, &Device::Cpu).unwrap() else { panic!() };
    let g = golden(PYTHIA);
    let rows: Vec<Vec<u32>> = (0..2).map(|b| ids(&g["forward.input_ids"].get(b).unwrap())).collect();
    let err = max_abs_diff(&m.forward(&rows).unwrap(), &g["forward.logits"]);
    assert!(err <= 1e-4, "{err}");
}

#[test]
fn config_errors_name_the_field() {
    let dir = tempdir("badcfg");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture_dir(BLOCK).join("config.json")).unwrap()).unwrap();
    json["embedder"]["hidden_size"] = 15.into();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let e = resolve_config(&dir, None).unwrap_err().to_string();
    assert!(e.contains("block_length 4 x embedder.hidden_size 15 = 60 must equal block_decoder.hidden_size 64"), "{e}");
    json["model_type"] = "llama".into();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let e = resolve_config(&dir, None).unwrap_err().to_string();
    assert!(e.contains("model_type is Some(\"llama\")"), "{e}");
}

/// Each serving tier loads only its part; the parts compute what the whole
/// model does: the block decoder's contexts, and the token decoder's scores
/// given those contexts (the golden fixture's forward pass, split across the
/// two loads).
#[test]
fn the_two_tiers_parts_compute_what_the_whole_model_does() {
    use blockserve_model::loader::load_block_transformer;
    use blockserve_model::Parts;
    let dir = fixture_dir(BLOCK);
    let load = |parts| load_block_transformer(&dir, None, DType::F32, &Device::Cpu, parts).unwrap();
    let (whole, global, local) = (load(Parts::Whole), load(Parts::Global), load(Parts::Local));
    let rows = forward_rows();
    let want = whole.forward(&rows).unwrap();
    // The block decoder's part: the contexts of every block of row 0.
    let embeds = global.embed_ids(&rows[0]).unwrap();
    let contexts = global.block_decoder().forward(&embeds.unsqueeze(0).unwrap()).unwrap().squeeze(0).unwrap();
    assert_eq!(max_abs_diff(&contexts, &want.context.get(0).unwrap()), 0.0);
    // The token decoder's part: log p of blocks 1.. of row 0 from those contexts.
    let l = whole.block_length();
    let n = rows[0].len() / l;
    let ctx = contexts.narrow(0, 0, n - 1).unwrap();
    assert_eq!(local.score_blocks(&ctx, &rows[0][l..]).unwrap(), whole.score_blocks(&ctx, &rows[0][l..]).unwrap());
    // A part a tier did not load is not there.
    let missing = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| local.block_decoder().max_blocks())).unwrap_err();
    assert_eq!(missing.downcast_ref::<String>().map(String::as_str), Some("this process loaded the model without its block decoder (Parts::Local)"));
}

//! Shared helpers for the fixture tests (and the `golden_report` example).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use blockserve_model::loader::load_model;
use blockserve_model::Model;
use candle_core::{DType, Device, Tensor};

pub const BLOCK: &str = "official-tiny-b4";
pub const PYTHIA: &str = "pythia-tiny";

/// `tests/fixtures/NAME` of this crate (`BLOCKSERVE_FIXTURES` overrides the parent).
pub fn fixture_dir(name: &str) -> PathBuf {
    let root = std::env::var_os("BLOCKSERVE_FIXTURES").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
    root.join(name)
}

/// Device under test: `BLOCKSERVE_TEST_DEVICE=cuda` (with the `cuda` feature) or CPU.
pub fn device() -> Device {
    match std::env::var("BLOCKSERVE_TEST_DEVICE").as_deref() {
        Ok("cuda") => blockserve_model::cuda_device(0).expect("BLOCKSERVE_TEST_DEVICE=cuda needs a CUDA build and GPU"),
        _ => Device::Cpu,
    }
}

pub fn load(name: &str, dtype: DType) -> Model {
    load_model(&fixture_dir(name), None, dtype, &device()).expect("fixture loads")
}

pub fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir(name).join("golden.safetensors"), &Device::Cpu).expect("golden loads")
}

pub fn ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_dtype(DType::I64).unwrap().to_vec1::<i64>().unwrap().into_iter().map(|x| x as u32).collect()
}

/// Largest |a - b| over two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let b = b.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

pub fn rows_diff(a: &[Vec<f32>], b: &Tensor) -> f32 {
    let a = Tensor::new(a.to_vec(), &Device::Cpu).unwrap();
    max_abs_diff(&a, b)
}

/// Prompt names of a fixture's greedy goldens.
pub fn prompts(name: &str) -> &'static [&'static str] {
    if name == BLOCK {
        &["p0", "p1", "p2"]
    } else {
        &["p0", "p1"]
    }
}

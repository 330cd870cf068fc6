//! Where tensors come from: memory-mapped safetensors files (one or sharded) or an
//! in-memory map (random initialisation, tests). Tensors are read only when asked
//! for, so keys the model never uses (the block decoder's `embed_in`) are never
//! copied out of the mapping.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

enum Source {
    Mmap(MmapedSafetensors),
    Memory(HashMap<String, Tensor>),
}

/// A typed, shape-checked view of a checkpoint with a key prefix.
pub struct Weights {
    source: std::sync::Arc<Source>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// Map safetensors files (several for a sharded checkpoint).
    pub fn from_files(paths: &[PathBuf], dtype: DType, device: &Device) -> Result<Self> {
        for p in paths {
            if !p.exists() {
                return Err(ModelError::File { path: p.clone(), msg: "no such file".into() });
            }
        }
        // SAFETY: the files are treated as read-only; a checkpoint rewritten under a
        // running server is the operator's error, as with every mmap-based loader.
        let st = unsafe { MmapedSafetensors::multi(paths) }
            .map_err(|e| ModelError::File { path: paths.first().cloned().unwrap_or_default(), msg: format!("not a readable safetensors file: {e}") })?;
        Ok(Self::new(Source::Mmap(st), dtype, device))
    }

    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self::new(Source::Memory(tensors), dtype, device)
    }

    fn new(source: Source, dtype: DType, device: &Device) -> Self {
        Self { source: std::sync::Arc::new(source), prefix: String::new(), dtype, device: device.clone() }
    }

    /// The same checkpoint seen under `prefix.`.
    pub(crate) fn pp(&self, prefix: &str) -> Self {
        let prefix = if self.prefix.is_empty() { prefix.to_string() } else { format!("{}.{prefix}", self.prefix) };
        Self { source: self.source.clone(), prefix, dtype: self.dtype, device: self.device.clone() }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        let key = self.key(name);
        match &*self.source {
            Source::Mmap(st) => st.get(&key).is_ok(),
            Source::Memory(m) => m.contains_key(&key),
        }
    }

    /// Load `name` with exactly `shape`, converted to the run dtype and device.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let key = self.key(name);
        let missing = || ModelError::MissingTensor { key: key.clone(), expected: shape.to_vec() };
        let found: Vec<usize> = match &*self.source {
            Source::Mmap(st) => st.get(&key).map_err(|_| missing())?.shape().to_vec(),
            Source::Memory(m) => m.get(&key).ok_or_else(missing)?.dims().to_vec(),
        };
        if found != shape {
            return Err(ModelError::ShapeMismatch { key, expected: shape.to_vec(), found });
        }
        let t = match &*self.source {
            Source::Mmap(st) => st.load(&key, &Device::Cpu)?,
            Source::Memory(m) => m[&key].clone(),
        };
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }
}

/// All `*.safetensors` files of a directory: `model.safetensors`, or the shards
/// listed by `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::File { path: index.clone(), msg: e.to_string() })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::File { path: index.clone(), msg: format!("invalid JSON: {e}") })?;
        let map = v["weight_map"].as_object().ok_or_else(|| ModelError::File { path: index.clone(), msg: "no `weight_map` object".into() })?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    Err(ModelError::File { path: dir.to_path_buf(), msg: "no model.safetensors or model.safetensors.index.json in this directory".into() })
}

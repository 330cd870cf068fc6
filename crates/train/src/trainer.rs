//! The training loop and its checkpoints.
//!
//! Parameters are f32 [`Var`]s (master weights). Each micro-step builds the
//! model from them, cast to the compute dtype (f32 or bf16; the casts are part
//! of the gradient graph, so gradients arrive in f32), and back-propagates the
//! loss of one batch. Gradients of `accum` micro-steps are averaged, then one
//! AdamW update follows.
//!
//! A checkpoint is a directory: `params.safetensors` (f32 weights),
//! `optimizer.safetensors` (moments) and `state.json` (the run's config, the
//! step reached and the log so far). Batches depend only on (seed, step), so a
//! run resumed from step k continues exactly as the uninterrupted run would.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use blockserve_model::config::ModelConfig;
use blockserve_model::init::{random_weights, save_model};
use blockserve_model::loader::build;
use blockserve_model::weights::Weights;
use blockserve_model::Model;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::data::{windows, Batches};
use crate::objective::loss;
use crate::optim::{AdamW, AdamWConfig};
use crate::{input, io_err, Result, TrainError};

/// Everything that defines a run (saved in its checkpoints).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunConfig {
    /// Training shape name (see [`crate::shapes`]).
    pub shape: String,
    pub model: serde_json::Value,
    pub seq_len: usize,
    /// Windows per micro-step.
    pub batch: usize,
    /// Micro-steps per update.
    pub accum: u32,
    pub steps: u64,
    pub optim: AdamWConfig,
    pub seed: u64,
    /// f32 or bf16 (f64 for gradient checks): the dtype the forward and
    /// backward passes run in.
    pub compute_dtype: String,
    /// Held-out loss every this many steps (and at the end).
    pub eval_every: u64,
    /// Held-out windows evaluated each time.
    pub eval_windows: usize,
}

/// One progress record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens per second of this step (windows × seq_len per second).
    pub tokens_per_s: f64,
    pub valid_loss: Option<f64>,
}

#[derive(Serialize, Deserialize)]
struct State {
    config: RunConfig,
    step: u64,
    log: Vec<LogLine>,
}

pub struct Trainer {
    pub config: RunConfig,
    model_config: ModelConfig,
    params: Vec<(String, Var)>,
    opt: AdamW,
    /// Updates done.
    pub step: u64,
    pub log: Vec<LogLine>,
    batches: Batches,
    valid: Vec<Vec<u32>>,
    device: Device,
    dtype: DType,
}

/// Tensors the model never reads, left out of training: the block decoder's
/// `embed_in` (it is fed block embeddings).
const UNUSED: &[&str] = &["block_decoder.gpt_neox.embed_in.weight"];

fn parse_compute_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f64" => Ok(DType::F64),
        other => input(format!("--dtype {other}: training runs in f32 or bf16 (f64 for gradient checks)")),
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn sorted_vars(tensors: HashMap<String, Tensor>, device: &Device) -> Result<Vec<(String, Var)>> {
    let mut names: Vec<String> = tensors.keys().filter(|k| !UNUSED.contains(&k.as_str())).cloned().collect();
    names.sort();
    names.into_iter().map(|n| Ok((n.clone(), Var::from_tensor(&tensors[&n].to_dtype(DType::F32)?.to_device(device)?)?))).collect()
}

impl Trainer {
    /// A fresh run: parameters initialised from the seed.
    pub fn new(config: RunConfig, model_config: ModelConfig, train: Vec<u16>, valid: &[u16], device: &Device) -> Result<Self> {
        let tensors = random_weights(&model_config, config.seed, DType::F32)?;
        let params = sorted_vars(tensors, device)?;
        let opt = AdamW::new(config.optim.clone(), &params)?;
        Self::assemble(config, model_config, params, opt, 0, vec![], train, valid, device)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: RunConfig,
        model_config: ModelConfig,
        params: Vec<(String, Var)>,
        opt: AdamW,
        step: u64,
        log: Vec<LogLine>,
        train: Vec<u16>,
        valid: &[u16],
        device: &Device,
    ) -> Result<Self> {
        if config.batch == 0 || config.accum == 0 || config.steps == 0 {
            return input("--batch, --accum and --steps must be positive");
        }
        if let ModelConfig::Block(c) = &model_config {
            if !config.seq_len.is_multiple_of(c.block_length) || config.seq_len < 2 * c.block_length {
                return input(format!("--seq-len {} must be a multiple of the block length {} and hold at least 2 blocks", config.seq_len, c.block_length));
            }
        }
        let dtype = parse_compute_dtype(&config.compute_dtype)?;
        let batches = Batches::new(train, config.seq_len, config.batch, config.seed)?;
        let valid = windows(valid, config.seq_len, config.eval_windows);
        if valid.is_empty() {
            return input(format!("the held-out tokens cannot fill one window of --seq-len {}", config.seq_len));
        }
        Ok(Self { config, model_config, params, opt, step, log, batches, valid, device: device.clone(), dtype })
    }

    /// Resume the run checkpointed in `dir`.
    pub fn resume(dir: &Path, train: Vec<u16>, valid: &[u16], device: &Device) -> Result<Self> {
        let path = dir.join("state.json");
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let state: State = serde_json::from_str(&text).map_err(|e| TrainError::File { path: path.clone(), msg: e.to_string() })?;
        let model_config = ModelConfig::from_json(&state.config.model.to_string())?;
        let load = |name: &str| -> Result<HashMap<String, Tensor>> { Ok(candle_core::safetensors::load(dir.join(name), &Device::Cpu)?) };
        let params = sorted_vars(load("params.safetensors")?, device)?;
        let mut opt = AdamW::new(state.config.optim.clone(), &params)?;
        opt.load_state(&params, &load("optimizer.safetensors")?)?;
        Self::assemble(state.config, model_config, params, opt, state.step, state.log, train, valid, device)
    }

    /// Write a checkpoint into `dir` (replacing one there): into a sibling
    /// temporary directory first, so an interrupted write leaves the old one.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let tmp = dir.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let params: HashMap<String, Tensor> = self.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
        candle_core::safetensors::save(&params, tmp.join("params.safetensors"))?;
        candle_core::safetensors::save(&self.opt.state(&self.params), tmp.join("optimizer.safetensors"))?;
        let state = State { config: self.config.clone(), step: self.step, log: self.log.clone() };
        let json = serde_json::to_string_pretty(&state).expect("state serialises");
        std::fs::write(tmp.join("state.json"), json).map_err(io_err(&tmp))?;
        let _ = std::fs::remove_dir_all(dir);
        std::fs::rename(&tmp, dir).map_err(io_err(dir))
    }

    /// The model built from the current parameters: in the compute dtype and
    /// in the gradient graph (`train`), or detached in `dtype` (evaluation,
    /// export), where the fused inference kernels apply.
    fn model(&self, train: bool, dtype: DType) -> Result<Model> {
        let mut tensors = HashMap::new();
        for (name, v) in &self.params {
            let t = if train { v.as_tensor().to_dtype(dtype)? } else { v.as_tensor().detach().to_dtype(dtype)? };
            tensors.insert(name.clone(), t);
        }
        Ok(build(&self.model_config, &Weights::from_tensors(tensors, dtype, &self.device))?)
    }

    /// The mean loss and gradients (one per parameter) over `batches`.
    pub fn gradients(&self, batches: &[Vec<Vec<u32>>]) -> Result<(f64, Vec<Tensor>)> {
        let model = self.model(true, self.dtype)?;
        let mut sum: Option<Vec<Tensor>> = None;
        let mut total = 0.0;
        for rows in batches {
            let (l, _) = loss(&model, rows)?;
            total += scalar(&l)?;
            let grads = l.backward()?;
            let g = self
                .params
                .iter()
                .map(|(n, v)| grads.get(v.as_tensor()).cloned().ok_or_else(|| TrainError::Input(format!("{n} received no gradient"))))
                .collect::<Result<Vec<_>>>()?;
            sum = Some(match sum {
                None => g,
                Some(s) => s.iter().zip(&g).map(|(a, b)| a + b).collect::<candle_core::Result<Vec<_>>>()?,
            });
        }
        let n = batches.len() as f64;
        let grads = sum.expect("at least one batch").into_iter().map(|g| g.affine(1.0 / n, 0.0)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok((total / n, grads))
    }

    /// One update (`accum` micro-steps); returns its log line.
    pub fn train_step(&mut self) -> Result<LogLine> {
        let t0 = Instant::now();
        let batches: Vec<_> = (0..self.config.accum).map(|m| self.batches.batch(self.step, m)).collect();
        let (loss, grads) = self.gradients(&batches)?;
        let update = self.opt.update(&self.params, &grads, self.step)?;
        self.step += 1;
        let tokens = (self.config.accum as usize * self.config.batch * self.config.seq_len) as f64;
        let line =
            LogLine { step: self.step, loss, lr: update.lr, grad_norm: update.grad_norm, tokens_per_s: tokens / t0.elapsed().as_secs_f64(), valid_loss: None };
        self.log.push(line.clone());
        Ok(line)
    }

    /// Mean loss over `rows` at the current parameters, without gradients.
    pub fn batch_loss(&self, rows: &[Vec<u32>]) -> Result<f64> {
        scalar(&loss(&self.model(false, self.dtype)?, rows)?.0)
    }

    /// Mean held-out loss per predicted token over the run's fixed windows.
    pub fn eval(&self) -> Result<f64> {
        let model = self.model(false, self.dtype)?;
        let (mut sum, mut count) = (0.0, 0usize);
        for rows in self.valid.chunks(self.config.batch) {
            let (l, n) = loss(&model, rows)?;
            sum += scalar(&l)? * n as f64;
            count += n;
        }
        Ok(sum / count as f64)
    }

    /// Record a held-out loss on the last log line.
    pub fn record_eval(&mut self, valid_loss: f64) {
        if let Some(last) = self.log.last_mut() {
            last.valid_loss = Some(valid_loss);
        }
    }

    /// Write a servable model directory: config.json and model.safetensors in
    /// `dtype`, plus the tokenizer.
    pub fn export(&self, dir: &Path, dtype: DType, tokenizer_json: &str) -> Result<()> {
        let tensors: HashMap<String, Tensor> =
            self.params.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().to_dtype(dtype)?.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
        save_model(dir, &self.model_config, &tensors)?;
        std::fs::write(dir.join("tokenizer.json"), tokenizer_json).map_err(io_err(dir))
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.model_config
    }

    /// Parameters trained (elements).
    pub fn parameter_count(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The parameters by name (for tests).
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }
}

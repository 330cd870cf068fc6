//! AdamW (decoupled weight decay, bias-corrected moments) with a linear
//! warm-up and cosine decay of the learning rate, and clipping of the global
//! gradient norm. Moments are f32 tensors beside each parameter, so a
//! checkpoint saves and restores the optimizer exactly.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{input, Result};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdamWConfig {
    /// Peak learning rate, reached at the end of warm-up.
    pub lr: f64,
    /// Learning rate at the last step (the cosine's floor).
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to biases, norms).
    pub weight_decay: f64,
    /// Largest global gradient norm; larger gradients are scaled down to it.
    pub clip: f64,
}

impl AdamWConfig {
    /// Learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// What one update did.
#[derive(Debug, Clone, Copy)]
pub struct Update {
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// First and second moments, per parameter in the parameters' order.
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &[(String, Var)]) -> Result<Self> {
        let zeros = |p: &Var| Tensor::zeros(p.shape(), DType::F32, p.device());
        let m = params.iter().map(|(_, p)| zeros(p)).collect::<candle_core::Result<Vec<_>>>()?;
        let v = params.iter().map(|(_, p)| zeros(p)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { config, m, v })
    }

    /// Apply gradients `grads` (one per parameter) as update number `step`
    /// (0-based; bias correction uses step + 1).
    pub fn update(&mut self, params: &[(String, Var)], grads: &[Tensor], step: u64) -> Result<Update> {
        let c = &self.config;
        let mut sq = Tensor::zeros((), DType::F32, grads[0].device())?;
        for g in grads {
            sq = (sq + g.sqr()?.sum_all()?)?;
        }
        let grad_norm = sq.to_scalar::<f32>()?.sqrt() as f64;
        if !grad_norm.is_finite() {
            return input(format!("step {step}: the gradient norm is {grad_norm}; lower --lr or raise --warmup-steps"));
        }
        let scale = if grad_norm > c.clip { c.clip / grad_norm } else { 1.0 };
        let lr = c.lr_at(step);
        let t = (step + 1) as i32;
        let (c1, c2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (i, ((_, p), g)) in params.iter().zip(grads).enumerate() {
            let g = g.affine(scale, 0.0)?;
            self.m[i] = (self.m[i].affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?;
            self.v[i] = (self.v[i].affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
            let step_dir = (self.m[i].affine(1.0 / c1, 0.0)? / (self.v[i].affine(1.0 / c2, 0.0)?.sqrt()? + c.eps)?)?;
            let decay = if p.rank() >= 2 { 1.0 - lr * c.weight_decay } else { 1.0 };
            let w = (p.as_tensor().affine(decay, 0.0)? - step_dir.affine(lr, 0.0)?)?;
            p.set(&w)?;
        }
        Ok(Update { lr, grad_norm })
    }

    /// The moments as `m.NAME` / `v.NAME` tensors, for a checkpoint.
    pub fn state(&self, params: &[(String, Var)]) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in params.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restore moments saved by [`AdamW::state`].
    pub fn load_state(&mut self, params: &[(String, Var)], state: &HashMap<String, Tensor>) -> Result<()> {
        for (i, (name, p)) in params.iter().enumerate() {
            for (key, slot) in [(format!("m.{name}"), &mut self.m[i]), (format!("v.{name}"), &mut self.v[i])] {
                let t = state.get(&key).ok_or_else(|| crate::TrainError::Input(format!("the optimizer state has no {key}")))?;
                if t.dims() != p.dims() {
                    return input(format!("{key} has shape {:?}, the parameter {:?}", t.dims(), p.dims()));
                }
                *slot = t.to_dtype(DType::F32)?.to_device(p.device())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn config() -> AdamWConfig {
        AdamWConfig { lr: 1e-3, min_lr: 1e-4, warmup_steps: 10, total_steps: 110, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, clip: 1.0 }
    }

    #[test]
    fn schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor() {
        let c = config();
        assert!((c.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((c.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!((c.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((c.lr_at(60) - 5.5e-4).abs() < 1e-12, "halfway: {}", c.lr_at(60));
        assert!((c.lr_at(110) - 1e-4).abs() < 1e-12);
        assert!((c.lr_at(500) - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn first_update_matches_the_formula_and_clips() {
        // One matrix parameter at 1.0 with gradient 3.0 everywhere (4 entries):
        // norm 6 > clip 1, so g = 0.5; the bias-corrected first step moves by
        // lr * g / (|g| + eps) = lr, after decay 1 - lr * wd.
        let p = Var::from_tensor(&Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let params = vec![("w".to_string(), p.clone())];
        let mut opt = AdamW::new(config(), &params).unwrap();
        let g = Tensor::full(3f32, (2, 2), &Device::Cpu).unwrap();
        let u = opt.update(&params, &[g], 0).unwrap();
        assert!((u.grad_norm - 6.0).abs() < 1e-6);
        assert!((u.lr - 1e-4).abs() < 1e-12);
        let want = 1.0 * (1.0 - 1e-4 * 0.1) - 1e-4 * 0.5 / (0.5 + 1e-8);
        for v in p.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            assert!((v as f64 - want).abs() < 1e-7, "{v} vs {want}");
        }
    }
}

//! The GPT-NeoX (Pythia) transformer stack shared by the block decoder, the token
//! decoder and the vanilla causal LM.
//!
//! Per layer: pre-LayerNorm, fused `query_key_value` laid out per head as
//! `[q|k|v]`, partial rotate-half rotary over the first `rotary_pct` of each head,
//! causal softmax attention with scale `head_dim^-0.5`, exact-erf GELU MLP, and
//! the parallel residual `x + attn(ln1(x)) + mlp(ln2(x))`. The stack takes input
//! embeddings, so callers supply their own embedding (lookup table, block
//! embeddings or prefix vectors) and apply the final norm's output as they need.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear};

use crate::config::{Activation, GptNeoXConfig};
use crate::error::Result;
use crate::fused::{self, Epilogue};
use crate::paged::ops::{attend_paged, HeadShape};
use crate::paged::{KvPool, PagedPass};
use crate::weights::Weights;

/// Rotary tables `cos`/`sin` `[max_positions, rotary_dim / 2]`, computed in f32 as
/// the reference does and stored in the run dtype.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
    dim: usize,
}

impl Rotary {
    fn new(cfg: &GptNeoXConfig, dtype: DType, device: &Device) -> Result<Self> {
        let dim = cfg.rotary_dim();
        let half = dim / 2;
        let n = cfg.max_position_embeddings;
        let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / (cfg.rotary_emb_base as f32).powf((2 * i) as f32 / dim as f32)).collect();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let t = |v: Vec<f32>| -> Result<Tensor> { Ok(Tensor::from_vec(v, (n, half), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?) };
        Ok(Self { cos: t(cos)?, sin: t(sin)?, dim })
    }

    /// Tables for positions `0..len` `[len, dim/2]`.
    fn tables(&self, len: usize) -> Result<(Tensor, Tensor)> {
        if self.dim == 0 {
            return Ok((self.cos.clone(), self.sin.clone()));
        }
        Ok((self.cos.narrow(0, 0, len)?, self.sin.narrow(0, 0, len)?))
    }

    /// Rotate the first `dim` channels of `x` `[b, h, t, head_dim]`, pass the rest.
    fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.dim == 0 {
            return Ok(x.clone());
        }
        let hd = x.dim(D::Minus1)?;
        let x_rot = x.narrow(D::Minus1, 0, self.dim)?.contiguous()?;
        let rot = if differentiable(x) { candle_nn::rotary_emb::rope_slow(&x_rot, cos, sin)? } else { candle_nn::rotary_emb::rope(&x_rot, cos, sin)? };
        if self.dim == hd {
            return Ok(rot);
        }
        Ok(Tensor::cat(&[&rot, &x.narrow(D::Minus1, self.dim, hd - self.dim)?], D::Minus1)?)
    }
}

/// Whether `x` is part of a gradient graph (training). Then the stack takes
/// candle's composite ops, which have backward passes, instead of the fused
/// kernels (softmax, rotary, LayerNorm, bias epilogues), which do not.
pub(crate) fn differentiable(x: &Tensor) -> bool {
    x.track_op()
}

/// LayerNorm (one kernel on CUDA unless `x` needs gradients).
fn norm(ln: &LayerNorm, x: &Tensor) -> Result<Tensor> {
    Ok(fused::layer_norms(&[ln], x)?.remove(0))
}

struct Attention {
    qkv: Linear,
    dense: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

/// Softmax attention of `q` `[b, h, t, d]` over `k`, `v` `[b, h, width, d]`, with
/// an additive f32 `mask` broadcastable to `[b, 1, t, width]` (None when nothing is
/// hidden). Scores and softmax run in f32 whatever the run dtype, as the
/// reference's eager attention does.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let dtype = q.dtype();
    // f64 stays f64 (the gradient checks run in it).
    let acc = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
    let mut scores = q.matmul(&k.t()?)?.to_dtype(acc)?.affine(scale, 0.0)?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(&m.to_dtype(acc)?)?;
    }
    let probs = if differentiable(&scores) { candle_nn::ops::softmax(&scores, D::Minus1)? } else { candle_nn::ops::softmax_last_dim(&scores)? };
    let probs = probs.to_dtype(dtype)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// The causal mask `[t, t]` of a full pass (None for one position).
fn causal_mask(t: usize, device: &Device) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let m: Vec<f32> = (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0f32 } else { f32::NEG_INFINITY })).collect();
    Ok(Some(Tensor::from_vec(m, (t, t), device)?))
}

impl Attention {
    fn load(w: &Weights, cfg: &GptNeoXConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let head_dim = cfg.head_dim();
        Ok(Self {
            qkv: linear(&w.pp("query_key_value"), d, 3 * d, cfg.attention_bias)?,
            dense: linear(&w.pp("dense"), d, d, cfg.attention_bias)?,
            heads: cfg.num_attention_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// Full causal attention over `x` `[b, t, d]` from position 0, no cache.
    fn forward_full(&self, x: &Tensor, rotary: &Rotary, cs: &(Tensor, Tensor), mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (h, hd) = (self.heads, self.head_dim);
        // [b, t, 3d] viewed per head as [q|k|v], then [b, h, t, hd] each.
        let qkv = self.qkv.forward(x)?.reshape((b, t, h, 3 * hd))?;
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(3, i * hd, hd)?.transpose(1, 2)?.contiguous()?) };
        let q = rotary.apply(&part(0)?, &cs.0, &cs.1)?;
        let k = rotary.apply(&part(1)?, &cs.0, &cs.1)?;
        let out = attend(&q, &k, &part(2)?, self.scale, mask)?;
        Ok(self.dense.forward(&out.transpose(1, 2)?.reshape((b, t, d))?)?)
    }

    /// Attention of a paged pass's new tokens `x` `[n, d]`: their keys and values
    /// go into `pool` (this layer's), then each attends over its row in place.
    fn forward_paged(&self, x: &Tensor, shape: HeadShape, pool: &Tensor, pass: &PagedPass) -> Result<Tensor> {
        let out = attend_paged(shape, &fused::linear(&self.qkv, x, Epilogue::Bias)?, pool, pass)?;
        fused::linear(&self.dense, &out, Epilogue::Bias)
    }
}

struct Mlp {
    up: Linear,
    down: Linear,
    act: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.act == Activation::GeluErf {
            // One kernel for bias + GELU on CUDA.
            let h = fused::linear(&self.up, x, Epilogue::BiasGelu)?;
            return fused::linear(&self.down, &h, Epilogue::Bias);
        }
        let h = self.up.forward(x)?;
        let h = match self.act {
            Activation::GeluErf => h.gelu_erf()?,
            Activation::GeluTanh => h.gelu()?,
            Activation::Relu => h.relu()?,
        };
        Ok(self.down.forward(&h)?)
    }
}

struct Layer {
    ln1: LayerNorm,
    ln2: LayerNorm,
    attn: Attention,
    mlp: Mlp,
    parallel: bool,
    /// The same layer in fewer launches for paged passes on CUDA, where it applies.
    #[cfg(feature = "cuda")]
    fused: Option<crate::fused_layer::FusedLayer>,
}

impl Layer {
    /// The block around attention: `attn` maps `ln1(x)` to the attention output.
    fn forward(&self, x: &Tensor, attn: impl FnOnce(&Attention, &Tensor) -> Result<Tensor>) -> Result<Tensor> {
        if self.parallel {
            // Both norms of x from one kernel.
            let [n1, n2]: [Tensor; 2] = fused::layer_norms(&[&self.ln1, &self.ln2], x)?.try_into().expect("two norms");
            let attn = attn(&self.attn, &n1)?;
            let mlp = self.mlp.forward(&n2)?;
            fused::add3(&mlp, &attn, x)
        } else {
            let attn = attn(&self.attn, &norm(&self.ln1, x)?)?;
            let h = (attn + x)?;
            Ok((self.mlp.forward(&norm(&self.ln2, &h)?)? + h)?)
        }
    }
}

pub(crate) fn linear(w: &Weights, inp: usize, out: usize, bias: bool) -> Result<Linear> {
    let weight = w.get("weight", &[out, inp])?;
    let bias = if bias { Some(w.get("bias", &[out])?) } else { None };
    Ok(Linear::new(weight, bias))
}

pub(crate) fn layer_norm(w: &Weights, d: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(w.get("weight", &[d])?, w.get("bias", &[d])?, eps))
}

/// The transformer layers and final LayerNorm of a `gpt_neox` module (its
/// `embed_in` is not part of the stack).
pub struct GptNeoX {
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    rotary: Rotary,
    cfg: GptNeoXConfig,
}

impl GptNeoX {
    /// Load from weights under a `gpt_neox` prefix.
    pub fn load(w: &Weights, cfg: &GptNeoXConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let lw = w.pp(&format!("layers.{i}"));
                #[allow(unused_mut)]
                let mut layer = Layer {
                    ln1: layer_norm(&lw.pp("input_layernorm"), d, cfg.layer_norm_eps)?,
                    ln2: layer_norm(&lw.pp("post_attention_layernorm"), d, cfg.layer_norm_eps)?,
                    attn: Attention::load(&lw.pp("attention"), cfg)?,
                    mlp: Mlp {
                        up: linear(&lw.pp("mlp.dense_h_to_4h"), d, cfg.intermediate_size, true)?,
                        down: linear(&lw.pp("mlp.dense_4h_to_h"), cfg.intermediate_size, d, true)?,
                        act: cfg.hidden_act,
                    },
                    parallel: cfg.use_parallel_residual,
                    #[cfg(feature = "cuda")]
                    fused: None,
                };
                #[cfg(feature = "cuda")]
                if layer.parallel && layer.mlp.act == Activation::GeluErf {
                    let parts = crate::fused_layer::LayerParts {
                        ln1: &layer.ln1,
                        ln2: &layer.ln2,
                        qkv: &layer.attn.qkv,
                        dense: &layer.attn.dense,
                        up: &layer.mlp.up,
                        down: &layer.mlp.down,
                    };
                    layer.fused = crate::fused_layer::FusedLayer::new(&parts)?;
                }
                Ok(layer)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            final_ln: layer_norm(&w.pp("final_layer_norm"), d, cfg.layer_norm_eps)?,
            rotary: Rotary::new(cfg, w.dtype(), w.device())?,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &GptNeoXConfig {
        &self.cfg
    }

    /// A pool of `num_pages` pages of `page_size` positions for this stack.
    pub fn new_pool(&self, num_pages: usize, page_size: usize, dtype: DType, device: &Device) -> Result<KvPool> {
        KvPool::new(&self.cfg, num_pages, page_size, dtype, device)
    }

    fn head_shape(&self) -> HeadShape {
        HeadShape { heads: self.cfg.num_attention_heads, head_dim: self.cfg.head_dim(), rot: self.rotary.dim, rope_base: self.cfg.rotary_emb_base as f32 }
    }

    /// Full causal pass over `x` `[b, t, hidden]` from position 0, no cache: every
    /// layer and the final LayerNorm.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(1)?;
        if t > self.cfg.max_position_embeddings {
            return crate::error::input_err(format!("position {} exceeds max_position_embeddings {}", t - 1, self.cfg.max_position_embeddings));
        }
        let cs = self.rotary.tables(t)?;
        let mask = causal_mask(t, x.device())?;
        let mut h = x.clone();
        for layer in &self.layers {
            h = layer.forward(&h, |a, x| a.forward_full(x, &self.rotary, &cs, mask.as_ref()))?;
        }
        norm(&self.final_ln, &h)
    }

    /// A paged pass: `x` `[n, hidden]` holds the new tokens laid out by `pass`
    /// (planned on `pool`); returns their final hidden states `[n, hidden]`.
    pub fn forward_paged(&self, x: &Tensor, pool: &KvPool, pass: &PagedPass) -> Result<Tensor> {
        if x.dim(0)? != pass.tokens() {
            return crate::error::input_err(format!("{} rows for a pass of {} tokens", x.dim(0)?, pass.tokens()));
        }
        let shape = self.head_shape();
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            #[cfg(feature = "cuda")]
            if let Some(f) = &layer.fused {
                if !differentiable(&h) {
                    h = f.forward_paged(&h, shape, pool.layer(i), pass)?;
                    continue;
                }
            }
            h = layer.forward(&h, |a, x| a.forward_paged(x, shape, pool.layer(i), pass))?;
        }
        norm(&self.final_ln, &h)
    }
}

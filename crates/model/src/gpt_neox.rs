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
use crate::kv_cache::KvCache;
use crate::weights::Weights;

/// How a forward pass sees earlier positions.
pub enum Cache<'a, 'b> {
    /// No history: every row starts at position 0 and nothing is kept.
    None,
    /// All rows share this cache (and hence one length): a single session, or a
    /// block-synchronous batch of the token decoder.
    Shared(&'a mut KvCache),
    /// One cache per row; rows may have different lengths. Projections and MLPs run
    /// batched, attention runs per row over that row's history.
    PerRow(&'a mut [&'b mut KvCache]),
}

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
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0 / (cfg.rotary_emb_base as f32).powf((2 * i) as f32 / dim as f32)).collect();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let t = |v: Vec<f32>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, (n, half), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
        };
        Ok(Self { cos: t(cos)?, sin: t(sin)?, dim })
    }

    /// Tables for the given positions: `[t, dim/2]` when every row shares them,
    /// `[b, t, dim/2]` otherwise.
    fn tables(&self, positions: &Positions) -> Result<(Tensor, Tensor)> {
        if self.dim == 0 {
            return Ok((self.cos.clone(), self.sin.clone()));
        }
        match positions {
            Positions::Shared { start, len } => {
                Ok((self.cos.narrow(0, *start, *len)?, self.sin.narrow(0, *start, *len)?))
            }
            Positions::PerRow { starts, len } => {
                let idx: Vec<u32> = starts.iter().flat_map(|&s| (s..s + len).map(|p| p as u32)).collect();
                let idx = Tensor::from_vec(idx, starts.len() * len, self.cos.device())?;
                let shape = (starts.len(), *len, self.dim / 2);
                Ok((self.cos.index_select(&idx, 0)?.reshape(shape)?, self.sin.index_select(&idx, 0)?.reshape(shape)?))
            }
        }
    }

    /// Rotate the first `dim` channels of `x` `[b, h, t, head_dim]`, pass the rest.
    fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.dim == 0 {
            return Ok(x.clone());
        }
        let hd = x.dim(D::Minus1)?;
        let rot = candle_nn::rotary_emb::rope(&x.narrow(D::Minus1, 0, self.dim)?.contiguous()?, cos, sin)?;
        if self.dim == hd {
            return Ok(rot);
        }
        Ok(Tensor::cat(&[&rot, &x.narrow(D::Minus1, self.dim, hd - self.dim)?], D::Minus1)?)
    }
}

enum Positions {
    Shared { start: usize, len: usize },
    PerRow { starts: Vec<usize>, len: usize },
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
    let mut scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?.affine(scale, 0.0)?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}

/// Key width and mask of one forward pass: for row b and query i, every key past
/// position `starts[b] + i` is hidden (the causal future, and for rows shorter than
/// the batch's longest, their padding). One start serves every row of a shared cache.
struct RowLayout {
    width: usize,
    mask: Option<Tensor>,
}

impl RowLayout {
    fn new(starts: &[usize], t: usize, device: &Device) -> Result<Self> {
        let width = starts.iter().max().copied().unwrap_or(0) + t;
        if t == 1 && starts.iter().all(|&s| s + 1 == width) {
            return Ok(Self { width, mask: None });
        }
        let mut m = Vec::with_capacity(starts.len() * t * width);
        for &s in starts {
            for i in 0..t {
                m.extend((0..width).map(|j| if j <= s + i { 0f32 } else { f32::NEG_INFINITY }));
            }
        }
        Ok(Self { width, mask: Some(Tensor::from_vec(m, (starts.len(), 1, t, width), device)?) })
    }
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

    fn forward(&self, x: &Tensor, rotary: &Rotary, cs: &(Tensor, Tensor), layer: usize, cache: &mut Cache<'_, '_>, layout: &RowLayout) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (h, hd) = (self.heads, self.head_dim);
        // [b, t, 3d] viewed per head as [q|k|v], then [b, h, t, hd] each.
        let qkv = self.qkv.forward(x)?.reshape((b, t, h, 3 * hd))?;
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(3, i * hd, hd)?.transpose(1, 2)?.contiguous()?) };
        let q = rotary.apply(&part(0)?, &cs.0, &cs.1)?;
        let k = rotary.apply(&part(1)?, &cs.0, &cs.1)?;
        let v = part(2)?;
        let out = match cache {
            Cache::None => attend(&q, &k, &v, self.scale, layout.mask.as_ref())?,
            Cache::Shared(c) => {
                let (k, v) = c.append(layer, &k, &v)?;
                attend(&q, &k, &v, self.scale, layout.mask.as_ref())?
            }
            Cache::PerRow(caches) => {
                // Append each row to its own cache, then attend for all rows at
                // once over views padded to the longest row; the layout's mask hides
                // every position a row does not have (and the causal future).
                let mut ks = Vec::with_capacity(b);
                let mut vs = Vec::with_capacity(b);
                for (i, c) in caches.iter_mut().enumerate() {
                    c.append(layer, &k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?)?;
                    let (kp, vp) = c.padded(layer, layout.width)?;
                    ks.push(kp);
                    vs.push(vp);
                }
                let (k, v) = (Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?);
                attend(&q, &k, &v, self.scale, layout.mask.as_ref())?
            }
        };
        let out = out.transpose(1, 2)?.reshape((b, t, d))?;
        Ok(self.dense.forward(&out)?)
    }
}

struct Mlp {
    up: Linear,
    down: Linear,
    act: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
}

impl Layer {
    fn forward(&self, x: &Tensor, rotary: &Rotary, cs: &(Tensor, Tensor), layer: usize, cache: &mut Cache<'_, '_>, layout: &RowLayout) -> Result<Tensor> {
        let attn = self.attn.forward(&self.ln1.forward(x)?, rotary, cs, layer, cache, layout)?;
        if self.parallel {
            let mlp = self.mlp.forward(&self.ln2.forward(x)?)?;
            Ok(((mlp + attn)? + x)?)
        } else {
            let h = (attn + x)?;
            Ok((self.mlp.forward(&self.ln2.forward(&h)?)? + h)?)
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
                Ok(Layer {
                    ln1: layer_norm(&lw.pp("input_layernorm"), d, cfg.layer_norm_eps)?,
                    ln2: layer_norm(&lw.pp("post_attention_layernorm"), d, cfg.layer_norm_eps)?,
                    attn: Attention::load(&lw.pp("attention"), cfg)?,
                    mlp: Mlp {
                        up: linear(&lw.pp("mlp.dense_h_to_4h"), d, cfg.intermediate_size, true)?,
                        down: linear(&lw.pp("mlp.dense_4h_to_h"), cfg.intermediate_size, d, true)?,
                        act: cfg.hidden_act,
                    },
                    parallel: cfg.use_parallel_residual,
                })
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

    /// An empty cache for one session (or one shared-length group) of this stack.
    pub fn new_cache(&self, initial_capacity: usize) -> KvCache {
        KvCache::new(self.layers.len(), initial_capacity, self.cfg.max_position_embeddings)
    }

    /// Run `x` `[b, t, hidden]` through every layer and the final LayerNorm.
    /// Positions continue from each cache's length (0 without a cache).
    pub fn forward(&self, x: &Tensor, mut cache: Cache<'_, '_>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let positions = match &cache {
            Cache::None => Positions::Shared { start: 0, len: t },
            Cache::Shared(c) => Positions::Shared { start: c.len(), len: t },
            Cache::PerRow(cs) => {
                if cs.len() != b {
                    return crate::error::input_err(format!("{} caches for a batch of {b}", cs.len()));
                }
                Positions::PerRow { starts: cs.iter().map(|c| c.len()).collect(), len: t }
            }
        };
        let last = match &positions {
            Positions::Shared { start, len } => start + len,
            Positions::PerRow { starts, len } => starts.iter().max().copied().unwrap_or(0) + len,
        };
        if last > self.cfg.max_position_embeddings {
            return crate::error::input_err(format!(
                "position {} exceeds max_position_embeddings {}",
                last - 1,
                self.cfg.max_position_embeddings
            ));
        }
        let cs = self.rotary.tables(&positions)?;
        // Built once per pass, shared by every layer.
        let layout = match &positions {
            Positions::PerRow { starts, len } => RowLayout::new(starts, *len, x.device())?,
            Positions::Shared { start, len } => RowLayout::new(&[*start], *len, x.device())?,
        };
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h, &self.rotary, &cs, i, &mut cache, &layout)?;
        }
        Ok(self.final_ln.forward(&h)?)
    }
}

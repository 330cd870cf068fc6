//! The parallel-residual GPT-NeoX layer of a paged pass on CUDA in five
//! launches instead of eight: a norm, one GEMM for the attention's and the
//! MLP's input projections, GELU, attention, and one GEMM for both output
//! projections that also adds the residual.
//!
//! Why: at vanilla_160's decode step (batch 256) the attention reads the KV
//! cache at the card's read rate, and what is left of a layer's 260 us is
//! small launches, each a few microseconds plus about 1.3 us between
//! kernels (Nsight Compute, `docs/performance.md`). This form drops the
//! second norm's output, one GEMM launch of each pair and the residual add
//! (and, in decode passes on the per-head kernel, GELU's own launch).
//!
//! How, per layer, with `d` the hidden size and `i` the MLP's width:
//! - Both norms share `x̂ = (x - mean) / std`; each norm's scale and shift
//!   are folded into the projection that reads it (`W diag(g)` and
//!   `b + W β`), so one GEMM `x̂ [W_up'; W_qkv']^T + [b_up'; b_qkv']` feeds
//!   both halves.
//! - Its output goes into a row buffer `[n, d + i + 3d]` laid out as
//!   `[attention out | MLP hidden | qkv]`: GELU runs in place on the hidden
//!   columns (in decode passes on the per-head attention kernel, inside that
//!   launch), attention reads the qkv columns and writes its output into the
//!   first `d` columns, so the first `d + i` columns are the concatenated
//!   inputs of the output projections.
//! - One GEMM over them, `[attn | gelu(h)] [W_dense | W_down]^T + (b_dense +
//!   b_down) + x` (the residual as cuBLASLt's C with beta 1), is the layer's
//!   output.
//!
//! Numerics: the same function, rounded differently: the folded weights are
//! rounded once in the run dtype, and the residual sum is rounded once where
//! the unfused layer rounds after each add. The f32 fixture tests run it on
//! CUDA (cuBLASLt in full f32); `BLOCKSERVE_FUSED_LAYER=0` turns it off (A/B
//! runs). Memory: the folded and concatenated weights are copies, so a
//! stack's layer weights are held twice on the GPU.

use candle_core::{DType, Tensor};
use candle_nn::{LayerNorm, Linear};

use crate::error::Result;
use crate::fused;
use crate::gpt_neox::differentiable;
use crate::lt_linear;
use crate::paged::ops::{attend_paged_into, HeadShape};
use crate::paged::PagedPass;

pub(crate) struct FusedLayer {
    /// LayerNorm with unit scale and zero shift: `x̂`.
    norm: LayerNorm,
    /// `[i + 3d, d]` and `[i + 3d]`: the MLP's up projection, then qkv, with
    /// their norms folded in.
    w_in: Tensor,
    b_in: Tensor,
    /// `[d, d + i]` and `[d]`: the attention's dense and the MLP's down
    /// projections side by side, and the sum of their biases.
    w_out: Tensor,
    b_out: Tensor,
    d: usize,
    i: usize,
}

/// The parts of one layer the fused form is built from.
pub(crate) struct LayerParts<'a> {
    pub ln1: &'a LayerNorm,
    pub ln2: &'a LayerNorm,
    pub qkv: &'a Linear,
    pub dense: &'a Linear,
    pub up: &'a Linear,
    pub down: &'a Linear,
}

/// `BLOCKSERVE_FUSED_LAYER=0` keeps the unfused layer (for A/B runs; read at
/// each load, so that a test can build both).
fn enabled() -> bool {
    std::env::var("BLOCKSERVE_FUSED_LAYER").as_deref() != Ok("0")
}

impl FusedLayer {
    /// The fused form of a parallel-residual layer with exact GELU and biases
    /// everywhere, on CUDA, in f32/bf16/f16, whose sizes divide into 16-byte
    /// vectors; None otherwise (and for weights that take gradients, whose
    /// copies would go stale), and the caller keeps the unfused layer.
    pub(crate) fn new(p: &LayerParts) -> Result<Option<Self>> {
        let w = p.qkv.weight();
        let (d, i) = (w.dim(1)?, p.up.weight().dim(0)?);
        let biases = [p.qkv, p.dense, p.up, p.down].iter().all(|l| l.bias().is_some()) && p.ln1.bias().is_some() && p.ln2.bias().is_some();
        let usable = enabled()
            && w.device().is_cuda()
            && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16)
            && biases
            && d.is_multiple_of(8)
            && i.is_multiple_of(8)
            && p.ln1.eps() == p.ln2.eps()
            && [p.qkv.weight(), p.dense.weight(), p.up.weight(), p.down.weight(), p.ln1.weight(), p.ln2.weight()].iter().all(|t| !differentiable(t));
        if !usable {
            return Ok(None);
        }
        let dtype = w.dtype();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        // `lin(ln(x)) = x̂ (W diag(g))^T + (b + W β)`, folded in f32.
        let fold = |lin: &Linear, ln: &LayerNorm| -> Result<(Tensor, Tensor)> {
            let (w, b) = (f32(lin.weight())?, f32(lin.bias().expect("checked"))?);
            let (g, beta) = (f32(ln.weight())?, f32(ln.bias().expect("checked"))?);
            let wf = w.broadcast_mul(&g.unsqueeze(0)?)?;
            let bf = (b + w.matmul(&beta.unsqueeze(1)?)?.squeeze(1)?)?;
            Ok((wf, bf))
        };
        let (w_up, b_up) = fold(p.up, p.ln2)?;
        let (w_qkv, b_qkv) = fold(p.qkv, p.ln1)?;
        let w_in = Tensor::cat(&[&w_up, &w_qkv], 0)?.to_dtype(dtype)?.contiguous()?;
        let b_in = Tensor::cat(&[&b_up, &b_qkv], 0)?.to_dtype(dtype)?;
        let w_out = Tensor::cat(&[p.dense.weight(), p.down.weight()], 1)?.contiguous()?;
        let b_out = (f32(p.dense.bias().expect("checked"))? + f32(p.down.bias().expect("checked"))?)?.to_dtype(dtype)?;
        let dev = w.device();
        let norm = LayerNorm::new(Tensor::ones(d, dtype, dev)?, Tensor::zeros(d, dtype, dev)?, p.ln1.eps());
        Ok(Some(Self { norm, w_in, b_in, w_out, b_out, d, i }))
    }

    /// The layer over a paged pass's new tokens `x` `[n, d]`; `pool` is this
    /// layer's pool tensor.
    pub(crate) fn forward_paged(&self, x: &Tensor, shape: HeadShape, pool: &Tensor, pass: &PagedPass) -> Result<Tensor> {
        let (d, i) = (self.d, self.i);
        let x = x.contiguous()?;
        let xn = fused::layer_norms(&[&self.norm], &x)?.remove(0);
        // [attention out | MLP hidden | qkv]
        let buf = lt_linear::linear_into_cols(&xn, &self.w_in, &self.b_in, d + i + 3 * d, d)?;
        // GELU over the hidden columns: inside the attention launch where its
        // kernel takes it (decode passes on the per-head kernel), else alone.
        // Attention does not read those columns, so either order is right.
        if !attend_paged_into(shape, &buf, (d + i, 0), (d, i), pool, pass)? {
            buf.narrow(1, d, i)?.inplace_op1(&fused::GeluRows)?;
        }
        Ok(lt_linear::linear_add(&buf.narrow(1, 0, d + i)?, &self.w_out, &self.b_out, &x)?)
    }
}

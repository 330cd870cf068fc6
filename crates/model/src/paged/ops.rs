//! The two per-layer operations of a paged pass as candle ops: one writes into
//! the pool in place, the other returns the attention output. Each has a CPU
//! implementation ([`super::cpu`]) and, with the `cuda` feature, a kernel
//! ([`super::cuda`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, InplaceOp3, Layout, Result, Shape, Tensor};

use super::PagedPass;

/// The per-stack constants both kernels need.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    pub heads: usize,
    pub head_dim: usize,
    /// Rotated channels per head (rotate-half over the first `rot`).
    pub rot: usize,
    pub rope_base: f32,
}

/// Write the rotated keys and the values of a pass's new tokens into their slots.
pub(crate) struct KvWrite {
    pub shape: HeadShape,
}

/// Attention of each new token over its row's positions `0..=pos` in the pool.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct PagedAttention {
    pub shape: HeadShape,
    pub tokens: usize,
    pub page_size: usize,
    pub(crate) max_pages: usize,
    pub(crate) max_keys: usize,
    pub rows: usize,
    pub(crate) groups: usize,
    pub(crate) max_group: usize,
    pub(crate) scale: f32,
    /// The kernel also stores the new keys and values (no [`KvWrite`] before it).
    pub(crate) write_kv: bool,
}

/// `qkv` `[n, heads * 3 * head_dim]`: store keys/values in `pool` (one layer's
/// pool tensor), then return the attention output `[n, heads * head_dim]`.
pub fn attend_paged(shape: HeadShape, qkv: &Tensor, pool: &Tensor, pass: &PagedPass) -> Result<Tensor> {
    let qkv = qkv.contiguous()?;
    let op = write_then_plan(shape, &qkv, pool, pass)?;
    qkv.apply_op3_no_bwd(pool, &pass.index, &op)
}

/// The attention of a pass whose projections and output are column ranges of
/// one row buffer `buf` `[n, width]` (the fused layer's, CUDA only): qkv at
/// columns `qkv_col..qkv_col + 3 * heads * head_dim`, the output written in
/// place to columns `out_col..out_col + heads * head_dim`. `gelu` (first
/// column, count) asks for GELU in place over those columns in the same
/// launch; the result says whether it ran (only the per-head decode kernel
/// runs it, on column counts that split into 16-byte pieces per head), and
/// where not, the caller runs it.
#[cfg(feature = "cuda")]
pub(crate) fn attend_paged_into(
    shape: HeadShape,
    buf: &Tensor,
    (qkv_col, out_col): (usize, usize),
    gelu: (usize, usize),
    pool: &Tensor,
    pass: &PagedPass,
) -> Result<bool> {
    let qkv = buf.narrow(1, qkv_col, 3 * shape.heads * shape.head_dim)?;
    let op = write_then_plan(shape, &qkv, pool, pass)?;
    let piece = shape.heads * 16 / buf.dtype().size_in_bytes();
    let gelu = Some(gelu).filter(|&(_, cols)| super::cuda::gelu_in_attention(&op) && cols.is_multiple_of(piece));
    buf.inplace_op3(pool, &pass.index, &AttendInto { op, cols: (qkv_col, out_col), gelu })?;
    Ok(gelu.is_some())
}

/// Store the new keys and values unless the attention kernel will, and the
/// attention op of the pass.
fn write_then_plan(shape: HeadShape, qkv: &Tensor, pool: &Tensor, pass: &PagedPass) -> Result<PagedAttention> {
    // On CUDA the token decoder's steps (short rows, one new token each) and
    // decode passes on the per-head kernel write and attend in one kernel;
    // everything else writes first.
    #[cfg(feature = "cuda")]
    let write_kv = match qkv.device() {
        candle_core::Device::Cuda(dev) => super::cuda::attention_writes_kv(&shape, qkv.dtype(), pass.tokens, pass.max_group, pass.max_keys, dev)?,
        _ => false,
    };
    #[cfg(not(feature = "cuda"))]
    let write_kv = false;
    if !write_kv {
        pool.inplace_op3(qkv, &pass.index, &KvWrite { shape })?;
    }
    Ok(PagedAttention {
        write_kv,
        shape,
        tokens: pass.tokens,
        page_size: pass.page_size,
        max_pages: pass.max_pages,
        max_keys: pass.max_keys,
        rows: pass.rows,
        groups: pass.groups,
        max_group: pass.max_group,
        scale: (shape.head_dim as f32).powf(-0.5),
    })
}

/// [`PagedAttention`] in place in a row buffer (see [`attend_paged_into`]).
#[cfg(feature = "cuda")]
struct AttendInto {
    op: PagedAttention,
    /// Columns of the projections and of the output.
    cols: (usize, usize),
    /// Columns to run GELU over in the same launch.
    gelu: Option<(usize, usize)>,
}

#[cfg(feature = "cuda")]
impl candle_core::InplaceOp3 for AttendInto {
    fn name(&self) -> &'static str {
        "paged-attention-into"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("paged attention into a row buffer runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        buf: &mut candle_core::CudaStorage,
        bl: &Layout,
        pool: &candle_core::CudaStorage,
        pl: &Layout,
        index: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<()> {
        super::cuda::attend_into(&self.op, self.cols, self.gelu, buf, bl, pool, pl, index, il)
    }
}

/// The contiguous elements of a CPU storage as a slice of `T`.
fn slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("paged kernels need contiguous inputs"),
    }
}

impl InplaceOp3 for KvWrite {
    fn name(&self) -> &'static str {
        "paged-kv-write"
    }

    fn cpu_fwd(&self, pool: &mut CpuStorage, pl: &Layout, qkv: &CpuStorage, ql: &Layout, index: &CpuStorage, il: &Layout) -> Result<()> {
        let index = slice::<u32>(index, il)?;
        if pl.start_offset() != 0 || !pl.is_contiguous() {
            candle_core::bail!("the KV pool must be a whole contiguous tensor");
        }
        match (pool, qkv) {
            (CpuStorage::F32(p), q) => super::cpu::kv_write(&self.shape, p, slice(q, ql)?, index),
            (CpuStorage::BF16(p), q) => super::cpu::kv_write(&self.shape, p, slice(q, ql)?, index),
            (CpuStorage::F16(p), q) => super::cpu::kv_write(&self.shape, p, slice(q, ql)?, index),
            (p, _) => candle_core::bail!("paged KV pool of dtype {:?} is not supported", p.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        pool: &mut candle_core::CudaStorage,
        pl: &Layout,
        qkv: &candle_core::CudaStorage,
        ql: &Layout,
        index: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<()> {
        super::cuda::kv_write(self, pool, pl, qkv, ql, index, il)
    }
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(&self, qkv: &CpuStorage, ql: &Layout, pool: &CpuStorage, pl: &Layout, index: &CpuStorage, il: &Layout) -> Result<(CpuStorage, Shape)> {
        let index = slice::<u32>(index, il)?;
        let out = match qkv {
            CpuStorage::F32(_) => CpuStorage::F32(super::cpu::attend(self, slice(qkv, ql)?, slice(pool, pl)?, index)),
            CpuStorage::BF16(_) => CpuStorage::BF16(super::cpu::attend(self, slice(qkv, ql)?, slice(pool, pl)?, index)),
            CpuStorage::F16(_) => CpuStorage::F16(super::cpu::attend(self, slice(qkv, ql)?, slice(pool, pl)?, index)),
            s => candle_core::bail!("paged attention in dtype {:?} is not supported", s.dtype()),
        };
        Ok((out, Shape::from((self.tokens, self.shape.heads * self.shape.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &candle_core::CudaStorage,
        ql: &Layout,
        pool: &candle_core::CudaStorage,
        pl: &Layout,
        index: &candle_core::CudaStorage,
        il: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::attend(self, qkv, ql, pool, pl, index, il)
    }
}

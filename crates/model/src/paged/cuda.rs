//! Launches of the kernels in `kernels/paged_attention.cu` (compiled to PTX by
//! build.rs and loaded by candle on first use).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, DType, Layout, Result, Shape};

use super::ops::{HeadShape, KvWrite, PagedAttention};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};

use crate::cuda_util::{dispatch_float, range as offsets, suffix, view, Rows};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
const MODULE: &str = "blockserve_paged_attention";

pub(super) fn kv_write(op: &KvWrite, pool: &mut CudaStorage, pl: &Layout, qkv: &CudaStorage, ql: &Layout, index: &CudaStorage, il: &Layout) -> Result<()> {
    fn go<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        op: &KvWrite,
        pool: &mut CudaStorage,
        qkv: &CudaStorage,
        ql: &Layout,
        index: &CudaStorage,
        il: &Layout,
    ) -> Result<()> {
        let s = op.shape;
        let dev = qkv.device().clone();
        let func = dev.get_or_load_custom_func(&format!("kv_write_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
        // The projections may be a column range of a wider row buffer.
        let rows = Rows::of(ql)?;
        let n = rows.rows;
        if n == 0 {
            return Ok(());
        }
        if rows.cols != 3 * s.heads * s.head_dim {
            candle_core::bail!("kv-write: qkv rows of {} elements, expected {}", rows.cols, 3 * s.heads * s.head_dim);
        }
        let (ia, ib) = offsets(il)?;
        let q = qkv.as_cuda_slice::<T>()?.slice(rows.span());
        let idx = index.as_cuda_slice::<u32>()?.slice(ia..ib);
        let p = pool.as_cuda_slice_mut::<T>()?;
        let mut b = func.builder();
        b.arg(p);
        b.arg(&q);
        b.arg(&idx);
        candle_core::builder_arg!(b, s.heads as i32, s.head_dim as i32, s.rot as i32, s.rope_base, rows.ld as i32);
        // A thread per eight channels of a head, up to 256 threads a CTA.
        let threads = s.heads * s.head_dim / 8;
        let block = threads.next_multiple_of(32).min(256);
        let cfg = LaunchConfig { grid_dim: (n as u32, threads.div_ceil(block) as u32, 1), block_dim: (block as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the kernel reads n tokens of qkv and n meta triples, and writes
        // the slots those triples name, all inside the pool (planned by KvPool).
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
    if pl.start_offset() != 0 {
        candle_core::bail!("the KV pool must be a whole tensor");
    }
    if !op.shape.head_dim.is_multiple_of(8) || op.shape.head_dim > 256 {
        candle_core::bail!("the KV write kernel needs head_dim a multiple of 8 and at most 256, not {}", op.shape.head_dim);
    }
    dispatch_float!(qkv.dtype(), go(op, pool, qkv, ql, index, il))
}

/// Where one attention launch reads and writes: device pointers, and the
/// elements between consecutive tokens' rows of the projections (`qkv_ld`)
/// and of the output (`out_ld`): `3 * heads * head_dim` and `heads *
/// head_dim` for tensors of their own, the width of the row buffer when both
/// are column ranges of one (the fused layer's).
struct AttnIo {
    out: u64,
    out_ld: i32,
    qkv: u64,
    qkv_ld: i32,
    pool: u64,
    index: u64,
    /// Columns of the row buffer (`qkv_ld` apart) that the per-head decode
    /// kernel runs GELU over in place, `act_w` a head (0: none).
    act: u64,
    act_w: i32,
}

/// The attention of `op` into a new `[tokens, heads * head_dim]` tensor.
pub(super) fn attend(
    op: &PagedAttention,
    qkv: &CudaStorage,
    ql: &Layout,
    pool: &CudaStorage,
    pl: &Layout,
    index: &CudaStorage,
    il: &Layout,
) -> Result<(CudaStorage, Shape)> {
    fn go<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        op: &PagedAttention,
        qkv: &CudaStorage,
        ql: &Layout,
        pool: &CudaStorage,
        pl: &Layout,
        index: &CudaStorage,
        il: &Layout,
    ) -> Result<CudaStorage> {
        let s = op.shape;
        let dev = qkv.device().clone();
        let out = unsafe { dev.alloc::<T>(op.tokens * s.heads * s.head_dim)? };
        let (q, p, idx) = (view::<T>(qkv, ql)?, view::<T>(pool, pl)?, view::<u32>(index, il)?);
        let stream = dev.cuda_stream();
        {
            let ((o, _ro), (qp, _rq), (pp, _rp), (ip, _ri)) = (out.device_ptr(&stream), q.device_ptr(&stream), p.device_ptr(&stream), idx.device_ptr(&stream));
            let io = AttnIo {
                out: o,
                out_ld: (s.heads * s.head_dim) as i32,
                qkv: qp,
                qkv_ld: (3 * s.heads * s.head_dim) as i32,
                pool: pp,
                index: ip,
                act: 0,
                act_w: 0,
            };
            launch::<T>(op, &dev, &io)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
    let out = dispatch_float!(qkv.dtype(), go(op, qkv, ql, pool, pl, index, il))?;
    Ok((out, Shape::from((op.tokens, op.shape.heads * op.shape.head_dim))))
}

/// The attention of `op` in place in a row buffer `buf` `[tokens, width]`
/// (the fused layer's): projections at columns `qkv_col..`, output written
/// to columns `out_col..`; with `gelu` (first column, count), GELU in place
/// over those columns too, which only the per-head decode kernel does
/// ([`gelu_in_attention`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_into(
    op: &PagedAttention,
    (qkv_col, out_col): (usize, usize),
    gelu: Option<(usize, usize)>,
    buf: &mut CudaStorage,
    bl: &Layout,
    pool: &CudaStorage,
    pl: &Layout,
    index: &CudaStorage,
    il: &Layout,
) -> Result<()> {
    // (The storages as (storage, layout) pairs: the buffer written, then the
    // pool and the index read.)
    fn go<T: CudaDType + DeviceRepr + candle_core::WithDType>(
        op: &PagedAttention,
        ((qkv_col, out_col), gelu): ((usize, usize), Option<(usize, usize)>),
        (buf, bl): (&mut CudaStorage, &Layout),
        [(pool, pl), (index, il)]: [(&CudaStorage, &Layout); 2],
    ) -> Result<()> {
        let s = op.shape;
        let rows = Rows::of(bl)?;
        let width = s.heads * s.head_dim;
        let gelu_fits = gelu.is_none_or(|(col, cols)| col + cols <= rows.cols && cols.is_multiple_of(s.heads * 16 / std::mem::size_of::<T>()));
        if rows.rows != op.tokens || qkv_col + 3 * width > rows.cols || out_col + width > rows.cols || !gelu_fits {
            candle_core::bail!("attend-into: a [{}, {}] buffer for {} tokens, qkv at {qkv_col}, output at {out_col}", rows.rows, rows.cols, op.tokens);
        }
        let dev = pool.device().clone();
        let (p, idx) = (view::<T>(pool, pl)?, view::<u32>(index, il)?);
        let b = buf.as_cuda_slice_mut::<T>()?;
        let stream = dev.cuda_stream();
        let ((base, _rb), (pp, _rp), (ip, _ri)) = (b.device_ptr_mut(&stream), p.device_ptr(&stream), idx.device_ptr(&stream));
        let at = |col: usize| base + ((rows.start + col) * std::mem::size_of::<T>()) as u64;
        let (act, act_w) = gelu.map_or((0, 0), |(col, cols)| (at(col), (cols / s.heads) as i32));
        let io = AttnIo { out: at(out_col), out_ld: rows.ld as i32, qkv: at(qkv_col), qkv_ld: rows.ld as i32, pool: pp, index: ip, act, act_w };
        launch::<T>(op, &dev, &io)
    }
    dispatch_float!(pool.dtype(), go(op, ((qkv_col, out_col), gelu), (buf, bl), [(pool, pl), (index, il)]))
}

/// Launch the attention kernel that `op`'s pass takes.
fn launch<T: CudaDType + DeviceRepr + candle_core::WithDType>(op: &PagedAttention, dev: &candle_core::CudaDevice, io: &AttnIo) -> Result<()> {
    let s = op.shape;
    if !matches!(s.head_dim, 16 | 32 | 64 | 128 | 256) {
        candle_core::bail!("paged attention supports head_dim 16, 32, 64, 128 or 256, not {}", s.head_dim);
    }
    let n = op.tokens;
    if n == 0 {
        return Ok(());
    }
    if io.act != 0 && !gelu_in_attention(op) {
        candle_core::bail!("paged attention: GELU in the attention launch needs the per-head decode kernel");
    }
    // Rows of at most MAX_LOCAL_KEYS (8) positions, the token decoder's,
    // take a warp per token and head.
    // The arguments both kernels start with. Launch arguments are pushed
    // by reference and must live until the launch: a macro, so that they
    // are locals of the launching block.
    macro_rules! leading_args {
        ($b:ident) => {
            $b.arg(&io.out);
            $b.arg(&io.qkv);
            $b.arg(&io.pool);
            $b.arg(&io.index);
            candle_core::builder_arg!($b, n as i32, s.heads as i32, s.rot as i32, s.rope_base, op.page_size as i32, op.max_pages as i32);
        };
    }
    if short_rows(&s, op.max_keys) {
        let func = dev.get_or_load_custom_func(&format!("local_attn_{}_{}", suffix(T::DTYPE)?, s.head_dim), MODULE, PTX)?;
        let mut b = func.builder();
        leading_args!(b);
        candle_core::builder_arg!(b, op.scale, op.write_kv as i32);
        b.arg(&io.qkv_ld);
        b.arg(&io.out_ld);
        // Four warps a CTA, a warp per (token, head).
        let cfg = LaunchConfig { grid_dim: ((n * s.heads).div_ceil(4) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: as below; every row's keys (at most 8) lie in its pages.
        // With write_kv the kernel also stores into the pool (through the
        // view's pointer): each token's own slot, which the pass reserved
        // for it and no other warp of the launch reads.
        unsafe { b.launch(cfg) }.w()?;
        return Ok(());
    }
    // Decode passes over long rows in 2-byte dtypes, in batches that fill
    // a wave of CTAs: a CTA per token over all heads (see the kernel).
    if op.max_group <= 1 && takes_decode_rows(&s, T::DTYPE, n, dev)? {
        return decode_rows::<T>(op, dev, io);
    }
    // Prefill groups in 2-byte dtypes over 16-position pages take the
    // tensor-core kernel (a CTA of four warps per group of up to 64
    // tokens); otherwise CUDA cores, with groups split into CTAs of
    // `group_cta` tokens.
    let tensor_cores = op.max_group > 1 && T::DTYPE != DType::F32 && op.page_size == 16 && matches!(s.head_dim, 64 | 128);
    let group_cta = match op.max_group {
        0 | 1 => 1,
        2 => 2,
        _ => 4,
    };
    let name = if tensor_cores {
        let variant = if s.head_dim == 64 && prefill_attention_tc3() { "tc3" } else { "tc" };
        format!("paged_attn_{variant}_{}_{}", suffix(T::DTYPE)?, s.head_dim)
    } else if op.write_kv {
        // Decode rows on the per-head kernel (what `attention_writes_kv`
        // told the caller, past the short-row and `decode_rows` returns
        // above): two rounds of keys loaded ahead, writing the new keys
        // and values too.
        format!("paged_attn1p2_{}_{}", suffix(T::DTYPE)?, s.head_dim)
    } else {
        format!("paged_attn{group_cta}_{}_{}", suffix(T::DTYPE)?, s.head_dim)
    };
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    // One warp covers 32 / (head_dim / 8) keys per round; up to 4 warps.
    let keys_per_warp = 32 / (s.head_dim / 8);
    let warps = if tensor_cores { 4 } else { op.max_keys.div_ceil(keys_per_warp).clamp(1, 4) };
    let subs = if tensor_cores { 1 } else { op.max_group.div_ceil(group_cta) };
    let ctas = op.groups * subs;
    let mut b = func.builder();
    leading_args!(b);
    candle_core::builder_arg!(b, op.rows as i32, op.scale, subs as i32);
    b.arg(&io.qkv_ld);
    b.arg(&io.out_ld);
    if op.write_kv {
        b.arg(&io.act);
        b.arg(&io.act_w);
    }
    // Heads vary fastest: blockIdx.x = cta * heads + head.
    let cfg = LaunchConfig { grid_dim: ((ctas * s.heads) as u32, 1, 1), block_dim: (32 * warps as u32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: every token's keys lie in pages its row's table names, which the
    // pool planned; the output rows (n of heads * head_dim, out_ld apart)
    // and the projections lie in buffers the callers sized. With write_kv
    // each (token, head) CTA also stores into the token's own slot,
    // reserved for it by the pass, before it reads any key.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// Whether the attention launch of `op` takes the per-head decode kernel,
/// which can also run the fused layer's GELU (`attend_into`): the decode
/// passes whose kernel writes the new keys and values, other than short rows.
pub(super) fn gelu_in_attention(op: &PagedAttention) -> bool {
    op.write_kv && !short_rows(&op.shape, op.max_keys)
}

/// Whether rows of at most `max_keys` positions take the short-row kernel (a
/// warp per token and head; the lanes' channels must split the rotary half
/// evenly, which 25% rotary over 32, 64 or 128 does).
fn short_rows(s: &HeadShape, max_keys: usize) -> bool {
    max_keys <= 8 && matches!(s.head_dim, 32 | 64 | 128) && (s.rot / 2).is_multiple_of(s.head_dim / 32)
}

/// Whether the attention kernel of a pass (`tokens` new tokens, groups of at
/// most `max_group`, rows of at most `max_keys` positions) also stores the new
/// keys and values, so that no KV-write launch goes before it: short rows
/// (the token decoder's) and decode passes on the per-head kernel.
pub(super) fn attention_writes_kv(
    s: &HeadShape,
    dtype: DType,
    tokens: usize,
    max_group: usize,
    max_keys: usize,
    dev: &candle_core::CudaDevice,
) -> Result<bool> {
    if max_group > 1 {
        return Ok(false);
    }
    Ok(short_rows(s, max_keys) || (two_ahead(s, dtype) && !takes_decode_rows(s, dtype, tokens, dev)?))
}

/// Whether decode passes on the per-head kernel take its two-rounds-ahead
/// form (which also writes the new keys and values).
fn two_ahead(s: &HeadShape, dtype: DType) -> bool {
    dtype != DType::F32 && matches!(s.head_dim, 64 | 128) && !decode_one_ahead()
}

/// Whether a decode pass of `n` tokens takes `decode_rows` (a CTA per token).
fn takes_decode_rows(s: &HeadShape, dtype: DType, n: usize, dev: &candle_core::CudaDevice) -> Result<bool> {
    if dtype == DType::F32 || !matches!(s.head_dim, 64 | 128) || s.heads * s.head_dim > 1024 {
        return Ok(false);
    }
    Ok(match decode_attention() {
        DecodeAttention::Rows => true,
        DecodeAttention::PerHead => false,
        DecodeAttention::Auto => n >= decode_rows_wave(dev, s.heads * s.head_dim)?,
    })
}

/// Which kernel decode passes take: `BLOCKSERVE_DECODE_ATTENTION=per-head` or
/// `rows` forces one (for A/B measurements on the device); unset, `decode_rows`
/// takes batches that fill a wave.
#[derive(Clone, Copy, PartialEq)]
enum DecodeAttention {
    Auto,
    PerHead,
    Rows,
}

fn decode_attention() -> DecodeAttention {
    static CHOICE: std::sync::OnceLock<DecodeAttention> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| match std::env::var("BLOCKSERVE_DECODE_ATTENTION").as_deref() {
        Ok("per-head") => DecodeAttention::PerHead,
        Ok("rows") => DecodeAttention::Rows,
        _ => DecodeAttention::Auto,
    })
}

/// `BLOCKSERVE_DECODE_PREFETCH=1` runs the per-head decode kernel with one
/// round of keys loaded ahead, as before two (for A/B runs).
fn decode_one_ahead() -> bool {
    static ONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONE.get_or_init(|| std::env::var("BLOCKSERVE_DECODE_PREFETCH").as_deref() == Ok("1"))
}

/// `BLOCKSERVE_PREFILL_ATTENTION=tc3` runs prefill attention at head_dim 64
/// on the tensor-core kernel as the compiler sizes it (three CTAs a
/// multiprocessor) instead of the default bound of four, for A/B runs.
fn prefill_attention_tc3() -> bool {
    static TC3: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TC3.get_or_init(|| std::env::var("BLOCKSERVE_PREFILL_ATTENTION").as_deref() == Ok("tc3"))
}

/// The device's multiprocessor count (one device per process; read once).
fn multiprocessors(dev: &candle_core::CudaDevice) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
    static SMS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if let Some(&n) = SMS.get() {
        return Ok(n);
    }
    let n = dev.cuda_stream().context().attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).w()? as usize;
    Ok(*SMS.get_or_init(|| n))
}

/// `decode_rows`' launch shape for `width` = heads * head_dim channels: warps
/// a CTA and bytes of shared memory. Four warps with `DR_STAGES` (4) slots each,
/// fewer when a slot is large, within 48 KB.
fn decode_rows_shape(width: usize) -> (usize, usize) {
    const STAGES: usize = 4;
    let slot_bytes = 2 * width * 2;
    let warps = (48 * 1024 / (STAGES * slot_bytes)).clamp(1, 4);
    (warps, warps * STAGES * slot_bytes)
}

/// Tokens that fill one wave of `decode_rows` CTAs (as many as the
/// multiprocessors hold at once, limited by shared memory).
fn decode_rows_wave(dev: &candle_core::CudaDevice, width: usize) -> Result<usize> {
    let (_, smem) = decode_rows_shape(width);
    Ok(multiprocessors(dev)? * (227 * 1024 / (smem + 1024)).max(1))
}

/// Decode passes over long rows in 2-byte dtypes (`decode_rows` in the .cu
/// file): a CTA per token over all heads.
fn decode_rows<T: CudaDType + DeviceRepr + candle_core::WithDType>(op: &PagedAttention, dev: &candle_core::CudaDevice, io: &AttnIo) -> Result<()> {
    let (s, n) = (op.shape, op.tokens);
    let (warps, smem) = decode_rows_shape(s.heads * s.head_dim);
    let name = format!("decode_rows_{}_{}_{}", suffix(T::DTYPE)?, s.head_dim, (s.heads * s.head_dim / 8).div_ceil(32));
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&io.out);
    b.arg(&io.qkv);
    b.arg(&io.pool);
    b.arg(&io.index);
    candle_core::builder_arg!(b, n as i32, s.heads as i32, s.rot as i32, s.rope_base, op.page_size as i32, op.max_pages as i32, op.scale);
    b.arg(&io.qkv_ld);
    b.arg(&io.out_ld);
    let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (32 * warps as u32, 1, 1), shared_mem_bytes: smem as u32 };
    // SAFETY: every token's keys lie in pages its row's table names (planned by
    // the pool); a CTA writes only its own token's heads * head_dim outputs.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

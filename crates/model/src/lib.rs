//! blockserve's model math: Block Transformer (global-to-local LM) and GPT-NeoX
//! (Pythia) inference on candle, matching the reference implementation.
//!
//! Pure computation: no async runtime, no networking. The serving tiers own the
//! scheduling and pass caches in and out of these calls.
//!
//! - [`config`], [`presets`], [`reference_yaml`] (re-exported from
//!   `blockserve-config`, which holds them as plain data), [`loader`]: what a
//!   model is and how to load it from disk.
//! - [`gpt_neox`]: the transformer stack every decoder is made of.
//! - [`paged`]: the paged KV pool every incremental pass reads and writes.
//! - [`block_transformer`], [`causal_lm`]: the two model kinds, with incremental,
//!   batched entry points over caller-owned pools.
//! - [`prompt`], [`sampling`], [`generation`]: prompt layout, token choice, and a
//!   synchronous multi-session driver.

pub mod argmax;
mod block_transformer;
mod causal_lm;
#[cfg(feature = "cuda")]
mod cuda_util;
mod error;
mod fused;
#[cfg(feature = "cuda")]
mod fused_layer;
mod generation;
mod gpt_neox;
pub mod init;
pub mod loader;
#[cfg(feature = "cuda")]
mod lt_linear;
pub mod paged;
#[cfg(feature = "cuda")]
pub mod pinned;
pub mod prompt;
pub mod sampling;
#[cfg(feature = "cuda")]
mod step_graph;
pub mod weights;

pub use blockserve_config::{model as config, presets, reference_yaml, ConfigError};

pub use block_transformer::LocalKv;
pub use block_transformer::{BlockTransformer, Parts};
pub use causal_lm::CausalLm;
pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use generation::{FinishReason, GenerationOutput, GenerationRequest, StopCriteria};
pub use paged::{KvPool, PagedPass, SeqKv};
pub use prompt::PromptLayout;
pub use sampling::SamplingParams;

/// A loaded model of either kind.
// One per process, built once: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Model {
    Block(BlockTransformer),
    Vanilla(CausalLm),
}

impl Model {
    pub fn config(&self) -> ModelConfig {
        match self {
            Model::Block(m) => ModelConfig::Block(m.config.clone()),
            Model::Vanilla(m) => ModelConfig::Vanilla(m.config.clone()),
        }
    }
}

/// The CUDA device `ordinal`, set up for serving: one stream, so candle's
/// per-tensor event tracking (a record and a wait per kernel argument) is turned
/// off before any tensor exists on it.
pub fn cuda_device(ordinal: usize) -> Result<candle_core::Device> {
    let device = candle_core::Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = &device {
        // SAFETY: blockserve launches only on the per-thread default streams of
        // this device, and orders work across threads itself (the engine's
        // token thread waits for the caller's stream), so no events are needed.
        unsafe { d.disable_event_tracking() };
        keep_freed_memory(d)?;
    }
    Ok(device)
}

/// Set up the device's stream-ordered memory pool (what candle allocates from):
/// - keep freed memory in the pool instead of returning it to the driver at
///   every synchronisation (the default release threshold is 0): every pass
///   allocates and frees its activations;
/// - never make one stream wait for another to reuse memory freed there (the
///   pool's "internal dependencies"): the engine's two threads launch on two
///   streams, and such a wait would order one tier's pass behind the other's.
///   Memory whose free has completed is still reused across streams.
///
/// Neither changed the engine's figures measurably on an H200 (2026-11-30,
/// `docs/performance.md`); they are here so that the pool cannot couple the
/// two streams.
#[cfg(feature = "cuda")]
fn keep_freed_memory(d: &candle_core::CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use sys::CUmemPool_attribute as Attr;
    let err = |what: &str, e: sys::CUresult| ModelError::Candle(candle_core::Error::Msg(format!("CUDA memory pool {what}: {e:?}")));
    let ctx = d.cuda_stream().context().clone();
    ctx.bind_to_thread().map_err(|e| ModelError::Candle(candle_core::Error::Msg(format!("CUDA context: {e:?}"))))?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    match unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) } {
        sys::CUresult::CUDA_SUCCESS => {}
        e => return Err(err("lookup", e)),
    }
    let (mut threshold, mut no) = (u64::MAX, 0i32);
    let settings: [(Attr, *mut std::ffi::c_void, &str); 2] = [
        (Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut _, "release threshold"),
        (Attr::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES, &mut no as *mut i32 as *mut _, "reuse policy"),
    ];
    for (attr, value, what) in settings {
        match unsafe { sys::cuMemPoolSetAttribute(pool, attr, value) } {
            sys::CUresult::CUDA_SUCCESS => {}
            e => return Err(err(what, e)),
        }
    }
    Ok(())
}

/// Wait for this thread's device work, then read: a read into ordinary
/// (pageable) host memory that has to wait for the device holds up other
/// threads' host-device copies meanwhile (the engine's block-decoder thread
/// uploads each pass's indices while the token thread waits for its block),
/// so the waiting is done first, on the stream alone.
pub fn settled<T>(t: &candle_core::Tensor, read: impl FnOnce(&candle_core::Tensor) -> candle_core::Result<T>) -> candle_core::Result<T> {
    t.device().synchronize()?;
    read(t)
}

/// The elements of a float tensor as row-major little-endian bytes, copied to
/// the host (what the wire and the block decoder's downloads carry).
pub fn host_bytes(t: &candle_core::Tensor) -> candle_core::Result<Vec<u8>> {
    use candle_core::DType;
    let flat = t.flatten_all()?.to_device(&candle_core::Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F32 => bytemuck::cast_slice(&flat.to_vec1::<f32>()?).to_vec(),
        DType::BF16 => bytemuck::cast_slice(&flat.to_vec1::<half::bf16>()?).to_vec(),
        DType::F16 => bytemuck::cast_slice(&flat.to_vec1::<half::f16>()?).to_vec(),
        other => candle_core::bail!("no host bytes for {other:?}"),
    })
}

/// Free and total memory of `device` in bytes (None on the CPU).
pub fn device_memory(device: &candle_core::Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        return d.cuda_stream().context().mem_get_info().ok();
    }
    let _ = device;
    None
}

//! A pass's contexts to the host without waiting for the work queued after it.
//!
//! The block decoder launches a pass and, while the GPU runs it, may launch
//! the next link's pass, so that the host's time issuing kernels (about a
//! quarter of a pass) overlaps the GPU's work. Candle's copy to the host waits
//! for everything queued on the stream, so the first pass's contexts would wait
//! for the second pass as well. Here the copy is queued right behind the pass
//! into page-locked host memory (reused across passes), and waiting for it
//! waits for that copy only. On the CPU the copy is made at once.

use candle_core::{DType, Tensor};

use crate::EngineError;

type Result<T> = std::result::Result<T, EngineError>;

/// A `[rows, dim]` matrix on its way to the host.
pub struct Download {
    dtype: DType,
    rows: usize,
    dim: usize,
    inner: Inner,
}

enum Inner {
    Ready(Vec<u8>),
    /// The copy, and the tensor it reads (kept until the copy is done).
    #[cfg(feature = "cuda")]
    Pinned {
        copy: cuda::Pinned,
        _source: Tensor,
    },
}

/// A matrix on the host: row-major little-endian bytes.
pub struct HostRows {
    pub bytes: Vec<u8>,
    pub dtype: DType,
    pub rows: usize,
    pub dim: usize,
}

/// Starts downloads and keeps their page-locked buffers for the next ones.
#[derive(Default)]
pub struct Downloads {
    #[cfg(feature = "cuda")]
    free: Vec<cuda::Pinned>,
}

impl Downloads {
    /// Queue the copy of `t` `[rows, dim]` to the host.
    pub fn start(&mut self, t: &Tensor) -> Result<Download> {
        let (rows, dim) = t.dims2()?;
        let dtype = t.dtype();
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = t.device() {
            let t = t.contiguous()?;
            let pinned = cuda::start(&mut self.free, dev, &t)?;
            return Ok(Download { dtype, rows, dim, inner: Inner::Pinned { copy: pinned, _source: t } });
        }
        let bytes = blockserve_model::host_bytes(t)?;
        Ok(Download { dtype, rows, dim, inner: Inner::Ready(bytes) })
    }

    /// Wait for the copy (only it) and take the bytes; the buffer is kept.
    // Without CUDA the match has one arm, which clippy would make a `let`;
    // the CUDA build has two.
    #[allow(clippy::infallible_destructuring_match)]
    pub fn wait(&mut self, d: Download) -> Result<HostRows> {
        let bytes = match d.inner {
            Inner::Ready(b) => b,
            #[cfg(feature = "cuda")]
            Inner::Pinned { copy: p, .. } => {
                let bytes = p.bytes(d.rows * d.dim * d.dtype.size_in_bytes())?;
                self.free.push(p);
                bytes
            }
        };
        Ok(HostRows { bytes, dtype: d.dtype, rows: d.rows, dim: d.dim })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use candle_core::cuda_backend::cudarc::driver::{result, CudaEvent, CudaStream, DevicePtr, PinnedHostSlice};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{Storage, Tensor};

    use super::Result;
    use crate::EngineError;

    /// A page-locked buffer and, once a copy into it is queued, the event
    /// recorded behind that copy.
    pub struct Pinned {
        buf: PinnedHostSlice<u8>,
        copied: Option<CudaEvent>,
    }

    impl Pinned {
        pub fn capacity(&self) -> usize {
            self.buf.len()
        }

        /// The first `n` bytes, once the copy into them is done.
        pub fn bytes(&self, n: usize) -> Result<Vec<u8>> {
            if let Some(e) = &self.copied {
                e.synchronize().w()?;
            }
            let p = self.buf.as_ptr().w()?;
            // SAFETY: the copy of n <= len bytes into the buffer has completed.
            Ok(unsafe { std::slice::from_raw_parts(p, n.min(self.buf.len())) }.to_vec())
        }
    }

    /// Queue the copy of contiguous `t` into a free buffer that fits, or a new one.
    pub fn start(free: &mut Vec<Pinned>, dev: &CudaDevice, t: &Tensor) -> Result<Pinned> {
        let n = t.elem_count() * t.dtype().size_in_bytes();
        let stream: Arc<CudaStream> = dev.cuda_stream();
        let mut pinned = match free.iter().position(|p| p.capacity() >= n) {
            Some(i) => free.swap_remove(i),
            // Room to grow: a pass's row count varies from one pass to the next.
            // SAFETY: the buffer is written by a copy before it is read.
            None => Pinned { buf: unsafe { stream.context().alloc_pinned_with_flags::<u8>(n.next_power_of_two(), 0) }.w()?, copied: None },
        };
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else { return Err(EngineError::Wire("a CUDA download of a tensor not on the GPU".into())) };
        let Some((a, _)) = layout.contiguous_offsets() else { return Err(EngineError::Wire("a download needs a contiguous tensor".into())) };
        let size = t.dtype().size_in_bytes();
        let dst = pinned.buf.as_mut_ptr().w()?;
        macro_rules! copy {
            ($t:ty) => {{
                let src = cs.as_cuda_slice::<$t>()?;
                let (ptr, _record) = src.device_ptr(&stream);
                // SAFETY: n bytes from the tensor's first element (a contiguous
                // run inside its allocation) into a buffer of at least n bytes.
                unsafe { result::memcpy_dtoh_async(std::slice::from_raw_parts_mut(dst, n), ptr + (a * size) as u64, stream.cu_stream()) }.w()?;
            }};
        }
        match t.dtype() {
            candle_core::DType::BF16 => copy!(half::bf16),
            candle_core::DType::F16 => copy!(half::f16),
            candle_core::DType::F32 => copy!(f32),
            other => return Err(EngineError::Wire(format!("no host download for {other:?}"))),
        }
        pinned.copied = Some(stream.record_event(None).w()?);
        Ok(pinned)
    }
}

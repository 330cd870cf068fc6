//! A pass's contexts to the host without waiting for the work queued after it.
//!
//! The block decoder launches a pass and, while the GPU runs it, may launch
//! the next link's pass, so that the host's time issuing kernels (about a
//! quarter of a pass) overlaps the GPU's work. Candle's copy to the host waits
//! for everything queued on the stream, so the first pass's contexts would wait
//! for the second pass as well. Here the copy is queued right behind the pass
//! into page-locked host memory (reused across passes), and waiting for it
//! waits for that copy only (`blockserve_model::pinned`). On the CPU the copy
//! is made at once.

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
        copy: blockserve_model::pinned::Pinned,
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
    free: Vec<blockserve_model::pinned::Pinned>,
}

impl Downloads {
    /// Queue the copy of `t` `[rows, dim]` to the host.
    pub fn start(&mut self, t: &Tensor) -> Result<Download> {
        let (rows, dim) = t.dims2()?;
        let dtype = t.dtype();
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = t.device() {
            let t = t.contiguous()?;
            let n = t.elem_count() * dtype.size_in_bytes();
            let mut copy = match self.free.iter().position(|p| p.capacity() >= n) {
                Some(i) => self.free.swap_remove(i),
                // Room to grow: a pass's row count varies from one pass to the next.
                None => blockserve_model::pinned::Pinned::new(dev, n.next_power_of_two())?,
            };
            copy.read(&t)?;
            return Ok(Download { dtype, rows, dim, inner: Inner::Pinned { copy, _source: t } });
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
            Inner::Pinned { copy: mut p, .. } => {
                let bytes = p.take_bytes()?;
                self.free.push(p);
                bytes
            }
        };
        Ok(HostRows { bytes, dtype: d.dtype, rows: d.rows, dim: d.dim })
    }
}

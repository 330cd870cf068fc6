//! Copies between the device and page-locked host memory that overlap device
//! work (CUDA builds only).
//!
//! A copy out of pageable memory, or into it, waits for the stream: every read
//! of a step's tokens then stands between that step and the next launch. From
//! a page-locked buffer the copy is queued like a kernel, an event marks its
//! end, and the host waits on that event alone, so the work queued after the
//! copy keeps the device busy in the meantime.
//!
//! The driver is called directly, and each call names itself in its error. A
//! first version on cudarc's `PinnedHostSlice` failed on the H200 with a bare
//! `CUDA_ERROR_INVALID_VALUE`, deferred through cudarc's error state to a
//! later candle call, which said nothing about the call that failed.

use std::ffi::c_void;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaContext, DevicePtr};
use candle_core::cuda_backend::CudaDevice;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Shape, Storage, Tensor};

use crate::error::{ModelError, Result};

fn driver_err(call: &str, e: impl std::fmt::Debug) -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(format!("{call}: {e:?}")))
}

/// An event of the context, destroyed when the last holder drops it.
struct Event {
    raw: sys::CUevent,
    ctx: Arc<CudaContext>,
}

// SAFETY: a CUevent may be recorded and waited on from any thread of the
// process once its context is current (`wait` binds it).
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    /// Waits sleep rather than spin (`CU_EVENT_BLOCKING_SYNC`): a waiting
    /// thread would otherwise burn a core for a whole round.
    fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        let mut raw = std::mem::MaybeUninit::uninit();
        let flags = sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32 | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        unsafe { sys::cuEventCreate(raw.as_mut_ptr(), flags) }.result().map_err(|e| driver_err("cuEventCreate", e))?;
        Ok(Self { raw: unsafe { raw.assume_init() }, ctx: ctx.clone() })
    }

    fn wait(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        unsafe { result::event::synchronize(self.raw) }.map_err(|e| driver_err("cuEventSynchronize", e))
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        unsafe {
            let _ = result::event::destroy(self.raw);
        }
    }
}

/// The end of the last copy queued through a [`Pinned`] buffer, to wait on
/// from another thread.
#[derive(Clone)]
pub struct Done(Arc<Event>);

impl Done {
    /// Block (sleeping) until the copy is done.
    pub fn wait(&self) -> Result<()> {
        self.0.wait()
    }
}

/// A page-locked host buffer and the event that ends the last copy queued
/// through it.
pub struct Pinned {
    ptr: *mut u8,
    bytes: usize,
    event: Arc<Event>,
    stream: sys::CUstream,
    /// Bytes the last copy out of the device brings.
    read: usize,
}

// SAFETY: the buffer belongs to the context, not to a thread; the owner uses
// it from one thread at a time (`&mut self`).
unsafe impl Send for Pinned {}

/// The device address of contiguous `t`'s first element and its size in bytes.
fn device_bytes(t: &Tensor) -> Result<(sys::CUdeviceptr, usize)> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(c) = &*storage else { return Err(ModelError::Input("a device copy of a tensor that is not on a CUDA device".into())) };
    let (a, b) = layout.contiguous_offsets().ok_or_else(|| ModelError::Input("a device copy of a tensor that is not contiguous".into()))?;
    let stream = c.device().cuda_stream();
    macro_rules! ptr {
        ($t:ty) => {{
            let (p, _read) = c.as_cuda_slice::<$t>()?.device_ptr(&stream);
            p + (a * std::mem::size_of::<$t>()) as u64
        }};
    }
    let p = match t.dtype() {
        DType::BF16 => ptr!(half::bf16),
        DType::F16 => ptr!(half::f16),
        DType::F32 => ptr!(f32),
        DType::U32 => ptr!(u32),
        d => return Err(ModelError::Input(format!("no page-locked copy for {d:?}"))),
    };
    Ok((p, (b - a) * t.dtype().size_in_bytes()))
}

impl Pinned {
    /// A buffer of `bytes` bytes for copies on `device`'s stream.
    pub fn new(device: &CudaDevice, bytes: usize) -> Result<Self> {
        let stream = device.cuda_stream();
        let ctx = stream.context().clone();
        ctx.bind_to_thread().map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        let event = Arc::new(Event::new(&ctx)?);
        let ptr = unsafe { result::malloc_host(bytes.max(1), 0) }.map_err(|e| driver_err("cuMemHostAlloc", e))? as *mut u8;
        Ok(Self { ptr, bytes: bytes.max(1), event, stream: stream.cu_stream(), read: 0 })
    }

    pub fn capacity(&self) -> usize {
        self.bytes
    }

    fn record(&self) -> Result<()> {
        unsafe { result::event::record(self.event.raw, self.stream) }.map_err(|e| driver_err("cuEventRecord", e))
    }

    /// What to wait on for the last copy queued through the buffer.
    pub fn done(&self) -> Done {
        Done(self.event.clone())
    }

    /// Queue a copy of contiguous `t` (on this buffer's device: bf16, f16,
    /// f32 or u32) into the buffer, behind the work queued before it.
    pub fn read(&mut self, t: &Tensor) -> Result<()> {
        let (from, n) = device_bytes(t)?;
        if n > self.bytes {
            return Err(ModelError::Input(format!("{n} bytes to read into a page-locked buffer of {}", self.bytes)));
        }
        // The previous read must be taken before this one overwrites it.
        self.event.wait()?;
        // SAFETY: the buffer holds `n` bytes, no copy into it is pending
        // (waited above), and the host reads it only after the event.
        let to = unsafe { std::slice::from_raw_parts_mut(self.ptr, n) };
        unsafe { result::memcpy_dtoh_async(to, from, self.stream) }.map_err(|e| driver_err("cuMemcpyDtoHAsync", e))?;
        self.read = n;
        self.record()
    }

    /// The bytes of the last [`Self::read`], once its copy is done.
    pub fn take_bytes(&mut self) -> Result<Vec<u8>> {
        self.event.wait()?;
        let n = std::mem::take(&mut self.read);
        // SAFETY: the copy of n bytes into the buffer has completed.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, n) }.to_vec())
    }

    /// The u32s of the last [`Self::read`] (of a u32 tensor), once its copy is done.
    pub fn take_u32(&mut self) -> Result<Vec<u32>> {
        self.event.wait()?;
        let n = std::mem::take(&mut self.read) / 4;
        // SAFETY: the copy of n u32s into the buffer (page-aligned) has completed.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr as *const u32, n) }.to_vec())
    }

    /// A tensor of `dtype` and `shape` on `device` holding `bytes` (in the
    /// dtype's layout): staged here and copied asynchronously, so the host
    /// does not wait for the work queued before it.
    pub fn upload(&mut self, bytes: &[u8], dtype: DType, shape: impl Into<Shape>, device: &CudaDevice) -> Result<Tensor> {
        let shape = shape.into();
        if bytes.len() != shape.elem_count() * dtype.size_in_bytes() || bytes.len() > self.bytes {
            return Err(ModelError::Input(format!(
                "{} bytes for a {dtype:?} tensor of shape {shape:?} through a page-locked buffer of {}",
                bytes.len(),
                self.bytes
            )));
        }
        let n = shape.elem_count();
        macro_rules! alloc {
            ($t:ty) => {
                // SAFETY: the copy below writes every element before any kernel reads it (stream order).
                CudaStorage::wrap_cuda_slice(unsafe { device.alloc::<$t>(n)? }, device.clone())
            };
        }
        let storage = match dtype {
            DType::BF16 => alloc!(half::bf16),
            DType::F16 => alloc!(half::f16),
            DType::F32 => alloc!(f32),
            DType::U32 => alloc!(u32),
            d => return Err(ModelError::Input(format!("no page-locked upload for {d:?}"))),
        };
        let t = Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false);
        self.upload_into(bytes, &t)?;
        Ok(t)
    }

    /// Copy `bytes` into the existing contiguous tensor `t` (of exactly that
    /// many bytes) on this buffer's stream, staged here: the host does not
    /// wait for the work queued before the copy, only for this buffer's
    /// previous copy to have left it.
    pub fn upload_into(&mut self, bytes: &[u8], t: &Tensor) -> Result<()> {
        let (to, n) = device_bytes(t)?;
        if bytes.len() != n || n > self.bytes {
            return Err(ModelError::Input(format!("{} bytes into a tensor of {n} through a page-locked buffer of {}", bytes.len(), self.bytes)));
        }
        self.event.wait()?;
        // SAFETY: `n` fits the buffer, which no pending copy reads.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, n) }.copy_from_slice(bytes);
        let from = unsafe { std::slice::from_raw_parts(self.ptr, n) };
        unsafe { result::memcpy_htod_async(to, from, self.stream) }.map_err(|e| driver_err("cuMemcpyHtoDAsync", e))?;
        self.record()
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // Nothing may still copy into or out of the buffer when it is freed.
        let _ = self.event.wait();
        unsafe {
            let _ = result::free_host(self.ptr as *mut c_void);
        }
    }
}

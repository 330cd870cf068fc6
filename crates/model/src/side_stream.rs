//! A second CUDA stream beside the thread's own, for work that does not depend
//! on what the thread's stream runs meanwhile (CUDA builds only).
//!
//! The GPT-NeoX parallel residual `x + attn(ln1(x)) + mlp(ln2(x))` has two
//! independent branches. In a decode pass over long rows the attention is
//! bound by reading the KV cache, and the MLP's matmuls, a few microseconds
//! each, run in the gaps when they are launched on a stream of their own (of
//! the highest priority, so that their CTAs are placed as soon as attention
//! CTAs retire instead of after all of them).
//!
//! Synchronisation is by hand: the device's per-tensor event tracking is off
//! (`cuda_device`). [`beside`] records an event on the thread's stream that
//! the side stream waits for, so the side work sees everything launched
//! before; [`Beside::join`] makes the thread's stream wait for the side work.
//! Memory is allocated from the thread's stream (candle allocates there), so:
//! - the side work must not free anything before the join (a block freed on
//!   the thread's stream could be handed out again while the side stream
//!   still reads it): its temporaries are kept by the `Beside` and dropped
//!   after the join;
//! - what it allocates is allocated right after the fork event, with no free
//!   in between, so no block still in use before the fork is handed to it.
//!
//! `BLOCKSERVE_SIDE_STREAM=0` turns it off (for A/B runs).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaEvent, CudaStream};
use candle_core::cuda_backend::{CudaDevice, DeviceId, WrapErr};
use candle_core::{Result, Tensor};

thread_local! {
    /// This thread's side stream on each device.
    static SIDE: RefCell<HashMap<DeviceId, Arc<CudaStream>>> = RefCell::new(HashMap::new());
    /// Whether this crate's launches go to the side stream now.
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
}

/// Whether side streams are on (`BLOCKSERVE_SIDE_STREAM`, default on).
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("BLOCKSERVE_SIDE_STREAM").as_deref() != Ok("0"))
}

/// Whether this thread's launches go to the side stream now (the cuBLASLt
/// handle keeps a workspace per stream by this).
pub(crate) fn active() -> bool {
    ACTIVE.with(Cell::get)
}

/// The stream this crate's kernels launch on: the thread's own, or its side
/// stream inside [`beside`].
pub(crate) fn launch_stream(dev: &CudaDevice) -> Result<Arc<CudaStream>> {
    if active() {
        side(dev)
    } else {
        Ok(dev.cuda_stream())
    }
}

fn side(dev: &CudaDevice) -> Result<Arc<CudaStream>> {
    SIDE.with(|s| {
        if let Some(stream) = s.borrow().get(&dev.id()) {
            return Ok(stream.clone());
        }
        let (_, greatest) = result::stream::get_priority_range().w()?;
        let stream = dev.cuda_stream().context().new_stream_with_priority(greatest).w()?;
        s.borrow_mut().insert(dev.id(), stream.clone());
        Ok(stream)
    })
}

/// Side work in flight: its result, what it must keep alive until the join,
/// and the event that marks its end.
pub(crate) struct Beside {
    out: Tensor,
    keep: Vec<Tensor>,
    done: CudaEvent,
    main: Arc<CudaStream>,
}

impl Beside {
    /// The side work's result, once the thread's stream waits for it.
    pub(crate) fn join(self) -> Result<Tensor> {
        self.main.wait(&self.done).w()?;
        drop(self.keep);
        Ok(self.out)
    }
}

/// Runs `work` (its launches) on the side stream after everything launched on
/// the thread's stream so far; `work` returns its result and the temporaries
/// it allocated. None where a side stream does not apply: not CUDA, turned
/// off, or the thread's stream is being captured into a graph.
pub(crate) fn beside(x: &Tensor, work: impl FnOnce() -> crate::error::Result<(Tensor, Vec<Tensor>)>) -> crate::error::Result<Option<Beside>> {
    let candle_core::Device::Cuda(dev) = x.device() else { return Ok(None) };
    if !enabled() || active() {
        return Ok(None);
    }
    let main = dev.cuda_stream();
    if main.capture_status().w()? != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        return Ok(None);
    }
    let side = side(dev)?;
    let flags = Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
    side.wait(&main.record_event(flags).w()?).w()?;
    ACTIVE.with(|a| a.set(true));
    let result = work();
    ACTIVE.with(|a| a.set(false));
    // On an error the side stream may still run launched work; wait for it
    // before anything it uses can be freed.
    let (out, keep) = match result {
        Ok(r) => r,
        Err(e) => {
            side.synchronize().w()?;
            return Err(e);
        }
    };
    let done = side.record_event(flags).w()?;
    Ok(Some(Beside { out, keep, done, main }))
}

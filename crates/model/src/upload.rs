//! Host-to-device copies of a pass's small u32 inputs (KV index, block ids,
//! picked rows) that do not wait for the device.
//!
//! `Tensor::from_vec` on CUDA copies out of pageable memory, which the driver
//! may stage by first waiting for the stream. The block decoder launches pass
//! n + 1 while pass n runs, so that wait made the next launch stand behind the
//! whole running pass, and the device then idled while the host queued the
//! rest of the new pass's kernels (an H200 x2 run: a prefill-heavy wave's
//! prompt passes spent 5 ms of host time launching, decode passes 1.4 ms).
//! Through page-locked buffers the copies are queued like kernels.

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Buffers per slot: a slot's next copy may fill one buffer while the copy
/// out of the other still waits for the device (the picked rows of a pass are
/// copied after its kernels).
#[cfg(feature = "cuda")]
const RING: usize = 2;

/// `slots` kinds of upload, each with its own page-locked buffers (grown on
/// demand) on CUDA; plain tensors elsewhere.
pub struct Uploads {
    #[cfg(feature = "cuda")]
    slots: Vec<([Option<crate::pinned::Pinned>; RING], usize)>,
}

impl Uploads {
    pub fn new(slots: usize) -> Self {
        #[cfg(not(feature = "cuda"))]
        let _ = slots;
        Self {
            #[cfg(feature = "cuda")]
            slots: (0..slots).map(|_| (Default::default(), 0)).collect(),
        }
    }

    /// `data` as a u32 tensor of `shape` on `device`, through slot `slot`.
    pub fn u32(&mut self, slot: usize, data: &[u32], shape: impl Into<candle_core::Shape>, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            if !data.is_empty() && pinned_uploads() {
                let (ring, next) = &mut self.slots[slot];
                let i = *next;
                *next = (i + 1) % RING;
                let bytes = std::mem::size_of_val(data);
                let buf = &mut ring[i];
                if buf.as_ref().is_none_or(|b| b.capacity() < bytes) {
                    // Dropping the old buffer waits for its last copy.
                    *buf = None;
                    *buf = Some(crate::pinned::Pinned::new(dev, bytes.next_power_of_two().max(1 << 16))?);
                }
                // SAFETY: u32 has no padding; the bytes are the values in memory order.
                let raw = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, bytes) };
                return buf.as_mut().expect("allocated above").upload(raw, candle_core::DType::U32, shape, dev);
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = slot;
        Ok(Tensor::from_slice(data, shape, device)?)
    }
}

/// `BLOCKSERVE_PINNED_UPLOADS=false` copies from pageable memory as before,
/// for A/B runs on the device.
#[cfg(feature = "cuda")]
fn pinned_uploads() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("BLOCKSERVE_PINNED_UPLOADS").as_deref() != Ok("false"))
}

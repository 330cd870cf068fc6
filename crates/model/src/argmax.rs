//! Row-wise argmax of a logits matrix on its own device, first index on ties:
//! what plain greedy decoding keeps on the GPU instead of reading logits back.
//! A kernel on CUDA (candle's generic reduction was a fifth of a token step at
//! batch 2048), a loop on the CPU.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};

use crate::error::Result;

/// `[b, n]` logits -> `[b]` u32 ids of each row's first maximum.
pub fn argmax_rows(logits: &Tensor) -> Result<Tensor> {
    Ok(logits.contiguous()?.apply_op1_no_bwd(&ArgmaxRows)?)
}

struct ArgmaxRows;

fn rows_of<T: WithDType>(x: &[T], n: usize) -> Vec<u32> {
    x.chunks(n)
        .map(|row| {
            let mut best = 0;
            for (i, v) in row.iter().enumerate() {
                if v.to_f64() > row[best].to_f64() {
                    best = i;
                }
            }
            best as u32
        })
        .collect()
}

impl CustomOp1 for ArgmaxRows {
    fn name(&self) -> &'static str {
        "argmax-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, n) = l.shape().dims2()?;
        let Some((o1, o2)) = l.contiguous_offsets() else { candle_core::bail!("argmax-rows needs contiguous logits") };
        let ids = match s {
            CpuStorage::F32(v) => rows_of(&v[o1..o2], n),
            CpuStorage::BF16(v) => rows_of(&v[o1..o2], n),
            CpuStorage::F16(v) => rows_of(&v[o1..o2], n),
            other => candle_core::bail!("argmax-rows: unsupported dtype {:?}", other.dtype()),
        };
        Ok((CpuStorage::U32(ids), Shape::from(b)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::{CudaDType, WrapErr};
        use candle_core::CudaStorage;
        const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/argmax.ptx"));

        fn go<T: CudaDType + DeviceRepr + WithDType>(s: &CudaStorage, l: &Layout) -> candle_core::Result<CudaStorage> {
            let (b, n) = l.shape().dims2()?;
            let Some((o1, o2)) = l.contiguous_offsets() else { candle_core::bail!("argmax-rows needs contiguous logits") };
            let dev = s.device().clone();
            let name = format!("argmax_{}", crate::cuda_util::suffix(T::DTYPE)?);
            let func = dev.get_or_load_custom_func(&name, "blockserve_argmax", PTX)?;
            let x = s.as_cuda_slice::<T>()?.slice(o1..o2);
            // Every row's CTA writes its id: no zero-fill launch first.
            let out = unsafe { dev.alloc::<u32>(b)? };
            if b > 0 {
                let mut builder = func.builder();
                builder.arg(&x);
                builder.arg(&out);
                candle_core::builder_arg!(builder, n as i32, n as u64);
                let cfg = LaunchConfig { grid_dim: (b as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: b rows of n elements in, b ids out.
                unsafe { builder.launch(cfg) }.w()?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        let (b, _) = l.shape().dims2()?;
        let out = crate::cuda_util::dispatch_float!(s.dtype(), go(s, l))?;
        Ok((out, Shape::from(b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_maximum_of_each_row() {
        let x = Tensor::new(&[[0.5f32, 2.0, 2.0, -1.0], [-3.0, -2.0, -2.5, -2.0], [7.0, 1.0, 7.0, 7.0]], &Device::Cpu).unwrap();
        assert_eq!(argmax_rows(&x).unwrap().to_vec1::<u32>().unwrap(), vec![1, 1, 0]);
    }
}

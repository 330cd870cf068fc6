//! Fused layer pieces: bias (+ GELU) on a matmul's output in place, and the
//! three-way parallel residual. On CUDA they are single kernels
//! (`kernels/elementwise.cu`); elsewhere they are candle's ops, which define
//! the result (the CUDA f32 fixture tests hold the kernels to it). Training
//! takes candle's ops everywhere, since the kernels have no backward pass.

use candle_core::{Module, Tensor};
use candle_nn::Linear;

use crate::error::Result;
#[cfg(feature = "cuda")]
use crate::gpt_neox::differentiable;

/// What follows a linear layer's matmul.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    Bias,
    BiasGelu,
}

/// `x W^T + b`, then GELU (exact) for [`Epilogue::BiasGelu`].
pub fn linear(lin: &Linear, x: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.rank() == 2 && !differentiable(x) && !differentiable(lin.weight()) {
        if let Some(bias) = lin.bias() {
            let y = x.matmul(&lin.weight().t()?)?;
            y.inplace_op2(bias, &cuda::BiasAct { gelu: epilogue == Epilogue::BiasGelu })?;
            return Ok(y);
        }
    }
    let y = lin.forward(x)?;
    Ok(match epilogue {
        Epilogue::Bias => y,
        Epilogue::BiasGelu => y.gelu_erf()?,
    })
}

/// `(a + b) + c`.
pub(crate) fn add3(a: &Tensor, b: &Tensor, c: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if a.device().is_cuda() && ![a, b, c].iter().any(|t| differentiable(t)) {
        return Ok(a.contiguous()?.apply_op3_no_bwd(&b.contiguous()?, &c.contiguous()?, &cuda::Add3)?);
    }
    Ok(((a + b)? + c)?)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CpuStorage, CudaStorage, CustomOp3, InplaceOp2, Layout, Result, Shape, WithDType};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
    const MODULE: &str = "blockserve_elementwise";

    use crate::cuda_util::{dispatch_float, range, suffix};

    fn cfg(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).min(132 * 16) as u32;
        LaunchConfig { grid_dim: (blocks.max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    pub struct BiasAct {
        pub(crate) gelu: bool,
    }

    impl InplaceOp2 for BiasAct {
        fn name(&self) -> &'static str {
            "bias-act"
        }

        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
            candle_core::bail!("bias-act runs on CUDA only")
        }

        fn cuda_fwd(&self, y: &mut CudaStorage, yl: &Layout, bias: &CudaStorage, bl: &Layout) -> Result<()> {
            fn go<T: CudaDType + DeviceRepr + WithDType>(gelu: bool, y: &mut CudaStorage, yl: &Layout, bias: &CudaStorage, bl: &Layout) -> Result<()> {
                let (ya, yb) = range(yl)?;
                let (ba, bb) = range(bl)?;
                let n = yb - ya;
                let cols = bb - ba;
                if n == 0 {
                    return Ok(());
                }
                let dev = bias.device().clone();
                let func = dev.get_or_load_custom_func(&format!("bias_act_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
                let b = bias.as_cuda_slice::<T>()?.slice(ba..bb);
                let mut yv = y.as_cuda_slice_mut::<T>()?.slice_mut(ya..yb);
                let mut builder = func.builder();
                builder.arg(&mut yv);
                builder.arg(&b);
                candle_core::builder_arg!(builder, n as u64, cols as i32, gelu as i32);
                // SAFETY: n elements of y, rows of `cols`, and a bias of `cols`.
                unsafe { builder.launch(cfg(n)) }.w()?;
                Ok(())
            }
            if yl.dims().last() != bl.dims().last() || bl.dims().len() != 1 {
                candle_core::bail!("bias-act: bias {:?} does not match rows of {:?}", bl.dims(), yl.dims());
            }
            dispatch_float!(y.dtype(), go(self.gelu, y, yl, bias, bl))
        }
    }

    pub struct Add3;

    impl CustomOp3 for Add3 {
        fn name(&self) -> &'static str {
            "add3"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("add3 runs on CUDA only")
        }

        fn cuda_fwd(&self, a: &CudaStorage, al: &Layout, b: &CudaStorage, bl: &Layout, c: &CudaStorage, cl: &Layout) -> Result<(CudaStorage, Shape)> {
            fn go<T: CudaDType + DeviceRepr + WithDType>(
                a: &CudaStorage,
                al: &Layout,
                b: &CudaStorage,
                bl: &Layout,
                c: &CudaStorage,
                cl: &Layout,
            ) -> Result<CudaStorage> {
                let (aa, ab) = range(al)?;
                let (ba, bb) = range(bl)?;
                let (ca, cb) = range(cl)?;
                let n = ab - aa;
                let dev = a.device().clone();
                let out = unsafe { dev.alloc::<T>(n)? };
                if n > 0 {
                    let func = dev.get_or_load_custom_func(&format!("add3_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
                    let (x, y, z) = (a.as_cuda_slice::<T>()?.slice(aa..ab), b.as_cuda_slice::<T>()?.slice(ba..bb), c.as_cuda_slice::<T>()?.slice(ca..cb));
                    let mut builder = func.builder();
                    builder.arg(&out);
                    builder.arg(&x);
                    builder.arg(&y);
                    builder.arg(&z);
                    candle_core::builder_arg!(builder, n as u64);
                    // SAFETY: three inputs and the output of n elements each.
                    unsafe { builder.launch(cfg(n)) }.w()?;
                }
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
            if al.shape() != bl.shape() || al.shape() != cl.shape() {
                candle_core::bail!("add3: shapes {:?}, {:?}, {:?} differ", al.dims(), bl.dims(), cl.dims());
            }
            let out = dispatch_float!(a.dtype(), go(a, al, b, bl, c, cl))?;
            Ok((out, al.shape().clone()))
        }
    }
}

//! Fused layer pieces: bias (+ GELU) on a matmul's output in place, the
//! three-way parallel residual, and LayerNorm (one or two norms of the same
//! rows from one read). On CUDA they are single kernels
//! (`kernels/elementwise.cu`, `kernels/layer_norm.cu`); elsewhere they are
//! candle's ops, which define the result (the CUDA f32 fixture tests hold the
//! kernels to it). Training takes candle's ops everywhere, since the kernels
//! have no backward pass.

use candle_core::{DType, Module, Tensor};
use candle_nn::{LayerNorm, Linear};

use crate::error::Result;
use crate::gpt_neox::differentiable;

/// What follows a linear layer's matmul.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    /// The layer's bias, if it has one.
    Bias,
    /// The bias, then GELU (exact).
    BiasGelu,
}

/// `x W^T (+ b)`, then GELU (exact) for [`Epilogue::BiasGelu`].
pub fn linear(lin: &Linear, x: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.rank() == 2 && !differentiable(x) && !differentiable(lin.weight()) {
        // bf16/f16: cuBLASLt, with the bias in the GEMM's epilogue unless
        // GELU follows (cuBLASLt's GELU is the tanh approximation).
        let in_epilogue = lin.bias().filter(|_| epilogue == Epilogue::Bias);
        let (y, bias_done) = match crate::lt_linear::linear(x, lin.weight(), in_epilogue)? {
            Some(y) => (y, in_epilogue.is_some()),
            None => (x.matmul(&lin.weight().t()?)?, false),
        };
        return Ok(match lin.bias() {
            Some(bias) if !bias_done => {
                y.inplace_op2(bias, &cuda::BiasAct { gelu: epilogue == Epilogue::BiasGelu })?;
                y
            }
            None if epilogue == Epilogue::BiasGelu => y.gelu_erf()?,
            _ => y,
        });
    }
    let y = lin.forward(x)?;
    Ok(match epilogue {
        Epilogue::Bias => y,
        Epilogue::BiasGelu => y.gelu_erf()?,
    })
}

/// `norms[i](x)` for each norm (one or two) of the same rows `x` `[.., d]`.
pub(crate) fn layer_norms(norms: &[&LayerNorm], x: &Tensor) -> Result<Vec<Tensor>> {
    #[cfg(feature = "cuda")]
    if let Some(out) = cuda::layer_norms(norms, x)? {
        return Ok(out);
    }
    norms.iter().map(|ln| layer_norm_op(ln, x)).collect()
}

/// candle's LayerNorm: its fused op, or the composite one where gradients flow
/// (or in f64, where the fused op has no kernel: the gradient checks run in it).
fn layer_norm_op(ln: &LayerNorm, x: &Tensor) -> Result<Tensor> {
    if differentiable(x) || x.dtype() == DType::F64 {
        return Ok(candle_nn::ops::layer_norm_slow(x, ln.weight(), ln.bias().expect("GPT-NeoX norms have a bias"), ln.eps() as f32)?);
    }
    Ok(ln.forward(x)?)
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
pub(crate) use cuda::GeluRows;

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CpuStorage, CudaStorage, CustomOp3, InplaceOp2, Layout, Result, Shape, Storage, Tensor, WithDType};
    use candle_nn::LayerNorm;

    use crate::gpt_neox::differentiable;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
    const MODULE: &str = "blockserve_elementwise";
    const NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/layer_norm.ptx"));
    const NORM_MODULE: &str = "blockserve_layer_norm";

    use crate::cuda_util::{dispatch_float, range, suffix, view};

    fn cfg(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).min(132 * 16) as u32;
        LaunchConfig { grid_dim: (blocks.max(1), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }

    /// Elements of `T` in one 16-byte access.
    fn vec_width<T>() -> usize {
        16 / std::mem::size_of::<T>()
    }

    /// Whether every size and element offset divides into 16-byte vectors (the
    /// buffers themselves start 256-byte aligned), and the count fits the
    /// vector kernels' 32-bit indices.
    fn vectors<T>(sizes: &[usize]) -> bool {
        let w = vec_width::<T>();
        sizes.iter().all(|s| s.is_multiple_of(w)) && sizes[0] / w <= u32::MAX as usize
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
                let vector = vectors::<T>(&[n, cols, ya, ba]);
                let name = if vector { "bias_act_v" } else { "bias_act" };
                let func = dev.get_or_load_custom_func(&format!("{name}_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
                let b = bias.as_cuda_slice::<T>()?.slice(ba..bb);
                let mut yv = y.as_cuda_slice_mut::<T>()?.slice_mut(ya..yb);
                let mut builder = func.builder();
                builder.arg(&mut yv);
                builder.arg(&b);
                let width = vec_width::<T>();
                let (nv, cv, n64, cols32, gelu) = ((n / width) as u32, (cols / width) as u32, n as u64, cols as i32, gelu as i32);
                if vector {
                    builder.arg(&nv);
                    builder.arg(&cv);
                } else {
                    builder.arg(&n64);
                    builder.arg(&cols32);
                }
                builder.arg(&gelu);
                // SAFETY: n elements of y, rows of `cols`, and a bias of `cols`
                // (as n / width and cols / width whole vectors for the vector form).
                unsafe { builder.launch(cfg(if vector { nv as usize } else { n })) }.w()?;
                Ok(())
            }
            if yl.dims().last() != bl.dims().last() || bl.dims().len() != 1 {
                candle_core::bail!("bias-act: bias {:?} does not match rows of {:?}", bl.dims(), yl.dims());
            }
            dispatch_float!(y.dtype(), go(self.gelu, y, yl, bias, bl))
        }
    }

    /// GELU (exact) in place over rows that may lie further apart than their
    /// length (a column range of the fused layer's projection buffer).
    /// Every size and offset must divide into 16-byte vectors (the fused
    /// layer's gate checks).
    pub(crate) struct GeluRows;

    impl candle_core::InplaceOp1 for GeluRows {
        fn name(&self) -> &'static str {
            "gelu-rows"
        }

        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
            candle_core::bail!("gelu-rows runs on CUDA only")
        }

        fn cuda_fwd(&self, y: &mut CudaStorage, yl: &Layout) -> Result<()> {
            fn go<T: CudaDType + DeviceRepr + WithDType>(y: &mut CudaStorage, yl: &Layout) -> Result<()> {
                let r = crate::cuda_util::Rows::of(yl)?;
                let w = vec_width::<T>();
                if r.rows == 0 || r.cols == 0 {
                    return Ok(());
                }
                if ![r.start, r.cols, r.ld].iter().all(|s| s.is_multiple_of(w)) || r.rows * r.cols / w > u32::MAX as usize {
                    candle_core::bail!("gelu-rows: rows of {} elements {} apart at {} do not divide into 16-byte vectors", r.cols, r.ld, r.start);
                }
                let dev = y.device().clone();
                let func = dev.get_or_load_custom_func(&format!("gelu_rows_v_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
                let mut yv = y.as_cuda_slice_mut::<T>()?.slice_mut(r.span());
                let (rows, cv, ldv) = (r.rows as u32, (r.cols / w) as u32, (r.ld / w) as u32);
                let mut builder = func.builder();
                builder.arg(&mut yv);
                builder.arg(&rows);
                builder.arg(&cv);
                builder.arg(&ldv);
                // SAFETY: rows x cv vectors, rows ldv vectors apart, all inside the span.
                unsafe { builder.launch(cfg(r.rows * r.cols / w)) }.w()?;
                Ok(())
            }
            dispatch_float!(y.dtype(), go(y, yl))
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
                    let vector = vectors::<T>(&[n, aa, ba, ca]);
                    let name = if vector { "add3_v" } else { "add3" };
                    let func = dev.get_or_load_custom_func(&format!("{name}_{}", suffix(T::DTYPE)?), MODULE, PTX)?;
                    let (x, y, z) = (a.as_cuda_slice::<T>()?.slice(aa..ab), b.as_cuda_slice::<T>()?.slice(ba..bb), c.as_cuda_slice::<T>()?.slice(ca..cb));
                    let mut builder = func.builder();
                    builder.arg(&out);
                    builder.arg(&x);
                    builder.arg(&y);
                    builder.arg(&z);
                    let (nv, n64) = ((n / vec_width::<T>()) as u32, n as u64);
                    if vector {
                        builder.arg(&nv);
                    } else {
                        builder.arg(&n64);
                    }
                    // SAFETY: three inputs and the output of n elements each.
                    unsafe { builder.launch(cfg(if vector { nv as usize } else { n })) }.w()?;
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

    /// One kernel for one or two LayerNorms of the same contiguous rows on
    /// CUDA; None where the kernel does not apply (other devices, gradients,
    /// rows that do not divide into 16-byte vectors or exceed the kernel's
    /// eight vectors per lane), and candle's op runs.
    pub(super) fn layer_norms(norms: &[&LayerNorm], x: &Tensor) -> crate::error::Result<Option<Vec<Tensor>>> {
        let params = |ln: &LayerNorm| (ln.weight().clone(), ln.bias().expect("GPT-NeoX norms have a bias").clone());
        let d = x.dim(candle_core::D::Minus1)?;
        // Elements in one 16-byte access; the kernel holds eight per lane.
        let width = 16 / x.dtype().size_in_bytes();
        let usable = x.device().is_cuda()
            && matches!(norms.len(), 1 | 2)
            && x.is_contiguous()
            && !differentiable(x)
            && norms.iter().all(|ln| !differentiable(ln.weight()) && ln.weight().is_contiguous() && norms[0].eps() == ln.eps())
            && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::BF16 | candle_core::DType::F16)
            && d.is_multiple_of(width)
            && d <= 8 * 32 * width;
        if !usable {
            return Ok(None);
        }
        let (w1, b1) = params(norms[0]);
        let op = LayerNorms { second: norms.get(1).map(|ln| params(ln)), eps: norms[0].eps() as f32 };
        let both = x.apply_op3_no_bwd(&w1, &b1, &op)?;
        let shape = x.dims();
        Ok(Some((0..norms.len()).map(|i| both.get(i)?.reshape(shape)).collect::<candle_core::Result<Vec<_>>>()?))
    }

    /// `x` with the first norm's weight and bias as the op's three inputs; the
    /// second norm's (if any) read from their tensors inside the launch.
    struct LayerNorms {
        second: Option<(Tensor, Tensor)>,
        eps: f32,
    }

    impl CustomOp3 for LayerNorms {
        fn name(&self) -> &'static str {
            "layer-norms"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("layer-norms runs on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
            let cols = *xl.dims().last().unwrap_or(&0);
            let rows = xl.shape().elem_count().checked_div(cols).unwrap_or(0);
            let k = 1 + self.second.is_some() as usize;
            // The second norm's storages stay read-locked for the launch.
            let second = self.second.as_ref().map(|(w, b)| (w.storage_and_layout(), b.storage_and_layout()));
            fn cuda(s: &Storage) -> Result<&CudaStorage> {
                match s {
                    Storage::Cuda(c) => Ok(c),
                    _ => candle_core::bail!("layer-norms: the second norm is not on CUDA"),
                }
            }
            let (w2, w2l, b2, b2l) = match &second {
                Some(((ws, wl2), (bs, bl2))) => (cuda(ws)?, *wl2, cuda(bs)?, *bl2),
                None => (w, wl, b, bl),
            };
            fn go<T: CudaDType + DeviceRepr + WithDType>(
                eps: f32,
                k: usize,
                (rows, cols): (usize, usize),
                x: (&CudaStorage, &Layout),
                p: [(&CudaStorage, &Layout); 4],
            ) -> Result<CudaStorage> {
                let dev = x.0.device().clone();
                let out = unsafe { dev.alloc::<T>(k * rows * cols)? };
                if rows == 0 {
                    return Ok(CudaStorage::wrap_cuda_slice(out, dev));
                }
                fn slice<'a, T: CudaDType + DeviceRepr>((s, l): (&'a CudaStorage, &Layout), len: usize) -> Result<CudaView<'a, T>> {
                    let at = l.start_offset();
                    if l.shape().elem_count() != len || !at.is_multiple_of(vec_width::<T>()) {
                        candle_core::bail!("layer-norms: an input of {} elements at offset {at}, expected {len} aligned", l.shape().elem_count());
                    }
                    view(s, l)
                }
                let xs = slice::<T>(x, rows * cols)?;
                let [w1, b1, w2, b2] = p;
                let (w1, b1, w2, b2) = (slice::<T>(w1, cols)?, slice::<T>(b1, cols)?, slice::<T>(w2, cols)?, slice::<T>(b2, cols)?);
                let (rows32, cols32, k32) = (rows as i32, cols as i32, k as i32);
                let func = dev.get_or_load_custom_func(&format!("layer_norm_{}", suffix(T::DTYPE)?), NORM_MODULE, NORM_PTX)?;
                let mut builder = func.builder();
                builder.arg(&out);
                builder.arg(&xs);
                builder.arg(&w1);
                builder.arg(&b1);
                builder.arg(&w2);
                builder.arg(&b2);
                builder.arg(&rows32);
                builder.arg(&cols32);
                builder.arg(&k32);
                builder.arg(&eps);
                // One warp per row, eight rows per CTA.
                let cfg = LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
                // SAFETY: rows x cols of x, cols of each weight and bias (checked
                // above), and k x rows x cols of output.
                unsafe { builder.launch(cfg) }.w()?;
                Ok(CudaStorage::wrap_cuda_slice(out, dev))
            }
            let params = [(w, wl), (b, bl), (w2, w2l), (b2, b2l)];
            let out = dispatch_float!(x.dtype(), go(self.eps, k, (rows, cols), (x, xl), params))?;
            let mut dims = vec![k];
            dims.extend_from_slice(xl.dims());
            Ok((out, Shape::from(dims)))
        }
    }
}

//! `x W^T + b` as one cuBLASLt call with the bias added in the GEMM's
//! epilogue (bf16 and f16 on CUDA). A separate bias pass reads and writes
//! every output again: after the fused kernels it was the largest elementwise
//! cost of a token-decoder step (an H200 profile, `docs/performance.md`).
//! Layers without a bias in the epilogue (the LM head, and the MLP's up
//! projection, whose exact GELU follows in a pass of its own) take the same
//! path, so that in bf16/f16 the engine's matmuls never touch candle's cuBLAS
//! handle: that one handle (and its workspace) is shared by every thread,
//! while the in-process pipeline runs the two tiers on two threads at once.
//!
//! Numerics: the epilogue adds the bias to the f32 accumulator and rounds
//! once, where matmul-then-add rounds twice; bf16 results move within one
//! rounding. Plain f32 linears keep candle's matmul; the fused layer's two
//! GEMMs (`linear_into_cols`, `linear_add`) also run here in f32, in full f32
//! (CUBLAS_COMPUTE_32F, not its TF32 fast mode), held to the f32 fixtures.
//!
//! Each thread keeps one cuBLASLt handle and workspace per device and one plan
//! (descriptors and the heuristic's algorithm) per shape, so a call costs a
//! descriptor update and the launch: the block decoder's steps are not
//! captured in CUDA graphs and pay the host time of every call.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

use crate::cuda_util::{view, Rows};

/// `x` `[m, k]` times `w^T` (`w` `[n, k]`), plus `bias` `[n]` in the
/// epilogue if given, or None where this path does not apply (not CUDA, not
/// bf16/f16, not contiguous, rows that are not whole 16-byte vectors).
pub(crate) fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let usable = x.device().is_cuda()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && x.rank() == 2
        && w.rank() == 2
        && w.dims().iter().all(|d| d.is_multiple_of(8))
        && x.is_contiguous()
        && w.is_contiguous()
        && w.dtype() == x.dtype()
        && bias.is_none_or(|b| b.is_contiguous() && b.dtype() == x.dtype());
    if !usable {
        return Ok(None);
    }
    Ok(Some(match bias {
        Some(bias) => x.apply_op3_no_bwd(w, bias, &LinearBias)?,
        None => x.apply_op2_no_bwd(w, &LinearBias)?,
    }))
}

/// The cuBLASLt linear as a candle op: two operands without a bias, three with.
struct LinearBias;

impl LinearBias {
    fn fwd(x: (&CudaStorage, &Layout), w: (&CudaStorage, &Layout), b: Option<(&CudaStorage, &Layout)>) -> Result<(CudaStorage, Shape)> {
        let (m, k) = (x.1.dims()[0], x.1.dims()[1]);
        let n = w.1.dims()[0];
        if w.1.dims() != [n, k] || b.is_some_and(|b| b.1.dims() != [n]) {
            candle_core::bail!("lt-linear: x {:?}, weight {:?}, bias {:?}", x.1.dims(), w.1.dims(), b.map(|b| b.1.dims()));
        }
        fn go<T: CudaDType + DeviceRepr + WithDType>(
            (m, n, k): (usize, usize, usize),
            x: (&CudaStorage, &Layout),
            w: (&CudaStorage, &Layout),
            b: Option<(&CudaStorage, &Layout)>,
        ) -> Result<CudaStorage> {
            let dev = x.0.device().clone();
            let out = unsafe { dev.alloc::<T>(m * n)? };
            if m == 0 {
                return Ok(CudaStorage::wrap_cuda_slice(out, dev));
            }
            let (xv, wv) = (view::<T>(x.0, x.1)?, view::<T>(w.0, w.1)?);
            let bv = b.map(|b| view::<T>(b.0, b.1)).transpose()?;
            let stream = dev.cuda_stream();
            {
                let (xp, _rx) = xv.device_ptr(&stream);
                let (wp, _rw) = wv.device_ptr(&stream);
                let bp = bv.as_ref().map(|bv| bv.device_ptr(&stream));
                let (op, _ro) = out.device_ptr(&stream);
                let bias = bp.as_ref().map(|(p, _)| *p);
                for p in [xp, wp, op].into_iter().chain(bias) {
                    if !p.is_multiple_of(16) {
                        candle_core::bail!("lt-linear: an operand is not 16-byte aligned");
                    }
                }
                with_lt(&dev, |ctx| {
                    let g = Gemm { x: xp, ldx: k, w: wp, out: op, ldo: n, bias, residual: None };
                    ctx.matmul(T::DTYPE, (m, n, k), &g, stream.cu_stream() as sys::cudaStream_t)
                })?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        let out = match x.0.dtype() {
            DType::BF16 => go::<half::bf16>((m, n, k), x, w, b)?,
            DType::F16 => go::<half::f16>((m, n, k), x, w, b)?,
            d => candle_core::bail!("lt-linear: dtype {d:?}"),
        };
        Ok((out, Shape::from((m, n))))
    }
}

impl CustomOp2 for LinearBias {
    fn name(&self) -> &'static str {
        "lt-linear"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("lt-linear runs on CUDA only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        Self::fwd((x, xl), (w, wl), None)
    }
}

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "lt-linear-bias"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("lt-linear-bias runs on CUDA only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        Self::fwd((x, xl), (w, wl), Some((b, bl)))
    }
}

/// `x W^T + bias` written into columns `col..col + n` of a new `[m, width]`
/// buffer (its other columns left for other kernels to fill), for the fused
/// GPT-NeoX layer (`crate::fused_layer`). `x` `[m, k]` may be a column range
/// of a wider buffer (rows further apart than `k`). CUDA, f32/bf16/f16,
/// 16-byte aligned rows: the caller checks (`FusedLayer::new`'s gate).
pub(crate) fn linear_into_cols(x: &Tensor, w: &Tensor, bias: &Tensor, width: usize, col: usize) -> Result<Tensor> {
    x.apply_op3_no_bwd(w, bias, &RowGemm { width, col, residual: None })
}

/// `x W^T + bias + residual` `[m, n]`, with the residual added by the GEMM
/// (beta = 1) and one rounding of the sum; `x` as in [`linear_into_cols`].
pub(crate) fn linear_add(x: &Tensor, w: &Tensor, bias: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let n = w.dim(0)?;
    x.apply_op3_no_bwd(w, bias, &RowGemm { width: n, col: 0, residual: Some(residual.clone()) })
}

/// The GEMM of [`linear_into_cols`] and [`linear_add`].
struct RowGemm {
    width: usize,
    col: usize,
    /// `[m, n]` contiguous, read inside the launch (a candle op takes three inputs).
    residual: Option<Tensor>,
}

impl CustomOp3 for RowGemm {
    fn name(&self) -> &'static str {
        "lt-row-gemm"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("lt-row-gemm runs on CUDA only")
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout, b: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
        let xr = Rows::of(xl)?;
        let (m, k) = (xr.rows, xr.cols);
        let n = wl.dims()[0];
        if wl.dims() != [n, k] || bl.dims() != [n] || self.col + n > self.width {
            candle_core::bail!("lt-row-gemm: x {:?}, weight {:?}, bias {:?} into columns {}.. of {}", xl.dims(), wl.dims(), bl.dims(), self.col, self.width);
        }
        // The residual's storage stays read-locked for the launch.
        let guard = self.residual.as_ref().map(|r| r.storage_and_layout());
        let residual = match &guard {
            Some((s, l)) => match &**s {
                candle_core::Storage::Cuda(s) if l.dims() == [m, n] && self.width == n => Some((s, *l)),
                _ => candle_core::bail!("lt-row-gemm: the residual must be a CUDA [{m}, {n}]"),
            },
            None => None,
        };
        fn go<T: CudaDType + DeviceRepr + WithDType>(
            op: &RowGemm,
            (m, n, k): (usize, usize, usize),
            (x, xr): (&CudaStorage, &Rows),
            w: (&CudaStorage, &Layout),
            b: (&CudaStorage, &Layout),
            residual: Option<(&CudaStorage, &Layout)>,
        ) -> Result<CudaStorage> {
            let dev = x.device().clone();
            let out = unsafe { dev.alloc::<T>(m * op.width)? };
            if m == 0 {
                return Ok(CudaStorage::wrap_cuda_slice(out, dev));
            }
            let xv = x.as_cuda_slice::<T>()?.slice(xr.span());
            let (wv, bv) = (view::<T>(w.0, w.1)?, view::<T>(b.0, b.1)?);
            let rv = residual.map(|(s, l)| view::<T>(s, l)).transpose()?;
            let stream = dev.cuda_stream();
            {
                let (xp, _rx) = xv.device_ptr(&stream);
                let (wp, _rw) = wv.device_ptr(&stream);
                let (bp, _rb) = bv.device_ptr(&stream);
                let rp = rv.as_ref().map(|v| v.device_ptr(&stream));
                let (outp, _ro) = out.device_ptr(&stream);
                let size = std::mem::size_of::<T>();
                let g = Gemm {
                    x: xp,
                    ldx: xr.ld,
                    w: wp,
                    out: outp + (op.col * size) as u64,
                    ldo: op.width,
                    bias: Some(bp),
                    residual: rp.as_ref().map(|(p, _)| *p),
                };
                let aligned = [g.x, g.w, g.out, bp].into_iter().chain(g.residual).all(|p| p.is_multiple_of(16))
                    && (g.ldx * size).is_multiple_of(16)
                    && (g.ldo * size).is_multiple_of(16);
                if !aligned {
                    candle_core::bail!("lt-row-gemm: an operand or row is not 16-byte aligned");
                }
                with_lt(&dev, |ctx| ctx.matmul(T::DTYPE, (m, n, k), &g, stream.cu_stream() as sys::cudaStream_t))?;
            }
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        let out = crate::cuda_util::dispatch_float!(x.dtype(), go(self, (m, n, k), (x, &xr), (w, wl), (b, bl), residual))?;
        Ok((out, Shape::from((m, self.width))))
    }
}

thread_local! {
    static LT: RefCell<HashMap<candle_core::cuda_backend::DeviceId, Lt>> = RefCell::new(HashMap::new());
}

/// `f` with this thread's cuBLASLt context for `dev`, made on first use.
fn with_lt(dev: &CudaDevice, f: impl FnOnce(&mut Lt) -> Result<()>) -> Result<()> {
    LT.with(|lt| {
        let mut lt = lt.borrow_mut();
        let ctx = match lt.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(Lt::new(dev)?),
        };
        f(ctx)
    })
}

/// One GEMM's operands as device pointers: `out[r, c] = x[r, :] . w[c, :]
/// (+ bias[c]) (+ residual[r, c])`, with rows of `x` `ldx` elements apart and
/// rows of `out` (and `residual`) `ldo` apart; `w` is `[n, k]` contiguous.
struct Gemm {
    x: u64,
    ldx: usize,
    w: u64,
    out: u64,
    ldo: usize,
    bias: Option<u64>,
    residual: Option<u64>,
}

/// One thread's cuBLASLt handle and workspace on one device, and its plans.
struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// By (dtype, m, n, k, ldx, ldo, with a bias, with a residual).
    plans: HashMap<PlanKey, Plan>,
    // Keeps the device (and its context) alive as long as the handle.
    _device: CudaDevice,
}

type PlanKey = (DType, usize, usize, usize, usize, usize, bool, bool);

/// The descriptors of one shape and the algorithm the heuristic chose for it.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

/// Hopper's recommended workspace (cuBLAS documentation).
const WORKSPACE: usize = 32 << 20;

fn lt_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt: {e:?}"))
}

impl Lt {
    fn new(dev: &CudaDevice) -> Result<Self> {
        let handle = result::create_handle().map_err(lt_err)?;
        let workspace = unsafe { dev.alloc::<u8>(WORKSPACE)? };
        Ok(Self { handle, workspace, plans: HashMap::new(), _device: dev.clone() })
    }

    /// `out` `[m, n]` (row-major) = `x` `[m, k]` `w^T` (+ `bias`) (+
    /// `residual`). In cuBLASLt's column-major terms: D `[n, m]` = op_T(W
    /// stored `[k, n]`) X (stored `[k, m]`) + beta C, the bias broadcast along
    /// D's rows; C is the residual (beta 1) or unused (beta 0).
    fn matmul(&mut self, dtype: DType, (m, n, k): (usize, usize, usize), g: &Gemm, stream: sys::cudaStream_t) -> Result<()> {
        let key = (dtype, m, n, k, g.ldx, g.ldo, g.bias.is_some(), g.residual.is_some());
        if !self.plans.contains_key(&key) {
            let plan = unsafe { self.plan(dtype, (m, n, k), (g.ldx, g.ldo), g.bias)? };
            self.plans.insert(key, plan);
        }
        let plan = &self.plans[&key];
        let (alpha, beta) = (1f32, if g.residual.is_some() { 1f32 } else { 0f32 });
        let (ws, _rws) = self.workspace.device_ptr(self.workspace.stream());
        unsafe {
            if let Some(bias) = g.bias {
                set_desc(plan.desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
            }
            result::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                g.w as *const c_void,
                plan.layouts[0],
                g.x as *const c_void,
                plan.layouts[1],
                g.residual.unwrap_or(g.out) as *const c_void,
                plan.layouts[2],
                g.out as *mut c_void,
                plan.layouts[2],
                &plan.algo,
                ws as *mut c_void,
                WORKSPACE,
                stream,
            )
            .map_err(lt_err)
        }
    }

    unsafe fn plan(&self, dtype: DType, (m, n, k): (usize, usize, usize), (ldx, ldo): (usize, usize), bias: Option<u64>) -> Result<Plan> {
        // f32 (the fused layer's, held to the f32 fixtures) computes in full
        // f32: CUBLAS_COMPUTE_32F without the TF32 fast mode.
        let ty = match dtype {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
            _ => sys::cudaDataType_t::CUDA_R_32F,
        };
        let desc = result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F).map_err(lt_err)?;
        set_desc(
            desc,
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &candle_core::cuda_backend::cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
        )?;
        if let Some(bias) = bias {
            set_desc(desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS)?;
            set_desc(desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
        }
        let layouts = [
            result::create_matrix_layout(ty, k as u64, n as u64, k as i64).map_err(lt_err)?,
            result::create_matrix_layout(ty, k as u64, m as u64, ldx as i64).map_err(lt_err)?,
            result::create_matrix_layout(ty, n as u64, m as u64, ldo as i64).map_err(lt_err)?,
        ];
        let pref = result::create_matmul_pref().map_err(lt_err)?;
        // Each attribute has its own width: u64 for the workspace, u32 for alignments.
        unsafe fn set_pref<V>(pref: sys::cublasLtMatmulPreference_t, attr: sys::cublasLtMatmulPreferenceAttributes_t, v: V) -> Result<()> {
            result::set_matmul_pref_attribute(pref, attr, &v as *const V as *const c_void, size_of::<V>()).map_err(lt_err)
        }
        set_pref(pref, sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, WORKSPACE as u64)?;
        // Operands are only promised 16-byte alignment (views at row offsets).
        for attr in [
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ] {
            set_pref(pref, attr, 16u32)?;
        }
        let heuristic = result::get_matmul_algo_heuristic(self.handle, desc, layouts[0], layouts[1], layouts[2], layouts[2], pref);
        result::destroy_matmul_pref(pref).map_err(lt_err)?;
        Ok(Plan { desc, layouts, algo: heuristic.map_err(lt_err)?.algo })
    }
}

unsafe fn set_desc<V>(desc: sys::cublasLtMatmulDesc_t, attr: sys::cublasLtMatmulDescAttributes_t, v: &V) -> Result<()> {
    result::set_matmul_desc_attribute(desc, attr, v as *const V as *const c_void, size_of::<V>()).map_err(lt_err)
}

impl Drop for Lt {
    fn drop(&mut self) {
        unsafe {
            for plan in self.plans.values() {
                let _ = result::destroy_matmul_desc(plan.desc);
                for l in plan.layouts {
                    let _ = result::destroy_matrix_layout(l);
                }
            }
            let _ = result::destroy_handle(self.handle);
        }
    }
}

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
//! once, where matmul-then-add rounds twice. f32 runs keep candle's matmul
//! (cuBLASLt's f32 path would use TF32), so the f32 fixture tests are
//! untouched; bf16 results move within one rounding.
//!
//! Each thread keeps one cuBLASLt handle and workspace per device and one plan
//! (descriptors and the algorithm) per shape, so a call costs a descriptor
//! update and the launch: the block decoder's steps are not captured in CUDA
//! graphs and pay the host time of every call.
//!
//! The algorithm: the heuristic's first pick, until a shape's second call;
//! then, for shapes small enough to time cheaply, the fastest of the
//! heuristic's candidates timed on that call's operands (a decode step's
//! shapes recur every step, and the heuristic's pick for their few hundred
//! rows was not always the fastest).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

use crate::cuda_util::view;

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
                LT.with(|lt| -> Result<()> {
                    let mut lt = lt.borrow_mut();
                    let ctx = match lt.entry(dev.id()) {
                        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                        std::collections::hash_map::Entry::Vacant(v) => v.insert(Lt::new(&dev)?),
                    };
                    ctx.matmul(T::DTYPE, (m, n, k), [xp, wp, op], bias, &stream)
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

thread_local! {
    static LT: RefCell<HashMap<candle_core::cuda_backend::DeviceId, Lt>> = RefCell::new(HashMap::new());
}

/// One thread's cuBLASLt handle and workspace on one device, and its plans.
struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// By (dtype, m, n, k, with a bias).
    plans: HashMap<(DType, usize, usize, usize, bool), Plan>,
    // Keeps the device (and its context) alive as long as the handle.
    _device: CudaDevice,
}

/// The descriptors of one shape, the heuristic's candidate algorithms (best
/// first) and the one in use.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
    algo: sys::cublasLtMatmulAlgo_t,
    /// Calls so far, and whether the candidates have been timed.
    calls: u32,
    tuned: bool,
}

/// Candidates the heuristic is asked for.
const CANDIDATES: usize = 8;
/// Problems up to this many multiply-adds (m n k) are timed: at the shapes a
/// decode step repeats (256 to 4096 rows of 768-3072 wide layers) the
/// heuristic's first pick was the slower choice more often than not, while
/// timing a prefill pass's large matmuls would cost milliseconds for little.
const TUNE_MAX_MACS: usize = 16 << 30;

/// Whether shapes are timed (`BLOCKSERVE_GEMM_TUNE=0` keeps the heuristic's
/// first pick, for A/B runs).
fn tuning() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("BLOCKSERVE_GEMM_TUNE").as_deref() != Ok("0"))
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

    /// `out` `[m, n]` (row-major) = `x` `[m, k]` `w^T` (+ `bias`). In cuBLASLt's
    /// column-major terms: D `[n, m]` = op_T(W stored `[k, n]`) X (stored
    /// `[k, m]`), the bias broadcast along D's rows.
    fn matmul(&mut self, dtype: DType, (m, n, k): (usize, usize, usize), [x, w, out]: [u64; 3], bias: Option<u64>, stream: &Arc<CudaStream>) -> Result<()> {
        let key = (dtype, m, n, k, bias.is_some());
        if !self.plans.contains_key(&key) {
            let plan = unsafe { self.plan(dtype, (m, n, k), bias)? };
            self.plans.insert(key, plan);
        }
        let (ws, _rws) = self.workspace.device_ptr(self.workspace.stream());
        let plan = self.plans.get_mut(&key).expect("inserted above");
        if let Some(bias) = bias {
            unsafe { set_desc(plan.desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)? };
        }
        let raw = stream.cu_stream() as sys::cudaStream_t;
        let run = |plan: &Plan, algo: &sys::cublasLtMatmulAlgo_t| -> Result<()> {
            let (alpha, beta) = (1f32, 0f32);
            unsafe {
                result::matmul(
                    self.handle,
                    plan.desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    w as *const c_void,
                    plan.layouts[0],
                    x as *const c_void,
                    plan.layouts[1],
                    out as *const c_void,
                    plan.layouts[2],
                    out as *mut c_void,
                    plan.layouts[2],
                    algo,
                    ws as *mut c_void,
                    WORKSPACE,
                    raw,
                )
                .map_err(lt_err)
            }
        };
        // A shape seen a second time is likely to recur (a decode step's
        // shapes repeat for every step): time the candidates on the real
        // operands once and keep the fastest. Not while the stream is being
        // captured into a graph, where nothing may wait for the device.
        plan.calls += 1;
        if !plan.tuned && plan.calls >= 2 && tuning() && plan.candidates.len() > 1 && m * n * k <= TUNE_MAX_MACS && !capturing(stream)? {
            let timing = Some(candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            let mut best = (f32::INFINITY, plan.algo);
            for algo in &plan.candidates {
                // One untimed call, then ten.
                if run(plan, algo).is_err() {
                    continue;
                }
                let start = stream.record_event(timing).w()?;
                for _ in 0..10 {
                    run(plan, algo)?;
                }
                let ms = start.elapsed_ms(&stream.record_event(timing).w()?).w()?;
                if ms < best.0 {
                    best = (ms, *algo);
                }
            }
            plan.algo = best.1;
            plan.tuned = true;
        }
        let algo = plan.algo;
        run(plan, &algo)
    }

    unsafe fn plan(&self, dtype: DType, (m, n, k): (usize, usize, usize), bias: Option<u64>) -> Result<Plan> {
        let ty = if dtype == DType::BF16 { sys::cudaDataType_t::CUDA_R_16BF } else { sys::cudaDataType_t::CUDA_R_16F };
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
            result::create_matrix_layout(ty, k as u64, m as u64, k as i64).map_err(lt_err)?,
            result::create_matrix_layout(ty, n as u64, m as u64, n as i64).map_err(lt_err)?,
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
        let mut found: [sys::cublasLtMatmulHeuristicResult_t; CANDIDATES] = std::mem::zeroed();
        let mut count = 0i32;
        let status = sys::cublasLtMatmulAlgoGetHeuristic(
            self.handle,
            desc,
            layouts[0],
            layouts[1],
            layouts[2],
            layouts[2],
            pref,
            CANDIDATES as i32,
            found.as_mut_ptr(),
            &mut count,
        );
        result::destroy_matmul_pref(pref).map_err(lt_err)?;
        status.result().map_err(lt_err)?;
        let candidates: Vec<_> = found[..count.max(0) as usize]
            .iter()
            .filter(|h| h.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && h.workspaceSize <= WORKSPACE)
            .map(|h| h.algo)
            .collect();
        let Some(&algo) = candidates.first() else {
            return Err(lt_err(format!("no algorithm for a [{m}, {k}] x [{k}, {n}] matmul")));
        };
        Ok(Plan { desc, layouts, candidates, algo, calls: 0, tuned: false })
    }
}

/// Whether `stream` is being captured into a CUDA graph.
fn capturing(stream: &CudaStream) -> Result<bool> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
    Ok(stream.capture_status().w()? != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
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

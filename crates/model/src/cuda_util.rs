//! What every kernel launch of this crate needs (CUDA builds only): the kernel
//! name suffix of a dtype, the element range (and typed view) of a contiguous
//! input, and a dispatch from a float dtype to a generic launch function.

use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result};

/// `f32`, `bf16` or `f16`: the suffix of the kernels built for a dtype.
pub(crate) fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => candle_core::bail!("blockserve's CUDA kernels do not support {d:?}"),
    })
}

/// Start and end element of a contiguous input.
pub(crate) fn range(l: &Layout) -> Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("blockserve's CUDA kernels need contiguous inputs".into()))
}

/// The elements of a contiguous input as a typed device view.
pub(crate) fn view<'a, T: CudaDType + DeviceRepr>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let (a, e) = range(l)?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..e))
}

/// `$go::<T>($args)` with T the Rust type of the float dtype `$dtype`.
macro_rules! dispatch_float {
    ($dtype:expr, $go:ident($($arg:expr),*)) => {
        match $dtype {
            candle_core::DType::F32 => $go::<f32>($($arg),*),
            candle_core::DType::BF16 => $go::<half::bf16>($($arg),*),
            candle_core::DType::F16 => $go::<half::f16>($($arg),*),
            d => candle_core::bail!("blockserve's CUDA kernels do not support {d:?}"),
        }
    };
}
pub(crate) use dispatch_float;

/// A 2-D input whose rows are contiguous but may lie further apart than their
/// length (a column range of a wider buffer): start element, rows, columns,
/// elements from one row's start to the next, and the element range spanned.
pub(crate) struct Rows {
    pub start: usize,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl Rows {
    pub(crate) fn of(l: &Layout) -> Result<Self> {
        let (dims, stride) = (l.dims(), l.stride());
        if dims.len() != 2 || (dims[1] > 1 && stride[1] != 1) {
            candle_core::bail!("blockserve's CUDA kernels need rows of contiguous elements, not dims {dims:?} strides {stride:?}");
        }
        // One row (or none) may carry any stride: its own length serves.
        let ld = if dims[0] > 1 { stride[0] } else { dims[1] };
        if ld < dims[1] {
            candle_core::bail!("rows {ld} elements apart overlap rows of {}", dims[1]);
        }
        Ok(Self { start: l.start_offset(), rows: dims[0], cols: dims[1], ld })
    }

    /// The elements from the first row's start to the last row's end.
    pub(crate) fn span(&self) -> std::ops::Range<usize> {
        self.start..self.start + if self.rows == 0 { 0 } else { (self.rows - 1) * self.ld + self.cols }
    }
}

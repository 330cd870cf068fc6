//! Context embeddings on the wire: a row-major matrix of raw little-endian
//! bytes plus dtype, dimension and row count, checked on receipt. One pass's
//! contexts travel as one matrix, with one device-to-host copy to build it and
//! one host-to-device copy to use it.

use blockserve_engine::EngineError;
use blockserve_proto::v1::{DType as WireDType, Embeddings};
use candle_core::{DType, Device, Tensor};

type Result<T> = std::result::Result<T, EngineError>;

fn wire_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Wire(e.to_string())
}

fn wire_dtype(d: DType) -> Result<WireDType> {
    Ok(match d {
        DType::F32 => WireDType::DtypeF32,
        DType::BF16 => WireDType::DtypeBf16,
        DType::F16 => WireDType::DtypeF16,
        other => return Err(wire_err(format!("no wire format for {other:?}"))),
    })
}

/// `rows` `[k, dim]` in wire form.
pub fn encode(rows: &Tensor) -> Result<Embeddings> {
    let (k, dim) = rows.dims2().map_err(wire_err)?;
    let dtype = wire_dtype(rows.dtype())?;
    let data = blockserve_model::host_bytes(rows).map_err(wire_err)?;
    Ok(Embeddings { data, dtype: dtype as i32, dim: dim as u32, rows: k as u32 })
}

/// Row-major little-endian bytes of a `[rows, dim]` matrix of `dtype`, already
/// on the host, in wire form.
pub fn from_host(data: Vec<u8>, dtype: DType, rows: usize, dim: usize) -> Result<Embeddings> {
    let wire = wire_dtype(dtype)?;
    if data.len() != rows * dim * dtype.size_in_bytes() {
        return Err(wire_err(format!("{} bytes for {rows} rows of {dim} x {dtype:?}", data.len())));
    }
    Ok(Embeddings { data, dtype: wire as i32, dim: dim as u32, rows: rows as u32 })
}

/// Check a matrix's dtype, dimension and byte count; returns its dtype.
pub fn check(e: &Embeddings, dim: usize) -> Result<DType> {
    if e.dim as usize != dim {
        return Err(wire_err(format!("context embeddings have dim {}, this model expects {dim}", e.dim)));
    }
    let dtype = match WireDType::try_from(e.dtype) {
        Ok(WireDType::DtypeF32) => DType::F32,
        Ok(WireDType::DtypeBf16) => DType::BF16,
        Ok(WireDType::DtypeF16) => DType::F16,
        _ => return Err(wire_err(format!("context embeddings have unknown dtype {}", e.dtype))),
    };
    let want = e.rows as usize * dim * dtype.size_in_bytes();
    if e.data.len() != want {
        return Err(wire_err(format!("context embeddings have {} bytes, {} rows of {dim} x {dtype:?} need {want}", e.data.len(), e.rows)));
    }
    Ok(dtype)
}

/// Bytes of one row of a checked matrix.
pub fn row_bytes(e: &Embeddings) -> usize {
    e.data.len() / (e.rows as usize).max(1)
}

/// The rows `pick` of a checked matrix, in that order.
pub fn select(e: &Embeddings, pick: &[usize]) -> Embeddings {
    let n = row_bytes(e);
    let mut data = Vec::with_capacity(pick.len() * n);
    for &r in pick {
        data.extend_from_slice(&e.data[r * n..(r + 1) * n]);
    }
    Embeddings { data, dtype: e.dtype, dim: e.dim, rows: pick.len() as u32 }
}

/// A checked matrix -> `[rows, dim]` in `want` on `device`.
pub fn decode(e: &Embeddings, dim: usize, want: DType, device: &Device) -> Result<Tensor> {
    let dtype = check(e, dim)?;
    let t = Tensor::from_raw_buffer(&e.data, dtype, &[e.rows as usize, dim], &Device::Cpu).map_err(wire_err)?;
    t.to_dtype(want).and_then(|t| t.to_device(device)).map_err(wire_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_select() {
        let t = Tensor::from_vec((0..12).map(|x| x as f32).collect::<Vec<_>>(), (3, 4), &Device::Cpu).unwrap();
        let e = encode(&t).unwrap();
        assert_eq!((e.rows, e.dim, e.data.len()), (3, 4, 48));
        let back = decode(&e, 4, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        let picked = decode(&select(&e, &[2, 0]), 4, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(picked.to_vec2::<f32>().unwrap(), vec![vec![8., 9., 10., 11.], vec![0., 1., 2., 3.]]);
        let bf = encode(&t.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(bf.data.len(), 24);
        assert_eq!(decode(&bf, 4, DType::F32, &Device::Cpu).unwrap().to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn bad_matrices_name_the_problem() {
        let t = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let mut e = encode(&t).unwrap();
        assert_eq!(check(&e, 5).unwrap_err().to_string(), "context embeddings have dim 4, this model expects 5");
        e.rows = 3;
        assert_eq!(check(&e, 4).unwrap_err().to_string(), "context embeddings have 32 bytes, 3 rows of 4 x F32 need 48");
        e.rows = 2;
        e.dtype = 9;
        assert_eq!(check(&e, 4).unwrap_err().to_string(), "context embeddings have unknown dtype 9");
    }
}

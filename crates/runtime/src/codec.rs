//! Context embeddings on the wire: raw little-endian bytes plus dtype and
//! dimension, checked on receipt.

use blockserve_proto::v1::{DType as WireDType, Embedding};
use candle_core::{DType, Device, Tensor};

fn wire_dtype(d: DType) -> Result<WireDType, String> {
    Ok(match d {
        DType::F32 => WireDType::DtypeF32,
        DType::BF16 => WireDType::DtypeBf16,
        DType::F16 => WireDType::DtypeF16,
        other => return Err(format!("no wire format for {other:?}")),
    })
}

/// Every row of `rows` `[k, dim]` in wire form, with one device-to-host copy.
pub fn encode_rows(rows: &Tensor) -> Result<Vec<Embedding>, String> {
    let (k, dim) = rows.dims2().map_err(|e| e.to_string())?;
    let dtype = wire_dtype(rows.dtype())?;
    let host = rows.to_device(&Device::Cpu).map_err(|e| e.to_string())?;
    let bytes: Vec<u8> = match rows.dtype() {
        DType::F32 => host.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| e.to_string())?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::BF16 => host.flatten_all().and_then(|t| t.to_vec1::<half::bf16>()).map_err(|e| e.to_string())?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => host.flatten_all().and_then(|t| t.to_vec1::<half::f16>()).map_err(|e| e.to_string())?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        _ => unreachable!("checked by wire_dtype"),
    };
    let row = bytes.len() / k.max(1);
    Ok(bytes.chunks(row.max(1)).take(k).map(|c| Embedding { data: c.to_vec(), dtype: dtype as i32, dim: dim as u32 }).collect())
}

/// Check one embedding's dtype, dimension and byte count; returns its dtype.
pub fn check(e: &Embedding, dim: usize) -> Result<DType, String> {
    if e.dim as usize != dim {
        return Err(format!("context embedding has dim {}, this model expects {dim}", e.dim));
    }
    let (elem, dtype) = match WireDType::try_from(e.dtype) {
        Ok(WireDType::DtypeF32) => (4, DType::F32),
        Ok(WireDType::DtypeBf16) => (2, DType::BF16),
        Ok(WireDType::DtypeF16) => (2, DType::F16),
        _ => return Err(format!("context embedding has unknown dtype {}", e.dtype)),
    };
    if e.data.len() != dim * elem {
        return Err(format!("context embedding has {} bytes, {dim} x {dtype:?} needs {}", e.data.len(), dim * elem));
    }
    Ok(dtype)
}

/// Checked embeddings of one dtype -> `[k, dim]` in `want` on `device`, with one
/// host-to-device copy.
pub fn decode_rows(es: &[&Embedding], dim: usize, want: DType, device: &Device) -> Result<Tensor, String> {
    let Some(first) = es.first() else {
        return Err("no context embeddings".into());
    };
    let dtype = check(first, dim)?;
    let mut bytes = Vec::with_capacity(es.len() * first.data.len());
    for e in es {
        if check(e, dim)? != dtype {
            return Err("context embeddings of one batch have different dtypes".into());
        }
        bytes.extend_from_slice(&e.data);
    }
    let t = Tensor::from_raw_buffer(&bytes, dtype, &[es.len(), dim], &Device::Cpu).map_err(|e| e.to_string())?;
    t.to_dtype(want).and_then(|t| t.to_device(device)).map_err(|e| e.to_string())
}

/// Wire form -> `[dim]` tensor in `want` dtype on `device`, after checking that
/// the dimension and the byte count are what this model expects.
pub fn decode(e: &Embedding, dim: usize, want: DType, device: &Device) -> Result<Tensor, String> {
    let dtype = check(e, dim)?;
    let t = Tensor::from_raw_buffer(&e.data, dtype, &[dim], &Device::Cpu).map_err(|e| e.to_string())?;
    t.to_dtype(want).and_then(|t| t.to_device(device)).map_err(|e| e.to_string())
}

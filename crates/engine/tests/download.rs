//! `Downloads` gives the exact bytes of a matrix, as the wire codec would, on
//! the CPU and (CUDA builds) on the GPU: from a tensor that starts inside its
//! allocation, with a pass queued behind the copy, and with a reused buffer.

use blockserve_engine::download::Downloads;
use candle_core::{DType, Device, Tensor};

fn bytes_of(t: &Tensor) -> Vec<u8> {
    let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    match t.dtype() {
        DType::F32 => bytemuck::cast_slice(&v).to_vec(),
        DType::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
        other => panic!("{other:?}"),
    }
}

fn check(device: &Device) {
    let mut downloads = Downloads::default();
    for (dtype, rows) in [(DType::F32, 5), (DType::BF16, 7), (DType::BF16, 3)] {
        let all = Tensor::arange(0f32, (rows + 2) as f32 * 8.0, device).unwrap().reshape((rows + 2, 8)).unwrap().to_dtype(dtype).unwrap();
        // Rows 2.. of the matrix: a tensor that starts 16 elements in.
        let t = all.narrow(0, 2, rows).unwrap();
        let d = downloads.start(&t).unwrap();
        // Work queued behind the copy must not change what it reads.
        let _later = (&all * 2.0).unwrap();
        let h = downloads.wait(d).unwrap();
        assert_eq!((h.dtype, h.rows, h.dim), (dtype, rows, 8));
        assert_eq!(h.bytes, bytes_of(&t), "{dtype:?} x {rows} on {device:?}");
    }
}

#[test]
fn download_on_the_cpu() {
    check(&Device::Cpu);
}

#[cfg(feature = "cuda")]
#[test]
fn download_on_the_gpu() {
    check(&blockserve_model::cuda_device(0).expect("a CUDA device"));
}

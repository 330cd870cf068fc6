//! With the `cuda` feature, compile the paged-attention kernels to PTX with nvcc
//! (the PTX is embedded in the library and loaded by candle at first use).
//! Targets `compute_$CUDA_COMPUTE_CAP` (default 80: bf16 needs Ampere or newer).

fn main() {
    println!("cargo:rerun-if-changed=kernels/paged_attention.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("paged_attention.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let status = std::process::Command::new("nvcc")
        .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "kernels/paged_attention.cu", "-o"])
        .arg(&out)
        .status()
        .expect("running nvcc (the cuda feature needs the CUDA toolkit on PATH)");
    assert!(status.success(), "nvcc failed on kernels/paged_attention.cu");
}

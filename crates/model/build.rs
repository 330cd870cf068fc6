//! With the `cuda` feature, compile the kernels in `kernels/` to PTX with nvcc
//! (the PTX is embedded in the library and loaded by candle at first use).
//! Targets `compute_$CUDA_COMPUTE_CAP` (default 80: bf16 needs Ampere or newer).

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    for name in ["paged_attention", "argmax", "elementwise", "layer_norm"] {
        let status = std::process::Command::new("nvcc")
            .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), &format!("kernels/{name}.cu"), "-o"])
            .arg(out_dir.join(format!("{name}.ptx")))
            .status()
            .expect("running nvcc (the cuda feature needs the CUDA toolkit on PATH)");
        assert!(status.success(), "nvcc failed on kernels/{name}.cu");
    }
}

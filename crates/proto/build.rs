//! Generates the blockserve.v1 types and services from `proto/`, with a vendored
//! protoc so a fresh machine needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    // Read at run time: a build script binary reused from another checkout
    // (shared target dir) must still find this checkout's protos.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = ["blockserve/v1/generation.proto", "blockserve/v1/internal.proto"].map(|f| root.join(f));
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("blockserve_descriptor.bin"))
        // The session store keeps a request's validated parameters as they are
        // (JSON): one typed value from the router's validation to the token
        // decoder, and on to migrations.
        .type_attribute("blockserve.v1.GenerationParameters", "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]")
        .compile_protos(&files, std::slice::from_ref(&root))?;
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    Ok(())
}

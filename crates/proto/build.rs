//! Compiles proto/ with protox (no system protoc) and writes the descriptor
//! set that server reflection serves.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "berth/common/v1/common.proto",
    "berth/orchestrator/v1/orchestrator.proto",
    "berth/agent/v1/agent.proto",
    "berth/power/v1/power.proto",
    "berth/embedding/v1/embedding.proto",
    "berth/llmproxy/v1/llmproxy.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let descriptors = protox::compile(PROTOS, [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // compile_fds does not write the descriptor set itself.
    std::fs::write(
        out_dir.join("berth_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

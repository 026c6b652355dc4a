//! Compiles Remora's own protos without a system `protoc`: `protox` parses
//! them into a descriptor set in pure Rust and `tonic-prost-build` generates
//! the messages and the gRPC client and server from it.

use std::error::Error;

const PROTOS: &[&str] = &["remora/identity/v1/certificate.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

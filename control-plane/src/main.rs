//! `remora-control-plane`: serves a mesh described in a YAML file to xDS
//! clients (Envoy, remora-proxy, proxyless gRPC). See
//! `docs/control-plane.md`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    remora_control_plane::server::main(remora_control_plane::server::Args::parse())
}

//! `remora-proxy`: the Remora sidecar. Flags and environment variables are
//! listed in `docs/proxy.md`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    remora_proxy::sidecar::main(remora_proxy::bootstrap::Bootstrap::parse())
}

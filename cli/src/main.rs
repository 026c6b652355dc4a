//! `remora`: one command for the whole mesh.
//!
//! - `remora demo` runs a small shop (demo applications, one sidecar each,
//!   the control plane) on one machine and shows per-route golden signals
//!   live; see `docs/demo.md`.
//! - `remora control-plane FLAGS` and `remora proxy FLAGS` (hidden) are the
//!   control plane and the sidecar with exactly the flags of
//!   `remora-control-plane` and `remora-proxy`. The demo runs them as child
//!   processes of its own executable, so one `cargo run -p remora -- demo`
//!   needs nothing else built.

use std::io::Read;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod demo;

/// remora: the Remora service mesh.
#[derive(Debug, Parser)]
#[command(name = "remora", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a demo mesh on this machine (no Kubernetes) and watch its
    /// golden signals live.
    Demo(demo::Args),
    /// The control plane (same flags as `remora-control-plane`).
    #[command(hide = true)]
    ControlPlane(Box<remora_control_plane::server::Args>),
    /// A sidecar proxy (same flags as `remora-proxy`).
    #[command(hide = true)]
    Proxy(Box<remora_proxy::bootstrap::Bootstrap>),
}

/// Set by `remora demo` on its children: exit when stdin reaches end of
/// file, which happens when the demo process is gone however it died, so a
/// killed demo never leaves a sidecar or a control plane behind.
pub(crate) const EXIT_WITH_PARENT_ENV: &str = "REMORA_EXIT_WITH_PARENT";

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::main(args),
        Command::ControlPlane(args) => {
            exit_with_parent();
            remora_control_plane::server::main(*args)
        }
        Command::Proxy(bootstrap) => {
            exit_with_parent();
            remora_proxy::sidecar::main(*bootstrap)
        }
    }
}

/// See [`EXIT_WITH_PARENT_ENV`].
fn exit_with_parent() {
    if std::env::var_os(EXIT_WITH_PARENT_ENV).is_none() {
        return;
    }
    std::thread::spawn(|| {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 64];
        // Read until end of file (the parent closed its end or died) or an
        // error; whatever is written is ignored.
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        eprintln!("remora: the parent `remora demo` is gone; exiting");
        std::process::exit(1);
    });
}

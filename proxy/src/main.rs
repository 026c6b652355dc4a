//! `remora-proxy`: the Remora sidecar. Flags and environment variables are
//! listed in `docs/proxy.md`; `remora-proxy init` (the iptables set-up an
//! init container runs) in `docs/interception.md`.

use clap::{CommandFactory, FromArgMatches};

fn main() -> std::process::ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "init") {
        // `init` stands where clap expects the binary name.
        let args =
            <remora_proxy::init::Args as clap::Parser>::parse_from(std::env::args_os().skip(1));
        return remora_proxy::init::main(args);
    }
    let matches = remora_proxy::bootstrap::Bootstrap::command()
        .after_help(
            "Subcommand:\n  remora-proxy init [FLAGS]  send the pod's TCP through the sidecar \
             (iptables in the current network namespace; `remora-proxy init --help`)",
        )
        .get_matches();
    let bootstrap = match remora_proxy::bootstrap::Bootstrap::from_arg_matches(&matches) {
        Ok(b) => b,
        Err(e) => e.exit(),
    };
    remora_proxy::sidecar::main(bootstrap)
}

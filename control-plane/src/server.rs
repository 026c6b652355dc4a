//! The whole control plane as one function: load and watch the mesh file,
//! serve ADS and the monitoring listener, stop on SIGTERM.
//! `remora-control-plane` calls it, and so does `remora`, which runs the
//! control plane as a child process of itself.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing_subscriber::EnvFilter;

use crate::admin::Admin;
use crate::metrics::Metrics;
use crate::model::Mesh;
use crate::sources::{Publisher, file};
use crate::xds::{AdsServer, snapshot, status::SyncRegistry};

/// Remora's control plane.
#[derive(Debug, Clone, clap::Parser)]
#[command(version, about)]
pub struct Args {
    /// The mesh file (YAML; see docs/mesh-config.md). Watched: valid edits
    /// are pushed to every client, invalid ones are refused and logged.
    #[arg(long, env = "REMORA_CONFIG")]
    pub config: PathBuf,
    /// Address of the plaintext xDS (ADS) server. Port 0 picks a free port.
    #[arg(long, env = "REMORA_XDS_ADDR", default_value = "127.0.0.1:15010")]
    pub xds_addr: SocketAddr,
    /// Address of the monitoring listener (/metrics, /ready, /debug/syncz).
    #[arg(
        long,
        env = "REMORA_MONITORING_ADDR",
        default_value = "127.0.0.1:15014"
    )]
    pub monitoring_addr: SocketAddr,
    /// Once listening, write the bound addresses here as JSON
    /// (`{"xds": "...", "monitoring": "..."}`), for use with port 0.
    #[arg(long)]
    pub address_file: Option<PathBuf>,
    /// Check the mesh file, print every problem, and exit.
    #[arg(long)]
    pub validate: bool,
    /// Log filter (tracing-subscriber syntax), e.g. `info` or
    /// `remora_control_plane=debug`.
    #[arg(long, env = "REMORA_LOG", default_value = "info")]
    pub log: String,
}

/// Runs the control plane until SIGTERM or Ctrl-C.
pub fn main(args: Args) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&args.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let mesh = match file::load(&args.config) {
        Ok(mesh) => mesh,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if args.validate {
        println!(
            "{}: ok ({} services)",
            args.config.display(),
            mesh.services().len()
        );
        return ExitCode::SUCCESS;
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args, mesh)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, mesh: Mesh) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(SyncRegistry::default());
    let (publisher, meshes) = Publisher::new(mesh, metrics.clone());
    let snapshots = snapshot::snapshots(meshes);

    let xds_listener = TcpListener::bind(args.xds_addr)
        .await
        .with_context(|| format!("cannot listen for xDS on {} (--xds-addr)", args.xds_addr))?;
    let monitoring_listener = TcpListener::bind(args.monitoring_addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen for monitoring on {} (--monitoring-addr)",
                args.monitoring_addr
            )
        })?;
    let xds_addr = xds_listener.local_addr()?;
    let monitoring_addr = monitoring_listener.local_addr()?;

    let watch_path = args.config.clone();
    let watcher = tokio::spawn(file::watch(watch_path, publisher));

    let admin = Arc::new(Admin::new(metrics.clone(), registry.clone()));
    tokio::spawn(admin.clone().serve(monitoring_listener));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ads = AdsServer::new(snapshots, stop_rx, metrics, registry).into_service();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(ads)
        .serve_with_incoming_shutdown(TcpListenerStream::new(xds_listener), async move {
            remora_runtime::shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
    admin.set_ready();
    tracing::info!(%xds_addr, %monitoring_addr, config = %args.config.display(), "remora-control-plane serving");
    if let Some(path) = &args.address_file {
        remora_runtime::write_address_file(
            path,
            &serde_json::json!({ "xds": xds_addr.to_string(), "monitoring": monitoring_addr.to_string() }),
        )?;
    }

    tokio::select! {
        result = server => result.context("xDS server failed")?,
        result = watcher => match result {
            Ok(Ok(())) => anyhow::bail!("mesh file watcher stopped"),
            Ok(Err(e)) => anyhow::bail!("mesh file watcher failed: {e}"),
            Err(e) => anyhow::bail!("mesh file watcher panicked: {e}"),
        },
    }
    tracing::info!("shut down");
    Ok(())
}

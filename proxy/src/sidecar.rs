//! The whole sidecar as one function: logging, runtime, the xDS client,
//! the listeners, admin, and draining on SIGTERM. `remora-proxy` calls it,
//! and so does `remora`, which runs sidecars as child processes of itself.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing_subscriber::{EnvFilter, prelude::*, reload};

use crate::admin::{Admin, SetLogLevel};
use crate::bootstrap::Bootstrap;
use crate::config::{ConfigStore, State};
use crate::inbound::Inbound;
use crate::listener;
use crate::metrics::{Direction, Metrics};
use crate::outbound::Outbound;
use crate::xds::{self, XdsConfig, XdsStatus};

/// Runs the sidecar until SIGTERM or Ctrl-C, then drains.
pub fn main(bootstrap: Bootstrap) -> ExitCode {
    let filter = match EnvFilter::try_new(&bootstrap.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("--log {:?} is not a valid filter: {e}", bootstrap.log);
            return ExitCode::FAILURE;
        }
    };
    let (filter, reload_handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    let set_log_level: SetLogLevel = Box::new(move |level: &str| {
        let filter =
            EnvFilter::try_new(level).map_err(|e| format!("invalid filter {level:?}: {e}"))?;
        reload_handle.reload(filter).map_err(|e| e.to_string())
    });

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if bootstrap.workers > 0 {
        runtime.worker_threads(bootstrap.workers);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(bootstrap, set_log_level)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(bootstrap: Bootstrap, set_log_level: SetLogLevel) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(State::new(metrics.clone()));
    let store = Arc::new(ConfigStore::default());
    let xds_status = Arc::new(XdsStatus::default());

    let outbound_listener = bind(bootstrap.outbound_addr, "--outbound-addr").await?;
    let admin_listener = bind(bootstrap.admin_addr, "--admin-addr").await?;
    let inbound_listener = match bootstrap.app_addr {
        Some(_) => Some(bind(bootstrap.inbound_addr, "--inbound-addr").await?),
        None => None,
    };
    let outbound_addr = outbound_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let inbound_addr = inbound_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;

    tokio::spawn(xds::run(
        XdsConfig {
            control_plane: bootstrap.control_plane_uri(),
            node: bootstrap.node(outbound_addr),
        },
        store.clone(),
        state.clone(),
        xds_status.clone(),
    ));

    let (drain_tx, drain_rx) = watch::channel(false);
    let grace = Duration::from_secs(bootstrap.drain_seconds);
    let mut servers = tokio::task::JoinSet::new();
    let outbound = Arc::new(Outbound::new(store.clone(), metrics.clone()));
    servers.spawn(listener::serve(
        outbound_listener,
        Direction::Outbound,
        metrics.clone(),
        move |req| outbound.clone().handle(req),
        drain_rx.clone(),
        grace,
    ));
    if let (Some(listener), Some(app)) = (inbound_listener, bootstrap.app_addr) {
        let inbound = Arc::new(Inbound::new(
            app,
            bootstrap.app_protocol.into(),
            &format!("{}.{}", bootstrap.service, bootstrap.namespace),
            metrics.clone(),
        ));
        servers.spawn(listener::serve(
            listener,
            Direction::Inbound,
            metrics.clone(),
            move |req| inbound.clone().handle(req),
            drain_rx.clone(),
            grace,
        ));
    }
    let listening = serde_json::json!({
        "outbound": outbound_addr.to_string(),
        "inbound": inbound_addr.map(|a| a.to_string()),
        "admin": admin_addr.to_string(),
    });
    let admin = Arc::new(Admin {
        bootstrap: bootstrap.clone(),
        listening: listening.clone(),
        store,
        xds: xds_status,
        metrics,
        set_log_level,
    });
    tokio::spawn(admin.serve(admin_listener));

    tracing::info!(%outbound_addr, inbound_addr = ?inbound_addr, %admin_addr, control_plane = bootstrap.control_plane, "remora-proxy started");
    if let Some(path) = &bootstrap.address_file {
        remora_runtime::write_address_file(path, &listening)?;
    }

    remora_runtime::shutdown_signal().await;
    tracing::info!(?grace, "draining");
    let _ = drain_tx.send(true);
    while servers.join_next().await.is_some() {}
    tracing::info!("stopped");
    Ok(())
}

async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({flag}): is another process using it?"))
}

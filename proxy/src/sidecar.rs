//! The whole sidecar as one function: logging, runtime, the workload
//! certificate, the xDS client, the listeners and workers, admin, and draining on
//! SIGTERM. `remora-proxy` calls it,
//! and so does `remora`, which runs sidecars as child processes of itself.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing_subscriber::{EnvFilter, prelude::*, reload};

use crate::admin::{Admin, SetLogLevel};
use crate::bootstrap::Bootstrap;
use crate::config::{ConfigStore, State};
use crate::detect;
use crate::identity::client::{CertificateClient, control_plane_id};
use crate::identity::renew::{self, RenewConfig};
use crate::inbound::Inbound;
use crate::listener::{self, Intercept, Peer, Side};
use crate::metrics::Metrics;
use crate::outbound::Outbound;
use crate::tls::{TlsContext, TrustBundle, server_name_for};
use crate::workers::Workers;
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

    // The main thread runs xDS, certificates, admin and the accept loops
    // on tokio's single-threaded scheduler; requests run on the workers
    // (`workers.rs`), or here too with one worker (linkerd2-proxy makes
    // the same choice for one core: no thread to hand work to).
    let workers = match Workers::start(bootstrap.workers) {
        Ok(workers) => Arc::new(workers),
        Err(e) => {
            eprintln!("cannot start the worker threads: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(bootstrap, set_log_level, workers.clone()));
    drop(runtime);
    workers.stop();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    bootstrap: Bootstrap,
    set_log_level: SetLogLevel,
    workers: Arc<Workers>,
) -> anyhow::Result<()> {
    crate::dns::configure(bootstrap.dns_server);
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(State::new(metrics.clone()));
    let store = Arc::new(ConfigStore::default());
    let xds_status = Arc::new(XdsStatus::default());
    let identity = identity_settings(&bootstrap)?;

    let outbound_listener = bind(bootstrap.outbound_addr, "--outbound-addr").await?;
    let admin_listener = bind(bootstrap.admin_addr, "--admin-addr").await?;
    // Always bound: intercepted inbound connections carry their own
    // destination, so an application needs no --app-addr to be reached.
    let inbound_listener = bind(bootstrap.inbound_addr, "--inbound-addr").await?;
    let outbound_addr = outbound_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let inbound_addr = Some(inbound_listener.local_addr()?);

    let listening = serde_json::json!({
        "outbound": outbound_addr.to_string(),
        "inbound": inbound_addr.map(|a| a.to_string()),
        "admin": admin_addr.to_string(),
    });
    let tls_slot = Arc::new(OnceLock::new());
    let admin = Arc::new(Admin {
        bootstrap: bootstrap.clone(),
        listening: listening.clone(),
        store: store.clone(),
        xds: xds_status.clone(),
        metrics: metrics.clone(),
        set_log_level,
        tls: tls_slot.clone(),
        identity_expected: identity.is_some(),
    });
    tokio::spawn(admin.serve(admin_listener));
    tracing::info!(%outbound_addr, inbound_addr = ?inbound_addr, %admin_addr, control_plane = bootstrap.control_plane, "remora-proxy started");
    if let Some(path) = &bootstrap.address_file {
        remora_runtime::write_address_file(path, &listening)?;
    }

    // Identity first: the xDS stream itself runs over mTLS. Connections
    // wait in the listeners' backlogs meanwhile, and /ready says why.
    let tls = match identity {
        None => {
            tracing::warn!(
                "mTLS is OFF: no --ca-bundle was given, so this proxy has no identity, \
                 talks plaintext to the control plane and to every peer, and accepts \
                 plaintext; use this only for tests"
            );
            None
        }
        Some((bundle, client, config)) => {
            let ca_client = client.clone();
            let (mut ready, _renewal) = renew::start(client, config, metrics.clone());
            let resolver = tokio::select! {
                resolver = ready.wait_for(Option::is_some) => match resolver {
                    Ok(resolver) => resolver.clone(),
                    Err(_) => anyhow::bail!("the certificate renewal task stopped"),
                },
                () = remora_runtime::shutdown_signal() => return Ok(()),
            };
            let Some(resolver) = resolver else {
                anyhow::bail!("the certificate renewal task published no credentials");
            };
            let tls = Arc::new(TlsContext::new(resolver, bundle, &metrics)?);
            // After a root rotation the control plane's own certificate
            // chains to the new root: the CA client follows the bundle.
            tls.follow_bundle(Box::new(move |bundle| {
                if let Err(e) = ca_client.set_trust_bundle(bundle) {
                    tracing::warn!(error = %e, "the CA client cannot use the new trust bundle");
                }
            }));
            let _ = tls_slot.set(tls.clone());
            // Each renewal also retires the TLS sessions of the previous
            // certificate (a resumed session would carry it).
            let renewed = tls.clone();
            tokio::spawn(async move {
                while ready.changed().await.is_ok() {
                    if let Err(e) = renewed.credentials_renewed() {
                        tracing::warn!(error = %e, "cannot refresh the TLS configs after renewal");
                    }
                }
            });
            tracing::info!(spiffe_id = %tls.local_id(), "mTLS is on");
            Some(tls)
        }
    };

    let control_plane_tls = tls.as_ref().map(|tls| {
        let expected = control_plane_id(tls.bundle().trust_domain());
        (tls.clone(), server_name_for(&expected))
    });
    tokio::spawn(xds::run(
        XdsConfig {
            control_plane: bootstrap.control_plane_uri(),
            node: bootstrap.node(outbound_addr, inbound_addr),
            tls: control_plane_tls,
        },
        store.clone(),
        state.clone(),
        xds_status,
    ));

    let (drain_tx, drain_rx) = watch::channel(false);
    let grace = Duration::from_secs(bootstrap.drain_seconds);
    let mut servers = tokio::task::JoinSet::new();
    let own_ports: Vec<u16> = [outbound_addr, admin_addr]
        .into_iter()
        .chain(inbound_addr)
        .map(|a| a.port())
        .collect();
    let intercept = |app| {
        Arc::new(Intercept {
            store: store.clone(),
            tls: tls.clone(),
            metrics: metrics.clone(),
            own_ports: own_ports.clone(),
            detect_timeout: detect::DEFAULT_TIMEOUT,
            app,
        })
    };
    let outbound = Arc::new(Outbound::new(store.clone(), metrics.clone(), tls.clone()));
    servers.spawn(listener::serve(
        outbound_listener,
        workers.clone(),
        Side::Outbound(intercept(None)),
        move |peer: &Peer| {
            let outbound = outbound.clone();
            let port = peer.original_dst.map(|d| d.port());
            move |req| outbound.clone().handle(port, req)
        },
        drain_rx.clone(),
        grace,
    ));
    let inbound = Arc::new(Inbound::new(
        bootstrap.app_addr,
        bootstrap.app_protocol.into(),
        &format!("{}.{}", bootstrap.service, bootstrap.namespace),
        metrics.clone(),
    ));
    servers.spawn(listener::serve(
        inbound_listener,
        workers,
        Side::Inbound(intercept(bootstrap.app_addr)),
        move |peer: &Peer| {
            let inbound = inbound.clone();
            let connection = inbound.connection(peer);
            move |req| inbound.clone().handle(connection.clone(), req)
        },
        drain_rx.clone(),
        grace,
    ));

    remora_runtime::shutdown_signal().await;
    tracing::info!(?grace, "draining");
    let _ = drain_tx.send(true);
    while servers.join_next().await.is_some() {}
    tracing::info!("stopped");
    Ok(())
}

/// The trust bundle, CA client and renewal settings, when mTLS is on
/// (`--ca-bundle` given).
fn identity_settings(
    bootstrap: &Bootstrap,
) -> anyhow::Result<Option<(TrustBundle, CertificateClient, RenewConfig)>> {
    let Some(bundle) = bootstrap.ca_trust_bundle()? else {
        return Ok(None);
    };
    let id = bootstrap
        .workload_id()
        .context("--trust-domain, --namespace and --service-account must form a SPIFFE ID")?;
    let Some(token) = bootstrap.token_source() else {
        anyhow::bail!(
            "--token-file is required with --ca-bundle: the CA signs {id} only for a workload \
             that proves it may hold it"
        );
    };
    let client = CertificateClient::new(bootstrap.ca_addr(), &bundle)
        .with_context(|| format!("--ca-addr {}", bootstrap.ca_addr()))?;
    Ok(Some((bundle, client, RenewConfig::new(id, token))))
}

/// Pending connections each listener queues: bursts of new connections
/// (one per request from some clients) must not be refused by the kernel
/// while a worker is busy. Capped by `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .with_context(|| format!("cannot create a socket for {addr} ({flag})"))?;
    // As std's bind does: a restarted proxy can listen again at once.
    socket
        .set_reuseaddr(true)
        .with_context(|| format!("cannot set SO_REUSEADDR for {addr} ({flag})"))?;
    socket
        .bind(addr)
        .and_then(|()| socket.listen(LISTEN_BACKLOG))
        .with_context(|| format!("cannot listen on {addr} ({flag}): is another process using it?"))
}

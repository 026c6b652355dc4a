//! The whole control plane as one function: load and watch the mesh file,
//! load or create the CA, serve ADS (plaintext), ADS and certificate signing
//! (TLS) and the monitoring listener, stop on SIGTERM.
//! `remora-control-plane` calls it, and so does `remora`, which runs the
//! control plane as a child process of itself.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use remora_xds_proto::identity::v1::certificate_service_server::CertificateServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing_subscriber::EnvFilter;

use crate::admin::Admin;
use crate::ca::Ca;
use crate::ca::service::{MeshTokens, SigningService};
use crate::metrics::Metrics;
use crate::model::Mesh;
use crate::sources::{Publisher, file};
use crate::tls::ServingCert;
use crate::xds::secrets::SecretSource;
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
    /// Address of the TLS listener: ADS and certificate signing over TLS 1.3.
    /// Port 0 picks a free port.
    #[arg(long, env = "REMORA_TLS_ADDR", default_value = "127.0.0.1:15012")]
    pub tls_addr: SocketAddr,
    /// State directory of the embedded CA: its root is created there on
    /// first start and reused later. Default: `$XDG_STATE_HOME/remora/ca`,
    /// else `$HOME/.local/state/remora/ca`, else `./remora-ca`.
    #[arg(long, env = "REMORA_CA_DIR", conflicts_with = "ca_cert")]
    pub ca_dir: Option<PathBuf>,
    /// An operator-given CA certificate (root or intermediate), followed by
    /// its issuers up to the root (PEM). Needs `--ca-key`.
    #[arg(long, env = "REMORA_CA_CERT", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The private key of `--ca-cert` (PEM). Needs `--ca-cert`.
    #[arg(long, env = "REMORA_CA_KEY", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Extra roots to trust (PEM, one or more CA certificates), for a root
    /// rotation: they join the trust bundle (SDS `ROOTCA`,
    /// `/debug/trust-bundle`, the signing API's bundle) but never sign.
    #[arg(long, env = "REMORA_CA_EXTRA_ROOTS")]
    pub ca_extra_roots: Option<PathBuf>,
    /// SPIFFE trust domain of the CA. Default: the mesh file's
    /// `trust_domain`; if both are given they must agree.
    #[arg(long, env = "REMORA_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Lifetime of a workload certificate when the request asks for none,
    /// in seconds; also the lifetime of the control plane's own certificate.
    #[arg(long, env = "REMORA_LEAF_TTL", default_value_t = 86400,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub leaf_ttl: u64,
    /// Longest workload certificate lifetime granted, in seconds; longer
    /// requests are lowered to it.
    #[arg(long, env = "REMORA_MAX_LEAF_TTL", default_value_t = 604800,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_leaf_ttl: u64,
    /// Once listening, write the bound addresses here as JSON
    /// (`{"xds": "...", "tls": "...", "monitoring": "..."}`), for use with
    /// port 0.
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

/// Where the embedded CA keeps its root when `--ca-dir` is not given: the
/// per-user state directory (XDG), which survives restarts and does not
/// depend on the directory the control plane was started from.
pub fn default_ca_dir() -> PathBuf {
    let xdg = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let home = || {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .map(|h| h.join(".local").join("state"))
    };
    match xdg.or_else(home) {
        Some(state) => state.join("remora").join("ca"),
        None => PathBuf::from("remora-ca"),
    }
}

/// The trust domain: `--trust-domain` if given, which must then agree with
/// the mesh file's.
fn trust_domain(args: &Args, mesh: &Mesh) -> anyhow::Result<String> {
    match &args.trust_domain {
        Some(flag) if flag != mesh.trust_domain() => anyhow::bail!(
            "--trust-domain is {flag:?} but the mesh file {} has trust_domain {:?} \
             (cluster.local when not set): make them agree, or drop --trust-domain",
            args.config.display(),
            mesh.trust_domain()
        ),
        Some(flag) => Ok(flag.clone()),
        None => Ok(mesh.trust_domain().to_owned()),
    }
}

/// Loads the CA the flags name, with the extra roots of
/// `--ca-extra-roots` in its trust bundle.
fn load_ca(args: &Args, trust_domain: &str) -> anyhow::Result<Ca> {
    let ca = load_signing_ca(args, trust_domain)?;
    let Some(path) = &args.ca_extra_roots else {
        return Ok(ca);
    };
    let pem = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the extra trusted roots {} (--ca-extra-roots)",
            path.display()
        )
    })?;
    ca.with_additional_roots(&pem).with_context(|| {
        format!(
            "the extra trusted roots {} (--ca-extra-roots) are not usable",
            path.display()
        )
    })
}

fn load_signing_ca(args: &Args, trust_domain: &str) -> anyhow::Result<Ca> {
    match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => Ca::from_files(cert, key, trust_domain).with_context(|| {
            format!(
                "cannot load the CA from --ca-cert {} and --ca-key {}",
                cert.display(),
                key.display()
            )
        }),
        (None, None) => {
            let dir = args.ca_dir.clone().unwrap_or_else(default_ca_dir);
            Ca::load_or_create(&dir, trust_domain).with_context(|| {
                format!(
                    "cannot load or create the CA in {} (--ca-dir)",
                    dir.display()
                )
            })
        }
        _ => anyhow::bail!("--ca-cert and --ca-key go together: give both or neither"),
    }
}

async fn run(args: Args, mesh: Mesh) -> anyhow::Result<()> {
    if args.leaf_ttl > args.max_leaf_ttl {
        anyhow::bail!(
            "--leaf-ttl ({}s) is longer than --max-leaf-ttl ({}s)",
            args.leaf_ttl,
            args.max_leaf_ttl
        );
    }
    let leaf_ttl = std::time::Duration::from_secs(args.leaf_ttl);
    let max_leaf_ttl = std::time::Duration::from_secs(args.max_leaf_ttl);
    let trust_domain = trust_domain(&args, &mesh)?;
    let ca = Arc::new(load_ca(&args, &trust_domain)?);
    let serving_cert =
        ServingCert::issue(ca.clone(), leaf_ttl).context("cannot set up the TLS listener")?;
    let tls_config = Arc::new(
        crate::tls::server_config(&ca, serving_cert.clone())
            .context("cannot set up the TLS listener")?,
    );

    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(SyncRegistry::default());
    let (publisher, meshes) = Publisher::new(mesh, metrics.clone());
    let tokens = MeshTokens::new(meshes.clone());
    let snapshots = snapshot::snapshots(meshes);

    let xds_listener = TcpListener::bind(args.xds_addr)
        .await
        .with_context(|| format!("cannot listen for xDS on {} (--xds-addr)", args.xds_addr))?;
    let tls_listener = TcpListener::bind(args.tls_addr)
        .await
        .with_context(|| format!("cannot listen for TLS on {} (--tls-addr)", args.tls_addr))?;
    let monitoring_listener = TcpListener::bind(args.monitoring_addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen for monitoring on {} (--monitoring-addr)",
                args.monitoring_addr
            )
        })?;
    let xds_addr = xds_listener.local_addr()?;
    let tls_addr = tls_listener.local_addr()?;
    let monitoring_addr = monitoring_listener.local_addr()?;

    let watch_path = args.config.clone();
    let watcher = tokio::spawn(file::watch(watch_path, publisher));

    let admin = Arc::new(
        Admin::new(metrics.clone(), registry.clone()).with_trust_bundle(ca.trust_bundle_pem()),
    );
    tokio::spawn(admin.clone().serve(monitoring_listener));
    tokio::spawn(serving_cert.clone().renew_forever());

    // One stop signal for both gRPC servers and the ADS streams.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        remora_runtime::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stopped| *stopped).await;
    };

    let secrets = Arc::new(SecretSource::new(ca.clone(), leaf_ttl, &metrics));
    let ads =
        AdsServer::new(snapshots, stop_rx.clone(), metrics.clone(), registry).with_secrets(secrets);
    // On the TLS listener a stream needs a client certificate and a node
    // that claims its identity.
    let tls_ads = ads.for_tls_listener().into_service();
    let ads = ads.into_service();
    let signing = CertificateServiceServer::new(
        SigningService::new(ca.clone(), Arc::new(tokens), &metrics)
            .with_ttls(leaf_ttl, max_leaf_ttl),
    );
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(ads)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(xds_listener),
            stopped(stop_rx.clone()),
        );
    let tls_incoming = crate::tls::incoming(
        tls_listener,
        tls_config,
        metrics.tls_handshake_failures.clone(),
        stop_rx.clone(),
    );
    let tls_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .add_service(tls_ads)
        .add_service(signing)
        .serve_with_incoming_shutdown(tls_incoming, stopped(stop_rx));
    admin.set_ready();
    tracing::info!(
        %xds_addr,
        %tls_addr,
        %monitoring_addr,
        trust_domain,
        tls_identity = serving_cert.spiffe_id(),
        config = %args.config.display(),
        "remora-control-plane serving"
    );
    if let Some(path) = &args.address_file {
        remora_runtime::write_address_file(
            path,
            &serde_json::json!({
                "xds": xds_addr.to_string(),
                "tls": tls_addr.to_string(),
                "monitoring": monitoring_addr.to_string(),
            }),
        )?;
    }

    let servers = async { tokio::try_join!(server, tls_server) };
    tokio::select! {
        result = servers => {
            result.context("xDS server failed")?;
        }
        result = watcher => match result {
            Ok(Ok(())) => anyhow::bail!("mesh file watcher stopped"),
            Ok(Err(e)) => anyhow::bail!("mesh file watcher failed: {e}"),
            Err(e) => anyhow::bail!("mesh file watcher panicked: {e}"),
        },
    }
    tracing::info!("shut down");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("remora-server-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn args(ca_dir: &std::path::Path, extra: &std::path::Path) -> Args {
        Args::try_parse_from([
            "remora-control-plane".as_ref(),
            "--config".as_ref(),
            "mesh.yaml".as_ref(),
            "--ca-dir".as_ref(),
            ca_dir.as_os_str(),
            "--ca-extra-roots".as_ref(),
            extra.as_os_str(),
        ])
        .expect("valid flags")
    }

    #[test]
    fn extra_roots_join_the_bundle_but_do_not_sign() {
        let dir = temp_dir("extra-roots");
        let other = Ca::load_or_create(&dir.join("other"), "cluster.local").expect("other CA");
        let extra = dir.join("extra.pem");
        std::fs::write(&extra, other.trust_bundle_pem()).expect("write");
        let ca = load_ca(&args(&dir.join("ca"), &extra), "cluster.local").expect("loads");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(ca.trust_bundle().len(), 2);
        assert!(ca.trust_bundle_pem().ends_with(&other.trust_bundle_pem()));
        assert_ne!(
            ca.trust_bundle()[0],
            other.trust_bundle()[0],
            "the own root still comes first and signs"
        );
    }

    #[test]
    fn unusable_extra_roots_name_the_file_and_the_reason() {
        let dir = temp_dir("bad-extra-roots");
        let extra = dir.join("extra.pem");
        std::fs::write(&extra, "not a certificate").expect("write");
        let err = load_ca(&args(&dir.join("ca"), &extra), "cluster.local")
            .expect_err("refused")
            .to_string();
        let missing = load_ca(
            &args(&dir.join("ca"), &dir.join("missing.pem")),
            "cluster.local",
        )
        .expect_err("refused")
        .to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            err.contains("extra.pem") && err.contains("--ca-extra-roots"),
            "{err}"
        );
        assert!(missing.contains("missing.pem"), "{missing}");
    }
}

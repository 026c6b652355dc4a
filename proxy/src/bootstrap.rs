//! What the proxy is told at startup: flags and environment variables
//! (every one is listed in `docs/proxy.md`), and the node descriptor it
//! presents to the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use remora_xds_proto::pb::envoy::config::core::v3::Node;
use remora_xds_proto::pb::google::protobuf::{Struct, Value, value::Kind};
use serde::Serialize;

use crate::config::AppProtocol;
use crate::identity::client::TokenSource;
use crate::identity::{SpiffeId, SpiffeIdError, TrustDomain};
use crate::tls::TrustBundle;

/// remora-proxy: the Remora sidecar.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(version, about)]
pub struct Bootstrap {
    /// Node id presented to the control plane. Default: `<service>-<pid>`.
    #[arg(long, env = "REMORA_NODE_ID")]
    pub node_id: Option<String>,
    /// The local service's name: the node's cluster, and with the namespace
    /// (`name.namespace`) the `service` label of inbound metrics.
    #[arg(long, env = "REMORA_SERVICE", default_value = "unknown")]
    pub service: String,
    /// Namespace of the workload identity.
    #[arg(long, env = "REMORA_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Service account of the workload identity.
    #[arg(long, env = "REMORA_SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    /// The control plane's xDS address (host:port). With `--ca-bundle`
    /// (mTLS on) this is its TLS port; without, a plaintext xDS server.
    #[arg(long, env = "REMORA_CONTROL_PLANE", default_value = "127.0.0.1:15012")]
    pub control_plane: String,
    /// The control plane's certificate authority (TLS, host:port): where
    /// the workload certificate is asked for. Default: `--control-plane`.
    #[arg(long, env = "REMORA_CA_ADDR")]
    pub ca_addr: Option<String>,
    /// PEM file with the mesh's root certificate(s), which the control
    /// plane's certificate must chain to (distributed by the operator).
    /// Turns mTLS on: without it the proxy runs with no identity, speaks
    /// plaintext to everything and says so in its log (for tests against
    /// other xDS servers, never for production).
    #[arg(long, env = "REMORA_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
    /// File holding the bearer token that proves the workload's identity to
    /// the CA; read again at every request, so it can be rotated.
    #[arg(long, env = "REMORA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, env = "REMORA_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Outbound listener: where the application sends its requests.
    #[arg(long, env = "REMORA_OUTBOUND_ADDR", default_value = "127.0.0.1:15001")]
    pub outbound_addr: SocketAddr,
    /// Inbound listener: where peer sidecars send requests for the
    /// application.
    #[arg(long, env = "REMORA_INBOUND_ADDR", default_value = "0.0.0.0:15006")]
    pub inbound_addr: SocketAddr,
    /// Admin listener (/metrics, /ready, /live, /config_dump, /logging).
    #[arg(long, env = "REMORA_ADMIN_ADDR", default_value = "127.0.0.1:15020")]
    pub admin_addr: SocketAddr,
    /// The local application's address, where inbound requests go in
    /// explicit mode. Intercepted inbound connections go to their original
    /// destination instead, so a pod needs no flag; without either, inbound
    /// requests are refused (a client-only workload).
    #[arg(long, env = "REMORA_APP_ADDR")]
    pub app_addr: Option<SocketAddr>,
    /// What the application speaks when a peer does not say.
    #[arg(long, env = "REMORA_APP_PROTOCOL", value_enum, default_value = "http1")]
    pub app_protocol: AppProtocolArg,
    /// Worker threads serving connections, each with its own connections
    /// to endpoints; 0 means one per core; 1 serves everything on the main
    /// thread.
    #[arg(long, env = "REMORA_WORKERS", default_value_t = 0)]
    pub workers: usize,
    /// Seconds to let in-flight requests finish after SIGTERM.
    #[arg(long, env = "REMORA_DRAIN_SECONDS", default_value_t = 10)]
    pub drain_seconds: u64,
    /// Once listening, write the bound addresses here as JSON
    /// (`{"outbound": ..., "inbound": ..., "admin": ...}`), for port 0.
    #[arg(long)]
    pub address_file: Option<PathBuf>,
    /// The DNS server (IP:PORT) that resolves the hostnames of services
    /// outside the mesh (STRICT_DNS and LOGICAL_DNS clusters). Default: the
    /// system's resolver configuration (`/etc/resolv.conf`).
    #[arg(long, env = "REMORA_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,
    /// Log filter (tracing-subscriber syntax); changeable at runtime
    /// through `/logging?level=`.
    #[arg(long, env = "REMORA_LOG", default_value = "info")]
    pub log: String,
}

/// `--app-protocol` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocolArg {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (h2c, gRPC).
    Http2,
}

impl From<AppProtocolArg> for AppProtocol {
    fn from(a: AppProtocolArg) -> AppProtocol {
        match a {
            AppProtocolArg::Http1 => AppProtocol::Http1,
            AppProtocolArg::Http2 => AppProtocol::Http2,
        }
    }
}

/// Node metadata keys the control plane reads.
const META_OUTBOUND_LISTENER: &str = "REMORA_OUTBOUND_LISTENER";
const META_INBOUND_LISTENER: &str = "REMORA_INBOUND_LISTENER";
const META_NAMESPACE: &str = "NAMESPACE";
const META_SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";

impl Bootstrap {
    /// The node id, defaulted.
    pub fn node_id(&self) -> String {
        self.node_id
            .clone()
            .unwrap_or_else(|| format!("{}-{}", self.service, std::process::id()))
    }

    /// The CA's address: `--ca-addr`, else `--control-plane`.
    pub fn ca_addr(&self) -> &str {
        self.ca_addr.as_deref().unwrap_or(&self.control_plane)
    }

    /// The node descriptor sent on the xDS stream: `outbound` and
    /// `inbound` are the bound listener addresses.
    pub fn node(&self, outbound: SocketAddr, inbound: Option<SocketAddr>) -> Node {
        let string = |s: String| Value {
            kind: Some(Kind::StringValue(s)),
        };
        Node {
            id: self.node_id(),
            cluster: self.service.clone(),
            user_agent_name: "remora-proxy".to_string(),
            metadata: Some(Struct {
                fields: [
                    (
                        META_OUTBOUND_LISTENER.to_string(),
                        string(outbound.to_string()),
                    ),
                    (META_NAMESPACE.to_string(), string(self.namespace.clone())),
                    (
                        META_SERVICE_ACCOUNT.to_string(),
                        string(self.service_account.clone()),
                    ),
                ]
                .into_iter()
                .chain(
                    inbound
                        .map(|addr| (META_INBOUND_LISTENER.to_string(), string(addr.to_string()))),
                )
                .collect(),
            }),
            ..Default::default()
        }
    }

    /// The workload's SPIFFE ID, from `--trust-domain`, `--namespace` and
    /// `--service-account`.
    pub fn workload_id(&self) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::parse(&format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        ))
    }

    /// Where the CA bearer token comes from (`--token-file`), if given.
    pub fn token_source(&self) -> Option<TokenSource> {
        self.token_file.clone().map(TokenSource::File)
    }

    /// The roots the control plane's certificate must chain to, read from
    /// `--ca-bundle`, if given.
    pub fn ca_trust_bundle(&self) -> anyhow::Result<Option<TrustBundle>> {
        let Some(path) = &self.ca_bundle else {
            return Ok(None);
        };
        let trust_domain = TrustDomain::new(&self.trust_domain)?;
        let pem = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read --ca-bundle {}: {e}", path.display()))?;
        let bundle = TrustBundle::from_pem(trust_domain, &pem)
            .map_err(|e| anyhow::anyhow!("--ca-bundle {}: {e}", path.display()))?;
        Ok(Some(bundle))
    }

    /// The control plane as a URI.
    pub fn control_plane_uri(&self) -> String {
        if self.control_plane.contains("://") {
            self.control_plane.clone()
        } else {
            format!("http://{}", self.control_plane)
        }
    }
}

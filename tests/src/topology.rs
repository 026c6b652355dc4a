//! A whole mesh on loopback: the control plane, one `remora-proxy` sidecar
//! in front of each test application, and a client-only sidecar that the
//! test sends its requests through.
//!
//! Sidecars bind port 0, so the mesh file can only name their inbound
//! listeners once they run. [`Topology::start`] therefore starts the
//! control plane on the mesh with the applications' services emptied of
//! endpoints, starts the sidecars, then rewrites the file (atomically) with
//! each endpoint at its sidecar's inbound address (`identity` set: it has a
//! sidecar) or, for an application without a sidecar, at the application
//! itself (no `identity`), and waits until the client sidecar is ready and
//! its clusters hold exactly those endpoints. Every wait is bounded.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_yaml_ng::{Mapping, Value};

use crate::control_plane::ControlPlane;
use crate::mesh::MeshFile;
use crate::proxy::{AppProtocol, Proxy, ProxyConfig};
use crate::testdir::TestDir;

/// How long the client sidecar may take to be ready and to see every
/// endpoint after a mesh write.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(20);

/// An application of the mesh: an endpoint of a service.
#[derive(Debug, Clone)]
pub struct App {
    /// What the test calls it (`catalog-v1`); also the sidecar's node id.
    pub name: String,
    /// The service it is an endpoint of: `name.namespace`.
    pub service: String,
    /// Where the application listens.
    pub addr: SocketAddr,
    /// What it speaks.
    pub protocol: AppProtocol,
    /// The endpoint's labels (`version: v1`).
    pub labels: Vec<(String, String)>,
    /// The workload's service account (its identity).
    pub service_account: String,
    /// Has a sidecar; when false the endpoint is the application itself and
    /// has no `identity`, so proxies call it directly in its own protocol.
    pub sidecar: bool,
    /// The sidecar is told the application's protocol (`--app-protocol`);
    /// when false it is left to learn it from its peers.
    pub protocol_flag: bool,
}

impl App {
    /// An HTTP/1.1 application of `service` (`name.namespace`) with a
    /// sidecar.
    pub fn new(name: &str, service: &str, addr: SocketAddr) -> App {
        let sa = service.split('.').next().unwrap_or(service).to_string();
        App {
            name: name.to_string(),
            service: service.to_string(),
            addr,
            protocol: AppProtocol::Http1,
            labels: Vec::new(),
            service_account: sa,
            sidecar: true,
            protocol_flag: true,
        }
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> App {
        self.labels.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets the protocol the application speaks.
    pub fn protocol(mut self, protocol: AppProtocol) -> App {
        self.protocol = protocol;
        self
    }

    /// The sidecar starts without `--app-protocol` (so assumes HTTP/1.1
    /// unless a peer says otherwise).
    pub fn without_protocol_flag(mut self) -> App {
        self.protocol_flag = false;
        self
    }

    /// No sidecar: the mesh names the application itself, without identity.
    pub fn without_sidecar(mut self) -> App {
        self.sidecar = false;
        self
    }

    fn service_parts(&self) -> (&str, &str) {
        self.service
            .split_once('.')
            .unwrap_or((self.service.as_str(), "default"))
    }
}

/// The SPIFFE ID of the client sidecar every topology starts, as the
/// applications see it in `x-remora-peer-identity`.
pub const CLIENT_IDENTITY: &str = "spiffe://cluster.local/ns/test/sa/client";

/// The running mesh.
pub struct Topology {
    control_plane: ControlPlane,
    mesh: MeshFile,
    mesh_path: PathBuf,
    client: Proxy,
    apps: Vec<(App, Option<Proxy>)>,
}

impl Topology {
    /// Starts the control plane on `mesh`, a sidecar per application that
    /// has one, and a client sidecar (service `client` in namespace
    /// `test`); points each application's service at its endpoints (the
    /// apps of a service replace every endpoint the mesh had) and waits
    /// until the client sidecar routes to all of them.
    pub async fn start(dir: &TestDir, mesh: MeshFile, apps: Vec<App>) -> Result<Topology> {
        Topology::start_with_control_plane_args(dir, mesh, apps, &[]).await
    }

    /// The client sidecar: tests send their requests to its outbound
    /// listener.
    pub fn client(&self) -> &Proxy {
        &self.client
    }

    /// The client sidecar, mutably.
    pub fn client_mut(&mut self) -> &mut Proxy {
        &mut self.client
    }

    /// The sidecar of application `name`.
    pub fn sidecar(&self, name: &str) -> Result<&Proxy> {
        self.apps
            .iter()
            .find(|(a, _)| a.name == name)
            .ok_or_else(|| anyhow!("no application {name:?} in the topology"))?
            .1
            .as_ref()
            .ok_or_else(|| anyhow!("application {name:?} has no sidecar"))
    }

    /// The sidecar of application `name`, mutably (to stop it).
    pub fn sidecar_mut(&mut self, name: &str) -> Result<&mut Proxy> {
        self.apps
            .iter_mut()
            .find(|(a, _)| a.name == name)
            .ok_or_else(|| anyhow!("no application {name:?} in the topology"))?
            .1
            .as_mut()
            .ok_or_else(|| anyhow!("application {name:?} has no sidecar"))
    }

    /// Every sidecar (the client's first), for checks over all of them.
    pub fn proxies(&self) -> Vec<&Proxy> {
        std::iter::once(&self.client)
            .chain(self.apps.iter().filter_map(|(_, p)| p.as_ref()))
            .collect()
    }

    /// The control plane.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// Replaces the control plane (after a restart).
    pub fn set_control_plane(&mut self, control_plane: ControlPlane) -> ControlPlane {
        std::mem::replace(&mut self.control_plane, control_plane)
    }

    /// The control plane, mutably (to kill it).
    pub fn control_plane_mut(&mut self) -> &mut ControlPlane {
        &mut self.control_plane
    }

    /// The mesh file's path.
    pub fn mesh_path(&self) -> &PathBuf {
        &self.mesh_path
    }

    /// The mesh document as last written (or being prepared).
    pub fn mesh_mut(&mut self) -> &mut MeshFile {
        &mut self.mesh
    }

    /// Writes the mesh document, atomically.
    pub fn write_mesh(&self) -> Result<()> {
        self.mesh.write(&self.mesh_path)
    }

    /// The address the mesh names for application `name`: its sidecar's
    /// inbound listener, or the application itself without a sidecar.
    pub fn endpoint_addr(&self, name: &str) -> Result<SocketAddr> {
        let (app, proxy) = self
            .apps
            .iter()
            .find(|(a, _)| a.name == name)
            .ok_or_else(|| anyhow!("no application {name:?} in the topology"))?;
        match proxy {
            Some(p) => p.inbound_addr(),
            None => Ok(app.addr),
        }
    }

    /// Sets the endpoints of `service` (in the document; see
    /// [`Topology::write_mesh`]) to the applications `names`.
    pub fn set_endpoints(&mut self, service: &str, names: &[&str]) -> Result<()> {
        let mut list = Vec::with_capacity(names.len());
        for name in names {
            let (app, _) = self
                .apps
                .iter()
                .find(|(a, _)| a.name == *name)
                .ok_or_else(|| anyhow!("no application {name:?} in the topology"))?;
            let addr = self.endpoint_addr(name)?;
            let mut ep = Mapping::new();
            ep.insert("address".into(), addr.ip().to_string().into());
            ep.insert("port".into(), Value::from(addr.port()));
            if !app.labels.is_empty() {
                let mut labels = Mapping::new();
                for (k, v) in &app.labels {
                    labels.insert(k.as_str().into(), v.as_str().into());
                }
                ep.insert("labels".into(), Value::Mapping(labels));
            }
            if app.sidecar {
                let mut identity = Mapping::new();
                identity.insert(
                    "service_account".into(),
                    app.service_account.as_str().into(),
                );
                ep.insert("identity".into(), Value::Mapping(identity));
            }
            list.push(Value::Mapping(ep));
        }
        self.mesh
            .service_mut(service)?
            .insert("endpoints".into(), Value::Sequence(list));
        Ok(())
    }

    /// Every endpoint address the mesh document names (healthy or not
    /// given), which is what the client's clusters hold once converged.
    pub fn expected_members(&self) -> Result<BTreeSet<SocketAddr>> {
        let mut out = BTreeSet::new();
        let services = self
            .mesh
            .doc()
            .get("services")
            .and_then(Value::as_sequence)
            .context("the mesh has no services list")?;
        for service in services {
            for ep in service
                .get("endpoints")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                let health = ep
                    .get("health")
                    .and_then(Value::as_str)
                    .unwrap_or("healthy");
                if health != "healthy" {
                    continue;
                }
                let address = ep
                    .get("address")
                    .and_then(Value::as_str)
                    .ok_or_else(|| anyhow!("an endpoint without address: {ep:?}"))?;
                let port = ep
                    .get("port")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| anyhow!("an endpoint without port: {ep:?}"))?;
                out.insert(
                    format!("{address}:{port}")
                        .parse()
                        .with_context(|| format!("endpoint {address}:{port}"))?,
                );
            }
        }
        Ok(out)
    }

    /// Waits until the client sidecar's clusters hold exactly the
    /// endpoints the mesh document names.
    pub async fn wait_converged(&self, timeout: Duration) -> Result<()> {
        let expected = self.expected_members()?;
        if expected.is_empty() {
            bail!("the mesh names no endpoint to wait for");
        }
        self.client.wait_for_members("", &expected, timeout).await
    }
}

/// Keeps only the services named (`name.namespace`) in `mesh`.
pub fn keep_services(mesh: &mut MeshFile, keep: &[&str]) -> Result<()> {
    let services = mesh
        .doc_mut()
        .get_mut("services")
        .and_then(Value::as_sequence_mut)
        .context("the mesh has no services list")?;
    services.retain(|s| {
        let name = s.get("name").and_then(Value::as_str).unwrap_or_default();
        let ns = s
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        keep.contains(&format!("{name}.{ns}").as_str())
    });
    Ok(())
}

// === Control plane flags ===

impl Topology {
    /// [`Topology::start`] with `args` added to the control plane's command
    /// line (e.g. `--leaf-ttl 20` for certificates that rotate within a
    /// test). The CA stays in `dir`'s `control-plane-ca` unless `args` name
    /// another (`--ca-dir`, `--ca-cert`).
    pub async fn start_with_control_plane_args(
        dir: &TestDir,
        mesh: MeshFile,
        apps: Vec<App>,
        args: &[std::ffi::OsString],
    ) -> Result<Topology> {
        let mesh_path = dir.file("mesh.yaml");
        let mut mesh = mesh;
        let mut tokens = Vec::with_capacity(apps.len());
        for app in &apps {
            let (_, namespace) = app.service_parts();
            tokens.push(mesh.token_for(namespace, &app.service_account)?);
        }
        let client_token = mesh.token_for("test", "client")?;
        let mut initial = mesh.clone();
        for app in &apps {
            initial
                .service_mut(&app.service)?
                .insert("endpoints".into(), Value::Sequence(Vec::new()));
        }
        initial.write(&mesh_path)?;
        let control_plane = ControlPlane::start_with(dir, &mesh_path, "127.0.0.1:0", args).await?;
        let link = control_plane.link(dir).await?;

        let mut running = Vec::with_capacity(apps.len());
        for (app, token) in apps.into_iter().zip(tokens) {
            let proxy = if app.sidecar {
                let (service, namespace) = app.service_parts();
                let mut config = ProxyConfig::sidecar(service, namespace, app.addr, app.protocol)
                    .node_id(&app.name)
                    .service_account(&app.service_account)
                    .token(&token);
                if !app.protocol_flag {
                    config = config.default_app_protocol();
                }
                Some(Proxy::start(dir, &link, &config).await?)
            } else {
                None
            };
            running.push((app, proxy));
        }
        let client = Proxy::start(
            dir,
            &link,
            &ProxyConfig::client("client", "test")
                .node_id("client")
                .token(&client_token),
        )
        .await?;

        let mut topology = Topology {
            control_plane,
            mesh,
            mesh_path,
            client,
            apps: running,
        };
        let services: BTreeSet<String> = topology
            .apps
            .iter()
            .map(|(a, _)| a.service.clone())
            .collect();
        for service in &services {
            let names: Vec<String> = topology
                .apps
                .iter()
                .filter(|(a, _)| &a.service == service)
                .map(|(a, _)| a.name.clone())
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            topology.set_endpoints(service, &names)?;
        }
        topology.write_mesh()?;
        topology.client.wait_ready(CONVERGE_TIMEOUT).await?;
        topology.wait_converged(CONVERGE_TIMEOUT).await?;
        Ok(topology)
    }
}

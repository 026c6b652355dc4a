//! Mesh files for tests, derived from `examples/mesh.yaml`.
//!
//! The example's endpoints name fixed ports on 127.0.0.1; tests never use
//! those. They load the example as a YAML value, point each service's
//! endpoints at servers they started on `127.0.0.1:0`, edit routes, and
//! write the result into their own directory. Writes go to a temporary name
//! in the same folder and are renamed over the file, so the control plane's
//! watcher sees one complete change.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_yaml_ng::{Mapping, Value};

use crate::workspace;

/// An endpoint to put in a service: a port on 127.0.0.1 and its labels.
#[derive(Debug, Clone)]
pub struct TestEndpoint {
    /// Port on 127.0.0.1.
    pub port: u16,
    /// Labels (e.g. `version: v1`).
    pub labels: Vec<(String, String)>,
}

impl TestEndpoint {
    /// An endpoint with no labels.
    pub fn new(port: u16) -> TestEndpoint {
        TestEndpoint {
            port,
            labels: Vec::new(),
        }
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> TestEndpoint {
        self.labels.push((key.to_string(), value.to_string()));
        self
    }

    /// An endpoint labelled `version: <version>`.
    pub fn version(port: u16, version: &str) -> TestEndpoint {
        TestEndpoint::new(port).label("version", version)
    }
}

/// A mesh document being prepared by a test.
#[derive(Debug, Clone)]
pub struct MeshFile {
    doc: Value,
}

impl MeshFile {
    /// Loads `examples/mesh.yaml`.
    pub fn example() -> Result<MeshFile> {
        MeshFile::load(&workspace::example_mesh())
    }

    /// Loads a mesh file.
    pub fn load(path: &Path) -> Result<MeshFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading mesh file {}", path.display()))?;
        MeshFile::parse(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Parses mesh YAML.
    pub fn parse(text: &str) -> Result<MeshFile> {
        let doc: Value = serde_yaml_ng::from_str(text)?;
        if !doc.get("services").is_some_and(Value::is_sequence) {
            bail!("not a mesh file: no `services` list at the top");
        }
        Ok(MeshFile { doc })
    }

    /// The bootstrap token of workload `namespace`/`service_account`,
    /// declared in `workload_tokens` (added with a fresh value if absent).
    pub fn token_for(&mut self, namespace: &str, service_account: &str) -> Result<String> {
        let map = self
            .doc
            .as_mapping_mut()
            .ok_or_else(|| anyhow!("the mesh document is not a mapping"))?;
        let tokens = map
            .entry("workload_tokens".into())
            .or_insert_with(|| Value::Sequence(Vec::new()))
            .as_sequence_mut()
            .ok_or_else(|| anyhow!("workload_tokens is not a list"))?;
        for entry in tokens.iter() {
            let field = |name: &str| entry.get(name).and_then(Value::as_str);
            if field("namespace") == Some(namespace)
                && field("service_account") == Some(service_account)
                && let Some(token) = field("token")
            {
                return Ok(token.to_string());
            }
        }
        let token = format!(
            "test-token-{namespace}-{service_account}-{:016x}",
            fastrand::u64(..)
        );
        let mut entry = Mapping::new();
        entry.insert("namespace".into(), namespace.into());
        entry.insert("service_account".into(), service_account.into());
        entry.insert("token".into(), token.clone().into());
        tokens.push(Value::Mapping(entry));
        Ok(token)
    }

    /// The document.
    pub fn doc(&self) -> &Value {
        &self.doc
    }

    /// The document, to edit freely.
    pub fn doc_mut(&mut self) -> &mut Value {
        &mut self.doc
    }

    /// The YAML text.
    pub fn to_yaml(&self) -> Result<String> {
        Ok(serde_yaml_ng::to_string(&self.doc)?)
    }

    /// Writes the document to `path` atomically: to a temporary file in the
    /// same folder, then renamed over `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomically(path, self.to_yaml()?.as_bytes())
    }

    /// The names of the services, as `name.namespace`.
    pub fn service_names(&self) -> Vec<String> {
        self.services()
            .iter()
            .filter_map(|s| {
                let name = s.get("name")?.as_str()?;
                let ns = s
                    .get("namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                Some(format!("{name}.{ns}"))
            })
            .collect()
    }

    fn services(&self) -> &[Value] {
        self.doc
            .get("services")
            .and_then(Value::as_sequence)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The service named `name` (`name` or `name.namespace`).
    pub fn service_mut(&mut self, name: &str) -> Result<&mut Mapping> {
        let (want, want_ns) = match name.split_once('.') {
            Some((n, ns)) => (n, Some(ns)),
            None => (name, None),
        };
        let known = self.service_names();
        self.doc
            .get_mut("services")
            .and_then(Value::as_sequence_mut)
            .into_iter()
            .flatten()
            .filter_map(Value::as_mapping_mut)
            .find(|s| {
                s.get("name").and_then(Value::as_str) == Some(want)
                    && want_ns.is_none_or(|ns| {
                        s.get("namespace")
                            .and_then(Value::as_str)
                            .unwrap_or("default")
                            == ns
                    })
            })
            .ok_or_else(|| anyhow!("the mesh has no service {name:?}; it has {known:?}"))
    }

    /// The endpoints of a service.
    pub fn endpoints(&mut self, service: &str) -> Result<Vec<Value>> {
        Ok(self
            .service_mut(service)?
            .get("endpoints")
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default())
    }

    /// Replaces a service's endpoints with `endpoints` on 127.0.0.1. Each is
    /// copied from an endpoint of the example (the first one with the same
    /// labels, else the first one), so weight and zone stay as the example
    /// has them; address, port and labels are replaced, and the identity is
    /// removed: a test server is not a sidecar, so callers reach it in
    /// plaintext (the topology sets identities for the apps it gives one).
    pub fn set_endpoints(&mut self, service: &str, endpoints: &[TestEndpoint]) -> Result<()> {
        let svc = self.service_mut(service)?;
        let existing: Vec<Mapping> = svc
            .get("endpoints")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(Value::as_mapping)
            .cloned()
            .collect();
        let list = endpoints
            .iter()
            .map(|ep| {
                let mut labels = Mapping::new();
                for (k, v) in &ep.labels {
                    labels.insert(k.as_str().into(), v.as_str().into());
                }
                let mut m = existing
                    .iter()
                    .find(|t| t.get("labels").and_then(Value::as_mapping) == Some(&labels))
                    .or(existing.first())
                    .cloned()
                    .unwrap_or_default();
                m.insert("address".into(), "127.0.0.1".into());
                m.insert("port".into(), Value::from(ep.port));
                m.remove("ports");
                m.remove("identity");
                if labels.is_empty() {
                    m.remove("labels");
                } else {
                    m.insert("labels".into(), Value::Mapping(labels));
                }
                Value::Mapping(m)
            })
            .collect();
        svc.insert("endpoints".into(), Value::Sequence(list));
        Ok(())
    }

    /// Points every endpoint of `service` at `port` on 127.0.0.1, keeping
    /// the example's labels.
    pub fn set_all_endpoint_ports(&mut self, service: &str, port: u16) -> Result<()> {
        let svc = self.service_mut(service)?;
        for ep in svc
            .get_mut("endpoints")
            .and_then(Value::as_sequence_mut)
            .into_iter()
            .flatten()
            .filter_map(Value::as_mapping_mut)
        {
            ep.insert("address".into(), "127.0.0.1".into());
            ep.insert("port".into(), Value::from(port));
            ep.remove("ports");
        }
        Ok(())
    }

    /// The routes of a service.
    pub fn routes_mut(&mut self, service: &str) -> Result<&mut Vec<Value>> {
        let svc = self.service_mut(service)?;
        if !svc.contains_key("routes") {
            svc.insert("routes".into(), Value::Sequence(Vec::new()));
        }
        svc.get_mut("routes")
            .and_then(Value::as_sequence_mut)
            .ok_or_else(|| anyhow!("service {service:?}: `routes` is not a list"))
    }

    /// The route named `route` of `service`.
    pub fn route_mut(&mut self, service: &str, route: &str) -> Result<&mut Mapping> {
        let routes = self.routes_mut(service)?;
        let names: Vec<String> = routes
            .iter()
            .filter_map(|r| r.get("name")?.as_str().map(str::to_string))
            .collect();
        routes
            .iter_mut()
            .filter_map(Value::as_mapping_mut)
            .find(|r| r.get("name").and_then(Value::as_str) == Some(route))
            .ok_or_else(|| anyhow!("service {service:?} has no route {route:?}; it has {names:?}"))
    }

    /// Removes the route named `route` from `service`.
    pub fn remove_route(&mut self, service: &str, route: &str) -> Result<()> {
        self.route_mut(service, route)?;
        self.routes_mut(service)?
            .retain(|r| r.get("name").and_then(Value::as_str) != Some(route));
        Ok(())
    }

    /// Sets the weight of each backend of a route, by subset name.
    pub fn set_subset_weights(
        &mut self,
        service: &str,
        route: &str,
        weights: &[(&str, u32)],
    ) -> Result<()> {
        let r = self.route_mut(service, route)?;
        let backends = r
            .get_mut("backends")
            .and_then(Value::as_sequence_mut)
            .ok_or_else(|| anyhow!("route {route:?} of {service:?} has no `backends` list"))?;
        for (subset, weight) in weights {
            let backend = backends
                .iter_mut()
                .filter_map(Value::as_mapping_mut)
                .find(|b| b.get("subset").and_then(Value::as_str) == Some(*subset))
                .ok_or_else(|| {
                    anyhow!("route {route:?} of {service:?} has no backend with subset {subset:?}")
                })?;
            backend.insert("weight".into(), Value::from(*weight));
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and
/// a rename, so readers see the old file or the new one, never a half.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent folder", path.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp: PathBuf = dir.join(tmp_name);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

//! The demo's mesh file: the example mesh (or `--mesh`), with the demo
//! services' endpoints pointed at their sidecars' inbound listeners and
//! every `catalog` route made to retry on 5xx.
//!
//! The file is edited as a YAML value, not through the control plane's
//! model, so the control plane stays the one judge of what is valid: it
//! reloads the file and refuses it with file, line and field if the demo
//! ever writes something wrong.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

/// `examples/mesh.yaml` as it was when `remora` was built.
const BUILT_IN: &str = include_str!("../../../examples/mesh.yaml");
/// Where the example is looked for first, relative to the current directory.
const EXAMPLE_PATH: &str = "examples/mesh.yaml";
/// The namespace of the demo's services.
const NAMESPACE: &str = "shop";
/// The retry policy given to a `catalog` route that has none.
const ADDED_ATTEMPTS: u64 = 3;

/// Why the mesh could not be read or rewritten.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MeshError {
    #[error("cannot read the mesh file {path} (--mesh): {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{source_desc} is not YAML the demo can edit: {error}")]
    Parse {
        source_desc: String,
        error: serde_yaml_ng::Error,
    },
    #[error(
        "{source_desc}: {what}; the demo needs the services frontend.shop and catalog.shop \
         (catalog with subsets v1 and v2), as in examples/mesh.yaml"
    )]
    Shape { source_desc: String, what: String },
    #[error("cannot write the rewritten mesh as YAML: {0}")]
    Serialize(serde_yaml_ng::Error),
}

/// Where each demo service's sidecar accepts mesh traffic.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placement {
    pub(crate) frontend: SocketAddr,
    pub(crate) catalog_v1: SocketAddr,
    pub(crate) catalog_v2: SocketAddr,
}

/// The rewritten mesh, and what was changed beyond the endpoints.
#[derive(Debug)]
pub(crate) struct Rewritten {
    pub(crate) yaml: String,
    pub(crate) notes: Vec<String>,
    /// The other services (`name.namespace`), which the demo does not run.
    pub(crate) others: Vec<String>,
}

/// The mesh text and a description of where it came from.
pub(crate) fn load(path: Option<&Path>) -> Result<(String, String), MeshError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|error| MeshError::Read {
            path: path.to_path_buf(),
            error,
        })
    };
    match path {
        Some(path) => Ok((read(path)?, path.display().to_string())),
        None if Path::new(EXAMPLE_PATH).is_file() => {
            Ok((read(Path::new(EXAMPLE_PATH))?, EXAMPLE_PATH.to_string()))
        }
        None => Ok((
            BUILT_IN.to_string(),
            "the copy of examples/mesh.yaml built into remora".to_string(),
        )),
    }
}

/// Points `frontend` and `catalog` v1/v2 at `placement` and makes every
/// `catalog` route retry on 5xx.
pub(crate) fn rewrite(
    text: &str,
    source_desc: &str,
    placement: &Placement,
) -> Result<Rewritten, MeshError> {
    let shape = |what: String| MeshError::Shape {
        source_desc: source_desc.to_string(),
        what,
    };
    let mut doc: Value = serde_yaml_ng::from_str(text).map_err(|error| MeshError::Parse {
        source_desc: source_desc.to_string(),
        error,
    })?;
    let services = doc
        .get_mut("services")
        .and_then(Value::as_sequence_mut)
        .ok_or_else(|| shape("it has no `services:` list".to_string()))?;
    let mut notes = Vec::new();
    let others = services
        .iter()
        .filter_map(|s| {
            let name = s.get("name")?.as_str()?;
            let namespace = s
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("default");
            let demo = namespace == NAMESPACE && matches!(name, "frontend" | "catalog");
            (!demo).then(|| format!("{name}.{namespace}"))
        })
        .collect();

    let frontend = find_service(services, "frontend")
        .ok_or_else(|| shape("it has no service frontend in namespace shop".to_string()))?;
    let endpoint = sidecar_endpoint(
        first_endpoint(frontend, |_| true),
        placement.frontend,
        "frontend",
    );
    frontend.insert("endpoints".into(), Value::Sequence(vec![endpoint]));

    let catalog = find_service(services, "catalog")
        .ok_or_else(|| shape("it has no service catalog in namespace shop".to_string()))?;
    let mut endpoints = Vec::new();
    for (version, addr) in [("v1", placement.catalog_v1), ("v2", placement.catalog_v2)] {
        let labels = subset_labels(catalog, version)
            .ok_or_else(|| shape(format!("catalog has no subset {version} with labels")))?;
        let mut template = first_endpoint(catalog, |e| has_labels(e, &labels));
        template.insert("labels".into(), Value::Mapping(labels));
        endpoints.push(sidecar_endpoint(template, addr, "catalog"));
    }
    catalog.insert("endpoints".into(), Value::Sequence(endpoints));
    ensure_retries(catalog, &mut notes);

    let yaml = serde_yaml_ng::to_string(&doc).map_err(MeshError::Serialize)?;
    Ok(Rewritten {
        yaml: format!(
            "# Written by `remora demo` from {source_desc}: the demo services' endpoints\n\
             # point at their sidecars' inbound listeners. Edit it: the control plane\n\
             # reloads it and the sidecars follow within a second.\n{yaml}"
        ),
        notes,
        others,
    })
}

/// Writes `text` to a temporary file next to `path`, then renames it over
/// `path`, so the control plane never reads half a file.
/// The bootstrap token the mesh file declares for a workload, if any.
pub(crate) fn token_for(mesh_text: &str, namespace: &str, service_account: &str) -> Option<String> {
    let mesh: Value = serde_yaml_ng::from_str(mesh_text).ok()?;
    let tokens = mesh.get("workload_tokens")?.as_sequence()?;
    tokens.iter().find_map(|entry| {
        let field = |name: &str| entry.get(name).and_then(Value::as_str);
        (field("namespace") == Some(namespace) && field("service_account") == Some(service_account))
            .then(|| field("token").map(str::to_owned))
            .flatten()
    })
}

pub(crate) fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

fn find_service<'a>(services: &'a mut [Value], name: &str) -> Option<&'a mut Mapping> {
    services
        .iter_mut()
        .filter_map(Value::as_mapping_mut)
        .find(|s| {
            s.get("name").and_then(Value::as_str) == Some(name)
                && s.get("namespace").and_then(Value::as_str) == Some(NAMESPACE)
        })
}

/// A copy of the first endpoint that `keep` accepts, or an empty mapping.
fn first_endpoint(service: &Mapping, keep: impl Fn(&Mapping) -> bool) -> Mapping {
    service
        .get("endpoints")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(Value::as_mapping)
        .find(|e| keep(e))
        .cloned()
        .unwrap_or_default()
}

/// `template` (zone, weight, labels...) at `addr`, reached through its
/// sidecar: an identity says so, and one `port` serves every service port.
fn sidecar_endpoint(mut template: Mapping, addr: SocketAddr, service_account: &str) -> Value {
    template.insert("address".into(), Value::String(addr.ip().to_string()));
    template.insert("port".into(), Value::Number(addr.port().into()));
    template.remove("ports");
    template.remove("health");
    if !template.contains_key("identity") {
        let mut identity = Mapping::new();
        identity.insert("service_account".into(), service_account.into());
        template.insert("identity".into(), Value::Mapping(identity));
    }
    Value::Mapping(template)
}

fn subset_labels(service: &Mapping, subset: &str) -> Option<Mapping> {
    service
        .get("subsets")?
        .as_sequence()?
        .iter()
        .filter_map(Value::as_mapping)
        .find(|s| s.get("name").and_then(Value::as_str) == Some(subset))?
        .get("labels")?
        .as_mapping()
        .filter(|labels| !labels.is_empty())
        .cloned()
}

fn has_labels(endpoint: &Mapping, wanted: &Mapping) -> bool {
    let Some(labels) = endpoint.get("labels").and_then(Value::as_mapping) else {
        return false;
    };
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Makes every route of `catalog` retry on 5xx, so the flaky v2 is hidden
/// from `frontend`; a route without a retry policy gets
/// `{on: [5xx], attempts: 3}` (3, not the example's 2, because a route to
/// the v2 subset alone retries on the same flaky instance).
fn ensure_retries(catalog: &mut Mapping, notes: &mut Vec<String>) {
    let added_policy = || {
        let mut retry = Mapping::new();
        retry.insert("on".into(), Value::Sequence(vec!["5xx".into()]));
        retry.insert("attempts".into(), Value::Number(ADDED_ATTEMPTS.into()));
        Value::Mapping(retry)
    };
    let routes = catalog
        .entry("routes".into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if routes.is_null() {
        *routes = Value::Sequence(Vec::new());
    }
    let Some(routes) = routes.as_sequence_mut() else {
        // Not a list: the control plane will say so with the line.
        return;
    };
    if routes.is_empty() {
        let mut route = Mapping::new();
        route.insert("name".into(), "default".into());
        let mut backend = Mapping::new();
        backend.insert("service".into(), "catalog".into());
        route.insert(
            "backends".into(),
            Value::Sequence(vec![Value::Mapping(backend)]),
        );
        route.insert("retry".into(), added_policy());
        routes.push(Value::Mapping(route));
        notes.push(format!(
            "catalog had no routes: the demo added one, `default`, with retry {{on: [5xx], attempts: {ADDED_ATTEMPTS}}}"
        ));
        return;
    }
    for (index, route) in routes.iter_mut().enumerate() {
        let Some(route) = route.as_mapping_mut() else {
            continue;
        };
        let name = route
            .get("name")
            .and_then(Value::as_str)
            .map_or_else(|| format!("route-{index}"), str::to_string);
        match route.get_mut("retry") {
            None | Some(Value::Null) => {
                route.insert("retry".into(), added_policy());
                notes.push(format!(
                    "catalog route {name} had no retry policy: the demo added retry {{on: [5xx], attempts: {ADDED_ATTEMPTS}}}"
                ));
            }
            Some(retry) => {
                let on = retry.get_mut("on").and_then(Value::as_sequence_mut);
                if let Some(on) = on {
                    let covers = on
                        .iter()
                        .any(|c| matches!(c.as_str(), Some("5xx" | "gateway-error")));
                    if !covers {
                        on.push("5xx".into());
                        notes.push(format!(
                            "catalog route {name} did not retry on 5xx: the demo added 5xx to its retry conditions"
                        ));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement() -> Placement {
        Placement {
            frontend: ([127, 0, 0, 1], 40001).into(),
            catalog_v1: ([127, 0, 0, 1], 40002).into(),
            catalog_v2: ([127, 0, 0, 1], 40003).into(),
        }
    }

    fn service<'a>(doc: &'a Value, name: &str) -> &'a Value {
        doc["services"]
            .as_sequence()
            .and_then(|s| s.iter().find(|s| s["name"].as_str() == Some(name)))
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    #[test]
    fn example_points_at_sidecars_and_retries_everywhere() {
        let out = rewrite(BUILT_IN, "example", &placement()).expect("test data");
        let doc: Value = serde_yaml_ng::from_str(&out.yaml).expect("test data");

        let frontend = &service(&doc, "frontend")["endpoints"];
        assert_eq!(frontend.as_sequence().expect("test data").len(), 1);
        assert_eq!(frontend[0]["port"].as_u64(), Some(40001));
        assert_eq!(
            frontend[0]["identity"]["service_account"].as_str(),
            Some("frontend")
        );

        let catalog = service(&doc, "catalog");
        let endpoints = catalog["endpoints"].as_sequence().expect("test data");
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints[0]["port"].as_u64(), Some(40002));
        assert_eq!(endpoints[0]["labels"]["version"].as_str(), Some("v1"));
        assert_eq!(endpoints[0]["zone"].as_str(), Some("zone-a"));
        assert_eq!(endpoints[1]["port"].as_u64(), Some(40003));
        assert_eq!(endpoints[1]["labels"]["version"].as_str(), Some("v2"));

        for route in catalog["routes"].as_sequence().expect("test data") {
            let on = route["retry"]["on"].as_sequence().expect("test data");
            assert!(on.iter().any(|c| c.as_str() == Some("5xx")), "{route:?}");
        }
        // The split route kept its own policy; the two others got one.
        assert_eq!(out.notes.len(), 2, "{:?}", out.notes);
        let split = &catalog["routes"][2];
        assert_eq!(split["retry"]["attempts"].as_u64(), Some(2));
        assert_eq!(split["retry"]["per_try_timeout"].as_str(), Some("500ms"));

        assert_eq!(out.others, ["reviews.shop", "ledger.shop"]);
        // Untouched: reviews still points at the example's ports.
        assert_eq!(
            service(&doc, "reviews")["endpoints"][0]["port"].as_u64(),
            Some(9201)
        );
    }

    #[test]
    fn missing_catalog_is_a_clear_error() {
        let err = rewrite("services: []\n", "m.yaml", &placement()).expect_err("must fail");
        assert!(err.to_string().contains("no service frontend"), "{err}");
    }

    #[test]
    fn retry_without_5xx_gets_it() {
        let mut catalog: Mapping = serde_yaml_ng::from_str(
            "routes: [{name: r, backends: [{service: catalog}], retry: {on: [reset]}}]",
        )
        .expect("test data");
        let mut notes = Vec::new();
        ensure_retries(&mut catalog, &mut notes);
        let on = catalog["routes"][0]["retry"]["on"]
            .as_sequence()
            .expect("test data");
        assert_eq!(on.len(), 2);
        assert_eq!(notes.len(), 1);
    }
}

//! The incremental (delta) ADS stream, as a state machine without sockets.
//!
//! Per type it remembers the subscription (wildcard and/or names) and the
//! version of every resource the client holds, which starts from the
//! client's `initial_resource_versions` on reconnect. Each response carries
//! only what differs from that, plus the names that disappeared. What was
//! sent counts as held even if the client NACKs it, so a rejected resource
//! is not re-sent in a loop; the next change to it is.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use remora_xds_proto::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as PbResource,
};

use super::ClientResources;
use super::status::TypeStatus;
use super::{Outcome, StreamCore, StreamError, StreamMachine};
use crate::translate::{ResourceType, SECRET_DEFAULT};
use crate::xds::snapshot::Snapshot;

/// Unanswered responses remembered per type.
const MAX_PENDING: usize = 16;

/// One delta stream.
#[derive(Debug, Default)]
pub struct DeltaStream {
    core: StreamCore,
    types: BTreeMap<ResourceType, TypeState>,
}

#[derive(Debug, Default)]
struct TypeState {
    names: BTreeSet<String>,
    /// Name -> version the client holds.
    held: HashMap<String, String>,
    /// Names subscribed since the last response that do not exist: the
    /// client is told once, so it stops waiting for them.
    missing: BTreeSet<String>,
    /// Nonce -> the type version that response brought the client to.
    pending: BTreeMap<u64, String>,
    status: TypeStatus,
}

impl StreamMachine for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const API: &'static str = "delta";

    /// Handles one request against the current snapshot.
    fn on_request(
        &mut self,
        request: DeltaDiscoveryRequest,
        snapshot: &Snapshot,
    ) -> Result<Outcome<DeltaDiscoveryResponse>, StreamError> {
        self.core.identify(request.node.as_ref(), snapshot)?;
        let Some(ty) = ResourceType::from_type_url(&request.type_url) else {
            return Err(StreamError::UnknownType(request.type_url));
        };
        let first = !self.types.contains_key(&ty);
        let state = self.types.entry(ty).or_default();
        let mut outcome = Outcome::new();

        if first {
            state.held = request.initial_resource_versions.into_iter().collect();
            // Legacy wildcard: a first LDS/CDS request that names nothing.
            state.status.wildcard =
                request.resource_names_subscribe.is_empty() && ty.wildcard_by_default();
        }
        if !request.response_nonce.is_empty() {
            let acked = request
                .response_nonce
                .parse::<u64>()
                .ok()
                .and_then(|n| state.pending.remove(&n).map(|v| (n, v)));
            if let Some((nonce, version)) = acked {
                // Responses are answered in order; older ones are settled.
                state.pending.retain(|&n, _| n > nonce);
                outcome.nack = state
                    .status
                    .record_answer(version, request.error_detail.as_ref())
                    .map(|message| (ty, message));
            }
        }
        for name in request.resource_names_subscribe {
            if name == "*" {
                state.status.wildcard = true;
            } else if state.names.insert(name.clone()) {
                state.missing.insert(name);
            }
        }
        for name in request.resource_names_unsubscribe {
            if name == "*" {
                state.status.wildcard = false;
            } else {
                state.names.remove(&name);
                state.missing.remove(&name);
                state.held.remove(&name);
            }
        }
        state.status.subscribed = state.names.len();
        if ty == ResourceType::Secret {
            let wants_default = state.status.wildcard || state.names.contains(SECRET_DEFAULT);
            self.core.secrets_requested(wants_default, snapshot);
        }

        let view = self.core.view(snapshot)?;
        if let Some(response) = self.diff(ty, &view, first) {
            outcome.responses.push(response);
        }
        Ok(outcome)
    }

    /// Sends what changed in `snapshot`, type by type in push order.
    fn on_snapshot(
        &mut self,
        snapshot: &Snapshot,
    ) -> Result<Vec<DeltaDiscoveryResponse>, StreamError> {
        if self.core.client.is_none() {
            return Ok(Vec::new());
        }
        let view = self.core.view(snapshot)?;
        let types: Vec<ResourceType> = self.types.keys().copied().collect();
        Ok(types
            .into_iter()
            .filter_map(|ty| self.diff(ty, &view, false))
            .collect())
    }

    fn core(&self) -> &StreamCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut StreamCore {
        &mut self.core
    }

    fn type_statuses(&self) -> BTreeMap<&'static str, TypeStatus> {
        self.types
            .iter()
            .map(|(ty, state)| (ty.short_name(), state.status.clone()))
            .collect()
    }

    fn type_name(response: &DeltaDiscoveryResponse) -> &'static str {
        remora_xds_proto::type_url::short_name(&response.type_url)
    }
}

impl DeltaStream {
    /// A stream with `core` (how the client connected, where its secrets
    /// come from).
    pub fn new(core: StreamCore) -> DeltaStream {
        DeltaStream {
            core,
            types: BTreeMap::new(),
        }
    }

    /// The response that brings the client from what it holds to `view`,
    /// or `None` when it already holds it (unless `always`: the first
    /// request of a type is always answered, so the client stops waiting).
    fn diff(
        &mut self,
        ty: ResourceType,
        view: &ClientResources,
        always: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let of_type = view.of(ty);
        let state = self.types.get_mut(&ty)?;
        let wanted = |name: &str| state.status.wildcard || state.names.contains(name);

        let resources: Vec<PbResource> = of_type
            .iter()
            .filter(|r| wanted(&r.name) && state.held.get(&r.name) != Some(&r.version))
            .map(|r| PbResource {
                name: r.name.clone(),
                version: r.version.clone(),
                resource: Some(r.any.clone()),
                ..Default::default()
            })
            .collect();
        let mut removed: BTreeSet<String> = state
            .held
            .keys()
            .filter(|name| !of_type.contains(name))
            .cloned()
            .collect();
        removed.extend(
            std::mem::take(&mut state.missing)
                .into_iter()
                .filter(|name| !of_type.contains(name)),
        );
        if resources.is_empty() && removed.is_empty() && !always {
            return None;
        }

        for r in &resources {
            state.held.insert(r.name.clone(), r.version.clone());
        }
        for name in &removed {
            state.held.remove(name);
        }
        let nonce = self.core.next_nonce();
        state.pending.insert(nonce, of_type.version.clone());
        // A client that never answers must not grow this without bound.
        while state.pending.len() > MAX_PENDING {
            state.pending.pop_first();
        }
        state.status.sent_version = Some(of_type.version.clone());
        state.status.sent_nonce = Some(nonce.to_string());
        Some(DeltaDiscoveryResponse {
            system_version_info: of_type.version.clone(),
            resources,
            type_url: ty.type_url().to_string(),
            removed_resources: removed.into_iter().collect(),
            nonce: nonce.to_string(),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::*;
    use crate::model::{Mesh, Protocol, Service};
    use remora_xds_proto::pb::envoy::config::core::v3::Node;
    use remora_xds_proto::pb::google::rpc::Status as RpcStatus;
    use std::sync::Arc;

    fn snapshot(services: Vec<Service>) -> Snapshot {
        Snapshot::new(
            Arc::new(Mesh::new("cluster.local".into(), services, Vec::new()).expect("valid")),
            0,
        )
    }

    fn two() -> Vec<Service> {
        vec![
            service("web", 80, Protocol::Http),
            service("api", 8080, Protocol::Http),
        ]
    }

    fn request(
        ty: ResourceType,
        subscribe: &[&str],
        unsubscribe: &[&str],
        nonce: &str,
    ) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(Node {
                id: "envoy-1".into(),
                ..Default::default()
            }),
            type_url: ty.type_url().into(),
            resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
        r.resources.iter().map(|r| r.name.as_str()).collect()
    }

    const WEB: &str = "outbound|80||web.default.svc.cluster.local";
    const API: &str = "outbound|8080||api.default.svc.cluster.local";

    #[test]
    fn wildcard_first_request_gets_everything_then_only_changes() {
        let mut s = DeltaStream::default();
        let out = s
            .on_request(
                request(ResourceType::Cluster, &[], &[], ""),
                &snapshot(two()),
            )
            .expect("ok");
        assert_eq!(names(&out.responses[0]), [API, WEB]);
        let nonce = out.responses[0].nonce.clone();
        let ack = s
            .on_request(
                request(ResourceType::Cluster, &[], &[], &nonce),
                &snapshot(two()),
            )
            .expect("ok");
        assert!(ack.responses.is_empty());
        assert!(
            s.status().expect("client").types["CDS"]
                .acked_version
                .is_some()
        );

        let mut changed = two();
        changed[1].connect_timeout = std::time::Duration::from_secs(5);
        let pushed = s.on_snapshot(&snapshot(changed)).expect("ok");
        assert_eq!(pushed.len(), 1);
        assert_eq!(names(&pushed[0]), [API], "only the changed cluster");
        assert!(pushed[0].removed_resources.is_empty());

        let removed = s
            .on_snapshot(&snapshot(vec![service("web", 80, Protocol::Http)]))
            .expect("ok");
        assert!(removed[0].resources.is_empty());
        assert_eq!(removed[0].removed_resources, [API]);
    }

    #[test]
    fn initial_versions_on_reconnect_skip_what_the_client_already_has() {
        let snap = snapshot(two());
        let mut first = DeltaStream::default();
        let r = first
            .on_request(request(ResourceType::Cluster, &[], &[], ""), &snap)
            .expect("ok")
            .responses
            .remove(0);
        let web_version = r
            .resources
            .iter()
            .find(|x| x.name == WEB)
            .expect("web")
            .version
            .clone();

        let mut s = DeltaStream::default();
        let mut req = request(ResourceType::Cluster, &[], &[], "");
        req.initial_resource_versions = [
            (WEB.to_string(), web_version),
            ("gone".to_string(), "x".to_string()),
        ]
        .into();
        let out = s.on_request(req, &snap).expect("ok");
        assert_eq!(names(&out.responses[0]), [API]);
        assert_eq!(out.responses[0].removed_resources, ["gone"]);
    }

    #[test]
    fn named_subscriptions_unsubscribe_and_missing_names() {
        let snap = snapshot(two());
        let mut s = DeltaStream::default();
        let out = s
            .on_request(
                request(ResourceType::Endpoint, &[WEB, "nope"], &[], ""),
                &snap,
            )
            .expect("ok");
        assert_eq!(names(&out.responses[0]), [WEB]);
        assert_eq!(
            out.responses[0].removed_resources,
            ["nope"],
            "told once that it does not exist"
        );
        let nonce = out.responses[0].nonce.clone();
        let out = s
            .on_request(
                request(ResourceType::Endpoint, &[API], &[WEB], &nonce),
                &snap,
            )
            .expect("ok");
        assert_eq!(names(&out.responses[0]), [API]);
        assert!(out.responses[0].removed_resources.is_empty());
        // WEB was forgotten: re-subscribing sends it again.
        let nonce = out.responses[0].nonce.clone();
        let out = s
            .on_request(request(ResourceType::Endpoint, &[WEB], &[], &nonce), &snap)
            .expect("ok");
        assert_eq!(names(&out.responses[0]), [WEB]);
    }

    #[test]
    fn a_nack_is_recorded_and_not_answered_with_the_same_resources() {
        let snap = snapshot(two());
        let mut s = DeltaStream::default();
        let r = s
            .on_request(request(ResourceType::Cluster, &[], &[], ""), &snap)
            .expect("ok")
            .responses
            .remove(0);
        let mut req = request(ResourceType::Cluster, &[], &[], &r.nonce);
        req.error_detail = Some(RpcStatus {
            code: 3,
            message: "no".into(),
            ..Default::default()
        });
        let out = s.on_request(req, &snap).expect("ok");
        assert!(out.responses.is_empty());
        assert_eq!(out.nack, Some((ResourceType::Cluster, "no".into())));
        assert!(s.on_snapshot(&snap).expect("ok").is_empty());
        let status = s.status().expect("client");
        assert_eq!(status.types["CDS"].nacks, 1);
        assert_eq!(status.api, "delta");
    }

    #[test]
    fn an_empty_wildcard_type_is_still_answered() {
        let mut s = DeltaStream::default();
        let out = s
            .on_request(
                request(ResourceType::Listener, &[], &[], ""),
                &snapshot(Vec::new()),
            )
            .expect("ok");
        assert_eq!(
            out.responses.len(),
            1,
            "the client must not wait for its initial fetch"
        );
    }
}

//! The state-of-the-world ADS stream, as a state machine without sockets.
//!
//! Per type it remembers the subscription, the last response (version and
//! nonce), the last ACKed version and the last NACK. Rules (from the xDS
//! protocol, and from what Envoy and gRPC do):
//! - a request whose `response_nonce` is not the last one sent for its type
//!   is stale and ignored (an empty nonce is never stale: gRPC sends
//!   subscription changes with one);
//! - ACK and NACK are told apart by `error_detail`, never by version;
//! - a request whose subscribed names differ from the known ones (or the
//!   first of its type) is always answered;
//! - a mesh change sends each subscribed type whose version changed, in
//!   make-before-break order; a version the client rejected is not sent
//!   again until something changes.

use std::collections::{BTreeMap, BTreeSet};

use remora_xds_proto::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::ClientResources;
use super::status::TypeStatus;
use super::{Outcome, StreamCore, StreamError, StreamMachine};
use crate::translate::{ResourceType, SECRET_DEFAULT};
use crate::xds::snapshot::Snapshot;

/// One SotW stream.
#[derive(Debug, Default)]
pub struct SotwStream {
    core: StreamCore,
    types: BTreeMap<ResourceType, TypeState>,
}

#[derive(Debug, Default)]
struct TypeState {
    names: BTreeSet<String>,
    status: TypeStatus,
}

impl StreamMachine for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const API: &'static str = "sotw";

    /// Handles one request against the current snapshot.
    fn on_request(
        &mut self,
        request: DiscoveryRequest,
        snapshot: &Snapshot,
    ) -> Result<Outcome<DiscoveryResponse>, StreamError> {
        self.core.identify(request.node.as_ref(), snapshot)?;
        let Some(ty) = ResourceType::from_type_url(&request.type_url) else {
            return Err(StreamError::UnknownType(request.type_url));
        };
        let first = !self.types.contains_key(&ty);
        let state = self.types.entry(ty).or_default();
        let mut outcome = Outcome::new();

        if !request.response_nonce.is_empty()
            && state.status.sent_nonce.as_deref() != Some(request.response_nonce.as_str())
        {
            tracing::debug!(%ty, nonce = request.response_nonce, "stale nonce, ignored");
            return Ok(outcome);
        }
        if !request.response_nonce.is_empty() {
            outcome.nack = state
                .status
                .record_answer(request.version_info.clone(), request.error_detail.as_ref())
                .map(|message| (ty, message));
        }

        let names: BTreeSet<String> = request.resource_names.into_iter().collect();
        let wildcard = names.contains("*") || (names.is_empty() && ty.wildcard_by_default());
        let changed = first || names != state.names || wildcard != state.status.wildcard;
        state.names = names;
        state.status.wildcard = wildcard;
        state.status.subscribed = if wildcard { 0 } else { state.names.len() };
        if ty == ResourceType::Secret {
            let wants_default = wildcard || state.names.contains(SECRET_DEFAULT);
            self.core.secrets_requested(wants_default, snapshot);
        }
        if changed {
            let view = self.core.view(snapshot)?;
            let response = self.respond(ty, &view);
            outcome.responses.push(response);
        }
        Ok(outcome)
    }

    /// Sends every subscribed type whose content changed in `snapshot`.
    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Result<Vec<DiscoveryResponse>, StreamError> {
        if self.core.client.is_none() {
            return Ok(Vec::new());
        }
        let view = self.core.view(snapshot)?;
        let due: Vec<ResourceType> = self
            .types
            .iter()
            .filter(|(ty, state)| {
                state.status.sent_version.as_deref() != Some(view.of(**ty).version.as_str())
            })
            .map(|(ty, _)| *ty)
            .collect();
        Ok(due.into_iter().map(|ty| self.respond(ty, &view)).collect())
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

    fn type_name(response: &DiscoveryResponse) -> &'static str {
        remora_xds_proto::type_url::short_name(&response.type_url)
    }
}

impl SotwStream {
    /// A stream with `core` (how the client connected, where its secrets
    /// come from).
    pub fn new(core: StreamCore) -> SotwStream {
        SotwStream {
            core,
            types: BTreeMap::new(),
        }
    }

    fn respond(&mut self, ty: ResourceType, view: &ClientResources) -> DiscoveryResponse {
        let nonce = self.core.next_nonce().to_string();
        let of_type = view.of(ty);
        let state = self.types.entry(ty).or_default();
        let resources = if state.status.wildcard {
            of_type.resources.values().map(|r| r.any.clone()).collect()
        } else {
            state
                .names
                .iter()
                .filter_map(|n| of_type.resources.get(n))
                .map(|r| r.any.clone())
                .collect()
        };
        state.status.sent_version = Some(of_type.version.clone());
        state.status.sent_nonce = Some(nonce.clone());
        DiscoveryResponse {
            version_info: of_type.version.clone(),
            resources,
            type_url: ty.type_url().to_string(),
            nonce,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::*;
    use crate::model::{Mesh, Protocol};
    use remora_xds_proto::pb::envoy::config::core::v3::Node;
    use remora_xds_proto::pb::google::rpc::Status as RpcStatus;
    use std::sync::Arc;

    fn snapshot(endpoint_port: u16) -> Snapshot {
        let mut web = service("web", 80, Protocol::Http);
        web.endpoints[0].port = Some(endpoint_port);
        let mesh = Mesh::new("cluster.local".into(), vec![web], Vec::new()).expect("valid");
        Snapshot::new(Arc::new(mesh), 0)
    }

    fn request(ty: ResourceType, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            node: Some(Node {
                id: "sidecar-1".into(),
                ..Default::default()
            }),
            type_url: ty.type_url().into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn nack(ty: ResourceType, version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            error_detail: Some(RpcStatus {
                code: 3,
                message: "bad cluster".into(),
                ..Default::default()
            }),
            ..request(ty, &[], version, nonce)
        }
    }

    const CLUSTER: &str = "outbound|80||web.default.svc.cluster.local";

    #[test]
    fn first_request_is_answered_and_an_ack_is_recorded_without_a_response() {
        let snap = snapshot(9000);
        let mut s = SotwStream::default();
        let out = s
            .on_request(request(ResourceType::Cluster, &[], "", ""), &snap)
            .expect("ok");
        assert_eq!(out.responses.len(), 1);
        let r = &out.responses[0];
        assert_eq!(r.resources.len(), 1, "wildcard CDS gets every cluster");
        assert!(!r.version_info.is_empty() && !r.nonce.is_empty());

        let ack = s
            .on_request(
                request(ResourceType::Cluster, &[], &r.version_info, &r.nonce),
                &snap,
            )
            .expect("ok");
        assert!(ack.responses.is_empty() && ack.nack.is_none());
        let status = s.status().expect("known client");
        assert_eq!(status.node_id, "sidecar-1");
        assert_eq!(
            status.types["CDS"].acked_version.as_deref(),
            Some(r.version_info.as_str())
        );
    }

    #[test]
    fn a_nack_is_recorded_and_the_rejected_version_is_not_sent_again() {
        let snap = snapshot(9000);
        let mut s = SotwStream::default();
        let r = s
            .on_request(request(ResourceType::Cluster, &[], "", ""), &snap)
            .expect("ok")
            .responses
            .remove(0);
        let out = s
            .on_request(
                nack(ResourceType::Cluster, &r.version_info, &r.nonce),
                &snap,
            )
            .expect("ok");
        assert!(
            out.responses.is_empty(),
            "no resend of the rejected version"
        );
        assert_eq!(
            out.nack,
            Some((ResourceType::Cluster, "bad cluster".into()))
        );
        let status = s.status().expect("client");
        assert_eq!(status.types["CDS"].nacks, 1);
        assert_eq!(
            status.types["CDS"]
                .last_nack
                .as_ref()
                .map(|n| n.version.as_str()),
            Some(r.version_info.as_str())
        );
        assert_eq!(status.types["CDS"].acked_version, None);

        // Same snapshot again (e.g. an unrelated wakeup): nothing to send.
        assert!(s.on_snapshot(&snap).expect("ok").is_empty());
        // A real change is sent.
        let changed = s.on_snapshot(&snapshot(9001)).expect("ok");
        assert_eq!(changed.len(), 0, "endpoint change does not touch CDS");
    }

    #[test]
    fn stale_nonces_are_ignored_even_with_new_names() {
        let snap = snapshot(9000);
        let mut s = SotwStream::default();
        let first = s
            .on_request(request(ResourceType::Endpoint, &[CLUSTER], "", ""), &snap)
            .expect("ok");
        assert_eq!(first.responses[0].resources.len(), 1);
        let stale = s
            .on_request(
                request(ResourceType::Endpoint, &["other"], "v0", "999"),
                &snap,
            )
            .expect("ok");
        assert!(stale.responses.is_empty());
        assert!(stale.nack.is_none());
        assert_eq!(s.status().expect("client").types["EDS"].subscribed, 1);
    }

    #[test]
    fn changed_names_are_answered_even_with_an_empty_nonce() {
        let snap = snapshot(9000);
        let mut s = SotwStream::default();
        let r = s
            .on_request(request(ResourceType::Endpoint, &[CLUSTER], "", ""), &snap)
            .expect("ok")
            .responses
            .remove(0);
        // Same names, ACK: nothing.
        assert!(
            s.on_request(
                request(
                    ResourceType::Endpoint,
                    &[CLUSTER],
                    &r.version_info,
                    &r.nonce
                ),
                &snap
            )
            .expect("ok")
            .responses
            .is_empty()
        );
        // gRPC style: new names, empty nonce.
        let out = s
            .on_request(
                request(
                    ResourceType::Endpoint,
                    &[CLUSTER, "missing"],
                    &r.version_info,
                    "",
                ),
                &snap,
            )
            .expect("ok");
        assert_eq!(out.responses.len(), 1);
        assert_eq!(
            out.responses[0].resources.len(),
            1,
            "only existing names are sent"
        );
        // Unsubscribing everything is answered with an empty set.
        let r2 = &out.responses[0];
        let out = s
            .on_request(
                request(ResourceType::Endpoint, &[], &r2.version_info, &r2.nonce),
                &snap,
            )
            .expect("ok");
        assert_eq!(out.responses.len(), 1);
        assert!(
            out.responses[0].resources.is_empty(),
            "EDS is never wildcard"
        );
    }

    #[test]
    fn mesh_changes_push_changed_types_in_make_before_break_order() {
        let snap = snapshot(9000);
        let mut s = SotwStream::default();
        for ty in [
            ResourceType::Route,
            ResourceType::Listener,
            ResourceType::Endpoint,
            ResourceType::Cluster,
        ] {
            let names: &[&str] = match ty {
                ResourceType::Endpoint => &[CLUSTER],
                ResourceType::Route => &["outbound", "80"],
                _ => &[],
            };
            s.on_request(request(ty, names, "", ""), &snap).expect("ok");
        }
        assert!(s.on_snapshot(&snap).expect("ok").is_empty());

        let mut web = service("web", 80, Protocol::Http);
        web.endpoints[0].port = Some(9001);
        web.connect_timeout = std::time::Duration::from_secs(3);
        web.routes = vec![route("r", vec![backend("web", 1)])];
        let changed = Snapshot::new(
            Arc::new(Mesh::new("cluster.local".into(), vec![web], Vec::new()).expect("valid")),
            1,
        );
        let types: Vec<String> = s
            .on_snapshot(&changed)
            .expect("ok")
            .iter()
            .map(|r| r.type_url.clone())
            .collect();
        assert_eq!(
            types,
            [
                ResourceType::Cluster,
                ResourceType::Endpoint,
                ResourceType::Route
            ]
            .map(|t| t.type_url().to_string())
        );
    }

    #[test]
    fn a_reconnect_with_a_known_version_gets_the_current_state() {
        let snap = snapshot(9000);
        let mut old = SotwStream::default();
        let r = old
            .on_request(request(ResourceType::Cluster, &[], "", ""), &snap)
            .expect("ok")
            .responses
            .remove(0);
        let mut s = SotwStream::default();
        let out = s
            .on_request(
                request(ResourceType::Cluster, &[], &r.version_info, ""),
                &snap,
            )
            .expect("ok");
        assert_eq!(out.responses.len(), 1);
        assert_eq!(
            out.responses[0].version_info, r.version_info,
            "same content, same version across streams"
        );
    }

    #[test]
    fn the_first_request_must_name_the_node() {
        let mut s = SotwStream::default();
        let mut req = request(ResourceType::Cluster, &[], "", "");
        req.node = None;
        assert!(matches!(
            s.on_request(req, &snapshot(9000)),
            Err(StreamError::NoNode)
        ));
        let mut req = request(ResourceType::Cluster, &[], "", "");
        req.type_url = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig".into();
        assert!(matches!(
            s.on_request(req, &snapshot(9000)),
            Err(StreamError::UnknownType(_))
        ));
    }
}

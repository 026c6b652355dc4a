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
//!   again until something changes;
//! - LDS and CDS responses carry every subscribed resource (the protocol
//!   requires it), and so do SDS responses (two small secrets); EDS and RDS
//!   responses carry only what the client lacks: resources whose content
//!   changed since the last response, and those it newly subscribed to (as
//!   the xDS protocol allows, and Envoy and gRPC apply them one by one).
//!   After a NACK, and after the clusters (for EDS) or listeners (for RDS)
//!   changed, the next response is whole again.
//!
//! Responses are [`SotwResponse`]s: the resources in them are encoded once
//! per snapshot ([`crate::translate::Resource::encoded`]) and shared by
//! every stream they are sent on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use remora_xds_proto::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::ClientResources;
use super::names::{self, Names};
use super::status::TypeStatus;
use super::{Outcome, StreamCore, StreamError, StreamMachine};
use crate::translate::{Batch, Resource, ResourceType, SECRET_DEFAULT, TypeResources};
use crate::xds::snapshot::Snapshot;

/// One SotW stream.
#[derive(Debug, Default)]
pub struct SotwStream {
    core: StreamCore,
    types: BTreeMap<ResourceType, TypeState>,
}

#[derive(Debug, Default)]
struct TypeState {
    /// Subscribed names (shared with every stream that subscribes to the
    /// same ones).
    names: Names,
    status: TypeStatus,
    /// EDS and RDS only: what the client holds, as of the last response
    /// (the type's resources then, and the names subscribed then). None
    /// before the first response and after a NACK.
    holds: Option<Held>,
}

#[derive(Debug)]
struct Held {
    resources: TypeResources,
    names: Names,
    wildcard: bool,
}

/// One state-of-the-world response, ready to frame: its own small fields,
/// and its resources as encoded buffers shared with other responses.
#[derive(Debug, Clone)]
pub struct SotwResponse {
    /// The type's version.
    pub version_info: String,
    /// The type URL.
    pub type_url: &'static str,
    /// This response's nonce.
    pub nonce: String,
    /// How many resources it carries.
    pub count: usize,
    /// The encoded `resources` field, in pieces.
    pieces: Vec<Bytes>,
}

impl SotwResponse {
    /// The response as a gRPC message (length-prefixed, uncompressed), in
    /// buffers: a small one of its own, then the shared resources.
    pub fn into_grpc_frames(self) -> impl Iterator<Item = Bytes> {
        let fields = DiscoveryResponse {
            version_info: self.version_info,
            type_url: self.type_url.to_string(),
            nonce: self.nonce,
            ..Default::default()
        };
        let len = fields.encoded_len() + self.pieces.iter().map(Bytes::len).sum::<usize>();
        let mut head = BytesMut::with_capacity(5 + fields.encoded_len());
        head.put_u8(0);
        // A response larger than 4 GiB cannot be framed; the gRPC limits
        // of every client are far below that.
        head.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
        fields.encode_raw(&mut head);
        std::iter::once(head.freeze()).chain(self.pieces)
    }

    /// The response as a client decodes it.
    #[cfg(test)]
    pub fn decode(&self) -> DiscoveryResponse {
        let mut buf = BytesMut::new();
        for piece in &self.pieces {
            buf.extend_from_slice(piece);
        }
        let mut response =
            DiscoveryResponse::decode(buf.freeze()).unwrap_or_else(|e| panic!("encoded here: {e}"));
        response.version_info.clone_from(&self.version_info);
        response.type_url = self.type_url.to_string();
        response.nonce.clone_from(&self.nonce);
        response
    }
}

impl StreamMachine for SotwStream {
    type Request = DiscoveryRequest;
    type Response = SotwResponse;
    const API: &'static str = "sotw";

    /// Handles one request against the current snapshot.
    fn on_request(
        &mut self,
        request: DiscoveryRequest,
        snapshot: &Snapshot,
    ) -> Result<Outcome<SotwResponse>, StreamError> {
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
            if outcome.nack.is_some() {
                state.holds = None;
            }
        }

        let requested: BTreeSet<String> = request.resource_names.into_iter().collect();
        let wildcard =
            requested.contains("*") || (requested.is_empty() && ty.wildcard_by_default());
        let changed = first || *state.names != requested || wildcard != state.status.wildcard;
        if changed {
            state.names = names::intern(requested);
        }
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
    fn on_snapshot(&mut self, snapshot: &Snapshot) -> Result<Vec<SotwResponse>, StreamError> {
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
        // A changed cluster or listener is rebuilt by the client, which
        // then wants its endpoints or routes again: after CDS or LDS,
        // EDS and RDS go whole (as Istio does on a full push).
        for (before, after) in [
            (ResourceType::Cluster, ResourceType::Endpoint),
            (ResourceType::Listener, ResourceType::Route),
        ] {
            if due.contains(&before)
                && let Some(state) = self.types.get_mut(&after)
            {
                state.holds = None;
            }
        }
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

    fn type_name(response: &SotwResponse) -> &'static str {
        remora_xds_proto::type_url::short_name(response.type_url)
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

    fn respond(&mut self, ty: ResourceType, view: &ClientResources) -> SotwResponse {
        let nonce = self.core.next_nonce().to_string();
        let of_type = view.of(ty);
        let state = self.types.entry(ty).or_default();
        let wildcard = state.status.wildcard;
        let names = &state.names;
        let subscribed = |r: &Resource| wildcard || names.contains(&r.name);
        let mut out = Pieces::default();
        // EDS and RDS carry what the client lacks; the others go whole.
        let partial = matches!(ty, ResourceType::Endpoint | ResourceType::Route);
        match state.holds.as_ref() {
            Some(held) => {
                let held_subscribed = |r: &Resource| held.wildcard || held.names.contains(&r.name);
                // Changed content of what it subscribed to before and now:
                // usually one shared batch for every client.
                let (batch, own) = of_type.changed_since(&held.resources);
                if let Some(batch) = batch {
                    let covers =
                        |names: &Names, wildcard: bool| wildcard || batch.covered_by(names);
                    if covers(names, wildcard) && covers(&held.names, held.wildcard) {
                        out.batch(&batch);
                    } else {
                        let shared = of_type.shared();
                        for r in batch.names().iter().filter_map(|n| shared.get(n)) {
                            if held_subscribed(r) && subscribed(r) {
                                out.push(r);
                            }
                        }
                    }
                }
                for r in own {
                    if held_subscribed(r) && subscribed(r) {
                        out.push(r);
                    }
                }
                // What it subscribed to since, as it is now.
                if held.wildcard != wildcard || !Arc::ptr_eq(&held.names, names) {
                    let newly = |r: &&Resource| !held_subscribed(r);
                    if wildcard {
                        of_type.iter().filter(newly).for_each(|r| out.push(r));
                    } else {
                        let named = names.iter().filter_map(|n| of_type.get(n));
                        named.filter(newly).for_each(|r| out.push(r));
                    }
                }
            }
            None => {
                let all = of_type.shared().all();
                if wildcard || all.covered_by(names) {
                    // All of it (EDS by name commonly names every cluster):
                    // the shared part in one buffer for every client.
                    out.batch(all);
                    of_type
                        .own()
                        .filter(|r| subscribed(r))
                        .for_each(|r| out.push(r));
                } else {
                    let named = names.iter().filter_map(|n| of_type.get(n));
                    named.for_each(|r| out.push(r));
                }
            }
        }
        state.holds = partial.then(|| Held {
            resources: of_type.clone(),
            names: state.names.clone(),
            wildcard,
        });
        state.status.sent_version = Some(of_type.version.clone());
        state.status.sent_nonce = Some(nonce.clone());
        SotwResponse {
            version_info: of_type.version.clone(),
            type_url: ty.type_url(),
            nonce,
            count: out.count,
            pieces: out.bytes,
        }
    }
}

/// The encoded resources of a response being built.
#[derive(Default)]
struct Pieces {
    bytes: Vec<Bytes>,
    count: usize,
}

impl Pieces {
    fn push(&mut self, resource: &Resource) {
        self.bytes.push(resource.encoded.clone());
        self.count += 1;
    }

    fn batch(&mut self, batch: &Batch) {
        if !batch.is_empty() {
            self.bytes.push(batch.encoded());
            self.count += batch.len();
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
        assert_eq!(r.count, 1, "wildcard CDS gets every cluster");
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
        assert_eq!(first.responses[0].count, 1);
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
            out.responses[0].count, 0,
            "what the client holds is not sent again, and missing names are not sent"
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
        assert!(out.responses[0].count == 0, "EDS is never wildcard");
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
            .map(|r| r.type_url.to_string())
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

    /// Two services, `web` and `api`, with these endpoint ports.
    fn two_services(web_port: u16, api_port: u16, generation: u64) -> Snapshot {
        let mut web = service("web", 80, Protocol::Http);
        web.endpoints[0].port = Some(web_port);
        let mut api = service("api", 80, Protocol::Http);
        api.endpoints[0].port = Some(api_port);
        let mesh = Mesh::new("cluster.local".into(), vec![web, api], Vec::new()).expect("valid");
        Snapshot::new(Arc::new(mesh), generation)
    }

    const API: &str = "outbound|80||api.default.svc.cluster.local";

    fn cla_names(r: &SotwResponse) -> Vec<String> {
        r.decode()
            .resources
            .iter()
            .map(|any| {
                remora_xds_proto::unpack::<
                    remora_xds_proto::pb::envoy::config::endpoint::v3::ClusterLoadAssignment,
                >(any)
                .expect("a CLA")
                .cluster_name
            })
            .collect()
    }

    /// Subscribes CDS wildcard and EDS to both clusters, and ACKs both.
    fn synced(snap: &Snapshot) -> SotwStream {
        let mut s = SotwStream::default();
        for (ty, names) in [
            (ResourceType::Cluster, &[][..]),
            (ResourceType::Endpoint, &[CLUSTER, API][..]),
        ] {
            let r = s
                .on_request(request(ty, names, "", ""), snap)
                .expect("ok")
                .responses
                .remove(0);
            assert_eq!(r.count, 2);
            s.on_request(request(ty, names, &r.version_info, &r.nonce), snap)
                .expect("ack");
        }
        s
    }

    #[test]
    fn an_endpoint_change_sends_only_the_assignment_that_changed() {
        let mut s = synced(&two_services(9000, 9100, 0));
        let pushed = s.on_snapshot(&two_services(9000, 9101, 1)).expect("ok");
        assert_eq!(pushed.len(), 1, "only EDS changed");
        assert_eq!(pushed[0].type_url, ResourceType::Endpoint.type_url());
        assert_eq!(cla_names(&pushed[0]), [API]);
        // The version is still the whole type's.
        let view = s.core.view(&two_services(9000, 9101, 1)).expect("view");
        assert_eq!(
            pushed[0].version_info,
            view.of(ResourceType::Endpoint).version
        );
    }

    #[test]
    fn after_a_nack_the_next_push_is_whole() {
        let mut s = synced(&two_services(9000, 9100, 0));
        let pushed = s.on_snapshot(&two_services(9000, 9101, 1)).expect("ok");
        let r = &pushed[0];
        s.on_request(
            DiscoveryRequest {
                resource_names: vec![CLUSTER.into(), API.into()],
                ..nack(ResourceType::Endpoint, &r.version_info, &r.nonce)
            },
            &two_services(9000, 9101, 1),
        )
        .expect("nack");
        let pushed = s.on_snapshot(&two_services(9000, 9102, 2)).expect("ok");
        assert_eq!(cla_names(&pushed[0]), [API, CLUSTER], "whole after a NACK");
    }

    #[test]
    fn a_cluster_change_sends_the_endpoints_whole_and_new_names_get_theirs() {
        let mut s = synced(&two_services(9000, 9100, 0));
        // web's cluster changes (connect timeout) and api's endpoints do.
        let mut web = service("web", 80, Protocol::Http);
        web.endpoints[0].port = Some(9000);
        web.connect_timeout = std::time::Duration::from_secs(7);
        let mut api = service("api", 80, Protocol::Http);
        api.endpoints[0].port = Some(9101);
        let mut extra = service("extra", 80, Protocol::Http);
        extra.endpoints[0].port = Some(9200);
        let mesh =
            Mesh::new("cluster.local".into(), vec![web, api, extra], Vec::new()).expect("valid");
        let snap = Snapshot::new(Arc::new(mesh), 1);
        let pushed = s.on_snapshot(&snap).expect("ok");
        let types: Vec<&str> = pushed.iter().map(|r| r.type_url).collect();
        assert_eq!(
            types,
            [
                ResourceType::Cluster.type_url(),
                ResourceType::Endpoint.type_url()
            ]
        );
        assert_eq!(
            cla_names(&pushed[1]),
            [API, CLUSTER],
            "after CDS, EDS is whole"
        );
        // The client subscribes to the new cluster too: only its
        // endpoints are sent.
        let extra_cluster = "outbound|80||extra.default.svc.cluster.local";
        let r = &pushed[1];
        let out = s
            .on_request(
                request(
                    ResourceType::Endpoint,
                    &[CLUSTER, API, extra_cluster],
                    &r.version_info,
                    &r.nonce,
                ),
                &snap,
            )
            .expect("ok");
        assert_eq!(cla_names(&out.responses[0]), [extra_cluster]);
    }

    #[test]
    fn framed_responses_decode_as_a_discovery_response() {
        let snap = two_services(9000, 9100, 0);
        let mut s = SotwStream::default();
        let r = s
            .on_request(
                request(ResourceType::Endpoint, &[CLUSTER, API], "", ""),
                &snap,
            )
            .expect("ok")
            .responses
            .remove(0);
        let expected = r.decode();
        let mut wire = Vec::new();
        for piece in r.into_grpc_frames() {
            wire.extend_from_slice(&piece);
        }
        assert_eq!(wire[0], 0, "not compressed");
        let len = u32::from_be_bytes([wire[1], wire[2], wire[3], wire[4]]) as usize;
        assert_eq!(len, wire.len() - 5);
        let decoded = DiscoveryResponse::decode(&wire[5..]).expect("decodes");
        assert_eq!(decoded, expected);
        assert_eq!(decoded.resources.len(), 2);
        assert_eq!(decoded.type_url, ResourceType::Endpoint.type_url());
        assert!(!decoded.nonce.is_empty() && !decoded.version_info.is_empty());
    }
}

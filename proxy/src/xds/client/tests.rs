//! The ADS protocol, driven by hand with the resources Remora's control
//! plane sends.

use std::path::Path;
use std::sync::Arc;

use remora_control_plane::translate::{
    self, DEFAULT_OUTBOUND_LISTENER, Flavor, ResourceType, Resources, View,
};
use remora_xds_proto::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use remora_xds_proto::pb::google::protobuf::Duration as PbDuration;
use remora_xds_proto::{pack, type_url, unpack};

use super::*;
use crate::metrics::Metrics;

const EXAMPLE: &str = include_str!("../../../../examples/mesh.yaml");
const CATALOG_V1: &str = "outbound|8080|v1|catalog.shop.svc.cluster.local";
const CATALOG_V2: &str = "outbound|8080|v2|catalog.shop.svc.cluster.local";

fn resources() -> Resources {
    let mesh = remora_control_plane::sources::file::parse(Path::new("mesh.yaml"), EXAMPLE)
        .expect("valid mesh");
    translate::translate(
        &mesh,
        &View {
            flavor: Flavor::Sidecar,
            outbound_listener: DEFAULT_OUTBOUND_LISTENER,
            inbound: None,
        },
    )
}

fn node() -> Node {
    Node {
        id: "sidecar-1".into(),
        user_agent_name: "remora-proxy".into(),
        ..Default::default()
    }
}

fn response(res: &Resources, ty: ResourceType, nonce: &str) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: res.of(ty).version.clone(),
        resources: res.of(ty).iter().map(|r| r.any.clone()).collect(),
        type_url: ty.type_url().into(),
        nonce: nonce.into(),
        ..Default::default()
    }
}

fn short(r: &DiscoveryRequest) -> &'static str {
    type_url::short_name(&r.type_url)
}

/// A client that received the whole example mesh, and the resources.
fn synced() -> (AdsClient, Resources) {
    let res = resources();
    let mut client = AdsClient::new(node());
    client.on_connect();
    for (i, ty) in [
        ResourceType::Cluster,
        ResourceType::Listener,
        ResourceType::Endpoint,
        ResourceType::Route,
    ]
    .into_iter()
    .enumerate()
    {
        let step = client.on_response(response(&res, ty, &i.to_string()), 1);
        assert!(step.rejected.is_none(), "{:?}", step.rejected);
    }
    (client, res)
}

#[test]
fn the_first_requests_subscribe_lds_and_cds_as_wildcards_with_the_node_once() {
    let mut client = AdsClient::new(node());
    let requests = client.on_connect();
    let types: Vec<&str> = requests.iter().map(short).collect();
    assert_eq!(types, ["CDS", "LDS"]);
    assert_eq!(
        requests[0].node.as_ref().map(|n| n.id.as_str()),
        Some("sidecar-1")
    );
    assert!(
        requests[1].node.is_none(),
        "the node goes on the first request only"
    );
    for r in &requests {
        assert!(r.resource_names.is_empty(), "wildcard");
        assert!(r.version_info.is_empty() && r.response_nonce.is_empty());
        assert!(r.error_detail.is_none());
    }
}

#[test]
fn responses_are_acked_and_dependent_types_subscribed() {
    let res = resources();
    let mut client = AdsClient::new(node());
    client.on_connect();

    let step = client.on_response(response(&res, ResourceType::Cluster, "n1"), 1);
    assert!(step.changed);
    assert_eq!(
        step.accepted,
        Some((None, res.of(ResourceType::Cluster).version.clone()))
    );
    let [ack, eds] = step.requests.as_slice() else {
        panic!("an ACK and an EDS subscription: {:?}", step.requests);
    };
    assert_eq!(short(ack), "CDS");
    assert_eq!(ack.version_info, res.of(ResourceType::Cluster).version);
    assert_eq!(ack.response_nonce, "n1");
    assert!(ack.error_detail.is_none() && ack.node.is_none());
    assert_eq!(short(eds), "EDS");
    let expected: Vec<String> = res
        .of(ResourceType::Endpoint)
        .names()
        .map(str::to_string)
        .collect();
    assert_eq!(eds.resource_names, expected);
    assert!(eds.version_info.is_empty() && eds.response_nonce.is_empty());

    let step = client.on_response(response(&res, ResourceType::Listener, "n2"), 1);
    let [ack, rds] = step.requests.as_slice() else {
        panic!("an ACK and an RDS subscription: {:?}", step.requests);
    };
    assert_eq!((short(ack), ack.response_nonce.as_str()), ("LDS", "n2"));
    assert_eq!(short(rds), "RDS");
    // The outbound table, and one per HTTP port for intercepted traffic.
    assert_eq!(rds.resource_names, ["80", "8080", "9090", "outbound"]);

    let step = client.on_response(response(&res, ResourceType::Endpoint, "n3"), 1);
    assert_eq!(step.requests.len(), 1, "just the ACK");
    assert_eq!(
        step.requests[0].resource_names, expected,
        "the ACK keeps the names"
    );
    let state = State::new(Arc::new(Metrics::new()));
    assert!(!client.build(&state).1, "routes still missing");

    let step = client.on_response(response(&res, ResourceType::Route, "n4"), 1);
    assert_eq!(step.requests.len(), 1);
    assert_eq!(
        step.requests[0].resource_names,
        ["80", "8080", "9090", "outbound"]
    );
    assert!(client.build(&state).1, "complete");

    let status = client.status();
    assert_eq!(
        status["RDS"].accepted_version.as_deref(),
        Some(res.of(ResourceType::Route).version.as_str())
    );
    assert_eq!(status["RDS"].last_nonce.as_deref(), Some("n4"));
    assert_eq!(status["RDS"].subscribed, ["80", "8080", "9090", "outbound"]);
    assert!(status["CDS"].wildcard && status["CDS"].last_nack.is_none());
    assert_eq!(status["CDS"].last_update, Some(1));
}

#[test]
fn a_nack_keeps_the_old_version_and_still_applies_the_valid_resources() {
    let (mut client, res) = synced();
    let old_version = res.of(ResourceType::Cluster).version.clone();
    let mut bad = response(&res, ResourceType::Cluster, "n9");
    bad.version_info = "v-new".into();
    for any in &mut bad.resources {
        let mut c: PbCluster = unpack(any).expect("cluster");
        if c.name == CATALOG_V1 {
            c.lb_policy = 3; // RANDOM
        }
        if c.name == CATALOG_V2 {
            c.connect_timeout = Some(PbDuration {
                seconds: 7,
                nanos: 0,
            });
        }
        *any = pack(&c);
    }
    let step = client.on_response(bad, 50);
    let [nack] = step.requests.as_slice() else {
        panic!("one NACK: {:?}", step.requests);
    };
    assert_eq!(nack.version_info, old_version, "the last accepted version");
    assert_eq!(nack.response_nonce, "n9");
    let detail = nack.error_detail.as_ref().expect("error_detail");
    assert_eq!(detail.code, 3);
    assert_eq!(
        detail.message,
        format!(
            "Cluster {CATALOG_V1:?}: lb_policy: RANDOM is not supported (only ROUND_ROBIN, \
             LEAST_REQUEST)"
        )
    );
    assert!(step.accepted.is_none());
    assert!(step.changed, "the valid change applies");
    let rejected = step.rejected.expect("rejected");
    assert_eq!(rejected.version, "v-new");
    assert_eq!(rejected.at, 50);

    let state = State::new(Arc::new(Metrics::new()));
    let (config, complete) = client.build(&state);
    assert!(complete);
    assert_eq!(
        config.clusters[CATALOG_V2].connect_timeout,
        std::time::Duration::from_secs(7)
    );
    assert_eq!(
        config.clusters[CATALOG_V1].lb_policy,
        crate::config::LbPolicy::LeastRequest,
        "the rejected cluster keeps its accepted form"
    );
    assert_eq!(config.versions["CDS"], old_version);
    let status = client.status();
    let last = status["CDS"].last_nack.as_ref().expect("recorded");
    assert_eq!(last.version, "v-new");
    assert_eq!(
        status["CDS"].accepted_version.as_deref(),
        Some(old_version.as_str())
    );
}

#[test]
fn a_removed_cluster_shrinks_the_eds_subscription() {
    let (mut client, res) = synced();
    let mut fewer = response(&res, ResourceType::Cluster, "n9");
    fewer.version_info = "v-fewer".into();
    fewer.resources.retain(|any| {
        unpack::<PbCluster>(any)
            .map(|c| c.name != CATALOG_V1)
            .unwrap_or(true)
    });
    let step = client.on_response(fewer, 2);
    let [ack, eds] = step.requests.as_slice() else {
        panic!("an ACK and a new EDS subscription: {:?}", step.requests);
    };
    assert_eq!(ack.version_info, "v-fewer");
    assert_eq!(short(eds), "EDS");
    assert!(!eds.resource_names.iter().any(|n| n == CATALOG_V1));
    assert_eq!(
        eds.resource_names.len(),
        res.of(ResourceType::Endpoint).len() - 1
    );
    // The EDS request carries that type's last version and nonce.
    assert_eq!(eds.version_info, res.of(ResourceType::Endpoint).version);
    assert_eq!(eds.response_nonce, "2");
    let state = State::new(Arc::new(Metrics::new()));
    let (config, complete) = client.build(&state);
    assert!(!config.clusters.contains_key(CATALOG_V1));
    assert!(!complete, "a route names the removed cluster");
}

#[test]
fn a_reconnect_resends_every_subscription_with_the_accepted_versions() {
    let (mut client, res) = synced();
    let requests = client.on_connect();
    let summary: Vec<(&str, &str, usize)> = requests
        .iter()
        .map(|r| (short(r), r.version_info.as_str(), r.resource_names.len()))
        .collect();
    assert_eq!(
        summary,
        [
            ("CDS", res.of(ResourceType::Cluster).version.as_str(), 0),
            (
                "EDS",
                res.of(ResourceType::Endpoint).version.as_str(),
                res.of(ResourceType::Endpoint).len()
            ),
            ("LDS", res.of(ResourceType::Listener).version.as_str(), 0),
            ("RDS", res.of(ResourceType::Route).version.as_str(), 4),
        ]
    );
    assert!(
        requests.iter().all(|r| r.response_nonce.is_empty()),
        "a new stream"
    );
    assert!(requests[0].node.is_some());
    assert!(requests[1..].iter().all(|r| r.node.is_none()));
    // The compiled state survived: still complete before any response.
    let state = State::new(Arc::new(Metrics::new()));
    assert!(client.build(&state).1);

    // The same versions again: ACKed, nothing changes.
    let step = client.on_response(response(&res, ResourceType::Cluster, "m1"), 3);
    assert!(!step.changed);
    assert_eq!(step.requests.len(), 1);
    assert!(step.requests[0].node.is_none());
}

#[test]
fn a_response_of_an_unknown_type_is_ignored() {
    let (mut client, _) = synced();
    let step = client.on_response(
        DiscoveryResponse {
            // Extension config discovery (ECDS): not consumed.
            type_url: "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig".into(),
            nonce: "x".into(),
            ..Default::default()
        },
        1,
    );
    assert!(step.requests.is_empty() && step.kind.is_none() && !step.changed);
}

#[test]
fn with_secrets_the_trust_bundle_is_asked_for_first() {
    let mut client = AdsClient::new(Node::default()).with_secrets([crate::config::compile::ROOTCA]);
    let requests = client.on_connect();
    assert_eq!(requests[0].type_url, type_url::SECRET);
    assert_eq!(requests[0].resource_names, ["ROOTCA"]);
    assert!(
        requests[0].node.is_some(),
        "the node goes on the first request"
    );
    assert!(
        requests
            .iter()
            .skip(1)
            .all(|r| r.type_url != type_url::SECRET)
    );
}

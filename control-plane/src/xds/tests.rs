//! SDS on the ADS stream and ADS on the TLS listener, without sockets.

use std::time::Duration;

use remora_xds_proto::pb::envoy::extensions::transport_sockets::tls::v3::Secret as PbSecret;
use remora_xds_proto::pb::google::protobuf::{Struct, Value, value::Kind};
use remora_xds_proto::unpack;

use super::sotw::SotwResponse;
use super::*;
use crate::ca::Ca;
use crate::model::fixtures::*;
use crate::model::{Mesh, Protocol, WorkloadToken};
use crate::translate::{META_GENERATOR, SECRET_ROOTCA};

const TOKEN: &str = "0123456789abcdef-web";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn source(ttl: Duration, metrics: &Metrics) -> Arc<SecretSource> {
    let dir = std::env::temp_dir().join(format!(
        "remora-xds-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = Ca::load_or_create(&dir, "cluster.local");
    let _ = std::fs::remove_dir_all(&dir);
    let ca = Arc::new(ca.unwrap_or_else(|e| panic!("creating a CA: {e}")));
    Arc::new(SecretSource::new(ca, ttl, metrics))
}

fn snapshot() -> Snapshot {
    let mesh = Mesh::new(
        "cluster.local".into(),
        vec![service("web", 80, Protocol::Http)],
        vec![WorkloadToken {
            identity: Identity {
                namespace: "shop".into(),
                service_account: "web".into(),
            },
            token: Secret::new(TOKEN),
        }],
    )
    .expect("valid");
    Snapshot::new(Arc::new(mesh), 0)
}

fn node(fields: &[(&str, &str)]) -> Node {
    Node {
        id: "web-1".into(),
        cluster: "web".into(),
        metadata: Some(Struct {
            fields: fields
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Value {
                            kind: Some(Kind::StringValue(v.to_string())),
                        },
                    )
                })
                .collect(),
        }),
        ..Default::default()
    }
}

fn web_node(token: Option<&str>) -> Node {
    let mut fields = vec![(META_NAMESPACE, "shop"), (META_SERVICE_ACCOUNT, "web")];
    if let Some(token) = token {
        fields.push((META_TOKEN, token));
    }
    node(&fields)
}

fn sds_request(node: Node, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(node),
        type_url: ResourceType::Secret.type_url().into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn secret_names(response: &SotwResponse) -> Vec<String> {
    let response = response.decode();
    response
        .resources
        .iter()
        .map(|any| unpack::<PbSecret>(any).expect("a Secret").name)
        .collect()
}

#[test]
fn sotw_sds_sends_rootca_and_default_to_a_node_with_its_token() {
    let metrics = Metrics::new();
    let snap = snapshot();
    let mut s = sotw::SotwStream::new(StreamCore::new(
        Transport::Plaintext,
        Some(source(Duration::from_secs(3600), &metrics)),
    ));
    let out = s
        .on_request(
            sds_request(web_node(Some(TOKEN)), &["default", "ROOTCA"], "", ""),
            &snap,
        )
        .expect("ok");
    assert_eq!(out.responses.len(), 1);
    assert_eq!(secret_names(&out.responses[0]), ["ROOTCA", "default"]);
    assert_eq!(metrics.ca_certificates_issued.get(), 1);
    assert!(s.core().secrets_due().is_some(), "re-issued at half-life");
}

#[test]
fn sotw_sds_without_proof_sends_rootca_only_and_unknown_names_are_absent() {
    let metrics = Metrics::new();
    let snap = snapshot();
    let mut s = sotw::SotwStream::new(StreamCore::new(
        Transport::Plaintext,
        Some(source(Duration::from_secs(3600), &metrics)),
    ));
    let out = s
        .on_request(
            sds_request(
                web_node(Some("0123456789abcdef-bad")),
                &["default", "ROOTCA", "other"],
                "",
                "",
            ),
            &snap,
        )
        .expect("ok");
    assert_eq!(secret_names(&out.responses[0]), [SECRET_ROOTCA]);
    assert_eq!(metrics.ca_certificates_issued.get(), 0);
    assert_eq!(
        metrics
            .ca_certificates_refused
            .with_label_values(&["unknown_token"])
            .get(),
        1
    );
    assert_eq!(s.core().secrets_due(), None, "not retried on this stream");
}

#[test]
fn the_workload_certificate_is_reissued_and_pushed_when_due() {
    let metrics = Metrics::new();
    let snap = snapshot();
    // 2 s certificates are re-issued after 1 s.
    let mut s = sotw::SotwStream::new(StreamCore::new(
        Transport::Plaintext,
        Some(source(Duration::from_secs(2), &metrics)),
    ));
    let first = s
        .on_request(
            sds_request(web_node(Some(TOKEN)), &["default", "ROOTCA"], "", ""),
            &snap,
        )
        .expect("ok")
        .responses
        .remove(0);
    s.core_mut().renew_secrets(&snap);
    assert!(s.on_snapshot(&snap).expect("ok").is_empty(), "not due yet");
    let due = s.core().secrets_due().expect("due at half-life");
    std::thread::sleep(due.saturating_duration_since(Instant::now()) + Duration::from_millis(20));
    s.core_mut().renew_secrets(&snap);
    let pushed = s.on_snapshot(&snap).expect("ok");
    assert_eq!(pushed.len(), 1);
    assert_eq!(pushed[0].type_url, ResourceType::Secret.type_url());
    assert_ne!(pushed[0].version_info, first.version_info);
    assert_eq!(secret_names(&pushed[0]), ["ROOTCA", "default"]);
    assert_eq!(metrics.ca_certificates_issued.get(), 2);
}

#[test]
fn delta_sds_sends_default_to_the_matching_tls_peer() {
    let metrics = Metrics::new();
    let snap = snapshot();
    let mut s = delta::DeltaStream::new(StreamCore::new(
        Transport::Tls {
            spiffe_id: WEB_ID.into(),
        },
        Some(source(Duration::from_secs(3600), &metrics)),
    ));
    let out = s
        .on_request(
            DeltaDiscoveryRequest {
                node: Some(web_node(None)),
                type_url: ResourceType::Secret.type_url().into(),
                resource_names_subscribe: vec!["default".into(), "ROOTCA".into()],
                ..Default::default()
            },
            &snap,
        )
        .expect("ok");
    let names: Vec<&str> = out.responses[0]
        .resources
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["ROOTCA", "default"]);
    assert_eq!(metrics.ca_certificates_issued.get(), 1);
}

#[test]
fn grpc_clients_get_no_secrets() {
    let metrics = Metrics::new();
    let snap = snapshot();
    let mut s = sotw::SotwStream::new(StreamCore::new(
        Transport::Plaintext,
        Some(source(Duration::from_secs(3600), &metrics)),
    ));
    let out = s
        .on_request(
            sds_request(node(&[(META_GENERATOR, "grpc")]), &["ROOTCA"], "", ""),
            &snap,
        )
        .expect("ok");
    assert!(out.responses[0].count == 0);
}

#[test]
fn on_the_tls_listener_the_node_must_claim_its_certificates_identity() {
    let tls = Transport::Tls {
        spiffe_id: WEB_ID.into(),
    };
    let ok = ClientInfo::from_node(Some(&web_node(None)), &tls, "cluster.local").expect("same");
    assert_eq!(ok.credentials.tls_peer.as_deref(), Some(WEB_ID));

    let other = node(&[(META_NAMESPACE, "shop"), (META_SERVICE_ACCOUNT, "admin")]);
    let err = ClientInfo::from_node(Some(&other), &tls, "cluster.local").expect_err("refused");
    let status = err.status();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status
            .message()
            .contains("spiffe://cluster.local/ns/shop/sa/admin")
            && status.message().contains(WEB_ID),
        "{}",
        status.message()
    );
    let anonymous = node(&[]);
    let err = ClientInfo::from_node(Some(&anonymous), &tls, "cluster.local").expect_err("refused");
    assert_eq!(err.status().code(), tonic::Code::PermissionDenied);

    // Plaintext: nodes are who they say.
    let plain = ClientInfo::from_node(Some(&other), &Transport::Plaintext, "cluster.local")
        .expect("plaintext");
    assert_eq!(plain.credentials.tls_peer, None);
}

#[test]
fn ads_on_the_tls_listener_needs_a_client_certificate() {
    let (_snap_tx, snapshots) = watch::channel(Arc::new(snapshot()));
    let (_stop_tx, stop) = watch::channel(false);
    let plain = AdsServer::new(
        snapshots,
        stop,
        Arc::new(Metrics::new()),
        Arc::new(SyncRegistry::default()),
    );
    let tls = plain.for_tls_listener();

    let mut request = Request::new(());
    assert_eq!(
        plain.transport(request.extensions()).ok(),
        Some(Transport::Plaintext)
    );
    let status = tls
        .transport(request.extensions())
        .expect_err("no certificate");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(status.message().contains("client certificate is required"));

    request.extensions_mut().insert(TlsPeer {
        remote_addr: None,
        spiffe_id: None,
    });
    assert!(
        tls.transport(request.extensions()).is_err(),
        "a connection without one"
    );
    request.extensions_mut().insert(TlsPeer {
        remote_addr: None,
        spiffe_id: Some(WEB_ID.into()),
    });
    assert_eq!(
        tls.transport(request.extensions()).ok(),
        Some(Transport::Tls {
            spiffe_id: WEB_ID.into()
        })
    );
}

//! The state-of-the-world ADS client as a state machine without sockets:
//! responses in, requests out, so every protocol rule is tested without a
//! control plane.
//!
//! Rules:
//! - LDS and CDS are wildcard subscriptions; RDS follows the route table
//!   the `outbound` listener names, EDS the assignments every cluster
//!   names, SDS the fixed names given at construction (the trust bundle). When those sets change a new request says so, carrying the
//!   type's last accepted version and last nonce.
//! - Every response is answered: an ACK carries its version; a NACK carries
//!   the last accepted version and an `error_detail` (code 3,
//!   INVALID_ARGUMENT) listing every rejected resource. The resources of a
//!   NACKed response that are valid still apply.
//! - The node goes only on the first request of each stream.
//! - A reconnect re-sends every subscription with the last accepted
//!   versions; the compiled state is never cleared.

use std::collections::{BTreeMap, BTreeSet};

use remora_xds_proto::pb::envoy::config::core::v3::Node;
use remora_xds_proto::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use remora_xds_proto::pb::google::rpc::Status as RpcStatus;
use serde::Serialize;

use crate::config::compile::{Compiler, ResourceKind};
use crate::config::{Config, State};

/// google.rpc.Code INVALID_ARGUMENT.
const INVALID_ARGUMENT: i32 = 3;

/// One rejected response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nack {
    /// Every rejected resource, one per line.
    pub message: String,
    /// The version that was rejected.
    pub version: String,
    /// When, in Unix seconds.
    pub at: u64,
}

/// What the client knows about one type, for `/config_dump`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TypeStatus {
    /// The last version accepted whole.
    pub accepted_version: Option<String>,
    /// The nonce of the last response on the current stream.
    pub last_nonce: Option<String>,
    /// True for a wildcard subscription (LDS, CDS).
    pub wildcard: bool,
    /// Subscribed names (RDS, EDS).
    pub subscribed: Vec<String>,
    /// The last rejected response.
    pub last_nack: Option<Nack>,
    /// Unix time of the last accepted response.
    pub last_update: Option<u64>,
}

#[derive(Debug, Default)]
struct TypeState {
    /// `None` until first subscribed; LDS and CDS hold an empty set
    /// (wildcard).
    subscribed: Option<BTreeSet<String>>,
    /// Last nonce received on this stream.
    nonce: String,
    last_nack: Option<Nack>,
    last_update: Option<u64>,
}

/// What handling one response produced.
#[derive(Debug, Default)]
pub struct Step {
    /// Requests to send, in order: the ACK or NACK first, then any
    /// subscription change.
    pub requests: Vec<DiscoveryRequest>,
    /// The response's type, when the client consumes it.
    pub kind: Option<ResourceKind>,
    /// The compiled state changed: build and publish a new config.
    pub changed: bool,
    /// Accepted: (previous version, new version).
    pub accepted: Option<(Option<String>, String)>,
    /// Rejected.
    pub rejected: Option<Nack>,
}

/// The ADS client's protocol state, across streams.
#[derive(Debug)]
pub struct AdsClient {
    node: Node,
    compiler: Compiler,
    /// Indexed by `ResourceKind as usize`.
    types: [TypeState; 5],
    node_sent: bool,
}

impl AdsClient {
    /// A client that presents `node`.
    pub fn new(node: Node) -> AdsClient {
        AdsClient {
            node,
            compiler: Compiler::new(),
            types: Default::default(),
            node_sent: false,
        }
    }

    /// Also subscribes to the secrets `names` (SDS), from the first stream.
    pub fn with_secrets<'a>(mut self, names: impl IntoIterator<Item = &'a str>) -> AdsClient {
        let names: BTreeSet<String> = names.into_iter().map(str::to_owned).collect();
        if !names.is_empty() {
            self.state_mut(ResourceKind::Secret).subscribed = Some(names);
        }
        self
    }

    /// A new stream is up: the requests that open it. LDS and CDS always;
    /// RDS and EDS when names are known from an earlier stream. Each
    /// carries the last accepted version so an unchanged control plane has
    /// nothing new to send.
    pub fn on_connect(&mut self) -> Vec<DiscoveryRequest> {
        self.node_sent = false;
        for state in &mut self.types {
            state.nonce.clear();
        }
        // Secrets, then clusters before listeners, as Envoy asks.
        let order = [
            ResourceKind::Secret,
            ResourceKind::Cluster,
            ResourceKind::Endpoint,
            ResourceKind::Listener,
            ResourceKind::Route,
        ];
        let mut requests = Vec::new();
        for kind in order {
            let state = self.state(kind);
            let names = match (&state.subscribed, kind.is_state_of_the_world()) {
                (_, true) => BTreeSet::new(),
                (Some(names), false) if !names.is_empty() => names.clone(),
                _ => continue,
            };
            self.state_mut(kind).subscribed = Some(names.clone());
            requests.push(self.request(kind, &names, None));
        }
        requests
    }

    /// Handles one response: applies it, answers it, and updates the
    /// dependent subscriptions.
    pub fn on_response(&mut self, response: DiscoveryResponse, now: u64) -> Step {
        let Some(kind) = ResourceKind::from_type_url(&response.type_url) else {
            tracing::warn!(
                type_url = response.type_url,
                "ignoring a response of a type the proxy does not consume"
            );
            return Step::default();
        };
        let previous = self.compiler.version(kind).map(str::to_string);
        self.state_mut(kind).nonce = response.nonce.clone();
        let subscribed = self.state(kind).subscribed.clone().unwrap_or_default();
        let applied = self.compiler.apply(
            kind,
            &response.version_info,
            &response.resources,
            &subscribed,
        );
        let mut step = Step {
            kind: Some(kind),
            changed: applied.changed,
            ..Step::default()
        };
        let error = if applied.errors.is_empty() {
            self.state_mut(kind).last_update = Some(now);
            step.accepted = Some((previous, response.version_info.clone()));
            None
        } else {
            let message = applied
                .errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n");
            let nack = Nack {
                message: message.clone(),
                version: response.version_info.clone(),
                at: now,
            };
            self.state_mut(kind).last_nack = Some(nack.clone());
            step.rejected = Some(nack);
            Some(RpcStatus {
                code: INVALID_ARGUMENT,
                message,
                details: Vec::new(),
            })
        };
        step.requests.push(self.request(kind, &subscribed, error));

        // What the listeners and clusters need may have changed.
        for (dependent, names) in [
            (ResourceKind::Route, self.compiler.route_names()),
            (ResourceKind::Endpoint, self.compiler.endpoint_names()),
        ] {
            let known = self.state(dependent).subscribed.as_ref();
            let unchanged = match known {
                Some(known) => *known == names,
                None => names.is_empty(),
            };
            if unchanged {
                continue;
            }
            self.state_mut(dependent).subscribed = Some(names.clone());
            if self.compiler.retain(dependent, &names) {
                step.changed = true;
            }
            step.requests.push(self.request(dependent, &names, None));
        }
        step
    }

    /// Assembles the current config; true when it is complete.
    pub fn build(&self, state: &State) -> (Config, bool) {
        self.compiler.build(state)
    }

    /// Per type (`LDS`, ...), what `/config_dump` shows.
    pub fn status(&self) -> BTreeMap<&'static str, TypeStatus> {
        ResourceKind::ALL
            .into_iter()
            .map(|kind| {
                let state = self.state(kind);
                let status = TypeStatus {
                    accepted_version: self.compiler.version(kind).map(str::to_string),
                    last_nonce: Some(state.nonce.clone()).filter(|n| !n.is_empty()),
                    wildcard: kind.is_state_of_the_world(),
                    subscribed: state.subscribed.iter().flatten().cloned().collect(),
                    last_nack: state.last_nack.clone(),
                    last_update: state.last_update,
                };
                (kind.short_name(), status)
            })
            .collect()
    }

    fn request(
        &mut self,
        kind: ResourceKind,
        names: &BTreeSet<String>,
        error_detail: Option<RpcStatus>,
    ) -> DiscoveryRequest {
        let node = if self.node_sent {
            None
        } else {
            self.node_sent = true;
            Some(self.node.clone())
        };
        DiscoveryRequest {
            version_info: self.compiler.version(kind).unwrap_or_default().to_string(),
            node,
            resource_names: names.iter().cloned().collect(),
            type_url: kind.type_url().to_string(),
            response_nonce: self.state(kind).nonce.clone(),
            error_detail,
            ..DiscoveryRequest::default()
        }
    }

    fn state(&self, kind: ResourceKind) -> &TypeState {
        // Four kinds, four slots.
        &self.types[kind as usize]
    }

    fn state_mut(&mut self, kind: ResourceKind) -> &mut TypeState {
        &mut self.types[kind as usize]
    }
}

#[cfg(test)]
mod tests;

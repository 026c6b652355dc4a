//! Sync status: per client and per type, what was sent, what was ACKed and
//! the last NACK. Served at `/debug/syncz`, like `istioctl proxy-status`.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// One client's status.
#[derive(Debug, Clone, Serialize)]
pub struct ClientStatus {
    /// Node id.
    pub node_id: String,
    /// Node cluster.
    pub node_cluster: String,
    /// `envoy`, `grpc` or `remora`.
    pub kind: &'static str,
    /// `sotw` or `delta`.
    pub api: &'static str,
    /// Seconds since the Unix epoch when the stream opened.
    pub connected_at: u64,
    /// By type short name (`CDS`, `EDS`, `LDS`, `RDS`).
    pub types: BTreeMap<&'static str, TypeStatus>,
}

/// Status of one resource type on one stream.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TypeStatus {
    /// Resources subscribed by name (0 with `wildcard`).
    pub subscribed: usize,
    /// Subscribed to everything.
    pub wildcard: bool,
    /// Version of the last response sent.
    pub sent_version: Option<String>,
    /// Nonce of the last response sent.
    pub sent_nonce: Option<String>,
    /// Last version the client ACKed.
    pub acked_version: Option<String>,
    /// NACKs received on this stream.
    pub nacks: u64,
    /// The most recent NACK.
    pub last_nack: Option<Nack>,
}

impl TypeStatus {
    /// Records the client's answer to a response that brought it to
    /// `version`: an ACK, or (with `error_detail`) a NACK, whose message is
    /// returned so the caller can log and count it.
    pub fn record_answer(
        &mut self,
        version: String,
        error_detail: Option<&remora_xds_proto::pb::google::rpc::Status>,
    ) -> Option<String> {
        match error_detail {
            Some(detail) => {
                self.nacks += 1;
                self.last_nack = Some(Nack {
                    version,
                    message: detail.message.clone(),
                    at: unix_now(),
                });
                Some(detail.message.clone())
            }
            None => {
                self.acked_version = Some(version);
                None
            }
        }
    }
}

/// A rejected response, as the client described it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Nack {
    /// The version the client rejected.
    pub version: String,
    /// The client's `error_detail.message`.
    pub message: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The status of every connected client, by stream id.
#[derive(Debug, Default)]
pub struct SyncRegistry {
    clients: Mutex<BTreeMap<u64, ClientStatus>>,
}

impl SyncRegistry {
    /// Records the latest status of stream `id`.
    pub fn update(&self, id: u64, status: ClientStatus) {
        self.lock().insert(id, status);
    }

    /// Forgets stream `id`.
    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Every client's status, ordered by node id.
    pub fn snapshot(&self) -> Vec<ClientStatus> {
        let mut all: Vec<ClientStatus> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        all
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ClientStatus>> {
        // Every update replaces a whole entry, so a poisoned map is still
        // consistent.
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

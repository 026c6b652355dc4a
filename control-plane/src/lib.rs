//! Remora's control plane.
//!
//! Sources fill the [`model`]; [`translate`] turns the model into Envoy xDS
//! resources, one view per kind of client; [`xds`] serves those views over
//! the Aggregated Discovery Service; [`ca`] issues workload certificates,
//! served with ADS on the [`tls`] listener; [`admin`] is the monitoring
//! listener.

pub mod admin;
pub mod ca;
pub mod metrics;
pub mod model;
pub mod server;
pub mod sources;
pub mod tls;
pub mod translate;
pub mod xds;

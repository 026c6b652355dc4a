//! Remora's control plane.
//!
//! Sources fill the [`model`]; [`translate`] turns the model into Envoy xDS
//! resources, one view per kind of client; [`xds`] serves those views over
//! the Aggregated Discovery Service; [`admin`] is the monitoring listener.

pub mod admin;
pub mod ca;
pub mod metrics;
pub mod model;
pub mod server;
pub mod sources;
pub mod translate;
pub mod xds;

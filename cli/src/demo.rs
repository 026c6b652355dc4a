//! `remora demo`: a whole mesh on one machine, with its golden signals live.
//!
//! In the order it happens: the demo applications start in this process
//! ([`apps`]); the control plane starts as a child process on the example
//! mesh, then one sidecar per application ([`process`]); the mesh file is
//! rewritten to point every demo service at its sidecar's inbound listener
//! ([`mesh`]) and the control plane reloads it; once `frontend`'s sidecar
//! routes to the demo's `catalog`, traffic starts ([`traffic`]) and every
//! second the sidecars' `/metrics` are scraped ([`signals`]) and shown as a
//! table ([`table`]). Ctrl-C or `--duration` stops the traffic, then the
//! children, and prints a summary. `docs/demo.md` is the user's guide.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::demo::apps::App;
use crate::demo::client::Client;
use crate::demo::process::{Child, ControlPlaneAddrs, SidecarAddrs};
use crate::demo::signals::{Scrape, Window};
use crate::demo::table::Screen;
use crate::demo::traffic::{ClientTotals, Traffic};

mod apps;
mod client;
mod mesh;
mod process;
mod signals;
mod table;
mod traffic;

/// `remora demo` flags.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// The mesh to start from. It must have `frontend.shop` and
    /// `catalog.shop` (subsets `v1` and `v2`), like the example; their
    /// endpoints are replaced by the demo's own. Default:
    /// `examples/mesh.yaml` if it exists under the current directory, else
    /// the copy of it built into `remora`.
    #[arg(long, value_name = "FILE")]
    mesh: Option<PathBuf>,
    /// Seconds of traffic before the demo stops by itself. Default: until
    /// Ctrl-C.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    duration: Option<u64>,
    /// Requests per second `frontend` sends to `catalog` (1 to 1000).
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rps: u32,
    /// Keep the temporary directory (mesh files, child logs) after a
    /// successful run; it is always kept when something fails.
    #[arg(long)]
    keep: bool,
}

/// How long each child has to write its address file.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the rewritten mesh has to reach `frontend`'s sidecar.
const ROUTED_TIMEOUT: Duration = Duration::from_secs(20);
/// Time a child has to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the table is refreshed.
const REFRESH: Duration = Duration::from_secs(1);
/// The host `frontend` addresses `catalog` by.
const CATALOG_HOST: &str = "catalog.shop";

/// Runs the demo; exit status 0 once it ran and stopped cleanly.
pub(crate) fn main(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("remora demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nremora demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let exe = std::env::current_exe()
        .context("cannot find the running `remora` executable to start the mesh's processes")?;
    let (mesh_text, mesh_source) = mesh::load(args.mesh.as_deref())?;
    let dir = make_temp_dir()?;
    println!("remora demo: working in {}", dir.display());

    let mut children = Vec::new();
    let outcome = run_in(&args, &exe, &dir, &mesh_text, &mesh_source, &mut children).await;
    // Every child is stopped whatever happened; their logs stay until then.
    let stopped = process::stop_all(&mut children, STOP_GRACE).await;

    match outcome {
        Ok(summary) => {
            println!("{summary}");
            if !stopped.is_empty() {
                println!("note: {}", stopped.join("; "));
            }
            if args.keep {
                println!("kept {} (mesh files and logs)", dir.display());
            } else if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("remora demo: could not remove {}: {e}", dir.display());
            }
            Ok(())
        }
        Err(e) => {
            if !stopped.is_empty() {
                eprintln!("while stopping: {}", stopped.join("; "));
            }
            Err(anyhow::anyhow!(
                "{e:#}\n\nlogs and mesh files are kept in {}",
                dir.display()
            ))
        }
    }
}

/// What ran: the addresses shown in the header and used for the summary.
struct Running {
    control_plane: ControlPlaneAddrs,
    /// (name, its application, its sidecar's addresses), in display order.
    sidecars: Vec<(&'static str, App, SidecarAddrs)>,
    mesh_file: PathBuf,
    notes: Vec<String>,
    /// Services of the mesh the demo does not run.
    others: Vec<String>,
}

async fn run_in(
    args: &Args,
    exe: &Path,
    dir: &Path,
    mesh_text: &str,
    mesh_source: &str,
    children: &mut Vec<Child>,
) -> Result<String> {
    let mesh = start(exe, dir, mesh_text, mesh_source, children).await?;
    let frontend = &mesh.sidecars[0].2;
    let client = Client::new();
    wait_routed(&client, &mesh, children).await?;

    let admins: Vec<(&'static str, SocketAddr)> = mesh
        .sidecars
        .iter()
        .map(|(name, _, addrs)| (*name, addrs.admin))
        .collect();
    print_header(args, &mesh, mesh_source);

    let baseline = Scrape::take(&client, &admins).await;
    let mut window = Window::new(baseline);
    let traffic = Traffic::start(client.clone(), frontend.outbound, CATALOG_HOST, args.rps);
    let started = Instant::now();
    let mut screen = Screen::new(std::io::stdout().is_terminal());

    let deadline = args.duration.map(|s| started + Duration::from_secs(s));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + REFRESH, REFRESH);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop_reason = loop {
        tokio::select! {
            _ = ticker.tick() => {}
            signal = stop_signal() => break signal,
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break "--duration reached";
        }
        if let Some(dead) = first_exited(children) {
            traffic.stop().await;
            bail!("{dead}");
        }
        window.push(Scrape::take(&client, &admins).await);
        screen.draw(&table::render(
            started.elapsed(),
            &window,
            &traffic.totals(),
        ));
    };
    let elapsed = started.elapsed();
    screen.finish();
    println!("\nstopping ({stop_reason}): traffic first, then the mesh");
    let totals = traffic.stop().await;
    let last = Scrape::take(&client, &admins).await;
    window.push(last);
    Ok(summary(elapsed, args.rps, &totals, &window, &mesh))
}

/// Starts the applications, the control plane, the sidecars, and points the
/// mesh at the sidecars.
async fn start(
    exe: &Path,
    dir: &Path,
    mesh_text: &str,
    mesh_source: &str,
    children: &mut Vec<Child>,
) -> Result<Running> {
    let frontend_app = App::frontend().await?;
    let v1_app = App::catalog("v1", 0.0).await?;
    let v2_app = App::catalog("v2", apps::FLAKY_RATIO).await?;

    // The control plane first, on the mesh as given: the sidecars need its
    // address, and the mesh needs theirs.
    let mesh_file = dir.join("mesh.yaml");
    mesh::write_atomically(&mesh_file, mesh_text)
        .with_context(|| format!("cannot write the mesh file {}", mesh_file.display()))?;
    let cp_file = dir.join("control-plane.addr.json");
    let cp_args: Vec<OsString> = vec![
        "control-plane".into(),
        "--config".into(),
        mesh_file.clone().into(),
        "--xds-addr".into(),
        "127.0.0.1:0".into(),
        "--monitoring-addr".into(),
        "127.0.0.1:0".into(),
        "--tls-addr".into(),
        "127.0.0.1:0".into(),
        "--ca-dir".into(),
        dir.join("ca").into(),
        "--address-file".into(),
        cp_file.clone().into(),
        "--log".into(),
        "info".into(),
    ];
    println!("starting the control plane on {mesh_source}");
    children.push(Child::spawn(
        "the control plane",
        exe,
        &cp_args,
        &dir.join("control-plane.log"),
    )?);
    let cp_child = children.len() - 1;
    let control_plane: ControlPlaneAddrs = children[cp_child]
        .wait_for_address_file(&cp_file, START_TIMEOUT)
        .await?;

    // One sidecar per application, all started before any is waited for.
    let apps = [
        ("frontend", "frontend", frontend_app),
        ("catalog-v1", "catalog", v1_app),
        ("catalog-v2", "catalog", v2_app),
    ];
    // Each sidecar proves its identity to the CA with the token the mesh
    // file declares for it, and checks the control plane against the root
    // the control plane created in its state directory.
    let root = dir.join("ca").join("root-cert.pem");
    let mut started = Vec::new();
    for (name, service, app) in apps {
        let addr_file = dir.join(format!("sidecar-{name}.addr.json"));
        let token_file = dir.join(format!("sidecar-{name}.token"));
        let token = mesh::token_for(mesh_text, "shop", service).with_context(|| {
            format!(
                "{mesh_source} declares no workload_tokens entry for namespace shop, \
                 service account {service}: the {name} sidecar could not get a certificate"
            )
        })?;
        std::fs::write(&token_file, token)
            .with_context(|| format!("cannot write {}", token_file.display()))?;
        let sidecar_args: Vec<OsString> = vec![
            "proxy".into(),
            "--node-id".into(),
            format!("{name}-demo").into(),
            "--service".into(),
            service.into(),
            "--namespace".into(),
            "shop".into(),
            "--service-account".into(),
            service.into(),
            "--control-plane".into(),
            control_plane.tls.to_string().into(),
            "--ca-bundle".into(),
            root.clone().into(),
            "--token-file".into(),
            token_file.into(),
            "--outbound-addr".into(),
            "127.0.0.1:0".into(),
            "--inbound-addr".into(),
            "127.0.0.1:0".into(),
            "--admin-addr".into(),
            "127.0.0.1:0".into(),
            "--app-addr".into(),
            app.addr.to_string().into(),
            "--app-protocol".into(),
            "http1".into(),
            "--workers".into(),
            "1".into(),
            "--drain-seconds".into(),
            "2".into(),
            "--address-file".into(),
            addr_file.clone().into(),
            "--log".into(),
            "info".into(),
        ];
        println!("starting the {name} sidecar (application on {})", app.addr);
        children.push(Child::spawn(
            &format!("the {name} sidecar"),
            exe,
            &sidecar_args,
            &dir.join(format!("sidecar-{name}.log")),
        )?);
        started.push((name, app, addr_file, children.len() - 1));
    }
    let mut sidecars = Vec::new();
    for (name, app, addr_file, index) in started {
        let addrs: SidecarAddrs = children[index]
            .wait_for_address_file(&addr_file, START_TIMEOUT)
            .await?;
        sidecars.push((name, app, addrs));
    }

    let inbound = |i: usize| -> Result<SocketAddr> {
        let (name, _, addrs) = &sidecars[i];
        addrs.inbound.with_context(|| {
            format!("the {name} sidecar reported no inbound listener although --app-addr was given")
        })
    };
    let placement = mesh::Placement {
        frontend: inbound(0)?,
        catalog_v1: inbound(1)?,
        catalog_v2: inbound(2)?,
    };
    let rewritten = mesh::rewrite(mesh_text, mesh_source, &placement)?;
    mesh::write_atomically(&mesh_file, &rewritten.yaml)
        .with_context(|| format!("cannot write the mesh file {}", mesh_file.display()))?;
    println!(
        "pointed frontend and catalog v1/v2 at their sidecars in {}",
        mesh_file.display()
    );
    Ok(Running {
        control_plane,
        sidecars,
        mesh_file,
        notes: rewritten.notes,
        others: rewritten.others,
    })
}

/// Waits until `frontend`'s sidecar routes `catalog.shop` to the demo's
/// catalog (so the control plane took the rewritten mesh and pushed it).
///
/// `children` are as [`start`] left them: the control plane first, then
/// the sidecars in the order of `mesh.sidecars` (`frontend` first).
async fn wait_routed(client: &Client, mesh: &Running, children: &mut [Child]) -> Result<()> {
    let outbound = mesh.sidecars[0].2.outbound;
    let monitoring = mesh.control_plane.monitoring;
    let deadline = Instant::now() + ROUTED_TIMEOUT;
    loop {
        if let Some(dead) = first_exited(children) {
            bail!("{dead}");
        }
        if let Ok(text) = client.get_text(monitoring, "/metrics").await {
            let failures = signals::parse(&text)
                .iter()
                .filter(|s| s.name == "remora_config_reload_failures_total")
                .map(|s| s.value)
                .sum::<f64>();
            if failures > 0.0 {
                bail!(
                    "the control plane refused the rewritten mesh {} (remora_config_reload_failures_total = {failures}); \
                     its log {} says why",
                    mesh.mesh_file.display(),
                    children[0].log().display()
                );
            }
        }
        let last = match client.get(outbound, CATALOG_HOST, "/", &[]).await {
            Ok(reply) if reply.status.is_success() && reply.backend.is_some() => return Ok(()),
            Ok(reply) => reply.describe(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "the frontend sidecar did not route http://{CATALOG_HOST}/ to the demo's catalog within {ROUTED_TIMEOUT:?} \
                 (last try: {last}); check the control plane log {} and the frontend sidecar log {} and its \
                 http://{}/config_dump",
                children[0].log().display(),
                children[1].log().display(),
                mesh.sidecars[0].2.admin
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The first child that exited, described with its log.
fn first_exited(children: &mut [Child]) -> Option<String> {
    children
        .iter_mut()
        .find_map(|c| c.check_running().err().map(|e| e.to_string()))
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() -> &'static str {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = ctrl_c => "Ctrl-C",
            _ = term.recv() => "SIGTERM",
        },
        Err(_) => {
            let _ = ctrl_c.await;
            "Ctrl-C"
        }
    }
}

fn print_header(args: &Args, mesh: &Running, mesh_source: &str) {
    let cp = &mesh.control_plane;
    let mut out = String::new();
    out.push_str("\nremora demo: a shop on 127.0.0.1, no Kubernetes. ");
    out.push_str(match args.duration {
        Some(_) => "Ctrl-C stops it early.\n\n",
        None => "Ctrl-C stops it.\n\n",
    });
    out.push_str(&format!(
        "  mesh file      {} (from {mesh_source}; live: edits reach the sidecars within a second)\n",
        mesh.mesh_file.display()
    ));
    out.push_str(&format!(
        "  control plane  xDS and CA (mTLS) {}  http://{}/debug/syncz  http://{}/metrics\n",
        cp.tls, cp.monitoring, cp.monitoring
    ));
    for (name, app, addrs) in &mesh.sidecars {
        out.push_str(&format!(
            "  {name:<13}  http://{}/metrics  http://{}/config_dump  (app {}, inbound {}, outbound {}){}\n",
            addrs.admin,
            addrs.admin,
            app.addr,
            addrs
                .inbound
                .map_or_else(|| "-".to_string(), |a| a.to_string()),
            addrs.outbound,
            app.describe(),
        ));
    }
    out.push_str(&format!(
        "  traffic        {} req/s from frontend to http://{CATALOG_HOST}/ through {} ({})\n",
        args.rps,
        mesh.sidecars[0].2.outbound,
        traffic::MIX,
    ));
    if !mesh.others.is_empty() {
        out.push_str(&format!(
            "  not started    {}: no traffic goes there; their endpoints are as in the mesh file\n",
            mesh.others.join(", ")
        ));
    }
    for note in &mesh.notes {
        out.push_str(&format!("  note           {note}\n"));
    }
    println!("{out}");
}

fn summary(
    elapsed: Duration,
    rps: u32,
    totals: &ClientTotals,
    window: &Window,
    mesh: &Running,
) -> String {
    let retries = window.total_since_start("remora_proxy_retries_total");
    let exhausted = window.total_since_start("remora_proxy_retry_budget_exhausted_total");
    let mut out = String::from("\nsummary\n");
    out.push_str(&format!(
        "  traffic:                   {:.1} s at {rps} req/s from frontend to {CATALOG_HOST}\n",
        elapsed.as_secs_f64()
    ));
    out.push_str(&format!("  requests sent by frontend: {}\n", totals.sent));
    out.push_str(&format!(
        "  client-side success rate:  {:.2}% ({} of {} answered 2xx)\n",
        totals.success_percent(),
        totals.ok,
        totals.sent
    ));
    out.push_str(&format!(
        "  answered by:               catalog v1 {}, catalog v2 {}\n",
        totals.by_v1, totals.by_v2
    ));
    if !totals.failures.is_empty() {
        let failures: Vec<String> = totals
            .failures
            .iter()
            .map(|(what, n)| format!("{n} x {what}"))
            .collect();
        out.push_str(&format!(
            "  failures seen by frontend: {}\n",
            failures.join(", ")
        ));
    }
    if totals.skipped > 0 {
        out.push_str(&format!(
            "  not sent (too many in flight): {}\n",
            totals.skipped
        ));
    }
    out.push_str(&format!(
        "  retries by the sidecars:   {retries} (retry budget exhausted {exhausted} times)\n"
    ));
    for (name, app, _) in &mesh.sidecars {
        let (served, failed) = app.counts();
        if failed > 0 {
            out.push_str(&format!(
                "  {name} failed on purpose:  503 to {failed} of the {served} requests it got ({:.1}%)\n",
                100.0 * failed as f64 / served.max(1) as f64
            ));
        }
    }
    out
}

fn make_temp_dir() -> Result<PathBuf> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("remora-demo-{}-{nanos:09}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the demo's directory {}", dir.display()))?;
    Ok(dir)
}

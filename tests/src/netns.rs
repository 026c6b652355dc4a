//! A cluster on one machine: pods as Linux network namespaces.
//!
//! A [`Cluster`] is a "node" namespace holding a bridge (`br0`) with the
//! first address of a /24 (the host side, where a control plane can run
//! with [`Cluster::node_command`]); each [`Pod`] is a namespace with a veth
//! (`eth0`) to that bridge, the next free address, `lo` up, a default route
//! via the bridge, and a hosts file (`/etc/netns/<ns>/hosts`, which
//! `ip netns exec` mounts over `/etc/hosts`) so names resolve to chosen
//! addresses. Everything lives inside namespaces of the cluster's own, so
//! two test binaries (or two tests) never share an interface or a rule.
//!
//! Bounded: dropping the [`Cluster`] (also when a test panics) kills every
//! process left in its namespaces, deletes the namespaces (their
//! interfaces and iptables rules vanish with them) and their
//! `/etc/netns/<ns>` folders. Namespaces left by a test binary that was
//! killed are removed by the next [`Cluster::new`].
//!
//! Needs root, `ip` (iproute2) and iptables: [`preflight`] fails with what
//! is missing.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

/// Every namespace this harness makes starts with this.
const PREFIX: &str = "remora-";

/// How to install what the namespace tests need on Debian.
pub const INSTALL: &str = "apt-get install -y iptables iproute2";

/// Fails with a message naming what is missing: root, `ip`, `iptables`,
/// `setpriv`.
pub fn preflight() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("reading /proc/self/status to find the effective user id")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        bail!(
            "the network namespace tests need root (euid 0, for CAP_NET_ADMIN and CAP_SYS_ADMIN); \
             this test runs with euid {euid}: run them as root (sudo -E cargo test ...)"
        );
    }
    for (tool, arg, install) in [
        ("ip", "-V", "install iproute2: apt-get install iproute2"),
        (
            "iptables",
            "--version",
            "install iptables: apt-get install iptables",
        ),
        (
            "iptables-save",
            "--version",
            "install iptables: apt-get install iptables",
        ),
        (
            "setpriv",
            "--version",
            "install util-linux: apt-get install util-linux",
        ),
    ] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("`{tool} {arg}` does not run: {install}");
        }
    }
    Ok(())
}

/// Runs `cmd`, failing with its stderr unless it exits 0; its output.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// Runs `cmd` and returns its stdout (must exit 0).
pub fn run_stdout(cmd: &mut Command) -> Result<String> {
    run(cmd).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

/// A bridge namespace and the pods attached to it.
pub struct Cluster {
    name: String,
    node_ns: String,
    subnet: [u8; 3],
    /// Namespaces created, the node first; removed on drop.
    namespaces: Mutex<Vec<String>>,
    next_host: AtomicU32,
}

/// One pod: a network namespace with an address on the cluster's bridge.
/// A handle; the [`Cluster`] owns the namespace.
#[derive(Debug, Clone)]
pub struct Pod {
    name: String,
    ns: String,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
}

impl Cluster {
    /// Creates the node namespace and its bridge. `name` (letters, digits,
    /// `-`) labels the namespaces: `remora-<pid>-<n>-<name>-node`.
    pub fn new(name: &str) -> Result<Cluster> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        preflight()?;
        remove_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Namespaces are isolated, so subnets may repeat; varying them
        // keeps captures and logs of concurrent tests tellable apart.
        let subnet = [10, 64 + (pid % 64) as u8, (n % 256) as u8];
        let node_ns = format!("{PREFIX}{pid}-{n}-{name}-node");
        let cluster = Cluster {
            name: format!("{PREFIX}{pid}-{n}-{name}"),
            node_ns: node_ns.clone(),
            subnet,
            namespaces: Mutex::new(Vec::new()),
            next_host: AtomicU32::new(2),
        };
        cluster.add_namespace(&node_ns)?;
        let gw = format!("{}/24", cluster.gateway());
        ip(&["-n", &node_ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &node_ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &node_ns, "addr", "add", &gw, "dev", "br0"])?;
        ip(&["-n", &node_ns, "link", "set", "br0", "up"])?;
        Ok(cluster)
    }

    fn add_namespace(&self, ns: &str) -> Result<()> {
        ip(&["netns", "add", ns])?;
        if let Ok(mut list) = self.namespaces.lock() {
            list.push(ns.to_string());
        }
        Ok(())
    }

    /// The bridge's address: the host side, and every pod's gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 1)
    }

    /// The node (bridge) namespace's name.
    pub fn node_namespace(&self) -> &str {
        &self.node_ns
    }

    /// A free address on the cluster's subnet that no pod has, for a
    /// virtual IP (see [`Pod::add_route`]).
    pub fn free_ip(&self) -> Result<Ipv4Addr> {
        let host = self.next_host.fetch_add(1, Ordering::Relaxed);
        if host > 254 {
            bail!("cluster {}: no address left on its /24", self.name);
        }
        Ok(Ipv4Addr::new(
            self.subnet[0],
            self.subnet[1],
            self.subnet[2],
            host as u8,
        ))
    }

    /// A pod named `name` (≤ 15 characters, it is also its hostname in the
    /// hosts file): namespace, veth to the bridge, address, routes, hosts
    /// file holding `localhost` and `name`.
    pub fn pod(&self, name: &str) -> Result<Pod> {
        let ip_addr = self.free_ip()?;
        let ns = format!("{}-{name}", self.name);
        self.add_namespace(&ns)?;
        let host_end = format!("vp{}", ip_addr.octets()[3]);
        let cidr = format!("{ip_addr}/24");
        let gw = self.gateway().to_string();
        let setup = || -> Result<()> {
            let node = self.node_ns.as_str();
            ip(&[
                "-n", node, "link", "add", &host_end, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            ip(&["-n", node, "link", "set", &host_end, "master", "br0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "route", "add", "default", "via", &gw])?;
            Ok(())
        };
        setup().with_context(|| format!("setting up pod {name} (namespace {ns})"))?;
        let pod = Pod {
            name: name.to_string(),
            ns,
            ip: ip_addr,
            gateway: self.gateway(),
        };
        pod.write_hosts(&[])?;
        Ok(pod)
    }

    /// A command run in the node namespace (the host side).
    pub fn node_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node_ns]).arg(program);
        cmd
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let list = match self.namespaces.lock() {
            Ok(mut l) => std::mem::take(&mut *l),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        // Pods first: deleting the node takes the veths' host ends along.
        for ns in list.iter().rev() {
            remove_namespace(ns);
        }
    }
}

/// Kills what runs in `ns`, deletes it and its `/etc/netns/<ns>`.
fn remove_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill")
                .args(["-KILL", pid])
                .stderr(Stdio::null())
                .status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", ns])
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(etc_netns(ns));
}

/// Removes namespaces of this harness whose test process is gone (killed
/// before its `Drop` ran).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(ns) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = ns
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            remove_namespace(ns);
        }
    }
}

fn etc_netns(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

impl Pod {
    /// The pod's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// The pod's address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The bridge's address (the default gateway).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// `program` run inside the pod as root (`ip netns exec <ns> program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// `program` run inside the pod as `uid`/`gid` with no supplementary
    /// groups and no capabilities (`setpriv`; changing from root to
    /// another uid drops every capability).
    pub fn command_as(&self, uid: u32, gid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg(program);
        cmd
    }

    /// Adds names to the pod's hosts file (e.g. service VIPs).
    pub fn add_hosts(&self, entries: &[(&str, Ipv4Addr)]) -> Result<()> {
        self.write_hosts(entries)
    }

    fn write_hosts(&self, entries: &[(&str, Ipv4Addr)]) -> Result<()> {
        let dir = etc_netns(&self.ns);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("hosts");
        let mut text = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost\n{}\t{}\n",
                self.ip, self.name
            )
        });
        for (name, addr) in entries {
            text.push_str(&format!("{addr}\t{name}\n"));
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Routes `dest` (an address or CIDR, e.g. a service VIP range) from
    /// the pod via the bridge, in addition to the default route.
    pub fn add_route(&self, dest: &str) -> Result<()> {
        let gw = self.gateway.to_string();
        ip(&["-n", &self.ns, "route", "replace", dest, "via", &gw])
    }

    /// `iptables-save -t nat` inside the pod, without the comment lines
    /// (timestamps) and with packet counters zeroed, so two saves of the
    /// same rules compare equal.
    pub fn nat_rules(&self) -> Result<String> {
        self.saved_nat("iptables-save")
    }

    /// [`Pod::nat_rules`] for IPv6 (`ip6tables-save -t nat`).
    pub fn nat_rules_v6(&self) -> Result<String> {
        self.saved_nat("ip6tables-save")
    }

    fn saved_nat(&self, tool: &str) -> Result<String> {
        let text = run_stdout(self.command(tool).args(["-t", "nat"]))?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match l.rfind(" [") {
                Some(i) if l.starts_with(':') => format!("{} [0:0]\n", &l[..i]),
                _ => format!("{l}\n"),
            })
            .collect())
    }

    /// Whether something listens on TCP `port` in the pod (`ss`).
    pub fn is_listening(&self, port: u16) -> Result<bool> {
        let out = run_stdout(
            self.command("ss")
                .args(["-Htln", "sport", "="])
                .arg(format!(":{port}")),
        )?;
        Ok(!out.trim().is_empty())
    }
}

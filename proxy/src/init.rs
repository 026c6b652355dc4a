//! `remora-proxy init`: programs the pod's network namespace so that its TCP
//! traffic goes through the sidecar (what an init container runs in
//! Kubernetes). `docs/interception.md` explains the rules and the flags.
//!
//! The rules live in chains of our own in the `nat` table, jumped to from
//! `OUTPUT` and `PREROUTING`. Each family (IPv4 with `iptables`, IPv6 with
//! `ip6tables` when IPv6 is up) gets one generated ruleset applied with
//! `iptables-restore --noflush`, so a run changes everything or nothing.
//! Declaring a chain in that format flushes it, which makes a second run
//! leave exactly one set of rules; the jumps are added only when missing.

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, ExitCode, Stdio};
use std::str::FromStr;

use clap::Parser;

#[cfg(test)]
mod tests;

/// Outbound TCP from the pod: the exclusions, then `REMORA_REDIRECT`.
pub const OUTPUT_CHAIN: &str = "REMORA_OUTPUT";
/// Redirects to the outbound capture port.
pub const REDIRECT_CHAIN: &str = "REMORA_REDIRECT";
/// Inbound TCP to the pod: the exclusions, then `REMORA_IN_REDIRECT`.
pub const INBOUND_CHAIN: &str = "REMORA_INBOUND";
/// Redirects to the inbound capture port.
pub const IN_REDIRECT_CHAIN: &str = "REMORA_IN_REDIRECT";

/// Every chain init creates, in the order they are declared.
pub const CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    IN_REDIRECT_CHAIN,
    OUTPUT_CHAIN,
    REDIRECT_CHAIN,
];

/// The jumps from the built-in chains into ours, as `iptables-save` prints
/// them (without the `-A `).
pub const JUMPS: [&str; 2] = [
    "PREROUTING -p tcp -j REMORA_INBOUND",
    "OUTPUT -p tcp -j REMORA_OUTPUT",
];

/// remora-proxy init: sends the pod's TCP traffic through the sidecar
/// (iptables, and ip6tables when IPv6 is up, in the current network
/// namespace). Each flag is named after the pod annotation
/// `remora.io/<flag>` that sets it in Kubernetes.
#[derive(Debug, Clone, Parser)]
#[command(name = "remora-proxy init", bin_name = "remora-proxy init", version)]
pub struct Args {
    /// The proxy's outbound capture port: where outbound TCP is redirected.
    #[arg(long, default_value_t = 15001, value_parser = parse_port)]
    pub outbound_port: u16,
    /// The proxy's inbound capture port: where inbound TCP is redirected.
    #[arg(long, default_value_t = 15006, value_parser = parse_port)]
    pub inbound_port: u16,
    /// The user id the proxy runs as; its own traffic is never captured.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// The group id the proxy runs as; if given, traffic of that group is
    /// not captured either.
    #[arg(long)]
    pub proxy_gid: Option<u32>,
    /// Destinations whose outbound TCP is captured: `*` (all), or CIDRs
    /// separated by commas (`10.0.0.0/8,fd00::/8`). An empty list captures
    /// nothing.
    #[arg(long, default_value = "*", value_parser = parse_cidr_selection)]
    pub include_outbound_cidrs: Selection<Cidr>,
    /// Destinations never captured (the control plane, say): CIDRs or
    /// addresses separated by commas.
    #[arg(long, default_value = "", value_parser = parse_cidr_list)]
    pub exclude_outbound_cidrs: List<Cidr>,
    /// Destination ports never captured outbound, separated by commas.
    #[arg(long, default_value = "", value_parser = parse_port_list)]
    pub exclude_outbound_ports: List<u16>,
    /// Ports of the pod whose inbound TCP is captured: `*` (all) or ports
    /// separated by commas. An empty list captures nothing.
    #[arg(long, default_value = "*", value_parser = parse_port_selection)]
    pub include_inbound_ports: Selection<u16>,
    /// Ports of the pod never captured inbound, separated by commas.
    #[arg(long, default_value = "", value_parser = parse_port_list)]
    pub exclude_inbound_ports: List<u16>,
    /// The proxy's admin port: never captured inbound.
    #[arg(long, default_value_t = 15020, value_parser = parse_port)]
    pub admin_port: u16,
    /// Remove what init installed (its jumps and chains) and nothing else.
    /// Nothing installed is not an error.
    #[arg(long)]
    pub uninstall: bool,
    /// Print the rules (in `iptables-restore` format) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

// === flag values ===

/// An address block: `10.96.0.0/12`, `fd00::/8`, or one address.
/// Host bits are cleared, as iptables does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The family of the block.
    pub fn family(&self) -> Family {
        match self.addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!("`{s}` is not an address or CIDR (e.g. 10.96.0.0/12, fd00::/8)")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("`{s}`: the prefix length must be 0 to {max}")),
            },
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A list given as comma-separated values; empty is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct List<T>(pub Vec<T>);

/// `*` (everything) or a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection<T> {
    /// `*`.
    All,
    /// Only these (possibly none).
    Only(Vec<T>),
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("`{}` is not a port (1 to 65535)", s.trim())),
    }
}

fn parse_list<T>(s: &str, item: fn(&str) -> Result<T, String>) -> Result<List<T>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(item)
        .collect::<Result<Vec<T>, String>>()
        .map(List)
}

fn parse_selection<T>(
    s: &str,
    item: fn(&str) -> Result<T, String>,
) -> Result<Selection<T>, String> {
    if s.trim() == "*" {
        return Ok(Selection::All);
    }
    parse_list(s, item).map(|l| Selection::Only(l.0))
}

fn parse_port_list(s: &str) -> Result<List<u16>, String> {
    parse_list(s, parse_port)
}

fn parse_port_selection(s: &str) -> Result<Selection<u16>, String> {
    parse_selection(s, parse_port)
}

fn parse_cidr_list(s: &str) -> Result<List<Cidr>, String> {
    parse_list(s, Cidr::from_str)
}

fn parse_cidr_selection(s: &str) -> Result<Selection<Cidr>, String> {
    parse_selection(s, Cidr::from_str)
}

// === rules ===

/// An address family and the tools that program it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4: `iptables`.
    V4,
    /// IPv6: `ip6tables`.
    V6,
}

impl Family {
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// The whole ruleset for one family, in `iptables-restore` format: our
/// chains (declared, so flushed), their rules, and the jumps into them.
pub fn ruleset(args: &Args, family: Family) -> String {
    let mut out = String::from("*nat\n");
    for chain in CHAINS {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for rule in rules(args, family) {
        let _ = writeln!(out, "-A {rule}");
    }
    for jump in JUMPS {
        let _ = writeln!(out, "-A {jump}");
    }
    out.push_str("COMMIT\n");
    out
}

/// The rules of our chains (without `-A `), in order.
fn rules(args: &Args, family: Family) -> Vec<String> {
    let mut r = Vec::new();

    // Inbound: PREROUTING sees TCP arriving for the pod.
    r.push(format!(
        "{INBOUND_CHAIN} -p tcp -m tcp --dport {} -j RETURN",
        args.admin_port
    ));
    for port in &args.exclude_inbound_ports.0 {
        r.push(format!(
            "{INBOUND_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
        ));
    }
    match &args.include_inbound_ports {
        Selection::All => r.push(format!("{INBOUND_CHAIN} -p tcp -j {IN_REDIRECT_CHAIN}")),
        Selection::Only(ports) => {
            for port in ports {
                r.push(format!(
                    "{INBOUND_CHAIN} -p tcp -m tcp --dport {port} -j {IN_REDIRECT_CHAIN}"
                ));
            }
        }
    }
    r.push(format!(
        "{IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        args.inbound_port
    ));

    // Outbound: OUTPUT sees TCP the pod's processes send. The proxy's own
    // connections must pass, or every connection it makes would loop back
    // into it.
    r.push(format!(
        "{OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN",
        args.proxy_uid
    ));
    if let Some(gid) = args.proxy_gid {
        r.push(format!(
            "{OUTPUT_CHAIN} -m owner --gid-owner {gid} -j RETURN"
        ));
    }
    r.push(format!("{OUTPUT_CHAIN} -d {} -j RETURN", family.loopback()));
    for cidr in args
        .exclude_outbound_cidrs
        .0
        .iter()
        .filter(|c| c.family() == family)
    {
        r.push(format!("{OUTPUT_CHAIN} -d {cidr} -j RETURN"));
    }
    for port in &args.exclude_outbound_ports.0 {
        r.push(format!(
            "{OUTPUT_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"
        ));
    }
    match &args.include_outbound_cidrs {
        Selection::All => r.push(format!("{OUTPUT_CHAIN} -j {REDIRECT_CHAIN}")),
        Selection::Only(cidrs) => {
            for cidr in cidrs.iter().filter(|c| c.family() == family) {
                r.push(format!("{OUTPUT_CHAIN} -d {cidr} -j {REDIRECT_CHAIN}"));
            }
        }
    }
    r.push(format!(
        "{REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        args.outbound_port
    ));
    r
}

/// What to feed `iptables-restore --noflush` to install, given what
/// `iptables-save -t nat` shows now: the ruleset without the jumps that
/// are already there.
pub fn install_script(ruleset: &str, saved: &str) -> String {
    let present: Vec<&str> = saved.lines().map(str::trim_end).collect();
    ruleset
        .lines()
        .filter(|line| {
            !JUMPS
                .iter()
                .any(|j| line.strip_prefix("-A ") == Some(j) && present.contains(line))
        })
        .map(|line| format!("{line}\n"))
        .collect()
}

/// What to feed `iptables-restore --noflush` to remove everything init
/// added, given what `iptables-save -t nat` shows now: every rule of a
/// built-in chain that jumps into one of ours, then our chains. `None`
/// when nothing of ours is there.
pub fn uninstall_script(saved: &str) -> Option<String> {
    let mut deletes = Vec::new();
    let mut chains = Vec::new();
    for line in saved.lines().map(str::trim_end) {
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("");
            if CHAINS.contains(&name) {
                chains.push(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            let target = rule
                .split_whitespace()
                .skip_while(|w| *w != "-j")
                .nth(1)
                .unwrap_or("");
            if !CHAINS.contains(&chain) && CHAINS.contains(&target) {
                deletes.push(format!("-D {rule}"));
            }
        }
    }
    if deletes.is_empty() && chains.is_empty() {
        return None;
    }
    let mut out = String::from("*nat\n");
    for d in deletes {
        let _ = writeln!(out, "{d}");
    }
    // Flush all before deleting any: our chains jump to each other.
    for c in &chains {
        let _ = writeln!(out, "-F {c}");
    }
    for c in &chains {
        let _ = writeln!(out, "-X {c}");
    }
    out.push_str("COMMIT\n");
    Some(out)
}

// === running iptables ===

/// Why init failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The binary is not on `PATH`.
    #[error(
        "iptables is not installed: `{0}` was not found on PATH (Debian: apt-get install iptables)"
    )]
    NotInstalled(&'static str),
    /// The kernel refused: no CAP_NET_ADMIN.
    #[error(
        "`{tool}` was refused: CAP_NET_ADMIN is needed to program iptables (run init as root, \
         or in Kubernetes with securityContext.capabilities.add: [NET_ADMIN]); it said: {stderr}"
    )]
    NoCapability {
        /// The binary.
        tool: &'static str,
        /// Its stderr.
        stderr: String,
    },
    /// Could not be started for another reason.
    #[error("starting `{tool}`: {source}")]
    Spawn {
        /// The binary.
        tool: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// Ran and failed.
    #[error("`{tool}` failed ({status}): {stderr}{input}")]
    Failed {
        /// The binary.
        tool: &'static str,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its stderr.
        stderr: String,
        /// The ruleset it was given, if any, for the line numbers.
        input: String,
    },
    /// `/proc/net/if_inet6` exists but could not be read.
    #[error("reading /proc/net/if_inet6 to see whether IPv6 is up: {0}")]
    Inet6(std::io::Error),
}

/// Runs `tool args` with `input` on stdin; its stdout on success.
fn run(tool: &'static str, args: &[&str], input: Option<&str>) -> Result<String, InitError> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => InitError::NotInstalled(tool),
            _ => InitError::Spawn { tool, source },
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A write error (the tool exited early) shows in its status and
        // stderr below, which say more.
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| InitError::Spawn { tool, source })?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    if is_permission_error(&stderr) {
        return Err(InitError::NoCapability { tool, stderr });
    }
    Err(InitError::Failed {
        tool,
        status: out.status,
        stderr,
        input: input
            .map(|i| format!("\nruleset given:\n{i}"))
            .unwrap_or_default(),
    })
}

fn is_permission_error(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    s.contains("permission denied") || s.contains("you must be root") || s.contains("not permitted")
}

/// Whether IPv6 is up in this namespace: some interface has a global or
/// loopback (`::1`) address.
pub fn ipv6_up() -> Result<bool, InitError> {
    match std::fs::read_to_string("/proc/net/if_inet6") {
        Ok(text) => Ok(ipv6_up_in(&text)),
        // No file: the kernel has no IPv6.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(InitError::Inet6(e)),
    }
}

/// [`ipv6_up`] on the text of `/proc/net/if_inet6` (address, index, prefix
/// length, scope, flags, name; scope 00 is global, 10 host).
fn ipv6_up_in(if_inet6: &str) -> bool {
    if_inet6.lines().any(|line| {
        let scope = line.split_whitespace().nth(3).unwrap_or("");
        scope == "00" || scope == "10"
    })
}

fn install(args: &Args, family: Family) -> Result<(), InitError> {
    let saved = run(family.save(), &["-t", "nat"], None)?;
    let script = install_script(&ruleset(args, family), &saved);
    run(family.restore(), &["--noflush"], Some(&script))?;
    Ok(())
}

/// Whether something was removed.
fn uninstall(family: Family) -> Result<bool, InitError> {
    let saved = run(family.save(), &["-t", "nat"], None)?;
    match uninstall_script(&saved) {
        None => Ok(false),
        Some(script) => {
            run(family.restore(), &["--noflush"], Some(&script))?;
            Ok(true)
        }
    }
}

/// Runs `remora-proxy init`: 0 on success, 1 with the reason on stderr.
pub fn main(args: Args) -> ExitCode {
    match execute(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("remora-proxy init: {e}");
            ExitCode::from(1)
        }
    }
}

fn execute(args: &Args) -> Result<(), InitError> {
    let mut families = vec![Family::V4];
    if ipv6_up()? {
        families.push(Family::V6);
    }
    for family in families {
        if args.dry_run {
            println!("# {} ({} --noflush)", family.name(), family.restore());
            print!("{}", ruleset(args, family));
        } else if args.uninstall {
            let removed = uninstall(family)?;
            println!(
                "remora-proxy init: {}: {}",
                family.name(),
                if removed {
                    "removed the interception rules"
                } else {
                    "no interception rules to remove"
                }
            );
        } else {
            install(args, family)?;
            println!(
                "remora-proxy init: {}: outbound TCP to port {}, inbound TCP to port {} \
                 (except uid {})",
                family.name(),
                args.outbound_port,
                args.inbound_port,
                args.proxy_uid
            );
        }
    }
    Ok(())
}

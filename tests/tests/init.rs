//! `remora-proxy init` in real network namespaces (`remora_tests::netns`):
//! the rules it installs, idempotence, uninstall, and that TCP is really
//! captured (outbound to 15001, inbound to 15006) except the proxy's own
//! traffic and the excluded ports. Needs root and iptables; fails (never
//! skips) with what is missing.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use remora_tests::eventually;
use remora_tests::netns::{Cluster, Pod, run_stdout};
use remora_tests::workspace::{proxy_binary, python};

/// The proxy's user (and group) id in these tests: init's default.
const PROXY_UID: u32 = 1337;

/// Listens on each `name:port` given and answers every connection with its
/// name and a newline, then closes it: which listener took a connection
/// is what the client reads.
const NAMED_LISTENERS: &str = r#"
import socket, sys, threading
def serve(name, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    while True:
        c, _ = s.accept()
        try:
            c.sendall((name + "\n").encode())
        finally:
            c.close()
for arg in sys.argv[1:]:
    name, port = arg.split(":")
    threading.Thread(target=serve, args=(name, int(port))).start()
"#;

/// Starts the named listeners in `pod` (killed with the cluster) and waits
/// until every port listens.
async fn start_listeners(pod: &Pod, listeners: &[(&str, u16)]) -> Result<Listeners> {
    let mut cmd = pod.command(python());
    cmd.arg("-c").arg(NAMED_LISTENERS);
    for (name, port) in listeners {
        cmd.arg(format!("{name}:{port}"));
    }
    let child = cmd
        .stdin(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting listeners in pod {}", pod.name()))?;
    let child = Listeners(child);
    eventually(
        &format!("listeners {listeners:?} in pod {}", pod.name()),
        Duration::from_secs(10),
        async || {
            for (name, port) in listeners {
                ensure!(
                    pod.is_listening(*port)?,
                    "{name} not listening on {port} yet"
                );
            }
            Ok(())
        },
    )
    .await?;
    Ok(child)
}

/// The listeners' process, killed and reaped on drop.
struct Listeners(std::process::Child);

impl Drop for Listeners {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects from `pod` (as root, or as `uid` with no capabilities) to
/// `ip:port` with bash's `/dev/tcp` and returns what the listener said: its
/// name.
fn connect(pod: &Pod, uid: Option<u32>, ip: std::net::Ipv4Addr, port: u16) -> Result<String> {
    let mut cmd = match uid {
        None => pod.command("timeout"),
        Some(uid) => pod.command_as(uid, uid, "timeout"),
    };
    cmd.args([
        "5",
        "bash",
        "-c",
        r#"exec 3<>"/dev/tcp/$1/$2" && cat <&3"#,
        "connect",
    ])
    .arg(ip.to_string())
    .arg(port.to_string());
    let out = run_stdout(&mut cmd).with_context(|| {
        format!(
            "connecting from pod {} (uid {}) to {ip}:{port}",
            pod.name(),
            uid.map_or("0".to_string(), |u| u.to_string())
        )
    })?;
    Ok(out.trim().to_string())
}

/// A connection to try: what it is, from which pod as which uid (root if
/// none), to which pod and port, and which listener must take it.
type Case<'a> = (&'a str, &'a Pod, Option<u32>, &'a Pod, u16, &'a str);

/// `remora-proxy init ARGS` run in `pod` as root; its output (must exit 0).
fn init(pod: &Pod, args: &[&str]) -> Result<String> {
    let proxy = proxy_binary()?;
    run_stdout(pod.command(&proxy).arg("init").args(args))
}

/// The `-A` lines of a ruleset, counted.
fn rule_lines(text: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in text.lines().filter(|l| l.starts_with("-A ")) {
        *m.entry(l.to_string()).or_insert(0) += 1;
    }
    m
}

/// What a dry run prints for one family (`# IPv4 ...` up to the next `#`).
fn dry_run_section(out: &str, family: &str) -> String {
    out.split("# ")
        .find(|s| s.starts_with(family))
        .unwrap_or("")
        .to_string()
}

/// `after` minus `before`, as `-A` lines.
fn added(before: &str, after: &str) -> BTreeMap<String, usize> {
    let mut a = rule_lines(after);
    for (line, n) in rule_lines(before) {
        if let Some(m) = a.get_mut(&line) {
            *m = m.saturating_sub(n);
        }
    }
    a.retain(|_, n| *n > 0);
    a
}

#[test]
fn init_installs_idempotently_and_uninstall_restores_exactly() {
    let result = (|| -> Result<()> {
        let cluster = Cluster::new("rules")?;
        let pod = cluster.pod("a")?;
        // A rule of someone else's, which init must leave alone.
        run_stdout(pod.command("iptables").args([
            "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN",
        ]))?;
        let before4 = pod.nat_rules()?;
        let before6 = pod.nat_rules_v6()?;

        let flags = [
            "--exclude-outbound-cidrs",
            "10.96.0.0/12,fd00:96::/64",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-inbound-ports",
            "22",
            "--proxy-gid",
            "1337",
        ];
        let mut dry = flags.to_vec();
        dry.push("--dry-run");
        let printed = init(&pod, &dry)?;
        ensure!(
            pod.nat_rules()? == before4 && pod.nat_rules_v6()? == before6,
            "--dry-run changed the rules"
        );
        let want4 = dry_run_section(&printed, "IPv4");
        let want6 = dry_run_section(&printed, "IPv6");
        ensure!(
            want4.contains("-A OUTPUT -p tcp -j REMORA_OUTPUT") && want6.contains("::1/128"),
            "--dry-run printed no IPv4 and IPv6 rulesets (IPv6 is up: lo has ::1):\n{printed}"
        );

        init(&pod, &flags)?;
        let after4 = pod.nat_rules()?;
        let after6 = pod.nat_rules_v6()?;
        // iptables-save shows exactly the rules the dry run printed.
        ensure!(
            added(&before4, &after4) == rule_lines(&want4),
            "IPv4 rules installed differ from the dry run:\ninstalled:\n{after4}\nprinted:\n{want4}"
        );
        ensure!(
            added(&before6, &after6) == rule_lines(&want6),
            "IPv6 rules installed differ from the dry run:\ninstalled:\n{after6}\nprinted:\n{want6}"
        );
        for line in [
            ":REMORA_OUTPUT - [0:0]",
            ":REMORA_REDIRECT - [0:0]",
            ":REMORA_INBOUND - [0:0]",
            ":REMORA_IN_REDIRECT - [0:0]",
            "-A OUTPUT -p tcp -j REMORA_OUTPUT",
            "-A PREROUTING -p tcp -j REMORA_INBOUND",
            "-A REMORA_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A REMORA_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "-A REMORA_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "-A REMORA_OUTPUT -d 10.96.0.0/12 -j RETURN",
            "-A REMORA_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
            "-A REMORA_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A REMORA_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
            "-A REMORA_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
            "-A REMORA_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        ] {
            ensure!(
                after4.lines().any(|l| l == line),
                "{line:?} not in iptables-save:\n{after4}"
            );
        }
        ensure!(
            after6.contains("-A REMORA_OUTPUT -d fd00:96::/64 -j RETURN")
                && !after6.contains("10.96.0.0"),
            "ip6tables-save lacks the IPv6 exclusion or holds the IPv4 one:\n{after6}"
        );

        init(&pod, &flags)?;
        ensure!(
            pod.nat_rules()? == after4 && pod.nat_rules_v6()? == after6,
            "a second init changed the rules:\nfirst:\n{after4}\nsecond:\n{}",
            pod.nat_rules()?
        );

        init(&pod, &["--uninstall"])?;
        let un4 = pod.nat_rules()?;
        let un6 = pod.nat_rules_v6()?;
        ensure!(
            un4 == before4,
            "--uninstall left:\n{un4}\ninstead of:\n{before4}"
        );
        ensure!(
            un6 == before6,
            "--uninstall left (IPv6):\n{un6}\ninstead of:\n{before6}"
        );
        let again = init(&pod, &["--uninstall"])?;
        ensure!(
            again.contains("no interception rules to remove") && pod.nat_rules()? == before4,
            "a second --uninstall: {again}"
        );
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_captures_tcp_except_the_proxy_and_exclusions() {
    let result = async {
        let cluster = Cluster::new("capture")?;
        let a = cluster.pod("a")?;
        let b = cluster.pod("b")?;
        // In A, stand-ins for the proxy's listeners and the application.
        let _a_listeners = start_listeners(
            &a,
            &[
                ("outbound", 15001),
                ("inbound", 15006),
                ("admin", 15020),
                ("app", 8080),
            ],
        )
        .await?;
        let _b_listeners = start_listeners(&b, &[("b-app", 9000), ("b-db", 9001)]).await?;
        ensure!(
            connect(&a, None, b.ip(), 9000)? == "b-app",
            "A does not reach B"
        );

        init(&a, &["--exclude-outbound-ports", "9001"])?;
        let cases: [Case; 6] = [
            ("A's app to B", &a, None, &b, 9000, "outbound"),
            (
                "the proxy (uid 1337) to B",
                &a,
                Some(PROXY_UID),
                &b,
                9000,
                "b-app",
            ),
            (
                "A's app to an excluded port of B",
                &a,
                None,
                &b,
                9001,
                "b-db",
            ),
            (
                "another uid of A to B",
                &a,
                Some(4242),
                &b,
                9000,
                "outbound",
            ),
            ("B to A's application port", &b, None, &a, 8080, "inbound"),
            ("B to A's admin port", &b, None, &a, 15020, "admin"),
        ];
        for (what, from, uid, to, port, want) in cases {
            let got = connect(from, uid, to.ip(), port)?;
            ensure!(
                got == want,
                "{what} ({}:{port}) landed on {got:?}, expected {want:?}; A's rules:\n{}",
                to.ip(),
                a.nat_rules()?
            );
        }

        init(&a, &["--uninstall"])?;
        let got = connect(&a, None, b.ip(), 9000)?;
        ensure!(
            got == "b-app",
            "after --uninstall A's app reaches {got:?}, not B"
        );
        let got = connect(&b, None, a.ip(), 8080)?;
        ensure!(
            got == "app",
            "after --uninstall B reaches {got:?}, not A's app"
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

#[test]
fn init_says_what_is_missing() {
    let result = (|| -> Result<()> {
        let cluster = Cluster::new("missing")?;
        let pod = cluster.pod("a")?;
        let proxy = proxy_binary()?;
        let before = pod.nat_rules()?;

        // Not root: setpriv drops every capability with the uid.
        let out = pod
            .command_as(65534, 65534, &proxy)
            .arg("init")
            .output()
            .context("running remora-proxy init as uid 65534")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(1) && stderr.contains("CAP_NET_ADMIN"),
            "init without CAP_NET_ADMIN: {} (the proxy binary must be readable by uid 65534); \
             stderr: {stderr}",
            out.status
        );

        // No iptables on PATH.
        let out = pod
            .command("env")
            .arg("PATH=/nonexistent")
            .arg(&proxy)
            .arg("init")
            .output()
            .context("running remora-proxy init without PATH")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(1)
                && stderr.contains("iptables is not installed")
                && stderr.contains("apt-get install iptables"),
            "init without iptables: {}; stderr: {stderr}",
            out.status
        );

        // A bad flag value: clap names the flag and the value.
        let out = Command::new(&proxy)
            .args(["init", "--exclude-outbound-cidrs", "10.0.0.0/33"])
            .output()
            .context("running remora-proxy init with a bad CIDR")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.code() == Some(2)
                && stderr.contains("--exclude-outbound-cidrs")
                && stderr.contains("10.0.0.0/33"),
            "init with a bad CIDR: {}; stderr: {stderr}",
            out.status
        );
        ensure!(
            pod.nat_rules()? == before,
            "a failed init changed the rules"
        );
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

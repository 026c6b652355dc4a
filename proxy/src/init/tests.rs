use clap::Parser;

use super::*;

fn args(flags: &[&str]) -> Args {
    let mut argv = vec!["init"];
    argv.extend_from_slice(flags);
    match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => panic!("parsing {flags:?}: {e}"),
    }
}

fn parse_error(flags: &[&str]) -> String {
    let mut argv = vec!["init"];
    argv.extend_from_slice(flags);
    match Args::try_parse_from(argv) {
        Ok(a) => panic!("{flags:?} parsed: {a:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn default_ruleset_ipv4() {
    let expected = "\
*nat
:REMORA_INBOUND - [0:0]
:REMORA_IN_REDIRECT - [0:0]
:REMORA_OUTPUT - [0:0]
:REMORA_REDIRECT - [0:0]
-A REMORA_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A REMORA_INBOUND -p tcp -j REMORA_IN_REDIRECT
-A REMORA_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A REMORA_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A REMORA_OUTPUT -d 127.0.0.1/32 -j RETURN
-A REMORA_OUTPUT -j REMORA_REDIRECT
-A REMORA_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j REMORA_INBOUND
-A OUTPUT -p tcp -j REMORA_OUTPUT
COMMIT
";
    assert_eq!(ruleset(&args(&[]), Family::V4), expected);
}

#[test]
fn flags_shape_the_rules_per_family() {
    let a = args(&[
        "--outbound-port",
        "16001",
        "--inbound-port",
        "16006",
        "--proxy-uid",
        "1400",
        "--proxy-gid",
        "1401",
        "--include-outbound-cidrs",
        "10.0.0.0/8, fd00::/8",
        "--exclude-outbound-cidrs",
        "10.96.0.5/12,2001:db8::1",
        "--exclude-outbound-ports",
        "5432,6379",
        "--include-inbound-ports",
        "8080,9090",
        "--exclude-inbound-ports",
        "22",
        "--admin-port",
        "16020",
    ]);
    let v4 = ruleset(&a, Family::V4);
    for line in [
        "-A REMORA_INBOUND -p tcp -m tcp --dport 16020 -j RETURN",
        "-A REMORA_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
        "-A REMORA_INBOUND -p tcp -m tcp --dport 8080 -j REMORA_IN_REDIRECT",
        "-A REMORA_INBOUND -p tcp -m tcp --dport 9090 -j REMORA_IN_REDIRECT",
        "-A REMORA_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
        "-A REMORA_OUTPUT -m owner --uid-owner 1400 -j RETURN",
        "-A REMORA_OUTPUT -m owner --gid-owner 1401 -j RETURN",
        // Host bits cleared, as iptables-save would show them.
        "-A REMORA_OUTPUT -d 10.96.0.0/12 -j RETURN",
        "-A REMORA_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
        "-A REMORA_OUTPUT -p tcp -m tcp --dport 6379 -j RETURN",
        "-A REMORA_OUTPUT -d 10.0.0.0/8 -j REMORA_REDIRECT",
        "-A REMORA_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
    ] {
        assert!(
            v4.lines().any(|l| l == line),
            "{line:?} missing from:\n{v4}"
        );
    }
    assert!(
        !v4.contains("REMORA_INBOUND -p tcp -j REMORA_IN_REDIRECT"),
        "{v4}"
    );
    assert!(!v4.contains("fd00") && !v4.contains("2001:db8"), "{v4}");
    assert!(!v4.contains("-A REMORA_OUTPUT -j REMORA_REDIRECT"), "{v4}");

    let v6 = ruleset(&a, Family::V6);
    for line in [
        "-A REMORA_OUTPUT -d ::1/128 -j RETURN",
        "-A REMORA_OUTPUT -d 2001:db8::1/128 -j RETURN",
        "-A REMORA_OUTPUT -d fd00::/8 -j REMORA_REDIRECT",
    ] {
        assert!(
            v6.lines().any(|l| l == line),
            "{line:?} missing from:\n{v6}"
        );
    }
    assert!(!v6.contains("10.") && !v6.contains("127.0.0.1"), "{v6}");
}

#[test]
fn empty_include_lists_capture_nothing() {
    let a = args(&[
        "--include-outbound-cidrs",
        "",
        "--include-inbound-ports",
        "",
    ]);
    let v4 = ruleset(&a, Family::V4);
    assert!(!v4.contains("-j REMORA_REDIRECT"), "{v4}");
    assert!(!v4.contains("-j REMORA_IN_REDIRECT"), "{v4}");
    // The chains and jumps are still there, so uninstall finds them.
    assert!(v4.contains("-A OUTPUT -p tcp -j REMORA_OUTPUT"), "{v4}");
}

#[test]
fn bad_values_name_the_flag_and_value() {
    let e = parse_error(&["--exclude-outbound-cidrs", "10.0.0.0/33"]);
    assert!(
        e.contains("--exclude-outbound-cidrs") && e.contains("10.0.0.0/33"),
        "{e}"
    );
    let e = parse_error(&["--include-outbound-cidrs", "10.0.0.0/8,nonsense"]);
    assert!(
        e.contains("--include-outbound-cidrs") && e.contains("nonsense"),
        "{e}"
    );
    let e = parse_error(&["--exclude-inbound-ports", "22,70000"]);
    assert!(
        e.contains("--exclude-inbound-ports") && e.contains("70000"),
        "{e}"
    );
    let e = parse_error(&["--outbound-port", "0"]);
    assert!(e.contains("--outbound-port") && e.contains('0'), "{e}");
    let e = parse_error(&["--proxy-uid", "root"]);
    assert!(e.contains("--proxy-uid") && e.contains("root"), "{e}");
}

#[test]
fn install_adds_only_missing_jumps() {
    let rules = ruleset(&args(&[]), Family::V4);
    let saved = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -j REMORA_OUTPUT\nCOMMIT\n";
    let script = install_script(&rules, saved);
    assert!(!script.contains("-A OUTPUT "), "{script}");
    assert!(
        script.contains("-A PREROUTING -p tcp -j REMORA_INBOUND"),
        "{script}"
    );
    assert!(script.contains(":REMORA_OUTPUT - [0:0]"), "{script}");
    assert_eq!(install_script(&rules, "*nat\nCOMMIT\n"), rules);
}

#[test]
fn uninstall_removes_every_jump_and_our_chains_only() {
    let saved = "\
# Generated by iptables-save
*nat
:PREROUTING ACCEPT [3:180]
:OUTPUT ACCEPT [0:0]
:KUBE_THING - [0:0]
:REMORA_OUTPUT - [0:0]
:REMORA_REDIRECT - [0:0]
-A OUTPUT -p tcp -j REMORA_OUTPUT
-A OUTPUT -p tcp -j REMORA_OUTPUT
-A OUTPUT -j KUBE_THING
-A KUBE_THING -j REMORA_OUTPUT
-A REMORA_OUTPUT -j REMORA_REDIRECT
-A REMORA_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";
    let script = uninstall_script(saved).unwrap_or_default();
    assert_eq!(
        script,
        "\
*nat
-D OUTPUT -p tcp -j REMORA_OUTPUT
-D OUTPUT -p tcp -j REMORA_OUTPUT
-D KUBE_THING -j REMORA_OUTPUT
-F REMORA_OUTPUT
-F REMORA_REDIRECT
-X REMORA_OUTPUT
-X REMORA_REDIRECT
COMMIT
"
    );
    let clean = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j KUBE_THING\nCOMMIT\n";
    assert_eq!(uninstall_script(clean), None);
}

#[test]
fn ipv6_is_up_with_a_global_or_loopback_address() {
    let lo = "00000000000000000000000000000001 01 80 10 80       lo\n";
    let link_local = "fe800000000000000000000000000001 02 40 20 80     eth0\n";
    let global = "20010db8000000000000000000000001 02 40 00 00     eth0\n";
    assert!(ipv6_up_in(lo));
    assert!(ipv6_up_in(global));
    assert!(!ipv6_up_in(link_local));
    assert!(!ipv6_up_in(""));
}

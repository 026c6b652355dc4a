//! What a process costs, read from `/proc` (Linux only).

use std::io;

/// Memory and CPU of one process at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Resident set size (`VmRSS`), bytes.
    pub rss: u64,
    /// Peak resident set size (`VmHWM`), bytes.
    pub rss_peak: u64,
    /// User plus system CPU time (`utime + stime`), seconds.
    pub cpu: f64,
}

/// Reads `/proc/<pid>/status` and `/proc/<pid>/stat`. `clk_tck` is the
/// kernel's clock-tick rate (`getconf CLK_TCK`, 100 on Linux).
pub fn usage(pid: u32, clk_tck: f64) -> io::Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .map_or(0, |n| n * 1024)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    Ok(Usage {
        rss: kib("VmRSS:"),
        rss_peak: kib("VmHWM:"),
        cpu: cpu_seconds(&stat, clk_tck).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("/proc/{pid}/stat: no utime/stime"),
            )
        })?,
    })
}

/// utime + stime from a `/proc/<pid>/stat` line, in seconds. The command
/// name (field 2) may hold spaces and parentheses, so fields are counted
/// from the last `)`.
fn cpu_seconds(stat: &str, clk_tck: f64) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clk_tck)
}

/// The kernel's clock-tick rate, from `getconf CLK_TCK` (100 if that fails).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_name() {
        let line = "42 (a (weird) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0";
        assert_eq!(cpu_seconds(line, 100.0), Some(3.0));
    }

    #[test]
    fn own_process_is_readable() {
        let u = usage(std::process::id(), clock_ticks()).expect("readable");
        assert!(u.rss > 0 && u.rss_peak >= u.rss);
    }
}

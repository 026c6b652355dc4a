//! The live table: one row per route of each sidecar, redrawn in place
//! when stdout is a terminal, printed as plain blocks otherwise (logs, CI).

use std::io::Write;
use std::time::Duration;

use crate::demo::signals::Window;
use crate::demo::traffic::ClientTotals;

const HEADERS: [&str; 9] = [
    "SIDECAR",
    "DIRECTION",
    "SERVICE",
    "ROUTE",
    "REQ/S",
    "SUCCESS",
    "P50",
    "P99",
    "RETRIES/S",
];

/// The table's lines for one refresh.
pub(crate) fn render(elapsed: Duration, window: &Window, client: &ClientTotals) -> Vec<String> {
    let mut rows: Vec<[String; 9]> = vec![HEADERS.map(str::to_string)];
    for (key, s) in window.rows() {
        rows.push([
            key.sidecar.to_string(),
            key.direction,
            short_service(&key.service).to_string(),
            key.route,
            format!("{:.1}", s.requests_per_second),
            s.success
                .map_or_else(|| "-".to_string(), |v| format!("{:.2}%", v * 100.0)),
            s.p50.map_or_else(|| "-".to_string(), latency),
            s.p99.map_or_else(|| "-".to_string(), latency),
            format!("{:.1}", s.retries_per_second),
        ]);
    }
    let mut widths = [0usize; 9];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut lines = vec![format!(
        "after {}s of traffic; rates over the last {:.0}s (success: answers below 500)",
        elapsed.as_secs(),
        window.seconds()
    )];
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            // Text columns left-aligned, numbers right-aligned.
            if i < 4 {
                line.push_str(&format!("{cell:<w$}  "));
            } else {
                line.push_str(&format!("{cell:>w$}  "));
            }
        }
        lines.push(line.trim_end().to_string());
    }
    if rows.len() == 1 {
        lines.push("(no requests counted by the sidecars yet)".to_string());
    }
    lines.push(format!(
        "frontend, client side: {} requests, {:.2}% answered 2xx (catalog v1 {}, v2 {}){}",
        client.sent,
        client.success_percent(),
        client.by_v1,
        client.by_v2,
        if client.failures.is_empty() {
            String::new()
        } else {
            format!(", {} failed", client.sent - client.ok)
        }
    ));
    for error in window.errors() {
        lines.push(format!("scrape failed: {error}"));
    }
    lines
}

/// `catalog.shop` for `catalog.shop.svc.cluster.local`: the outbound
/// rows are labelled with the service's full name.
fn short_service(service: &str) -> &str {
    service
        .strip_suffix(".svc.cluster.local")
        .unwrap_or(service)
}

/// `0.42ms`, `12.3ms`, `1.25s`.
fn latency(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        format!("{ms:.2}ms")
    } else if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.2}s", ms / 1000.0)
    }
}

/// Where the table goes.
pub(crate) struct Screen {
    terminal: bool,
    /// Lines drawn last time, to move back over them.
    drawn: usize,
}

impl Screen {
    /// `terminal`: redraw in place with ANSI escapes.
    pub(crate) fn new(terminal: bool) -> Screen {
        Screen { terminal, drawn: 0 }
    }

    /// Shows `lines`, replacing the previous table on a terminal.
    pub(crate) fn draw(&mut self, lines: &[String]) {
        let mut out = String::new();
        if self.terminal && self.drawn > 0 {
            // Up to the first line of the previous table, clear to the end.
            out.push_str(&format!("\x1b[{}F\x1b[J", self.drawn));
        }
        for line in lines {
            out.push_str(line);
            out.push('\n');
        }
        if !self.terminal {
            out.push('\n');
        }
        self.drawn = lines.len();
        let mut stdout = std::io::stdout().lock();
        // A closed stdout (`remora demo | head`) is not worth stopping for.
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }

    /// Leaves the last table on screen.
    pub(crate) fn finish(&mut self) {
        self.drawn = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_read_well() {
        assert_eq!(latency(Duration::from_micros(420)), "0.42ms");
        assert_eq!(latency(Duration::from_micros(12_340)), "12.3ms");
        assert_eq!(latency(Duration::from_millis(1250)), "1.25s");
    }
}

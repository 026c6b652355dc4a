//! Golden signals from the sidecars' `/metrics`: request rate, success
//! rate, latency percentiles and retry rate per route, over the last few
//! seconds.
//!
//! Every second each sidecar's Prometheus text is scraped into a
//! [`Scrape`]; a [`Window`] keeps the last [`WINDOW_SCRAPES`] of them and
//! the one taken when the traffic started, and rates are differences
//! between the newest and the oldest, as Prometheus' `rate()` would give.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::demo::client::Client;

/// Scrapes kept: rates are over the last `WINDOW_SCRAPES - 1` seconds.
const WINDOW_SCRAPES: usize = 6;
/// Time allowed for one scrape of one sidecar.
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(900);

const REQUESTS: &str = "remora_proxy_requests_total";
const RETRIES: &str = "remora_proxy_retries_total";
const DURATION_BUCKET: &str = "remora_proxy_request_duration_seconds_bucket";

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub(crate) name: String,
    pub(crate) labels: Vec<(String, String)>,
    pub(crate) value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Parses the Prometheus text exposition format; lines that do not parse
/// are skipped (this is a display, not a monitoring system).
pub(crate) fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' ']).unwrap_or(line.len());
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    rest = &inner[i + 1..];
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                other => key.push(other),
            }
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// A table row: one route of one sidecar, in one direction.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct RowKey {
    /// Position of the sidecar in the demo's list, for ordering.
    pub(crate) order: usize,
    pub(crate) sidecar: &'static str,
    pub(crate) direction: String,
    pub(crate) service: String,
    pub(crate) route: String,
}

/// Cumulative counters of a row.
#[derive(Debug, Clone, Default)]
struct Counters {
    requests: f64,
    /// Requests answered with a status below 500 (and, for gRPC, status OK).
    successes: f64,
    retries: f64,
    /// (upper bound, cumulative count), in increasing bound order.
    buckets: Vec<(f64, f64)>,
}

/// Every sidecar's counters at one instant.
#[derive(Debug, Clone)]
pub(crate) struct Scrape {
    at: Instant,
    rows: BTreeMap<RowKey, Counters>,
    /// Every metric summed over labels and sidecars.
    totals: BTreeMap<String, f64>,
    /// Sidecars that could not be scraped, and why.
    pub(crate) errors: Vec<String>,
}

impl Scrape {
    /// Scrapes `/metrics` of every `(name, admin address)`.
    pub(crate) async fn take(client: &Client, admins: &[(&'static str, SocketAddr)]) -> Scrape {
        let mut scrape = Scrape {
            at: Instant::now(),
            rows: BTreeMap::new(),
            totals: BTreeMap::new(),
            errors: Vec::new(),
        };
        for (order, (sidecar, admin)) in admins.iter().enumerate() {
            match tokio::time::timeout(SCRAPE_TIMEOUT, client.get_text(*admin, "/metrics")).await {
                Ok(Ok(text)) => scrape.add(order, sidecar, &parse(&text)),
                Ok(Err(e)) => scrape.errors.push(format!("{sidecar}: {e:#}")),
                Err(_) => scrape.errors.push(format!(
                    "{sidecar}: http://{admin}/metrics did not answer within {SCRAPE_TIMEOUT:?}"
                )),
            }
        }
        scrape
    }

    fn add(&mut self, order: usize, sidecar: &'static str, samples: &[Sample]) {
        for s in samples {
            *self.totals.entry(s.name.clone()).or_default() += s.value;
            let key = || RowKey {
                order,
                sidecar,
                direction: s.label("direction").to_string(),
                service: s.label("service").to_string(),
                route: s.label("route").to_string(),
            };
            match s.name.as_str() {
                REQUESTS => {
                    let row = self.rows.entry(key()).or_default();
                    row.requests += s.value;
                    let code: u16 = s.label("code").parse().unwrap_or(0);
                    let grpc_ok = matches!(s.label("grpc_status"), "" | "0");
                    if (1..500).contains(&code) && grpc_ok {
                        row.successes += s.value;
                    }
                }
                RETRIES => self.rows.entry(key()).or_default().retries += s.value,
                DURATION_BUCKET => {
                    let le = match s.label("le") {
                        "+Inf" => f64::INFINITY,
                        le => match le.parse() {
                            Ok(le) => le,
                            Err(_) => continue,
                        },
                    };
                    let row = self.rows.entry(key()).or_default();
                    row.buckets.push((le, s.value));
                    row.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
                }
                _ => {}
            }
        }
    }
}

/// A row's signals over the window.
#[derive(Debug, Clone)]
pub(crate) struct Signals {
    pub(crate) requests_per_second: f64,
    /// Share of requests that succeeded, 0 to 1; none without requests.
    pub(crate) success: Option<f64>,
    pub(crate) p50: Option<Duration>,
    pub(crate) p99: Option<Duration>,
    pub(crate) retries_per_second: f64,
}

/// The scrape taken when traffic started, and the last few since.
#[derive(Debug)]
pub(crate) struct Window {
    baseline: Scrape,
    recent: VecDeque<Scrape>,
}

impl Window {
    /// A window starting at `baseline`.
    pub(crate) fn new(baseline: Scrape) -> Window {
        let mut recent = VecDeque::new();
        recent.push_back(baseline.clone());
        Window { baseline, recent }
    }

    /// Adds the newest scrape.
    pub(crate) fn push(&mut self, scrape: Scrape) {
        self.recent.push_back(scrape);
        while self.recent.len() > WINDOW_SCRAPES {
            self.recent.pop_front();
        }
    }

    /// Errors of the newest scrape.
    pub(crate) fn errors(&self) -> &[String] {
        self.recent.back().map_or(&[], |s| s.errors.as_slice())
    }

    /// The seconds the rates are computed over.
    pub(crate) fn seconds(&self) -> f64 {
        match (self.recent.front(), self.recent.back()) {
            (Some(old), Some(new)) => new.at.duration_since(old.at).as_secs_f64(),
            _ => 0.0,
        }
    }

    /// Signals of every row that saw a request since the traffic started.
    pub(crate) fn rows(&self) -> Vec<(RowKey, Signals)> {
        let (Some(old), Some(new)) = (self.recent.front(), self.recent.back()) else {
            return Vec::new();
        };
        let seconds = new.at.duration_since(old.at).as_secs_f64();
        let empty = Counters::default();
        new.rows
            .iter()
            .filter(|(key, c)| {
                c.requests - self.baseline.rows.get(*key).map_or(0.0, |b| b.requests) > 0.0
            })
            .map(|(key, c)| {
                let before = old.rows.get(key).unwrap_or(&empty);
                (key.clone(), signals(before, c, seconds))
            })
            .collect()
    }

    /// The growth of metric `name` (summed over every label and sidecar)
    /// since the traffic started.
    pub(crate) fn total_since_start(&self, name: &str) -> u64 {
        let now = self
            .recent
            .back()
            .and_then(|s| s.totals.get(name))
            .copied()
            .unwrap_or(0.0);
        let then = self.baseline.totals.get(name).copied().unwrap_or(0.0);
        (now - then).max(0.0).round() as u64
    }
}

fn signals(before: &Counters, after: &Counters, seconds: f64) -> Signals {
    let requests = (after.requests - before.requests).max(0.0);
    let successes = (after.successes - before.successes).max(0.0);
    let retries = (after.retries - before.retries).max(0.0);
    let per_second = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
    let buckets: Vec<(f64, f64)> = after
        .buckets
        .iter()
        .map(|&(le, n)| {
            let was = before
                .buckets
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0.0, |(_, n)| *n);
            (le, (n - was).max(0.0))
        })
        .collect();
    Signals {
        requests_per_second: per_second(requests),
        success: (requests > 0.0).then(|| (successes / requests).min(1.0)),
        p50: quantile(&buckets, 0.5),
        p99: quantile(&buckets, 0.99),
        retries_per_second: per_second(retries),
    }
}

/// `histogram_quantile`: the `q` quantile of cumulative `buckets`,
/// interpolated linearly inside the bucket it falls in. In the `+Inf`
/// bucket it is the highest finite bound.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<Duration> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, cumulative) in buckets {
        if cumulative >= rank {
            if le.is_infinite() {
                return Some(Duration::from_secs_f64(lower));
            }
            let share = if cumulative > below {
                (rank - below) / (cumulative - below)
            } else {
                1.0
            };
            return Some(Duration::from_secs_f64(lower + (le - lower) * share));
        }
        lower = le;
        below = cumulative;
    }
    Some(Duration::from_secs_f64(lower))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_escapes_and_inf() {
        let text = "# HELP x y\n\
                    remora_proxy_requests_total{direction=\"outbound\",service=\"catalog\",route=\"split\",code=\"200\",grpc_status=\"\"} 42\n\
                    remora_proxy_request_duration_seconds_bucket{direction=\"outbound\",service=\"c\",route=\"r\",le=\"+Inf\"} 7\n\
                    weird{a=\"q\\\"uote\\\\\"} 1.5\n\
                    plain 3\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 4);
        assert_eq!(samples[0].label("route"), "split");
        assert_eq!(samples[0].label("grpc_status"), "");
        assert_eq!(samples[0].value, 42.0);
        assert_eq!(samples[1].label("le"), "+Inf");
        assert_eq!(samples[2].label("a"), "q\"uote\\");
        assert_eq!(samples[3].name, "plain");
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let buckets = [
            (0.001, 0.0),
            (0.002, 50.0),
            (0.004, 100.0),
            (f64::INFINITY, 100.0),
        ];
        let p50 = quantile(&buckets, 0.5).expect("p50");
        assert_eq!(p50, Duration::from_secs_f64(0.002));
        let p75 = quantile(&buckets, 0.75).expect("p75");
        assert_eq!(p75, Duration::from_secs_f64(0.003));
        assert_eq!(quantile(&[(f64::INFINITY, 0.0)], 0.5), None);
        // Everything above the last finite bound: that bound.
        let slow = [(0.5, 0.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(&slow, 0.99), Some(Duration::from_secs_f64(0.5)));
    }

    #[test]
    fn rates_and_success_over_the_window() {
        let text = |ok: u32, failed: u32, retries: u32| {
            format!(
                "remora_proxy_requests_total{{direction=\"inbound\",service=\"catalog\",route=\"inbound\",code=\"200\",grpc_status=\"\"}} {ok}\n\
                 remora_proxy_requests_total{{direction=\"inbound\",service=\"catalog\",route=\"inbound\",code=\"503\",grpc_status=\"\"}} {failed}\n\
                 remora_proxy_retries_total{{direction=\"inbound\",service=\"catalog\",route=\"inbound\"}} {retries}\n"
            )
        };
        let scrape = |at: Instant, body: String| {
            let mut s = Scrape {
                at,
                rows: BTreeMap::new(),
                totals: BTreeMap::new(),
                errors: Vec::new(),
            };
            s.add(0, "catalog-v2", &parse(&body));
            s
        };
        let t0 = Instant::now();
        let mut window = Window::new(scrape(t0, text(10, 0, 0)));
        window.push(scrape(t0 + Duration::from_secs(2), text(80, 30, 6)));
        let rows = window.rows();
        assert_eq!(rows.len(), 1);
        let (key, s) = &rows[0];
        assert_eq!(key.sidecar, "catalog-v2");
        assert!((s.requests_per_second - 50.0).abs() < 1e-9);
        assert!((s.success.expect("requests") - 0.7).abs() < 1e-9);
        assert!((s.retries_per_second - 3.0).abs() < 1e-9);
        assert_eq!(window.total_since_start(RETRIES), 6);
    }
}

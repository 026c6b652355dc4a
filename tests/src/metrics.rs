//! A parser for the Prometheus text exposition format, enough to read the
//! control plane's `/metrics`.

use std::collections::BTreeMap;

use anyhow::{Result, bail};

/// One sample: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_total`, `_bucket`, ... suffixes as exposed).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Every sample of a `/metrics` page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    samples: Vec<Sample>,
}

impl Metrics {
    /// Parses a page; `# HELP`/`# TYPE` lines and blank lines are skipped.
    pub fn parse(text: &str) -> Result<Metrics> {
        let mut samples = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match parse_sample(line) {
                Some(s) => samples.push(s),
                None => bail!("line {}: not a Prometheus sample: {line:?}", n + 1),
            }
        }
        Ok(Metrics { samples })
    }

    /// All samples.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The sum of the samples named `name` that carry every label in
    /// `labels` (others may carry more); `None` if no sample matches.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut matching = self.samples.iter().filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        });
        let first = matching.next()?;
        Some(matching.fold(first.value, |sum, s| sum + s.value))
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after)?;
        labels = parsed;
        rest = after;
    }
    // Value, then an optional timestamp.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    if name.is_empty() {
        return None;
    }
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` and returns the labels and what follows `}`.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_values_and_sums() {
        let text = r#"
# HELP remora_config_reloads_total Reloads.
# TYPE remora_config_reloads_total counter
remora_config_reloads_total{source="file"} 3
remora_config_reload_failures_total{source="file"} 0
remora_xds_connected_clients{api="sotw",kind="envoy"} 1
remora_xds_connected_clients{api="delta",kind="envoy"} 2
weird{a="x\"y,z}",b="\\"} 1.5e1 1700000000
up 1
"#;
        let m = Metrics::parse(text).expect("parses");
        assert_eq!(
            m.value("remora_config_reloads_total", &[("source", "file")]),
            Some(3.0)
        );
        assert_eq!(
            m.value("remora_config_reload_failures_total", &[("source", "file")]),
            Some(0.0)
        );
        assert_eq!(
            m.value("remora_xds_connected_clients", &[("kind", "envoy")]),
            Some(3.0)
        );
        assert_eq!(
            m.value("remora_xds_connected_clients", &[("api", "delta")]),
            Some(2.0)
        );
        assert_eq!(
            m.value("weird", &[("a", "x\"y,z}"), ("b", "\\")]),
            Some(15.0)
        );
        assert_eq!(m.value("up", &[]), Some(1.0));
        assert_eq!(
            m.value("remora_config_reloads_total", &[("source", "k8s")]),
            None
        );
        assert!(Metrics::parse("garbage{").is_err());
    }
}

//! The YAML mesh file: a whole [`Mesh`] described in one file, read at
//! startup and watched for edits.
//!
//! Parsing happens in three passes, each keeping the file's own field paths
//! (`services[1].routes[0].backends[0].service`) so every problem can be
//! pointed at a line and column:
//!
//! 1. serde reads the text into the `Raw*` structs below, which mirror the
//!    file. Unknown fields, wrong types and unknown enum names stop here, with
//!    the location serde_yaml_ng gives.
//! 2. `convert` turns the raw values into model types (durations, IPs, port
//!    ranges, regexes, exactly-one-of choices), collecting every problem, and
//!    puts a neutral placeholder where a value is bad so that
//! 3. [`Mesh::new`] can still check the cross-field rules (duplicates,
//!    references) and report those problems too.
//!
//! Problems found after serde carry only a [`FieldPath`]; an [`Index`] built
//! from yaml-rust2's marked events maps it back to a line and column.
//!
//! [`watch`] follows the file through in-place writes, editors that replace
//! it by rename, and Kubernetes ConfigMap symlink swaps.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::Watcher as _;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::Publisher;
use crate::model::{
    Backend, Backoff, DEFAULT_CONNECT_TIMEOUT, DEFAULT_TRUST_DOMAIN, DNS_SUFFIX, Endpoint,
    FieldPath, HeaderMatch, Health, Identity, LoadBalancer, Mesh, ModelError, MtlsMode,
    OutboundTraffic, PathMatch, PathSegment, Pattern, Protocol, QueryMatch, RetryOn, RetryPolicy,
    Route, RouteMatch, Secret, Service, ServiceKey, ServicePort, StringMatch, Subset,
    WorkloadToken,
};

#[cfg(test)]
mod tests;

/// The source name used in metrics and logs.
pub const SOURCE: &str = "file";

/// Namespace of a service that names none.
const DEFAULT_NAMESPACE: &str = "default";

/// Service account of an endpoint that names none.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// How long the file must be quiet after an event before it is read, so a
/// burst of events from one save is read once, after the save.
const DEBOUNCE_QUIET: Duration = Duration::from_millis(75);

/// Longest wait after the first event of a burst, so a file that is written
/// continuously is still picked up.
const DEBOUNCE_MAX: Duration = Duration::from_millis(300);

// === API ===

/// Reads and validates a mesh file.
pub fn load(path: &Path) -> Result<Mesh, FileError> {
    let bytes = std::fs::read(path).map_err(|e| FileError::unreadable(path, e))?;
    parse_bytes(path, &bytes)
}

/// Parses text; `path` is only used in messages.
pub fn parse(path: &Path, text: &str) -> Result<Mesh, FileError> {
    let mut problems = match serde_yaml_ng::from_str::<RawMesh>(text) {
        Err(e) => vec![serde_problem(&Index::build(text), &e)],
        Ok(raw) => {
            let index = Index::build(text);
            if !index.has_document() {
                vec![Problem {
                    location: None,
                    field: None,
                    message: "the mesh file has no content: write `services: []` for a mesh \
                              with no services"
                        .to_string(),
                }]
            } else {
                match build(raw) {
                    Ok(mesh) => return Ok(mesh),
                    Err(errors) => errors
                        .into_iter()
                        .map(|e| Problem {
                            location: index.locate(&e.path),
                            field: Some(e.path.to_string()),
                            message: e.message,
                        })
                        .collect(),
                }
            }
        }
    };
    problems.sort_by_key(|p| p.location);
    Err(FileError {
        file: path.to_path_buf(),
        problems,
        io: None,
    })
}

fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<Mesh, FileError> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse(path, text),
        Err(e) => {
            let (line, column) = line_col(&bytes[..e.valid_up_to()]);
            Err(FileError {
                file: path.to_path_buf(),
                problems: vec![Problem {
                    location: Some(Location { line, column }),
                    field: None,
                    message: format!("the mesh file is not UTF-8 text: {e}"),
                }],
                io: None,
            })
        }
    }
}

/// 1-based line and column just after `before`.
fn line_col(before: &[u8]) -> (usize, usize) {
    let valid = String::from_utf8_lossy(before);
    let line = valid.matches('\n').count() + 1;
    let column = valid.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

// === Errors ===

/// Everything wrong with a mesh file: every problem found, not just the
/// first. Displays one problem per line, `FILE:LINE:COL: FIELD: MESSAGE`.
#[derive(Debug)]
pub struct FileError {
    file: PathBuf,
    problems: Vec<Problem>,
    io: Option<io::Error>,
}

/// One problem in a mesh file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where it is, when known.
    pub location: Option<Location>,
    /// The field, in the file's terms (`services[0].ports[1].port`), when
    /// known.
    pub field: Option<String>,
    /// What is wrong, and what would be right.
    pub message: String,
}

/// A place in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
}

impl FileError {
    fn unreadable(path: &Path, error: io::Error) -> FileError {
        FileError {
            file: path.to_path_buf(),
            problems: vec![Problem {
                location: None,
                field: None,
                message: format!("cannot read the mesh file: {error}"),
            }],
            io: Some(error),
        }
    }

    /// The file, as it was named to [`load`] or [`parse`].
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Every problem, in file order.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}", self.file.display())?;
            if let Some(l) = p.location {
                write!(f, ":{}:{}", l.line, l.column)?;
            }
            if let Some(field) = &p.field {
                write!(f, ": {field}")?;
            }
            write!(f, ": {}", p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.io.as_ref().map(|e| e as _)
    }
}

/// Why [`watch`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The path names no file (`/`, `..`).
    #[error("{}: the mesh file path must name a file", path.display())]
    NotAFile {
        /// The path given.
        path: PathBuf,
    },
    /// The directory could not be watched.
    #[error(
        "cannot watch {} for changes to the mesh file: {source} (check that the directory \
         exists and is readable, and that fs.inotify.max_user_watches is not exhausted)",
        dir.display()
    )]
    Watch {
        /// The directory.
        dir: PathBuf,
        /// What notify said.
        source: notify::Error,
    },
}

/// Turns a serde_yaml_ng error into a problem. Its text is
/// `PATH: MESSAGE at line L column C`; the location is kept, and the path is
/// recognised among the index's paths so it reads like every other field.
fn serde_problem(index: &Index, error: &serde_yaml_ng::Error) -> Problem {
    let location = error.location().map(|l| Location {
        line: l.line(),
        column: l.column(),
    });
    let mut message = error.to_string();
    if let Some(l) = location {
        message = message.replacen(&format!(" at line {} column {}", l.line, l.column), "", 1);
    }
    let prefix = index
        .marks
        .keys()
        .filter(|p| !p.is_empty() && message.starts_with(&format!("{p}: ")))
        .max_by_key(|p| p.len())
        .cloned();
    if let Some(p) = &prefix {
        message.drain(..p.len() + 2);
    }
    let mut field = prefix;
    // serde reports an unknown or missing field at its mapping; name the
    // field itself.
    if let Some(name) = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|p| message.strip_prefix(p))
        .and_then(|rest| rest.split('`').next())
    {
        field = Some(match field {
            Some(parent) => format!("{parent}.{name}"),
            None => name.to_string(),
        });
    }
    Problem {
        location,
        field,
        message,
    }
}

// === Index: field paths to file locations ===

/// Where each node of the file starts, by its field path. A mapping entry is
/// recorded at its key.
struct Index {
    /// Rendered [`FieldPath`] (the root is `""`) to location and char index.
    marks: HashMap<String, (Location, usize)>,
}

impl Index {
    /// Indexes the first document of `text`. A syntax error ends the walk
    /// early; what was seen until then is kept.
    fn build(text: &str) -> Index {
        let mut builder = IndexBuilder {
            marks: HashMap::new(),
            frames: Vec::new(),
            root_seen: false,
        };
        // A syntax error is reported by serde, with its location; the partial
        // index is still good for what came before it.
        let _ = Parser::new_from_str(text).load(&mut builder, false);
        Index {
            marks: builder.marks,
        }
    }

    /// True when the file holds a document (not only comments).
    fn has_document(&self) -> bool {
        self.marks.contains_key("")
    }

    /// The location of `path`, or of its nearest parent in the file (for a
    /// defaulted field, its mapping).
    fn locate(&self, path: &FieldPath) -> Option<Location> {
        let segments = path.segments();
        (0..=segments.len()).rev().find_map(|n| {
            let prefix = segments[..n]
                .iter()
                .fold(FieldPath::root(), |p, s| match s {
                    PathSegment::Key(k) => p.key(k),
                    PathSegment::Index(i) => p.index(*i),
                });
            self.marks.get(&prefix.to_string()).map(|(l, _)| *l)
        })
    }
}

struct IndexBuilder {
    marks: HashMap<String, (Location, usize)>,
    frames: Vec<Frame>,
    root_seen: bool,
}

/// An open collection. `path` is `None` below a complex key, which no field
/// path can name.
enum Frame {
    Seq {
        path: Option<FieldPath>,
        next: usize,
    },
    Map {
        path: Option<FieldPath>,
        /// `None` while a key is expected; the key (if a scalar) while its
        /// value is expected.
        key: Option<Option<String>>,
        /// A block mapping's start mark points past its first key; the first
        /// key's mark is the right one for this recorded path.
        fix_start: Option<String>,
    },
}

impl IndexBuilder {
    fn record(&mut self, path: &FieldPath, mark: Marker) -> Option<String> {
        let rendered = path.to_string();
        if self.marks.contains_key(&rendered) {
            return None;
        }
        let location = Location {
            line: mark.line(),
            // yaml-rust2 counts columns from 0.
            column: mark.col() + 1,
        };
        self.marks
            .insert(rendered.clone(), (location, mark.index()));
        Some(rendered)
    }

    /// Handles a mapping key; returns false when the node is not a key.
    fn key(&mut self, event: &Event, mark: Marker) -> bool {
        let Some(Frame::Map {
            path,
            key: key @ None,
            fix_start,
        }) = self.frames.last_mut()
        else {
            return false;
        };
        let name = match event {
            Event::Scalar(s, ..) => Some(s.clone()),
            _ => None,
        };
        *key = Some(name.clone());
        let path = path.clone();
        if let Some(start) = fix_start.take()
            && let Some((location, index)) = self.marks.get_mut(&start)
            && mark.index() < *index
        {
            *location = Location {
                line: mark.line(),
                column: mark.col() + 1,
            };
            *index = mark.index();
        }
        if let (Some(path), Some(name)) = (path, name) {
            self.record(&path.key(&name), mark);
        }
        true
    }

    /// Records a value node and returns its path.
    fn value(&mut self, mark: Marker) -> (Option<FieldPath>, Option<String>) {
        let path = match self.frames.last_mut() {
            None if !self.root_seen => {
                self.root_seen = true;
                Some(FieldPath::root())
            }
            None => None,
            Some(Frame::Seq { path, next }) => {
                let p = path.as_ref().map(|p| p.index(*next));
                *next += 1;
                p
            }
            Some(Frame::Map { path, key, .. }) => match key.take() {
                Some(Some(k)) => path.as_ref().map(|p| p.key(&k)),
                _ => None,
            },
        };
        let recorded = path.as_ref().and_then(|p| self.record(p, mark));
        (path, recorded)
    }
}

impl MarkedEventReceiver for IndexBuilder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::Scalar(..) | Event::Alias(..) => {
                if !self.key(&event, mark) {
                    self.value(mark);
                }
            }
            Event::MappingStart(..) => {
                // A complex key: its contents have no field path.
                let (path, fix_start) = if self.key(&event, mark) {
                    (None, None)
                } else {
                    self.value(mark)
                };
                self.frames.push(Frame::Map {
                    path,
                    key: None,
                    fix_start,
                });
            }
            Event::SequenceStart(..) => {
                let path = if self.key(&event, mark) {
                    None
                } else {
                    self.value(mark).0
                };
                self.frames.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.frames.pop();
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

// === The file's schema ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mesh: a mapping with `services`")]
struct RawMesh {
    trust_domain: Option<String>,
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default)]
    workload_tokens: Vec<RawWorkloadToken>,
    outbound_traffic: Option<RawOutboundTraffic>,
}

#[derive(Deserialize)]
#[serde(
    rename_all = "SCREAMING_SNAKE_CASE",
    expecting = "ALLOW_ANY or REGISTRY_ONLY"
)]
enum RawOutboundTraffic {
    AllowAny,
    RegistryOnly,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a workload token: a mapping with `namespace`, `service_account` and `token`"
)]
struct RawWorkloadToken {
    namespace: String,
    service_account: String,
    token: String,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a service: a mapping with `name` and `ports`"
)]
struct RawService {
    name: String,
    namespace: Option<String>,
    vip: Option<String>,
    hostname: Option<String>,
    load_balancer: Option<RawLoadBalancer>,
    connect_timeout: Option<String>,
    detect_timeout: Option<String>,
    mtls: Option<RawMtlsMode>,
    ports: Vec<RawPort>,
    #[serde(default)]
    subsets: Vec<RawSubset>,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", expecting = "round_robin or least_request")]
enum RawLoadBalancer {
    RoundRobin,
    LeastRequest,
}

#[derive(Deserialize)]
#[serde(rename_all = "UPPERCASE", expecting = "STRICT or PERMISSIVE")]
enum RawMtlsMode {
    Strict,
    Permissive,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase", expecting = "http, http2, grpc or tcp")]
enum RawProtocol {
    Http,
    Http2,
    Grpc,
    Tcp,
}

#[derive(Deserialize)]
#[serde(
    rename_all = "snake_case",
    expecting = "healthy, unhealthy or draining"
)]
enum RawHealth {
    Healthy,
    Unhealthy,
    Draining,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a port: a mapping with `port` and `protocol`"
)]
struct RawPort {
    name: Option<String>,
    port: Int,
    protocol: RawProtocol,
    target_port: Option<Int>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a subset: a mapping with `name` and `labels`"
)]
struct RawSubset {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an endpoint: a mapping with `address`"
)]
struct RawEndpoint {
    address: String,
    port: Option<Int>,
    #[serde(default)]
    ports: BTreeMap<String, Int>,
    weight: Option<Int>,
    identity: Option<RawIdentity>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    health: Option<RawHealth>,
    zone: Option<String>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an identity: a mapping with `namespace` and `service_account`"
)]
struct RawIdentity {
    namespace: Option<String>,
    service_account: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a route: a mapping with `backends`")]
struct RawRoute {
    name: Option<String>,
    #[serde(rename = "match")]
    matches: Option<RawMatch>,
    backends: Vec<RawBackend>,
    timeout: Option<String>,
    retry: Option<RawRetry>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a match: a mapping of `path`, `method`, `headers`, `query`"
)]
struct RawMatch {
    path: Option<RawPathMatch>,
    method: Option<String>,
    #[serde(default)]
    headers: Vec<RawHeaderMatch>,
    #[serde(default)]
    query: Vec<RawQueryMatch>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a path match: a mapping with one of `exact`, `prefix` or `regex`"
)]
struct RawPathMatch {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a header match: a mapping with `name` and one of `exact`, `prefix`, `regex` or `present`"
)]
struct RawHeaderMatch {
    name: String,
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
    present: Option<bool>,
    #[serde(default)]
    invert: bool,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a query match: a mapping with `name` and one of `exact`, `prefix`, `regex` or `present`"
)]
struct RawQueryMatch {
    name: String,
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
    present: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a backend: a mapping with `service`")]
struct RawBackend {
    service: String,
    namespace: Option<String>,
    port: Option<Int>,
    subset: Option<String>,
    weight: Option<Int>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a retry policy: a mapping with `on`")]
struct RawRetry {
    #[serde(default)]
    on: Vec<String>,
    attempts: Option<u32>,
    per_try_timeout: Option<String>,
    backoff: Option<RawBackoff>,
    #[serde(default)]
    status_codes: Vec<u16>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a backoff: a mapping with `base` and `max`"
)]
struct RawBackoff {
    base: Option<String>,
    max: Option<String>,
}

/// An integer of any sign and size, range-checked during conversion so the
/// message can name the field and the accepted range.
#[derive(Clone, Copy)]
struct Int(i128);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Int, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
            fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Int, E> {
                Ok(Int(v))
            }
        }
        deserializer.deserialize_i128(Visitor)
    }
}

// === Conversion to the model ===

/// Converts the raw file and checks the model, returning every problem.
///
/// A bad value is reported and replaced by a neutral placeholder, so the
/// model's own checks still run; model errors at or below a reported field
/// are dropped, as they would only restate the placeholder.
fn build(raw: RawMesh) -> Result<Mesh, Vec<ModelError>> {
    let mut cx = Convert { errors: Vec::new() };
    let root = FieldPath::root();
    let services = raw
        .services
        .into_iter()
        .enumerate()
        .map(|(i, s)| cx.service(s, &root.key("services").index(i)))
        .collect();
    let trust_domain = raw
        .trust_domain
        .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string());
    // The model checks the tokens (length, duplicates, names); nothing here
    // may quote one in a message.
    let workload_tokens = raw
        .workload_tokens
        .into_iter()
        .map(|t| WorkloadToken {
            identity: Identity {
                namespace: t.namespace,
                service_account: t.service_account,
            },
            token: Secret::new(t.token),
        })
        .collect();
    let outbound_traffic = match raw.outbound_traffic {
        None | Some(RawOutboundTraffic::AllowAny) => OutboundTraffic::AllowAny,
        Some(RawOutboundTraffic::RegistryOnly) => OutboundTraffic::RegistryOnly,
    };
    let mut errors = cx.errors;
    match Mesh::new(trust_domain, services, workload_tokens) {
        Ok(mesh) if errors.is_empty() => Ok(mesh.with_outbound_traffic(outbound_traffic)),
        Ok(_) => Err(errors),
        Err(model_errors) => {
            let reported: Vec<String> = errors.iter().map(|e| e.path.to_string()).collect();
            errors.extend(model_errors.into_iter().filter(|e| {
                let path = e.path.to_string();
                !reported.iter().any(|r| {
                    path == *r
                        || path
                            .strip_prefix(r.as_str())
                            .is_some_and(|rest| rest.starts_with(['.', '[']))
                })
            }));
            Err(errors)
        }
    }
}

struct Convert {
    errors: Vec<ModelError>,
}

impl Convert {
    fn error(&mut self, path: FieldPath, message: impl Into<String>) {
        self.errors.push(ModelError::new(path, message));
    }

    fn service(&mut self, raw: RawService, path: &FieldPath) -> Service {
        let namespace = raw
            .namespace
            .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
        let vip = raw.vip.and_then(|v| self.ip(&v, &path.key("vip")));
        let connect_timeout = match raw.connect_timeout {
            None => DEFAULT_CONNECT_TIMEOUT,
            Some(text) => {
                let p = path.key("connect_timeout");
                match self.duration(&text, &p) {
                    Some(d) if d.is_zero() => {
                        self.error(p, "connect_timeout must be above 0");
                        DEFAULT_CONNECT_TIMEOUT
                    }
                    Some(d) => d,
                    None => DEFAULT_CONNECT_TIMEOUT,
                }
            }
        };
        let ports = raw
            .ports
            .into_iter()
            .enumerate()
            .map(|(i, port)| {
                let p = path.key("ports").index(i);
                ServicePort {
                    name: port.name,
                    // 0 is refused by the model, whose error on it is dropped.
                    port: self.port(port.port, &p.key("port")).unwrap_or(0),
                    protocol: match port.protocol {
                        RawProtocol::Http => Protocol::Http,
                        RawProtocol::Http2 => Protocol::Http2,
                        RawProtocol::Grpc => Protocol::Grpc,
                        RawProtocol::Tcp => Protocol::Tcp,
                    },
                    target_port: port
                        .target_port
                        .and_then(|n| self.port(n, &p.key("target_port"))),
                }
            })
            .collect();
        let subsets = raw
            .subsets
            .into_iter()
            .map(|s| Subset {
                name: s.name,
                labels: s.labels,
            })
            .collect();
        let endpoints = raw
            .endpoints
            .into_iter()
            .enumerate()
            .map(|(i, e)| self.endpoint(e, &namespace, &path.key("endpoints").index(i)))
            .collect();
        let routes = raw
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, r)| self.route(r, i, &namespace, &path.key("routes").index(i)))
            .collect();
        Service {
            name: raw.name,
            namespace,
            vip,
            hostname: raw.hostname,
            ports,
            load_balancer: match raw.load_balancer {
                None | Some(RawLoadBalancer::RoundRobin) => LoadBalancer::RoundRobin,
                Some(RawLoadBalancer::LeastRequest) => LoadBalancer::LeastRequest,
            },
            connect_timeout,
            detect_timeout: raw.detect_timeout.and_then(|text| {
                let p = path.key("detect_timeout");
                match self.duration(&text, &p) {
                    Some(d) if d.is_zero() => {
                        self.error(p, "detect_timeout must be above 0 (declare the port `protocol: tcp` to skip detection)");
                        None
                    }
                    other => other,
                }
            }),
            mtls: match raw.mtls {
                None | Some(RawMtlsMode::Strict) => MtlsMode::Strict,
                Some(RawMtlsMode::Permissive) => MtlsMode::Permissive,
            },
            subsets,
            endpoints,
            routes,
        }
    }

    fn endpoint(&mut self, raw: RawEndpoint, namespace: &str, path: &FieldPath) -> Endpoint {
        let address = self
            .ip(&raw.address, &path.key("address"))
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let port = raw.port.and_then(|n| self.port(n, &path.key("port")));
        let ports = raw
            .ports
            .into_iter()
            .filter_map(|(name, n)| {
                let number = self.port(n, &path.key("ports").key(&name))?;
                Some((name, number))
            })
            .collect();
        let weight = match raw.weight {
            None => NonZeroU32::MIN,
            Some(Int(w)) => match u32::try_from(w).ok().and_then(NonZeroU32::new) {
                Some(w) => w,
                None => {
                    self.error(
                        path.key("weight"),
                        format!(
                            "weight must be 1-{}, got {w}: to take an endpoint out of \
                             rotation, set `health: draining` or remove it",
                            u32::MAX
                        ),
                    );
                    NonZeroU32::MIN
                }
            },
        };
        Endpoint {
            address,
            port,
            ports,
            weight,
            identity: raw.identity.map(|identity| Identity {
                namespace: identity.namespace.unwrap_or_else(|| namespace.to_string()),
                service_account: identity
                    .service_account
                    .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_string()),
            }),
            labels: raw.labels,
            health: match raw.health {
                None | Some(RawHealth::Healthy) => Health::Healthy,
                Some(RawHealth::Unhealthy) => Health::Unhealthy,
                Some(RawHealth::Draining) => Health::Draining,
            },
            zone: raw.zone,
        }
    }

    fn route(&mut self, raw: RawRoute, index: usize, namespace: &str, path: &FieldPath) -> Route {
        let matches = match raw.matches {
            None => RouteMatch::default(),
            Some(m) => self.route_match(m, &path.key("match")),
        };
        let backends = raw
            .backends
            .into_iter()
            .enumerate()
            .map(|(i, b)| self.backend(b, namespace, &path.key("backends").index(i)))
            .collect();
        let timeout = raw
            .timeout
            .and_then(|t| self.duration(&t, &path.key("timeout")));
        let retry = raw.retry.map(|r| self.retry(r, &path.key("retry")));
        Route {
            name: raw.name.unwrap_or_else(|| format!("route-{index}")),
            matches,
            backends,
            timeout,
            retry,
        }
    }

    fn route_match(&mut self, raw: RawMatch, path: &FieldPath) -> RouteMatch {
        let path_match = raw.path.and_then(|m| {
            let p = path.key("path");
            let given = [
                ("exact", &m.exact),
                ("prefix", &m.prefix),
                ("regex", &m.regex),
            ];
            self.exactly_one(&given, &p)?;
            if let Some(s) = m.exact {
                Some(PathMatch::Exact(s))
            } else if let Some(s) = m.prefix {
                Some(PathMatch::Prefix(s))
            } else {
                let regex = m.regex?;
                self.pattern(&regex, &p.key("regex")).map(PathMatch::Regex)
            }
        });
        let headers = raw
            .headers
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                let p = path.key("headers").index(i);
                HeaderMatch {
                    value: self
                        .string_match(h.exact, h.prefix, h.regex, h.present, true, &p)
                        .unwrap_or(StringMatch::Present),
                    name: h.name,
                    invert: h.invert,
                }
            })
            .collect();
        let query = raw
            .query
            .into_iter()
            .enumerate()
            .map(|(i, q)| {
                let p = path.key("query").index(i);
                QueryMatch {
                    value: self
                        .string_match(q.exact, q.prefix, q.regex, q.present, false, &p)
                        .unwrap_or(StringMatch::Present),
                    name: q.name,
                }
            })
            .collect();
        RouteMatch {
            path: path_match,
            method: raw.method,
            headers,
            query,
        }
    }

    fn string_match(
        &mut self,
        exact: Option<String>,
        prefix: Option<String>,
        regex: Option<String>,
        present: Option<bool>,
        can_invert: bool,
        path: &FieldPath,
    ) -> Option<StringMatch> {
        if present == Some(false) {
            let hint = if can_invert {
                "; to match a missing header, use `present: true` with `invert: true`"
            } else {
                "; leave the condition out to match with or without the parameter"
            };
            self.error(
                path.key("present"),
                format!("`present` can only be true{hint}"),
            );
            return None;
        }
        let present = present.map(|_| String::new());
        let given = [
            ("exact", &exact),
            ("prefix", &prefix),
            ("regex", &regex),
            ("present", &present),
        ];
        self.exactly_one(&given, path)?;
        if let Some(s) = exact {
            Some(StringMatch::Exact(s))
        } else if let Some(s) = prefix {
            Some(StringMatch::Prefix(s))
        } else if let Some(r) = regex {
            self.pattern(&r, &path.key("regex")).map(StringMatch::Regex)
        } else {
            Some(StringMatch::Present)
        }
    }

    /// Checks that exactly one of the options is given.
    fn exactly_one(&mut self, given: &[(&str, &Option<String>)], path: &FieldPath) -> Option<()> {
        let set: Vec<&str> = given
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(name, _)| *name)
            .collect();
        if set.len() == 1 {
            return Some(());
        }
        let names: Vec<String> = given.iter().map(|(n, _)| format!("`{n}`")).collect();
        let options = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.join(""),
        };
        let got = match set.as_slice() {
            [] => "none is set".to_string(),
            [a, b] => format!("both `{a}` and `{b}` are set"),
            many => format!(
                "{} are set",
                many.iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        self.error(
            path.clone(),
            format!("give exactly one of {options}, but {got}"),
        );
        None
    }

    fn backend(&mut self, raw: RawBackend, namespace: &str, path: &FieldPath) -> Backend {
        let service = match (raw.service.split_once('.'), raw.namespace) {
            (None, ns) => ServiceKey {
                name: raw.service,
                namespace: ns.unwrap_or_else(|| namespace.to_string()),
            },
            (Some(_), Some(ns)) => {
                self.error(
                    path.key("service"),
                    format!(
                        "service {:?} names a namespace and `namespace: {ns}` names another: \
                         give the namespace in one place",
                        raw.service
                    ),
                );
                ServiceKey {
                    name: raw.service,
                    namespace: ns,
                }
            }
            (Some((name, rest)), None) => {
                let fqdn = format!(".svc.{DNS_SUFFIX}");
                let ns = rest.strip_suffix(&fqdn).unwrap_or(rest);
                if ns.is_empty() || name.is_empty() || ns.contains('.') {
                    self.error(
                        path.key("service"),
                        format!(
                            "service {:?} must be `name`, `name.namespace` or \
                             `name.namespace.svc.{DNS_SUFFIX}`",
                            raw.service
                        ),
                    );
                }
                ServiceKey {
                    name: name.to_string(),
                    namespace: ns.to_string(),
                }
            }
        };
        let weight = match raw.weight {
            None => 1,
            Some(Int(w)) => u32::try_from(w).unwrap_or_else(|_| {
                self.error(
                    path.key("weight"),
                    format!("weight must be 0-{}, got {w}", u32::MAX),
                );
                1
            }),
        };
        Backend {
            service,
            port: raw.port.and_then(|n| self.port(n, &path.key("port"))),
            subset: raw.subset,
            weight,
        }
    }

    fn retry(&mut self, raw: RawRetry, path: &FieldPath) -> RetryPolicy {
        let on = raw
            .on
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let parsed = RetryOn::parse(name);
                if parsed.is_none() {
                    let valid: Vec<&str> = RetryOn::ALL.iter().map(|r| r.as_str()).collect();
                    self.error(
                        path.key("on").index(i),
                        format!(
                            "unknown retry condition {name:?}; valid conditions: {}",
                            valid.join(", ")
                        ),
                    );
                }
                parsed
            })
            .collect();
        let per_try_timeout = raw
            .per_try_timeout
            .and_then(|t| self.duration(&t, &path.key("per_try_timeout")));
        let backoff = match raw.backoff {
            None => Backoff::default(),
            Some(b) => {
                let p = path.key("backoff");
                let base = b
                    .base
                    .and_then(|t| self.duration(&t, &p.key("base")))
                    .unwrap_or(Backoff::default().base);
                // Like Envoy: the ceiling defaults to 10 times the base.
                let max = b
                    .max
                    .and_then(|t| self.duration(&t, &p.key("max")))
                    .unwrap_or(base.saturating_mul(10));
                Backoff { base, max }
            }
        };
        RetryPolicy {
            on,
            attempts: raw.attempts.unwrap_or(1),
            per_try_timeout,
            backoff,
            status_codes: raw.status_codes,
        }
    }

    fn port(&mut self, Int(value): Int, path: &FieldPath) -> Option<u16> {
        match u16::try_from(value) {
            Ok(n) if n > 0 => Some(n),
            _ => {
                self.error(
                    path.clone(),
                    format!("{} must be 1-65535, got {value}", field_name(path)),
                );
                None
            }
        }
    }

    fn ip(&mut self, text: &str, path: &FieldPath) -> Option<IpAddr> {
        match text.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                self.error(
                    path.clone(),
                    format!(
                        "{} {text:?} is not an IP address: write an IPv4 address like 10.0.0.1 \
                         or an IPv6 address like fd00::1 (host names are not resolved)",
                        field_name(path)
                    ),
                );
                None
            }
        }
    }

    fn duration(&mut self, text: &str, path: &FieldPath) -> Option<Duration> {
        match parse_duration(text) {
            Ok(d) => Some(d),
            Err(problem) => {
                self.error(
                    path.clone(),
                    format!(
                        "{} {text:?} {problem}: write a number followed by ms, s, m or h, \
                         e.g. 250ms, 1.5s, 2m or 1h",
                        field_name(path)
                    ),
                );
                None
            }
        }
    }

    fn pattern(&mut self, text: &str, path: &FieldPath) -> Option<Pattern> {
        match Pattern::new(text) {
            Ok(p) => Some(p),
            Err(e) => {
                self.error(
                    path.clone(),
                    format!("invalid regex {text:?}: {}", one_line(&e)),
                );
                None
            }
        }
    }
}

/// The last key of a path, to name the field in a message.
fn field_name(path: &FieldPath) -> &str {
    path.segments()
        .iter()
        .rev()
        .find_map(|s| match s {
            PathSegment::Key(k) => Some(k.as_str()),
            PathSegment::Index(_) => None,
        })
        .unwrap_or("value")
}

/// regex's syntax errors span several lines (the pattern, a caret, the
/// error); keep the error so a problem stays on one line.
fn one_line(error: &regex::Error) -> String {
    let text = error.to_string();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .map(str::to_string)
        .unwrap_or_else(|| {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ")
        })
}

/// Parses `250ms`, `1.5s`, `2m`, `1h` exactly (no floating point).
/// The error completes "connect_timeout "x" ...".
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let malformed =
        whole.is_empty() || fraction.contains('.') || (number.contains('.') && fraction.is_empty());
    if malformed {
        return Err("is not a duration".to_string());
    }
    let unit_nanos: u128 = match unit {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        "" => return Err("has no unit".to_string()),
        other => return Err(format!("has an unknown unit {other:?}")),
    };
    if fraction.len() > 9 {
        return Err("has more than 9 decimal places".to_string());
    }
    let too_large = || "is too large".to_string();
    let whole: u128 = whole.parse().map_err(|_| too_large())?;
    let fraction_value: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| too_large())?
    };
    let scale = 10u128.pow(fraction.len() as u32);
    let nanos = whole
        .checked_mul(unit_nanos)
        .and_then(|n| n.checked_add(fraction_value * unit_nanos / scale))
        .ok_or_else(too_large)?;
    u64::try_from(nanos)
        .map(Duration::from_nanos)
        .map_err(|_| too_large())
}

// === Watching ===

/// Watches `path` and publishes every valid edit through `publisher`; an
/// invalid edit is refused with [`Publisher::reject`] and the last good mesh
/// keeps serving. Runs until the task is dropped.
///
/// The parent directory is watched rather than the file, so editors that
/// replace the file by rename and Kubernetes ConfigMap volumes (where the
/// file is a symlink through `..data`, swapped atomically) are followed.
/// When the file is a symlink into another directory, that directory is
/// watched too. Bursts of events are read once, after [`DEBOUNCE_QUIET`];
/// a read that finds the same bytes as the last one publishes nothing.
///
/// The file is read once when the watch starts, so an edit made between
/// [`load`] and this call is not missed.
pub async fn watch(path: PathBuf, publisher: Publisher) -> Result<(), WatchError> {
    let Some(name) = path.file_name().map(OsString::from) else {
        return Err(WatchError::NotAFile { path });
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };

    // The callback runs on notify's thread: it filters events and wakes the
    // task through a channel of capacity 1 (a full channel already holds a
    // wake-up, so nothing is lost by dropping another).
    let names = Arc::new(Mutex::new(vec![name.clone()]));
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let filter = Arc::clone(&names);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match event {
            Ok(event) => is_relevant(&event, &filter),
            Err(error) => {
                tracing::warn!(%error, "mesh file watch error; re-reading the file");
                true
            }
        };
        if relevant {
            let _ = tx.try_send(());
        }
    })
    .map_err(|source| WatchError::Watch {
        dir: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .map_err(|source| WatchError::Watch {
            dir: dir.clone(),
            source,
        })?;
    tracing::info!(file = %path.display(), dir = %dir.display(), "watching the mesh file");

    let mut state = WatchState {
        path,
        name,
        dir_canonical: std::fs::canonicalize(&dir).ok(),
        target_dir: None,
        last: None,
        names,
    };
    state.follow_symlink(&mut watcher);
    state.reload(&publisher, true).await;

    loop {
        if rx.recv().await.is_none() {
            return Ok(());
        }
        let deadline = Instant::now() + DEBOUNCE_MAX;
        loop {
            let until = (Instant::now() + DEBOUNCE_QUIET).min(deadline);
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) => return Ok(()),
                Err(_elapsed) => break,
            }
        }
        state.follow_symlink(&mut watcher);
        state.reload(&publisher, false).await;
    }
}

/// True when the event may concern the file: it names the file, the
/// symlink's target, or a ConfigMap volume's `..data` machinery.
fn is_relevant(event: &notify::Event, names: &Mutex<Vec<OsString>>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    // Reading the file (our own reads included) is no change; a writer
    // closing it is.
    if matches!(event.kind, EventKind::Access(kind) if kind != AccessKind::Close(AccessMode::Write))
    {
        return false;
    }
    if event.paths.is_empty() {
        return true;
    }
    let Ok(names) = names.lock() else {
        return true;
    };
    event.paths.iter().any(|p| {
        p.file_name().is_some_and(|n| {
            names.iter().any(|name| name == n) || n.as_encoded_bytes().starts_with(b"..")
        })
    })
}

struct WatchState {
    path: PathBuf,
    name: OsString,
    dir_canonical: Option<PathBuf>,
    /// The directory of the symlink's target, when outside `dir`.
    target_dir: Option<PathBuf>,
    /// The bytes read last, to skip events that changed nothing.
    last: Option<Vec<u8>>,
    names: Arc<Mutex<Vec<OsString>>>,
}

impl WatchState {
    /// Follows the file to its real location, watching the target's
    /// directory when it is not the one already watched.
    fn follow_symlink(&mut self, watcher: &mut impl notify::Watcher) {
        let target = std::fs::canonicalize(&self.path).ok();
        let target_dir = target
            .as_deref()
            .and_then(Path::parent)
            .filter(|d| Some(*d) != self.dir_canonical.as_deref())
            .map(Path::to_path_buf);
        if let Ok(mut names) = self.names.lock() {
            names.truncate(1);
            if let Some(target_name) = target.as_deref().and_then(Path::file_name)
                && target_name != self.name
            {
                names.push(target_name.to_os_string());
            }
        }
        if target_dir == self.target_dir {
            return;
        }
        if let Some(old) = self.target_dir.take() {
            // It may be gone already (a swapped ConfigMap revision).
            let _ = watcher.unwatch(&old);
        }
        if let Some(new) = target_dir {
            match watcher.watch(&new, notify::RecursiveMode::NonRecursive) {
                Ok(()) => self.target_dir = Some(new),
                Err(error) => tracing::warn!(
                    %error,
                    dir = %new.display(),
                    "cannot watch the directory the mesh file links to; edits made there \
                     are picked up only when the link itself changes"
                ),
            }
        }
    }

    async fn reload(&mut self, publisher: &Publisher, initial: bool) {
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(bytes) => bytes,
            Err(error) => {
                self.last = None;
                publisher.reject(SOURCE, &FileError::unreadable(&self.path, error));
                return;
            }
        };
        if self.last.as_ref() == Some(&bytes) {
            tracing::debug!(file = %self.path.display(), "mesh file unchanged");
            return;
        }
        let parsed = parse_bytes(&self.path, &bytes);
        self.last = Some(bytes);
        match parsed {
            // At startup the file usually holds what the caller loaded.
            Ok(mesh) if initial && **publisher.subscribe().borrow() == mesh => {}
            Ok(mesh) => publisher.publish(SOURCE, mesh),
            Err(error) => publisher.reject(SOURCE, &error),
        }
    }
}

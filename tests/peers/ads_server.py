#!/usr/bin/env python3
"""A scripted state-of-the-world ADS server for Remora's end-to-end tests.

Our control plane never sends a resource the proxy cannot apply, so the
proxy's NACK path is tested against this server instead. It serves one
scenario in stages; the test moves it on by writing `stage N` lines to its
stdin.

  stage 1  a valid configuration: listener `outbound` (HTTP connection
           manager, routes over ADS), route configuration `outbound` with
           the virtual host `svc-a` (domains svc-a, svc-a:80) to cluster
           `svc-a`, cluster `svc-a` (EDS) with one endpoint, --app-a.
  stage 2  CDS: `svc-a`, a new valid cluster `svc-b` (endpoint --app-b),
           and `svc-bad`, of type ORIGINAL_DST, which remora-proxy does not
           support. RDS: a virtual host `svc-b` to cluster `svc-b` is added.
           The proxy must NACK the CDS response naming `svc-bad` and its
           `type`, and still apply `svc-b`.
  stage 3  RDS: the route of `svc-a` now goes to `svc-b` with a
           `prefix_rewrite`, which remora-proxy does not support. The whole
           route configuration must be NACKed and the previous one keep
           serving (`svc-a` still reaches --app-a).

Endpoints have no identity (no sidecar), so the proxy calls the
applications directly in HTTP/1.1.

Output, one JSON object per line on stdout: first {"event": "listening",
"port": N}, then {"event": "request", "type": "CDS", "version_info": ...,
"response_nonce": ..., "resource_names": [...], "error_detail": null or
{"code": 3, "message": "..."}} for every request received and {"event":
"response", "type": ..., "version": ..., "nonce": ..., "names": [...]} for
every response sent. Runs until stdin closes, or SIGTERM/SIGINT.

Needs grpcio and xds-protos (`pip install -r tests/requirements.txt`).
"""

import argparse
import hashlib
import itertools
import json
import os
import queue
import signal
import sys
import threading
from concurrent import futures

try:
    import grpc
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.core.v3 import address_pb2, config_source_pb2
    from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
    from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
    from envoy.config.route.v3 import route_components_pb2, route_pb2
    from envoy.extensions.filters.http.router.v3 import router_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
    from google.protobuf import any_pb2, duration_pb2
except ImportError as e:
    sys.exit(f"ads_server.py: {e}: install the test peers with `pip install -r tests/requirements.txt`")

TYPE_URLS = {
    "LDS": "type.googleapis.com/envoy.config.listener.v3.Listener",
    "RDS": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    "CDS": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "EDS": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
}
SHORT = {url: short for short, url in TYPE_URLS.items()}
# LDS and CDS responses carry every resource; RDS and EDS the names asked.
WILDCARD = {"LDS", "CDS"}

OUT_LOCK = threading.Lock()


def emit(obj):
    with OUT_LOCK:
        print(json.dumps(obj, sort_keys=True), flush=True)


def pack(message):
    any_ = any_pb2.Any()
    any_.Pack(message)
    return any_


def ads_source():
    source = config_source_pb2.ConfigSource()
    source.ads.SetInParent()
    source.resource_api_version = config_source_pb2.V3
    return source


def eds_cluster(name):
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.CopyFrom(duration_pb2.Duration(seconds=1))
    c.eds_cluster_config.eds_config.CopyFrom(ads_source())
    return c


def original_dst_cluster(name):
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.ORIGINAL_DST)
    c.connect_timeout.CopyFrom(duration_pb2.Duration(seconds=1))
    return c


def assignment(name, port):
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    locality = cla.endpoints.add()
    lb = locality.lb_endpoints.add()
    sock = lb.endpoint.address.socket_address
    sock.address = "127.0.0.1"
    sock.port_value = port
    return cla


def outbound_listener():
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix="outbound")
    hcm.rds.route_config_name = "outbound"
    hcm.rds.config_source.CopyFrom(ads_source())
    router = hcm.http_filters.add(name="envoy.filters.http.router")
    router.typed_config.Pack(router_pb2.Router())
    listener = listener_pb2.Listener(name="outbound")
    sock = listener.address.socket_address
    sock.address = "127.0.0.1"
    sock.port_value = 15001
    chain = listener.filter_chains.add()
    f = chain.filters.add(name="envoy.filters.network.http_connection_manager")
    f.typed_config.Pack(hcm)
    return listener


def virtual_host(name, cluster, prefix_rewrite=""):
    vh = route_components_pb2.VirtualHost(name=name, domains=[name, f"{name}:80"])
    route = vh.routes.add(name=f"{name}-all")
    route.match.prefix = "/"
    route.route.cluster = cluster
    route.route.timeout.CopyFrom(duration_pb2.Duration(seconds=10))
    if prefix_rewrite:
        route.route.prefix_rewrite = prefix_rewrite
    return vh


def route_config(*hosts):
    rc = route_pb2.RouteConfiguration(name="outbound")
    for vh in hosts:
        rc.virtual_hosts.add().CopyFrom(vh)
    return rc


def resources(stage, app_a, app_b):
    """Per type, {name: Any} at `stage`."""
    clusters = [eds_cluster("svc-a")]
    endpoints = [assignment("svc-a", app_a)]
    hosts = [virtual_host("svc-a", "svc-a")]
    if stage >= 2:
        clusters += [eds_cluster("svc-b"), original_dst_cluster("svc-bad")]
        endpoints += [assignment("svc-b", app_b)]
        hosts += [virtual_host("svc-b", "svc-b")]
    if stage >= 3:
        hosts[0] = virtual_host("svc-a", "svc-b", prefix_rewrite="/rewritten")
    return {
        "LDS": {"outbound": pack(outbound_listener())},
        "RDS": {"outbound": pack(route_config(*hosts))},
        "CDS": {c.name: pack(c) for c in clusters},
        "EDS": {e.cluster_name: pack(e) for e in endpoints},
    }


class Scenario:
    def __init__(self, app_a, app_b):
        self.app_a = app_a
        self.app_b = app_b
        self.stage = 1
        self.lock = threading.Lock()
        self.streams = []
        self.nonces = itertools.count(1)

    def current(self):
        with self.lock:
            return resources(self.stage, self.app_a, self.app_b)

    def set_stage(self, stage):
        with self.lock:
            self.stage = stage
            streams = list(self.streams)
        emit({"event": "stage", "stage": stage})
        for q in streams:
            q.put(("stage", None))


def version_of(named):
    h = hashlib.sha256()
    for name in sorted(named):
        h.update(name.encode())
        h.update(named[name].SerializeToString())
    return h.hexdigest()[:12]


class Stream:
    """One ADS stream: what the client subscribed to and what it was sent."""

    def __init__(self, scenario):
        self.scenario = scenario
        self.names = {}  # type -> list of names (empty: wildcard)
        self.sent = {}  # type -> version last sent

    def response(self, short, force):
        if short not in self.names:
            return None
        everything = self.scenario.current()[short]
        if short in WILDCARD:
            named = everything
        else:
            named = {n: r for n, r in everything.items() if n in self.names[short]}
        version = version_of(named)
        if not force and self.sent.get(short) == version:
            return None
        self.sent[short] = version
        nonce = str(next(self.scenario.nonces))
        emit({"event": "response", "type": short, "version": version, "nonce": nonce, "names": sorted(named)})
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            resources=[named[n] for n in sorted(named)],
            type_url=TYPE_URLS[short],
            nonce=nonce,
        )

    def on_request(self, req):
        short = SHORT.get(req.type_url)
        detail = None
        if req.HasField("error_detail"):
            detail = {"code": req.error_detail.code, "message": req.error_detail.message}
        emit(
            {
                "event": "request",
                "type": short or req.type_url,
                "version_info": req.version_info,
                "response_nonce": req.response_nonce,
                "resource_names": list(req.resource_names),
                "error_detail": detail,
            }
        )
        if short is None:
            return []
        names = sorted(req.resource_names)
        changed = self.names.get(short) != names
        self.names[short] = names
        # A first request, or new names: answer. An ACK or NACK of the same
        # names: nothing to send.
        if not req.response_nonce or changed:
            r = self.response(short, force=True)
            return [r] if r else []
        return []

    def on_stage(self):
        out = []
        for short in ("CDS", "EDS", "LDS", "RDS"):
            r = self.response(short, force=False)
            if r:
                out.append(r)
        return out


class Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, scenario):
        self.scenario = scenario

    def StreamAggregatedResources(self, request_iterator, context):
        events = queue.Queue()
        stream = Stream(self.scenario)
        with self.scenario.lock:
            self.scenario.streams.append(events)
        emit({"event": "stream", "peer": context.peer()})

        def read():
            try:
                for req in request_iterator:
                    events.put(("request", req))
            except Exception as e:  # noqa: BLE001 (the stream ended, however)
                emit({"event": "stream-error", "error": str(e)})
            events.put(("end", None))

        threading.Thread(target=read, daemon=True).start()
        try:
            while True:
                kind, item = events.get()
                if kind == "end":
                    return
                replies = stream.on_request(item) if kind == "request" else stream.on_stage()
                yield from replies
        finally:
            with self.scenario.lock:
                self.scenario.streams.remove(events)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app-a", type=int, required=True, help="port of svc-a's application on 127.0.0.1")
    parser.add_argument("--app-b", type=int, required=True, help="port of svc-b's application on 127.0.0.1")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()

    scenario = Scenario(args.app_a, args.app_b)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(Ads(scenario), server)
    port = server.add_insecure_port(f"{args.host}:0")
    if port == 0:
        sys.exit(f"ads_server.py: could not bind {args.host}:0")
    server.start()
    emit({"event": "listening", "port": port})

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def commands():
        # Raw reads on fd 0 (see grpc_peer.py): lines `stage N`.
        buf = b""
        try:
            while True:
                chunk = os.read(0, 4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    words = line.decode().split()
                    if len(words) == 2 and words[0] == "stage":
                        scenario.set_stage(int(words[1]))
                    elif words:
                        emit({"event": "error", "error": f"unknown command {line.decode()!r}"})
        except OSError:
            pass
        stop.set()

    threading.Thread(target=commands, daemon=True).start()
    while not stop.wait(0.2):
        pass
    server.stop(grace=0.5).wait()


if __name__ == "__main__":
    main()

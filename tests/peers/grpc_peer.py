#!/usr/bin/env python3
"""gRPC peer for Remora's end-to-end tests (no generated code).

serve --name NAME
    Serves the unary method /remora.test.Echo/Who, which answers NAME (as
    bytes), on 127.0.0.1:0. Prints `PORT <n>` on stdout once serving, then
    runs until stdin closes, or SIGTERM/SIGINT.

call --target TARGET --count N
    Makes N unary calls to /remora.test.Echo/Who on TARGET and prints a JSON
    object {"NAME": calls answered by NAME, ...}. For `xds:///...` targets set
    GRPC_XDS_BOOTSTRAP to a bootstrap file; the first call waits (up to
    --ready-timeout seconds) for xDS to resolve. A direct `127.0.0.1:PORT`
    target works too. Errors go to stderr with a non-zero exit.

Needs grpcio (`pip install -r tests/requirements.txt`).
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from concurrent import futures

SERVICE = "remora.test.Echo"
METHOD = f"/{SERVICE}/Who"


def import_grpc():
    try:
        import grpc  # noqa: PLC0415 (imported late to report a missing grpcio well)
    except ImportError as e:
        sys.exit(f"grpc_peer.py: {e}: install the test peers with `pip install -r tests/requirements.txt`")
    return grpc


def serve(args):
    grpc = import_grpc()
    name = args.name.encode()

    def who(_request, _context):
        return name

    # No serializers: requests and responses are raw bytes.
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{args.host}:0")
    if port == 0:
        sys.exit(f"grpc_peer.py serve: could not bind {args.host}:0")
    server.start()
    print(f"PORT {port}", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def watch_stdin():
        # Raw reads on fd 0: a buffered sys.stdin read would hold a lock that
        # interpreter shutdown then waits for.
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    # Wait in short steps so signal handlers run promptly.
    while not stop.wait(0.2):
        pass
    server.stop(grace=1).wait()


def describe(err):
    try:
        return f"{err.code().name}: {err.details()}"
    except Exception:  # noqa: BLE001 (any RpcError shape)
        return str(err)


def first_call(grpc, args):
    """Returns (channel, stub, reply) once a call succeeds, retrying with a
    fresh channel until --ready-timeout."""
    deadline = time.monotonic() + args.ready_timeout
    last = "no attempt made"
    attempts = 0
    while True:
        attempts += 1
        channel = grpc.insecure_channel(args.target)
        stub = channel.unary_unary(METHOD)
        remaining = deadline - time.monotonic()
        try:
            reply = stub(b"", timeout=max(0.5, min(remaining, 5.0)), wait_for_ready=True)
            return channel, stub, reply
        except grpc.RpcError as e:
            last = describe(e)
            # wait_for_ready hides why the channel is not ready; one
            # fail-fast call shows it (e.g. "xDS listener ... does not exist").
            try:
                reply = stub(b"", timeout=1.0)
                return channel, stub, reply
            except grpc.RpcError as e2:
                last = f"{last}; fail-fast call: {describe(e2)}"
        channel.close()
        if time.monotonic() >= deadline:
            sys.exit(
                f"grpc_peer.py call: no successful call to {args.target} within "
                f"{args.ready_timeout}s ({attempts} channels): {last}"
            )
        time.sleep(0.2)


def call(args):
    grpc = import_grpc()
    if args.count < 1:
        sys.exit("grpc_peer.py call: --count must be at least 1")
    channel, stub, reply = first_call(grpc, args)
    counts = {}
    counts[reply.decode()] = 1
    for i in range(1, args.count):
        try:
            reply = stub(b"", timeout=args.timeout)
        except grpc.RpcError as e:
            sys.exit(
                f"grpc_peer.py call: call {i + 1}/{args.count} to {args.target} failed: "
                f"{describe(e)} (answers so far: {json.dumps(counts, sort_keys=True)})"
            )
        name = reply.decode()
        counts[name] = counts.get(name, 0) + 1
    channel.close()
    print(json.dumps(counts, sort_keys=True), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve /remora.test.Echo/Who answering NAME")
    s.add_argument("--name", required=True)
    s.add_argument("--host", default="127.0.0.1")
    c = sub.add_parser("call", help="call /remora.test.Echo/Who and count who answered")
    c.add_argument("--target", required=True, help="xds:///name.ns:port or host:port")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--timeout", type=float, default=5.0, help="seconds per call")
    c.add_argument("--ready-timeout", type=float, default=15.0, help="seconds for the first call")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args)
    else:
        call(args)


if __name__ == "__main__":
    main()

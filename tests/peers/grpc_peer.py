#!/usr/bin/env python3
"""gRPC peer for Remora's end-to-end tests (no generated code).

serve --name NAME [--delay SECONDS] [--fail-percent P]
    Serves, on 127.0.0.1:0, the service remora.test.Echo (requests and
    responses are raw bytes):
      Who    unary: answers NAME;
      Fail   unary: the request is `CODE:message` (CODE a grpc.StatusCode
             name such as NOT_FOUND); the call ends with that status;
      Count  server streaming: the request is a number N; answers N
             messages `NAME:0` ... `NAME:N-1`;
      Echo   bidirectional: answers each message `m` with `NAME:m` as soon
             as it arrives.
    Every call ends with the trailing metadata `x-peer-name: NAME`, and
    `x-seen-KEY: VALUE` for each request metadata KEY starting with `x-`
    (what reached the server).
    --delay waits that long before answering each call; --fail-percent
    ends that share of calls with UNAVAILABLE instead (a flaky server).
    Prints `PORT <n>` on stdout once serving, then runs until stdin closes,
    or SIGTERM/SIGINT.

call --target TARGET --count N [--authority A]
    Makes N unary calls to /remora.test.Echo/Who on TARGET and prints a JSON
    object {"NAME": calls answered by NAME, ...}. For `xds:///...` targets set
    GRPC_XDS_BOOTSTRAP to a bootstrap file; the first call waits (up to
    --ready-timeout seconds) for xDS to resolve. A direct `127.0.0.1:PORT`
    target works too. --authority sets the `:authority` of every call (a
    sidecar's outbound listener routes by it). Errors go to stderr with a
    non-zero exit.

rpc --target TARGET --method who|fail|count|echo [--arg S] [--messages a,b]
    [--authority A] [--metadata k=v ...]
    Makes one call and prints what came back as JSON: {"code": "OK",
    "details": ..., "replies": [...], "initial_metadata": {...},
    "trailing_metadata": {...}}. A call that ends with a non-OK status is
    still printed (exit 0): the status is the result. `echo` sends each of
    --messages only after the answer to the previous one arrived, so it
    only completes if both directions stream.

Needs grpcio (`pip install -r tests/requirements.txt`).
"""

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
from concurrent import futures

SERVICE = "remora.test.Echo"
METHOD = f"/{SERVICE}/Who"
METHODS = {
    "who": f"/{SERVICE}/Who",
    "fail": f"/{SERVICE}/Fail",
    "count": f"/{SERVICE}/Count",
    "echo": f"/{SERVICE}/Echo",
}


def import_grpc():
    try:
        import grpc  # noqa: PLC0415 (imported late to report a missing grpcio well)
    except ImportError as e:
        sys.exit(f"grpc_peer.py: {e}: install the test peers with `pip install -r tests/requirements.txt`")
    return grpc


def serve(args):
    grpc = import_grpc()
    name = args.name.encode()
    calls = {"n": 0}
    calls_lock = threading.Lock()

    def begin(context):
        """What every call does first: the trailing metadata, the delay,
        and the flaky failures (every (100/P)-th call on average, spread
        evenly so that short runs see the configured share)."""
        seen = tuple(
            (f"x-seen-{key}", value)
            for key, value in context.invocation_metadata()
            if key.startswith("x-") and isinstance(value, str)
        )
        context.set_trailing_metadata((("x-peer-name", args.name),) + seen)
        if args.delay > 0:
            time.sleep(args.delay)
        if args.fail_percent > 0:
            with calls_lock:
                calls["n"] += 1
                n = calls["n"]
            # Fails when n*P/100 crosses an integer: exactly P% of calls.
            if (n * args.fail_percent) // 100 != ((n - 1) * args.fail_percent) // 100:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{args.name}: flaky failure (call {n})")

    def who(_request, context):
        begin(context)
        return name

    def fail(request, context):
        begin(context)
        code_name, _, message = request.decode().partition(":")
        code = getattr(grpc.StatusCode, code_name, None)
        if code is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no status code {code_name!r}")
        context.abort(code, message)

    def count(request, context):
        begin(context)
        for i in range(int(request.decode() or "0")):
            yield name + b":" + str(i).encode()

    def echo(requests, context):
        begin(context)
        for message in requests:
            yield name + b":" + message

    # No serializers: requests and responses are raw bytes.
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Who": grpc.unary_unary_rpc_method_handler(who),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Count": grpc.unary_stream_rpc_method_handler(count),
            "Echo": grpc.stream_stream_rpc_method_handler(echo),
        },
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


def open_channel(grpc, args):
    options = []
    if getattr(args, "authority", None):
        options.append(("grpc.default_authority", args.authority))
    return grpc.insecure_channel(args.target, options=options)


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
        channel = open_channel(grpc, args)
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


def metadata_dict(pairs):
    out = {}
    for key, value in pairs or ():
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        out.setdefault(key, []).append(value)
    return out


def rpc(args):
    """One call; prints its status, replies and metadata as JSON."""
    grpc = import_grpc()
    channel = open_channel(grpc, args)
    method = METHODS[args.method]
    metadata = []
    for kv in args.metadata:
        key, _, value = kv.partition("=")
        metadata.append((key, value))
    result = {"code": "OK", "details": "", "replies": [], "initial_metadata": {}, "trailing_metadata": {}}
    call = None
    try:
        if args.method in ("who", "fail"):
            reply, call = channel.unary_unary(method).with_call(
                args.arg.encode(), timeout=args.timeout, metadata=metadata
            )
            result["replies"].append(reply.decode())
        elif args.method == "count":
            call = channel.unary_stream(method)(args.arg.encode(), timeout=args.timeout, metadata=metadata)
            for reply in call:
                result["replies"].append(reply.decode())
        else:
            # Each message goes out only once the previous answer is in.
            answered = queue.Queue()
            messages = [m for m in args.messages.split(",") if m]

            def requests():
                for i, m in enumerate(messages):
                    if i > 0 and answered.get(timeout=args.timeout) is None:
                        return
                    yield m.encode()

            call = channel.stream_stream(method)(requests(), timeout=args.timeout, metadata=metadata)
            try:
                for reply in call:
                    result["replies"].append(reply.decode())
                    answered.put(reply)
            finally:
                answered.put(None)
        result["initial_metadata"] = metadata_dict(call.initial_metadata())
        result["trailing_metadata"] = metadata_dict(call.trailing_metadata())
    except grpc.RpcError as e:
        result["code"] = e.code().name
        result["details"] = e.details() or ""
        try:
            result["initial_metadata"] = metadata_dict(e.initial_metadata())
            result["trailing_metadata"] = metadata_dict(e.trailing_metadata())
        except Exception:  # noqa: BLE001 (not every RpcError is a Call)
            pass
    channel.close()
    print(json.dumps(result, sort_keys=True), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve /remora.test.Echo/Who answering NAME")
    s.add_argument("--name", required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--delay", type=float, default=0.0, help="seconds to wait before answering each call")
    s.add_argument("--fail-percent", type=int, default=0, help="share of calls ended with UNAVAILABLE")
    c = sub.add_parser("call", help="call /remora.test.Echo/Who and count who answered")
    c.add_argument("--target", required=True, help="xds:///name.ns:port or host:port")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--timeout", type=float, default=5.0, help="seconds per call")
    c.add_argument("--ready-timeout", type=float, default=15.0, help="seconds for the first call")
    c.add_argument("--authority", help=":authority of every call (default: from the target)")
    r = sub.add_parser("rpc", help="make one call of any shape and print what came back")
    r.add_argument("--target", required=True, help="host:port")
    r.add_argument("--authority", help=":authority of the call (default: from the target)")
    r.add_argument("--method", required=True, choices=sorted(METHODS))
    r.add_argument("--arg", default="", help="the request of who, fail and count")
    r.add_argument("--messages", default="", help="comma-separated messages for echo")
    r.add_argument("--metadata", action="append", default=[], help="k=v request metadata")
    r.add_argument("--timeout", type=float, default=10.0, help="seconds for the call")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args)
    elif args.command == "call":
        call(args)
    else:
        rpc(args)


if __name__ == "__main__":
    main()

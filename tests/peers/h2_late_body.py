#!/usr/bin/env python3
"""An HTTP/2 client that sends a request body late: the request's HEADERS,
then, only once the whole response has arrived, its DATA. Reports for each
request the response status and whether the server reset the stream
(RST_STREAM) instead of reading the rest of the request.

    h2_late_body.py --addr 127.0.0.1:PORT --authority A --path P [--header N:V]... [--requests N]

Prints one JSON object: {"requests": [{"status": 200, "reset": null}, ...]}
("reset" is the RST_STREAM error code, or null). Exits non-zero, with the
reason on stderr, if the connection fails or a response does not arrive
within the timeout.
"""

import argparse
import json
import socket
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

# How long to wait after the late DATA for a reset that would answer it.
SETTLE_S = 0.5
TIMEOUT_S = 10.0


def pump(sock, conn, streams, until):
    """Reads frames into `streams` until `until()` holds or the deadline."""
    deadline = time.monotonic() + TIMEOUT_S
    while not until():
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete response within the timeout")
        sock.settimeout(left)
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        for event in conn.receive_data(data):
            sid = getattr(event, "stream_id", None)
            state = streams.get(sid)
            if isinstance(event, h2.events.ResponseReceived) and state is not None:
                state["status"] = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and state is not None:
                state["ended"] = True
            elif isinstance(event, h2.events.StreamReset) and state is not None:
                state["reset"] = int(event.error_code)
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise ConnectionError(f"GOAWAY {event.error_code}")
        out = conn.data_to_send()
        if out:
            sock.sendall(out)


def settle(sock, conn, streams):
    """Reads whatever arrives within SETTLE_S."""
    end = time.monotonic() + SETTLE_S
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return
        if not data:
            return
        for event in conn.receive_data(data):
            state = streams.get(getattr(event, "stream_id", None))
            if isinstance(event, h2.events.StreamReset) and state is not None:
                state["reset"] = int(event.error_code)
        out = conn.data_to_send()
        if out:
            sock.sendall(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--authority", required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--header", action="append", default=[])
    ap.add_argument("--requests", type=int, default=3)
    args = ap.parse_args()
    host, port = args.addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    extra = [tuple(h.split(":", 1)) for h in args.header]
    results = []
    for _ in range(args.requests):
        sid = conn.get_next_available_stream_id()
        state = {"status": None, "ended": False, "reset": None}
        streams = {sid: state}
        conn.send_headers(sid, [
            (":method", "POST"), (":scheme", "http"),
            (":authority", args.authority), (":path", args.path), *extra,
        ])
        sock.sendall(conn.data_to_send())
        pump(sock, conn, streams, lambda: state["ended"] or state["reset"] is not None)
        if state["reset"] is None:
            try:
                conn.send_data(sid, b"the rest of the request", end_stream=True)
                sock.sendall(conn.data_to_send())
            except h2.exceptions.StreamClosedError:
                pass
            settle(sock, conn, streams)
        results.append({"status": state["status"], "reset": state["reset"]})
    conn.close_connection()
    sock.sendall(conn.data_to_send())
    sock.close()
    print(json.dumps({"requests": results}))


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # the reason for the Rust side's report
        print(f"h2_late_body.py: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)

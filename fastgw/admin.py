"""The admin listener: /metrics, /healthz, /readyz, /config.

A cold path on its own address (loopback by default) and its own thread (see
AdminServer for why): one small request per connection, parsed by the core's strict
parser, answered and closed.

- ``/metrics``: Prometheus text format from ``fastgw.metrics`` (counters read at scrape).
- ``/healthz``: 200 while the event loop turns (its watchdog ticked within the last
  ``LOOP_STALL_S``), 503 when it is stuck.
- ``/readyz``: 200 when the config is loaded and every listener is bound and accepting;
  503 while draining.
- ``/config``: the effective configuration as JSON, secrets redacted.
- ``/backends``: each backend's endpoints and their state (healthy, ejected or paused
  until, in flight, queued) as JSON.
- ``POST /maps/reload``: re-read the routes' map files and swap them in atomically.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from fastgw._core.http import parse_request_head
from fastgw.errors import ConfigError, ProtocolError
from fastgw.metrics import make_registry

if TYPE_CHECKING:
    from fastgw.gateway import Gateway

log = logging.getLogger("fastgw.admin")

# Admin requests are small GETs; 16 KiB of head and 10 s are plenty and bound a bad client.
_MAX_HEAD = 16384
_TIMEOUT_S = 10.0
# The watchdog ticks every 0.1 s; 2 s without a tick means the loop is stuck (a blocking
# call, a runaway task), which is what a liveness probe should catch.
LOOP_STALL_S = 2.0
_SWITCH_INTERVAL_S = 0.0005
_SECRET_WORDS = ("secret", "password", "token", "hash", "private")


def redact(value: Any) -> Any:
    """The config as plain JSON data, with values under secret-looking keys replaced."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {
            str(k): (
                "<redacted>" if any(w in str(k).lower() for w in _SECRET_WORDS) and v else redact(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def _answer(gw: Gateway, registry: Any, target: bytes) -> tuple[int, bytes, bytes]:
    path = target.split(b"?", 1)[0]
    if path == b"/metrics":
        return 200, CONTENT_TYPE_LATEST.encode(), generate_latest(registry)
    if path == b"/healthz":
        stalled = time.monotonic() - gw.last_tick_monotonic
        if stalled > LOOP_STALL_S:
            return 503, b"text/plain", b"event loop stalled for %.1f s\n" % stalled
        return 200, b"text/plain", b"ok\n"
    if path == b"/readyz":
        ready, why = gw.readiness()
        body = json.dumps({"ready": ready, "reasons": why}).encode() + b"\n"
        return (200 if ready else 503), b"application/json", body
    if path == b"/config":
        body = json.dumps(redact(gw.config), indent=2, default=str).encode() + b"\n"
        return 200, b"application/json", body
    if path == b"/backends":
        now = gw.now
        backends = {n: b.statistics(now) for n, b in list(gw.state.backends.items())}
        body = json.dumps({"now": now, "backends": backends}, indent=2).encode() + b"\n"
        return 200, b"application/json", body
    return 404, b"application/json", b'{"error":"not_found"}\n'


class AdminServer:
    """The admin listener on its own thread, with blocking sockets.

    Scrapes must stay fast while the event loop is saturated with traffic: served from
    the loop, a scrape waits its turn behind every busy connection (several milliseconds
    at full load). This thread only needs the GIL, which the loop releases at every
    system call. It reads the gateway's counters without locks: each read is of a plain
    int, a list slot, or a core histogram snapshot taken under the GIL, and dictionaries
    are copied in one C call before use. One request per connection, one connection at
    a time, each bounded by a timeout: a slow client delays other scrapes, never traffic.
    """

    def __init__(self, gw: Gateway, host: str, port: int) -> None:
        self.gw = gw
        self.registry = make_registry(gw)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, type_, proto, _, addr = infos[0]
        self.sock = socket.socket(family, type_, proto)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(addr)
        self.sock.listen(128)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._run, name="fastgw-admin", daemon=True)
        self._closed = False

    def start(self) -> None:
        # The GIL's switch interval (5 ms by default) bounds how long this thread waits
        # for the GIL each time it needs it while the loop runs Python code; a scrape
        # takes it several times. 0.5 ms keeps a scrape within a few milliseconds under
        # full load, and costs nothing when this thread sleeps in accept() (the switch
        # interval only matters while a second thread waits for the GIL).
        if sys.getswitchinterval() > _SWITCH_INTERVAL_S:
            sys.setswitchinterval(_SWITCH_INTERVAL_S)
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(timeout=_TIMEOUT_S + 1)

    def _run(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)  # EMFILE and friends: back off rather than spin
                continue
            with conn:
                try:
                    self._serve_one(conn)
                except Exception:  # an admin request must never take the thread down
                    log.exception("admin request failed")

    def _serve_one(self, conn: socket.socket) -> None:
        conn.settimeout(_TIMEOUT_S)
        buf = b""
        head = None
        try:
            while head is None:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                head = parse_request_head(buf, 0, max_head_bytes=_MAX_HEAD)
        except ProtocolError as e:
            _send(conn, e.status, b"application/json", b'{"error":"bad_request"}\n', False)
            return
        except OSError:
            return
        if head.method == b"POST" and head.path.split(b"?", 1)[0] == b"/maps/reload":
            status, ctype, body = self._reload_maps()
        elif head.method not in (b"GET", b"HEAD"):
            status, ctype, body = 405, b"application/json", b'{"error":"method"}\n'
        else:
            status, ctype, body = _answer(self.gw, self.registry, head.target)
        _send(conn, status, ctype, body, head.method == b"HEAD")

    def _reload_maps(self) -> tuple[int, bytes, bytes]:
        """POST /maps/reload: re-read every route's map file and swap them in at once
        (a new state: a request sees all old maps or all new ones). The maps are built
        here, on the admin thread; only the swap runs on the event loop. A map that does
        not load, or names a backend that does not exist, leaves everything as it was."""
        from fastgw._core.acl import load_map_file

        gw = self.gw
        config = gw.config
        problems: list[list[str]] = []
        routes = []
        reloaded = []
        for rc in config.routes:
            if rc.path_map is not None:
                try:
                    m = load_map_file(rc.path_map, rc.path_map_type)
                except ConfigError as e:
                    problems.extend([list(p) for p in e.problems])
                    continue
                for i in range(len(m)):
                    value = m.entry(i)[1].decode("utf-8", "replace")
                    if value not in config.backends:
                        src, line = m.location(i)
                        problems.append([src, line, f"value {value!r} is not a backend"])
                rc = dataclasses.replace(rc, path_map_obj=m)
                reloaded.append({"route": rc.name, "file": rc.path_map, "entries": len(m)})
            routes.append(rc)
        if problems:
            gw.reloads_failed += 1
            body = json.dumps({"reloaded": False, "problems": problems}).encode() + b"\n"
            return 422, b"application/json", body
        new = dataclasses.replace(config, routes=tuple(routes))
        try:
            trio.from_thread.run_sync(gw.reload, new, trio_token=gw.trio_token)
        except (OSError, RuntimeError, trio.RunFinishedError) as e:
            gw.reloads_failed += 1
            return (
                503,
                b"application/json",
                json.dumps({"reloaded": False, "error": str(e)}).encode(),
            )
        return 200, b"application/json", json.dumps({"reloaded": reloaded}).encode() + b"\n"


def _send(sock: socket.socket, status: int, ctype: bytes, body: bytes, head_only: bool) -> None:
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n" % (status, _REASONS.get(status, b"Error"), ctype, len(body))
    )
    try:
        sock.sendall(head if head_only else head + body)
    except OSError:
        pass


_REASONS = {
    200: b"OK",
    422: b"Unprocessable Content",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}

"""The admin listener: /metrics, /healthz, /readyz, /config.

A cold path on its own address (loopback by default): one small request per
connection, parsed by the core's strict parser, answered and closed (see _Answerer for
why it answers inline).

- ``/metrics``: Prometheus text format from ``fastgw.metrics`` (counters read at scrape).
- ``/healthz``: 200 while the process serves its event loop.
- ``/readyz``: 200 when the config is loaded and every listener is bound and accepting;
  503 while draining.
- ``/config``: the effective configuration as JSON, secrets redacted.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from fastgw._core.http import parse_request_head
from fastgw.errors import ProtocolError
from fastgw.metrics import make_registry

if TYPE_CHECKING:
    from fastgw.gateway import Gateway

# Admin requests are small GETs; 16 KiB of head and 10 s are plenty and bound a bad client.
_MAX_HEAD = 16384
_TIMEOUT_S = 10.0
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
        return 200, b"text/plain", b"ok\n"
    if path == b"/readyz":
        ready, why = gw.readiness()
        body = json.dumps({"ready": ready, "reasons": why}).encode() + b"\n"
        return (200 if ready else 503), b"application/json", body
    if path == b"/config":
        body = json.dumps(redact(gw.config), indent=2, default=str).encode() + b"\n"
        return 200, b"application/json", body
    return 404, b"application/json", b'{"error":"not_found"}\n'


class _Answerer:
    """Answers one admin request on a raw non-blocking socket.

    Scrapes must stay fast while the loop is saturated with traffic, and every trip
    through trio's scheduler then costs a whole round of busy connections. So the
    accepting task answers inline when the request is already there (it nearly always
    is: a client sends it right after connecting), without spawning a task or waiting;
    only a slow client gets a task of its own, bounded by a timeout."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.registry = make_registry(gw)

    def try_answer(self, sock: socket.socket, buf: bytes) -> bool | None:
        """True when answered, None when the head is still incomplete."""
        try:
            head = parse_request_head(buf, 0, max_head_bytes=_MAX_HEAD)
        except ProtocolError as e:
            _send_now(sock, e.status, b"application/json", b'{"error":"bad_request"}\n', False)
            return True
        if head is None:
            return None
        if head.method not in (b"GET", b"HEAD"):
            status, ctype, body = 405, b"application/json", b'{"error":"method"}\n'
        else:
            status, ctype, body = _answer(self.gw, self.registry, head.target)
        _send_now(sock, status, ctype, body, head.method == b"HEAD")
        return True

    async def slow(self, sock: socket.socket, buf: bytes) -> None:
        with sock, trio.move_on_after(_TIMEOUT_S):
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                buf += data
                if self.try_answer(sock, buf) is not None:
                    return


def _send_now(sock: socket.socket, status: int, ctype: bytes, body: bytes, head_only: bool) -> None:
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (status, _REASONS.get(status, b"Error"), ctype, len(body))
    )
    data = head if head_only else head + body
    # A scrape is tens of KiB: it fits the socket buffer. Switch to blocking with a
    # short timeout for the rare case it does not, rather than keep state.
    sock.settimeout(2.0)
    try:
        sock.sendall(data)
    except OSError:
        pass


_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


async def serve_admin(
    gw: Gateway, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the admin endpoints on ``gw.config.admin`` until cancelled."""
    admin = gw.config.admin
    assert admin is not None
    infos = socket.getaddrinfo(admin.host, admin.port, type=socket.SOCK_STREAM)
    family, type_, proto, _, addr = infos[0]
    lsock = socket.socket(family, type_, proto)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(addr)
    lsock.listen(128)
    lsock.setblocking(False)
    answerer = _Answerer(gw)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(lsock.getsockname()[:2])
            while True:
                await trio.lowlevel.wait_readable(lsock)
                while True:
                    try:
                        sock, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    except OSError:
                        await trio.sleep(0.05)
                        break
                    sock.setblocking(False)
                    try:
                        buf = sock.recv(65536)
                    except BlockingIOError:
                        buf = b""
                    except OSError:
                        sock.close()
                        continue
                    if buf and answerer.try_answer(sock, buf):
                        sock.close()
                    else:
                        nursery.start_soon(answerer.slow, sock, buf)
    finally:
        trio.lowlevel.notify_closing(lsock)
        lsock.close()

"""The admin listener: /metrics, /healthz, /readyz, /config.

A cold path on its own address (loopback by default), served with h11 over trio streams:
one small request at a time per connection, strict limits, no keep-alive games.

- ``/metrics``: Prometheus text format from ``fastgw.metrics`` (counters read at scrape).
- ``/healthz``: 200 while the process serves its event loop.
- ``/readyz``: 200 when the config is loaded and every listener is bound and accepting;
  503 while draining.
- ``/config``: the effective configuration as JSON, secrets redacted.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import h11
import trio
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

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


async def _handle(stream: trio.SocketStream, gw: Gateway, registry: Any) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
    try:
        with trio.move_on_after(_TIMEOUT_S):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    if event.method not in (b"GET", b"HEAD"):
                        status, ctype, body = 405, b"application/json", b'{"error":"method"}\n'
                    else:
                        status, ctype, body = _answer(gw, registry, event.target)
                    headers = [
                        (b"content-type", ctype),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ]
                    await stream.send_all(
                        conn.send(h11.Response(status_code=status, headers=headers))
                    )
                    if event.method != b"HEAD":
                        await stream.send_all(conn.send(h11.Data(data=body)))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                return
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        with trio.move_on_after(1):
            await stream.aclose()


async def serve_admin(
    gw: Gateway, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the admin endpoints on ``gw.config.admin`` until cancelled."""
    admin = gw.config.admin
    assert admin is not None
    registry = make_registry(gw)
    listeners = await trio.open_tcp_listeners(admin.port, host=admin.host)
    address = listeners[0].socket.getsockname()[:2]

    async def handler(stream: trio.SocketStream) -> None:
        await _handle(stream, gw, registry)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(address)

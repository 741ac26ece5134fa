"""The built-in demo: a small function backend and the gateway config that fronts it.

``serve_demo_function`` plays a Cloud Function over HTTP/1.1: JSON in, JSON out. It
echoes what it received (method, path, query, JSON body, and the forwarding headers a
gateway adds) so a new user sees what fastgw did to the request. It is a cold path, so it
uses h11 (the reference implementation) and trio streams; it is not part of the gateway's
hot path and is not built for load.

``demo_config`` builds the matching GatewayConfig from objects: one plain-HTTP listener on
127.0.0.1, one backend ``demo-fn`` and a catch-all route to it.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11
import trio

from fastgw._version import __version__
from fastgw.config.model import (
    BackendConfig,
    Endpoint,
    GatewayConfig,
    ListenerConfig,
    RouteConfig,
)

__all__ = ["demo_config", "serve_demo_function"]

# Request headers echoed back: the ones a gateway adds or forwards (RFC 9110 7.6.3 Via,
# X-Forwarded-* de facto), so the demo shows fastgw's enrichment.
ECHOED_HEADERS = (
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "via",
)
# 1 MiB of JSON is far beyond any demo call; bigger bodies get 413.
_MAX_BODY_BYTES = 1024 * 1024
# Idle keep-alive connections are closed after 60 s, like the gateway's default.
_IDLE_TIMEOUT_S = 60.0
_READ_SIZE = 65536
_SERVER = f"fastgw-demo-function/{__version__}".encode()


async def serve_demo_function(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the demo function on ``host:port`` until cancelled.

    Reports ``(host, bound_port)`` through ``task_status`` once listening (port 0 picks a
    free port). Raises OSError if the address cannot be bound.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    if port == 0 and len(listeners) > 1:
        # A name like "localhost" can bind IPv4 and IPv6 on two different free ports;
        # serve one so the reported port is the port.
        for extra in listeners[1:]:
            await extra.aclose()
        del listeners[1:]
    bound_port = listeners[0].socket.getsockname()[1]
    task_status.started((host, bound_port))
    await trio.serve_listeners(_serve_connection, listeners)


def demo_config(function_port: int, listen_port: int = 8080) -> GatewayConfig:
    """The demo gateway: 127.0.0.1:listen_port -> route "/" -> backend "demo-fn"."""
    url = f"http://127.0.0.1:{function_port}"
    backend = BackendConfig(
        name="demo-fn",
        endpoints=(
            Endpoint(url=url, scheme="http", host="127.0.0.1", port=function_port, path_prefix=""),
        ),
    )
    return GatewayConfig(
        listeners=(ListenerConfig(name="demo", host="127.0.0.1", port=listen_port),),
        backends={backend.name: backend},
        routes=(RouteConfig(name="demo", backend="demo-fn", path_prefix="/"),),
        source="<demo>",
    )


# --- one connection --------------------------------------------------------------------


async def _serve_connection(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            with trio.move_on_after(_IDLE_TIMEOUT_S):
                event = await _next_event(stream, conn)
            if not isinstance(event, h11.Request):
                return  # idle timeout, or the client closed
            status, payload = await _read_and_answer(stream, conn, event)
            await _send_json(stream, conn, status, payload, head=event.method == b"HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # Connection: close, HTTP/1.0, or an unread body
            conn.start_next_cycle()
    except h11.RemoteProtocolError as e:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            payload = {"error": f"bad request: {e}"}
            try:
                await _send_json(stream, conn, e.error_status_hint, payload)
            except (trio.BrokenResourceError, h11.LocalProtocolError):
                pass
    except trio.BrokenResourceError:
        pass  # the client went away mid-exchange
    finally:
        await stream.aclose()


async def _next_event(stream: trio.SocketStream, conn: h11.Connection) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(_READ_SIZE))


async def _read_and_answer(
    stream: trio.SocketStream, conn: h11.Connection, request: h11.Request
) -> tuple[int, dict[str, Any]]:
    body = bytearray()
    while True:
        event = await _next_event(stream, conn)
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > _MAX_BODY_BYTES:
                return 413, {"error": f"body over {_MAX_BODY_BYTES} bytes"}
        elif isinstance(event, h11.EndOfMessage):
            break
        else:  # ConnectionClosed mid-body
            raise trio.BrokenResourceError("client closed mid-body")
    return _answer(request, bytes(body))


def _answer(request: h11.Request, body: bytes) -> tuple[int, dict[str, Any]]:
    """The function itself: pure, so it reads like a Cloud Function's handler."""
    target = request.target.decode("ascii", "replace")
    parts = urlsplit(target)
    query: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in query:
            query[key] = value
        elif isinstance(query[key], list):
            query[key].append(value)
        else:
            query[key] = [query[key], value]
    data: Any = None
    if body:
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return 400, {"error": f"invalid JSON body: {e}"}
    headers: dict[str, str] = {}
    for raw_name, raw_value in request.headers:
        name = raw_name.decode("ascii")  # h11 lower-cases names
        if name in ECHOED_HEADERS:
            text = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {text}" if name in headers else text
    who = "world"
    if isinstance(data, dict) and isinstance(data.get("name"), str):
        who = data["name"]
    elif isinstance(query.get("name"), str):
        who = query["name"]
    return 200, {
        "greeting": f"Hello, {who}! This is the fastgw demo function.",
        "method": request.method.decode("ascii", "replace"),
        "path": parts.path,
        "query": query,
        "json": data,
        "headers": headers,
    }


async def _send_json(
    stream: trio.SocketStream,
    conn: h11.Connection,
    status: int,
    payload: dict[str, Any],
    *,
    head: bool = False,
) -> None:
    body = json.dumps(payload, indent=2).encode() + b"\n"
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"server", _SERVER),
    ]
    if conn.their_state is not h11.DONE:
        # The request body was not read to its end (413) or could not be parsed: the
        # framing is lost, so this is the last exchange on the connection.
        headers.append((b"connection", b"close"))
    out = [
        conn.send(
            h11.Response(
                status_code=status, headers=headers, reason=HTTPStatus(status).phrase.encode()
            )
        )
    ]
    if not head:  # a HEAD response announces the length but carries no body (RFC 9110 9.3.2)
        out.append(conn.send(h11.Data(data=body)))
    out.append(conn.send(h11.EndOfMessage()))
    await stream.send_all(b"".join(chunk for chunk in out if chunk))

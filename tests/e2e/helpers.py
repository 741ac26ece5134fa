"""Real peers for end-to-end tests: an h11 upstream that records what it received, and a
raw-socket client that reads responses with h11. h11 is the reference implementation,
so these peers are independent of fastgw's own parser."""

from __future__ import annotations

import functools
import re
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

from fastgw.config.model import (
    BackendConfig,
    Endpoint,
    GatewayConfig,
    Limits,
    ListenerConfig,
    RouteConfig,
)


@dataclass
class Received:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    conn_id: int
    peer_cert: dict | None = None

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name.lower():
                return v
        return None

    def header_all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name.lower()]


Handler = Callable[[Received, "Responder"], Awaitable[None]]


class Responder:
    def __init__(self, stream: trio.abc.Stream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn

    async def send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def respond(
        self,
        status: int = 200,
        body: bytes = b"ok",
        headers: list[tuple[bytes, bytes]] | None = None,
        chunked: bool = False,
    ) -> None:
        hs = list(headers or [])
        if chunked:
            hs.append((b"transfer-encoding", b"chunked"))
        else:
            hs.append((b"content-length", str(len(body)).encode()))
        await self.send(h11.Response(status_code=status, headers=hs))
        if body:
            if chunked:
                for i in range(0, len(body), 7):
                    await self.send(h11.Data(data=body[i : i + 7]))
            else:
                await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())


async def default_handler(req: Received, r: Responder) -> None:
    await r.respond(200, b'{"ok":true}', [(b"content-type", b"application/json")])


@dataclass
class Upstream:
    """An HTTP/1.1 upstream on 127.0.0.1:port (h11), optionally TLS/mTLS."""

    handler: Handler = default_handler
    ssl_context: ssl.SSLContext | None = None
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    closed: int = 0  # connections ended (by either side)
    port: int = 0
    _closed_changed: trio.Event = field(default_factory=trio.Event, init=False, repr=False)

    async def wait_closed(self, n: int = 1) -> None:
        """Until ``n`` connections have ended."""
        while self.closed < n:
            await self._closed_changed.wait()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._conn, listeners, handler_nursery=nursery)

    async def _conn(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn_id = self.connections
        s: trio.abc.Stream = stream
        peer_cert = None
        if self.ssl_context is not None:
            tls = trio.SSLStream(stream, self.ssl_context, server_side=True)
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError):
                return
            peer_cert = tls.getpeercert()
            s = tls
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = None
                body = b""
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        data = await s.receive_some(65536)
                        conn.receive_data(data)
                        continue
                    if isinstance(ev, h11.Request):
                        req = ev
                    elif isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    elif isinstance(ev, h11.ConnectionClosed):
                        return
                assert req is not None
                rec = Received(req.method, req.target, list(req.headers), body, conn_id, peer_cert)
                self.received.append(rec)
                await self.handler(rec, Responder(s, conn))
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return
        finally:
            with trio.move_on_after(1):
                await s.aclose()
            self.closed += 1
            self._closed_changed.set()
            self._closed_changed = trio.Event()


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name.lower():
                return v
        return None

    def json(self) -> Any:
        import json

        return json.loads(self.body)


class Client:
    """A raw TCP client: sends bytes as given, parses responses with h11."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)
        self.buf = b""

    @classmethod
    async def open(
        cls,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str = "localhost",
    ) -> Client:
        s: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
        if ssl_context is not None:
            s = trio.SSLStream(s, ssl_context, server_hostname=server_hostname)
            await s.do_handshake()
        return cls(s)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_raw_until_close(self) -> bytes:
        out = b""
        while True:
            try:
                d = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return out
            if not d:
                return out
            out += d

    async def read_response(self, method: bytes = b"GET") -> Response:
        """Parse one response. h11 needs to know the request method (HEAD has no body):
        feed it a matching synthetic request once per exchange."""
        conn = self.conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        if conn.our_state is h11.IDLE:
            conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
        resp = None
        body = b""
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await self.stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(ev, h11.InformationalResponse):
                continue
            if isinstance(ev, h11.Response):
                resp = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
            elif isinstance(ev, h11.ConnectionClosed):
                raise EOFError("connection closed before a response")
        assert resp is not None
        return Response(resp.status_code, list(resp.headers), body)

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
    ) -> Response:
        hs = [(b"Host", b"gw.test"), *(headers or [])]
        if body is not None:
            hs.append((b"Content-Length", str(len(body)).encode()))
        raw = method + b" " + target + b" HTTP/1.1\r\n"
        raw += b"".join(k + b": " + v + b"\r\n" for k, v in hs) + b"\r\n"
        await self.send_raw(raw + (body or b""))
        return await self.read_response(method)

    async def aclose(self) -> None:
        await self.stream.aclose()


def endpoint(url: str) -> Endpoint:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    port = u.port or (443 if u.scheme == "https" else 80)
    return Endpoint(
        url=url, scheme=u.scheme, host=u.hostname or "", port=port, path_prefix=u.path.rstrip("/")
    )


def make_config(
    upstream_urls: list[str],
    *,
    limits: Limits | None = None,
    listener: ListenerConfig | None = None,
    backend_kw: dict[str, Any] | None = None,
    routes: list[RouteConfig] | None = None,
    **kw: Any,
) -> GatewayConfig:
    b = BackendConfig(
        name="fn", endpoints=tuple(endpoint(u) for u in upstream_urls), **(backend_kw or {})
    )
    return GatewayConfig(
        listeners=(listener or ListenerConfig(name="main", host="127.0.0.1", port=0),),
        backends={"fn": b},
        routes=tuple(routes or [RouteConfig(name="all", backend="fn", path_prefix="/")]),
        limits=limits or Limits(),
        **kw,
    )


def worker_of(request_id: bytes) -> bytes:
    """Which gateway process answered: each process's request ids share a random
    12-hex prefix."""
    return request_id[:12]


async def _kill(proc: trio.Process) -> None:
    proc.kill()


class FastgwProcess:
    """``python -m fastgw ARGS`` in a subprocess of the test's nursery. Its stdout and
    stderr lines are collected as they come; ``wait_line`` waits for one (no polling).
    A test that ends early kills the process."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._open_streams = 2
        self._changed = trio.Event()

    @classmethod
    async def start(cls, nursery: trio.Nursery, args: list[str]) -> FastgwProcess:
        proc = await nursery.start(
            functools.partial(
                trio.run_process,
                [sys.executable, "-m", "fastgw", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
                deliver_cancel=_kill,
            )
        )
        self = cls(proc)
        nursery.start_soon(self._collect, proc.stdout)
        nursery.start_soon(self._collect, proc.stderr)
        return self

    async def _collect(self, stream: trio.abc.ReceiveStream) -> None:
        buf = b""
        async for data in stream:
            buf += data
            *lines, buf = buf.split(b"\n")
            if lines:
                self.lines.extend(line.decode() for line in lines)
                self._wake()
        if buf:
            self.lines.append(buf.decode())
        self._open_streams -= 1
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_line(self, pattern: str) -> re.Match[str]:
        """The first output line matching ``pattern``, once it is printed. Raises
        AssertionError (with the output) if the process closes its output first."""
        while True:
            for line in self.lines:
                m = re.search(pattern, line)
                if m is not None:
                    return m
            if not self._open_streams:
                raise AssertionError(f"no line matching {pattern!r} in:\n" + self.output)
            await self._changed.wait()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def wait(self) -> int:
        """The exit status, once the process exited and its output is all read."""
        rc = await self.proc.wait()
        while self._open_streams:
            await self._changed.wait()
        return rc

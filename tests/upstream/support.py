"""Real local peers for the credential tests: a small h11 HTTP server on 127.0.0.1:0
(optionally TLS) that plays the metadata server, the token endpoint, the container
credential endpoint or IMDS, and records what it was asked.

Time: the tests run on trio's MockClock; the fake servers and the code under test share
one wall clock, ``wall()`` = ``WALL0`` + trio's clock, so "a token that lives 10 s" means
10 s of mock time."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import jwt
import trio

# 2023-11-14T22:13:20Z: any fixed instant works; round numbers read well in failures.
WALL0 = 1_700_000_000.0
# The fake issuer's tokens are HS256 under this secret: the gateway never verifies
# them (it only reads exp/iat/aud), so any signature will do.
FAKE_ISSUER_SECRET = "fake-google-signing-secret-32-bytes!"


def wall() -> float:
    return WALL0 + trio.current_time()


def mint_id_token(audience: str, lifetime_s: int, *, iat: float | None = None, **extra: Any) -> str:
    issued = int(wall() if iat is None else iat)
    claims = {
        "iss": "https://accounts.google.com",
        "aud": audience,
        "sub": "1234567890",
        "iat": issued,
        "exp": issued + lifetime_s,
        **extra,
    }
    return jwt.encode(claims, FAKE_ISSUER_SECRET, algorithm="HS256")


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lowercase names; last value wins
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Awaitable[Reply]]


@dataclass
class FakeServer:
    """HTTP/1.1 server on 127.0.0.1, port 0; one request per connection (our client
    sends ``Connection: close``). ``in_flight``/``max_in_flight`` count requests being
    handled at once: single-flight tests assert on them."""

    handler: Handler
    ssl_context: ssl.SSLContext | None = None
    requests: list[Request] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    port: int = 0

    @property
    def base_url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> FakeServer:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, self._conn, listeners)
        return self

    async def _conn(self, stream: trio.SocketStream) -> None:
        s: trio.abc.Stream = stream
        if self.ssl_context is not None:
            tls = trio.SSLStream(stream, self.ssl_context, server_side=True)
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError):
                return
            s = tls
        conn = h11.Connection(h11.SERVER)
        try:
            req: h11.Request | None = None
            body = b""
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(bytes(await s.receive_some(65536)))
                elif isinstance(ev, h11.Request):
                    req = ev
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
                elif isinstance(ev, h11.ConnectionClosed):
                    return
            assert req is not None
            request = Request(
                method=req.method.decode(),
                target=req.target.decode(),
                headers={k.decode(): v.decode() for k, v in req.headers},
                body=body,
            )
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                reply = await self.handler(request)
            finally:
                self.in_flight -= 1
            headers = [*reply.headers, ("Content-Length", str(len(reply.body)))]
            out = conn.send(h11.Response(status_code=reply.status, headers=headers))
            out += conn.send(h11.Data(data=reply.body)) if reply.body else b""
            out += conn.send(h11.EndOfMessage())
            await s.send_all(out)
        except (trio.BrokenResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(s)

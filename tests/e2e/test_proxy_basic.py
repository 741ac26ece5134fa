"""Client -> gateway -> upstream over real sockets on 127.0.0.1: the plain data path."""

from __future__ import annotations

import h11
import trio

from fastgw.config.model import RouteConfig
from fastgw.gateway import Gateway

from .helpers import Client, Received, Responder, Upstream, make_config


async def start(
    nursery: trio.Nursery, upstream: Upstream | None = None, **kw
) -> tuple[Gateway, Upstream, int]:
    up = upstream or Upstream()
    port = await nursery.start(up.serve)
    gw = Gateway(make_config([f"http://127.0.0.1:{port}"], **kw))
    addrs = await nursery.start(gw.serve)
    return gw, up, addrs[0][1]


async def test_get_and_keepalive_reuse_both_sides(nursery: trio.Nursery) -> None:
    _, up, port = await start(nursery)
    c = await Client.open(port)
    for i in range(5):
        r = await c.request(b"GET", b"/hello?i=%d" % i)
        assert r.status == 200
        assert r.body == b'{"ok":true}'
        assert r.header(b"x-request-id")
    assert [x.target for x in up.received] == [b"/hello?i=%d" % i for i in range(5)]
    # One client connection, one upstream connection: reuse on both sides.
    assert up.connections == 1
    assert len({x.conn_id for x in up.received}) == 1
    await c.aclose()


async def test_forwarding_headers_and_hop_by_hop_removed(nursery: trio.Nursery) -> None:
    async def handler(req: Received, r: Responder) -> None:
        await r.respond(
            200,
            b"x",
            [
                (b"connection", b"x-secret"),
                (b"x-secret", b"1"),
                (b"keep-alive", b"timeout=5"),
                (b"x-kept", b"yes"),
            ],
        )

    _, up, port = await start(nursery, Upstream(handler=handler))
    c = await Client.open(port)
    r = await c.request(
        b"GET",
        b"/a",
        [
            (b"Connection", b"keep-alive, X-Drop-Me"),
            (b"X-Drop-Me", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"X-Forwarded-For", b"203.0.113.9"),
            (b"X-Forwarded-Proto", b"spoofed"),
            (b"X-Request-Id", b"client-id-123"),
            (b"Via", b"1.0 other"),
        ],
    )
    assert r.status == 200
    got = up.received[0]
    for name in (b"connection", b"x-drop-me", b"keep-alive", b"te", b"proxy-connection"):
        assert got.header(name) is None, name
    assert got.header(b"x-forwarded-for") == b"203.0.113.9, 127.0.0.1"
    assert got.header(b"x-forwarded-proto") == b"http"
    assert got.header(b"x-forwarded-host") == b"gw.test"
    assert got.header(b"host") == f"127.0.0.1:{up.port}".encode()
    assert got.header(b"x-request-id") == b"client-id-123"
    assert got.header(b"via") == b"1.0 other, 1.1 fastgw"
    # Response side: hop-by-hop fields and those Connection names are gone.
    assert r.header(b"x-secret") is None
    assert r.header(b"keep-alive") is None
    assert r.header(b"x-kept") == b"yes"
    assert r.header(b"x-request-id") == b"client-id-123"
    assert r.header(b"via") == b"1.1 fastgw"


async def test_invalid_request_id_is_replaced(nursery: trio.Nursery) -> None:
    _, up, port = await start(nursery)
    c = await Client.open(port)
    r = await c.request(b"GET", b"/", [(b"X-Request-Id", b"bad id\twith spaces")])
    rid = r.header(b"x-request-id")
    assert rid and b" " not in rid
    assert up.received[0].header(b"x-request-id") == rid


async def test_post_body_and_chunked_both_ways(nursery: trio.Nursery) -> None:
    async def handler(req: Received, r: Responder) -> None:
        await r.respond(200, req.body[::-1], chunked=True)

    _, up, port = await start(nursery, Upstream(handler=handler))
    c = await Client.open(port)
    r = await c.request(b"POST", b"/p", [(b"Content-Type", b"application/json")], b'{"a":1}')
    assert r.status == 200 and r.body == b'}1:"a"{'
    assert up.received[0].body == b'{"a":1}'
    # chunked upload
    await c.send_raw(
        b"POST /c HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\n"
    )
    r = await c.read_response(b"POST")
    assert r.status == 200 and r.body == b"dlrow olleh"
    assert up.received[1].body == b"hello world"
    assert up.received[1].header(b"transfer-encoding") == b"chunked"


async def test_pipelined_requests_answered_in_order(nursery: trio.Nursery) -> None:
    async def handler(req: Received, r: Responder) -> None:
        await r.respond(200, req.target)

    _, up, port = await start(nursery, Upstream(handler=handler))
    c = await Client.open(port)
    await c.send_raw(
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    bodies = [(await c.read_response(m)).body for m in (b"GET", b"POST", b"GET")]
    assert bodies == [b"/1", b"/2", b"/3"]
    assert up.received[1].body == b"abc"


async def test_http10_client_gets_close_or_keepalive(nursery: trio.Nursery) -> None:
    _, _, port = await start(nursery)
    c = await Client.open(port)
    await c.send_raw(b"GET /x HTTP/1.0\r\n\r\n")
    raw = await c.read_raw_until_close()
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"Connection: close\r\n" in raw
    c2 = await Client.open(port)
    await c2.send_raw(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r = await c2.read_response()
    assert r.header(b"connection") == b"keep-alive"


async def test_routes_by_prefix_strip_and_404(nursery: trio.Nursery) -> None:
    routes = [RouteConfig(name="api", backend="fn", path_prefix="/api", strip_prefix=True)]
    _, up, port = await start(nursery, routes=routes)
    c = await Client.open(port)
    r = await c.request(b"GET", b"/api/v1/x?q=1")
    assert r.status == 200
    assert up.received[-1].target == b"/v1/x?q=1"
    r = await c.request(b"GET", b"/api")
    assert up.received[-1].target == b"/"
    r = await c.request(b"GET", b"/apix")
    assert r.status == 404
    assert r.json()["error"] == "no_route"
    assert r.json()["request_id"] == r.header(b"x-request-id").decode()


async def test_endpoint_path_prefix_joined(nursery: trio.Nursery) -> None:
    up = Upstream()
    uport = await nursery.start(up.serve)
    gw = Gateway(make_config([f"http://127.0.0.1:{uport}/fn"]))
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    await c.request(b"GET", b"/a/b?x=1")
    await c.request(b"GET", b"/")
    await c.request(b"GET", b"/?q")
    assert [x.target for x in up.received] == [b"/fn/a/b?x=1", b"/fn", b"/fn?q"]


async def test_head_request_no_body(nursery: trio.Nursery) -> None:
    async def handler(req: Received, r: Responder) -> None:
        if req.method != b"HEAD":
            return await r.respond(200, b"x" * 100)
        await r.send(h11.Response(status_code=200, headers=[(b"content-length", b"100")]))
        await r.send(h11.EndOfMessage())

    _, up, port = await start(nursery, Upstream(handler=handler))
    c = await Client.open(port)
    r = await c.request(b"HEAD", b"/")
    assert r.status == 200 and r.body == b"" and r.header(b"content-length") == b"100"
    r = await c.request(b"GET", b"/other")  # connection still in sync
    assert up.received[-1].target == b"/other"

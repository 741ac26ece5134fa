"""Request bodies at the edge: ``Expect: 100-continue`` and ``limits.max_body_bytes``.

RFC 9110 10.1.1: the gateway answers 100 (Continue) itself when it is ready for the body
and never forwards Expect (the function would otherwise answer an expectation it did not
get to decide on). RFC 9110 15.5.14: a body over the limit gets 413 and, framing being in
doubt after it, the connection is closed.
"""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from fastgw.config.model import Limits
from fastgw.gateway import Gateway

from .helpers import Client, Response, Upstream, make_config

MAX_BODY = 1000
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def start(
    nursery: trio.Nursery, upstream: Upstream | None = None, **kw
) -> tuple[Gateway, Upstream, int]:
    up = upstream or Upstream()
    uport = await nursery.start(up.serve)
    gw = Gateway(make_config([f"http://127.0.0.1:{uport}"], **kw))
    return gw, up, (await nursery.start(gw.serve))[0][1]


async def read_interim(c: Client) -> bytes:
    """Raw bytes up to the end of the first head; anything after it goes to c's parser."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await c.stream.receive_some(65536)
        assert data, f"closed after {buf!r}"
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    if rest:  # (h11 takes an empty string for EOF)
        c.conn.receive_data(rest)
    return head + b"\r\n\r\n"


def chunked(body: bytes, size: int) -> bytes:
    out = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    )
    return out + b"0\r\n\r\n"


# -- Expect: 100-continue ---------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_expect_100_continue(nursery: trio.Nursery, framing: str) -> None:
    _, up, port = await start(nursery)
    c = await Client.open(port)
    body = b"hello, continued world"
    if framing == "chunked":
        fields, wire = b"Transfer-Encoding: chunked\r\n", chunked(body, 5)
    else:
        fields, wire = b"Content-Length: %d\r\n" % len(body), body
    for i in range(2):  # twice: the connection stays in sync after an interim response
        await c.send_raw(
            b"POST /e%d HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\n%s\r\n" % (i, fields)
        )
        # The client holds the body back until the gateway says it is ready for it.
        assert await read_interim(c) == CONTINUE
        await c.send_raw(wire)
        r = await c.read_response(b"POST")
        assert r.status == 200
        got = up.received[i]
        assert got.body == body
        assert got.header(b"expect") is None
    assert up.connections == 1


async def test_expect_with_the_body_already_sent_is_not_forwarded(nursery: trio.Nursery) -> None:
    _, up, port = await start(nursery)
    c = await Client.open(port)
    # A client that does not wait for 100 (curl after 1 s, many SDKs at once) still works;
    # whether a 100 comes first is the gateway's choice (RFC 9110 10.1.1: MAY omit it).
    await c.send_raw(
        b"PUT /now HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc"
    )
    r = await c.read_response(b"PUT")
    assert r.status == 200
    assert up.received[0].body == b"abc"
    assert up.received[0].header(b"expect") is None


async def test_expect_over_the_limit_gets_413_without_100(nursery: trio.Nursery) -> None:
    _, up, port = await start(nursery, limits=Limits(max_body_bytes=MAX_BODY))
    c = await Client.open(port)
    await c.send_raw(
        b"POST / HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
        % (MAX_BODY + 1)
    )
    # The point of Expect: the client learns of the refusal without sending the body.
    raw = await c.read_raw_until_close()
    assert raw.startswith(b"HTTP/1.1 413 "), raw[:60]
    assert up.received == [] and up.connections == 0


async def test_expect_from_http10_is_ignored(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    _, up, port = await start(nursery)
    c = await Client.open(port)
    await c.send_raw(b"POST /old HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    # RFC 9110 10.1.1: an HTTP/1.0 client cannot take a 1xx; nothing may come back yet.
    with trio.move_on_after(5):
        data = await c.stream.receive_some(65536)
        raise AssertionError(f"gateway answered before the body was sent: {data!r}")
    await c.send_raw(b"abc")
    raw = await c.read_raw_until_close()
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:60]
    assert up.received[0].body == b"abc"
    assert up.received[0].header(b"expect") is None


# -- limits.max_body_bytes -------------------------------------------------------------


async def send_and_read(c: Client, data: bytes) -> bytes:
    """Send ``data`` while reading what comes back, as a real client does: the gateway
    may answer (and close) before the whole body is sent. Returns what was read before
    the connection closed or was reset."""
    got = b""

    async def send() -> None:
        try:
            await c.send_raw(data)
        except trio.BrokenResourceError:
            pass  # the gateway answered and closed; the response is what counts

    async with trio.open_nursery() as n:
        n.start_soon(send)
        got = await c.read_raw_until_close()
    return got


def parse(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = [(k.lower(), v.strip()) for k, _, v in (x.partition(b":") for x in lines[1:])]
    r = Response(status, headers, body)
    length = r.header(b"content-length")
    assert length is not None and len(body) == int(length), raw
    return r


def assert_413(raw: bytes) -> Response:
    r = parse(raw)
    assert r.status == 413, raw[:80]
    assert r.header(b"connection") == b"close"
    assert r.json()["status"] == 413
    assert r.json()["request_id"] == r.header(b"x-request-id").decode()
    return r


@pytest.mark.parametrize("over", [1, 1024 * 1024])
async def test_content_length_over_limit_is_413(nursery: trio.Nursery, over: int) -> None:
    gw, up, port = await start(nursery, limits=Limits(max_body_bytes=MAX_BODY))
    c = await Client.open(port)
    n = MAX_BODY + over
    raw = await send_and_read(
        c, b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % n + b"x" * n
    )
    r = assert_413(raw)
    assert r.json()["error"] == "body_too_large"
    assert up.received == [] and up.connections == 0
    assert gw.errors == {"body_too_large": 1}


@pytest.mark.parametrize("chunk", [100, 64 * 1024])
async def test_chunked_over_limit_is_413(nursery: trio.Nursery, chunk: int) -> None:
    _, up, port = await start(nursery, limits=Limits(max_body_bytes=MAX_BODY))
    c = await Client.open(port)
    head = b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw = await send_and_read(c, head + chunked(b"y" * (MAX_BODY + 1) * 64, chunk))
    assert_413(raw)
    assert up.received == []  # the function never got a complete request


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_of_exactly_the_limit_passes(nursery: trio.Nursery, framing: str) -> None:
    _, up, port = await start(nursery, limits=Limits(max_body_bytes=MAX_BODY))
    c = await Client.open(port)
    body = b"z" * MAX_BODY
    if framing == "chunked":
        await c.send_raw(
            b"POST / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked(body, 300)
        )
    else:
        await c.send_raw(b"POST / HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % MAX_BODY)
        await c.send_raw(body)
    assert (await c.read_response(b"POST")).status == 200
    assert up.received[0].body == body


class RawUpstream:
    """Records the bytes of each connection and never answers; ``arrived`` is set at the
    first bytes and ``closed`` when the gateway closes the connection."""

    def __init__(self) -> None:
        self.data = b""
        self.arrived = trio.Event()
        self.closed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._conn, listeners)

    async def _conn(self, stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                self.data += data
                self.arrived.set()
        except trio.BrokenResourceError:
            pass
        self.closed.set()


async def chunked_over_limit_mid_stream(nursery: trio.Nursery) -> tuple[Gateway, Response]:
    """Head and a first chunk under the limit reach the function; the next chunk goes
    over it while the body streams."""
    up = RawUpstream()
    uport = await nursery.start(up.serve)
    gw = Gateway(make_config([f"http://127.0.0.1:{uport}"], limits=Limits(max_body_bytes=MAX_BODY)))
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    with trio.fail_after(10):
        await c.send_raw(
            b"POST /s HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (MAX_BODY // 2, b"a" * (MAX_BODY // 2))
        )
        await up.arrived.wait()  # the gateway is streaming the body now
        raw = await send_and_read(c, b"%x\r\n%s\r\n0\r\n\r\n" % (MAX_BODY, b"b" * MAX_BODY))
        r = assert_413(raw)
        await up.closed.wait()  # the upstream connection is dropped, not pooled
    assert not up.data.endswith(b"0\r\n\r\n")  # the function never saw the body end
    assert gw.state.backends["fn"].pools[0].statistics().idle == 0
    return gw, r


async def test_chunked_over_limit_mid_stream_is_413(nursery: trio.Nursery) -> None:
    await chunked_over_limit_mid_stream(nursery)


async def test_chunked_over_limit_mid_stream_says_body_too_large(nursery: trio.Nursery) -> None:
    gw, r = await chunked_over_limit_mid_stream(nursery)
    assert r.json()["error"] == "body_too_large"
    assert gw.errors == {"body_too_large": 1}


async def test_over_limit_body_sent_whole_still_sees_413(nursery: trio.Nursery) -> None:
    """A client that writes its whole (too large) body before reading still gets the 413:
    the gateway half-closes and drains instead of resetting (lingering close)."""
    up = Upstream()
    uport = await nursery.start(up.serve)
    gw = Gateway(make_config([f"http://127.0.0.1:{uport}"], limits=Limits(max_body_bytes=1000)))
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    body = b"x" * (512 * 1024)
    await c.send_raw(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    raw = await c.read_raw_until_close()
    assert raw.startswith(b"HTTP/1.1 413 ")
    assert up.received == []

"""Admission slots follow every attempt (fastgw/upstream/backend.py, downstream.py):
a retry moves its slot to the endpoint it goes to and never to a full one, a hedge
holds a second slot for the race (none when no endpoint has room), per-caller counts
count a hedged request once, queued requests are served when a Retry-After pause
ends (not at their queue timeout), and no error path after admission keeps a slot.

Real gateways in front of real trio endpoints on 127.0.0.1 (fn_endpoint.py, or a raw
socket server where a test needs a broken response), on trio's MockClock: what is
asserted is which endpoint saw what, the gateway's counters, and the clock."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from fastgw.config.model import CredentialConfig, HedgeConfig, RetryConfig, RouteConfig
from fastgw.gateway import Gateway
from fastgw.upstream.backend import Backend
from fastgw.upstream.retry import HEDGE_WINS, HEDGES
from tests.e2e.helpers import Client, Response, make_config
from tests.upstream.fn_endpoint import Act, FnEndpoint, Seen

ANON = b"ip:127.0.0.1"  # the caller key of an anonymous local client


async def start(
    nursery: trio.Nursery,
    urls: list[str],
    caps: list[int],
    *,
    route: dict[str, Any] | None = None,
    **backend_kw: Any,
) -> tuple[Gateway, int, Backend]:
    """A gateway for ``urls`` with per-endpoint ``max_in_flight`` ``caps`` and one
    route (``route``: its extra settings)."""
    backend_kw.setdefault("balance", "round_robin")
    cfg = make_config(
        urls,
        backend_kw=backend_kw,
        routes=[RouteConfig(name="fn", backend="fn", **(route or {}))],
    )
    b = cfg.backends["fn"]
    eps = tuple(
        dataclasses.replace(e, max_in_flight=c) for e, c in zip(b.endpoints, caps, strict=True)
    )
    cfg = dataclasses.replace(cfg, backends={"fn": dataclasses.replace(b, endpoints=eps)})
    gw = Gateway(cfg)
    port = (await nursery.start(gw.serve))[0][1]
    return gw, port, gw.state.backends["fn"]


async def fns(nursery: trio.Nursery, act: Callable[[Seen], Act], n: int) -> list[FnEndpoint]:
    out = [FnEndpoint(b"E%d" % i, act=act) for i in range(n)]
    for f in out:
        await nursery.start(f.serve)
    return out


def assert_idle(b: Backend) -> None:
    assert b.admitted == 0
    assert [p.admitted for p in b.pools] == [0] * len(b.pools)
    assert not b.queue
    assert b.per_identity == {}


def paths(f: FnEndpoint) -> list[bytes]:
    return [s.target for s in f.seen]


async def get(
    port: int, path: bytes, out: dict[bytes, Response] | None = None, method: bytes = b"GET"
) -> Response:
    c = await Client.open(port)
    r = await c.request(method, path, body=b"" if method == b"POST" else None)
    await c.aclose()
    if out is not None:
        out[path] = r
    return r


RETRY_503 = {"retry": RetryConfig(attempts=1, on=("503",), backoff_base_s=0.01)}


# -- retries ------------------------------------------------------------------------


async def test_a_retry_respects_the_new_endpoints_cap(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """/slow holds the only slot of one endpoint; /flaky gets a 503 on the other and
    is retried. The full endpoint gets nothing: the retry stays where its slot is."""
    flaky = [0]

    def act(s: Seen) -> Act:
        if s.target == b"/slow":
            return Act(delay_s=5.0)
        flaky[0] += 1
        return Act(status=503) if flaky[0] == 1 else Act()

    e = await fns(nursery, act, 2)
    gw, port, b = await start(nursery, [f.url for f in e], [1, 1], route=RETRY_503)
    got: dict[bytes, Response] = {}
    async with trio.open_nursery() as n:
        n.start_soon(get, port, b"/slow", got)
        await trio.sleep(0.1)
        slow_at = next(f for f in e if paths(f) == [b"/slow"])
        other = e[1 - e.index(slow_at)]
        r = await get(port, b"/flaky")
        assert r.status == 200
        assert paths(slow_at) == [b"/slow"]  # never sent to the full endpoint
        assert paths(other) == [b"/flaky", b"/flaky"]  # retried where its slot is
        assert b.admitted == 1  # /slow's only
    assert got[b"/slow"].status == 200
    assert gw.state.router.routes[0].resil.counts[0] == 1  # type: ignore[union-attr]
    assert_idle(b)


async def test_a_retry_moves_its_slot_to_the_endpoint_it_goes_to(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """A 503 on one endpoint, retried on the other: while the retry is in flight the
    slot is on the second endpoint, and the first takes a new request at once."""
    seen_first: list[FnEndpoint] = []

    def act(s: Seen) -> Act:
        if s.target == b"/flaky":
            return Act(status=503) if len(seen_first) == 0 else Act(delay_s=2.0)
        return Act()

    e = await fns(nursery, act, 2)

    def record(s: Seen) -> Act:
        a = act(s)
        if s.target == b"/flaky" and not seen_first:
            seen_first.append(next(f for f in e if f.seen and f.seen[-1] is s))
        return a

    for f in e:
        f.act = record
    _gw, port, b = await start(
        nursery, [f.url for f in e], [1, 1], route=RETRY_503, max_in_flight_per_identity=5
    )
    got: dict[bytes, Response] = {}
    async with trio.open_nursery() as n:
        n.start_soon(get, port, b"/flaky", got)
        await trio.sleep(0.5)
        first = b.pools[e.index(seen_first[0])]
        second = b.pools[1 - e.index(seen_first[0])]
        assert (first.admitted, second.admitted, b.admitted) == (0, 1, 1)
        assert b.per_identity == {ANON: 1}  # one request of that caller
        r = await get(port, b"/fresh")  # the first endpoint's slot is free: no wait
        assert r.status == 200 and trio.current_time() < 1.0
    assert got[b"/flaky"].status == 200
    assert_idle(b)


async def test_a_retry_with_no_slot_anywhere_gets_the_original_answer_at_once(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """The 503 says Retry-After (its endpoint pauses) and the other endpoint is full:
    the function's own 503 goes back at once, not after a queue wait, and the full
    endpoint gets nothing."""

    def act(s: Seen) -> Act:
        if s.target == b"/slow":
            return Act(delay_s=5.0)
        return Act(status=503, headers=b"Retry-After: 7\r\n")

    e = await fns(nursery, act, 2)
    _gw, port, b = await start(
        nursery, [f.url for f in e], [1, 1], route=RETRY_503, max_queued=5,
        queue_timeout_s=30.0,
    )  # fmt: skip
    async with trio.open_nursery() as n:
        n.start_soon(get, port, b"/slow")
        await trio.sleep(0.1)
        t0 = trio.current_time()
        r = await get(port, b"/flaky")
        assert (r.status, r.header(b"retry-after")) == (503, b"7")
        assert trio.current_time() - t0 < 0.1
        assert sum(paths(f).count(b"/flaky") for f in e) == 1  # no retry went out
    assert_idle(b)


# -- hedging ------------------------------------------------------------------------

HEDGE = {"hedge": HedgeConfig(delay_s=0.1, budget_percent=100)}


async def test_a_hedge_holds_a_slot_and_counts_once_per_caller(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """/cold's first attempt takes 2 s, so a hedge goes out at 0.1 s (1 s). During the
    race both endpoints are full: a fresh request queues (it is not sent over either
    cap), and the caller counts one request in flight. The hedge wins, the first
    attempt is cancelled, its slot goes to the queued request."""
    attempts = [0]

    def act(s: Seen) -> Act:
        if s.target == b"/cold":
            attempts[0] += 1
            return Act(delay_s=2.0 if attempts[0] == 1 else 1.0)
        return Act()

    e = await fns(nursery, act, 2)
    gw, port, b = await start(
        nursery, [f.url for f in e], [1, 1], route=HEDGE, max_queued=5,
        max_in_flight_per_identity=5,
    )  # fmt: skip
    got: dict[bytes, Response] = {}
    async with trio.open_nursery() as n:
        n.start_soon(get, port, b"/cold", got)
        await trio.sleep(0.3)
        assert attempts[0] == 2  # hedged
        assert [p.admitted for p in b.pools] == [1, 1] and b.admitted == 2
        assert b.per_identity == {ANON: 1}  # one request of that caller
        n.start_soon(get, port, b"/fresh", got)
        await trio.sleep(0.1)
        assert len(b.queue) == 1  # both endpoints are at their cap
        assert sum(paths(f).count(b"/fresh") for f in e) == 0
        assert b.per_identity == {ANON: 2}
    assert got[b"/cold"].status == 200 and got[b"/fresh"].status == 200
    counts = gw.state.router.routes[0].resil.counts  # type: ignore[union-attr]
    assert (counts[HEDGES], counts[HEDGE_WINS]) == (1, 1)
    assert sum(f.abandoned for f in e) == 1  # the loser was cancelled
    assert_idle(b)


async def test_a_hedge_loser_gives_its_slot_back(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """The first attempt answers at 0.3 s, before the hedge (1 s): the hedge's slot is
    given back when it is cancelled."""
    attempts = [0]

    def act(s: Seen) -> Act:
        attempts[0] += 1
        return Act(delay_s=0.3 if attempts[0] == 1 else 1.0)

    e = await fns(nursery, act, 2)
    gw, port, b = await start(nursery, [f.url for f in e], [1, 1], route=HEDGE)
    r = await get(port, b"/x")
    assert r.status == 200 and attempts[0] == 2
    counts = gw.state.router.routes[0].resil.counts  # type: ignore[union-attr]
    assert (counts[HEDGES], counts[HEDGE_WINS]) == (1, 0)
    assert_idle(b)
    await trio.sleep(0.1)
    assert sum(f.abandoned for f in e) == 1


async def test_no_hedge_when_the_backend_is_at_its_cap(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """Three uncapped endpoints, a backend cap of 2: with two requests in flight a
    hedge would be a third, so none is sent (the third endpoint sees nothing). /slow
    is a POST (never hedged)."""

    def act(s: Seen) -> Act:
        return Act(delay_s=5.0 if s.target == b"/slow" else 1.0)

    e = await fns(nursery, act, 3)
    gw, port, b = await start(nursery, [f.url for f in e], [0, 0, 0], route=HEDGE, max_in_flight=2)
    async with trio.open_nursery() as n:
        n.start_soon(get, port, b"/slow", None, b"POST")
        await trio.sleep(0.05)
        r = await get(port, b"/late")
        assert r.status == 200
        assert sorted(len(f.seen) for f in e) == [0, 1, 1]
    counts = gw.state.router.routes[0].resil.counts  # type: ignore[union-attr]
    assert counts[HEDGES] == 0
    assert_idle(b)


async def test_no_hedge_to_a_full_endpoint(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    def act(s: Seen) -> Act:
        return Act(delay_s=5.0 if s.target == b"/slow" else 1.0)

    e = await fns(nursery, act, 2)
    gw, port, b = await start(nursery, [f.url for f in e], [1, 1], route=HEDGE)
    async with trio.open_nursery() as n:
        n.start_soon(get, port, b"/slow", None, b"POST")
        await trio.sleep(0.05)
        assert (await get(port, b"/late")).status == 200
        assert sorted(paths(f) for f in e) == [[b"/late"], [b"/slow"]]
    counts = gw.state.router.routes[0].resil.counts  # type: ignore[union-attr]
    assert counts[HEDGES] == 0
    assert_idle(b)


async def test_a_hedged_request_cut_short_gives_back_every_slot(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """A client that hangs up mid-race, and a connection cancelled mid-race (as the
    watchdog does at a deadline): both attempts' slots and the caller's count go back."""

    def act(s: Seen) -> Act:
        return Act(delay_s=3.0)

    e = await fns(nursery, act, 2)
    gw, port, b = await start(
        nursery, [f.url for f in e], [1, 1], route=HEDGE, max_in_flight_per_identity=5
    )
    c = await Client.open(port)
    await c.send_raw(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    await trio.sleep(0.3)
    assert b.admitted == 2 and b.per_identity == {ANON: 1}
    await c.aclose()  # the race runs out, the answer finds no client
    await trio.sleep(3.0)
    assert_idle(b)

    c = await Client.open(port)
    await c.send_raw(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    await trio.sleep(0.3)
    assert b.admitted == 2
    for d in list(gw.connections):
        assert d.scope is not None
        d.scope.cancel()
    await trio.sleep(0.01)
    assert_idle(b)
    assert (await c.read_response()).status == 504
    await c.aclose()


# -- queued requests and pauses -----------------------------------------------------


async def test_a_queued_request_is_served_when_the_pause_ends(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """One endpoint, one slot. /first gets a 503 with Retry-After: 3 at 0.5 s, which
    pauses the endpoint until 3.5 s; /queued, waiting since 0.1 s, is served within a
    watchdog tick of 3.5 s, not at its 30 s queue timeout."""

    def act(s: Seen) -> Act:
        if s.target == b"/first":
            return Act(status=503, delay_s=0.5, headers=b"Retry-After: 3\r\n")
        return Act()

    (e,) = await fns(nursery, act, 1)
    _gw, port, b = await start(nursery, [e.url], [1], max_queued=5, queue_timeout_s=30.0)
    got: dict[bytes, Response] = {}
    served_at: list[float] = []

    async def queued() -> None:
        await get(port, b"/queued", got)
        served_at.append(trio.current_time())

    async with trio.open_nursery() as n:
        n.start_soon(get, port, b"/first", got)
        await trio.sleep(0.1)
        n.start_soon(queued)
        await trio.sleep(0.1)
        assert len(b.queue) == 1
        await trio.sleep(1.0)
        assert len(b.queue) == 1 and b.pools[0].paused(trio.current_time())
    assert got[b"/first"].status == 503
    assert got[b"/queued"].status == 200
    assert 3.5 <= served_at[0] < 3.5 + 0.25  # within a watchdog tick or two
    assert paths(e) == [b"/first", b"/queued"]
    assert_idle(b)


# -- error paths after admission ----------------------------------------------------


async def _raw_server(nursery: trio.Nursery, reply: Callable[[trio.socket.SocketType], Any]) -> str:
    """A raw HTTP endpoint: reads one request head, then ``reply(sock)``."""
    lsock = trio.socket.socket()
    await lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)

    async def serve() -> None:
        async with trio.open_nursery() as n:
            while True:
                s, _ = await lsock.accept()
                n.start_soon(one, s)

    async def one(s: trio.socket.SocketType) -> None:
        with s:
            buf = b""
            while b"\r\n\r\n" not in buf:
                d = await s.recv(65536)
                if not d:
                    return
                buf += d
            await reply(s)

    nursery.start_soon(serve)
    return f"http://127.0.0.1:{lsock.getsockname()[1]}"


async def _close_at_once(s: trio.socket.SocketType) -> None:
    return None


async def _hang(s: trio.socket.SocketType) -> None:
    await s.recv(1)


async def _cut_mid_body(s: trio.socket.SocketType) -> None:
    await s.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")


def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
    url = f"http://127.0.0.1:{s.getsockname()[1]}"
    _KEEP.append(s)
    return url


_KEEP: list[socket.socket] = []


async def _post_part_then_hang_up(c: Client) -> None:
    await c.send_raw(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
    await trio.sleep(0.2)
    await c.aclose()


ERROR_PATHS: list[tuple[str, Any, dict[str, Any], bytes, int | None]] = [
    # (name, endpoint reply or None for a refused connect, route settings, request,
    #  the status the client gets, None: none)
    ("upstream_unreachable", None, {}, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 502),
    ("upstream_reset", _close_at_once, {}, b"POST / HTTP/1.1\r\nHost: x\r\n"
     b"Content-Length: 2\r\n\r\nhi", 502),
    ("first_byte_timeout", _hang, {"first_byte_timeout_s": 1.0},
     b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 504),
    ("reset_mid_response", _cut_mid_body, {}, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    ("client_gone_mid_body", _hang, {}, b"", None),
    ("chunked_413_after_admission", _hang, {"max_body_bytes": 10},
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"14\r\n01234567890123456789\r\n", 413),
    ("streamed_413", _hang, {"max_body_bytes": 10},
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 413),
    ("retried_then_timed_out", _hang, {"first_byte_timeout_s": 1.0,
     "retry": RetryConfig(attempts=1, on=("timeout",), backoff_base_s=0.01)},
     b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 504),
]  # fmt: skip


@pytest.mark.parametrize(
    ("reply", "route", "raw", "status"),
    [p[1:] for p in ERROR_PATHS],
    ids=[p[0] for p in ERROR_PATHS],
)
async def test_no_error_path_after_admission_keeps_the_slot(
    nursery: trio.Nursery,
    autojump_clock: MockClock,
    reply: Any,
    route: dict[str, Any],
    raw: bytes,
    status: int | None,
) -> None:
    """One endpoint with one slot and no queue (a held slot answers 503 at once): after
    each error path the next request is admitted at once, and nothing is counted."""
    url = _dead_url() if reply is None else await _raw_server(nursery, reply)
    gw, port, b = await start(nursery, [url], [1], route=route, max_in_flight_per_identity=1)
    c = await Client.open(port)
    if status is None:
        await _post_part_then_hang_up(c)
    else:
        await c.send_raw(raw)
        if raw.endswith(b"chunked\r\n\r\n"):
            await trio.sleep(0.1)
            await c.send_raw(b"14\r\n01234567890123456789\r\n")
        if reply is _cut_mid_body:  # the head went out, then the gateway aborts
            assert (await c.read_raw_until_close()).startswith(b"HTTP/1.1 200 ")
        else:
            assert (await c.read_response()).status == status
    # The client keeps its connection open (the gateway may linger on it for seconds).
    await trio.sleep(0.01)
    assert_idle(b)
    # The next request, from another connection, is admitted at once: a slot still
    # held would answer 503 upstream_saturated (no queue), a caller's count 429.
    c2 = await Client.open(port)
    await c2.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await trio.sleep(0.05)
    assert gw.errors["upstream_saturated"] == 0
    assert gw.errors["too_many_in_flight"] == 0
    await c.aclose()
    await c2.aclose()


async def test_credential_unavailable_after_admission_keeps_no_slot(
    nursery: trio.Nursery, autojump_clock: MockClock, tmp_path: Any
) -> None:
    (e,) = await fns(nursery, lambda s: Act(), 1)
    missing = CredentialConfig(type="bearer_file", path=str(tmp_path / "no-such-token"))
    gw, port, b = await start(
        nursery, [e.url], [1], credential=missing, connect_timeout_s=0.5,
        max_in_flight_per_identity=1,
    )  # fmt: skip
    c = await Client.open(port)
    for _ in range(3):
        r = await c.request(b"GET", b"/")
        assert (r.status, r.json()["error"]) == (503, "upstream_credential_unavailable")
        assert_idle(b)
    assert e.seen == []
    assert gw.errors.get("upstream_saturated", 0) == 0
    await c.aclose()

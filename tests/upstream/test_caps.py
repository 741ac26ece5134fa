"""Concurrency caps and the admission queue (fastgw/upstream/backend.py), and upstream
Retry-After pauses: many tasks on trio's MockClock for the queue's ordering and
bookkeeping, and real gateways in front of real trio upstreams for what a client sees
(503 or 429 with Retry-After)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import trio
from trio.testing import MockClock

from fastgw.config.model import BackendConfig, Endpoint
from fastgw.gateway import Gateway
from fastgw.upstream.backend import Backend, Unavailable
from fastgw.upstream.pool import retry_after_s
from tests.e2e.helpers import Client, Received, Responder, Upstream, endpoint, make_config


def ep(port: int, **kw: object) -> Endpoint:
    return dataclasses.replace(endpoint(f"http://127.0.0.1:{port}"), **kw)  # type: ignore[arg-type]


def capped(n: int, cap: int, **kw: object) -> Backend:
    eps = tuple(ep(9000 + i, max_in_flight=cap) for i in range(n))
    return Backend(BackendConfig(name="b", endpoints=eps, **kw))  # type: ignore[arg-type]


def assert_idle(b: Backend) -> None:
    assert b.admitted == 0
    assert [p.admitted for p in b.pools] == [0] * len(b.pools)
    assert not b.queue
    assert b.per_identity == {}


async def test_queue_is_fifo_and_every_slot_is_handed_on_exactly_once(
    autojump_clock: MockClock,
) -> None:
    """Sixty callers, four slots, random hold times: never more than the cap at once,
    queued callers get their slot in arrival order, and everything returns to zero."""
    b = capped(2, 2, max_queued=100, queue_timeout_s=1000.0)
    rng = random.Random(7)
    queued_order: list[int] = []
    served_order: list[int] = []
    peak = 0

    async def caller(i: int) -> None:
        nonlocal peak
        if b.admitted >= 4 or b.queue:
            queued_order.append(i)
        pool = await b.admit(None, None)
        served_order.append(i)
        assert pool.admitted <= 2
        peak = max(peak, b.admitted)
        await trio.sleep(rng.random())
        b.release(pool, None)

    async with trio.open_nursery() as n:
        for i in range(60):
            n.start_soon(caller, i)
            await trio.sleep(0.01)
    assert peak == 4
    assert len(queued_order) > 30
    served_after_queue = [i for i in served_order if i in set(queued_order)]
    assert served_after_queue == queued_order
    assert_idle(b)


async def test_queue_timeout_full_queue_and_cancelled_waiters(autojump_clock: MockClock) -> None:
    b = capped(1, 1, max_queued=2, queue_timeout_s=3.0)
    held = await b.admit(None, None)
    results: list[object] = []

    async def waiter() -> None:
        try:
            results.append(await b.admit(None, None))
        except Unavailable as e:
            results.append(e)

    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        n.start_soon(waiter)
        await trio.sleep(0.1)
        assert len(b.queue) == 2
        with pytest.raises(Unavailable) as full:
            await b.admit(None, None)  # a full queue answers at once
        assert (full.value.status, full.value.code) == (503, "upstream_saturated")
        t0 = trio.current_time()
    assert trio.current_time() - t0 == pytest.approx(2.9, abs=0.01)
    assert [(e.status, e.code, e.retry_after_s) for e in results] == [  # type: ignore[union-attr]
        (503, "queue_timeout", 3),
        (503, "queue_timeout", 3),
    ]
    assert b.queue_timeouts == 2

    # A waiter whose client goes away leaves the queue; one cancelled just after being
    # handed a slot passes it on (no leak, no lost wakeup).
    with trio.move_on_after(1.0):
        await b.admit(None, None)
    assert not b.queue
    async with trio.open_nursery() as n:
        n.start_soon(waiter)
        n.start_soon(waiter)
        await trio.sleep(0.1)
        first = b.queue[0]
        n.cancel_scope.cancel()  # both clients leave...
        b.release(held, None)  # ...and the first is handed the slot before it runs
        assert first.pool is not None
    assert_idle(b)
    assert len(results) == 2  # neither of the cancelled two got through
    # The slot is free again: the next caller gets it at once.
    t0 = trio.current_time()
    a1 = await b.admit(None, None)
    assert trio.current_time() == t0
    b.release(a1, None)
    assert_idle(b)


async def test_per_identity_cap_counts_queued_requests(autojump_clock: MockClock) -> None:
    b = capped(1, 1, max_queued=10, max_in_flight_per_identity=2)
    a = await b.admit(b"alice", None)
    got: list[object] = []

    async def call(who: bytes) -> None:
        try:
            p = await b.admit(who, None)
            got.append(who)
            await trio.sleep(1)
            b.release(p, who)
        except Unavailable as e:
            got.append((who, e.status, e.code))

    async with trio.open_nursery() as n:
        n.start_soon(call, b"alice")  # queued: alice now has 2
        await trio.sleep(0.1)
        n.start_soon(call, b"alice")  # over her cap: 429 at once
        n.start_soon(call, b"bob")  # bob still gets in line
        await trio.sleep(0.1)
        assert got == [(b"alice", 429, "too_many_in_flight")]
        b.release(a, b"alice")
    assert got[1:] == [b"alice", b"bob"]
    assert_idle(b)


async def test_backend_cap_across_endpoints(autojump_clock: MockClock) -> None:
    b = capped(3, 0, max_in_flight=2, max_queued=1, queue_timeout_s=1.0)
    p1 = await b.admit(None, None)
    p2 = await b.admit(None, None)
    with pytest.raises(Unavailable) as e:
        await b.admit(None, None)
    assert e.value.code == "queue_timeout"
    b.release(p1, None)
    b.release(p2, None)
    assert_idle(b)


def test_retry_after_values() -> None:
    now = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
    assert retry_after_s(b"120", now) == 120.0
    assert retry_after_s(b" 0 ", now) == 0.0
    assert retry_after_s(b"Tue, 14 Nov 2023 22:13:50 GMT", now) == 30.0
    assert retry_after_s(b"soon", now) is None
    assert retry_after_s(b"-5", now) is None


# -- through a real gateway -------------------------------------------------------------


async def gateway(nursery: trio.Nursery, urls: list[str], **backend_kw: object) -> int:
    gw = Gateway(make_config(urls, backend_kw=backend_kw))
    return (await nursery.start(gw.serve))[0][1]


async def test_saturated_endpoint_queues_then_answers_503_with_retry_after(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    release = trio.Event()

    async def slow(req: Received, r: Responder) -> None:
        await release.wait()
        await r.respond(200, b"done")

    up = Upstream(handler=slow)
    uport = await nursery.start(up.serve)
    eps = [ep(uport, max_in_flight=1)]
    cfg = make_config([], backend_kw={"max_queued": 1, "queue_timeout_s": 2.0})
    cfg = dataclasses.replace(
        cfg, backends={"fn": dataclasses.replace(cfg.backends["fn"], endpoints=tuple(eps))}
    )
    gw = Gateway(cfg)
    port = (await nursery.start(gw.serve))[0][1]
    answers: dict[str, object] = {}

    async def call(name: str) -> None:
        c = await Client.open(port)
        r = await c.request(b"GET", b"/" + name.encode())
        answers[name] = (r.status, r.header(b"retry-after"), r.body)

    async with trio.open_nursery() as n:
        n.start_soon(call, "first")  # takes the only slot
        await trio.sleep(0.1)
        n.start_soon(call, "queued")  # waits, then times out
        await trio.sleep(0.1)
        n.start_soon(call, "full")  # the queue is full: 503 at once
        await trio.sleep(0.1)
        assert answers["full"][:2] == (503, b"1")  # type: ignore[index]
        await trio.sleep(3)
        assert answers["queued"][:2] == (503, b"2")  # type: ignore[index]
        assert b"queue_timeout" in answers["queued"][2]  # type: ignore[index,operator]
        release.set()
    assert answers["first"][:1] == (200,)  # type: ignore[index]
    assert len(up.received) == 1
    b = gw.state.backends["fn"]
    assert_idle(b)


async def test_per_identity_cap_through_the_gateway(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """An anonymous caller is keyed by its address: a second concurrent request from
    127.0.0.1 over the cap of 1 is refused with 429 while the first is in flight."""
    release = trio.Event()

    async def slow(req: Received, r: Responder) -> None:
        await release.wait()
        await r.respond(200, b"done")

    up = Upstream(handler=slow)
    uport = await nursery.start(up.serve)
    port = await gateway(
        nursery, [f"http://127.0.0.1:{uport}"], max_in_flight_per_identity=1, max_queued=5
    )
    statuses: list[int] = []

    async def call() -> None:
        c = await Client.open(port)
        r = await c.request(b"GET", b"/")
        statuses.append(r.status)

    async with trio.open_nursery() as n:
        n.start_soon(call)
        await trio.sleep(0.1)
        c = await Client.open(port)
        r = await c.request(b"GET", b"/")
        assert (r.status, r.header(b"retry-after")) == (429, b"1")
        release.set()
    assert statuses == [200]


async def test_upstream_retry_after_pauses_the_endpoint(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """A 503 with Retry-After: 5 from A sends traffic to B for 5 s; once every endpoint
    is paused the gateway answers 503 with the earliest resume itself."""
    busy = {"a": 1}

    def handler(name: str):  # type: ignore[no-untyped-def]
        async def h(req: Received, r: Responder) -> None:
            if busy.get(name):
                busy[name] -= 1
                await r.respond(503, b"busy", [(b"retry-after", b"5")])
            else:
                await r.respond(200, name.encode())

        return h

    a, b = Upstream(handler=handler("a")), Upstream(handler=handler("b"))
    pa, pb = await nursery.start(a.serve), await nursery.start(b.serve)
    port = await gateway(
        nursery, [f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"], balance="round_robin"
    )
    c = await Client.open(port)
    first = await c.request(b"GET", b"/")
    assert (first.status, first.header(b"retry-after")) == (503, b"5")  # passed through
    bodies = [(await c.request(b"GET", b"/")).body for _ in range(6)]
    assert bodies == [b"b"] * 6  # A is paused
    await trio.sleep(5.1)
    bodies = [(await c.request(b"GET", b"/")).body for _ in range(4)]
    assert sorted(bodies) == [b"a", b"a", b"b", b"b"]  # A is back

    # Both paused: the gateway answers without calling either.
    busy.update(a=1, b=1)
    for _ in range(2):
        await c.request(b"GET", b"/")
    seen = len(a.received) + len(b.received)
    await trio.sleep(1)
    r = await c.request(b"GET", b"/")
    assert r.status == 503
    assert r.header(b"retry-after") == b"4"
    assert b"upstream_paused" in r.body
    assert len(a.received) + len(b.received) == seen


async def test_a_queued_client_that_hangs_up_leaves_the_queue(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    release = trio.Event()

    async def slow(req: Received, r: Responder) -> None:
        await release.wait()
        await r.respond(200, b"done")

    up = Upstream(handler=slow)
    uport = await nursery.start(up.serve)
    cfg = make_config([], backend_kw={"max_queued": 5, "queue_timeout_s": 100.0})
    cfg = dataclasses.replace(
        cfg,
        backends={
            "fn": dataclasses.replace(cfg.backends["fn"], endpoints=(ep(uport, max_in_flight=1),))
        },
    )
    gw = Gateway(cfg)
    port = (await nursery.start(gw.serve))[0][1]
    b = gw.state.backends["fn"]
    done: list[int] = []

    async def first() -> None:
        c = await Client.open(port)
        done.append((await c.request(b"GET", b"/")).status)

    async with trio.open_nursery() as n:
        n.start_soon(first)
        await trio.sleep(0.1)
        quitter = await Client.open(port)
        await quitter.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.sleep(0.1)
        assert len(b.queue) == 1
        await quitter.aclose()
        await trio.sleep(0.1)
        assert len(b.queue) == 0  # it left long before its 100 s were up
        assert trio.current_time() < 1.0
        release.set()
    assert done == [200]
    assert len(up.received) == 1
    assert_idle(b)
    assert gw.errors["client_gone"] >= 1

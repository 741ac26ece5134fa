"""Balancing across a backend's endpoints: least outstanding of two random choices, and
round robin; over real sockets, a slow endpoint gets fewer requests."""

from __future__ import annotations

import collections
import dataclasses

import trio

from fastgw.config.model import BackendConfig
from fastgw.gateway import Gateway
from fastgw.upstream.backend import Backend
from tests.e2e.helpers import Client, Received, Responder, Upstream, endpoint, make_config


def backend(n: int, balance: str = "least_outstanding") -> Backend:
    eps = tuple(endpoint(f"http://127.0.0.1:{9000 + i}") for i in range(n))
    return Backend(BackendConfig(name="b", endpoints=eps, balance=balance))


def test_two_choices_never_pick_the_strictly_busiest() -> None:
    b = backend(4)
    for i, p in enumerate(b.pools):
        p._busy = [5, 1, 2, 9][i]
    picks = collections.Counter(b.pick() for _ in range(4000))
    assert b.pools[3] not in picks  # the busiest loses every pairing it is in
    assert picks[b.pools[1]] > picks[b.pools[2]] > picks[b.pools[0]] > 0


def test_round_robin_and_single_endpoint() -> None:
    b = backend(3, "round_robin")
    assert [b.pick() for _ in range(6)] == b.pools * 2
    one = backend(1)
    assert {one.pick() for _ in range(10)} == {one.pools[0]}


async def test_slow_endpoint_gets_fewer_requests(nursery: trio.Nursery) -> None:
    """Twenty concurrent clients, one endpoint answering in 50 ms and one at once: the
    fast endpoint takes most of the load (round robin would split it evenly)."""

    async def slow(req: Received, r: Responder) -> None:
        await trio.sleep(0.05)
        await r.respond(200, b"slow")

    fast_up, slow_up = Upstream(), Upstream(handler=slow)
    fp = await nursery.start(fast_up.serve)
    sp = await nursery.start(slow_up.serve)
    cfg = make_config([f"http://127.0.0.1:{fp}", f"http://127.0.0.1:{sp}"])
    gw = Gateway(dataclasses.replace(cfg))
    port = (await nursery.start(gw.serve))[0][1]

    async def client() -> None:
        c = await Client.open(port)
        for _ in range(10):
            assert (await c.request(b"GET", b"/")).status == 200

    async with trio.open_nursery() as clients:
        for _ in range(20):
            clients.start_soon(client)
    assert len(fast_up.received) + len(slow_up.received) == 200
    assert len(fast_up.received) > 2 * len(slow_up.received)

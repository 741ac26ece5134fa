"""Upstream keep-alive across clients: the pool, not the client connection, decides how
many connections the function sees. Counted on the upstream's side (connections accepted,
and which connection carried each request) and in the pool's statistics."""

from __future__ import annotations

import trio

from fastgw.gateway import Gateway

from .helpers import Client, Received, Responder, Upstream, make_config


async def start(nursery: trio.Nursery, up: Upstream) -> tuple[Gateway, int]:
    uport = await nursery.start(up.serve)
    gw = Gateway(make_config([f"http://127.0.0.1:{uport}"]))
    return gw, (await nursery.start(gw.serve))[0][1]


async def test_sequential_requests_from_several_clients_use_one_upstream_conn(
    nursery: trio.Nursery,
) -> None:
    up = Upstream()
    gw, port = await start(nursery, up)
    # Four kept-alive clients taking turns, then five one-shot clients.
    clients = [await Client.open(port) for _ in range(4)]
    for turn in range(3):
        for i, c in enumerate(clients):
            assert (await c.request(b"GET", b"/c%d/%d" % (i, turn))).status == 200
    for i in range(5):
        c = await Client.open(port)
        assert (await c.request(b"GET", b"/once/%d" % i)).status == 200
        await c.aclose()

    assert len(up.received) == 17
    assert up.connections == 1
    assert {x.conn_id for x in up.received} == {1}
    st = gw.state.backends["fn"].pools[0].statistics()
    assert (st.created, st.reused, st.idle, st.busy) == (1, 16, 1, 0)


async def test_concurrent_requests_open_connections_that_are_then_reused(
    nursery: trio.Nursery,
) -> None:
    n = 3
    all_arrived = trio.Event()
    arrived = 0

    async def handler(req: Received, r: Responder) -> None:
        nonlocal arrived
        if req.target == b"/together":
            arrived += 1
            if arrived == n:
                all_arrived.set()
            await all_arrived.wait()  # all n are in flight at once
        await r.respond(200, req.target)

    up = Upstream(handler=handler)
    gw, port = await start(nursery, up)
    clients = [await Client.open(port) for _ in range(n)]

    async def one(c: Client) -> None:
        assert (await c.request(b"GET", b"/together")).status == 200

    with trio.fail_after(10):
        async with trio.open_nursery() as together:
            for c in clients:
                together.start_soon(one, c)
    assert up.connections == n  # one upstream connection per request in flight

    # Then, one at a time from every client: the n warm connections carry them all.
    for turn in range(3):
        for c in clients:
            assert (await c.request(b"GET", b"/after/%d" % turn)).status == 200
    assert up.connections == n
    st = gw.state.backends["fn"].pools[0].statistics()
    assert (st.created, st.idle, st.busy) == (n, n, 0)
    assert st.reused == 3 * n

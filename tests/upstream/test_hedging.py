"""Hedging for cold starts. Two real endpoints on 127.0.0.1; A plays a scale-to-zero
function (the first request after it idled adds a 2 s cold start), B is always warm.
Under GET load with idle gaps that make A cold again and again, hedging keeps the
clients' p99 under the hedge delay plus twice the warm latency: the cold request is
sent to B too, B's answer wins, and A's attempt is cancelled with its connection
closed. Requests that may not be repeated are never hedged. The delay arithmetic
(learned percentile, bounds, cold endpoints earlier) is checked directly.

These tests run on the real clock (real sockets, real delays): a few seconds in all.
Their assertions are about structure (which attempt answered, which endpoint saw what,
p99 against a bound with a wide margin), not speed; bench/hedging.py measures."""

from __future__ import annotations

from pathlib import Path

import trio

from fastgw.config.model import CredentialConfig, HedgeConfig, RouteConfig
from fastgw.gateway import Gateway
from fastgw.upstream.pool import Pool
from fastgw.upstream.retry import HedgePolicy, likely_cold, track_of
from tests.e2e.helpers import Client, make_config
from tests.upstream.fn_endpoint import Act, FnEndpoint

WARM_S = 0.01  # both endpoints' ordinary answer time
COLD_START_S = 2.0
IDLE_WINDOW_S = 0.3  # A scales to zero after this long without a request
HEDGE_DELAY_S = 0.15


async def _start(
    nursery: trio.Nursery, a: FnEndpoint, b: FnEndpoint, hedge: HedgeConfig | None
) -> tuple[Gateway, int]:
    await nursery.start(a.serve)
    await nursery.start(b.serve)
    cfg = make_config(
        [a.url, b.url],
        backend_kw={"cold_after_idle_s": IDLE_WINDOW_S},
        routes=[RouteConfig(name="fn", backend="fn", hedge=hedge)],
    )
    gw = Gateway(cfg)
    port = (await nursery.start(gw.serve))[0][1]
    return gw, port


def p(latencies: list[float], q: float) -> float:
    s = sorted(latencies)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _load(port: int, rounds: int, clients: int, per_client: int) -> list[float]:
    """``rounds`` bursts of GETs from ``clients`` connections, each burst followed by
    an idle gap longer than A's scale-to-zero window. Client-side latencies."""
    out: list[float] = []

    async def one(c: Client) -> None:
        for _ in range(per_client):
            t0 = trio.current_time()
            r = await c.request(b"GET", b"/work")
            out.append(trio.current_time() - t0)
            assert r.status == 200, r.status

    conns = [await Client.open(port) for _ in range(clients)]
    for _ in range(rounds):
        async with trio.open_nursery() as n:
            for c in conns:
                n.start_soon(one, c)
        await trio.sleep(IDLE_WINDOW_S * 2)  # A goes cold again
    for c in conns:
        await c.aclose()
    return out


async def test_hedging_keeps_p99_under_delay_plus_twice_warm(nursery: trio.Nursery) -> None:
    a = FnEndpoint(b"A", delay_s=WARM_S, cold_after_idle_s=IDLE_WINDOW_S, cold_start_s=COLD_START_S)
    b = FnEndpoint(b"B", delay_s=WARM_S)
    gw, port = await _start(nursery, a, b, HedgeConfig(delay_s=HEDGE_DELAY_S, budget_percent=20))
    lat = await _load(port, rounds=6, clients=4, per_client=15)
    assert len(lat) == 360
    # A really went cold again after each gap, and none of those 2 s showed.
    assert a.cold_starts >= 5, a.cold_starts
    assert max(lat) < COLD_START_S
    warm = p(lat, 0.5)
    p99 = p(lat, 0.99)
    assert p99 < HEDGE_DELAY_S + 2 * warm, (p99, warm)
    # The cold attempts lost: cancelled, their connections closed by the gateway.
    resil = gw.state.router.routes[0].resil
    assert resil is not None
    hedges, wins = resil.counts[1], resil.counts[2]
    assert wins >= a.cold_starts - 1 and hedges >= wins, (hedges, wins, a.cold_starts)
    assert a.abandoned >= a.cold_starts - 1
    # A loser's connection never goes back to the pool: every idle connection A's pool
    # holds answered its request.
    pool_a = gw.state.backends["fn"].pools[0]
    st = pool_a.statistics()
    assert st.idle <= st.created - a.abandoned


async def test_requests_that_may_not_be_repeated_are_never_hedged(
    nursery: trio.Nursery,
) -> None:
    a = FnEndpoint(b"A", cold_after_idle_s=0.0, cold_start_s=0.4)  # every request is slow
    b = FnEndpoint(b"B", cold_after_idle_s=0.0, cold_start_s=0.4)
    gw, port = await _start(nursery, a, b, HedgeConfig(delay_s=0.05, budget_percent=100))
    c = await Client.open(port)
    r = await c.request(b"POST", b"/pay", body=b"once")
    assert r.status == 200
    assert a.count(b"POST") + b.count(b"POST") == 1  # the slow POST went to one only
    # The same with an Idempotency-Key may be hedged: both endpoints saw it.
    r = await c.request(b"POST", b"/pay", headers=[(b"Idempotency-Key", b"k")], body=b"once")
    assert r.status == 200
    assert a.count(b"POST") + b.count(b"POST") == 3
    resil = gw.state.router.routes[0].resil
    assert resil is not None and resil.counts[1] == 1


async def test_hedge_budget_caps_hedges(nursery: trio.Nursery) -> None:
    a = FnEndpoint(b"A", cold_after_idle_s=0.0, cold_start_s=0.1)
    b = FnEndpoint(b"B", cold_after_idle_s=0.0, cold_start_s=0.1)
    gw, port = await _start(nursery, a, b, HedgeConfig(delay_s=0.02, budget_percent=0))
    resil = gw.state.router.routes[0].resil
    assert resil is not None and resil.hedge is not None
    resil.hedge.budget.reserve = 0.0
    resil.hedge.budget.reserve_per_s = 0.0
    c = await Client.open(port)
    for _ in range(3):
        assert (await c.request(b"GET", b"/x")).status == 200
    assert len(a.seen) + len(b.seen) == 3
    assert resil.counts[1] == 0 and resil.counts[4] == 3


# --- the delay, directly -------------------------------------------------------------


def _pool() -> Pool:
    cfg = make_config(["http://127.0.0.1:9"]).backends["fn"]
    return Pool(cfg.endpoints[0], cfg, None)


def test_learned_delay_is_a_percentile_within_bounds() -> None:
    pool = _pool()
    hp = HedgePolicy(HedgeConfig(learned=True, percentile=90, min_delay_s=0.01, max_delay_s=0.5))
    assert hp.delay_s(pool, cold=False) == 0.5  # nothing learned yet: the upper bound
    for i in range(1, 101):
        track_of(pool).observe(i / 1000)  # 1..100 ms; the ring keeps the last 64
    assert 0.085 <= hp.delay_s(pool, cold=False) <= 0.095
    assert hp.delay_s(pool, cold=True) == hp.delay_s(pool, cold=False) / 4
    for _ in range(64):
        track_of(pool).observe(0.0001)
    assert hp.delay_s(pool, cold=False) == 0.01  # the lower bound
    fixed = HedgePolicy(HedgeConfig(delay_s=0.2, cold_delay_s=0.05))
    assert (fixed.delay_s(pool, False), fixed.delay_s(pool, True)) == (0.2, 0.05)


def test_likely_cold_signals() -> None:
    pool = _pool()
    cfg = make_config(["http://127.0.0.1:9"], backend_kw={"cold_after_idle_s": 60}).backends["fn"]
    assert likely_cold(pool, cfg, 0.0)  # no connection at all
    for _ in range(16):
        track_of(pool).observe(0.01)
    track_of(pool).observe(0.2)  # 20x its median
    assert track_of(pool).far_over_norm()


async def test_keep_warm_pings_idle_endpoints_so_they_stay_warm(nursery: trio.Nursery) -> None:
    # A scales to zero after 0.5 s idle; the gateway pings it after 0.2 s idle.
    a = FnEndpoint(b"A", cold_after_idle_s=0.5, cold_start_s=1.0)
    await nursery.start(a.serve)
    cfg = make_config(
        [a.url + "/fn"],
        backend_kw={"keep_warm_interval_s": 0.2, "keep_warm_path": "/warm?from=gw"},
    )
    gw = Gateway(cfg)
    port = (await nursery.start(gw.serve))[0][1]
    await trio.sleep(2.5)  # idle, as far as callers go: longer than the scale-to-zero window
    c = await Client.open(port)
    t0 = trio.current_time()
    r = await c.request(b"GET", b"/x")
    assert r.status == 200
    assert trio.current_time() - t0 < 0.5  # no cold start: the pings kept it warm
    pings = [s for s in a.seen if s.target == b"/fn/warm?from=gw"]
    assert len(pings) >= 4, [s.target for s in a.seen]
    assert all(s.method == b"GET" for s in pings)
    assert a.cold_starts == 1  # only the very first ping met a cold instance
    t = gw.state.backends["fn"].pools[0].track
    assert t is not None and t.warm_ok == len(pings) and t.warm_failed == 0


async def test_keep_warm_carries_the_upstream_credential(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    token = tmp_path / "fn.token"
    token.write_text("warm-token\n")
    a = FnEndpoint(b"A")
    await nursery.start(a.serve)
    cfg = make_config(
        [a.url],
        backend_kw={
            "keep_warm_interval_s": 0.1,
            "keep_warm_path": "/warm",
            "credential": CredentialConfig(type="bearer_file", path=str(token)),
        },
    )
    gw = Gateway(cfg)
    await nursery.start(gw.serve)
    while not a.seen:
        await trio.sleep(0.05)
    assert a.seen[0].target == b"/warm"
    assert a.seen[0].headers[b"authorization"] == b"Bearer warm-token"


async def test_likely_cold_endpoints_get_their_own_first_byte_timeout(
    nursery: trio.Nursery,
) -> None:
    # 0.8 s to a first byte: a cold start the first time, a stuck function the second.
    a = FnEndpoint(b"A", cold_after_idle_s=60.0, cold_start_s=0.8)
    await nursery.start(a.serve)
    slow = Act(delay_s=0.8)
    cfg = make_config(
        [a.url],
        backend_kw={"first_byte_timeout_s": 0.3, "cold_first_byte_timeout_s": 5.0},
    )
    gw = Gateway(cfg)
    c = await Client.open((await nursery.start(gw.serve))[0][1])
    # No connection yet: likely cold, so the 5 s timeout applies and the cold start
    # is waited out.
    r = await c.request(b"GET", b"/x")
    assert (r.status, a.cold_starts) == (200, 1)
    # Warm now (a connection just used): the 0.3 s first-byte timeout applies.
    a.act = lambda req: slow
    t0 = trio.current_time()
    r = await c.request(b"GET", b"/x")
    assert r.status == 504
    assert trio.current_time() - t0 < 0.7

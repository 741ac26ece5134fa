"""Balancing across a backend's endpoints: least outstanding of two random choices, round
robin, weighted, hash; priority levels; and the configuration of all of it. Over real
sockets where the spread is what a client sees (a slow endpoint gets fewer requests,
weights hold, a tenant sticks to one endpoint)."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from fastgw.config import load_config
from fastgw.config.model import BackendConfig, HealthCheckConfig, OutlierConfig
from fastgw.errors import ConfigError
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


# -- weights, hashing, priorities --------------------------------------------------------


def shaped(*eps: dict[str, object], **kw: object) -> Backend:
    out = tuple(
        dataclasses.replace(endpoint(f"http://127.0.0.1:{9000 + i}"), **e)  # type: ignore[arg-type]
        for i, e in enumerate(eps)
    )
    return Backend(BackendConfig(name="b", endpoints=out, **kw))  # type: ignore[arg-type]


async def test_weighted_spread_is_exact_and_smooth() -> None:
    """Smooth weighted round robin: over every window of sum(weights) picks each
    endpoint gets exactly its weight, and the heavy one is never picked many times in a
    row (5,1,1 gives a a b a c a a, not a a a a a b c)."""
    b = shaped({"weight": 5}, {"weight": 1}, {"weight": 1}, balance="weighted")
    picks = [b.pick() for _ in range(700)]
    for start in range(0, 700, 7):
        window = collections.Counter(picks[start : start + 7])
        assert [window[p] for p in b.pools] == [5, 1, 1]
    assert picks[:7] == [b.pools[i] for i in (0, 0, 1, 0, 2, 0, 0)]


async def test_weighted_spread_over_real_endpoints(nursery: trio.Nursery) -> None:
    ups = [Upstream(), Upstream(), Upstream()]
    ports = [await nursery.start(u.serve) for u in ups]
    cfg = make_config([], backend_kw={"balance": "weighted"})
    eps = tuple(
        dataclasses.replace(endpoint(f"http://127.0.0.1:{p}"), weight=w)
        for p, w in zip(ports, (1, 3, 6), strict=True)
    )
    cfg = dataclasses.replace(
        cfg, backends={"fn": dataclasses.replace(cfg.backends["fn"], endpoints=eps)}
    )
    gw = Gateway(cfg)
    port = (await nursery.start(gw.serve))[0][1]

    async def client() -> None:
        c = await Client.open(port)
        for _ in range(50):
            assert (await c.request(b"GET", b"/")).status == 200

    async with trio.open_nursery() as clients:
        for _ in range(4):
            clients.start_soon(client)
    got = [len(u.received) for u in ups]
    assert sum(got) == 200
    for n, share in zip(got, (0.1, 0.3, 0.6), strict=True):
        assert abs(n - 200 * share) <= 200 * 0.02, got  # exact up to in-flight overlap


async def test_hash_is_stable_and_an_endpoint_leaving_moves_only_its_keys() -> None:
    keys = [f"caller-{i}".encode() for i in range(3000)]
    b = shaped(*({} for _ in range(5)), balance="hash")
    before = {k: b.pick(k) for k in keys}
    assert {k: b.pick(k) for k in keys} == before  # stable
    counts = collections.Counter(before.values())
    assert all(450 <= counts[p] <= 750 for p in b.pools), counts  # ~600 each

    gone = b.pools[2]
    gone.eject(30.0)  # ejected endpoints are skipped
    after = {k: b.pick(k) for k in keys}
    moved = [k for k in keys if after[k] is not before[k]]
    assert all(before[k] is gone for k in moved)
    assert len(moved) == counts[gone]  # exactly its keys, about 1/5
    assert 0.15 < len(moved) / len(keys) < 0.25

    # Another process (or a config without that endpoint) agrees on the rest.
    c = shaped(*({} for _ in range(5)), balance="hash")
    urls = {k: c.pick(k).endpoint.url for k in keys}  # type: ignore[union-attr]
    assert urls == {k: p.endpoint.url for k, p in before.items()}  # type: ignore[union-attr]


async def test_hash_weights_bias_the_share() -> None:
    b = shaped({"weight": 1}, {"weight": 3}, balance="hash")
    counts = collections.Counter(b.pick(f"k{i}".encode()) for i in range(4000))
    assert 0.70 < counts[b.pools[1]] / 4000 < 0.80


async def test_hash_on_a_header_through_the_gateway(nursery: trio.Nursery) -> None:
    ups = [Upstream() for _ in range(3)]
    ports = [await nursery.start(u.serve) for u in ups]
    gw = Gateway(
        make_config(
            [f"http://127.0.0.1:{p}" for p in ports],
            backend_kw={"balance": "hash", "hash_on": "header:X-Tenant"},
        )
    )
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    for _ in range(3):
        for t in range(12):
            await c.request(b"GET", b"/", [(b"X-Tenant", b"t%d" % t)])
    where: dict[bytes, set[int]] = collections.defaultdict(set)
    for i, u in enumerate(ups):
        for rec in u.received:
            where[rec.header(b"x-tenant") or b""].add(i)
    assert len(where) == 12
    assert all(len(s) == 1 for s in where.values()), where  # a tenant sticks to one
    assert len({next(iter(s)) for s in where.values()}) > 1  # tenants spread
    # The balancing slots were all given back.
    assert gw.state.backends["fn"].admitted == 0


async def test_priority_failover_ejected_unhealthy_saturated_and_back(
    autojump_clock: MockClock,
) -> None:
    b = shaped(
        {"priority": 0, "max_in_flight": 2},
        {"priority": 0, "max_in_flight": 2},
        {"priority": 1},
    )
    a0, a1, backup = b.pools
    assert {b.pick() for _ in range(50)} == {a0, a1}
    # Ejected: a0 out, a1 carries level 0.
    a0.eject(10.0)
    assert {b.pick() for _ in range(50)} == {a1}
    # Unhealthy too: level 0 is empty, level 1 takes over.
    a1.set_healthy(False)
    assert {b.pick() for _ in range(50)} == {backup}
    # Back: the ejection ends, a0 takes traffic again.
    await trio.sleep(10.0)
    assert {b.pick() for _ in range(50)} == {a0}
    a1.set_healthy(True)
    # Saturated: level 0's caps full (2 + 2 in flight) sends the next to level 1.
    slots = [await b.admit(None, None) for _ in range(4)]
    assert sorted(id(p) for p in slots) == sorted([id(a0), id(a0), id(a1), id(a1)])
    extra = await b.admit(None, None)
    assert extra is backup
    b.release(slots[0], None)
    again = await b.admit(None, None)
    assert again is slots[0]  # level 0 has room again
    for p in [*slots[1:], extra, again]:
        b.release(p, None)
    assert b.admitted == 0


async def test_paused_single_endpoint_is_not_picked(autojump_clock: MockClock) -> None:
    one = backend(1)
    p = one.pools[0]
    p.pause(3.0)
    assert one.pick() is None
    assert one.resume_in_s() == pytest.approx(3.0)
    p.eject(30.0)  # ejected but not paused: still used (nothing else to use)
    await trio.sleep(3.0)
    assert one.pick() is p


# -- configuration ------------------------------------------------------------------------

_BASE = """
[[listeners]]
name = "main"
address = "127.0.0.1:0"

[[routes]]
name = "all"
backend = "fn"

[backends.fn]
"""


def test_endpoint_tables_and_backend_keys_load(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        _BASE
        + """endpoints = [
  "http://127.0.0.1:9000",
  {url = "https://fn.example.com/x", region = "eu", priority = 1, weight = 3, max_in_flight = 8},
]
balance = "hash"
hash_on = "header:X-Tenant"
max_in_flight = 20
max_in_flight_per_identity = 4
max_queued = 50
queue_timeout_s = 2.5
retry_after_max_s = 30
health_check = {path = "/healthz", interval_s = 5, expected_statuses = [200, 204]}
outlier = {consecutive_5xx = 3, max_ejection_percent = 50, base_ejection_time_s = 10}
"""
    )
    b = load_config(path).backends["fn"]
    plain, table = b.endpoints
    assert (plain.priority, plain.weight, plain.region, plain.max_in_flight) == (0, 1, "", 0)
    assert (table.url, table.region, table.priority, table.weight, table.max_in_flight) == (
        "https://fn.example.com/x", "eu", 1, 3, 8,
    )  # fmt: skip
    assert (b.balance, b.hash_on, b.max_in_flight, b.max_in_flight_per_identity) == (
        "hash", "header:X-Tenant", 20, 4,
    )  # fmt: skip
    assert (b.max_queued, b.queue_timeout_s, b.retry_after_max_s) == (50, 2.5, 30.0)
    assert b.health_check == HealthCheckConfig(
        path="/healthz", interval_s=5.0, expected_statuses=(200, 204)
    )
    assert b.outlier == OutlierConfig(
        consecutive_5xx=3, max_ejection_percent=50, base_ejection_time_s=10.0
    )
    assert b.gated


def test_bad_balancing_config_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        _BASE
        + """endpoints = [
  {url = "http://127.0.0.1:9000", weight = 0, zone = "a"},
  {url = "http://127.0.0.1:9001", max_in_flight = 9},
  {region = "eu"},
  7,
]
hash_on = "identity"
queue_timeout_s = 1
pool_max_size = 8
health_check = {interval_s = 1, timeout_s = 2, expected_statuses = [200, 700]}
outlier = {max_ejection_percent = 150, base_ejection_time_s = 400}
"""
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    got = {(k, m) for _, k, m in info.value.problems}
    assert got == {
        ("backends.fn.endpoints[0].zone", 'unknown key "zone"'),
        ("backends.fn.endpoints[0].weight", "must be 1 or more, got 0"),
        (
            "backends.fn.endpoints[1].max_in_flight",
            "max_in_flight (9) is over pool_max_size (8), the connections this endpoint may "
            "have; raise pool_max_size",
        ),
        ("backends.fn.endpoints[2].url", "missing (required)"),
        (
            "backends.fn.endpoints[3]",
            "expected string (a URL) or table {url = ...}, got integer 7",
        ),
        ("backends.fn.hash_on", 'hash_on has no effect unless balance = "hash"'),
        ("backends.fn.queue_timeout_s", "queue_timeout_s has no effect without max_queued"),
        ("backends.fn.health_check.expected_statuses[1]", "not a status code 100-599: 700"),
        (
            "backends.fn.health_check.timeout_s",
            "timeout_s (2 s) is longer than interval_s (1 s)",
        ),
        ("backends.fn.outlier.max_ejection_percent", "must be 0-100, got 150"),
        (
            "backends.fn.outlier.base_ejection_time_s",
            "base_ejection_time_s (400 s) is longer than max_ejection_time_s (300 s)",
        ),
    }

"""Endpoint health: active checks (fastgw/upstream/health.py) against real trio
upstreams on MockClock, passive outlier ejection from reported outcomes, and what the
admin side shows (/backends, /metrics)."""

from __future__ import annotations

import dataclasses
import json
import ssl
from pathlib import Path

import trio
import trustme
from prometheus_client.parser import text_string_to_metric_families
from trio.testing import MockClock

from fastgw.config.model import AdminConfig, BackendConfig, HealthCheckConfig, OutlierConfig
from fastgw.gateway import Gateway
from fastgw.upstream.backend import Backend
from tests.e2e.helpers import Client, Received, Responder, Upstream, endpoint, make_config

CHECK = HealthCheckConfig(
    path="/healthz", interval_s=1.0, timeout_s=0.5, healthy_threshold=2, unhealthy_threshold=3
)


def answers(state: dict[str, int], name: str):  # type: ignore[no-untyped-def]
    async def h(req: Received, r: Responder) -> None:
        if req.target == b"/healthz":
            await r.respond(state[name], b"")
        else:
            await r.respond(200, name.encode())

    return h


async def test_active_checks_mark_down_and_up_with_thresholds(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    state = {"a": 200, "b": 200}
    a, b = Upstream(handler=answers(state, "a")), Upstream(handler=answers(state, "b"))
    pa, pb = await nursery.start(a.serve), await nursery.start(b.serve)
    cfg = make_config(
        [f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"],
        backend_kw={"health_check": CHECK, "balance": "round_robin"},
    )
    gw = Gateway(cfg)
    port = (await nursery.start(gw.serve))[0][1]
    pool_a = gw.state.backends["fn"].pools[0]
    c = await Client.open(port)
    assert sorted([(await c.request(b"GET", b"/")).body for _ in range(4)]) == [
        b"a",
        b"a",
        b"b",
        b"b",
    ]
    created = pool_a.statistics().created

    state["a"] = 503
    await trio.sleep(1.5)  # checks at 0, 1: one failure seen, two needed... three
    assert pool_a.healthy
    await trio.sleep(2.0)  # third failure in a row
    assert not pool_a.healthy
    assert [(await c.request(b"GET", b"/")).body for _ in range(4)] == [b"b"] * 4

    state["a"] = 200
    await trio.sleep(1.0)  # one success is not enough
    assert not pool_a.healthy
    await trio.sleep(1.0)
    assert pool_a.healthy
    assert sorted([(await c.request(b"GET", b"/")).body for _ in range(4)]) == [
        b"a",
        b"a",
        b"b",
        b"b",
    ]

    # The checks used connections of their own (each one closed after its answer): the
    # pool opened none for them, and its warm connection is still there.
    checks = [r for r in a.received if r.target == b"/healthz"]
    assert len(checks) >= 6
    assert all(r.header(b"connection") == b"close" for r in checks)
    assert pool_a.statistics().created == created
    assert pool_a.statistics().idle == 1


async def test_checks_verify_tls_like_requests(
    nursery: trio.Nursery,
    autojump_clock: MockClock,
    ca: trustme.CA,
    server_ssl: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    up = Upstream(handler=answers({"a": 200}, "a"), ssl_context=server_ssl)
    port = await nursery.start(up.serve)
    good = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(good))
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    ep = endpoint(f"https://127.0.0.1:{port}")
    trusted = Backend(
        BackendConfig(name="t", endpoints=(ep,), ca_file=str(good), health_check=CHECK)
    )
    stranger = Backend(
        BackendConfig(name="s", endpoints=(ep,), ca_file=str(other), health_check=CHECK)
    )
    from fastgw.upstream.health import run_health_checks

    async with trio.open_nursery() as n:
        n.start_soon(run_health_checks, trusted)
        n.start_soon(run_health_checks, stranger)
        await trio.sleep(3.5)
        n.cancel_scope.cancel()
    assert trusted.pools[0].healthy
    assert not stranger.pools[0].healthy  # the certificate is not trusted: a failure
    assert all(r.target == b"/healthz" for r in up.received)
    assert len(up.received) >= 4  # only the trusted checker got through


async def test_reload_keeps_a_kept_backends_checker_and_state(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    state = {"a": 503}
    a = Upstream(handler=answers(state, "a"))
    pa = await nursery.start(a.serve)
    cfg = make_config([f"http://127.0.0.1:{pa}"], backend_kw={"health_check": CHECK})
    gw = Gateway(cfg)
    await nursery.start(gw.serve)
    await trio.sleep(3.5)
    b = gw.state.backends["fn"]
    assert not b.pools[0].healthy
    scope = b.health_scope

    gw.reload(dataclasses.replace(cfg, via="1.1 other"))  # the backend is unchanged
    assert gw.state.backends["fn"] is b
    assert b.health_scope is scope and not scope.cancel_called  # type: ignore[union-attr]
    assert not b.pools[0].healthy  # state kept

    slower = dataclasses.replace(CHECK, interval_s=2.0)
    gw.reload(make_config([f"http://127.0.0.1:{pa}"], backend_kw={"health_check": slower}))
    nb = gw.state.backends["fn"]
    assert nb is not b
    assert scope.cancel_called  # type: ignore[union-attr]
    assert nb.health_scope is not None and not nb.health_scope.cancel_called
    seen = len(a.received)
    await trio.sleep(4.1)
    assert len(a.received) - seen in (2, 3)  # only the new checker runs, every 2 s


# -- passive: outlier ejection ---------------------------------------------------------


def four(**outlier: object) -> Backend:
    eps = tuple(endpoint(f"http://127.0.0.1:{9000 + i}") for i in range(4))
    return Backend(
        BackendConfig(name="b", endpoints=eps, outlier=OutlierConfig(**outlier))  # type: ignore[arg-type]
    )


async def test_consecutive_5xx_eject_for_growing_times(autojump_clock: MockClock) -> None:
    b = four(consecutive_5xx=3, base_ejection_time_s=10.0, max_ejection_time_s=25.0)
    p = b.pools[0]
    t0 = trio.current_time()
    for status in (500, 500, 200, 500, 500):  # a success in between: no run of three
        p.outcome(status)
    assert not p.ejected()
    p.outcome(502)
    assert p.ejected_until == t0 + 10.0
    lengths = []
    for _ in range(3):
        await trio.sleep(p.ejected_until - trio.current_time())
        assert not p.ejected()
        now = trio.current_time()
        for _ in range(3):
            p.outcome(500)
        lengths.append(p.ejected_until - now)
    assert lengths == [20.0, 25.0, 25.0]  # base x n, capped
    assert p.ejections == 4
    # Long in service after that: the multiplier starts over.
    await trio.sleep(p.ejected_until - trio.current_time() + 26.0)
    now = trio.current_time()
    for _ in range(3):
        p.outcome(503)
    assert p.ejected_until - now == 10.0


async def test_gateway_failures_and_the_max_ejection_percent(autojump_clock: MockClock) -> None:
    b = four(consecutive_gateway_failure=2, consecutive_5xx=0, max_ejection_percent=50)
    p0, p1, p2, _ = b.pools
    for p in (p0, p1, p2):
        p.failed()
        p.failed()
    assert [p.ejected() for p in b.pools] == [True, True, False, False]  # 50% of 4
    assert p2.ejections == 0
    # One always may be ejected, even when the share rounds down to none.
    tiny = four(consecutive_5xx=1, max_ejection_percent=10)
    for p in tiny.pools:
        p.outcome(500)
    assert sum(p.ejected() for p in tiny.pools) == 1
    none = four(consecutive_5xx=1, max_ejection_percent=0)
    none.pools[0].outcome(500)
    assert not none.pools[0].ejected()


async def test_an_endpoint_answering_5xx_is_ejected_through_the_gateway(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    async def broken(req: Received, r: Responder) -> None:
        await r.respond(500, b"broken")

    a, b = Upstream(handler=broken), Upstream()
    pa, pb = await nursery.start(a.serve), await nursery.start(b.serve)
    cfg = make_config(
        [f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pb}"],
        backend_kw={
            "balance": "round_robin",
            "outlier": OutlierConfig(consecutive_5xx=3, base_ejection_time_s=5.0),
        },
    )
    gw = Gateway(cfg)
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    statuses = [(await c.request(b"GET", b"/")).status for _ in range(12)]
    assert statuses[:6] == [500, 200] * 3
    assert statuses[6:] == [200] * 6
    assert len(a.received) == 3
    await trio.sleep(5.0)
    await c.request(b"GET", b"/")
    await c.request(b"GET", b"/")
    assert len(a.received) == 4  # back after its ejection


# -- what the admin side shows -------------------------------------------------------------


async def test_admin_backends_and_metrics(nursery: trio.Nursery) -> None:
    async def paused(req: Received, r: Responder) -> None:
        await r.respond(503, b"later", [(b"retry-after", b"30")])

    a, b = Upstream(handler=paused), Upstream()
    pa, pb = await nursery.start(a.serve), await nursery.start(b.serve)
    cfg = make_config([], admin=AdminConfig(host="127.0.0.1", port=0))
    eps = (
        dataclasses.replace(endpoint(f"http://127.0.0.1:{pa}"), region="eu", max_in_flight=4),
        dataclasses.replace(endpoint(f"http://127.0.0.1:{pb}"), region="us", priority=1),
    )
    cfg = dataclasses.replace(
        cfg,
        backends={"fn": dataclasses.replace(cfg.backends["fn"], endpoints=eps, max_queued=3)},
    )
    gw = Gateway(cfg)
    port = (await nursery.start(gw.serve))[0][1]
    assert gw.admin_address is not None
    admin = gw.admin_address[1]
    c = await Client.open(port)
    assert (await c.request(b"GET", b"/")).status == 503  # A's answer, and A pauses
    assert (await c.request(b"GET", b"/")).status == 200  # B, the next priority level

    async def get(path: bytes) -> bytes:
        ac = await Client.open(admin)
        r = await ac.request(b"GET", path)
        await ac.aclose()
        assert r.status == 200
        return r.body

    doc = json.loads(await get(b"/backends"))
    fn = doc["backends"]["fn"]
    assert (fn["queued"], fn["max_queued"], fn["in_flight"]) == (0, 3, 0)
    ea, eb = fn["endpoints"]
    assert (ea["region"], ea["priority"], ea["healthy"], ea["max_in_flight"]) == ("eu", 0, True, 4)
    assert 25 < ea["paused_for_s"] <= 31  # on the gateway's coarse clock
    assert ea["paused_until"] > doc["now"]
    assert ea["ejected_until"] is None
    assert (eb["region"], eb["priority"], eb["paused_until"]) == ("us", 1, None)

    text = (await get(b"/metrics")).decode()
    got = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("backend") == "fn":
                got[(s.name, s.labels.get("endpoint", ""))] = s.value
    ua, ub = eps[0].url, eps[1].url
    assert got[("fastgw_endpoint_healthy", ua)] == 1
    assert got[("fastgw_endpoint_available", ua)] == 0  # paused
    assert got[("fastgw_endpoint_available", ub)] == 1
    assert got[("fastgw_endpoint_pauses_total", ua)] == 1
    assert got[("fastgw_endpoint_ejections_total", ua)] == 0
    assert got[("fastgw_endpoint_in_flight", ub)] == 0
    assert got[("fastgw_backend_queued", "")] == 0


async def test_resets_and_timeouts_count_as_gateway_failures(
    nursery: trio.Nursery, autojump_clock: MockClock
) -> None:
    """An endpoint that drops requests (no answer) and one that never answers are each
    ejected after ``consecutive_gateway_failure`` of them, through the gateway."""

    async def drop(req: Received, r: Responder) -> None:
        await r.stream.aclose()
        raise trio.ClosedResourceError  # ends the helper's connection loop

    async def hang(req: Received, r: Responder) -> None:
        await trio.sleep_forever()

    for handler, expect in ((drop, 502), (hang, 504)):
        bad, good = Upstream(handler=handler), Upstream()
        pa, pg = await nursery.start(bad.serve), await nursery.start(good.serve)
        cfg = make_config(
            [f"http://127.0.0.1:{pa}", f"http://127.0.0.1:{pg}"],
            backend_kw={
                "balance": "round_robin",
                "first_byte_timeout_s": 1.0,
                "outlier": OutlierConfig(consecutive_gateway_failure=2, consecutive_5xx=0),
            },
        )
        gw = Gateway(cfg)
        port = (await nursery.start(gw.serve))[0][1]
        statuses = []
        for _ in range(8):
            c = await Client.open(port)
            statuses.append((await c.request(b"POST", b"/", body=b"x")).status)
            await c.aclose()
        assert statuses[:4] == [expect, 200, expect, 200], handler
        assert statuses[4:] == [200] * 4
        assert gw.state.backends["fn"].pools[0].ejected()

"""Retries only when safe: what the function may have seen is sent again only when
repeating it is harmless (idempotent method or route, Idempotency-Key), on the outcomes
the route lists, within the retry budget, with bodies no larger than the replay
buffer; Retry-After pauses the endpoint. Real endpoints on 127.0.0.1 (fn_endpoint.py);
the budget and backoff arithmetic is checked directly with ``now`` passed in."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio

from fastgw.config import ConfigError, config_from_dict
from fastgw.config.model import HedgeConfig, RetryConfig, RouteConfig
from fastgw.gateway import Gateway
from fastgw.metrics import make_registry
from fastgw.upstream.retry import Budget, RetryPolicy
from tests.e2e.helpers import Client, make_config
from tests.upstream.fn_endpoint import Act, FnEndpoint

# --- config ------------------------------------------------------------------------------


def _cfg(route: dict[str, Any], backend: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "listeners": [{"name": "main", "address": "127.0.0.1:0"}],
        "backends": {"fn": {"endpoints": ["http://127.0.0.1:9000"], **(backend or {})}},
        "routes": [{"name": "api", "backend": "fn", **route}],
    }


def test_route_retry_and_hedge_tables_load() -> None:
    config = config_from_dict(
        _cfg(
            {
                "idempotent": True,
                "replay_buffer_bytes": 1024,
                "retry": {
                    "attempts": 2,
                    "on": ["503", "timeout"],
                    "backoff_base_s": 0.01,
                    "backoff_max_s": 0.1,
                    "budget_percent": 25,
                    "min_retries_per_s": 5,
                },
                "hedge": {"delay": "learned", "percentile": 90, "max_delay_s": 0.5},
            },
            {
                "cold_after_idle_s": 900,
                "cold_first_byte_timeout_s": 30,
                "keep_warm_interval_s": 300,
                "keep_warm_path": "/healthz",
            },
        )
    )
    r = config.routes[0]
    assert r.idempotent and r.replay_buffer_bytes == 1024
    assert r.retry == RetryConfig(
        attempts=2, on=("503", "timeout"), backoff_base_s=0.01, backoff_max_s=0.1,
        budget_percent=25.0, min_retries_per_s=5.0,
    )  # fmt: skip
    assert r.hedge == HedgeConfig(learned=True, percentile=90.0, max_delay_s=0.5)
    b = config.backends["fn"]
    assert (b.cold_after_idle_s, b.cold_first_byte_timeout_s) == (900.0, 30.0)
    assert (b.keep_warm_interval_s, b.keep_warm_path) == (300.0, "/healthz")
    # Defaults: no retry table means none; a bare table takes the documented defaults.
    plain = config_from_dict(_cfg({"retry": {}})).routes[0]
    assert plain.retry == RetryConfig() and plain.hedge is None and not plain.idempotent
    assert RetryConfig().budget_percent == 20.0  # Envoy's retry budget default


@pytest.mark.parametrize(
    ("route", "where", "message"),
    [
        ({"retry": {"on": ["404"]}}, "routes[0].retry.on", '"404" is not a retry condition'),
        ({"retry": {"tries": 2}}, "routes[0].retry.tries", "unknown key"),
        ({"retry": {"attempts": -1}}, "routes[0].retry.attempts", "must be 0 or more"),
        ({"retry": {"backoff_base_s": 2, "backoff_max_s": 1}}, "routes[0].retry.backoff_base_s",
         "over backoff_max_s"),
        ({"retry": {"budget_percent": 150}}, "routes[0].retry.budget_percent", "100 or less"),
        ({"retry": 3}, "routes[0].retry", "expected a table"),
        ({"hedge": {}}, "routes[0].hedge.delay_s", "missing"),
        ({"hedge": {"delay_s": 0.1, "delay": "learned"}}, "routes[0].hedge.delay_s",
         "not both"),
        ({"hedge": {"delay": "smart"}}, "routes[0].hedge.delay", '"learned"'),
        ({"hedge": {"delay_s": 0.1, "percentile": 90}}, "routes[0].hedge.percentile",
         'only with delay = "learned"'),
        ({"hedge": {"delay": "learned", "percentile": 100}}, "routes[0].hedge.percentile",
         "under 100"),
        ({"hedge": {"delay_s": 0.1, "max_attempts": 1}}, "routes[0].hedge.max_attempts",
         "2 or more"),
        ({"idempotent": "yes"}, "routes[0].idempotent", "expected boolean"),
        ({"replay_buffer_bytes": -1}, "routes[0].replay_buffer_bytes", "0 or more"),
    ],
)  # fmt: skip
def test_bad_retry_config_names_the_key(route: dict[str, Any], where: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(_cfg(route))
    found = [(k, m) for _, k, m in info.value.problems]
    assert any(k == where and message in m for k, m in found), found


def test_bad_backend_cold_settings_name_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(_cfg({}, {"cold_after_idle_s": 0, "keep_warm_path": "warm"}))
    keys = {k for _, k, _ in info.value.problems}
    assert keys == {"backends.fn.cold_after_idle_s", "backends.fn.keep_warm_path"}


# --- budget and backoff arithmetic -------------------------------------------------------


def test_budget_is_a_share_of_requests_plus_a_small_reserve() -> None:
    b = Budget(percent=20, reserve_per_s=0)
    b.reserve = 0.0
    for _ in range(10):
        b.deposit(0.0)
    # 10 requests at 20%: two retries, not a third.
    assert [b.try_spend(0.0) for _ in range(3)] == [True, True, False]
    assert (b.spent, b.denied) == (2, 1)
    # Deposits fade: 10 requests a minute ago buy nothing now.
    for _ in range(10):
        b.deposit(1.0)
    assert not b.try_spend(61.0)
    # The reserve refills at min_retries_per_s for a quiet route.
    r = Budget(percent=0, reserve_per_s=2)
    assert [r.try_spend(0.0) for _ in range(3)] == [True, True, False]
    assert r.try_spend(0.5) and not r.try_spend(0.5)


def test_backoff_is_full_jitter_capped() -> None:
    p = RetryPolicy(RetryConfig(backoff_base_s=0.1, backoff_max_s=0.3), random.Random(7))
    for n, top in ((0, 0.1), (1, 0.2), (2, 0.3), (5, 0.3), (40, 0.3)):
        xs = [p.backoff_s(n) for _ in range(300)]
        assert all(0.0 <= x < top for x in xs)
        assert max(xs) > 0.8 * top and min(xs) < 0.2 * top  # spread over the window


# --- over sockets ------------------------------------------------------------------------


async def _open(
    nursery: trio.Nursery, eps: list[FnEndpoint], **route: Any
) -> tuple[Gateway, Client]:
    for ep in eps:
        await nursery.start(ep.serve)
    cfg = make_config(
        [ep.url for ep in eps],
        backend_kw={"balance": "round_robin"},
        routes=[RouteConfig(name="api", backend="fn", **route)],
    )
    gw = Gateway(cfg)
    port = (await nursery.start(gw.serve))[0][1]
    return gw, await Client.open(port)


def _always(status: int, headers: bytes = b"") -> Any:
    return lambda req: Act(status=status, headers=headers)


RETRY = RetryConfig(attempts=1, backoff_base_s=0.0, backoff_max_s=0.0, budget_percent=100)


async def test_get_answered_503_is_retried_on_the_other_endpoint(nursery: trio.Nursery) -> None:
    a, b = FnEndpoint(b"A", act=_always(503)), FnEndpoint(b"B")
    gw, c = await _open(nursery, [a, b], retry=RETRY)
    r = await c.request(b"GET", b"/x", headers=[(b"X-Request-Id", b"g1")])
    assert (r.status, r.body) == (200, b"B")
    assert [s.rid for s in a.seen] == [b"g1"] and [s.rid for s in b.seen] == [b"g1"]
    resil = gw.state.router.routes[0].resil
    assert resil is not None and resil.counts[0] == 1
    text = _scrape(gw)
    assert 'fastgw_upstream_retries_total{route="api"} 1.0' in text


async def test_post_is_not_retried_after_it_may_have_reached_the_function(
    nursery: trio.Nursery,
) -> None:
    a, b = FnEndpoint(b"A", act=_always(503)), FnEndpoint(b"B", act=_always(503))
    _, c = await _open(nursery, [a, b], retry=RETRY)
    r = await c.request(b"POST", b"/x", body=b"pay once")
    assert r.status == 503  # the function's own answer, relayed
    assert len(a.seen) + len(b.seen) == 1
    # The same POST with an Idempotency-Key may be sent again: the function dedupes.
    b.act = None
    first = len(a.seen)
    r = await c.request(b"POST", b"/x", headers=[(b"Idempotency-Key", b"k1")], body=b"pay once")
    assert r.status == 200 and r.body in (b"A", b"B")
    assert [s.body for s in a.seen[first:] + b.seen if s.headers.get(b"idempotency-key")] in (
        [b"pay once", b"pay once"],
        [b"pay once"],
    )


async def test_idempotent_route_retries_any_method(nursery: trio.Nursery) -> None:
    a, b = FnEndpoint(b"A", act=lambda req: Act(close=True)), FnEndpoint(b"B")
    _, c = await _open(nursery, [a, b], retry=RETRY, idempotent=True)
    r = await c.request(b"POST", b"/x", body=b"{}")
    assert (r.status, r.body) == (200, b"B")
    assert (a.count(b"POST"), b.count(b"POST")) == (1, 1)
    assert b.seen[0].body == b"{}"


async def test_body_over_the_replay_buffer_is_never_sent_twice(nursery: trio.Nursery) -> None:
    a, b = FnEndpoint(b"A", act=_always(503)), FnEndpoint(b"B", act=_always(503))
    _, c = await _open(nursery, [a, b], retry=RETRY, replay_buffer_bytes=100)
    key = [(b"Idempotency-Key", b"k2")]
    big = b"x" * 101
    r = await c.request(b"PUT", b"/x", headers=key, body=big)
    assert r.status == 503
    assert len(a.seen) + len(b.seen) == 1
    assert (a.seen + b.seen)[0].body == big
    # At the limit it is read whole first and retried.
    b.act = None
    small = b"y" * 100
    r = await c.request(b"PUT", b"/x", headers=key, body=small)
    assert r.status == 200
    assert [s.body for s in b.seen][-1] == small


async def test_timeout_is_retried_only_when_listed(nursery: trio.Nursery) -> None:
    hang = lambda req: Act(hang=True)  # noqa: E731
    a, b = FnEndpoint(b"A", act=hang), FnEndpoint(b"B")
    _, c = await _open(nursery, [a, b], retry=RETRY, first_byte_timeout_s=0.2)
    r = await c.request(b"GET", b"/x")
    assert (r.status, r.body) == (200, b"B")
    assert a.abandoned == 1  # the attempt that timed out had its connection closed
    # Without "timeout" in ``on``: the client gets the 504.
    a2, b2 = FnEndpoint(b"A", act=hang), FnEndpoint(b"B", act=hang)
    no_timeout = RetryConfig(attempts=1, on=("503",), backoff_base_s=0.0, budget_percent=100)
    _, c2 = await _open(nursery, [a2, b2], retry=no_timeout, first_byte_timeout_s=0.2)
    r = await c2.request(b"GET", b"/x")
    assert r.status == 504
    assert len(a2.seen) + len(b2.seen) == 1


async def test_spent_budget_stops_retries(nursery: trio.Nursery) -> None:
    a, b = FnEndpoint(b"A", act=_always(502)), FnEndpoint(b"B", act=_always(502))
    stingy = RetryConfig(attempts=3, backoff_base_s=0.0, budget_percent=0, min_retries_per_s=0)
    gw, c = await _open(nursery, [a, b], retry=stingy)
    resil = gw.state.router.routes[0].resil
    assert resil is not None
    resil.retry.budget.reserve = 0.0  # type: ignore[union-attr]
    for _ in range(3):
        assert (await c.request(b"GET", b"/x")).status == 502
    assert len(a.seen) + len(b.seen) == 3  # one attempt each, no retries
    assert resil.counts[0] == 0 and resil.counts[3] == 3
    assert 'fastgw_upstream_budget_exhausted_total{kind="retry",route="api"} 3.0' in _scrape(gw)


async def test_retries_stop_at_attempts_with_backoff(nursery: trio.Nursery) -> None:
    a, b = FnEndpoint(b"A", act=_always(503)), FnEndpoint(b"B", act=_always(503))
    cfg = RetryConfig(attempts=3, backoff_base_s=0.05, backoff_max_s=0.05, budget_percent=100)
    _, c = await _open(nursery, [a, b], retry=cfg)
    t0 = trio.current_time()
    r = await c.request(b"GET", b"/x")
    assert r.status == 503
    assert len(a.seen) + len(b.seen) == 4  # the first attempt and three retries
    assert trio.current_time() - t0 < 1.0  # pauses are at most backoff_max_s each


async def test_retry_after_pauses_the_endpoint(nursery: trio.Nursery) -> None:
    a = FnEndpoint(b"A", act=_always(503, b"Retry-After: 30\r\n"))
    b = FnEndpoint(b"B")
    _, c = await _open(nursery, [a, b], retry=RETRY)
    for _ in range(6):
        r = await c.request(b"GET", b"/x")
        assert (r.status, r.body) == (200, b"B")
    assert len(a.seen) == 1  # after its 503 + Retry-After, A was left alone
    assert len(b.seen) == 6


async def test_refused_connect_moves_a_post_on_a_retry_route(nursery: trio.Nursery) -> None:
    import socket

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    b = FnEndpoint(b"B")
    await nursery.start(b.serve)
    cfg = make_config(
        [f"http://127.0.0.1:{dead_port}", b.url],
        backend_kw={"balance": "round_robin"},
        routes=[RouteConfig(name="api", backend="fn", retry=RETRY)],
    )
    gw = Gateway(cfg)
    c = await Client.open((await nursery.start(gw.serve))[0][1])
    for _ in range(4):
        r = await c.request(b"POST", b"/x", body=b"1")  # never sent: safe for any method
        assert (r.status, r.body) == (200, b"B")
    assert b.count(b"POST") == 4


def _scrape(gw: Gateway) -> str:
    from prometheus_client import generate_latest

    return generate_latest(make_registry(gw)).decode()

"""Budgets through the real gateway: N per window then 429 with Retry-After to the
window's end in the zone, a new window, restarts (a new Gateway on the same state_dir,
and a real process), reloads, month and DST windows, cost fields, shadow mode, config
errors, and Redis shared by two gateways.

Windows come from ``Gateway.wall_clock``, which these tests replace with a variable.
"""

from __future__ import annotations

import signal
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import trio

from fastgw.config import load_config
from fastgw.errors import ConfigError
from fastgw.gateway import Gateway
from fastgw.policy.budgets import window_bounds
from tests.e2e.helpers import Client, FastgwProcess, Upstream
from tests.limits.conftest import RedisServer
from tests.limits.support import ONE_TWO, gateway_toml

BERLIN = ZoneInfo("Europe/Berlin")
ONE = [(b"X-Api-Key", b"key-one")]
TWO = [(b"X-Api-Key", b"key-two")]


def at(*args: int, tz: ZoneInfo = BERLIN) -> float:
    return datetime(*args, tzinfo=tz).timestamp()  # type: ignore[misc]


def budget(requests: int = 3, window: str = "day", extra: str = "") -> str:
    return f"""
[[budgets]]
name = "daily"
routes = ["api"]
requests = {requests}
window = "{window}"
time_zone = "Europe/Berlin"
{extra}
"""


FREE_ROUTE = '[[routes]]\nname = "free"\npath_prefix = "/free"\nbackend = "fn"'


def write(tmp_path: Path, uport: int, budgets: str, gateway: str = "", top: str = "") -> Path:
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        f"{top}\n[gateway]\n{gateway}\n" + gateway_toml(uport, FREE_ROUTE, ONE_TWO, budgets)
    )
    return conf


class Wall:
    """The gateway's wall clock, set by the test."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def upstream(nursery: trio.Nursery) -> int:
    return int(await nursery.start(Upstream().serve))


async def start(nursery: trio.Nursery, conf: Path, wall: Wall) -> tuple[Gateway, int]:
    gw = Gateway(load_config(conf))
    gw.wall_clock = wall
    port = (await nursery.start(gw.serve))[0][1]
    return gw, port


async def statuses(c: Client, n: int, headers: list[tuple[bytes, bytes]] = ONE) -> list[int]:
    return [(await c.request(b"GET", b"/api/x", headers)).status for _ in range(n)]


# ---------------------------------------------------------------------------------------
# Windows


def test_window_bounds_hour_day_month_and_dst() -> None:
    t = at(2026, 11, 26, 14, 20)
    assert window_bounds(t, "hour", BERLIN) == (at(2026, 11, 26, 14), at(2026, 11, 26, 15))
    assert window_bounds(t, "day", BERLIN) == (at(2026, 11, 26), at(2026, 11, 27))
    assert window_bounds(t, "month", BERLIN) == (at(2026, 11, 1), at(2026, 12, 1))
    assert window_bounds(at(2026, 12, 31, 23), "month", BERLIN)[1] == at(2027, 1, 1)
    # DST: the day clocks go forward has 23 hours, the day they go back 25.
    s, e = window_bounds(at(2026, 3, 29, 12), "day", BERLIN)
    assert e - s == 23 * 3600
    s, e = window_bounds(at(2026, 10, 25, 12), "day", BERLIN)
    assert e - s == 25 * 3600
    # The repeated hour (02:00-03:00 twice on 25 October) is two windows of 3600 s.
    first = datetime(2026, 10, 25, 0, 30, tzinfo=ZoneInfo("UTC")).timestamp()  # 02:30 CEST
    second = first + 3600  # 02:30 CET
    a, b = window_bounds(first, "hour", BERLIN), window_bounds(second, "hour", BERLIN)
    assert a[1] == b[0] and b[1] - b[0] == 3600
    # A month with the spring change is an hour short.
    s, e = window_bounds(at(2026, 3, 15), "month", BERLIN)
    assert e - s == 31 * 86400 - 3600
    # A zone whose midnight does not exist on its DST day (Santiago jumps 00:00 -> 01:00):
    # that day starts at the jump.
    scl = ZoneInfo("America/Santiago")
    s, e = window_bounds(at(2026, 9, 6, 12, tz=scl), "day", scl)
    assert e - s == 23 * 3600
    with pytest.raises(ValueError):
        window_bounds(t, "week", BERLIN)


# ---------------------------------------------------------------------------------------
# The request path


async def test_n_per_day_then_429_until_midnight_in_the_zone_then_a_new_day(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    wall = Wall(at(2026, 11, 26, 22, 30))  # 21:30 UTC: 1.5 h to Berlin's midnight
    gw, port = await start(nursery, write(tmp_path, await upstream(nursery), budget()), wall)
    c = await Client.open(port)
    seen = []
    for _ in range(3):
        r = await c.request(b"GET", b"/api/x", ONE)
        assert r.status == 200
        assert r.header(b"ratelimit-policy") == b'"daily";q=3;w=86400'
        seen.append(r.header(b"ratelimit"))
    assert seen == [b'"daily";r=%d;t=5400' % n for n in (2, 1, 0)]
    r = await c.request(b"GET", b"/api/x", ONE)
    assert r.status == 429
    assert r.header(b"retry-after") == b"5400"
    assert r.header(b"ratelimit") == b'"daily";r=0;t=5400'
    body = r.json()
    assert body["error"] == "budget_exhausted"
    assert "daily" in body["detail"] and "2026-11-27T00:00:00+01:00" in body["detail"]
    # Another caller has its own budget; a route without budgets sends no fields.
    assert await statuses(c, 1, TWO) == [200]
    r = await c.request(b"GET", b"/free/x", ONE)
    assert r.status == 200 and r.header(b"ratelimit") is None
    wall.t = at(2026, 11, 26, 23, 59, 59) + 0.999  # a hair before midnight
    assert await statuses(c, 1) == [429]
    wall.t = at(2026, 11, 27)  # midnight in Berlin: a new window
    r = await c.request(b"GET", b"/api/x", ONE)
    assert r.status == 200 and r.header(b"ratelimit") == b'"daily";r=2;t=86400'
    assert gw.state.budget_counts["daily"] == [5, 2, 0]
    from prometheus_client import generate_latest

    from fastgw.metrics import make_registry

    text = generate_latest(make_registry(gw)).decode()
    assert 'fastgw_budget_decisions_total{budget="daily",decision="allowed"} 5.0' in text
    assert 'fastgw_budget_decisions_total{budget="daily",decision="refused"} 2.0' in text
    assert "fastgw_budget_keys 2.0" in text


async def test_month_window_and_a_dst_day(nursery: trio.Nursery, tmp_path: Path) -> None:
    uport = await upstream(nursery)
    wall = Wall(at(2026, 3, 31, 23))  # the last hour of March
    _gw, port = await start(nursery, write(tmp_path, uport, budget(1, "month")), wall)
    c = await Client.open(port)
    r = await c.request(b"GET", b"/api/x", ONE)
    # March 2026 in Berlin lost an hour to DST.
    assert r.header(b"ratelimit-policy") == b'"daily";q=1;w=%d' % (31 * 86400 - 3600)
    r = await c.request(b"GET", b"/api/x", ONE)
    assert (r.status, r.header(b"retry-after")) == (429, b"3600")
    wall.t = at(2026, 4, 1)
    assert await statuses(c, 2) == [200, 429]

    conf = write(tmp_path, uport, budget(1, "day"))
    _gw, port = await start(nursery, conf, Wall(at(2026, 10, 25, 1)))
    c = await Client.open(port)
    r = await c.request(b"GET", b"/api/x", ONE)
    assert r.header(b"ratelimit-policy") == b'"daily";q=1;w=90000'  # 25 hours
    assert r.header(b"ratelimit") == b'"daily";r=0;t=%d' % (24 * 3600)  # 01:00 -> 00:00


async def test_restart_on_the_same_state_dir_keeps_what_was_spent(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    conf = write(tmp_path, await upstream(nursery), budget(), gateway=f'state_dir = "{state}"')
    wall = Wall(at(2026, 11, 26, 10))
    with trio.CancelScope() as first:
        async with trio.open_nursery() as inner:
            gw, port = await start(inner, conf, wall)
            assert gw.budget_table is not None and not gw.budget_table.loaded
            assert await statuses(await Client.open(port), 2) == [200, 200]
            first.cancel()
    gw, port = await start(nursery, conf, wall)
    assert gw.budget_table is not None and gw.budget_table.loaded
    assert gw.budget_table.path == str(state / "budgets.bin")
    assert await statuses(await Client.open(port), 2) == [200, 429]
    wall.t = at(2026, 11, 27)
    assert await statuses(await Client.open(port), 1) == [200]


async def test_without_state_dir_a_restart_starts_over(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    conf = write(tmp_path, await upstream(nursery), budget(1))
    wall = Wall(at(2026, 11, 26, 10))
    for _ in range(2):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                gw, port = await start(inner, conf, wall)
                assert gw.budget_table is not None and gw.budget_table.path is None
                assert await statuses(await Client.open(port), 2) == [200, 429]
                scope.cancel()


async def test_a_real_process_restart_keeps_the_budget(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    # A month window on the real clock: a test that straddles a month's end is the
    # only way this could flake, and it would then fail on 429 counts, not hang.
    conf = write(
        tmp_path, await upstream(nursery), budget(3, "month"), gateway=f'state_dir = "{state}"'
    )
    listening = r"^fastgw: listening on http://127\.0\.0\.1:(\d+)$"
    with trio.fail_after(30):
        proc = await FastgwProcess.start(nursery, ["serve", "-c", str(conf)])
        port = int((await proc.wait_line(listening))[1])
        assert await statuses(await Client.open(port), 2) == [200, 200]
        proc.proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0, proc.output
        proc = await FastgwProcess.start(nursery, ["serve", "-c", str(conf)])
        port = int((await proc.wait_line(listening))[1])
        assert await statuses(await Client.open(port), 2) == [200, 429]
        proc.proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0, proc.output


async def test_two_workers_share_one_budget_through_state_dir(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """``--workers 2``: both workers map state_dir/budgets.bin, so a caller gets its
    budget once, not once per worker."""
    state = tmp_path / "state"
    state.mkdir()
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        f'[gateway]\nstate_dir = "{state}"\n'
        '[[listeners]]\nname = "main"\naddress = "127.0.0.1:0"\n'
        f'[backends.fn]\nendpoints = ["http://127.0.0.1:{await upstream(nursery)}"]\n'
        '[[routes]]\nname = "all"\npath_prefix = "/"\nbackend = "fn"\n'
        '[[budgets]]\nname = "per-ip"\nkey = "ip"\nrequests = 20\nwindow = "month"\n'
    )
    p = await FastgwProcess.start(nursery, ["serve", "-c", str(conf), "--workers", "2"])
    with trio.fail_after(60):
        port = int((await p.wait_line(r"listening on http://127\.0\.0\.1:(\d+)")).group(1))
        served_by: dict[bytes, list[int]] = {}
        for _ in range(50):  # one-request connections: the kernel spreads them
            c = await Client.open(port)
            r = await c.request(b"GET", b"/")
            await c.aclose()
            rid = r.header(b"x-request-id") or b""
            served_by.setdefault(rid[:12], []).append(r.status)
        assert len(served_by) == 2, served_by.keys()
        statuses = [x for v in served_by.values() for x in v]
        assert statuses.count(200) == 20 and statuses.count(429) == 30
        assert all(429 in v for v in served_by.values())  # neither had its own budget
        p.proc.terminate()
        assert await p.proc.wait() == 0


async def test_a_damaged_state_file_is_reset_and_logged(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "budgets.bin").write_bytes(b"not a budget file")
    conf = write(tmp_path, await upstream(nursery), budget(), gateway=f'state_dir = "{state}"')
    gw, port = await start(nursery, conf, Wall(at(2026, 11, 26, 10)))
    assert gw.budget_table is not None and gw.budget_table.reset_reason is not None
    assert "was reset" in caplog.text and "budgets.bin" in caplog.text
    assert await statuses(await Client.open(port), 4) == [200, 200, 200, 429]


async def test_reload_keeps_counters_and_takes_the_new_limit(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    uport = await upstream(nursery)
    conf = write(tmp_path, uport, budget(3))
    gw, port = await start(nursery, conf, Wall(at(2026, 11, 26, 10)))
    table = gw.budget_table
    c = await Client.open(port)
    assert await statuses(c, 4) == [200, 200, 200, 429]
    gw.reload(load_config(write(tmp_path, uport, budget(5))))
    assert gw.budget_table is table
    assert await statuses(c, 3) == [200, 200, 429]  # 3 spent of the new 5
    gw.reload(load_config(write(tmp_path, uport, budget(1))))
    assert await statuses(c, 1) == [429]  # lowered below what was spent: nothing left
    assert gw.state.budget_counts["daily"] == [5, 3, 0]


async def test_cost_header(nursery: trio.Nursery, tmp_path: Path) -> None:
    extra = 'cost_header = "X-Cost"\nmax_cost = 10'
    conf = write(tmp_path, await upstream(nursery), budget(10, extra=extra))
    _gw, port = await start(nursery, conf, Wall(at(2026, 11, 26, 23)))
    c = await Client.open(port)

    async def spend(cost: bytes | None) -> tuple[int, bytes | None]:
        h = ONE + ([(b"X-Cost", cost)] if cost is not None else [])
        r = await c.request(b"GET", b"/api/x", h)
        return r.status, r.header(b"ratelimit") if r.status == 200 else r.json()["error"]

    assert await spend(b"4") == (200, b'"daily";r=6;t=3600')
    assert await spend(b"7") == (429, "budget_exhausted")  # all or nothing
    assert await spend(None) == (200, b'"daily";r=5;t=3600')  # absent: 1
    for bad in (b"11", b"0", b"-1", b"abc", b"1.5", b"99999999999999999999999"):
        assert await spend(bad) == (400, "invalid_cost"), bad
    assert await spend(b"5") == (200, b'"daily";r=0;t=3600')


async def test_shadow_mode_counts_only(nursery: trio.Nursery, tmp_path: Path) -> None:
    conf = write(tmp_path, await upstream(nursery), budget(2, extra='mode = "shadow"'))
    gw, port = await start(nursery, conf, Wall(at(2026, 11, 26, 10)))
    c = await Client.open(port)
    for _ in range(5):
        r = await c.request(b"GET", b"/api/x", ONE)
        assert r.status == 200 and r.header(b"ratelimit") is None
    assert gw.state.budget_counts["daily"] == [2, 0, 3]


async def test_a_refused_request_spends_nothing_from_other_budgets(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    two = budget(5) + budget(2).replace('"daily"', '"small"').replace('"day"', '"hour"')
    conf = write(tmp_path, await upstream(nursery), two)
    gw, port = await start(nursery, conf, Wall(at(2026, 11, 26, 10)))
    c = await Client.open(port)
    r = await c.request(b"GET", b"/api/x", ONE)
    assert [v for k, v in r.headers if k == b"ratelimit"] == [
        b'"daily";r=4;t=50400',
        b'"small";r=1;t=3600',
    ]
    assert await statuses(c, 3) == [200, 429, 429]
    r = await c.request(b"GET", b"/api/x", ONE)
    assert r.json()["detail"].startswith("the budget small (2 per hour")
    gw.wall_clock = Wall(at(2026, 11, 26, 11))  # a new hour: "daily" has 3 left
    assert await statuses(c, 3) == [200, 200, 429]
    gw.wall_clock = Wall(at(2026, 11, 26, 12))  # refusals by "small" took nothing
    assert await statuses(c, 1) == [200]
    r = await c.request(b"GET", b"/api/x", ONE)
    assert r.status == 429 and r.json()["detail"].startswith("the budget daily (5 per day")


# ---------------------------------------------------------------------------------------
# Config


def problems(tmp_path: Path, budgets: str, gateway: str = "") -> list[tuple[str, str, str]]:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, 9, budgets, gateway=gateway))
    return e.value.problems


def test_config_errors(tmp_path: Path) -> None:
    conf = str(tmp_path / "gateway.toml")
    b = '[[budgets]]\nname = "b"\nrequests = 5\n'
    cases = [
        (b + 'time_zone = "Mars/Olympus"', "budgets[0].time_zone",
         'unknown time zone "Mars/Olympus"; use an IANA name such as "Europe/Berlin" or "UTC"'),
        (b + 'window = "week"', "budgets[0].window",
         'must be one of "hour", "day", "month", got "week"'),
        ('[[budgets]]\nname = "b"', "budgets[0].requests",
         "missing (required): the units a key may spend per window"),
        (b.replace("5", "0"), "budgets[0].requests", "must be 1 or more, got 0"),
        (b + "max_cost = 5", "budgets[0].max_cost",
         "only with cost_header (without it every request costs 1)"),
        (b + 'cost_header = "X Cost"', "budgets[0].cost_header",
         'must be a header field name, got "X Cost"'),
        (b + 'store = "redis"', "budgets[0].store",
         'store = "redis" needs [limits_store] with type = "redis" and an address'),
        (b + 'routes = ["nope"]', "budgets[0].routes[0]",
         'unknown route "nope" (known: api, free)'),
        (b + 'key = "cookie"', "budgets[0].key",
         'must be identity, ip, route, header:<name> or claim:<name>, got "cookie"'),
        (b + b, "budgets[1].name", 'duplicate budget name "b"'),
    ]  # fmt: skip
    for toml, key, message in cases:
        assert problems(tmp_path, toml) == [(conf, key, message)], toml
    missing = tmp_path / "nowhere"
    assert problems(tmp_path, b, f'state_dir = "{missing}"') == [
        (conf, "gateway.state_dir", f"not a directory: {missing}")
    ]
    assert problems(tmp_path, b, "max_budget_keys = 0") == [
        (conf, "gateway.max_budget_keys", "must be 1 or more, got 0")
    ]


# ---------------------------------------------------------------------------------------
# Redis


async def test_two_gateways_share_one_budget_in_redis(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    uport = await upstream(nursery)
    store = f'[limits_store]\ntype = "redis"\naddress = "{redis_server.address}"\n'
    wall = Wall(at(2026, 11, 26, 22, 30))
    gws = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        conf = write(d, uport, budget(3, extra='store = "redis"') + store)
        gw, port = await start(nursery, conf, wall)
        assert gw.redis_limits is not None
        await gw.redis_limits.wait_redis()
        gws.append((gw, await Client.open(port)))
    (ga, ca), (gb, cb) = gws
    r = await ca.request(b"GET", b"/api/x", ONE)
    assert (r.status, r.header(b"ratelimit")) == (200, b'"daily";r=2;t=5400')
    r = await cb.request(b"GET", b"/api/x", ONE)
    assert (r.status, r.header(b"ratelimit")) == (200, b'"daily";r=1;t=5400')
    assert await statuses(ca, 1) == [200]
    r = await cb.request(b"GET", b"/api/x", ONE)
    assert (r.status, r.header(b"retry-after")) == (429, b"5400")
    assert await statuses(ca, 1) == [429]
    assert await statuses(cb, 1, TWO) == [200]
    # The counter in Redis: named by the window, expiring a minute after it ends.
    keys = redis_server.command("KEYS", "*budget:*")
    assert isinstance(keys, list) and len(keys) == 2
    midnight = int(at(2026, 11, 27))
    key = next(k for k in keys if b"one" in k)
    assert key.endswith(b"@%d" % midnight)
    assert redis_server.command("GET", key) == b"3"
    assert redis_server.command("EXPIRETIME", key) == midnight + 60
    wall.t = midnight
    assert await statuses(ca, 1) == [200] and await statuses(cb, 1) == [200]
    assert ga.redis_budgets() is not None and gb.redis_budgets() is not None
    assert ga.redis_budgets().statistics()["redis_ok"] == 4  # type: ignore[union-attr]


async def test_redis_down_falls_back_to_the_local_table(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    uport = await upstream(nursery)
    store = f'[limits_store]\ntype = "redis"\naddress = "{redis_server.address}"\n'
    conf = write(tmp_path, uport, budget(2, extra='store = "redis"') + store)
    gw, port = await start(nursery, conf, Wall(at(2026, 11, 26, 10)))
    assert gw.redis_limits is not None
    await gw.redis_limits.wait_redis()
    c = await Client.open(port)
    assert await statuses(c, 1) == [200]
    redis_server.kill()
    # The local table knows nothing of the Redis spend: per instance, 2 more.
    assert await statuses(c, 3) == [200, 200, 429]
    stats = gw.redis_budgets().statistics()  # type: ignore[union-attr]
    assert stats["fallbacks"] == 3 and stats["redis_ok"] == 1


async def test_redis_down_with_on_failure_closed_refuses(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    store = (
        f'[limits_store]\ntype = "redis"\naddress = "{redis_server.address}"\n'
        'on_failure = "closed"\n'
    )
    conf = write(tmp_path, await upstream(nursery), budget(5, extra='store = "redis"') + store)
    gw, port = await start(nursery, conf, Wall(at(2026, 11, 26, 10)))
    assert gw.redis_limits is not None
    await gw.redis_limits.wait_redis()
    c = await Client.open(port)
    redis_server.command("SCRIPT", "FLUSH")  # the first spend finds no script: EVAL
    assert await statuses(c, 1) == [200]
    redis_server.kill()
    r = await c.request(b"GET", b"/api/x", ONE)
    assert (r.status, r.header(b"retry-after")) == (429, b"1")
    assert r.json()["error"] == "budget_unavailable"


def test_window_is_computed_only_when_the_clock_leaves_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fastgw._core.budget import BudgetTable
    from fastgw.config.model import BudgetConfig
    from fastgw.policy.budgets import RouteBudget, route_budgets

    calls: list[float] = []
    advance = RouteBudget.advance

    def counted(self: RouteBudget, now_s: float) -> None:
        calls.append(now_s)
        advance(self, now_s)

    monkeypatch.setattr(RouteBudget, "advance", counted)
    rb = route_budgets((BudgetConfig("h", 100, "hour", "Europe/Berlin", key="ip"),), "r", {})
    assert rb is not None
    table = BudgetTable(64)
    t0 = at(2026, 11, 26, 10)
    for i in range(61):  # one a minute: 60 in 10:00-11:00, one at 11:00
        assert isinstance(rb.spend(table, t0 + i * 60, None, b"1.2.3.4", None), bytes)
    assert calls == [t0, t0 + 3600]  # the first request, then the next hour
    # A clock stepped back (NTP) computes its window again rather than trust the cache;
    # the counter already counts for 11:00, and an older window id counts into it.
    out = rb.spend(table, t0 + 30, None, b"1.2.3.4", None)
    assert calls[-1] == t0 + 30
    assert isinstance(out, bytes) and b'"h";r=98;' in out

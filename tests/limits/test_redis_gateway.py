"""Rate limits in Redis through the real gateway: ``[limits_store] type = "redis"``
against a real redis-server (tests/limits/conftest.py).

Exact counts: the gateway reads Redis's clock; these tests replace it with a variable
(``RedisBuckets.clock``, the test-only injection of redis_limits.py), so every answer
is the core's GCRA at a known ``now``. Then Redis is killed mid-test under each failure
policy (local, open, closed) and restarted; a reload keeps the client; config errors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from fastgw.config import load_config
from fastgw.errors import ConfigError
from fastgw.gateway import Gateway
from fastgw.policy.redis_limits import RedisBuckets
from tests.e2e.helpers import Client, Upstream

from .conftest import RedisServer
from .support import ONE_TWO, gateway_toml

KEY = [(b"X-Api-Key", b"key-one")]
KEY2 = [(b"X-Api-Key", b"key-two")]


def write(tmp_path: Path, uport: int, store: str, limits: str = "", name: str = "") -> Path:
    conf = tmp_path / f"gateway{name}.toml"
    conf.write_text(
        gateway_toml(uport, ONE_TWO)
        + f"""
[[rate_limits]]
name = "per-caller"
routes = ["api"]
rate_per_s = 10
burst = 10
{limits}
[limits_store]
{store}
"""
    )
    return conf


# These tests demand Redis's exact answers, so a call must never fall back because the
# 50 ms default timeout passed: on a loaded machine a scheduling stall of the gateway or
# of redis-server can exceed it (then "open" allows an 11th request, "closed" refuses a
# first one). A dead Redis is still seen at once: its connection closes.
STORE_TIMEOUT = "timeout_s = 10\n"


def store(server: RedisServer, on_failure: str = "local", extra: str = "") -> str:
    return (
        f'type = "redis"\naddress = "{server.address}"\non_failure = "{on_failure}"\n'
        + STORE_TIMEOUT
        + extra
    )


class Now:
    """The injected Redis clock: a variable the test moves."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def start(
    nursery: trio.Nursery, conf: Path, now: Now | None = None
) -> tuple[Gateway, int, RedisBuckets]:
    gw = Gateway(load_config(conf))
    port = (await nursery.start(gw.serve))[0][1]
    shared = gw.redis_limits
    assert shared is not None
    if now is not None:
        shared.clock = now
    with trio.fail_after(5):
        await shared.wait_redis()
    return gw, port, shared


def metrics_text(gw: Gateway) -> str:
    from prometheus_client import generate_latest

    from fastgw.metrics import make_registry

    return generate_latest(make_registry(gw)).decode()


async def statuses(c: Client, headers: list[tuple[bytes, bytes]], n: int) -> list[int]:
    return [(await c.request(b"GET", b"/api/x", headers)).status for _ in range(n)]


async def wait_until(cond: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not cond():
            await trio.sleep(0.005)


async def test_exact_counts_and_429_fields_shared_by_two_gateways(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    up = Upstream()
    uport = await nursery.start(up.serve)
    conf = write(tmp_path, uport, store(redis_server))
    now = Now()
    gw1, port1, _ = await start(nursery, conf, now)
    gw2, port2, _ = await start(nursery, conf, now)
    c1, c2 = await Client.open(port1), await Client.open(port2)
    # The burst of 10, split between the instances: one bucket in Redis.
    assert await statuses(c1, KEY, 6) == [200] * 6
    assert await statuses(c2, KEY, 5) == [200] * 4 + [429]
    r = await c1.request(b"GET", b"/api/x", KEY)
    assert r.status == 429 and r.json()["error"] == "rate_limited"
    assert r.header(b"retry-after") == b"1"
    assert r.header(b"ratelimit-policy") == b'"per-caller";q=10;w=1'
    assert r.header(b"ratelimit") == b'"per-caller";r=0;t=1'
    assert await statuses(c2, KEY2, 1) == [200]  # another caller, another bucket
    now.t += 0.1  # exactly one token later
    assert await statuses(c2, KEY, 1) == [200]
    assert await statuses(c1, KEY, 1) == [429]
    assert redis_server.command("EXISTS", "fastgw:per-caller\0apikey::one") == 1
    assert gw1.state.limit_counts["per-caller"][:2] == [6, 2]
    assert gw2.state.limit_counts["per-caller"][:2] == [6, 1]
    assert gw1.redis_limits is not None and gw1.redis_limits.statistics()["fallbacks"] == 0


async def test_shadow_limits_in_one_round_trip(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer
) -> None:
    up = Upstream()
    uport = await nursery.start(up.serve)
    shadow = """
[[rate_limits]]
name = "watch"
routes = ["api"]
key = "route"
rate_per_s = 1
burst = 2
mode = "shadow"
"""
    conf = write(tmp_path, uport, store(redis_server), shadow)
    gw, port, shared = await start(nursery, conf, Now())
    c = await Client.open(port)
    assert await statuses(c, KEY, 11) == [200] * 10 + [429]
    assert gw.state.limit_counts["watch"] == [2, 0, 8]  # the enforced refusal ended it
    assert shared.statistics()["redis_ok"] == 11  # one call per request


@pytest.mark.parametrize("on_failure", ["local", "open", "closed"])
async def test_redis_killed_mid_test_then_restarted(
    nursery: trio.Nursery, tmp_path: Path, redis_server: RedisServer, on_failure: str
) -> None:
    up = Upstream()
    uport = await nursery.start(up.serve)
    conf = write(tmp_path, uport, store(redis_server, on_failure))
    now = Now()
    gw, port, shared = await start(nursery, conf, now)
    c = await Client.open(port)
    assert await statuses(c, KEY, 11) == [200] * 10 + [429]  # drained, in Redis
    redis_server.kill()
    await wait_until(lambda: not shared.redis_up)
    if on_failure == "local":
        # The gateway's own table, which has not seen this caller: a fresh burst.
        assert await statuses(c, KEY, 11) == [200] * 10 + [429]
    elif on_failure == "open":
        assert await statuses(c, KEY, 30) == [200] * 30
    else:
        r = await c.request(b"GET", b"/api/x", KEY2)  # even a fresh caller
        assert r.status == 429 and r.header(b"retry-after") == b"1"
    assert shared.statistics()["fallbacks"] > 0
    text = metrics_text(gw)
    assert "fastgw_rate_limit_store_up 0.0" in text
    assert 'fastgw_rate_limit_store_calls_total{result="ok"} 11.0' in text
    assert f"fastgw_rate_limit_store_fallbacks_total {shared.statistics()['fallbacks']}.0" in text
    redis_server.restart()  # empty: no persistence
    with trio.fail_after(10):
        await shared.wait_redis()
    # Back on Redis: a fresh bucket there.
    assert await statuses(c, KEY, 11) == [200] * 10 + [429]
    assert redis_server.command("EXISTS", "fastgw:per-caller\0apikey::one") == 1


async def test_reload_keeps_the_client_and_a_new_store_replaces_it(
    nursery: trio.Nursery, tmp_path: Path, redis_factory: Callable[..., RedisServer]
) -> None:
    a, b = redis_factory(), redis_factory()
    up = Upstream()
    uport = await nursery.start(up.serve)
    conf = write(tmp_path, uport, store(a))
    gw, port, shared = await start(nursery, conf, Now())
    c = await Client.open(port)
    assert await statuses(c, KEY, 3) == [200] * 3
    # Another rate: same store, same client, same connection.
    conf.write_text(conf.read_text().replace("rate_per_s = 10", "rate_per_s = 5"))
    gw.reload(load_config(conf))
    assert gw.redis_limits is shared
    assert await statuses(c, KEY, 1) == [200]
    assert shared.client.statistics()["connects"] == 1
    # Another address: a new client on b; the old connection closes.
    conf.write_text(conf.read_text().replace(a.address, b.address))
    gw.reload(load_config(conf))
    new = gw.redis_limits
    assert new is not None and new is not shared
    new.clock = Now()
    with trio.fail_after(5):
        await new.wait_redis()
    await wait_until(lambda: not shared.redis_up)
    assert await statuses(c, KEY, 1) == [200]
    assert b.command("EXISTS", "fastgw:per-caller\0apikey::one") == 1
    # Back to the local store: no client.
    text = conf.read_text()
    conf.write_text(text[: text.index("[limits_store]")])
    gw.reload(load_config(conf))
    assert gw.redis_limits is None
    await wait_until(lambda: not new.redis_up)
    assert await statuses(c, KEY, 1) == [200]


async def test_password_database_and_prefix(
    nursery: trio.Nursery, tmp_path: Path, redis_factory: Callable[..., RedisServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    server = redis_factory("--requirepass", "s3cret")
    (tmp_path / "redis.pw").write_text("s3cret\n")
    up = Upstream()
    uport = await nursery.start(up.serve)
    extra = 'password_file = "redis.pw"\ndatabase = 3\nprefix = "gw1:"\n'
    # The injected clock: keys without expiry, so the look below does not race the
    # 0.1 s a bucket of one take lives in Redis.
    _, port, _ = await start(nursery, write(tmp_path, uport, store(server, extra=extra)), Now())
    c = await Client.open(port)
    assert await statuses(c, KEY, 1) == [200]
    assert server.command("EXISTS", "gw1:per-caller\0apikey::one", db=3) == 1
    monkeypatch.setenv("FASTGW_TEST_REDIS_PW", "s3cret")
    extra = 'password_env = "FASTGW_TEST_REDIS_PW"\n'
    _, port2, _ = await start(nursery, write(tmp_path, uport, store(server, extra=extra), name="2"))
    assert await statuses(await Client.open(port2), KEY2, 1) == [200]


async def test_unix_socket_address(
    nursery: trio.Nursery, tmp_path: Path, redis_factory: Callable[..., RedisServer]
) -> None:
    sock = tmp_path / "redis.sock"
    redis_factory("--unixsocket", str(sock))
    up = Upstream()
    uport = await nursery.start(up.serve)
    conf = write(tmp_path, uport, f'type = "redis"\naddress = "unix:{sock}"\n' + STORE_TIMEOUT)
    _gw, port, shared = await start(nursery, conf, Now())
    c = await Client.open(port)
    assert await statuses(c, KEY, 11) == [200] * 10 + [429]
    assert shared.statistics()["redis_ok"] == 11


def problems(tmp_path: Path, store_toml: str) -> list[tuple[str, str, str]]:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, 9, store_toml))
    return e.value.problems


def test_config_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = str(tmp_path / "gateway.toml")
    monkeypatch.delenv("FASTGW_NO_SUCH_VAR", raising=False)
    cases = [
        ('type = "memcached"', "limits_store.type",
         'must be one of "local", "redis", got "memcached"'),
        ('type = "redis"', "limits_store.address",
         'missing (required with type = "redis"): host:port or unix:/path'),
        ('type = "redis"\naddress = "localhost"', "limits_store.address",
         '"localhost" has no port; expected HOST:PORT, e.g. 127.0.0.1:8080; '
         "use host:port or unix:/path"),
        ('type = "redis"\naddress = "unix:"', "limits_store.address",
         "unix: needs a socket path, e.g. unix:/run/redis.sock"),
        ('address = "127.0.0.1:6379"', "limits_store.address", 'only with type = "redis"'),
        ('type = "redis"\naddress = "127.0.0.1:6379"\non_failure = "retry"',
         "limits_store.on_failure", 'must be one of "local", "open", "closed", got "retry"'),
        ('type = "redis"\naddress = "127.0.0.1:6379"\ntimeout_s = 0', "limits_store.timeout_s",
         "must be greater than 0, got 0"),
        ('type = "redis"\naddress = "127.0.0.1:6379"\npassword = "x"', "limits_store.password",
         'unknown key "password"; did you mean "password_env"?'),
        ('type = "redis"\naddress = "127.0.0.1:6379"\npassword_env = "FASTGW_NO_SUCH_VAR"',
         "limits_store.password_env", "environment variable FASTGW_NO_SUCH_VAR is not set"),
        ('type = "redis"\naddress = "127.0.0.1:6379"\npassword_file = "nope"',
         "limits_store.password_file", f"file not found: {tmp_path / 'nope'}"),
        ('type = "redis"\naddress = "127.0.0.1:6379"\nusername = "gw"', "limits_store.username",
         "a Redis username needs password_file or password_env"),
        ('type = "redis"\naddress = "127.0.0.1:6379"\nprefix = "a b"', "limits_store.prefix",
         'must be visible ASCII without spaces, e.g. "fastgw:"'),
        ('database = 2', "limits_store.database", 'only with type = "redis"'),
    ]  # fmt: skip
    for toml, key, message in cases:
        assert problems(tmp_path, toml) == [(conf, key, message)], toml

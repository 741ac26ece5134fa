"""Rate limits in the gateway on trio's mock clock: exact counts, 429 fields, keys by
identity, shadow mode, and buckets kept across a reload."""

from __future__ import annotations

from pathlib import Path

import trio
from trio.testing import MockClock

from fastgw.config import load_config
from fastgw.gateway import Gateway
from tests.e2e.helpers import Client, Upstream
from tests.limits.support import api_keys, gateway_toml


def write(tmp_path: Path, uport: int, limits: str, extra_routes: str = "") -> Path:
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        gateway_toml(
            uport,
            extra_routes,
            api_keys(
                ("one", b"key-one", 'attributes = { tier = "free" }'),
                ("two", b"key-two", 'attributes = { tier = "pro" }'),
            ),
            limits,
        )
    )
    return conf


LIMIT = """
[[rate_limits]]
name = "per-caller"
routes = ["api"]
key = "identity"
rate_per_s = 10
burst = 10
"""


async def start(
    nursery: trio.Nursery, tmp_path: Path, limits: str = LIMIT
) -> tuple[Gateway, int, Path]:
    up = Upstream()
    uport = await nursery.start(up.serve)
    conf = write(tmp_path, uport, limits)
    gw = Gateway(load_config(conf))
    port = (await nursery.start(gw.serve))[0][1]
    return gw, port, conf


async def test_exact_counts_and_429_fields(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: MockClock
) -> None:
    _gw, port, _ = await start(nursery, tmp_path)
    c = await Client.open(port)
    key = [(b"X-Api-Key", b"key-one")]
    statuses = [(await c.request(b"GET", b"/api/x", key)).status for _ in range(10)]
    assert statuses == [200] * 10  # the burst, all at t=0 (the mock clock stands still)
    r = await c.request(b"GET", b"/api/x", key)
    assert r.status == 429 and r.json()["error"] == "rate_limited"
    assert r.header(b"retry-after") == b"1"  # 0.1 s, rounded up to whole seconds
    assert r.header(b"ratelimit-policy") == b'"per-caller";q=10;w=1'
    assert r.header(b"ratelimit") == b'"per-caller";r=0;t=1'
    # Another caller has its own bucket.
    assert (await c.request(b"GET", b"/api/x", [(b"X-Api-Key", b"key-two")])).status == 200
    await trio.sleep(0.1)  # exactly one token later
    assert (await c.request(b"GET", b"/api/x", key)).status == 200
    assert (await c.request(b"GET", b"/api/x", key)).status == 429


async def test_shadow_mode_counts_only(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: MockClock
) -> None:
    gw, port, _ = await start(
        nursery, tmp_path, LIMIT.replace("burst = 10", 'burst = 2\nmode = "shadow"')
    )
    c = await Client.open(port)
    key = [(b"X-Api-Key", b"key-one")]
    assert [(await c.request(b"GET", b"/api/x", key)).status for _ in range(5)] == [200] * 5
    assert gw.state.limit_counts["per-caller"] == [2, 0, 3]  # allowed, limited, shadow


async def test_reload_keeps_bucket_state_and_takes_new_rate(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: MockClock
) -> None:
    gw, port, conf = await start(nursery, tmp_path)
    c = await Client.open(port)
    key = [(b"X-Api-Key", b"key-one")]
    for _ in range(10):
        assert (await c.request(b"GET", b"/api/x", key)).status == 200
    assert (await c.request(b"GET", b"/api/x", key)).status == 429
    # Reload with a new route and a slower rate: the drained bucket stays drained.
    text = conf.read_text().replace("rate_per_s = 10", "rate_per_s = 1")
    conf.write_text(text.replace(
        "[api_keys]", '[[routes]]\nname = "new"\npath_prefix = "/new"\nbackend = "fn"\n[api_keys]'
    ))  # fmt: skip
    gw.reload(load_config(conf))
    assert (await c.request(b"GET", b"/new/x", key)).status == 200  # new route, no limit
    r = await c.request(b"GET", b"/api/x", key)
    assert r.status == 429  # not refilled by the reload
    await trio.sleep(1.0)  # one token at the new rate
    assert (await c.request(b"GET", b"/api/x", key)).status == 200
    assert (await c.request(b"GET", b"/api/x", key)).status == 429


async def test_claim_keyed_limits_from_api_key_attributes(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: MockClock
) -> None:
    limits = LIMIT.replace('key = "identity"', 'key = "claim:tier"').replace(
        "burst = 10", "burst = 1"
    )
    _gw, port, _ = await start(nursery, tmp_path, limits)
    c = await Client.open(port)
    assert (await c.request(b"GET", b"/api/x", [(b"X-Api-Key", b"key-one")])).status == 200
    assert (await c.request(b"GET", b"/api/x", [(b"X-Api-Key", b"key-one")])).status == 429
    assert (await c.request(b"GET", b"/api/x", [(b"X-Api-Key", b"key-two")])).status == 200

"""Rate-limit tiers through the real gateway: free and pro callers get their tier's rate
and burst, from a token claim (a local identity provider's JWKS) or from an API key's
attribute through a map file; callers without a tier get the default tier or a 403; the
429 shows the tier's quota; a caller whose tier changes keeps its bucket."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa
from trio.testing import MockClock

from fastgw.config import load_config
from fastgw.errors import ConfigError
from fastgw.gateway import Gateway
from tests.e2e.helpers import Client, Upstream
from tests.identity.support import IdP, public_jwk
from tests.limits.support import api_keys, gateway_toml

AUD = "api://tiers"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(key: rsa.RSAPrivateKey, iss: str, sub: str, **claims: Any) -> bytes:
    now = int(time.time())
    body = {"iss": iss, "aud": AUD, "sub": sub, "iat": now - 5, "exp": now + 600, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"}).encode()


def write(tmp_path: Path, uport: int, body: str) -> Path:
    conf = tmp_path / "gateway.toml"
    conf.write_text(gateway_toml(uport, body))
    return conf


async def statuses(c: Client, headers: list[tuple[bytes, bytes]], n: int) -> list[int]:
    return [(await c.request(b"GET", b"/api/x", headers)).status for _ in range(n)]


# -- JWT claims -------------------------------------------------------------------------


async def test_free_and_pro_by_token_claim(
    nursery: trio.Nursery, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    idp = IdP()
    idp.keys = [public_jwk(rsa_key, "RS256", "k1")]
    await idp.start(nursery)
    up = Upstream()
    uport = await nursery.start(up.serve)
    # Rates far too slow to refill during the test: the counts are the bursts.
    conf = write(
        tmp_path,
        uport,
        f"""
[issuers.corp]
issuer = "{idp.issuer}"
audiences = ["{AUD}"]
jwks_url = "{idp.jwks_url}"

[[rate_limits]]
name = "plan"
routes = ["api"]
tier = "claim:plan"
[rate_limits.tiers.free]
rate_per_s = 0.001
burst = 2
[rate_limits.tiers.pro]
rate_per_s = 0.001
burst = 5
""",
    )
    gw = Gateway(load_config(conf))
    port = (await nursery.start(gw.serve))[0][1]
    while not gw.readiness()[0]:
        await trio.sleep(0.01)
    c = await Client.open(port)
    free = [(b"Authorization", b"Bearer " + token(rsa_key, idp.issuer, "alice", plan="free"))]
    pro = [(b"Authorization", b"Bearer " + token(rsa_key, idp.issuer, "bob", plan="pro"))]
    none = [(b"Authorization", b"Bearer " + token(rsa_key, idp.issuer, "carol"))]
    other = [(b"Authorization", b"Bearer " + token(rsa_key, idp.issuer, "dan", plan="gold"))]
    assert await statuses(c, free, 3) == [200, 200, 429]
    assert await statuses(c, pro, 6) == [200] * 5 + [429]
    r = await c.request(b"GET", b"/api/x", pro)
    assert r.status == 429
    assert r.header(b"ratelimit-policy") == b'"plan";q=5;w=5000'  # the pro tier's quota
    r = await c.request(b"GET", b"/api/x", free)
    assert r.header(b"ratelimit-policy") == b'"plan";q=2;w=2000'
    # No plan claim, or a plan that is not a tier, and no default tier: refused.
    for h in (none, other):
        r = await c.request(b"GET", b"/api/x", h)
        assert r.status == 403 and r.json()["error"] == "no_tier"
    assert len(up.received) == 7
    assert gw.state.limit_counts["plan"] == [7, 6, 0]  # allowed, refused (429 + 403)


# -- API key attributes and a map file -------------------------------------------------

KEYS = api_keys(
    ("one", b"key-one", 'attributes = { team = "billing" }'),
    ("two", b"key-two", 'attributes = { team = "search" }'),
    ("three", b"key-three"),
)

TIERED = """
[[rate_limits]]
name = "team"
routes = ["api"]
tier = "claim:team"
tier_map = "teams.map"
[rate_limits.tiers.default]
rate_per_s = 1
burst = 1
[rate_limits.tiers.pro]
rate_per_s = 10
burst = 3
"""

ONE = [(b"X-Api-Key", b"key-one")]
TWO = [(b"X-Api-Key", b"key-two")]
THREE = [(b"X-Api-Key", b"key-three")]


async def test_api_key_attribute_through_a_map_with_a_default_tier(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: MockClock
) -> None:
    (tmp_path / "teams.map").write_text("# team tier\nbilling pro\nsearch default\n")
    up = Upstream()
    uport = await nursery.start(up.serve)
    gw = Gateway(load_config(write(tmp_path, uport, KEYS + TIERED)))
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    assert await statuses(c, ONE, 4) == [200, 200, 200, 429]  # pro: burst 3
    assert await statuses(c, TWO, 2) == [200, 429]  # mapped to default: burst 1
    r = await c.request(b"GET", b"/api/x", THREE)  # no team attribute: default
    assert r.status == 200
    r = await c.request(b"GET", b"/api/x", THREE)
    assert r.status == 429
    assert r.header(b"ratelimit-policy") == b'"team";q=1;w=1'
    assert r.header(b"retry-after") == b"1"
    await trio.sleep(0.1)  # one pro token, none of the default tier's
    assert await statuses(c, ONE, 2) == [200, 429]
    assert await statuses(c, TWO, 1) == [429]
    await trio.sleep(0.9)
    assert await statuses(c, TWO, 2) == [200, 429]


async def test_a_tier_change_keeps_the_bucket(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: MockClock
) -> None:
    mp = tmp_path / "teams.map"
    mp.write_text("billing default\n")
    up = Upstream()
    uport = await nursery.start(up.serve)
    conf = write(tmp_path, uport, KEYS + TIERED)
    gw = Gateway(load_config(conf))
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    assert await statuses(c, ONE, 2) == [200, 429]  # default: burst 1, drained
    mp.write_text("billing pro\n")
    gw.reload(load_config(conf))
    # Pro now (burst 3, 10/s), but the same bucket: the debt is converted, not refilled.
    r = await c.request(b"GET", b"/api/x", ONE)
    assert r.status == 200  # the converted debt (1 default token) is under pro's burst
    assert await statuses(c, ONE, 3) == [200, 429, 429]
    await trio.sleep(0.1)  # one token at the pro rate
    assert await statuses(c, ONE, 2) == [200, 429]


async def test_untiered_limits_on_the_same_route_still_apply(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: MockClock
) -> None:
    (tmp_path / "teams.map").write_text("billing pro\n")
    extra = """
[[rate_limits]]
name = "route-cap"
routes = ["api"]
key = "route"
rate_per_s = 1
burst = 2
"""
    up = Upstream()
    uport = await nursery.start(up.serve)
    gw = Gateway(load_config(write(tmp_path, uport, KEYS + TIERED + extra)))
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    assert await statuses(c, ONE, 2) == [200, 200]
    r = await c.request(b"GET", b"/api/x", ONE)
    assert r.status == 429 and r.header(b"ratelimit-policy") == b'"route-cap";q=2;w=2'


# -- config errors ----------------------------------------------------------------------


def problems(tmp_path: Path, body: str) -> list[tuple[str, str, str]]:
    conf = write(tmp_path, 9, KEYS + body)
    with pytest.raises(ConfigError) as e:
        load_config(conf)
    return e.value.problems


def test_config_errors(tmp_path: Path) -> None:
    conf = str(tmp_path / "gateway.toml")
    base = '[[rate_limits]]\nname = "t"\n'
    tier = "[rate_limits.tiers.free]\nrate_per_s = 1\nburst = 1\n"
    assert problems(tmp_path, base + 'tier = "plan"\n' + tier) == [
        (
            conf,
            "rate_limits[0].tier",
            'must be claim:<name> (a claim or API key attribute), got "plan"',
        )
    ]
    assert problems(tmp_path, base + 'tier = "claim:plan"\n') == [
        (conf, "rate_limits[0].tiers",
         "missing (required with tier): at least one [rate_limits.tiers.<name>]")
    ]  # fmt: skip
    assert problems(tmp_path, base + tier) == [
        (conf, "rate_limits[0].tier",
         'missing (required with tiers): the claim naming the tier, e.g. "claim:plan"')
    ]  # fmt: skip
    assert problems(tmp_path, base + 'tier = "claim:plan"\nrate_per_s = 5\n' + tier) == [
        (conf, "rate_limits[0].rate_per_s",
         "not with tiers: set it per tier ([rate_limits.tiers.<name>])")
    ]  # fmt: skip
    assert problems(
        tmp_path, base + 'tier = "claim:plan"\n[rate_limits.tiers.free]\nrate_per_s = 1\n'
    ) == [(conf, "rate_limits[0].tiers.free.burst", "missing (required)")]
    (tmp_path / "plans.map").write_text("a free\nb gold\n")
    assert problems(tmp_path, base + 'tier = "claim:plan"\ntier_map = "plans.map"\n' + tier) == [
        (str(tmp_path / "plans.map"), "line 2",
         'value "gold" is not a tier of rate_limits[0] (map used by '
         f'{conf}: rate_limits[0].tier_map); unknown tier "gold" (known: free)')
    ]  # fmt: skip
    missing = tmp_path / "nope.map"
    assert problems(tmp_path, base + 'tier = "claim:plan"\ntier_map = "nope.map"\n' + tier) == [
        (conf, "rate_limits[0].tier_map", f"file not found: {missing}")
    ]


def test_explain_names_the_callers_tier(tmp_path: Path) -> None:
    from fastgw.policy.explain import explain

    (tmp_path / "teams.map").write_text("billing pro\n")
    cfg = load_config(
        write(
            tmp_path,
            9,
            KEYS + TIERED.replace("[rate_limits.tiers.default]\nrate_per_s = 1\nburst = 1\n", ""),
        )
    )
    url = "http://gw.test/api/x"
    _, lines = explain(cfg, "GET", url, ["X-Api-Key: key-one"])
    assert "rate limit team: tier pro (team): 10/s, burst 3, key identity" in lines
    _, lines = explain(cfg, "GET", url, ["X-Api-Key: key-two"])
    assert "rate limit team: no tier (team) and no default tier: 403 no_tier, key identity" in lines

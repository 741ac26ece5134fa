"""JWKS fetching against a real local identity provider (tests/identity/support.py IdP):
discovery, TLS, caching headers, rotation, rate limits, outages.

Sockets are real (127.0.0.1, port 0, TLS from a trustme CA); waiting is not: every test
takes trio's autojump MockClock, so "300 s later" takes no real time. (The clock must be
a test argument: pytest-trio ignores a clock fixture pulled in by ``usefixtures``.)
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from fastgw.identity import Issuer, IssuerUnavailable, UnknownKey, Verifier
from fastgw.identity.jwt import JwksFetcher, _freshness_s
from tests.identity.support import AUD, NOW, IdP, claims, dead_port, mint, public_jwk, raw


def make_issuer(idp: IdP | None, ca_file: str | None, **kw: Any) -> Issuer:
    base: dict[str, Any] = {
        "name": "idp",
        "issuer": idp.issuer if idp else "https://down.test",
        "audiences": (AUD,),
        "ca_file": ca_file,
    }
    if idp is not None and "jwks_url" not in kw:
        base["discovery_url"] = idp.discovery_url
    base.update(kw)
    return Issuer(**base)


@pytest.fixture
async def idp(nursery: trio.Nursery, server_ssl: ssl.SSLContext, rsa_key: Any) -> IdP:
    p = IdP(server_ssl)
    p.keys = [public_jwk(rsa_key, "RS256", "k1")]
    await p.start(nursery)
    return p


async def started(nursery: trio.Nursery, iss: Issuer) -> tuple[Verifier, JwksFetcher]:
    v = Verifier([iss])
    await nursery.start(v.run)
    return v, v.fetchers[0]


def token_for(idp: IdP, key: Any, kid: str, alg: str = "RS256") -> bytes:
    return mint(key, alg, claims(iss=idp.issuer), kid=kid)


# --- loading -------------------------------------------------------------------------


async def test_discovery_then_jwks_over_verified_tls(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str, rsa_key: Any
) -> None:
    v, f = await started(nursery, make_issuer(idp, ca_file))
    assert f.ready and v.ready("idp")
    assert idp.hits == {IdP.DISCOVERY: 1, IdP.JWKS: 1}
    assert v.verify(token_for(idp, rsa_key, "k1"), NOW).subject == "alice"
    assert v.statistics()["issuers"]["idp"] == {
        "ready": True,
        "source": "jwks",
        "keys": 1,
        "fetches": 1,
        "failures": 0,
        "refetch_requests": 0,
        "last_error": None,
    }


async def test_jwks_url_over_plain_http_on_loopback(
    autojump_clock: MockClock, nursery: trio.Nursery, rsa_key: Any
) -> None:
    idp = IdP(None)
    idp.keys = [public_jwk(rsa_key, "RS256", "k1")]
    await idp.start(nursery)
    v, f = await started(nursery, make_issuer(idp, None, jwks_url=idp.jwks_url))
    assert f.ready
    assert idp.hits == {IdP.JWKS: 1}
    assert v.verify(token_for(idp, rsa_key, "k1"), NOW).key == "k1"


async def test_tls_is_verified(autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP) -> None:
    # The system roots do not know the test CA: no keys, and the reason says TLS.
    _, f = await started(nursery, make_issuer(idp, None))
    assert not f.ready
    assert f.last_error is not None and "TLS" in f.last_error
    assert idp.hits == {}


async def test_discovery_must_name_the_same_issuer(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str
) -> None:
    idp.issuer = "https://someone-else.test"
    _, f = await started(nursery, make_issuer(idp, ca_file, issuer=idp.base_url))
    assert not f.ready
    assert f.last_error == "discovery document names a different issuer"


async def test_oversized_jwks_is_refused(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str
) -> None:
    idp.extra_body = b'{"keys": [], "pad": "' + b"x" * 5000 + b'"}'
    _, f = await started(nursery, make_issuer(idp, ca_file, max_jwks_bytes=4096))
    assert not f.ready
    assert f.last_error is not None and "over 4096" in f.last_error


async def test_hanging_server_times_out(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str
) -> None:
    idp.modes[IdP.DISCOVERY] = "hang"
    t0 = trio.current_time()
    _, f = await started(nursery, make_issuer(idp, ca_file, fetch_timeout_s=3))
    assert trio.current_time() - t0 == pytest.approx(3)
    assert not f.ready
    assert f.last_error == "no complete answer within 3 s"


async def test_connection_closed_without_answer(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str
) -> None:
    idp.modes[IdP.JWKS] = "drop"
    _, f = await started(nursery, make_issuer(idp, ca_file))
    assert not f.ready
    assert f.last_error is not None and "closed" in f.last_error


# --- refresh and Cache-Control -------------------------------------------------------


@pytest.mark.parametrize(
    ("cache_control", "age", "period_s"),
    [
        ("max-age=120", None, 120),
        ("public, max-age=200, must-revalidate", 150, 60),  # 50 s left -> held at 60
        ("max-age=5", None, 60),  # under min_refresh_s
        ("max-age=86400", None, 300),  # over max_refresh_s
        (None, None, 300),  # says nothing: max_refresh_s
        ("no-cache", None, 60),
    ],
)
async def test_refresh_follows_cache_control_within_bounds(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    idp: IdP,
    ca_file: str,
    cache_control: str | None,
    age: int | None,
    period_s: float,
) -> None:
    idp.cache_control = cache_control
    idp.age = age
    await started(nursery, make_issuer(idp, ca_file))
    await trio.sleep(period_s - 0.5)
    assert idp.hits[IdP.JWKS] == 1
    await trio.sleep(1)
    assert idp.hits[IdP.JWKS] == 2
    assert idp.hits[IdP.DISCOVERY] == 1  # discovered once


def test_freshness_parsing() -> None:
    assert _freshness_s(None, None) is None
    assert _freshness_s(b"max-age=60", None) == 60
    assert _freshness_s(b'MAX-AGE="60"', b"10") == 50
    assert _freshness_s(b"max-age=60", b"100") == 0
    assert _freshness_s(b"no-store, max-age=60", None) == 0
    assert _freshness_s(b"private", None) is None
    assert _freshness_s(b"max-age=-5", None) is None
    assert _freshness_s(b"max-age=1e3", None) is None


# --- rotation ------------------------------------------------------------------------


async def test_unknown_kid_refetches_and_accepts_the_rotated_key(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    idp: IdP,
    ca_file: str,
    rsa_key: Any,
    rsa_key2: Any,
) -> None:
    v, _f = await started(nursery, make_issuer(idp, ca_file))
    old = token_for(idp, rsa_key, "k1")
    v.verify(old, NOW)
    # The IdP rotates: k2 signs from now on, k1 is still published.
    idp.keys = [public_jwk(rsa_key2, "RS256", "k2"), public_jwk(rsa_key, "RS256", "k1")]
    new = token_for(idp, rsa_key2, "k2")
    t0 = trio.current_time()
    ident = await v.verify_async(new, NOW)
    # Accepted within one second of the first token that used it, without a restart
    # (the wait is the refetch rate limit: the previous fetch was at t0).
    assert trio.current_time() - t0 <= 1.0
    assert ident.key == "k2"
    assert idp.hits[IdP.JWKS] == 2
    # The old key stayed in the set, so its cached tokens still hit.
    hits = v.hits
    v.verify(old, NOW)
    assert v.hits == hits + 1


async def test_rotated_key_long_after_the_last_fetch_is_fetched_at_once(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str, rsa_key2: Any
) -> None:
    v, _ = await started(nursery, make_issuer(idp, ca_file))
    await trio.sleep(30)
    idp.keys = [public_jwk(rsa_key2, "RS256", "k2")]
    t0 = trio.current_time()
    assert (await v.verify_async(token_for(idp, rsa_key2, "k2"), NOW)).key == "k2"
    assert trio.current_time() == t0  # no rate-limit wait, and I/O takes no mock time


async def test_a_flood_of_unknown_kids_makes_only_rate_limited_fetches(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str
) -> None:
    v, f = await started(nursery, make_issuer(idp, ca_file, refetch_interval_s=1.0))
    for i in range(1000):
        with pytest.raises(UnknownKey):
            v.verify(raw({"alg": "RS256", "kid": f"bogus-{i}"}, claims(iss=idp.issuer)), NOW)
        if i % 100 == 99:
            await trio.sleep(1)  # 1000 bad tokens over 10 s
    await trio.sleep(5)
    assert f.refetch_requests == 1000
    # The first fetch at t=0, then at most one per second of flood (refresh is 300 s).
    assert 2 <= idp.hits[IdP.JWKS] <= 1 + 10 + 1
    assert idp.hits[IdP.DISCOVERY] == 1


async def test_flood_of_waiting_requests_shares_one_refetch(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str, rsa_key2: Any
) -> None:
    v, _ = await started(nursery, make_issuer(idp, ca_file))
    await trio.sleep(10)
    idp.keys = [public_jwk(rsa_key2, "RS256", "k2")]
    token = token_for(idp, rsa_key2, "k2")
    results: list[str] = []

    async def one() -> None:
        results.append((await v.verify_async(bytes(bytearray(token)), NOW)).key or "")

    async with trio.open_nursery() as n:
        for _ in range(50):
            n.start_soon(one)
    assert results == ["k2"] * 50
    assert idp.hits[IdP.JWKS] == 2  # single flight


async def test_unknown_kid_still_unknown_after_refetch(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str, rsa_key2: Any
) -> None:
    v, _ = await started(nursery, make_issuer(idp, ca_file))
    t0 = trio.current_time()
    with pytest.raises(UnknownKey):
        await v.verify_async(token_for(idp, rsa_key2, "nope"), NOW)
    assert trio.current_time() - t0 <= v.refetch_wait_s


async def test_key_removed_from_the_set_stops_cached_tokens(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    idp: IdP,
    ca_file: str,
    rsa_key: Any,
    rsa_key2: Any,
) -> None:
    idp.keys = [public_jwk(rsa_key, "RS256", "k1"), public_jwk(rsa_key2, "RS256", "k2")]
    v, _f = await started(nursery, make_issuer(idp, ca_file))
    t1 = token_for(idp, rsa_key, "k1")
    v.verify(t1, NOW)
    idp.keys = [public_jwk(rsa_key2, "RS256", "k2")]
    await trio.sleep(301)  # the next scheduled refresh
    assert idp.hits[IdP.JWKS] == 2
    with pytest.raises(UnknownKey):
        v.verify(t1, NOW)


# --- outages -------------------------------------------------------------------------


async def test_server_down_keeps_the_last_good_key_set(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str, rsa_key: Any
) -> None:
    v, f = await started(nursery, make_issuer(idp, ca_file))
    token = token_for(idp, rsa_key, "k1")
    idp.stop()
    await trio.sleep(301)  # refresh due: connection refused
    assert f.failures >= 1
    assert f.last_error is not None and "connection failed" in f.last_error
    assert f.ready
    assert v.verify(token, NOW).subject == "alice"
    # Unusable answers (no keys) are failures too, and keep the set as well.
    assert f.keys is not None and len(f.keys) == 1


async def test_bad_jwks_answer_keeps_the_last_good_key_set(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str, rsa_key: Any
) -> None:
    v, f = await started(nursery, make_issuer(idp, ca_file))
    for body in (b'{"keys": []}', b"not json", b'{"keys": [{"kty": "oct", "k": "AA"}]}'):
        idp.extra_body = body
        assert not await f.refresh()
        assert v.verify(token_for(idp, rsa_key, "k1"), NOW).subject == "alice"
    idp.extra_body = None
    idp.modes[IdP.JWKS] = "error"
    assert not await f.refresh()
    assert f.last_error is not None and "HTTP 500" in f.last_error
    assert f.ready


async def test_issuer_down_at_start_is_not_ready_and_others_are_unaffected(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str, rsa_key: Any
) -> None:
    up = make_issuer(idp, ca_file, name="up")
    down = Issuer(
        name="down",
        issuer="https://down.test",
        audiences=(AUD,),
        jwks_url=f"https://127.0.0.1:{dead_port()}/jwks.json",
        ca_file=ca_file,
    )
    v = Verifier([up, down])
    await nursery.start(v.run)  # returns: the gateway can serve
    assert v.ready("up") and not v.ready("down")
    assert v.verify(token_for(idp, rsa_key, "k1"), NOW).issuer == idp.issuer
    with pytest.raises(IssuerUnavailable) as info:
        v.verify(mint(rsa_key, "RS256", claims(iss="https://down.test"), kid="k1"), NOW)
    assert info.value.status == 503
    stats = v.statistics()["issuers"]
    assert stats["up"]["ready"] and not stats["down"]["ready"]
    assert "connection failed" in stats["down"]["last_error"]


async def test_issuer_recovers_with_backoff(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str, rsa_key: Any
) -> None:
    idp.modes[IdP.DISCOVERY] = "error"
    v, f = await started(nursery, make_issuer(idp, ca_file))
    assert not f.ready
    idp.modes.clear()
    # Retries after 1, 2, 4 ... s: the first retry (t=1) succeeds.
    await trio.sleep(1.5)
    assert f.ready
    assert v.verify(token_for(idp, rsa_key, "k1"), NOW).subject == "alice"
    assert idp.hits[IdP.DISCOVERY] == 2


async def test_backoff_doubles_up_to_min_refresh(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str
) -> None:
    idp.modes[IdP.DISCOVERY] = "error"
    await started(nursery, make_issuer(idp, ca_file, min_refresh_s=10))
    # Attempts at t = 0, 1, 3, 7, 15, 25, 35, ... (delays 1, 2, 4, 8, 10, 10).
    await trio.sleep(36)
    assert idp.hits[IdP.DISCOVERY] == 7


async def test_moved_jwks_uri_is_rediscovered(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str, rsa_key: Any
) -> None:
    _, f = await started(nursery, make_issuer(idp, ca_file))
    idp.jwks_path = "/v2/jwks.json"  # the old path now answers 404
    assert not await f.refresh()
    assert await f.refresh()
    assert idp.hits == {IdP.DISCOVERY: 2, IdP.JWKS: 2, "/v2/jwks.json": 1}


async def test_verify_async_gives_up_when_the_issuer_stays_down(
    autojump_clock: MockClock, nursery: trio.Nursery, idp: IdP, ca_file: str, rsa_key2: Any
) -> None:
    v, f = await started(nursery, make_issuer(idp, ca_file))
    idp.modes[IdP.JWKS] = "hang"
    t0 = trio.current_time()
    with pytest.raises(UnknownKey):
        await v.verify_async(token_for(idp, rsa_key2, "k2"), NOW)
    assert trio.current_time() - t0 == pytest.approx(v.refetch_wait_s)
    assert f.ready

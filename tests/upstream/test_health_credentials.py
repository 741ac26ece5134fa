"""Health checks and refusals with upstream credentials, through a real gateway: real
trio upstreams on 127.0.0.1 that check the credential they get, the fake metadata
server (``TokenMint``) minting real RS256 ID tokens, files for keys, a shared
credentials file for SigV4; trio's autojump MockClock drives the check intervals and
the refresh rate limit.

- A check carries the endpoint's credential as a request does (fastgw/upstream/health.py),
  a round without one is skipped, not failed, and /backends says so.
- A 401 (or a 403 with ``error="invalid_token"``) to our credential asks the cache for
  an early refresh, at most once per ``forced_refresh_interval_s`` (30 s), and counts in
  ``fastgw_upstream_credential_rejected_total`` (fastgw/upstream/pool.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import generate_latest
from trio.testing import MockClock

from fastgw.config.model import CredentialConfig, HealthCheckConfig
from fastgw.gateway import Gateway
from fastgw.metrics import make_registry
from fastgw.upstream.credentials import RefreshPolicy
from fastgw.upstream.health import WAITING_FOR_CREDENTIAL
from tests.e2e.helpers import Client, Received, Responder, Upstream, make_config
from tests.upstream.gateway_support import CheckingUpstream, TokenMint
from tests.upstream.test_credentials_gateway import ACCESS_KEY, SECRET_KEY, SigV4Checker

CHECK = HealthCheckConfig(
    path="/healthz", interval_s=1.0, timeout_s=0.5, healthy_threshold=2, unhealthy_threshold=3
)
FORCED_S = 30.0  # RefreshPolicy.forced_refresh_interval_s, as documented


def google(metadata_url: str) -> CredentialConfig:
    return CredentialConfig(type="google_id_token", metadata_url=metadata_url)


async def serve(nursery: trio.Nursery, config: object) -> tuple[Gateway, int]:
    gw = Gateway(config)  # type: ignore[arg-type]
    addrs = await nursery.start(gw.serve)
    return gw, addrs[0][1]


def check_state(gw: Gateway, i: int = 0) -> object:
    """What /backends shows for endpoint ``i`` of backend "fn" (the same snapshot)."""
    return gw.state.backends["fn"].statistics(gw.now)["endpoints"][i]["check"]  # type: ignore[index]


def rejected_total(gw: Gateway) -> float:
    text = generate_latest(make_registry(gw)).decode()
    for line in text.splitlines():
        if line.startswith('fastgw_upstream_credential_rejected_total{backend="fn"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no fastgw_upstream_credential_rejected_total for fn")


# -- health checks carry the credential ---------------------------------------------------


async def test_checks_carry_the_id_token_and_fail_only_when_it_is_refused(
    nursery: trio.Nursery, autojump_clock: MockClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    mint = TokenMint(rsa_key)
    meta = await mint.start(nursery)
    up = CheckingUpstream(rsa_key)  # 401 without a token, 403 for a bad one, 200 with ours
    origin = await up.start(nursery)
    config = make_config([origin], backend_kw={"credential": google(meta), "health_check": CHECK})
    gw, _port = await serve(nursery, config)
    pool = gw.state.backends["fn"].pools[0]
    assert pool.report_from == 401  # refusals are reported (429 without a credential)

    await trio.sleep(5.5)
    assert pool.healthy and check_state(gw) == "ok"
    assert up.seen.missing == 0 and up.seen.bad == 0
    assert up.seen.ok >= 5  # every check got through with the gateway's token
    assert up.seen.last is not None and up.seen.last.target == b"/healthz"
    assert up.seen.last.header(b"connection") == b"close"
    assert mint.count(origin) == 1  # checks use the cached token

    # The function stops trusting our token's signer: a real refusal, and a plain 403
    # (no error="invalid_token": the token is fine, its identity lacks the right).
    up.public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    up._verified.clear()
    await trio.sleep(3.5)
    assert not pool.healthy
    assert check_state(gw) == "status 403"
    assert mint.count(origin) == 1  # a plain 403 is not a reason for a new token
    assert rejected_total(gw) == 0


async def test_rounds_without_a_credential_are_skipped_not_failed(
    nursery: trio.Nursery, autojump_clock: MockClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    mint = TokenMint(rsa_key)
    mint.fail = True  # the token source is down from the start
    meta = await mint.start(nursery)
    up = CheckingUpstream(rsa_key)
    origin = await up.start(nursery)
    config = make_config([origin], backend_kw={"credential": google(meta), "health_check": CHECK})
    gw, _port = await serve(nursery, config)
    pool = gw.state.backends["fn"].pools[0]

    await trio.sleep(10.5)
    assert pool.healthy  # ten rounds, none counted against the endpoint
    assert check_state(gw) == WAITING_FOR_CREDENTIAL == "waiting for credential"
    assert up.upstream.received == []  # nothing was sent without a credential

    mint.fail = False
    await trio.sleep(20.0)  # the cache's backoff, then a few rounds
    assert pool.healthy and check_state(gw) == "ok"
    assert up.seen.ok >= 2 and up.seen.missing == 0


async def test_checks_to_a_lambda_url_are_signed_for_an_empty_body(
    nursery: trio.Nursery, autojump_clock: MockClock, tmp_path: Path
) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[gw]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    checker = SigV4Checker()  # 200 for a valid signature (Host, payload hash), else 403
    port = await nursery.start(checker.upstream.serve)
    cred = CredentialConfig(
        type="aws_sigv4",
        source="shared_file",
        credentials_file=str(creds),
        profile="gw",
        region="eu-west-1",
    )
    config = make_config(
        [f"http://127.0.0.1:{port}/base"], backend_kw={"credential": cred, "health_check": CHECK}
    )
    gw, _ = await serve(nursery, config)
    await trio.sleep(4.5)
    assert checker.bad == [] and checker.good >= 4
    assert checker.last is not None and checker.last.target == b"/base/healthz"
    assert gw.state.backends["fn"].pools[0].healthy and check_state(gw) == "ok"


async def test_checks_carry_an_azure_function_key(
    nursery: trio.Nursery, autojump_clock: MockClock, tmp_path: Path
) -> None:
    key = tmp_path / "fn.key"
    key.write_text("k1\n")
    accepted = {b"k1"}

    async def fn(req: Received, r: Responder) -> None:
        ok = req.header(b"x-functions-key") in accepted
        await r.respond(200 if ok else 401, b"")

    up = Upstream(handler=fn)
    port = await nursery.start(up.serve)
    cred = CredentialConfig(type="azure_function_key", key_file=str(key))
    config = make_config(
        [f"http://127.0.0.1:{port}"], backend_kw={"credential": cred, "health_check": CHECK}
    )
    gw, _ = await serve(nursery, config)
    pool = gw.state.backends["fn"].pools[0]
    await trio.sleep(4.5)
    assert pool.healthy and check_state(gw) == "ok"
    assert all(r.header(b"x-functions-key") == b"k1" for r in up.received)

    # The function's key is rotated but the gateway's file is not: refused for real.
    accepted = {b"k2"}
    await trio.sleep(3.5)
    assert not pool.healthy and check_state(gw) == "status 401"
    assert rejected_total(gw) >= 3  # the checks' 401s count as refusals too

    key.write_text("k2\n")  # the operator catches up: the file is re-read, checks pass
    await trio.sleep(3.5)
    assert pool.healthy and check_state(gw) == "ok"


# -- refusals on requests: an early refresh, rate limited --------------------------------


class RotatingUpstream:
    """A function that accepts ID tokens signed by ``accepted`` (its issuer's current
    key) and refuses any other with ``refusal`` (401, or 403 saying invalid_token)."""

    def __init__(self, key: rsa.RSAPrivateKey, refusal: int = 401) -> None:
        self.accepted = key.public_key()
        self.refusal = refusal
        self.ok = 0
        self.refused = 0
        self.tokens: list[str] = []
        self.upstream = Upstream(handler=self._handle)

    async def start(self, nursery: trio.Nursery) -> str:
        port = await nursery.start(self.upstream.serve)
        return f"http://127.0.0.1:{port}"

    async def _handle(self, req: Received, r: Responder) -> None:
        token = (req.header(b"authorization") or b"").removeprefix(b"Bearer ").decode()
        self.tokens.append(token)
        try:
            jwt.decode(token, self.accepted, algorithms=["RS256"], options={"verify_aud": False})
        except jwt.PyJWTError:
            self.refused += 1
            challenge = b'Bearer error="invalid_token", error_description="key not trusted"'
            await r.respond(self.refusal, b"refused", [(b"WWW-Authenticate", challenge)])
            return
        self.ok += 1
        await r.respond(200, b"ok")


@pytest.mark.parametrize("refusal", [401, 403])
async def test_a_refused_token_is_replaced_at_once(
    nursery: trio.Nursery, autojump_clock: MockClock, rsa_key: rsa.RSAPrivateKey, refusal: int
) -> None:
    mint = TokenMint(rsa_key)
    meta = await mint.start(nursery)
    up = RotatingUpstream(rsa_key, refusal)
    origin = await up.start(nursery)
    gw, port = await serve(nursery, make_config([origin], backend_kw={"credential": google(meta)}))
    c = await Client.open(port)
    assert (await c.request(b"GET", b"/x")).status == 200
    assert mint.count(origin) == 1

    # The issuer rotates its signing key; the function trusts only the new one. The
    # gateway's cached token (good for another hour) is now refused.
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    mint.key = new_key
    up.accepted = new_key.public_key()
    refused_at = trio.current_time()
    r = await c.request(b"GET", b"/x")
    assert r.status == refusal  # passed back as is: not retried with a token not yet there
    await trio.sleep(0.2)
    assert mint.count(origin) == 2
    assert mint.fetches[origin][1] - refused_at < 0.2  # fetched at once, not in 45 min
    for _ in range(3):
        assert (await c.request(b"GET", b"/x")).status == 200
    assert up.refused == 1 and up.ok == 4
    assert len(set(up.tokens)) == 2
    assert rejected_total(gw) == 1
    await c.aclose()


async def test_a_plain_403_is_not_a_refusal(
    nursery: trio.Nursery, autojump_clock: MockClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    mint = TokenMint(rsa_key)
    meta = await mint.start(nursery)

    async def fn(req: Received, r: Responder) -> None:
        await r.respond(403, b"caller not allowed", [(b"WWW-Authenticate", b"Bearer")])

    port = await nursery.start(Upstream(handler=fn).serve)
    origin = f"http://127.0.0.1:{port}"
    gw, gport = await serve(nursery, make_config([origin], backend_kw={"credential": google(meta)}))
    c = await Client.open(gport)
    for _ in range(3):
        assert (await c.request(b"GET", b"/x")).status == 403
    await trio.sleep(1.0)
    assert mint.count(origin) == 1 and rejected_total(gw) == 0
    await c.aclose()


async def test_an_always_refusing_function_gets_one_early_refresh_per_interval(
    nursery: trio.Nursery, autojump_clock: MockClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    assert RefreshPolicy().forced_refresh_interval_s == FORCED_S
    mint = TokenMint(rsa_key)
    meta = await mint.start(nursery)
    up = RotatingUpstream(rsa_key)
    up.accepted = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    origin = await up.start(nursery)
    gw, port = await serve(nursery, make_config([origin], backend_kw={"credential": google(meta)}))
    c = await Client.open(port)
    duration_s = 95.0
    start = trio.current_time()
    sent = 0
    while trio.current_time() - start < duration_s:
        assert (await c.request(b"GET", b"/x")).status == 401
        sent += 1
        await trio.sleep(0.25)
    await c.aclose()
    assert sent >= 350 and up.refused == sent
    assert rejected_total(gw) == sent
    # The first fetch, then at most one early refresh per FORCED_S (30 s): 1 + 4 here,
    # against one fetch per refused request without the limit.
    fetches = mint.count(origin)
    assert fetches <= 1 + math.ceil(duration_s / FORCED_S)
    assert fetches >= 1 + math.floor(duration_s / FORCED_S)
    gaps = [b - a for a, b in zip(mint.fetches[origin][1:], mint.fetches[origin][2:], strict=False)]
    assert all(g >= FORCED_S for g in gaps), gaps


async def test_endpoints_without_a_credential_report_from_429(nursery: trio.Nursery) -> None:
    gw = Gateway(make_config(["http://127.0.0.1:9"]))
    pool = gw.state.backends["fn"].pools[0]
    assert pool.report_from == 429 and pool.credential is None
    pool.outcome(401, None)  # nothing to refresh, nothing counted
    assert pool.credential_rejected == 0

"""Identity and policy in the gateway, end to end: a local identity provider serving a
JWKS, a real gateway loaded from TOML, a real upstream recording what it received."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from fastgw.config import load_config
from fastgw.gateway import Gateway
from fastgw.identity import hash_api_key
from tests.e2e.helpers import Client, Upstream

from .support import IdP, public_jwk

AUD = "api://orders"


def token(key: rsa.RSAPrivateKey, iss: str, kid: str = "k1", **claims: Any) -> bytes:
    now = int(time.time())
    body = {"iss": iss, "aud": AUD, "sub": "alice", "iat": now - 5, "exp": now + 600}
    body.update(claims)
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid}).encode()


async def setup(nursery: trio.Nursery, tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
                extra: str = "") -> tuple[Gateway, int, Upstream, IdP]:  # fmt: skip
    idp = IdP()
    idp.keys = [public_jwk(rsa_key, "RS256", "k1")]
    await idp.start(nursery)
    up = Upstream()
    uport = await nursery.start(up.serve)
    (tmp_path / "security.toml").write_text(
        f"""
[issuers.corp]
issuer = "{idp.issuer}"
audiences = ["{AUD}"]
jwks_url = "{idp.jwks_url}"
refetch_interval_s = 0.2

[api_keys]
header = "X-Api-Key"
[[api_keys.keys]]
name = "batch"
sha256 = "{hash_api_key(b"s3cret-key")}"
attributes = {{ team = "billing" }}

[[policies]]
name = "readers"
routes = ["orders"]
[[policies.rules]]
effect = "deny"
claims = {{ "sub" = {{ equals = "mallory" }} }}
[[policies.rules]]
effect = "allow"
issuers = ["corp"]
claims = {{ "groups" = {{ contains = "orders-read" }} }}
[[policies.rules]]
effect = "allow"
key_attributes = {{ team = "billing" }}

[[policies]]
name = "audit-only"
routes = ["orders"]
mode = "shadow"
[[policies.rules]]
effect = "allow"
claims = {{ "scope" = {{ all_of = ["orders:read", "orders:write"] }} }}
"""
    )
    (tmp_path / "gateway.toml").write_text(
        f"""include = ["security.toml"]
[identity]
claim_headers = ["email"]
{extra}
[[listeners]]
name = "main"
address = "127.0.0.1:0"
[backends.fn]
endpoints = ["http://127.0.0.1:{uport}"]
[[routes]]
name = "orders"
path_prefix = "/orders"
backend = "fn"
[[routes]]
name = "public"
path_prefix = "/public"
backend = "fn"
"""
    )
    gw = Gateway(load_config(tmp_path / "gateway.toml"))
    port = (await nursery.start(gw.serve))[0][1]
    return gw, port, up, idp


async def call(port: int, path: bytes, headers: list[tuple[bytes, bytes]] | None = None):  # type: ignore[no-untyped-def]
    c = await Client.open(port)
    r = await c.request(b"GET", path, headers)
    await c.aclose()
    return r


async def test_bearer_tokens_policies_and_identity_headers(
    nursery: trio.Nursery, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    gw, port, up, idp = await setup(nursery, tmp_path, rsa_key)
    with trio.fail_after(10):
        while not gw.state.verifier.ready("corp"):  # type: ignore[union-attr]
            await trio.sleep(0.01)

    # No credential: 401 with a Bearer challenge, nothing reaches the function.
    r = await call(port, b"/orders/1")
    assert r.status == 401
    assert r.header(b"www-authenticate").startswith(b'Bearer realm="fastgw"')
    assert up.received == []

    # A valid token in the right group, and a client trying to pose as someone else.
    good = token(rsa_key, idp.issuer, groups=["orders-read"], email="alice@example.com")
    r = await call(port, b"/orders/1", [(b"Authorization", b"Bearer " + good),
                                        (b"X-Fastgw-Subject", b"root"),
                                        (b"x-fastgw-identity", b"apikey")])  # fmt: skip
    assert r.status == 200
    seen = up.received[-1]
    assert seen.header_all(b"x-fastgw-subject") == [b"alice"]
    assert seen.header_all(b"x-fastgw-identity") == [b"jwt"]
    assert seen.header(b"x-fastgw-issuer") == b"corp"
    assert seen.header(b"x-fastgw-claim-email") == b"alice@example.com"
    assert seen.header(b"authorization") == b"Bearer " + good  # "pass" by default

    # The same token again is a cache hit (no second signature check).
    hits = gw.state.verifier.statistics()["cache_hits"]  # type: ignore[union-attr]
    assert (await call(port, b"/orders/2", [(b"Authorization", b"Bearer " + good)])).status == 200
    assert gw.state.verifier.statistics()["cache_hits"] == hits + 1  # type: ignore[union-attr]

    # Valid, but not in the group: 403 naming the policy; a deny rule wins first.
    other = token(rsa_key, idp.issuer, groups=["other"])
    r = await call(port, b"/orders/1", [(b"Authorization", b"Bearer " + other)])
    assert r.status == 403 and "readers:no rule matched" in r.json()["detail"]
    evil = token(rsa_key, idp.issuer, sub="mallory", groups=["orders-read"])
    r = await call(port, b"/orders/1", [(b"Authorization", b"Bearer " + evil)])
    assert r.status == 403 and "readers:rule 0 (deny)" in r.json()["detail"]

    # Expired and tampered tokens: 401 invalid_token, no detail that helps an attacker.
    old = token(rsa_key, idp.issuer, groups=["orders-read"], exp=int(time.time()) - 3600)
    r = await call(port, b"/orders/1", [(b"Authorization", b"Bearer " + old)])
    assert r.status == 401 and b'error="invalid_token"' in r.header(b"www-authenticate")
    bad = good[:-4] + (b"AAAA" if good[-4:] != b"AAAA" else b"BBBB")
    r = await call(port, b"/orders/1", [(b"Authorization", b"Bearer " + bad)])
    assert r.status == 401

    # Shadow policy: counted, never enforced.
    assert gw.policy_counts[("audit-only", "shadow_deny")] >= 1
    assert gw.policy_counts[("readers", "deny")] == 2

    # A route without policies: no credential needed, spoofed identity headers still go.
    r = await call(port, b"/public/x", [(b"X-Fastgw-Subject", b"root")])
    assert r.status == 200
    assert up.received[-1].header(b"x-fastgw-subject") is None
    assert up.received[-1].header(b"x-fastgw-identity") == b"anonymous"


async def test_api_keys(nursery: trio.Nursery, tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    _gw, port, up, _ = await setup(nursery, tmp_path, rsa_key)
    r = await call(port, b"/orders/1", [(b"X-Api-Key", b"s3cret-key")])
    assert r.status == 200
    assert up.received[-1].header(b"x-fastgw-key") == b"batch"
    assert up.received[-1].header(b"x-fastgw-identity") == b"apikey"
    r = await call(port, b"/orders/1", [(b"X-Api-Key", b"wrong")])
    assert r.status == 401


async def test_rotated_key_accepted_without_restart(
    nursery: trio.Nursery,
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    rsa_key2: rsa.RSAPrivateKey,
) -> None:
    gw, port, _up, idp = await setup(nursery, tmp_path, rsa_key)
    with trio.fail_after(10):
        while not gw.state.verifier.ready("corp"):  # type: ignore[union-attr]
            await trio.sleep(0.01)
    # The IdP rotates: a new key k2 signs new tokens.
    idp.keys = [public_jwk(rsa_key, "RS256", "k1"), public_jwk(rsa_key2, "RS256", "k2")]
    fresh = token(rsa_key2, idp.issuer, kid="k2", groups=["orders-read"])
    t0 = time.monotonic()
    r = await call(port, b"/orders/1", [(b"Authorization", b"Bearer " + fresh)])
    assert r.status == 200
    assert time.monotonic() - t0 < 1.0


async def test_authorization_moved(
    nursery: trio.Nursery, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    _gw, port, up, _idp = await setup(nursery, tmp_path, rsa_key, extra='authorization = "move"')
    r = await call(port, b"/public/x", [(b"Authorization", b"Basic abc")])
    assert r.status == 200
    seen = up.received[-1]
    assert seen.header(b"authorization") is None
    assert seen.header(b"x-forwarded-authorization") == b"Basic abc"
    # A copy the client sent itself never reaches the function beside the moved one.
    r = await call(
        port,
        b"/public/x",
        [(b"X-Forwarded-Authorization", b"Bearer forged"), (b"Authorization", b"Basic abc")],
    )
    assert r.status == 200
    seen = up.received[-1]
    assert [v for k, v in seen.headers if k.lower() == b"x-forwarded-authorization"] == [
        b"Basic abc"
    ]
    # Without an Authorization of its own the client's copy is dropped, not passed.
    r = await call(port, b"/public/x", [(b"X-Forwarded-Authorization", b"Bearer forged")])
    assert r.status == 200
    assert up.received[-1].header(b"x-forwarded-authorization") is None


async def test_readiness_and_metrics_follow_the_issuer(
    nursery: trio.Nursery, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """An issuer that is down: the gateway serves (other routes work, that issuer's
    tokens get 503) and /readyz says why; metrics show auth outcomes."""
    import dataclasses
    import json

    from fastgw.config.model import AdminConfig

    idp = IdP()
    idp.modes[IdP.JWKS] = "error"
    await idp.start(nursery)
    gw, _port, _up, _ = await setup(nursery, tmp_path, rsa_key)
    cfg = gw.config
    bad_issuer = dataclasses.replace(cfg.identity.issuers[0], jwks_url=idp.jwks_url,
                                     issuer=idp.issuer)  # fmt: skip
    cfg = dataclasses.replace(
        cfg,
        identity=dataclasses.replace(cfg.identity, issuers=(bad_issuer,)),
        admin=AdminConfig(host="127.0.0.1", port=0),
    )
    gw2 = Gateway(cfg)
    port2 = (await nursery.start(gw2.serve))[0][1]
    assert gw2.admin_address is not None
    tok = token(rsa_key, idp.issuer, groups=["orders-read"])
    r = await call(port2, b"/orders/1", [(b"Authorization", b"Bearer " + tok)])
    assert r.status == 503 and r.json()["error"] == "issuer_unavailable"
    assert (await call(port2, b"/public/x")).status == 200
    ready = await call(gw2.admin_address[1], b"/readyz")
    assert ready.status == 503
    assert "issuer corp: keys not loaded" in json.loads(ready.body)["reasons"]
    text = (await call(gw2.admin_address[1], b"/metrics")).body.decode()
    assert 'fastgw_issuer_ready{issuer="corp"} 0.0' in text
    assert "fastgw_auth_total" in text


async def test_mtls_callers_allowed_and_denied(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A TLS listener verifying client certificates; a policy allowing one DNS SAN."""
    import ssl

    import trustme

    ca = trustme.CA()
    server = ca.issue_cert("localhost")
    cert_file, key_file, ca_file = tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem"
    server.private_key_pem.write_to_path(str(key_file))
    server.cert_chain_pems[0].write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(ca_file))
    up = Upstream()
    uport = await nursery.start(up.serve)
    (tmp_path / "gateway.toml").write_text(
        f"""
[[listeners]]
name = "mtls"
address = "127.0.0.1:0"
tls_cert_file = "s.pem"
tls_key_file = "s.key"
client_ca_file = "ca.pem"
client_cert = "required"
[backends.fn]
endpoints = ["http://127.0.0.1:{uport}"]
[[routes]]
name = "svc"
path_prefix = "/"
backend = "fn"
[[policies]]
name = "services"
routes = ["svc"]
[[policies.rules]]
effect = "allow"
cert_sans = ["billing.svc.test"]
"""
    )
    gw = Gateway(load_config(tmp_path / "gateway.toml"))
    port = (await nursery.start(gw.serve))[0][1]

    async def call_as(name: str):  # type: ignore[no-untyped-def]
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        ca.issue_cert(name).configure_cert(ctx)
        c = await Client.open(port, ctx)
        r = await c.request(b"GET", b"/x")
        await c.aclose()
        return r

    r = await call_as("billing.svc.test")
    assert r.status == 200
    seen = up.received[-1]
    assert seen.header(b"x-fastgw-identity") == b"mtls"
    assert seen.header(b"x-fastgw-subject")  # the certificate's name, as the upstream sees it
    r = await call_as("other.svc.test")
    assert r.status == 403 and "services:no rule matched" in r.json()["detail"]
    assert len(up.received) == 1

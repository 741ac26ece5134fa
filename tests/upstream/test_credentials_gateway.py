"""Upstream credentials through a real gateway: a real client -> the gateway -> a real
upstream that checks what it got, with the token sources played by local servers
(a fake metadata server minting RS256 ID tokens, files for keys and bearer tokens, a
shared credentials file for SigV4). Real clock and sockets on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path

import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import generate_latest

from fastgw.config.model import CredentialConfig, IdentityConfig, RouteConfig
from fastgw.metrics import make_registry
from fastgw.upstream.sigv4 import payload_sha256, sign
from tests.e2e.helpers import Client, Received, Responder, Upstream, make_config
from tests.upstream.gateway_support import CheckingUpstream, TokenMint, running


def google(metadata_url: str, **kw: object) -> CredentialConfig:
    return CredentialConfig(type="google_id_token", metadata_url=metadata_url, **kw)  # type: ignore[arg-type]


async def test_google_id_token_moves_the_callers_authorization(
    nursery: trio.Nursery, rsa_key: rsa.RSAPrivateKey
) -> None:
    mint = TokenMint(rsa_key)
    meta = await mint.start(nursery)
    up = CheckingUpstream(rsa_key)
    origin = await up.start(nursery)
    config = make_config([origin], backend_kw={"credential": google(meta)})
    async with running(config) as (_gw, port):
        c = await Client.open(port)
        for _ in range(3):
            r = await c.request(
                b"GET",
                b"/x",
                [
                    (b"Authorization", b"Bearer caller-token"),
                    (b"X-Forwarded-Authorization", b"Bearer forged"),
                ],
            )
            assert r.status == 200, r.body
        await c.aclose()
    assert up.seen.ok == 3 and up.seen.expired == 0 and up.seen.bad == 0
    last = up.seen.last
    assert last is not None
    # The caller's Authorization moved aside; its forged copy never reached the function.
    assert last.header_all(b"x-forwarded-authorization") == [b"Bearer caller-token"]
    assert len(last.header_all(b"authorization")) == 1
    assert mint.count(origin) == 1  # one fetch, then the cache


async def test_google_id_token_in_x_serverless_authorization(
    nursery: trio.Nursery, rsa_key: rsa.RSAPrivateKey
) -> None:
    mint = TokenMint(rsa_key)
    meta = await mint.start(nursery)
    up = CheckingUpstream(rsa_key, b"x-serverless-authorization")
    origin = await up.start(nursery)
    config = make_config(
        [origin], backend_kw={"credential": google(meta, header="x-serverless-authorization")}
    )
    async with running(config) as (_gw, port):
        c = await Client.open(port)
        r = await c.request(
            b"GET",
            b"/x",
            [
                (b"Authorization", b"Bearer caller-token"),
                (b"X-Serverless-Authorization", b"Bearer forged"),
            ],
        )
        assert r.status == 200, r.body
        await c.aclose()
    last = up.seen.last
    assert last is not None
    assert up.seen.ok == 1
    assert len(last.header_all(b"x-serverless-authorization")) == 1
    # The caller's own Authorization passes untouched in this mode.
    assert last.header_all(b"authorization") == [b"Bearer caller-token"]
    assert last.header(b"x-forwarded-authorization") is None


async def test_two_endpoints_get_tokens_for_their_own_audience(
    nursery: trio.Nursery, rsa_key: rsa.RSAPrivateKey
) -> None:
    mint = TokenMint(rsa_key)
    meta = await mint.start(nursery)
    a, b = CheckingUpstream(rsa_key), CheckingUpstream(rsa_key)
    oa, ob = await a.start(nursery), await b.start(nursery)
    config = make_config(
        [oa, ob], backend_kw={"credential": google(meta), "balance": "round_robin"}
    )
    async with running(config) as (_gw, port):
        c = await Client.open(port)
        for _ in range(6):
            assert (await c.request(b"GET", b"/")).status == 200
        await c.aclose()
    # Each upstream verified its audience: a token for the other one would count as bad.
    assert (a.seen.ok, b.seen.ok, a.seen.bad, b.seen.bad) == (3, 3, 0, 0)
    assert mint.count(oa) == 1 and mint.count(ob) == 1


async def test_no_credential_answers_503_and_sends_nothing(
    nursery: trio.Nursery, rsa_key: rsa.RSAPrivateKey
) -> None:
    mint = TokenMint(rsa_key)
    mint.fail = True
    meta = await mint.start(nursery)
    up = CheckingUpstream(rsa_key)
    origin = await up.start(nursery)
    config = make_config(
        [origin], backend_kw={"credential": google(meta), "connect_timeout_s": 0.5}
    )
    async with running(config) as (gw, port):
        c = await Client.open(port)
        # Cold start: waits for the first fetch (up to the connect timeout), then 503.
        r = await c.request(b"GET", b"/")
        assert r.status == 503
        assert r.json()["error"] == "upstream_credential_unavailable"
        # The connection stays usable; the next request is refused without waiting
        # (the token source has answered, and failed).
        with trio.fail_after(0.4):
            r = await c.request(b"GET", b"/")
        assert r.status == 503
        ready, why = gw.readiness()
        assert not ready and why == [f"backend fn: upstream credential for {origin} not available"]
        # The source recovers: the cache's retry (backoff from 1 s) installs a token.
        mint.fail = False
        with trio.fail_after(5):
            while (r := await c.request(b"GET", b"/")).status != 200:
                await trio.sleep(0.1)
        await c.aclose()
        assert gw.errors["upstream_credential_unavailable"] >= 2
        assert gw.readiness() == (True, [])
        text = generate_latest(make_registry(gw)).decode()
        assert 'fastgw_upstream_credential_available{backend="fn"} 1.0' in text
        counts = {
            m[1]: int(m[2])
            for m in re.finditer(
                r'fastgw_upstream_credential_refreshes_total\{backend="fn",result="(\w+)",'
                r'type="google_id_token"\} (\d+)',
                text,
            )
        }
        assert counts["ok"] == 1 and counts["failed"] >= 1
    assert up.upstream.received and up.seen.missing == 0 and up.seen.ok >= 1


async def test_reload_keeps_unchanged_credentials(
    nursery: trio.Nursery, rsa_key: rsa.RSAPrivateKey
) -> None:
    mint = TokenMint(rsa_key)
    meta = await mint.start(nursery)
    up = CheckingUpstream(rsa_key)
    origin = await up.start(nursery)
    config = make_config([origin], backend_kw={"credential": google(meta)})
    async with running(config) as (gw, port):
        c = await Client.open(port)
        assert (await c.request(b"GET", b"/")).status == 200
        # Another route and a changed backend timeout: the credential key is the same.
        bcfg = dataclasses.replace(config.backends["fn"], total_timeout_s=100.0)
        gw.reload(
            dataclasses.replace(
                config,
                backends={"fn": bcfg},
                routes=(*config.routes, RouteConfig(name="other", backend="fn", path="/o")),
            )
        )
        assert (await c.request(b"GET", b"/")).status == 200
        assert mint.count(origin) == 1  # kept: no refetch
        (cache,) = gw.credentials.caches().values()
        # A new audience: a new cache fetches, the old one is stopped and forgotten.
        bcfg2 = dataclasses.replace(bcfg, credential=google(meta, audience=origin + "/aud2"))
        gw.reload(dataclasses.replace(config, backends={"fn": bcfg2}))
        r = await c.request(b"GET", b"/")
        assert r.status == 403  # the upstream refuses a token for another audience
        assert mint.count(origin + "/aud2") == 1
        (cache2,) = gw.credentials.caches().values()
        assert cache2 is not cache
        await c.aclose()


async def test_azure_function_key_from_file_and_env(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Upstream()
    port_up = await nursery.start(up.serve)
    key_file = tmp_path / "fn.key"
    key_file.write_text("key-from-file\n")
    monkeypatch.setenv("FASTGW_TEST_FN_KEY", "key-from-env")
    azure = "azure_function_key"
    for cred, want in (
        (CredentialConfig(type=azure, key_file=str(key_file)), b"key-from-file"),
        (CredentialConfig(type=azure, key_env="FASTGW_TEST_FN_KEY"), b"key-from-env"),
    ):
        config = make_config([f"http://127.0.0.1:{port_up}"], backend_kw={"credential": cred})
        async with running(config) as (_gw, port):
            c = await Client.open(port)
            r = await c.request(
                b"GET", b"/", [(b"x-functions-key", b"forged"), (b"Authorization", b"Bearer me")]
            )
            assert r.status == 200
            await c.aclose()
        last = up.received[-1]
        assert last.header_all(b"x-functions-key") == [want]
        assert last.header_all(b"authorization") == [b"Bearer me"]


async def test_bearer_file_is_reread_when_it_changes(nursery: trio.Nursery, tmp_path: Path) -> None:
    up = Upstream()
    port_up = await nursery.start(up.serve)
    token = tmp_path / "token"
    token.write_text("first-token\n")
    config = make_config(
        [f"http://127.0.0.1:{port_up}"],
        backend_kw={"credential": CredentialConfig(type="bearer_file", path=str(token))},
    )
    async with running(config) as (_gw, port):
        c = await Client.open(port)
        assert (await c.request(b"GET", b"/", [(b"Authorization", b"Bearer me")])).status == 200
        assert up.received[-1].header(b"authorization") == b"Bearer first-token"
        assert up.received[-1].header(b"x-forwarded-authorization") == b"Bearer me"
        # An atomic replace, as Kubernetes does it.
        (tmp_path / "token.new").write_text("second-token\n")
        os.replace(tmp_path / "token.new", token)
        # The file is looked at once a second: the new token within about a second.
        with trio.fail_after(5):
            while up.received[-1].header(b"authorization") != b"Bearer second-token":
                await trio.sleep(0.1)
                assert (await c.request(b"GET", b"/")).status == 200
        await c.aclose()


# --- SigV4 ------------------------------------------------------------------------

ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


class SigV4Checker:
    """An upstream that recomputes each request's signature with the general
    ``sigv4.sign`` (checked against AWS's test suite) from what it received, and the
    payload hash from the body it received."""

    def __init__(self) -> None:
        self.upstream = Upstream(self._handle)
        self.good = 0
        self.bad: list[str] = []
        self.last: Received | None = None

    async def _handle(self, req: Received, r: Responder) -> None:
        self.last = req
        authz = (req.header(b"authorization") or b"").decode()
        fields = dict(
            p.strip().split("=", 1) for p in authz.removeprefix("AWS4-HMAC-SHA256 ").split(",")
        )
        signed = fields["SignedHeaders"].split(";")
        scope = fields["Credential"].split("/")
        headers = [(n.encode(), req.header(n.encode()) or b"") for n in signed]
        want = sign(
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            region=scope[2],
            service=scope[3],
            amz_date=req.header(b"x-amz-date") or b"",
            method=req.method,
            target=req.target,
            headers=headers,
            payload_hash=payload_sha256(req.body),
        )
        ok = (
            scope[0] == ACCESS_KEY
            and scope[2:4] == ["eu-west-1", "lambda"]
            and fields["Signature"] == want.signature.decode()
            and req.header(b"x-amz-content-sha256") == payload_sha256(req.body)
            and "host" in signed
        )
        if ok:
            self.good += 1
        else:
            self.bad.append(authz)
        await r.respond(200 if ok else 403, hashlib.sha256(req.body).hexdigest().encode())


@pytest.fixture
def aws_file(tmp_path: Path) -> Path:
    p = tmp_path / "credentials"
    p.write_text(f"[gw]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    return p


async def test_sigv4_signs_every_request_with_its_body_hash(
    nursery: trio.Nursery, aws_file: Path
) -> None:
    checker = SigV4Checker()
    a = await nursery.start(checker.upstream.serve)
    b = await nursery.start(Upstream(checker._handle).serve)
    cred = CredentialConfig(
        type="aws_sigv4",
        source="shared_file",
        credentials_file=str(aws_file),
        profile="gw",
        region="eu-west-1",
    )
    config = make_config(
        [f"http://127.0.0.1:{a}/base", f"http://127.0.0.1:{b}"],
        backend_kw={"credential": cred, "balance": "round_robin"},
    )
    async with running(config) as (_gw, port):
        c = await Client.open(port)
        assert (await c.request(b"GET", b"/p/a%20b%2F/../c?z=1&a=%41&a=0")).status == 200
        assert (await c.request(b"GET", b"/p?x=1", [(b"X-Amz-Date", b"forged")])).status == 200
        body = os.urandom(200_000)  # larger than one read: buffered whole, then hashed
        r = await c.request(b"POST", b"/post", [(b"Authorization", b"Bearer me")], body)
        assert r.status == 200 and r.body == hashlib.sha256(body).hexdigest().encode()
        assert checker.last is not None
        assert checker.last.header(b"x-forwarded-authorization") == b"Bearer me"
        # A chunked body: the hash is of the payload, without the chunk framing.
        await c.send_raw(
            b"PUT /chunked HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        r = await c.read_response(b"PUT")
        assert r.status == 200 and r.body == hashlib.sha256(b"hello world").hexdigest().encode()
        # Lambda's synchronous payload limit: a bigger signed body is refused up front.
        await c.send_raw(
            b"POST /big HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\n\r\n" % (7 << 20)
        )
        r = await c.read_response(b"POST")
        assert r.status == 413
        await c.aclose()
    assert checker.bad == [] and checker.good == 4


async def test_sigv4_region_from_the_lambda_url_host() -> None:
    from fastgw.gateway import GatewayState

    config = make_config(
        ["https://abcdefghijklmnopqrstuvwxyz012345.lambda-url.ap-south-1.on.aws"],
        backend_kw={"credential": CredentialConfig(type="aws_sigv4", source="env")},
    )
    state = GatewayState(config)
    (binding,) = state.credentials.values()
    assert binding.signer.region == "ap-south-1" and binding.signer.service == "lambda"


async def test_a_reload_adds_the_first_credential(
    nursery: trio.Nursery, rsa_key: rsa.RSAPrivateKey
) -> None:
    mint = TokenMint(rsa_key)
    meta = await mint.start(nursery)
    up = CheckingUpstream(rsa_key)
    origin = await up.start(nursery)
    plain = make_config([origin])
    async with running(plain) as (gw, port):
        assert gw.credentials is None  # nothing loaded without a credential
        c = await Client.open(port)
        assert (await c.request(b"GET", b"/")).status == 401  # the upstream wants a token
        gw.reload(make_config([origin], backend_kw={"credential": google(meta)}))
        assert (await c.request(b"GET", b"/")).status == 200
        await c.aclose()
    assert mint.count(origin) == 1


async def test_identity_move_and_a_credential_send_one_forwarded_authorization(
    nursery: trio.Nursery, rsa_key: rsa.RSAPrivateKey
) -> None:
    mint = TokenMint(rsa_key)
    meta = await mint.start(nursery)
    up = CheckingUpstream(rsa_key)
    origin = await up.start(nursery)
    config = make_config(
        [origin],
        backend_kw={"credential": google(meta)},
        identity=IdentityConfig(authorization="move"),
    )
    async with running(config) as (_gw, port):
        c = await Client.open(port)
        r = await c.request(
            b"GET",
            b"/",
            [(b"Authorization", b"Bearer me"), (b"X-Forwarded-Authorization", b"Bearer forged")],
        )
        assert r.status == 200
        await c.aclose()
    last = up.seen.last
    assert last is not None
    assert last.header_all(b"x-forwarded-authorization") == [b"Bearer me"]
    assert len(last.header_all(b"authorization")) == 1 and up.seen.ok == 1


async def test_a_retry_to_another_endpoint_carries_that_endpoints_credential(
    nursery: trio.Nursery, rsa_key: rsa.RSAPrivateKey, aws_file: Path
) -> None:
    """An idempotent request that got nothing back from the first endpoint is sent to
    the second with the head rebuilt for it: its own ID token (audience) or signature
    (Host)."""

    hung_up = []

    async def hang_up(stream: trio.SocketStream) -> None:
        hung_up.append(await stream.receive_some(65536))  # the head; then nothing back
        await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    dead = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    nursery.start_soon(trio.serve_listeners, hang_up, listeners)

    mint = TokenMint(rsa_key)
    meta = await mint.start(nursery)
    good = CheckingUpstream(rsa_key)
    origin = await good.start(nursery)
    config = make_config(
        [dead, origin], backend_kw={"credential": google(meta), "balance": "round_robin"}
    )
    async with running(config) as (_gw, port):
        c = await Client.open(port)
        assert (await c.request(b"GET", b"/")).status == 200
        await c.aclose()
    assert good.seen.ok == 1 and good.seen.bad == 0  # a token for its own audience
    # The first endpoint was tried, with a token for its own audience.
    (first_head,) = hung_up
    line = next(x for x in first_head.split(b"\r\n") if x.lower().startswith(b"authorization:"))
    claims = jwt.decode(line.split()[-1], options={"verify_signature": False})
    assert claims["aud"] == dead

    checker = SigV4Checker()
    b = await nursery.start(checker.upstream.serve)
    cred = CredentialConfig(
        type="aws_sigv4",
        source="shared_file",
        credentials_file=str(aws_file),
        profile="gw",
        region="eu-west-1",
    )
    config = make_config(
        [dead, f"http://127.0.0.1:{b}"],
        backend_kw={"credential": cred, "balance": "round_robin"},
    )
    async with running(config) as (_gw, port):
        c = await Client.open(port)
        assert (await c.request(b"GET", b"/x?y=1")).status == 200
        await c.aclose()
    assert checker.good == 1 and checker.bad == [] and len(hung_up) == 2
    assert checker.last is not None and checker.last.header(b"host") == f"127.0.0.1:{b}".encode()

"""Google ID tokens against a local fake metadata server and a local fake token endpoint
(real HTTP on 127.0.0.1, h11 on both sides), on trio's autojump MockClock; and how the
token reaches the function through the core serializer."""

from __future__ import annotations

import json
import math
import random
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from trio.testing import MockClock

from fastgw._core.http import StripSet, build_request_head, parse_request_head
from fastgw.upstream.credentials import (
    CredentialCache,
    CredentialError,
    RefreshPolicy,
    TokenCredential,
    google_header,
)
from fastgw.upstream.google import (
    JWT_BEARER_GRANT,
    GoogleMetadataSource,
    GoogleServiceAccountSource,
    default_metadata_url,
)
from tests.upstream.support import WALL0, FakeServer, Reply, Request, mint_id_token, wall

FN = "https://fn-abc123-uc.a.run.app"
FN2 = "https://europe-west1-proj.cloudfunctions.net/other"
IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"
CLIENT_EMAIL = "gateway@proj.iam.gserviceaccount.com"
KEY_ID = "0123456789abcdef"


class FakeMetadata:
    """The identity endpoint of a GCE metadata server."""

    def __init__(self) -> None:
        self.lifetime_s = 3600
        self.iat_offset_s = 0.0  # the server hands out a token issued this long ago
        self.status = 200
        self.audience_override: str | None = None
        self.delay_s = 0.0
        self.issued: dict[str, int] = {}
        self.exp_of: dict[str, int] = {}

    async def __call__(self, req: Request) -> Reply:
        if self.delay_s:
            await trio.sleep(self.delay_s)
        if req.headers.get("metadata-flavor") != "Google":
            return Reply(403, b"Missing Metadata-Flavor:Google header")
        if req.path != IDENTITY_PATH:
            return Reply(404, b"not found")
        if self.status != 200:
            return Reply(self.status, b"unavailable")
        (aud,) = parse_qs(req.query)["audience"]
        self.issued[aud] = self.issued.get(aud, 0) + 1
        token = mint_id_token(
            self.audience_override or aud, self.lifetime_s, iat=wall() - self.iat_offset_s
        )
        self.exp_of[token] = jwt.decode(token, options={"verify_signature": False})["exp"]
        return Reply(200, token.encode(), [("Metadata-Flavor", "Google")])


@pytest.fixture
async def metadata(nursery: trio.Nursery) -> tuple[FakeMetadata, FakeServer]:
    fake = FakeMetadata()
    server = await FakeServer(fake).start(nursery)
    return fake, server


def md_source(server: FakeServer, audience: str = FN, **kw: Any) -> GoogleMetadataSource:
    return GoogleMetadataSource(audience, metadata_url=server.base_url, wall=wall, **kw)


# --- metadata server -----------------------------------------------------------------


async def test_metadata_request_and_token(
    autojump_clock: MockClock, metadata: tuple[FakeMetadata, FakeServer]
) -> None:
    _fake, server = metadata
    cred = await md_source(server).refresh(trio.current_time())
    (req,) = server.requests
    assert req.method == "GET"
    assert req.target == IDENTITY_PATH + "?audience=https%3A%2F%2Ffn-abc123-uc.a.run.app"
    assert req.headers["metadata-flavor"] == "Google"
    assert cred.token.count(".") == 2
    assert jwt.decode(cred.token, options={"verify_signature": False})["aud"] == FN
    assert cred.expires_at - cred.obtained_at == pytest.approx(3600, abs=1)


async def test_other_service_account_is_named_in_the_path(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    seen: list[str] = []

    async def handler(req: Request) -> Reply:
        seen.append(req.path)
        return Reply(200, mint_id_token(FN, 3600).encode())

    server = await FakeServer(handler).start(nursery)
    src = md_source(server, service_account="invoker@proj.iam.gserviceaccount.com")
    await src.refresh(trio.current_time())
    assert seen == [
        "/computeMetadata/v1/instance/service-accounts/"
        "invoker@proj.iam.gserviceaccount.com/identity"
    ]


async def test_metadata_token_for_another_audience_is_refused(
    autojump_clock: MockClock, nursery: trio.Nursery, metadata: tuple[FakeMetadata, FakeServer]
) -> None:
    fake, server = metadata
    fake.audience_override = "https://someone-else.example"
    with pytest.raises(CredentialError, match="another audience"):
        await md_source(server).refresh(trio.current_time())
    cache = CredentialCache(md_source(server), FN)
    await nursery.start(cache.run)
    await trio.sleep(5)
    assert cache.current(trio.current_time()) is None
    assert cache.refreshes_failed >= 1 and cache.refreshes_ok == 0


async def test_metadata_errors_are_readable(
    autojump_clock: MockClock, metadata: tuple[FakeMetadata, FakeServer]
) -> None:
    fake, server = metadata
    fake.status = 503
    with pytest.raises(CredentialError, match="metadata server answered 503"):
        await md_source(server).refresh(trio.current_time())
    dead = GoogleMetadataSource(FN, metadata_url=f"http://127.0.0.1:{_dead_port()}")
    with pytest.raises(CredentialError, match="metadata server: connection failed"):
        await dead.refresh(trio.current_time())


def _dead_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


async def test_plain_http_only_to_the_metadata_host_or_loopback() -> None:
    src = GoogleMetadataSource(FN, metadata_url="http://metadata.example.com")
    with pytest.raises(CredentialError, match="must be https"):
        await src.refresh(0.0)


def test_default_metadata_url_honours_gce_metadata_host() -> None:
    assert default_metadata_url({}) == "http://metadata.google.internal"
    assert default_metadata_url({"GCE_METADATA_HOST": "127.0.0.1:8080"}) == "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("iat_offset_s", "clock_skew_s", "expected_s"),
    [
        (0, 0, 3600),  # fresh token, clocks agree
        (3000, 0, 600),  # the server handed out a cached token with 10 min left
        (0, 1000, 2600),  # our clock runs 1000 s fast: trust it (earlier is safe)
        (0, -1000, 3600),  # our clock runs 1000 s slow: exp - iat caps the lifetime
    ],
)
async def test_expiry_is_the_safer_of_wall_clock_and_iat(
    autojump_clock: MockClock,
    metadata: tuple[FakeMetadata, FakeServer],
    iat_offset_s: float,
    clock_skew_s: float,
    expected_s: float,
) -> None:
    fake, server = metadata
    fake.iat_offset_s = iat_offset_s
    src = GoogleMetadataSource(FN, metadata_url=server.base_url, wall=lambda: wall() + clock_skew_s)
    now = trio.current_time()
    cred = await src.refresh(now)
    assert cred.expires_at - now == pytest.approx(expected_s, abs=1)


async def test_ten_second_tokens_under_load_never_expired_one_fetch_per_refresh(
    autojump_clock: MockClock, nursery: trio.Nursery, metadata: tuple[FakeMetadata, FakeServer]
) -> None:
    """The issue's "must show": tokens that live 10 s, sustained load on two audiences.
    No request carries an expired token (checked against the token's own exp claim and
    the shared wall clock), and the metadata server sees one fetch per audience per
    refresh, never two at once."""
    fake, server = metadata
    fake.lifetime_s = 10
    fake.delay_s = 0.05
    caches = {
        aud: CredentialCache(md_source(server, aud), aud, RefreshPolicy(), rng=random.Random(i))
        for i, aud in enumerate((FN, FN2))
    }
    for cache in caches.values():
        await nursery.start(cache.run)
        await cache.wait_current()
    rng = random.Random(3)
    sent = 0
    in_flight_peak: dict[str, int] = dict.fromkeys(caches, 0)

    async def load(aud: str) -> None:
        nonlocal sent
        cache = caches[aud]
        while trio.current_time() < 120.0:
            cred = cache.current(trio.current_time())
            assert cred is not None, "503 under steady load"
            assert fake.exp_of[cred.token] > wall(), "an expired token would have been sent"
            assert jwt.decode(cred.token, options={"verify_signature": False})["aud"] == aud
            sent += 1
            in_flight_peak[aud] = max(in_flight_peak[aud], server.in_flight)
            await trio.sleep(rng.uniform(0.001, 0.2))

    async with trio.open_nursery() as n:
        for aud in caches:
            for _ in range(5):
                n.start_soon(load, aud)
    assert sent > 10_000
    for aud, cache in caches.items():
        # Refreshes land at 70-75 % of the ~10 s lifetime: 16-18 in 120 s, plus the first.
        assert 120 / 7.5 <= fake.issued[aud] <= 120 / 7.0 + 2, fake.issued
        assert fake.issued[aud] == cache.refreshes_ok
        assert cache.refreshes_failed == 0
    assert server.max_in_flight <= 2  # at most one per audience at any moment


# --- service-account key file ----------------------------------------------------------


def write_key_file(tmp_path: Path, key: rsa.RSAPrivateKey, token_uri: str, **extra: Any) -> str:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "proj",
        "private_key_id": KEY_ID,
        "private_key": pem,
        "client_email": CLIENT_EMAIL,
        "client_id": "1234",
        "token_uri": token_uri,
        **extra,
    }
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(info))
    return str(path)


class FakeTokenEndpoint:
    """Google's OAuth token endpoint for the jwt-bearer grant, checking the assertion
    with the service account's public key."""

    def __init__(self, public_key: Any) -> None:
        self.public_key = public_key
        self.url = ""
        self.assertions: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.forms: list[dict[str, list[str]]] = []
        self.content_types: list[str] = []
        self.error: tuple[int, dict[str, str]] | None = None

    async def __call__(self, req: Request) -> Reply:
        if req.method != "POST" or req.path != "/token":
            return Reply(404)
        self.content_types.append(req.headers.get("content-type", ""))
        form = parse_qs(req.body.decode())
        self.forms.append(form)
        if self.error is not None:
            status, doc = self.error
            return Reply(status, json.dumps(doc).encode(), [("Content-Type", "application/json")])
        (assertion,) = form["assertion"]
        # Signature and audience checked by PyJWT; times against the shared mock wall
        # clock (PyJWT would compare them with the real one).
        claims = jwt.decode(
            assertion,
            self.public_key,
            algorithms=["RS256"],
            audience=self.url,
            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
        )
        if not claims["iat"] <= wall() < claims["exp"]:
            return Reply(400, b'{"error": "invalid_grant"}')
        self.assertions.append((jwt.get_unverified_header(assertion), claims))
        token = mint_id_token(claims["target_audience"], 3600)
        return Reply(200, json.dumps({"id_token": token}).encode())


@pytest.fixture
async def token_endpoint(
    nursery: trio.Nursery, rsa_key: rsa.RSAPrivateKey
) -> tuple[FakeTokenEndpoint, FakeServer]:
    fake = FakeTokenEndpoint(rsa_key.public_key())
    server = await FakeServer(fake).start(nursery)
    fake.url = server.base_url + "/token"
    return fake, server


async def test_service_account_assertion_and_exchange(
    autojump_clock: MockClock,
    token_endpoint: tuple[FakeTokenEndpoint, FakeServer],
    rsa_key: rsa.RSAPrivateKey,
    tmp_path: Path,
) -> None:
    fake, _server = token_endpoint
    await trio.sleep(42.0)
    key_file = write_key_file(tmp_path, rsa_key, fake.url)
    src = GoogleServiceAccountSource(key_file, FN, wall=wall)
    now = trio.current_time()
    cred = await src.refresh(now)

    assert fake.content_types == ["application/x-www-form-urlencoded"]
    (form,) = fake.forms
    assert form["grant_type"] == [JWT_BEARER_GRANT]
    ((header, claims),) = fake.assertions
    assert header["alg"] == "RS256" and header["kid"] == KEY_ID and header["typ"] == "JWT"
    assert claims == {
        "iss": CLIENT_EMAIL,
        "sub": CLIENT_EMAIL,
        "aud": fake.url,
        "target_audience": FN,
        "iat": int(WALL0 + 42),
        "exp": int(WALL0 + 42) + 3600,
    }
    assert jwt.decode(cred.token, options={"verify_signature": False})["aud"] == FN
    assert cred.expires_at - now == pytest.approx(3600, abs=1)


async def test_service_account_token_url_override(
    autojump_clock: MockClock,
    token_endpoint: tuple[FakeTokenEndpoint, FakeServer],
    rsa_key: rsa.RSAPrivateKey,
    tmp_path: Path,
) -> None:
    fake, _server = token_endpoint
    key_file = write_key_file(tmp_path, rsa_key, "https://oauth2.googleapis.com/token")
    src = GoogleServiceAccountSource(key_file, FN, token_url=fake.url, wall=wall)
    await src.refresh(trio.current_time())
    # The assertion names the endpoint it is sent to (the fake checks aud=its own URL).
    assert fake.assertions[0][1]["aud"] == fake.url


async def test_service_account_refresh_through_the_cache(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    token_endpoint: tuple[FakeTokenEndpoint, FakeServer],
    rsa_key: rsa.RSAPrivateKey,
    tmp_path: Path,
) -> None:
    fake, _server = token_endpoint
    src = GoogleServiceAccountSource(write_key_file(tmp_path, rsa_key, fake.url), FN, wall=wall)
    cache = CredentialCache(src, FN, RefreshPolicy(jitter_fraction=0.0))
    await nursery.start(cache.run)
    first = await cache.wait_current()
    await trio.sleep(2699.0)
    assert cache.current(trio.current_time()) is first
    await trio.sleep(2.0)  # past 75 % of 3600 s
    second = cache.current(trio.current_time())
    assert second is not None and second is not first
    assert len(fake.assertions) == 2
    assert fake.assertions[1][1]["iat"] == pytest.approx(WALL0 + 2700, abs=1)


async def test_token_endpoint_error_is_reported_without_secrets(
    autojump_clock: MockClock,
    token_endpoint: tuple[FakeTokenEndpoint, FakeServer],
    rsa_key: rsa.RSAPrivateKey,
    tmp_path: Path,
) -> None:
    fake, _server = token_endpoint
    fake.error = (400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
    src = GoogleServiceAccountSource(write_key_file(tmp_path, rsa_key, fake.url), FN, wall=wall)
    with pytest.raises(CredentialError) as info:
        await src.refresh(trio.current_time())
    msg = str(info.value)
    assert msg == "token endpoint answered 400: invalid_grant - Invalid JWT Signature."
    assert "PRIVATE KEY" not in msg and "assertion" not in msg


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "No such file"),
        ("{", "not JSON"),
        ('{"type": "authorized_user"}', "not a service-account key file"),
        ('{"type": "service_account", "private_key": "x"}', "no client_email"),
        (
            '{"type": "service_account", "client_email": "a@b", "private_key": "not a key"}',
            "cannot sign with the key file's private_key",
        ),
    ],
)
async def test_bad_key_files(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "sa.json"
    if content is not None:
        path.write_text(content)
    src = GoogleServiceAccountSource(str(path), FN, token_url="http://127.0.0.1:9/token")
    with pytest.raises(CredentialError, match=match):
        await src.refresh(0.0)


async def test_token_endpoint_over_verified_tls(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    rsa_key: rsa.RSAPrivateKey,
    server_ssl: ssl.SSLContext,
    client_ssl: ssl.SSLContext,
    tmp_path: Path,
) -> None:
    fake = FakeTokenEndpoint(rsa_key.public_key())
    server = await FakeServer(fake, ssl_context=server_ssl).start(nursery)
    fake.url = server.base_url + "/token"
    assert fake.url.startswith("https://")
    key_file = write_key_file(tmp_path, rsa_key, fake.url)
    good = GoogleServiceAccountSource(key_file, FN, ssl_context=client_ssl, wall=wall)
    cred = await good.refresh(trio.current_time())
    assert isinstance(cred, TokenCredential)
    # The system roots do not know the test CA: refused, nothing sent.
    untrusted = GoogleServiceAccountSource(key_file, FN, wall=wall)
    with pytest.raises(CredentialError, match="TLS: certificate verify failed"):
        await untrusted.refresh(trio.current_time())
    assert len(fake.assertions) == 1


# --- rendering through the core serializer ------------------------------------------------

CLIENT_REQUEST = (
    b"POST /orders?id=7 HTTP/1.1\r\n"
    b"Host: api.example\r\n"
    b"Authorization: Bearer caller-token\r\n"
    b"X-Forwarded-Authorization: forged\r\n"
    b"X-Serverless-Authorization: forged-too\r\n"
    b"Content-Length: 2\r\n"
    b"\r\n"
)


def upstream_fields(extra: bytes, strip_names: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    head = parse_request_head(CLIENT_REQUEST)
    assert head is not None
    out = build_request_head(
        head, host=b"fn-abc123-uc.a.run.app", extra=extra, strip=StripSet(names=strip_names)
    )
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(out)
    ev = conn.next_event()
    assert isinstance(ev, h11.Request)
    return list(ev.headers)


def field_values(fields: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in fields if k == name]


def test_id_token_in_authorization_moves_the_callers_aside() -> None:
    cred = TokenCredential(obtained_at=0.0, expires_at=math.inf, token="id.tok.en")
    hdr = google_header("authorization")
    assert hdr.forwards
    assert hdr.strip_names == (b"authorization", b"x-forwarded-authorization")
    extra = hdr.render(cred, b"Bearer caller-token")
    assert extra == (
        b"Authorization: Bearer id.tok.en\r\nX-Forwarded-Authorization: Bearer caller-token\r\n"
    )
    fields = upstream_fields(extra, hdr.strip_names)
    assert field_values(fields, b"authorization") == [b"Bearer id.tok.en"]
    assert field_values(fields, b"x-forwarded-authorization") == [b"Bearer caller-token"]
    # Without a caller credential, no forward field at all (the forged one is stripped).
    fields = upstream_fields(hdr.render(cred, None), hdr.strip_names)
    assert field_values(fields, b"x-forwarded-authorization") == []


def test_id_token_in_x_serverless_authorization_leaves_the_callers_alone() -> None:
    cred = TokenCredential(obtained_at=0.0, expires_at=math.inf, token="id.tok.en")
    hdr = google_header("x-serverless-authorization")
    assert not hdr.forwards
    assert hdr.strip_names == (b"x-serverless-authorization",)
    fields = upstream_fields(hdr.render(cred), hdr.strip_names)
    assert field_values(fields, b"x-serverless-authorization") == [b"Bearer id.tok.en"]
    assert field_values(fields, b"authorization") == [b"Bearer caller-token"]


def test_render_memoises_per_credential() -> None:
    hdr = google_header()
    a = TokenCredential(obtained_at=0.0, expires_at=math.inf, token="aaa")
    b = TokenCredential(obtained_at=1.0, expires_at=math.inf, token="bbb")
    first = hdr.render(a)
    assert hdr.render(a) is first  # same object: built once per credential
    assert hdr.render(b) == b"Authorization: Bearer bbb\r\n"
    with pytest.raises(ValueError):
        google_header("cookie")


def test_metadata_url_quotes_the_audience() -> None:
    src = GoogleMetadataSource(
        "https://fn.example/path?x=1&y=2", metadata_url="http://127.0.0.1:1/"
    )
    q = urlsplit(src.url).query
    assert parse_qs(q) == {"audience": ["https://fn.example/path?x=1&y=2"]}

"""AWS credential sources: environment, shared credentials file, the container
credential endpoint and IMDSv2 (the last two against local fake servers), on trio's
autojump MockClock."""

from __future__ import annotations

import json
import math
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from fastgw.upstream.aws import (
    AwsContainerSource,
    AwsEnvironmentSource,
    AwsInstanceMetadataSource,
    AwsSharedFileSource,
    container_url_from_env,
    default_aws_source,
    parse_expiration,
)
from fastgw.upstream.credentials import CredentialCache, CredentialError, RefreshPolicy
from fastgw.upstream.sigv4 import AwsCredential, SigV4Signer
from tests.upstream.support import FakeServer, Reply, Request, wall


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeCredentialEndpoint:
    """ECS/EKS container endpoint and IMDSv2 in one: hands out numbered session
    credentials living ``lifetime_s``."""

    def __init__(self) -> None:
        self.lifetime_s = 3600
        self.issued = 0
        self.expect_authorization: str | None = None
        self.imds_token = "imds-session-token"
        self.role = "gateway-role"

    def document(self) -> bytes:
        self.issued += 1
        return json.dumps(
            {
                "Code": "Success",
                "Type": "AWS-HMAC",
                "AccessKeyId": f"ASIA{self.issued:016d}",
                "SecretAccessKey": f"secret{self.issued}",
                "Token": f"session{self.issued}",
                "Expiration": iso(wall() + self.lifetime_s),
                "LastUpdated": iso(wall()),
            }
        ).encode()

    async def __call__(self, req: Request) -> Reply:
        if req.path == "/v2/credentials/abc":  # container endpoint
            if self.expect_authorization is not None and (
                req.headers.get("authorization") != self.expect_authorization
            ):
                return Reply(401, b'{"Message": "unauthorized"}')
            return Reply(200, self.document(), [("Content-Type", "application/json")])
        if req.path == "/latest/api/token":
            if req.method != "PUT" or "x-aws-ec2-metadata-token-ttl-seconds" not in req.headers:
                return Reply(400)
            return Reply(200, self.imds_token.encode())
        if req.path.startswith("/latest/meta-data/iam/security-credentials/"):
            if req.headers.get("x-aws-ec2-metadata-token") != self.imds_token:
                return Reply(401)
            if req.path.endswith("/"):
                return Reply(200, (self.role + "\n").encode())
            if req.path.rsplit("/", 1)[1] == self.role:
                return Reply(200, self.document())
        return Reply(404)


@pytest.fixture
async def endpoint(nursery: trio.Nursery) -> tuple[FakeCredentialEndpoint, FakeServer]:
    fake = FakeCredentialEndpoint()
    return fake, await FakeServer(fake).start(nursery)


# --- environment -------------------------------------------------------------------


async def test_environment_credentials() -> None:
    env = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret"}
    cred = await AwsEnvironmentSource(env).refresh(5.0)
    assert (cred.access_key_id, cred.secret_access_key, cred.session_token) == (
        "AKIDEXAMPLE",
        "secret",
        None,
    )
    assert cred.expires_at == math.inf
    env["AWS_SESSION_TOKEN"] = "tok"
    assert (await AwsEnvironmentSource(env).refresh(0.0)).session_token == "tok"
    with pytest.raises(CredentialError, match="AWS_ACCESS_KEY_ID"):
        await AwsEnvironmentSource({}).refresh(0.0)
    with pytest.raises(CredentialError, match="characters not allowed"):
        await AwsEnvironmentSource(
            {"AWS_ACCESS_KEY_ID": "AKID\r\nX-Evil: 1", "AWS_SECRET_ACCESS_KEY": "s"}
        ).refresh(0.0)


def test_credential_repr_hides_the_secret() -> None:
    cred = AwsCredential(
        obtained_at=0.0, expires_at=1.0, access_key_id="AKID", secret_access_key="hunter2"
    )
    assert "hunter2" not in repr(cred) and "AKID" in repr(cred)


# --- shared credentials file ---------------------------------------------------------


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # as tools do: an atomic replace


async def test_shared_file_profile_and_reload_on_change(
    autojump_clock: MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    path = tmp_path / "credentials"
    write(
        path,
        "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = s0\n\n"
        "[gw]\naws_access_key_id = AKIDGW1\naws_secret_access_key = s1\n"
        "aws_session_token = t1\n",
    )
    src = AwsSharedFileSource(str(path), "gw")
    cache = CredentialCache(src, "lambda", RefreshPolicy())
    await nursery.start(cache.run)
    first = await cache.wait_current()
    assert (first.access_key_id, first.secret_access_key, first.session_token) == (
        "AKIDGW1",
        "s1",
        "t1",
    )
    await trio.sleep(10.0)
    assert cache.current(trio.current_time()) is first  # unchanged file: same object
    assert src.watch.stats <= 11  # at most one stat a second
    assert cache.refreshes_ok == 1

    write(path, "[gw]\naws_access_key_id = AKIDGW2\naws_secret_access_key = s2\n")
    await trio.sleep(1.5)
    second = cache.current(trio.current_time())
    assert second is not None and second.access_key_id == "AKIDGW2"
    assert second.session_token is None
    assert cache.refreshes_ok == 2

    # A broken rewrite: the last good keys stay in use (they do not expire).
    write(path, "[other]\n")
    await trio.sleep(3.0)
    assert cache.current(trio.current_time()) is second
    assert "no profile [gw]" in (cache.last_error or "")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[default]\naws_access_key_id = A\n", "has no aws_access_key_id"),
        ("[default]\nrole_arn = arn:aws:iam::1:role/x\nsource_profile = b\n", "not supported"),
        ("not ini", "not an INI file"),
    ],
)
async def test_shared_file_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "credentials"
    path.write_text(text)
    with pytest.raises(CredentialError, match=match):
        await AwsSharedFileSource(str(path)).refresh(0.0)
    with pytest.raises(CredentialError, match="No such file"):
        await AwsSharedFileSource(str(tmp_path / "missing")).refresh(0.0)


# --- container credential endpoint -----------------------------------------------------


async def test_container_endpoint_with_token_file_and_refresh_before_expiration(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    endpoint: tuple[FakeCredentialEndpoint, FakeServer],
    tmp_path: Path,
) -> None:
    fake, server = endpoint
    token_file = tmp_path / "eks-pod-identity-token"
    token_file.write_text("pod-identity-token-1\n")
    fake.expect_authorization = "pod-identity-token-1"
    env = {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": server.base_url + "/v2/credentials/abc",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": str(token_file),
    }
    src = AwsContainerSource(environ=env, wall=wall)
    cache = CredentialCache(src, "lambda", RefreshPolicy(jitter_fraction=0.0))
    await nursery.start(cache.run)
    first = await cache.wait_current()
    assert first.access_key_id == "ASIA0000000000000001"
    assert first.session_token == "session1"
    assert first.lifetime_s == pytest.approx(3600, abs=1)

    # The token file is re-read on every fetch (EKS rotates it).
    token_file.write_text("pod-identity-token-2\n")
    fake.expect_authorization = "pod-identity-token-2"
    await trio.sleep(2699.0)
    assert cache.current(trio.current_time()) is first
    await trio.sleep(2.0)
    second = cache.current(trio.current_time())
    assert second is not None and second.access_key_id == "ASIA0000000000000002"
    assert fake.issued == 2


async def test_container_endpoint_rejecting_us_keeps_the_old_credential(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    endpoint: tuple[FakeCredentialEndpoint, FakeServer],
) -> None:
    fake, server = endpoint
    env = {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": server.base_url + "/v2/credentials/abc",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN": "right",
    }
    fake.expect_authorization = "right"
    cache = CredentialCache(
        AwsContainerSource(environ=env, wall=wall), "lambda", RefreshPolicy(jitter_fraction=0.0)
    )
    await nursery.start(cache.run)
    first = await cache.wait_current()
    fake.expect_authorization = "rotated-elsewhere"
    await trio.sleep(3500.0)
    assert cache.current(trio.current_time()) is first
    assert cache.last_error == "container credential endpoint answered 401"
    await trio.sleep(100.0)  # past Expiration: never handed out
    assert cache.current(trio.current_time()) is None


def test_container_url_from_environment() -> None:
    assert container_url_from_env({}) is None
    assert (
        container_url_from_env({"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/x"})
        == "http://169.254.170.2/v2/credentials/x"
    )
    full = {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/ignored",
    }
    assert container_url_from_env(full) == "http://169.254.170.23/v1/credentials"
    with pytest.raises(ValueError):
        AwsContainerSource(environ={})


async def test_container_full_uri_over_plain_http_only_to_allowed_hosts() -> None:
    src = AwsContainerSource("http://credentials.example.com/creds", environ={})
    with pytest.raises(CredentialError, match="must be https"):
        await src.refresh(0.0)


# --- IMDSv2 ---------------------------------------------------------------------------


async def test_instance_metadata_v2(
    autojump_clock: MockClock, endpoint: tuple[FakeCredentialEndpoint, FakeServer]
) -> None:
    _fake, server = endpoint
    src = AwsInstanceMetadataSource(server.base_url, wall=wall)
    now = trio.current_time()
    cred = await src.refresh(now)
    assert cred.access_key_id == "ASIA0000000000000001"
    assert cred.expires_at - now == pytest.approx(3600, abs=1)
    methods = [(r.method, r.path) for r in server.requests]
    assert methods == [
        ("PUT", "/latest/api/token"),
        ("GET", "/latest/meta-data/iam/security-credentials/"),
        ("GET", "/latest/meta-data/iam/security-credentials/gateway-role"),
    ]
    assert server.requests[0].headers["x-aws-ec2-metadata-token-ttl-seconds"] == "21600"


async def test_instance_without_role(
    autojump_clock: MockClock, endpoint: tuple[FakeCredentialEndpoint, FakeServer]
) -> None:
    fake, server = endpoint
    fake.role = ""
    with pytest.raises(CredentialError, match="no IAM role"):
        await AwsInstanceMetadataSource(server.base_url, wall=wall).refresh(0.0)


# --- choosing a source, parsing -----------------------------------------------------------


def test_default_source_order(tmp_path: Path) -> None:
    keys = {"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "S"}
    container = {"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/credentials/x"}
    creds_file = tmp_path / "credentials"
    missing = str(tmp_path / "none")
    assert isinstance(default_aws_source({**keys, **container}), AwsEnvironmentSource)
    assert isinstance(default_aws_source(container), AwsContainerSource)
    creds_file.write_text("[p]\naws_access_key_id=A\naws_secret_access_key=S\n")
    env: dict[str, Any] = {"AWS_SHARED_CREDENTIALS_FILE": str(creds_file), "AWS_PROFILE": "p"}
    src = default_aws_source(env)
    assert isinstance(src, AwsSharedFileSource) and src.profile == "p"
    assert isinstance(default_aws_source({}, credentials_file=missing), AwsInstanceMetadataSource)


def test_parse_expiration() -> None:
    now_wall = time.time()
    exp = iso(now_wall + 600)
    assert parse_expiration(exp, 100.0, lambda: now_wall) == pytest.approx(700.0, abs=1)
    assert parse_expiration("2030-01-01T00:00:00+00:00", 0.0, lambda: 0.0) > 0
    for bad in (None, 17, "tomorrow", "2030-01-01T00:00:00"):
        with pytest.raises(CredentialError):
            parse_expiration(bad, 0.0, lambda: 0.0)


async def test_refreshed_credentials_are_signed_with_at_once(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    endpoint: tuple[FakeCredentialEndpoint, FakeServer],
) -> None:
    """The signer re-derives its key when the cache hands it a new credential."""
    fake, server = endpoint
    fake.lifetime_s = 100
    env = {"AWS_CONTAINER_CREDENTIALS_FULL_URI": server.base_url + "/v2/credentials/abc"}
    cache = CredentialCache(AwsContainerSource(environ=env, wall=wall), "lambda")
    await nursery.start(cache.run)
    signer = SigV4Signer("us-east-1")
    host = b"abc.lambda-url.us-east-1.on.aws"
    first = await cache.wait_current()
    a = signer.render(first, b"GET", b"/", host, wall())
    assert b"Credential=ASIA0000000000000001/" in a and b"X-Amz-Security-Token: session1" in a
    await trio.sleep(80.0)
    second = cache.current(trio.current_time())
    assert second is not None and second is not first
    b = signer.render(second, b"GET", b"/", host, wall())
    assert b"Credential=ASIA0000000000000002/" in b and b"X-Amz-Security-Token: session2" in b

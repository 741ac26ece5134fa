"""AWS credentials for SigV4 (``fastgw.upstream.sigv4``), from the places AWS's SDKs
look, each a ``CredentialSource`` of ``AwsCredential``:

- ``AwsEnvironmentSource``: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``; read once, never expire (the process's environment does not
  change under it).
- ``AwsSharedFileSource``: a profile of the shared credentials file
  (``AWS_SHARED_CREDENTIALS_FILE``, default ``~/.aws/credentials``), re-read when the
  file changes (``FileWatch``, one stat() a second at most), so a tool that rotates
  keys in the file is followed. ``credential_process``, SSO and ``role_arn`` profiles
  are not supported (they are config-file features that run programs or call STS).
- ``AwsContainerSource``: the ECS / EKS Pod Identity credential endpoint:
  ``AWS_CONTAINER_CREDENTIALS_FULL_URI``, or ``http://169.254.170.2`` +
  ``AWS_CONTAINER_CREDENTIALS_RELATIVE_URI``, with the ``Authorization`` header from
  ``AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`` (re-read every fetch: EKS rotates it) or
  ``AWS_CONTAINER_AUTHORIZATION_TOKEN``. Plain HTTP only to loopback and the ECS/EKS
  link-local addresses, as the SDKs require.
- ``AwsInstanceMetadataSource``: EC2's instance metadata service, IMDSv2 (a PUT for a
  session token, then the role's credentials).

Temporary credentials carry ``Expiration`` (ISO 8601, UTC); the cache refreshes them at
75 % of what is left when they arrive. ``default_aws_source`` picks the first of
environment, container, shared file, instance, in the SDKs' order.
"""

from __future__ import annotations

import configparser
import json
import math
import os
import ssl
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from fastgw._fetch import FetchError, fetch
from fastgw.upstream.credentials import (
    FILE_POLL_INTERVAL_S,
    CredentialError,
    FileWatch,
    checked_token,
)
from fastgw.upstream.sigv4 import AwsCredential

__all__ = [
    "AwsContainerSource",
    "AwsEnvironmentSource",
    "AwsInstanceMetadataSource",
    "AwsSharedFileSource",
    "container_url_from_env",
    "default_aws_source",
    "default_credentials_file",
    "parse_expiration",
]

ECS_CONTAINER_HOST = "169.254.170.2"
# Hosts the SDKs accept over plain HTTP for a full container URI, besides loopback:
# ECS (169.254.170.2) and EKS Pod Identity (169.254.170.23, fd00:ec2::23).
CONTAINER_HTTP_HOSTS = frozenset({"169.254.170.2", "169.254.170.23", "fd00:ec2::23"})
DEFAULT_IMDS_URL = "http://169.254.169.254"
IMDS_HTTP_HOSTS = frozenset({"169.254.169.254", "fd00:ec2::254"})
# 21600 s: the IMDSv2 session lifetime the SDKs ask for (its maximum).
IMDS_TOKEN_TTL_S = 21600
# 64 KiB: a credentials file with a handful of profiles is well under 4 KiB.
MAX_CREDENTIALS_FILE_CHARS = 65536


def parse_expiration(value: object, now: float, wall: Callable[[], float]) -> float:
    """An ISO 8601 ``Expiration`` converted to trio's clock. Raises CredentialError."""
    if not isinstance(value, str):
        raise CredentialError("Expiration is missing or not a string")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise CredentialError("Expiration is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise CredentialError("Expiration has no time zone")
    return now + (when.timestamp() - wall())


def _credential_from_document(
    doc: object, now: float, wall: Callable[[], float], where: str
) -> AwsCredential:
    """The JSON the container and instance endpoints answer with."""
    if not isinstance(doc, dict):
        raise CredentialError(f"{where} sent something other than a JSON object")
    code = doc.get("Code")
    if code is not None and code != "Success":
        raise CredentialError(f"{where} answered Code={str(code)[:64]}")
    fields: dict[str, str] = {}
    for name in ("AccessKeyId", "SecretAccessKey", "Token"):
        value = doc.get(name)
        if not isinstance(value, str):
            raise CredentialError(f"{where}'s answer has no {name}")
        fields[name] = checked_token(value, f"{name} from {where}")
    return AwsCredential(
        obtained_at=now,
        expires_at=parse_expiration(doc.get("Expiration"), now, wall),
        access_key_id=fields["AccessKeyId"],
        secret_access_key=fields["SecretAccessKey"],
        session_token=fields["Token"],
    )


def _json(body: bytes, where: str) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise CredentialError(f"{where} sent a non-JSON answer") from None


class AwsEnvironmentSource:
    kind = "aws_sigv4"
    poll_interval_s: float | None = None

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._env = os.environ if environ is None else environ
        self._cred: AwsCredential | None = None

    async def refresh(self, now: float) -> AwsCredential:
        if self._cred is None:
            env = self._env
            akid = env.get("AWS_ACCESS_KEY_ID")
            secret = env.get("AWS_SECRET_ACCESS_KEY")
            if not akid or not secret:
                raise CredentialError("AWS_ACCESS_KEY_ID or AWS_SECRET_ACCESS_KEY is not set")
            token = env.get("AWS_SESSION_TOKEN") or None
            self._cred = AwsCredential(
                obtained_at=now,
                expires_at=math.inf,
                access_key_id=checked_token(akid, "AWS_ACCESS_KEY_ID"),
                secret_access_key=checked_token(secret, "AWS_SECRET_ACCESS_KEY"),
                session_token=None if token is None else checked_token(token, "AWS_SESSION_TOKEN"),
            )
        return self._cred


def default_credentials_file(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    path = env.get("AWS_SHARED_CREDENTIALS_FILE")
    return os.path.expanduser(path or "~/.aws/credentials")


class AwsSharedFileSource:
    """One profile of a shared credentials file, re-read when the file changes."""

    kind = "aws_sigv4"
    poll_interval_s: float | None = FILE_POLL_INTERVAL_S

    def __init__(self, path: str, profile: str = "default") -> None:
        self.path = path
        self.profile = profile
        self.watch: FileWatch[AwsCredential] = FileWatch(
            path, self._parse, MAX_CREDENTIALS_FILE_CHARS
        )

    def _parse(self, text: str, now: float) -> AwsCredential:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read_string(text, source=self.path)
        except configparser.Error as e:
            raise CredentialError(f"{self.path}: not an INI file ({type(e).__name__})") from None
        if not parser.has_section(self.profile):
            raise CredentialError(f"{self.path}: no profile [{self.profile}]")
        section = parser[self.profile]
        akid = section.get("aws_access_key_id")
        secret = section.get("aws_secret_access_key")
        if not akid or not secret:
            raise CredentialError(
                f"{self.path}: profile [{self.profile}] has no aws_access_key_id and "
                "aws_secret_access_key (credential_process, SSO and role profiles are "
                "not supported)"
            )
        token = section.get("aws_session_token") or None
        where = f"profile [{self.profile}] in {self.path}"
        return AwsCredential(
            obtained_at=now,
            expires_at=math.inf,
            access_key_id=checked_token(akid.strip(), f"aws_access_key_id of {where}"),
            secret_access_key=checked_token(secret.strip(), f"aws_secret_access_key of {where}"),
            session_token=(
                None if token is None else checked_token(token.strip(), f"session token of {where}")
            ),
        )

    async def refresh(self, now: float) -> AwsCredential:
        return self.watch.get(now)


def container_url_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The container credential URL the environment names, or None."""
    env = os.environ if environ is None else environ
    full = env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    if full:
        return full
    rel = env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    if rel:
        return f"http://{ECS_CONTAINER_HOST}{rel if rel.startswith('/') else '/' + rel}"
    return None


class AwsContainerSource:
    """Temporary credentials from the container credential endpoint."""

    kind = "aws_sigv4"
    poll_interval_s: float | None = None

    def __init__(
        self,
        url: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 10.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._env = os.environ if environ is None else environ
        resolved = url or container_url_from_env(self._env)
        if not resolved:
            raise ValueError(
                "no container credential URL: set AWS_CONTAINER_CREDENTIALS_FULL_URI or "
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"
            )
        self.url = resolved
        self._ssl = ssl_context
        self._timeout_s = timeout_s
        self._wall = wall

    def _authorization(self) -> str | None:
        path = self._env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
        if path:
            try:
                with open(path, encoding="utf-8") as f:
                    value = f.read(8193).strip()
            except (OSError, UnicodeDecodeError) as e:
                raise CredentialError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
            return checked_token(value, f"container authorization token in {path}")
        env_value = self._env.get("AWS_CONTAINER_AUTHORIZATION_TOKEN")
        if env_value:
            return checked_token(env_value.strip(), "AWS_CONTAINER_AUTHORIZATION_TOKEN")
        return None

    async def refresh(self, now: float) -> AwsCredential:
        headers = [("Accept", "application/json")]
        auth = self._authorization()
        if auth is not None:
            headers.append(("Authorization", auth))
        try:
            resp = await fetch(
                "GET",
                self.url,
                headers=headers,
                ssl_context=self._ssl,
                timeout_s=self._timeout_s,
                http_hosts=CONTAINER_HTTP_HOSTS,
            )
        except FetchError as e:
            raise CredentialError(f"container credential endpoint: {e}") from None
        where = "container credential endpoint"
        if resp.status != 200:
            raise CredentialError(f"{where} answered {resp.status}")
        return _credential_from_document(_json(resp.body, where), now, self._wall, where)


class AwsInstanceMetadataSource:
    """Temporary credentials of the instance's role, from IMDSv2."""

    kind = "aws_sigv4"
    poll_interval_s: float | None = None

    def __init__(
        self,
        base_url: str = DEFAULT_IMDS_URL,
        *,
        timeout_s: float = 10.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout_s = timeout_s
        self._wall = wall

    async def _call(self, method: str, path: str, headers: list[tuple[str, str]]) -> bytes:
        where = "instance metadata service"
        try:
            resp = await fetch(
                method,
                self.base_url + path,
                headers=headers,
                timeout_s=self._timeout_s,
                http_hosts=IMDS_HTTP_HOSTS,
            )
        except FetchError as e:
            raise CredentialError(f"{where}: {e}") from None
        if resp.status != 200:
            raise CredentialError(f"{where} answered {resp.status} to {method} {path}")
        return resp.body

    async def refresh(self, now: float) -> AwsCredential:
        raw = await self._call(
            "PUT",
            "/latest/api/token",
            [("X-aws-ec2-metadata-token-ttl-seconds", str(IMDS_TOKEN_TTL_S))],
        )
        token = checked_token(raw.decode("ascii", "replace").strip(), "IMDSv2 session token")
        auth = [("X-aws-ec2-metadata-token", token)]
        base = "/latest/meta-data/iam/security-credentials/"
        roles = (await self._call("GET", base, auth)).decode("ascii", "replace").split()
        if not roles:
            raise CredentialError("the instance has no IAM role")
        role = checked_token(roles[0], "IAM role name")
        if "/" in role or role in (".", ".."):
            raise CredentialError("the instance metadata service named an odd IAM role")
        body = await self._call("GET", base + role, auth)
        where = "instance metadata service"
        return _credential_from_document(_json(body, where), now, self._wall, where)


def default_aws_source(
    environ: Mapping[str, str] | None = None,
    *,
    profile: str | None = None,
    credentials_file: str | None = None,
    wall: Callable[[], float] = time.time,
) -> AwsEnvironmentSource | AwsContainerSource | AwsSharedFileSource | AwsInstanceMetadataSource:
    """The first source that applies, in the SDKs' order: environment keys, the
    container endpoint, the shared credentials file (when it exists), the instance
    metadata service. Decided once, when the config is loaded."""
    env = os.environ if environ is None else environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return AwsEnvironmentSource(env)
    if container_url_from_env(env):
        return AwsContainerSource(environ=env, wall=wall)
    path = credentials_file or default_credentials_file(env)
    if os.path.exists(path):
        return AwsSharedFileSource(path, profile or env.get("AWS_PROFILE") or "default")
    return AwsInstanceMetadataSource(wall=wall)

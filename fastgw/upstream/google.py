"""Google ID tokens for IAM-protected Cloud Run services and Cloud Functions.

Two sources, one credential (``TokenCredential``) per audience (the function's URL):

- ``GoogleMetadataSource``: the metadata server of the machine fastgw runs on (GCE,
  GKE with Workload Identity, Cloud Run): ``GET {metadata_url}/computeMetadata/v1/
  instance/service-accounts/{account}/identity?audience=...`` with ``Metadata-Flavor:
  Google``; the body is the token.
- ``GoogleServiceAccountSource``: a service-account key file. We sign a JWT assertion
  with the key (RS256, PyJWT; ``iss``/``sub`` the account's email, ``aud`` the token
  endpoint, ``target_audience`` the function URL, ``iat``/``exp`` an hour apart) and
  exchange it at the token endpoint (RFC 7523 2.1 grant type
  ``urn:ietf:params:oauth:grant-type:jwt-bearer``) for ``{"id_token": ...}``.

Both endpoints are configurable, so tests point them at local servers. The key file is
re-read on every refresh (once per ~45 minutes), so a rotated key is picked up.

The token's expiry comes from its ``exp`` claim, read without verifying the signature
(``credentials.unverified_claims`` says why that is fine). We do check that its ``aud``
is the audience we asked for: a token for the wrong audience is refused, not cached.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

import jwt

from fastgw._fetch import FetchError, Response, fetch
from fastgw.upstream.credentials import (
    CredentialError,
    TokenCredential,
    checked_token,
    expires_at_from_claims,
    unverified_claims,
)

__all__ = [
    "DEFAULT_METADATA_URL",
    "DEFAULT_TOKEN_URL",
    "GoogleMetadataSource",
    "GoogleServiceAccountSource",
    "default_metadata_url",
    "make_assertion",
]

DEFAULT_METADATA_URL = "http://metadata.google.internal"
DEFAULT_TOKEN_URL = "https://oauth2.googleapis.com/token"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# The metadata server is plain HTTP on a link-local address by design.
METADATA_HTTP_HOSTS = frozenset({"metadata.google.internal", "169.254.169.254"})
# 3600 s: the longest assertion lifetime Google's token endpoint accepts (and what its
# client libraries use).
ASSERTION_LIFETIME_S = 3600
# 64 KiB: a service-account key file is ~2.3 KiB.
MAX_KEY_FILE_BYTES = 65536


def default_metadata_url(environ: dict[str, str] | None = None) -> str:
    """``http://$GCE_METADATA_HOST`` when set (google-auth honours the same variable,
    e.g. for the GKE metadata emulator), else ``http://metadata.google.internal``."""
    env = os.environ if environ is None else environ
    host = env.get("GCE_METADATA_HOST")
    return f"http://{host}" if host else DEFAULT_METADATA_URL


def _token_credential(
    body: str, audience: str, now: float, wall: Callable[[], float], where: str
) -> TokenCredential:
    token = checked_token(body.strip(), f"ID token from {where}")
    claims = unverified_claims(token)
    aud = claims.get("aud")
    if aud != audience and not (isinstance(aud, list) and audience in aud):
        raise CredentialError(f"ID token from {where} is for another audience")
    expires_at = expires_at_from_claims(claims, now, wall)
    return TokenCredential(obtained_at=now, expires_at=expires_at, token=token)


def _error_detail(resp: Response) -> str:
    """A short, secret-free reason from an OAuth error document (RFC 6749 5.2)."""
    try:
        doc = json.loads(resp.body)
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    parts = [str(doc.get(k))[:200] for k in ("error", "error_description") if doc.get(k)]
    return (": " + " - ".join(parts)) if parts else ""


class GoogleMetadataSource:
    """ID tokens for ``audience`` from the metadata server."""

    kind = "google_id_token"
    poll_interval_s: float | None = None

    def __init__(
        self,
        audience: str,
        *,
        metadata_url: str = DEFAULT_METADATA_URL,
        service_account: str = "default",
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 10.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.audience = audience
        self.url = (
            metadata_url.rstrip("/")
            + "/computeMetadata/v1/instance/service-accounts/"
            + quote(service_account, safe="@.")
            + "/identity?audience="
            + quote(audience, safe="")
        )
        self._ssl = ssl_context
        self._timeout_s = timeout_s
        self._wall = wall

    async def refresh(self, now: float) -> TokenCredential:
        try:
            resp = await fetch(
                "GET",
                self.url,
                headers=[("Metadata-Flavor", "Google")],
                ssl_context=self._ssl,
                timeout_s=self._timeout_s,
                http_hosts=METADATA_HTTP_HOSTS,
            )
        except FetchError as e:
            raise CredentialError(f"metadata server: {e}") from None
        if resp.status != 200:
            raise CredentialError(f"metadata server answered {resp.status}")
        try:
            body = resp.body.decode("ascii")
        except UnicodeDecodeError:
            raise CredentialError("metadata server sent a non-ASCII token") from None
        return _token_credential(body, self.audience, now, self._wall, "metadata server")


def make_assertion(info: dict[str, Any], audience: str, token_url: str, issued_at: int) -> str:
    """The signed JWT assertion for the jwt-bearer grant. ``info`` is the parsed key
    file. Raises CredentialError on a key PyJWT cannot use."""
    claims = {
        "iss": info["client_email"],
        "sub": info["client_email"],
        "aud": token_url,
        "target_audience": audience,
        "iat": issued_at,
        "exp": issued_at + ASSERTION_LIFETIME_S,
    }
    headers = {"kid": info["private_key_id"]} if info.get("private_key_id") else None
    try:
        return jwt.encode(claims, info["private_key"], algorithm="RS256", headers=headers)
    except (ValueError, TypeError, jwt.PyJWTError) as e:
        raise CredentialError(
            f"cannot sign with the key file's private_key ({type(e).__name__})"
        ) from None


class GoogleServiceAccountSource:
    """ID tokens for ``audience`` from a service-account key file and a token endpoint.

    ``token_url`` None uses the key file's ``token_uri`` (else Google's endpoint); the
    assertion's ``aud`` is the endpoint actually used."""

    kind = "google_id_token"
    poll_interval_s: float | None = None

    def __init__(
        self,
        key_file: str,
        audience: str,
        *,
        token_url: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 10.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.key_file = key_file
        self.audience = audience
        self.token_url = token_url
        self._ssl = ssl_context
        self._timeout_s = timeout_s
        self._wall = wall

    def load_key_file(self) -> dict[str, Any]:
        """The key file's fields we use; raises CredentialError (never echoing key
        material)."""
        path = self.key_file
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as e:
            raise CredentialError(f"{path}: {e.strerror or e}") from None
        if len(raw) > MAX_KEY_FILE_BYTES:
            raise CredentialError(f"{path}: over {MAX_KEY_FILE_BYTES} bytes")
        try:
            info = json.loads(raw)
        except ValueError:
            raise CredentialError(f"{path}: not JSON") from None
        if not isinstance(info, dict) or info.get("type") != "service_account":
            raise CredentialError(f"{path}: not a service-account key file")
        for field in ("client_email", "private_key"):
            if not isinstance(info.get(field), str) or not info[field]:
                raise CredentialError(f"{path}: no {field}")
        return info

    async def refresh(self, now: float) -> TokenCredential:
        info = self.load_key_file()
        url = self.token_url or info.get("token_uri") or DEFAULT_TOKEN_URL
        if not isinstance(url, str):
            raise CredentialError(f"{self.key_file}: token_uri is not a string")
        assertion = make_assertion(info, self.audience, url, int(self._wall()))
        form = urlencode({"grant_type": JWT_BEARER_GRANT, "assertion": assertion})
        try:
            resp = await fetch(
                "POST",
                url,
                headers=[
                    ("Content-Type", "application/x-www-form-urlencoded"),
                    ("Accept", "application/json"),
                ],
                body=form.encode("ascii"),
                ssl_context=self._ssl,
                timeout_s=self._timeout_s,
            )
        except FetchError as e:
            raise CredentialError(f"token endpoint: {e}") from None
        if resp.status != 200:
            raise CredentialError(f"token endpoint answered {resp.status}{_error_detail(resp)}")
        try:
            doc = json.loads(resp.body)
        except ValueError:
            raise CredentialError("token endpoint sent a non-JSON answer") from None
        token = doc.get("id_token") if isinstance(doc, dict) else None
        if not isinstance(token, str):
            raise CredentialError("token endpoint's answer has no id_token")
        return _token_credential(token, self.audience, now, self._wall, "token endpoint")

"""Fetching OIDC discovery documents and JWKS: the identity package's URL policy over
the shared cold-path client (``fastgw._fetch``: one bounded request per connection, h11,
no redirects).

TLS is always verified (``ssl.create_default_context``, host name checked); ``ca_file``
replaces the system roots. Plain ``http://`` is accepted only towards a loopback host,
for local identity providers in development and tests (RFC 8252 8.3 makes the same
exception for OAuth redirect URIs).

``http_get`` raises ``FetchError`` (a readable reason, for logs and ``statistics()``) and
nothing else on network or protocol trouble; anything else escaping is a bug.
"""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

from fastgw._fetch import FetchError, Response, fetch, is_loopback

__all__ = ["FetchError", "Response", "check_fetch_url", "http_get", "make_ssl_context"]

USER_AGENT = "fastgw-jwks/1"


def check_fetch_url(url: str) -> str | None:
    """None when ``url`` is fit to fetch keys from; otherwise what is wrong with it."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "URL contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"not a valid URL: {e}"
    if parts.scheme not in ("https", "http"):
        return "URL scheme must be https"
    if not parts.hostname:
        return "URL has no host"
    if "@" in parts.netloc:
        return "URL must not contain user info (user:password@)"
    if parts.fragment or url.endswith("#"):
        return "URL must not have a fragment (#...)"
    if port == 0:
        return "URL port must be 1-65535"
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        return "URL scheme must be https (http:// is allowed only for loopback hosts)"
    return None


def make_ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """Verified TLS client context; ``ca_file`` replaces the system roots.
    Raises OSError / ssl.SSLError when the CA file cannot be read."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def http_get(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None,
    timeout_s: float,
    max_body_bytes: int,
) -> Response:
    """GET ``url`` and return the whole response (any status). Raises FetchError."""
    problem = check_fetch_url(url)
    if problem is not None:
        raise FetchError(problem)
    if ssl_context is None and url.startswith("https:"):
        ssl_context = make_ssl_context(None)
    return await fetch(
        "GET",
        url,
        headers=[("Accept", "application/json")],
        ssl_context=ssl_context,
        timeout_s=timeout_s,
        max_body_bytes=max_body_bytes,
        user_agent=USER_AGENT,
        checked=True,
    )

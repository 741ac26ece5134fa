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

# Key URLs follow the credential sources' rule: https, or http to a loopback host.
from fastgw._fetch import FetchError, Response, fetch
from fastgw._fetch import check_url as check_fetch_url

__all__ = ["FetchError", "Response", "check_fetch_url", "http_get", "make_ssl_context"]

USER_AGENT = "fastgw-jwks/1"


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

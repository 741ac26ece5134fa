"""A tiny HTTP/1.1 GET client for the cold path: OIDC discovery documents and JWKS.

Strategy: one request per connection (``Connection: close``), trio streams, h11 for the
protocol. These fetches happen once per refresh period per issuer (minutes apart), so
simplicity wins over pooling; the hot path never comes here. Everything is bounded: the
whole exchange by ``timeout_s`` (trio's ``fail_after``), the body by ``max_body_bytes``,
the head by h11's incomplete-event limit. Redirects are not followed: a JWKS that moves
is a configuration change, and following a redirect would let whoever controls a 3xx
pick where keys come from.

TLS is always verified (``ssl.create_default_context``, host name checked); ``ca_file``
replaces the system roots. Plain ``http://`` is accepted only towards a loopback host,
for local identity providers in development and tests (RFC 8252 8.3 makes the same
exception for OAuth redirect URIs).

``http_get`` raises ``FetchError`` (a readable reason, for logs and ``statistics()``) and
nothing else on network or protocol trouble; anything else escaping is a bug.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

__all__ = ["FetchError", "Response", "check_fetch_url", "http_get", "make_ssl_context"]

# 16 KiB of response head: h11's default limit; identity providers send well under 2 KiB.
MAX_HEAD_BYTES = 16384
RECV_BYTES = 65536
USER_AGENT = "fastgw-jwks/1"


class FetchError(Exception):
    """A fetch failed; ``str(e)`` says why, without secrets (URLs here are public)."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]  # names lowercased (h11 does that)
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """The value of the last field named ``name`` (lowercase), or None."""
        found = None
        for k, v in self.headers:
            if k == name:
                found = v
        return found


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
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
    parts = urlsplit(url)
    host = parts.hostname
    assert host is not None  # check_fetch_url
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        authority += f":{parts.port}"
    try:
        with trio.fail_after(timeout_s):
            return await _get(host, port, tls, authority, target, ssl_context, max_body_bytes)
    except trio.TooSlowError:
        raise FetchError(f"no complete answer within {timeout_s:g} s") from None
    except (OSError, trio.BrokenResourceError) as e:
        raise FetchError(f"connection failed: {_reason(e)}") from None
    except h11.ProtocolError as e:
        raise FetchError(f"malformed HTTP response: {e}") from None


async def _get(
    host: str,
    port: int,
    tls: bool,
    authority: str,
    target: str,
    ssl_context: ssl.SSLContext | None,
    max_body_bytes: int,
) -> Response:
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    try:
        if tls:
            ctx = ssl_context if ssl_context is not None else make_ssl_context(None)
            ssl_stream = trio.SSLStream(stream, ctx, server_hostname=host, https_compatible=True)
            await ssl_stream.do_handshake()
            stream = ssl_stream
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        request = h11.Request(
            method="GET",
            target=target,
            headers=[
                ("Host", authority),
                ("User-Agent", USER_AGENT),
                ("Accept", "application/json"),
                ("Connection", "close"),
            ],
        )
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = bytes(await stream.receive_some(RECV_BYTES))
                if not data and not status:
                    raise FetchError("connection closed before a response")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = list(event.headers)
                length = _content_length(headers)
                if length is not None and length > max_body_bytes:
                    raise FetchError(f"response body of {length} bytes is over {max_body_bytes}")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body_bytes:
                    raise FetchError(f"response body over {max_body_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise FetchError("connection closed before the response ended")
            # InformationalResponse (1xx): keep reading.
    finally:
        # Shielded and bounded: a TLS close_notify must not outlive a cancelled fetch.
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for k, v in headers:
        if k == b"content-length":
            return int(v)  # h11 has checked it is digits
    return None


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return f"TLS: {str(e.reason).replace('_', ' ').lower()}"
    if isinstance(e, trio.BrokenResourceError) and e.__cause__ is not None:
        return _reason(e.__cause__)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__

"""A tiny HTTP/1.1 client for the cold path: OIDC discovery documents and JWKS
(``fastgw.identity``), metadata servers, token endpoints and container credential
endpoints (``fastgw.upstream``). Never used per request.

Strategy: one request per connection (``Connection: close``), trio streams, h11 for the
protocol. Keys and credentials are fetched once per refresh period (minutes to an hour
apart), so simplicity wins over pooling. Everything is bounded: the whole exchange by ``timeout_s``,
the response body by ``max_body_bytes``, the head by h11's incomplete-event limit.
Redirects are not followed: a key or credential endpoint that redirects is
misconfigured, and following one would let a 3xx pick where keys come from, or send our
metadata headers or assertion somewhere else.

TLS is always verified (``ssl.create_default_context``); ``ssl_context`` replaces it.
Plain ``http://`` is refused unless the host is loopback or named in ``http_hosts``: the
metadata and container endpoints (``metadata.google.internal``, ``169.254.169.254``,
``169.254.170.2``) are plain HTTP on a link-local address by design, and their callers
name them explicitly.

``fetch`` raises ``FetchError`` (a readable reason without secrets) and nothing else on
network or protocol trouble; anything else escaping is a bug.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

__all__ = ["FetchError", "Response", "check_url", "fetch", "is_loopback"]

# 16 KiB of response head: h11's default limit; these endpoints send well under 1 KiB.
MAX_HEAD_BYTES = 16384
RECV_BYTES = 65536
# 64 KiB of body: an ID token is ~1 KiB, AWS session credentials ~2 KiB, a token
# endpoint's error document well under 1 KiB.
MAX_BODY_BYTES = 65536
USER_AGENT = "fastgw-credentials/1"


class FetchError(Exception):
    """A fetch failed; ``str(e)`` says why, without secrets."""


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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, http_hosts: Collection[str] = ()) -> str | None:
    """None when ``url`` is fit to fetch a credential from; otherwise what is wrong."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return "URL contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"not a valid URL: {e}"
    if parts.scheme not in ("https", "http"):
        return "URL scheme must be https or http"
    if not parts.hostname:
        return "URL has no host"
    if "@" in parts.netloc:
        return "URL must not contain user info (user:password@)"
    if parts.fragment or url.endswith("#"):
        return "URL must not have a fragment (#...)"
    if port == 0:
        return "URL port must be 1-65535"
    host = parts.hostname
    if parts.scheme == "http" and not is_loopback(host) and host not in http_hosts:
        return (
            f"URL scheme must be https (http:// is allowed for loopback and {_names(http_hosts)})"
        )
    return None


def _names(hosts: Collection[str]) -> str:
    return ", ".join(sorted(hosts)) if hosts else "nothing else"


async def fetch(
    method: str,
    url: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    ssl_context: ssl.SSLContext | None = None,
    timeout_s: float,
    max_body_bytes: int = MAX_BODY_BYTES,
    http_hosts: Collection[str] = (),
    user_agent: str = USER_AGENT,
    checked: bool = False,
) -> Response:
    """Send one request and return the whole response (any status). Raises FetchError.
    ``checked``: the caller has vetted ``url`` with its own policy already."""
    problem = None if checked else check_url(url, http_hosts)
    if problem is not None:
        raise FetchError(problem)
    parts = urlsplit(url)
    host = parts.hostname
    assert host is not None  # check_url
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        authority += f":{parts.port}"
    fields = [
        ("Host", authority),
        ("User-Agent", user_agent),
        ("Connection", "close"),
        *headers,
    ]
    if body or method in ("POST", "PUT"):
        fields.append(("Content-Length", str(len(body))))
    request = h11.Request(method=method, target=target, headers=fields)
    try:
        with trio.fail_after(timeout_s):
            return await _exchange(host, port, tls, request, body, ssl_context, max_body_bytes)
    except trio.TooSlowError:
        raise FetchError(f"no complete answer within {timeout_s:g} s") from None
    except (OSError, trio.BrokenResourceError) as e:
        raise FetchError(f"connection failed: {_reason(e)}") from None
    except h11.ProtocolError as e:
        raise FetchError(f"malformed HTTP response: {e}") from None


async def _exchange(
    host: str,
    port: int,
    tls: bool,
    request: h11.Request,
    body: bytes,
    ssl_context: ssl.SSLContext | None,
    max_body_bytes: int,
) -> Response:
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    try:
        if tls:
            ctx = ssl_context if ssl_context is not None else ssl.create_default_context()
            ssl_stream = trio.SSLStream(stream, ctx, server_hostname=host, https_compatible=True)
            await ssl_stream.do_handshake()
            stream = ssl_stream
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        out = conn.send(request)
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        await stream.send_all(out)
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        got = bytearray()
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
                for k, v in headers:
                    if k == b"content-length" and int(v) > max_body_bytes:
                        raise FetchError(
                            f"response body of {int(v)} bytes is over {max_body_bytes}"
                        )
            elif isinstance(event, h11.Data):
                got += event.data
                if len(got) > max_body_bytes:
                    raise FetchError(f"response body over {max_body_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, headers, bytes(got))
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


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError) and e.reason:
        return f"TLS: {str(e.reason).replace('_', ' ').lower()}"
    if isinstance(e, trio.BrokenResourceError) and e.__cause__ is not None:
        return _reason(e.__cause__)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__

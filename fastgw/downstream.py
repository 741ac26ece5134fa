"""One client connection: read heads, run exchanges in order, keep alive, time out.

Strategy. One trio task per connection, on a raw non-blocking socket (see transport.py).
The task owns one cancel scope for the whole connection. Timeouts do not move that
scope's deadline (each move costs trio a deadline-heap update, several per request):
the connection keeps a plain ``deadline`` float and its phase (idle, reading a head,
reading a body, waiting for the upstream, streaming the response), computed from the
gateway's coarse clock ``gw.now``; the gateway's watchdog task cancels the scope of any
connection past its deadline (HAProxy keeps timers the same way, against a clock read
once per loop). When it fires the edge knows from the phase what to answer: 408 for a
slow head or body, 504 for a slow upstream, a quiet close when idle, an abort
mid-response. Timeouts fire up to two watchdog ticks late, never early.

Per exchange the core is called to parse the head, build the upstream head, parse the
response head and build the downstream head; bodies are streamed in pieces of at most
``RECV_BYTES`` with each piece fully written before the next is read (backpressure), so
a connection holds at most one 64 KiB read per direction whatever the body's size.

Requests are answered in order (pipelining): bytes after a request's body stay in the
buffer and are parsed once the response is done. After a protocol error the connection
is closed, because framing is then in doubt.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
from typing import TYPE_CHECKING, Any

import trio

from fastgw._core.http import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    ChunkedReader,
    build_request_head,
    build_response_head,
    parse_request_head,
    parse_response_head,
)
from fastgw.errors import ProtocolError
from fastgw.transport import PlainTransport
from fastgw.upstream.backend import Unavailable
from fastgw.upstream.pool import Pool, UpstreamConn, UpstreamConnectError
from fastgw.upstream.retry import likely_cold, track_of

if TYPE_CHECKING:
    from fastgw.gateway import Gateway
    from fastgw.identity import Identity
    from fastgw.router import Route

_clock = time.perf_counter
_wall = time.time

# Phases, for what a fired deadline means.
IDLE = 0
HEAD = 1
BODY = 2
UPSTREAM = 3
RESPONSE = 4
DONE = 5

# A client's X-Request-Id is propagated when it looks like an id (bounded, no spaces or
# separators that could inject into logs); otherwise fastgw makes one.
_VALID_RID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# RFC 9110 9.2.2: methods whose repetition has the effect of one request.
_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))

_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def _upstream_head(d, state, head, route, pool, path: bytes, rid: bytes, id_extra):  # type: ignore[no-untyped-def]
    """The head for ``pool``'s endpoint: its Host, its path prefix joined to ``path``,
    and its upstream credential (raises CredentialUnavailable when it has none valid)."""
    prefix = pool.path_prefix
    if prefix:
        path = prefix + (path[1:] if path == b"/" or path.startswith(b"/?") else path)
    extra = route.req_extra
    if id_extra:
        extra = extra + id_extra if extra else id_extra
    strip = route.req_strip
    creds = state.credentials
    if creds:
        cb = creds.get(pool)
        if cb is not None:
            # Pre-rendered per installed credential (SigV4: signed for this request);
            # the caller's copies of the fields it sets are stripped.
            lines = cb.lines(head, path, pool.host_header, d.gw.now, d.payload_hash)
            if lines is None:
                raise CredentialUnavailable()
            extra = extra + lines if extra else lines
            strip = cb.strips.get(route) or cb.strip_for(route)
    return build_request_head(
        head,
        target=path,
        host=pool.host_header,
        client_ip=d.peer_ip,
        proto=d.proto,
        request_id=rid,
        xff_append=state.xff_append,
        via=state.via,
        strip=strip,
        extra=extra,
    )


class CredentialUnavailable(Exception):
    """The endpoint's upstream credential is missing or expired (never sent then)."""


def _rebuild(d, retry, pool, first: bytes) -> bytes | None:  # type: ignore[no-untyped-def]
    """``first`` (a head and the body bytes sent with it) rebuilt for another endpoint
    (re-signed for it, with its own credential); None when that endpoint has no valid
    credential (the caller stays where it was)."""
    state, head, route, path, rid, id_extra, head_len = retry
    try:
        return _upstream_head(d, state, head, route, pool, path, rid, id_extra) + first[head_len:]
    except CredentialUnavailable:
        return None


def _other_endpoint(backend, used: list[Pool]) -> Pool | None:  # type: ignore[no-untyped-def]
    """For a hedge: the least busy endpoint not tried yet, not paused and with room
    for a hedge's slot (``Backend.hedge_room``: under its cap and the backend's, and
    nobody queued); an available one unless none is; None when there is none."""
    now = trio.current_time()
    room = backend.hedge_room
    rest = [p for p in backend.pools if p not in used and room(p) and not p.paused(now)]
    if not rest:
        return None
    live = [p for p in rest if p.available(now)] or rest
    return min(live, key=lambda p: p.outstanding)


def _no_retry_slot(backend, pool: Pool, rh) -> bool:  # type: ignore[no-untyped-def]
    """Gated backends: whether a retry from ``pool`` would find no slot: no other
    endpoint has room, and ``pool`` is paused or about to be (``rh``: a 429/503 with
    Retry-After). The client then gets the original answer at once rather than a wait
    in the queue (see fastgw/upstream/backend.py)."""
    if backend.pick_other(pool) is not pool:
        return False
    if pool.paused(trio.current_time()):
        return True
    return (
        rh is not None
        and (rh.status == 429 or rh.status == 503)
        and rh.get(b"retry-after") is not None
        and backend.config.retry_after_max_s > 0
    )


def _header_lines(headers: tuple[tuple[bytes, bytes], ...]) -> bytes:
    return b"".join(k + b": " + v + b"\r\n" for k, v in headers)


def _connect_answer(e: UpstreamConnectError) -> tuple[int, str, str]:
    """(status, code, detail) for a connect that failed: 503 when no connection became
    free in time (the pool's cap), 504 when connecting timed out, 502 otherwise."""
    if e.saturated:
        return 503, "upstream_saturated", "no connection to the function became available in time"
    if e.timeout:
        return 504, "upstream_connect_timeout", "connecting to the function timed out"
    return 502, "upstream_unreachable", "could not connect to the function endpoint"


def _moved_authorization(head) -> bytes | None:  # type: ignore[no-untyped-def]
    value = head.get(b"authorization")
    return None if value is None else b"X-Forwarded-Authorization: " + value + b"\r\n"


# Header values must be visible ASCII or space (RFC 9110 5.5); anything else in a claim
# is percent-encoded so a claim can never inject a field or a line.
_SAFE_VALUE = re.compile(rb"[\x20-\x7e]*")


def _safe(value: object) -> bytes:
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
    if _SAFE_VALUE.fullmatch(raw) and b"%" not in raw:
        return raw
    return b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in raw)


def identity_lines(identity: Identity, issuer_name: str | None, cfg) -> bytes:  # type: ignore[no-untyped-def]
    """The identity fields sent upstream (X-Fastgw-Identity/Subject/Issuer/Key and the
    configured claims). Rendered once per identity object (the caller caches it)."""
    p = cfg.header_prefix.encode()
    lines = [p + b"Identity: " + identity.kind.encode() + b"\r\n"]
    if identity.subject:
        lines.append(p + b"Subject: " + _safe(identity.subject) + b"\r\n")
    if issuer_name is not None:
        lines.append(p + b"Issuer: " + _safe(issuer_name) + b"\r\n")
    if identity.kind == "apikey" and identity.key:
        lines.append(p + b"Key: " + _safe(identity.key) + b"\r\n")
    for claim in cfg.claim_headers:
        v = identity.claims.get(claim)
        if isinstance(v, str | int | float) and not isinstance(v, bool):
            lines.append(p + b"Claim-" + claim.encode() + b": " + _safe(v) + b"\r\n")
    return b"".join(lines)


# fastgw.identity (PyJWT, cryptography) is imported on first use, not at module import:
# a gateway without identity sources never loads it.
_IDENTITY: Any = None


def _identity_api() -> Any:
    global _IDENTITY
    import fastgw.identity

    _IDENTITY = fastgw.identity
    return _IDENTITY


class UpstreamFailed(Exception):
    """The upstream broke the exchange. ``sent`` says whether the request may have
    reached the function; ``status`` is what to answer if no response has started."""

    def __init__(self, status: int, code: str, detail: str, *, sent: bool) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.sent = sent


class _NothingBack(UpstreamFailed):
    """The upstream connection ended before any byte of a response."""

    def __init__(self) -> None:
        super().__init__(
            502, "upstream_closed", "upstream closed the connection without a response", sent=True
        )


class ClientGone(Exception):
    """The client closed or reset its connection mid-exchange."""


def error_response(
    status: int, code: str, detail: str, rid: bytes, *, close: bool, extra: bytes = b""
) -> bytes:
    body = json.dumps(
        {"error": code, "status": status, "detail": detail, "request_id": rid.decode()},
        separators=(",", ":"),
    ).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    ).encode()
    head += b"X-Request-Id: " + rid + b"\r\n" + extra
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


class Downstream:
    __slots__ = (
        "answered",
        "deadline",
        "decision_reason",
        "gw",
        "identity",
        "idle",
        "linger",
        "payload_hash",
        "peer_ip",
        "phase",
        "proto",
        "requests",
        "rid",
        "route",
        "scope",
        "slot",
        "t",
        "t0",
        "upconn",
    )

    def __init__(self, gw: Gateway, t: PlainTransport, peer_ip: bytes, proto: bytes) -> None:
        self.gw = gw
        self.t = t
        self.peer_ip = peer_ip
        self.proto = proto
        self.scope: trio.CancelScope | None = None
        self.deadline = float("inf")
        self.phase = IDLE
        self.idle = True
        self.requests = 0
        self.rid = b"-"
        self.route: Route | None = None
        self.identity: Identity | None = None
        self.decision_reason: str | None = None
        self.t0 = 0.0
        self.upconn: UpstreamConn | None = None
        # An admission slot (backend, pool, caller key) held for the current exchange.
        self.slot: tuple[Any, Pool, bytes | None] | None = None
        # True once any byte of a response to the current request went to the client.
        self.answered = False
        # Set when an error answer closes the connection: the gateway then drains what
        # the client still sends before closing, so the answer is not lost to a RST.
        self.linger = False
        # SigV4 backends: the hex SHA-256 of the request body read whole (None: none).
        self.payload_hash: bytes | None = None

    # -- the connection loop ------------------------------------------------------------

    async def run(self) -> None:
        gw = self.gw
        t = self.t
        scope = self.scope
        assert scope is not None
        buf = b""
        pos = 0
        scan_from = 0
        head_deadline = 0.0
        while True:
            state = gw.state
            lim = state.limits
            head = None
            if pos < len(buf):
                head = parse_request_head(
                    buf,
                    pos,
                    scan_from=scan_from,
                    max_head_bytes=lim.max_head_bytes,
                    max_fields=lim.max_header_fields,
                    max_target=lim.max_target_bytes,
                )
            if head is None:
                if pos >= len(buf) and gw.draining:
                    return
                data = t.recv_nowait()
                if data is None:
                    if pos >= len(buf):
                        self.phase = IDLE
                        self.idle = True
                        self.deadline = gw.now + lim.idle_timeout_s
                    else:
                        self.phase = HEAD
                        self.deadline = head_deadline
                    data = await t.recv_after_wait()
                    self.idle = False
                if not data:
                    return
                if pos < len(buf):
                    old = len(buf) - pos
                    buf = buf[pos:] + data
                    scan_from = old - 3 if old > 3 else 0
                else:
                    buf = data
                    scan_from = 0
                    head_deadline = gw.now + lim.head_timeout_s
                pos = 0
                continue
            self.t0 = _clock()
            self.idle = False
            pos += head.head_len
            scan_from = 0
            self.requests += 1
            self.answered = False
            self.route = None
            rid = head.get(b"x-request-id")
            if rid is None or _VALID_RID.fullmatch(rid) is None:
                rid = gw.next_request_id()
            self.rid = rid
            buf, pos, keep = await self._exchange(state, head, buf, pos, rid)
            if self.slot is not None:
                self.release_slot()
            self.route = None
            self.identity = None
            if not keep:
                return
            if pos >= len(buf):
                buf = b""
                pos = 0
            head_deadline = gw.now + lim.head_timeout_s

    # -- one exchange -------------------------------------------------------------------

    async def _exchange(self, state, head, buf: bytes, pos: int, rid: bytes):  # type: ignore[no-untyped-def]
        """Proxy one request; returns (buf, pos, keep_alive)."""
        gw = self.gw
        t = self.t
        lim = state.limits
        kind = head.body_kind
        matched = state.router.match(head)
        if matched is None:
            gw.count_error("no_route")
            await self.send_error(
                404, "no_route", "no route matches this request", rid, close=kind != BODY_NONE
            )
            return buf, pos, kind == BODY_NONE and head.keep_alive and not gw.draining
        route, backend, path = matched
        self.route = route
        self.identity = None
        method = head.method
        id_extra = None
        if route.auth is not None or state.has_identity:
            id_extra = await self._authorize(state, head, route, rid)
            if id_extra is False:
                # Answered (401/403/503); the body, if any, was not read.
                return buf, pos, kind == BODY_NONE and head.keep_alive and not gw.draining
        elif state.config.identity.authorization == "move":
            id_extra = _moved_authorization(head)
        if route.limits:
            over = (
                await self._over_limit_shared(route, head)
                if route.limits_shared
                else self._over_limit(route, head)
            )
            if over is not None:
                lim, wait_s = over
                if wait_s is None:  # a tiered limit, and the caller has no tier
                    gw.count_error("no_tier")
                    self.decision_reason = f"rate limit {lim.name}: no tier"
                    await self.send_error(
                        403, "no_tier", f"the caller has no tier of the rate limit {lim.name}",
                        rid, close=kind != BODY_NONE, decision="deny",
                    )  # fmt: skip
                    return buf, pos, kind == BODY_NONE and head.keep_alive and not gw.draining
                gw.count_error("rate_limited")
                self.decision_reason = f"rate limit {lim.name}"
                await self.send_error(
                    429, "rate_limited", f"over the rate limit {lim.name}", rid,
                    close=kind != BODY_NONE, extra=lim.answer_fields(wait_s, self.identity),
                    decision="limit",
                )  # fmt: skip
                return buf, pos, kind == BODY_NONE and head.keep_alive and not gw.draining
        budget_fields = b""
        if route.budgets is not None:
            bud = route.budgets
            now_s = gw.wall_clock()
            store = gw.redis_budgets() if bud.shared else None
            if store is not None:
                ans = await bud.spend_shared(store, now_s, self.identity, self.peer_ip, head)
            else:
                ans = bud.spend(gw.budget_table, now_s, self.identity, self.peer_ip, head)
            if type(ans) is not bytes:
                gw.count_error(ans.code)
                self.decision_reason = ans.reason
                await self.send_error(
                    ans.status, ans.code, ans.detail, rid, close=kind != BODY_NONE,
                    extra=ans.extra, decision="limit",
                )  # fmt: skip
                return buf, pos, kind == BODY_NONE and head.keep_alive and not gw.draining
            budget_fields = ans
        max_body = route.max_body_bytes
        if kind:
            if kind == BODY_LENGTH and max_body and head.content_length > max_body:
                gw.count_error("body_too_large")
                await self.send_error(
                    413, "body_too_large", f"request body over {max_body} bytes", rid, close=True
                )
                return buf, pos, False
        if head.upgrade or method == b"CONNECT":
            gw.count_error("method_not_supported")
            await self.send_error(
                501 if head.upgrade else 405,
                "not_supported",
                "CONNECT and protocol upgrades are not supported",
                rid,
                close=kind != BODY_NONE,
            )
            return buf, pos, kind == BODY_NONE and head.keep_alive and not gw.draining

        if backend.gated:
            # Caps, queue or hashing (fastgw/upstream/backend.py): a slot on an endpoint.
            pool = await self._admit(backend, head, rid, kind != BODY_NONE)
            if pool is None:
                return buf, pos, kind == BODY_NONE and head.keep_alive and not gw.draining
        else:
            pool = backend.pick()
            if pool is None:
                # Every endpoint asked for a pause (Retry-After): pass that on.
                await self._unavailable(backend.resume_in_s(), rid, kind != BODY_NONE)
                return buf, pos, kind == BODY_NONE and head.keep_alive and not gw.draining
        if state.credentials:
            # Upstream credential: waits for a first fetch; SigV4 reads the body whole.
            got_cred = await self._credential_ready(state, head, route, pool, buf, pos, rid)
            if got_cred is None:
                return buf, pos, False
            if got_cred is False:
                return buf, pos, kind == BODY_NONE and head.keep_alive and not gw.draining
            buf = got_cred
        try:
            up_head = _upstream_head(self, state, head, route, pool, path, rid, id_extra)
        except CredentialUnavailable:
            await self._no_credential(rid, kind != BODY_NONE)
            return buf, pos, kind == BODY_NONE and head.keep_alive and not gw.draining
        # To send the same request to another endpoint (a retry): its head, then the body.
        retry = (state, head, route, path, rid, id_extra, len(up_head))
        bcfg = backend.config
        deadline_total = gw.now + (route.total_timeout_s or bcfg.total_timeout_s)

        # Body bytes already buffered go out with the head.
        reader = None
        remaining = 0
        if kind == BODY_NONE:
            first = up_head
        elif kind == BODY_LENGTH:
            remaining = head.content_length
            avail = len(buf) - pos
            if avail > remaining:
                avail = remaining
            first = up_head + buf[pos : pos + avail] if avail else up_head
            pos += avail
            remaining -= avail
            if remaining and head.expect_continue and avail == 0:
                await t.send_all(_CONTINUE)
        else:
            reader = ChunkedReader(max_trailer_bytes=lim.max_head_bytes)
            end = reader.scan(buf, pos)
            if max_body and reader.body_bytes > max_body:
                gw.count_error("body_too_large")
                await self.send_error(
                    413,
                    "body_too_large",
                    f"request body over {max_body} bytes",
                    rid,
                    close=True,
                )
                return buf, pos, False
            first = up_head + buf[pos:end] if end > pos else up_head
            if not reader.done and end == len(buf) and end == pos and head.expect_continue:
                await t.send_all(_CONTINUE)
            pos = end
        # Whether the whole request is in ``first``: only then can it be sent again.
        replayable = not remaining and (reader is None or reader.done)
        idempotent = method in _IDEMPOTENT

        resil = route.resil
        if resil is not None:
            # Retries, hedging or cold-start timeouts on this route (upstream/retry.py).
            safe = idempotent or resil.idempotent or head.get(b"idempotency-key") is not None
            if safe and kind:
                if kind == BODY_LENGTH:
                    body_len = head.content_length
                else:  # chunked: known once the whole body is in hand
                    body_len = reader.body_bytes if reader is not None and reader.done else -1
                if body_len < 0 or body_len > resil.replay_buffer_bytes:
                    safe = False  # never sent twice: over the replay buffer, or unknown
            if (
                safe
                and not replayable
                and reader is None
                and head.content_length <= resil.replay_buffer_bytes
            ):
                # Small enough to keep: read it whole so it can be sent again.
                self.phase = BODY
                try:
                    first, buf = await self._read_whole_body(first, remaining, lim)
                except ClientGone:
                    gw.count_error("client_gone")
                    return buf, pos, False
                pos = 0
                remaining = 0
                replayable = True
            if replayable:
                got = await self._resilient(
                    head, route, resil, backend, pool, first, rid, retry, safe, deadline_total
                )
                if got is None:
                    return buf, pos, head.keep_alive and not gw.draining
                conn, pool, rh, ubuf, upos, retries, fb_s = got
                ut = conn.transport
            else:
                resil = None
        if resil is None:
            self.phase = UPSTREAM
            self.deadline = deadline_total
            # Fast path: a pooled connection and one send. A connection idle for a moment
            # is not checked for a FIN first (a system call per request); if the function's
            # front end closed it, nothing comes back and an idempotent request is replayed.
            conn = pool.acquire_idle_nowait(gw.now, not idempotent)
            sent = False
            if conn is not None:
                self.upconn = conn
                try:
                    ut = conn.transport
                    n = ut.send_nowait(first)
                    if n != len(first):
                        await ut.send_all(first[n:] if n else first)
                    sent = True
                except OSError:
                    pool.release(conn, False)
                    self.upconn = None
                    gw.count_error("dead_pooled_connection")
            if not sent:
                # After an error the client connection stays usable only if the whole
                # request was read (its framing is then not in doubt).
                keep = replayable and head.keep_alive and not gw.draining
                got = await self._connect_and_send(backend, pool, first, rid, keep, retry)
                if got is None:
                    return buf, pos, keep
                conn, pool, first = got
            ut = conn.transport

            # Stream the rest of the request body, client -> upstream.
            if not replayable:
                self.phase = BODY
                try:
                    buf, pos = await self._stream_request_body(ut, reader, remaining, lim, max_body)
                except ClientGone:
                    pool.release(conn, False)
                    self.upconn = None
                    gw.count_error("client_gone")
                    return buf, pos, False
                except ProtocolError as e:
                    pool.release(conn, False)
                    self.upconn = None
                    code = "body_too_large" if e.status == 413 else "bad_request_body"
                    gw.count_error(code)
                    await self.send_error(e.status, code, e.detail, rid, close=True)
                    return buf, pos, False
                except UpstreamFailed as e:
                    pool.release(conn, False)
                    self.upconn = None
                    gw.count_error(e.code)
                    await self.send_error(e.status, e.code, e.detail, rid, close=True)
                    return buf, pos, False

            # Response head.
            self.phase = UPSTREAM
            fb = gw.now + (route.first_byte_timeout_s or bcfg.first_byte_timeout_s)
            self.deadline = fb if fb < deadline_total else deadline_total
            is_head = method == b"HEAD"
            retries = 0
            t_sent = _clock()
            try:
                try:
                    # Fast path: the whole final head in the first read.
                    try:
                        ubuf = await ut.recv_after_wait()
                    except (ConnectionResetError, BrokenPipeError):
                        ubuf = b""
                    rh = parse_response_head(ubuf, 0, request_was_head=is_head) if ubuf else None
                    if rh is not None and (rh.status >= 200 or rh.status == 101):
                        upos = rh.head_len
                    else:
                        rh, ubuf, upos = await self._response_head(ut, is_head, ubuf)
                except _NothingBack:
                    # Nothing came back: a reused connection the function's side had closed,
                    # or an endpoint that died with the request in flight. An idempotent
                    # request (RFC 9110 9.2.2) read whole is sent once more, to another
                    # endpoint when there is one; anything else gets its 502.
                    if not (replayable and idempotent):
                        raise
                    retries = 1
                    reused = conn.exchanges > 0
                    pool.release(conn, False)
                    self.upconn = None
                    gw.count_error("dead_pooled_connection" if reused else "retried")
                    keep = head.keep_alive and not gw.draining
                    alt = pool if reused else backend.pick_other(pool)
                    if alt is not pool:
                        again = _rebuild(self, retry, alt, first)
                        if again is not None:
                            self._move_slot(pool, alt)
                            first, pool = again, alt
                    got = await self._connect_and_send(backend, pool, first, rid, keep, retry)
                    if got is None:
                        return buf, pos, keep
                    conn, pool, first = got
                    ut = conn.transport
                    rh, ubuf, upos = await self._response_head(ut, is_head, None)
            except (ProtocolError, UpstreamFailed, OSError) as e:
                pool.release(conn, False)
                pool.failed()  # a gateway failure, toward outlier ejection
                self.upconn = None
                if isinstance(e, UpstreamFailed):
                    code, detail = e.code, e.detail
                elif isinstance(e, ProtocolError):
                    code, detail = "bad_upstream_response", "upstream sent a malformed response"
                else:
                    code, detail = "upstream_reset", "upstream connection failed"
                gw.count_error(code)
                # The request was read whole: the client connection is still in sync.
                keep = head.keep_alive and not gw.draining
                await self.send_error(502, code, detail, rid, close=not keep)
                return buf, pos, keep

            fb_s = _clock() - t_sent
            backend.first_byte.observe(fb_s)

        # Response head and body, upstream -> client.
        keep = head.keep_alive and not gw.draining
        ukind = rh.body_kind
        if ukind == BODY_UNTIL_CLOSE or rh.status == 101:
            keep = False
        resp_extra = (
            b"X-Request-Id: " + rid + b"\r\n" + route.resp_extra
            if route.resp_extra
            else b"X-Request-Id: " + rid + b"\r\n"
        )
        if budget_fields:
            resp_extra += budget_fields
        out_head = build_response_head(
            rh,
            close=not keep,
            keep_alive_10=keep and head.version == 10,
            extra=resp_extra,
            via=state.via,
            strip=route.resp_strip,
        )
        self.phase = RESPONSE
        bt = gw.now + lim.body_timeout_s
        self.deadline = bt if bt < deadline_total else deadline_total
        reusable = rh.keep_alive
        self.answered = True
        try:
            if ukind == BODY_LENGTH:
                left = rh.content_length
                avail = len(ubuf) - upos
                if avail >= left:
                    # The whole body came with the head: the common case for functions.
                    if avail > left:
                        reusable = False
                    out = out_head + ubuf[upos : upos + left] if left else out_head
                    n = t.send_nowait(out)
                    if n != len(out):
                        await t.send_all(out[n:] if n else out)
                else:
                    await t.send_all(out_head + ubuf[upos:] if avail else out_head)
                    left -= avail
                    while left:
                        data = await self._upstream_piece(ut, deadline_total, lim)
                        if len(data) > left:
                            reusable = False
                            data = data[:left]
                        left -= len(data)
                        await t.send_all(data)
            elif ukind == BODY_NONE:
                await t.send_all(out_head)
                if upos < len(ubuf):
                    reusable = False
            elif ukind == BODY_CHUNKED:
                ureader = ChunkedReader(response=True)
                end = ureader.scan(ubuf, upos)
                if ureader.done and end < len(ubuf):
                    reusable = False
                await t.send_all(out_head + ubuf[upos:end] if end > upos else out_head)
                while not ureader.done:
                    data = await self._upstream_piece(ut, deadline_total, lim)
                    end = ureader.scan(data)
                    if end < len(data):
                        reusable = False
                    await t.send_all(data[:end] if end < len(data) else data)
            else:  # until close
                reusable = False
                await t.send_all(out_head + ubuf[upos:] if upos < len(ubuf) else out_head)
                while True:
                    bt = gw.now + lim.body_timeout_s
                    self.deadline = bt if bt < deadline_total else deadline_total
                    data = await ut.recv()
                    if not data:
                        break
                    await t.send_all(data)
        except UpstreamFailed as e:
            # The response already started: the client can only learn of it by an abort.
            pool.release(conn, False)
            self.upconn = None
            gw.count_error(e.code)
            t.abort()
            return buf, pos, False
        except ProtocolError:
            pool.release(conn, False)
            self.upconn = None
            gw.count_error("bad_upstream_response")
            t.abort()
            return buf, pos, False
        except OSError:
            # Which side failed is unknown from here; neither connection is reused.
            pool.release(conn, False)
            self.upconn = None
            gw.count_error("stream_reset")
            t.abort()
            return buf, pos, False
        pool.release(conn, reusable, gw.now)
        self.upconn = None
        self.phase = DONE
        status = rh.status
        route.status_counts[status // 100] += 1
        # The outcome, for balancing (pool.py): a 429/503 with Retry-After pauses the
        # endpoint, 5xx count toward ejection; else one compare (and a reset after errors).
        # report_from is 429, or 401 for an endpoint with an upstream credential (a 401
        # refusing it asks for a new one, binding.py).
        if status >= pool.report_from:
            pool.outcome(status, rh)
        elif pool.c5xx:
            pool.c5xx = pool.cgw = 0
        dur = _clock() - self.t0
        route.duration.observe(dur)
        audit = gw.audit
        if audit is not None and (status >= 400 or audit.sample >= 1.0 or audit.wants_success()):
            # One typed call into a preallocated C record (fields in fastgw.audit.FIELDS
            # order; see AuditRing.add): formatting happens in the audit task.
            audit.ring.add(
                self.t0, rid, self.peer_ip, route.name, backend.name, pool.endpoint.url,
                status, "allow", self.decision_reason, self.identity, dur, fb_s,
                head.content_length if kind == BODY_LENGTH
                else (reader.body_bytes if reader is not None else 0),
                rh.content_length if ukind == BODY_LENGTH else None,
                retries, head.get(b"traceparent"),
            )  # fmt: skip
        return buf, pos, keep

    async def _response_head(self, ut: PlainTransport, is_head: bool, ubuf: bytes | None):  # type: ignore[no-untyped-def]
        """Read until a final response head, starting from ``ubuf`` if the first read
        was done already; returns (head, buffer, body offset). Raises _NothingBack when
        the connection ended before any byte came back, UpstreamFailed when it ended
        later, ProtocolError on a malformed head."""
        if ubuf is None:
            try:
                ubuf = await ut.recv_after_wait()
            except (ConnectionResetError, BrokenPipeError):
                raise _NothingBack() from None
        if not ubuf:
            raise _NothingBack()
        upos = 0
        uscan = 0
        while True:
            rh = parse_response_head(ubuf, upos, request_was_head=is_head, scan_from=uscan)
            if rh is not None:
                if rh.status >= 200 or rh.status == 101:
                    return rh, ubuf, upos + rh.head_len
                upos += rh.head_len  # 1xx interim responses are not relayed
                uscan = 0
                continue
            data = await ut.recv()
            if not data:
                raise UpstreamFailed(
                    502, "upstream_closed", "upstream closed the connection mid-head", sent=True
                )
            old = len(ubuf) - upos
            ubuf = ubuf[upos:] + data
            upos = 0
            uscan = old - 3 if old > 3 else 0

    async def _credential_ready(self, state, head, route, pool, buf: bytes, pos: int, rid: bytes):  # type: ignore[no-untyped-def]
        """Before the head is built for a pool with an upstream credential: wait for
        its first fetch (a cold start; bounded by the connect timeout) and, for SigV4,
        read the body whole and hash it. Returns the buffer (the whole body after
        ``pos``), False after answering 503 (the connection may be kept), or None after
        answering (or losing) a client whose connection must close."""
        cb = state.credentials.get(pool)
        if cb is None:
            return buf
        gw = self.gw
        if not cb.ready(gw.now) and cb.cold():
            self.phase = UPSTREAM
            self.deadline = gw.now + cb.wait_s + 1.0
            with trio.move_on_after(cb.wait_s):
                await cb.cache.wait_current()
        if not cb.ready(gw.now):
            await self._no_credential(rid, head.body_kind != BODY_NONE)
            return False
        if not cb.signs_body:
            return buf
        self.payload_hash = None
        if head.body_kind == BODY_NONE:
            return buf
        return await self._read_signed_body(head, route, buf, pos, rid)

    async def _read_signed_body(self, head, route, buf: bytes, pos: int, rid: bytes):  # type: ignore[no-untyped-def]
        """Read the request body whole into the buffer and set ``payload_hash`` (SigV4
        signs it: Lambda takes no unsigned payloads). Over the limit: 413."""
        from fastgw.upstream.binding import MAX_SIGNED_BODY_BYTES
        from fastgw.upstream.sigv4 import payload_sha256

        gw = self.gw
        t = self.t
        lim = self.gw.state.limits
        limit = MAX_SIGNED_BODY_BYTES
        if route.max_body_bytes and route.max_body_bytes < limit:
            limit = route.max_body_bytes
        detail = f"request body over {limit} bytes (signed bodies are read whole)"
        if head.body_kind == BODY_LENGTH and head.content_length > limit:
            gw.count_error("body_too_large")
            await self.send_error(413, "body_too_large", detail, rid, close=True)
            return None
        if head.expect_continue and pos >= len(buf):
            await t.send_all(_CONTINUE)
        acc = bytearray(buf)
        self.phase = BODY
        try:
            if head.body_kind == BODY_LENGTH:
                need = pos + head.content_length
                while len(acc) < need:
                    self.deadline = gw.now + lim.body_timeout_s
                    data = await t.recv()
                    if not data:
                        raise ClientGone()
                    acc += data
                whole = bytes(acc)
                self.payload_hash = payload_sha256(whole[pos:need])
                return whole
            reader = ChunkedReader(max_trailer_bytes=lim.max_head_bytes)
            reader.scan(acc, pos)
            while not reader.done:
                if reader.body_bytes > limit:
                    raise ProtocolError(detail, status=413)
                self.deadline = gw.now + lim.body_timeout_s
                data = await t.recv()
                if not data:
                    raise ClientGone()
                acc += data
                reader.scan(data)
            if reader.body_bytes > limit:
                raise ProtocolError(detail, status=413)
            whole = bytes(acc)
            # The payload is the body without its chunk framing (RFC 9112 7.1).
            _, pieces = ChunkedReader(max_trailer_bytes=lim.max_head_bytes).decode(whole, pos)
            self.payload_hash = payload_sha256(b"".join(pieces))
            return whole
        except ClientGone:
            gw.count_error("client_gone")
            return None
        except ProtocolError as e:
            code = "body_too_large" if e.status == 413 else "bad_request_body"
            gw.count_error(code)
            await self.send_error(e.status, code, e.detail, rid, close=True)
            return None

    async def _no_credential(self, rid: bytes, close: bool) -> None:
        self.gw.count_error("upstream_credential_unavailable")
        await self.send_error(
            503,
            "upstream_credential_unavailable",
            "no valid credential for the function endpoint (its token source is failing)",
            rid,
            close=close,
        )

    async def _admit(self, backend, head, rid: bytes, close: bool):  # type: ignore[no-untyped-def]
        """A slot on one of ``backend``'s endpoints (waiting in its queue if need be);
        None when the request was answered (503/429 with Retry-After)."""
        hk = None
        if backend.config.balance == "hash":
            hk = head.get(backend.hash_header) if backend.hash_header else self.caller_key()
        ident = self.caller_key() if backend.ident_cap else None
        # The queue wait has its own timeout; keep the watchdog from cutting it short.
        self.phase = UPSTREAM
        self.deadline = self.gw.now + backend.config.queue_timeout_s + 1.0
        try:
            pool = backend.admit_nowait(ident, hk)
            if pool is None:
                pool = await self._queued(backend, ident, hk)
                if pool is None:
                    self.gw.count_error("client_gone")
                    return None
        except Unavailable as e:
            self.gw.count_error(e.code)
            await self.send_error(
                e.status, e.code, e.detail, rid, close=close,
                extra=b"Retry-After: %d\r\n" % e.retry_after_s,
            )  # fmt: skip
            return None
        self.slot = (backend, pool, ident)
        return pool

    async def _queued(self, backend, ident: bytes | None, hk: bytes | None) -> Pool | None:  # type: ignore[no-untyped-def]
        """Wait in ``backend``'s queue while watching the client: one that closes its
        connection meanwhile leaves the queue (None). Raises Unavailable."""
        pool = None
        refused = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_client_gone, nursery.cancel_scope)
            try:
                pool = await backend.admit_wait(ident, hk)
            except Unavailable as e:
                refused = e  # raised outside the nursery, not in an exception group
            nursery.cancel_scope.cancel()
        if refused is not None:
            raise refused
        return pool

    async def _watch_client_gone(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` if the client closes its connection (EOF or reset). Bytes
        arriving instead (a pipelined request) end the watch: they are read later."""
        sock = self.t.sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                scope.cancel()
            return

    def release_slot(self) -> None:
        slot = self.slot
        if slot is not None:
            self.slot = None
            slot[0].release(slot[1], slot[2])

    def _move_slot(self, old: Pool, new: Pool) -> None:
        """A retry goes to ``new``: the request's admission slot (gated backends) goes
        with it (``Backend.move``). Nothing for ungated backends (no slot)."""
        slot = self.slot
        if slot is not None and slot[1] is old and new is not old:
            slot[0].move(old, new)
            self.slot = (slot[0], new, slot[2])

    def caller_key(self) -> bytes:
        """Who is calling, for hashing and per-caller caps: the verified identity, or
        the client address for anonymous callers."""
        i = self.identity
        if i is None or i.kind == "anonymous":
            return b"ip:" + self.peer_ip
        return f"{i.kind}:{i.issuer or ''}:{i.subject}".encode()

    async def _unavailable(self, wait_s: float, rid: bytes, close: bool) -> None:
        self.gw.count_error("upstream_paused")
        await self.send_error(
            503, "upstream_paused", "the function asked for a pause (Retry-After)", rid,
            close=close, extra=b"Retry-After: %d\r\n" % max(1, math.ceil(wait_s)),
        )  # fmt: skip

    async def _upstream_piece(self, ut: PlainTransport, deadline_total: float, lim) -> bytes:  # type: ignore[no-untyped-def]
        bt = self.gw.now + lim.body_timeout_s
        self.deadline = bt if bt < deadline_total else deadline_total
        data = await ut.recv()
        if not data:
            raise UpstreamFailed(502, "upstream_closed", "upstream closed mid-response", sent=True)
        return data

    async def _connect_and_send(  # type: ignore[no-untyped-def]
        self, backend, pool: Pool, first: bytes, rid: bytes, keep: bool, retry
    ):
        """Open a fresh connection (or wait for one at the pool's cap) and send
        ``first``; returns (connection, pool, bytes sent). A connection that could not be
        opened sent nothing, so the request goes to another endpoint once (any method).
        On failure answers the client (closing unless ``keep``) and returns None."""
        gw = self.gw
        for attempt in (0, 1):
            try:
                conn = await pool.acquire(fresh=True)
            except UpstreamConnectError as e:
                if not e.saturated and not e.timeout and attempt == 0:
                    alt = backend.pick_other(pool)
                    again = _rebuild(self, retry, alt, first) if alt is not pool else None
                    if again is not None:
                        gw.count_error("connect_failed_retried")
                        self._move_slot(pool, alt)
                        first, pool = again, alt
                        continue
                status, code, detail = _connect_answer(e)
                gw.count_error(code)
                await self.send_error(status, code, detail, rid, close=not keep)
                return None
            self.upconn = conn
            try:
                await conn.transport.send_all(first)
            except OSError:
                pool.release(conn, False)
                self.upconn = None
                gw.count_error("upstream_reset")
                await self.send_error(
                    502, "upstream_reset", "upstream connection failed", rid, close=not keep
                )
                return None
            return conn, pool, first
        return None

    # -- retries and hedging: routes with retry/hedge/cold settings (upstream/retry.py) --

    async def _read_whole_body(self, first: bytes, remaining: int, lim) -> tuple[bytes, bytes]:  # type: ignore[no-untyped-def]
        """``first`` completed with the rest of a Content-Length body read from the
        client; returns (the whole request, what the client sent after the body)."""
        t = self.t
        gw = self.gw
        parts = [first]
        while True:
            self.deadline = gw.now + lim.body_timeout_s
            data = await t.recv()
            if not data:
                raise ClientGone()
            if len(data) >= remaining:
                parts.append(data[:remaining] if len(data) > remaining else data)
                return b"".join(parts), data[remaining:]
            parts.append(data)
            remaining -= len(data)

    async def _resilient(  # type: ignore[no-untyped-def]
        self, head, route, resil, backend, pool, first: bytes, rid: bytes, retry, safe: bool,
        deadline_total: float,
    ):  # fmt: skip
        """Send a request held whole, with the route's retries, hedging and cold-start
        first-byte timeouts. ``safe``: repeating it is harmless (idempotent method or
        route, or an Idempotency-Key); otherwise only a request that never reached the
        function is sent again. Returns (conn, pool, response head, buffer, body
        offset, retries, first-byte seconds), or None after answering an error."""
        gw = self.gw
        bcfg = backend.config
        rp = resil.retry
        hp = resil.hedge if safe else None
        counts = resil.counts
        if rp is not None:
            rp.budget.deposit(gw.now)
        if hp is not None:
            hp.budget.deposit(gw.now)
        max_retries = (rp.attempts if rp is not None else 1) if safe else 0
        is_head = head.method == b"HEAD"
        fb_timeout_s = route.first_byte_timeout_s or bcfg.first_byte_timeout_s
        cold_fb_s = bcfg.cold_first_byte_timeout_s
        keep = head.keep_alive and not gw.draining
        retries = 0
        unsent_retried = False
        self.phase = UPSTREAM
        self.deadline = deadline_total
        orig, orig_pool = first, pool

        def request_for(p: Pool) -> bytes | None:
            # Always rebuilt from the original bytes (their head length is known).
            return orig if p is orig_pool else _rebuild(self, retry, p, orig)

        while True:
            cold = (hp is not None or cold_fb_s is not None) and likely_cold(pool, bcfg, gw.now)
            end = trio.current_time() + (cold_fb_s if cold and cold_fb_s else fb_timeout_s)
            outcome = await self._race(
                backend, pool, first, request_for, is_head, hp, cold, end if end < deadline_total
                else deadline_total, rp, counts,
            )  # fmt: skip
            kind = outcome[0]
            if kind == "ok":
                _, conn, pool, rh, ubuf, upos, fb_s = outcome
                backend.first_byte.observe(fb_s)
                if hp is not None:
                    track_of(pool).observe(fb_s)
                status = rh.status
                if rp is None or status not in rp.statuses:
                    self.upconn = conn
                    return conn, pool, rh, ubuf, upos, retries, fb_s
                stuck = backend.gated and _no_retry_slot(backend, pool, rh)
                if retries >= max_retries or stuck or not rp.budget.try_spend(gw.now):
                    if retries < max_retries and not stuck:
                        counts[3] += 1
                    self.upconn = conn  # the function's own answer is relayed
                    return conn, pool, rh, ubuf, upos, retries, fb_s
                # Retried: report it here (a 429/503 with Retry-After pauses the endpoint).
                pool.outcome(status, rh)
                pool.release(conn, False)
            elif kind == "unsent":
                # Nothing reached the function: any method goes elsewhere, once.
                err = outcome[2]
                alt = backend.pick_other(pool)
                alt_first = request_for(alt) if alt is not pool else None
                if not unsent_retried and alt_first is not None:
                    unsent_retried = True
                    counts[0] += 1
                    gw.count_error("connect_failed_retried")
                    self._move_slot(pool, alt)
                    first = alt_first
                    pool = alt
                    continue
                status, code, detail = _connect_answer(err)
                gw.count_error(code)
                await self.send_error(status, code, detail, rid, close=not keep)
                return None
            else:
                if kind == "timeout":
                    wanted = rp is not None and rp.on_timeout
                    status, code = 504, "upstream_timeout"
                    detail = "the function did not answer in time"
                else:  # "reset": nothing or only part of a head came back
                    wanted = rp is None or rp.on_reset
                    status, code, detail = 502, outcome[2], outcome[3]
                if wanted and backend.gated and _no_retry_slot(backend, pool, None):
                    wanted = False  # nowhere to go: the original error, at once
                if wanted and retries < max_retries and rp is not None:
                    if not rp.budget.try_spend(gw.now):
                        counts[3] += 1
                        wanted = False
                if not wanted or retries >= max_retries:
                    gw.count_error(code)
                    await self.send_error(status, code, detail, rid, close=not keep)
                    return None
            # A retry, on another endpoint when there is one, after a jittered pause.
            retries += 1
            counts[0] += 1
            gw.count_error("retried")
            if rp is not None:
                pause_s = rp.backoff_s(retries - 1)
                if pause_s > 0.0:
                    await trio.sleep(pause_s)
            alt = backend.pick_other(pool)
            alt_first = request_for(alt) if alt is not pool else None
            if alt_first is not None:
                self._move_slot(pool, alt)
                first = alt_first
                pool = alt

    async def _race(  # type: ignore[no-untyped-def]
        self, backend, pool, first: bytes, request_for, is_head: bool, hp, cold: bool,
        end: float, rp, counts,
    ):  # fmt: skip
        """One attempt at ``pool`` until ``end`` (trio time), hedged per ``hp``: when no
        response head came within the hedge delay, the same request goes to another
        endpoint and the first response head wins; the others are cancelled and their
        connections closed (never pooled). Returns ("ok", conn, pool, head, buffer,
        offset, first-byte s), ("unsent", pool, UpstreamConnectError), ("timeout",
        pool) or ("reset", pool, code, detail)."""
        gw = self.gw
        won: list[Any] = []
        failed: list[Any] = []
        done = trio.Event()
        retry_statuses = rp.statuses if rp is not None else ()
        pending = 0

        async def attempt(p: Pool, data: bytes) -> None:
            nonlocal pending
            conn = None
            t0 = _clock()
            try:
                conn = p.acquire_idle_nowait(trio.current_time())
                if conn is not None:
                    try:
                        await conn.transport.send_all(data)
                    except OSError:
                        p.release(conn, False)
                        conn = None
                        gw.count_error("dead_pooled_connection")
                if conn is None:
                    try:
                        conn = await p.acquire(fresh=True)
                    except UpstreamConnectError as e:
                        failed.append(("unsent", p, e))
                        return
                    try:
                        await conn.transport.send_all(data)
                    except OSError:
                        failed.append(("reset", p, "upstream_reset", "upstream connection failed"))
                        return
                try:
                    rh, ubuf, upos = await self._response_head(conn.transport, is_head, None)
                except UpstreamFailed as e:
                    failed.append(("reset", p, e.code, e.detail))
                    p.failed()
                    return
                except ProtocolError:
                    failed.append(
                        ("reset", p, "bad_upstream_response", "upstream sent a malformed response")
                    )
                    p.failed()
                    return
                except OSError:
                    failed.append(("reset", p, "upstream_reset", "upstream connection failed"))
                    p.failed()
                    return
                if won:
                    return
                if rh.status in retry_statuses and pending > 1:
                    # A retryable answer while another attempt may still do better.
                    failed.append(("reset", p, "upstream_error", f"upstream answered {rh.status}"))
                    p.outcome(rh.status, rh)
                    return
                won.append((conn, p, rh, ubuf, upos, _clock() - t0))
                conn = None
                done.set()
            finally:
                if conn is not None:
                    p.release(conn, False)
                pending -= 1
                if not pending:
                    done.set()

        used = [pool]
        hedged: list[Pool] = []  # endpoints whose hedge holds a slot (gated backends)
        try:
            async with trio.open_nursery() as nursery:
                with trio.move_on_at(end) as timer:
                    pending = 1
                    nursery.start_soon(attempt, pool, first)
                    while not done.is_set():
                        if hp is None or len(used) >= hp.max_attempts:
                            await done.wait()
                            break
                        with trio.move_on_after(hp.delay_s(pool, cold)):
                            await done.wait()
                        if done.is_set():
                            break
                        alt = _other_endpoint(backend, used)
                        alt_first = None if alt is None else request_for(alt)
                        if alt is None or alt_first is None:
                            hp = None
                        elif not hp.budget.try_spend(gw.now):
                            counts[4] += 1
                            hp = None
                        else:
                            counts[1] += 1
                            pending += 1
                            used.append(alt)
                            pool = alt
                            cold = False
                            if backend.gated:
                                backend.take_hedge(alt)  # a slot for the race's duration
                                hedged.append(alt)
                            nursery.start_soon(attempt, alt, alt_first)
                nursery.cancel_scope.cancel()
        except BaseException:
            for p in hedged:
                backend.release(p, None)
            if won:  # cancelled just after a win: that connection is in doubt
                won[0][1].release(won[0][0], False)
            raise
        if hedged:
            # The losers' slots go back; a hedge that won keeps its slot as the
            # request's own, and the first attempt's goes back instead.
            winner = won[0][1] if won else None
            for p in hedged:
                if p is winner:
                    backend.release(used[0], None)
                    slot = self.slot
                    self.slot = (backend, p, slot[2] if slot is not None else None)
                else:
                    backend.release(p, None)
        if won:
            conn, p, rh, ubuf, upos, fb_s = won[0]
            if p is not used[0]:
                counts[2] += 1
            return "ok", conn, p, rh, ubuf, upos, fb_s
        if timer.cancelled_caught:
            used[0].failed()
            return "timeout", used[0]
        for f in failed:
            if f[0] != "unsent":
                return f  # it may have reached a function: the stricter rules apply
        return failed[0]

    async def _stream_request_body(self, ut, reader, remaining: int, lim, max_body: int):  # type: ignore[no-untyped-def]
        """Client -> upstream until the body ends; returns (buf, pos) with what the client
        sent after the body (the next pipelined request)."""
        t = self.t
        gw = self.gw
        total = 0
        while True:
            self.deadline = gw.now + lim.body_timeout_s
            data = await t.recv()
            if not data:
                raise ClientGone()
            if reader is None:
                if len(data) > remaining:
                    piece, rest = data[:remaining], data[remaining:]
                else:
                    piece, rest = data, b""
                remaining -= len(piece)
                await self._to_upstream(ut, piece)
                if not remaining:
                    return rest, 0
            else:
                end = reader.scan(data)
                if max_body and reader.body_bytes > max_body:
                    raise ProtocolError(f"request body over {max_body} bytes", status=413)
                total += end
                await self._to_upstream(ut, data[:end] if end < len(data) else data)
                if reader.done:
                    return data[end:], 0

    async def _to_upstream(self, ut: PlainTransport, data: bytes) -> None:
        try:
            await ut.send_all(data)
        except OSError:
            raise UpstreamFailed(
                502,
                "upstream_reset",
                "upstream connection failed while sending the request body",
                sent=True,
            ) from None

    def _over_limit(self, route: Route, head):  # type: ignore[no-untyped-def]
        """(limit, seconds to wait) for the first enforced limit this request is over,
        None when it may pass. Takes a token from every limit that allows it."""
        table = self.gw.buckets
        if table is None:
            return None
        now = self.gw.limit_now()
        if route.limits_tiered:
            return self._over_limit_tiered(route, head, table, now)
        for lim in route.limits:
            wait = table.take(
                lim.key(self.identity, self.peer_ip, head), 1, now, lim.rate, lim.burst
            )
            if wait > 0.0:
                if lim.shadow:
                    lim.counts[2] += 1
                    continue
                lim.counts[1] += 1
                return lim, wait
            lim.counts[0] += 1
        return None

    def _over_limit_tiered(self, route: Route, head, table, now: float):  # type: ignore[no-untyped-def]
        """``_over_limit`` for routes with a tiered limit: (limit, None) when the
        caller has no tier of it (403)."""
        identity = self.identity
        for lim in route.limits:
            if lim.tiered:
                tier = lim.tier_for(identity)
                if tier is None:
                    lim.counts[1] += 1
                    return lim, None
                wait = table.take(
                    lim.key(identity, self.peer_ip, head), 1, now, tier.rate, tier.burst
                )
            else:
                wait = table.take(
                    lim.key(identity, self.peer_ip, head), 1, now, lim.rate, lim.burst
                )
            if wait > 0.0:
                if lim.shadow:
                    lim.counts[2] += 1
                    continue
                lim.counts[1] += 1
                return lim, wait
            lim.counts[0] += 1
        return None

    async def _over_limit_shared(self, route: Route, head):  # type: ignore[no-untyped-def]
        """``_over_limit`` with the buckets in Redis: every limit of the route in one
        round trip (``take_many``; an enforced limit that refuses ends the batch). Until
        the gateway has a Redis client (the moment a reload switches stores), the local
        table answers."""
        shared = self.gw.redis_limits
        if shared is None:
            return self._over_limit(route, head)
        identity = self.identity
        peer_ip = self.peer_ip
        takes = []
        for lim in route.limits:
            if lim.tiered:
                tier = lim.tier_for(identity)
                if tier is None:
                    lim.counts[1] += 1
                    return lim, None
                takes.append((lim.key(identity, peer_ip, head), 1, tier.rate, tier.burst))
            else:
                takes.append((lim.key(identity, peer_ip, head), 1, lim.rate, lim.burst))
        waits = await shared.take_many(takes, stop=route.limit_stops)
        for lim, wait in zip(route.limits, waits, strict=False):
            if wait > 0.0:
                if lim.shadow:
                    lim.counts[2] += 1
                    continue
                lim.counts[1] += 1
                return lim, wait
            lim.counts[0] += 1
        return None

    async def _authorize(self, state, head, route: Route, rid: bytes):  # type: ignore[no-untyped-def]
        """Establish who calls and decide whether they may. Returns the identity field
        lines for the upstream head (b"" when there are none), or False after answering
        401/400 (credentials), 403 (a policy) or 503 (the token's issuer has no keys).

        A repeat caller costs dictionary lookups: the verifier returns the same Identity
        object for a cached token, and the identity's header lines and each route's
        policy decision for it are cached by that object (decisions depend on the
        identity alone)."""
        ida = _IDENTITY or _identity_api()
        gw = self.gw
        auth = route.auth
        ident_cfg = state.config.identity
        try:
            identity = await self._authenticate(state, head, ida)
        except (ida.AuthError, ida.IssuerUnavailable) as e:
            ans = ida.answer_for(e, ident_cfg.realm)
            gw.auth_counts[(getattr(e, "issuer", None) or "-", ans.code)] += 1
            gw.count_error("unauthenticated" if ans.status != 503 else "issuer_unavailable")
            await self.send_error(
                ans.status, ans.code, ans.detail, rid, close=head.body_kind != BODY_NONE,
                extra=_header_lines(ans.headers), decision="deny",
            )  # fmt: skip
            return False
        if identity is None:
            if auth is not None and not auth.allow_anonymous:
                ans = ida.answer_for(None, ident_cfg.realm)
                gw.auth_counts[("-", "missing")] += 1
                gw.count_error("unauthenticated")
                await self.send_error(
                    ans.status, ans.code, ans.detail, rid, close=head.body_kind != BODY_NONE,
                    extra=_header_lines(ans.headers), decision="deny",
                )  # fmt: skip
                return False
            identity = ida.ANONYMOUS
        self.identity = identity
        info = gw.identity_info.get(identity)
        if info is None:
            issuer_name = state.iss_names.get(identity.issuer) if identity.kind == "jwt" else None
            info = (issuer_name, identity_lines(identity, issuer_name, ident_cfg))
            if len(gw.identity_info) >= 10000:
                gw.identity_info.clear()
            gw.identity_info[identity] = info
        issuer_name, extra = info
        gw.auth_counts[(issuer_name or identity.kind, "ok")] += 1
        self.decision_reason = None
        if auth is not None:
            denied, shadows = auth.evaluate_cached(identity, issuer_name)
            for s in shadows:
                gw.policy_counts[(s.policy, "shadow_allow" if s.allow else "shadow_deny")] += 1
            if denied is not None:
                gw.policy_counts[(denied.policy, "deny")] += 1
                self.decision_reason = denied.reason
                gw.count_error("forbidden")
                await self.send_error(
                    403, "forbidden", f"denied by policy {denied.reason}", rid,
                    close=head.body_kind != BODY_NONE, decision="deny",
                )  # fmt: skip
                return False
            for name in auth.enforce_names:
                gw.policy_counts[(name, "allow")] += 1
            self.decision_reason = auth.allow_reason
        if ident_cfg.authorization == "move":
            extra += _moved_authorization(head) or b""
        return extra

    async def _authenticate(self, state, head, ida) -> Identity | None:  # type: ignore[no-untyped-def]
        """The caller's identity from, in order: a bearer token, an API key, the verified
        client certificate; None when there is no credential at all. Raises AuthError
        (invalid credentials) or IssuerUnavailable."""
        token = ida.bearer_token(head.get(b"authorization"))
        if token is not None:
            verifier = state.verifier
            if verifier is None:
                raise ida.AuthError("invalid_token", "bearer tokens are not accepted here")
            now = _wall()
            try:
                return verifier.verify(token, now)
            except ida.UnknownKey:
                # A key we have not seen: one (rate-limited) refetch, then once more.
                return await verifier.verify_async(token, now)
        keys = state.config.identity.api_keys
        if keys is not None:
            presented = head.get(keys.header_name)
            if presented is not None:
                ident = keys.lookup(presented)
                if ident is None:
                    raise ida.AuthError("invalid_token", "unknown API key")
                return ident
        peer = self.t.peer_cert
        if peer:
            return ida.identity_from_peer_cert(peer)
        return None

    async def send_error(
        self,
        status: int,
        code: str,
        detail: str,
        rid: bytes,
        *,
        close: bool,
        extra: bytes = b"",
        decision: str = "error",
    ) -> None:
        self.answered = True
        if close and status != 408:  # a client too slow to send is not worth waiting for
            self.linger = True
        route = self.route
        dur = _clock() - self.t0
        if route is not None:
            route.status_counts[status // 100] += 1
            route.duration.observe(dur)
        else:
            self.gw.unrouted_counts[status // 100] += 1
        audit = self.gw.audit
        if audit is not None:
            audit.ring.add(
                self.t0, rid, self.peer_ip, route.name if route else None,
                route.backend.name if route and route.backend else None, None, status,
                decision, code, self.identity, dur, None, None, None, 0, None,
            )  # fmt: skip
        try:
            await self.t.send_all(
                error_response(status, code, detail, rid, close=close, extra=extra)
            )
        except OSError:
            pass

    async def answer_timeout(self) -> None:
        """Called after the connection's deadline fired, outside its scope."""
        phase = self.phase
        if self.answered or phase in (IDLE, DONE):
            return
        if phase in (HEAD, BODY):
            self.gw.count_error("client_timeout")
            await self.send_error(
                408,
                "request_timeout",
                "request not received in time",
                self.rid if phase == BODY else self.gw.next_request_id(),
                close=True,
            )
        elif phase == UPSTREAM:
            self.gw.count_error("upstream_timeout")
            if self.upconn is not None:
                self.upconn.pool.failed()  # a gateway failure, toward outlier ejection
            await self.send_error(
                504, "upstream_timeout", "the function did not answer in time", self.rid, close=True
            )
        else:
            self.gw.count_error("response_timeout")

"""Keep-alive connection pools, one per upstream endpoint.

Strategy: idle connections sit in a LIFO list (the most recently used is the warmest and
the least likely to have been closed by the function's front end). ``acquire`` pops one,
drops it if it has idled past ``idle_timeout_s`` or if a non-blocking MSG_PEEK shows the
peer closed it, and otherwise opens a new connection while the pool is under
``max_size`` (idle + busy); at the cap it waits for a release. A connection goes back
only through ``release(conn, reusable=True)`` after a complete exchange; every other
path closes it, so a connection in an unknown state is never reused.

Raises ``UpstreamConnectError`` when a connection cannot be opened (refused, timeout,
TLS failure); it says whether anything could have reached the function (never, here).

A pool also carries its endpoint's state for balancing (see backend.py): ``down`` is
0.0 while the endpoint may take traffic, else the time until which it should not (an
ejection, a Retry-After pause; ``inf`` while an active health check has it down), so
the balancer tests one float per candidate. The downstream reports outcomes through
``outcome(status, head)`` (a response head) and ``failed()`` (a reset, a timeout, a
malformed response); both cost an int compare and a counter in the common case.
"""

from __future__ import annotations

import math
import socket
import ssl
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import trio

from fastgw.config.model import BackendConfig, Endpoint
from fastgw.transport import PlainTransport, TLSTransport

if TYPE_CHECKING:
    from fastgw.upstream.backend import Backend
    from fastgw.upstream.binding import CredentialBinding
    from fastgw.upstream.retry import EndpointTrack

# A pooled connection idle for less than this is reused without first peeking for a FIN:
# function front ends close idle connections after seconds to minutes (nginx 75 s, Node
# 5 s, Cloud Run ~10 min), so one used in the last second is almost always alive, and the
# rare loser is replayed (idempotent requests) or checked (others).
REUSE_CHECK_AFTER_S = 1.0


# Ejection after a failed connect: 1 s, doubling per consecutive failure, at most 30 s
# (Envoy's outlier detection defaults: base_ejection_time 30 s; shorter here because a
# function that is down often comes back within seconds, e.g. after a deploy).
EJECT_BASE_S = 1.0
EJECT_MAX_S = 30.0


class UpstreamConnectError(Exception):
    """The gateway could not open a connection to an endpoint; nothing was sent."""

    def __init__(
        self, endpoint: Endpoint, reason: str, *, timeout: bool = False, saturated: bool = False
    ) -> None:
        super().__init__(f"{endpoint.url}: {reason}")
        self.endpoint = endpoint
        self.reason = reason
        self.timeout = timeout
        self.saturated = saturated


class UpstreamConn:
    """One pooled connection: its transport, the bytes read past the last response,
    and bookkeeping for expiry and statistics."""

    __slots__ = ("exchanges", "idle_since", "pool", "transport")

    def __init__(self, pool: Pool, transport: PlainTransport) -> None:
        self.pool = pool
        self.transport = transport
        self.idle_since = 0.0
        self.exchanges = 0


@dataclass(slots=True)
class PoolStatistics:
    idle: int
    busy: int
    created: int
    reused: int
    waits: int
    dropped_dead: int


def make_client_tls_context(backend: BackendConfig) -> ssl.SSLContext:
    """A verifying client context: system CAs or ``ca_file``, hostname checks on,
    TLS 1.2 minimum, optional client certificate for mTLS to the function."""
    ctx = ssl.create_default_context(cafile=backend.ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if backend.client_cert_file:
        ctx.load_cert_chain(backend.client_cert_file, backend.client_key_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class Pool:
    __slots__ = (
        "_busy",
        "_check_fails",
        "_check_oks",
        "_connect_failures",
        "_created",
        "_dropped_dead",
        "_idle",
        "_last_ejection_end",
        "_lot",
        "_reused",
        "_waits",
        "admitted",
        "backend",
        "c5xx",
        "cap",
        "cgw",
        "check_state",
        "closed",
        "credential",
        "credential_rejected",
        "down",
        "ejected_until",
        "ejections",
        "endpoint",
        "group",
        "healthy",
        "host_header",
        "idle_timeout_s",
        "max_size",
        "outlier_ejections",
        "path_prefix",
        "paused_until",
        "pauses",
        "report_from",
        "swrr",
        "tls_context",
        "track",  # retries/hedging (fastgw/upstream/retry.py), see below
    )

    def __init__(
        self,
        endpoint: Endpoint,
        backend: BackendConfig,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.endpoint = endpoint
        self.backend = backend
        self.tls_context = tls_context
        self.max_size = backend.pool_max_size
        self.idle_timeout_s = backend.pool_idle_timeout_s
        self.host_header = endpoint.authority.encode("ascii")
        self.path_prefix = endpoint.path_prefix.encode("ascii")
        self._idle: list[UpstreamConn] = []
        self._busy = 0
        self._created = 0
        self._reused = 0
        self._waits = 0
        self._dropped_dead = 0
        self._lot = trio.lowlevel.ParkingLot()
        self.closed = False
        # Passive ejection: after consecutive connect failures the endpoint sits out
        # EJECT_BASE_S x 2^(n-1), capped at EJECT_MAX_S; a success resets the count.
        self.ejected_until = 0.0
        self.ejections = 0
        self._connect_failures = 0
        # Balancing state (backend.py): see the module docstring for ``down``.
        self.down = 0.0
        self.paused_until = 0.0
        self.pauses = 0
        self.healthy = True
        self._check_oks = 0
        self._check_fails = 0
        # Consecutive 5xx responses / gateway failures (Envoy's two outlier counters).
        self.c5xx = 0
        self.cgw = 0
        self.outlier_ejections = 0
        self._last_ejection_end = 0.0
        # Admission (caps): requests admitted to this endpoint now, and its cap.
        self.admitted = 0
        self.cap = endpoint.max_in_flight or (1 << 62)
        self.swrr = 0  # smooth weighted round robin's running weight
        self.group: Backend | None = None  # set by the Backend that owns this pool
        # Recent first-byte latencies, kept by fastgw/upstream/retry.py for routes that
        # hedge (None until one does).
        self.track: EndpointTrack | None = None
        # Upstream credential (fastgw/upstream/binding.py sets these when the backend
        # has one): the binding health checks and keep-warm sign with, and how often
        # the function refused it (401, or 403 with error="invalid_token").
        self.credential: CredentialBinding | None = None
        self.credential_rejected = 0
        # The downstream reports a response's status to ``outcome`` from this status up:
        # 429 (Retry-After, 5xx); 401 with a credential, to see it refused. One compare.
        self.report_from = 429
        # The last active health check's result for /backends (None: no checks).
        self.check_state: str | None = None

    def ejected(self) -> bool:
        if not self.ejected_until:
            return False
        if trio.current_time() >= self.ejected_until:
            self.ejected_until = 0.0
            self._set_down()
            return False
        return True

    # -- endpoint state for balancing ---------------------------------------------------

    def available(self, now: float) -> bool:
        """Healthy, not ejected and not paused at ``now`` (expired states are cleared)."""
        if not self.down:
            return True
        if self.ejected_until and now >= self.ejected_until:
            self.ejected_until = 0.0
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
        self._set_down()
        return not self.down

    def paused(self, now: float) -> bool:
        if self.paused_until and now >= self.paused_until:
            self.paused_until = 0.0
            self._set_down()
        return bool(self.paused_until)

    def _set_down(self) -> None:
        if not self.healthy:
            self.down = math.inf
        else:
            e, p = self.ejected_until, self.paused_until
            self.down = e if e > p else p

    def eject(self, duration_s: float) -> bool:
        """Take the endpoint out of balancing for ``duration_s``, unless the backend's
        ``max_ejection_percent`` is reached. Returns whether it was ejected."""
        now = trio.current_time()
        group = self.group
        if group is not None and not group.may_eject(self, now):
            return False
        self.ejections += 1
        until = now + duration_s
        if until > self.ejected_until:
            self.ejected_until = until
        self._set_down()
        return True

    def pause(self, duration_s: float) -> None:
        """Retry-After: no traffic for ``duration_s`` (already capped by the caller)."""
        until = trio.current_time() + duration_s
        if until > self.paused_until:
            self.paused_until = until
            self.pauses += 1
            self._set_down()
        if self.group is not None:
            self.group.state_changed()

    def set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            self.healthy = healthy
            self._set_down()
            if self.group is not None:
                self.group.state_changed()

    def check_result(self, ok: bool, healthy_threshold: int, unhealthy_threshold: int) -> None:
        """One active health check's result: down after ``unhealthy_threshold`` failures
        in a row, up after ``healthy_threshold`` successes in a row."""
        if ok:
            self._check_fails = 0
            self._check_oks += 1
            if not self.healthy and self._check_oks >= healthy_threshold:
                self.set_healthy(True)
        else:
            self._check_oks = 0
            self._check_fails += 1
            if self.healthy and self._check_fails >= unhealthy_threshold:
                self.set_healthy(False)

    # -- outcome reports (the downstream calls these) -----------------------------------

    def outcome(self, status: int, head: object = None) -> None:
        """A response head came back with ``status`` (``head``: the parsed head, for
        Retry-After). The common case is one compare and, after errors, a reset. A 401
        (or a 403 saying ``error="invalid_token"``) on an endpoint with an upstream
        credential means the function refused it (see ``credential_refused``)."""
        if status >= 429:
            self._bad_status(status, head)
            return
        if (status == 401 or status == 403) and self.credential is not None:
            self.credential_refused(status, head)
        if self.c5xx:
            self.c5xx = self.cgw = 0

    def credential_refused(self, status: int, head: object) -> bool:
        """The function answered ``status`` to a request carrying our credential: a 401,
        or a 403 whose WWW-Authenticate says ``error="invalid_token"`` (RFC 6750 3.1; a
        plain 403 is a permission the token's identity lacks, and a new token would not
        help). Counts it and asks the credential's cache for an early refresh (the cache
        honours one per ``RefreshPolicy.forced_refresh_interval_s``, so a function that
        always answers 401 cannot make us hammer the token source). Returns whether it
        counted as a refusal."""
        binding = self.credential
        if binding is None:
            return False
        if status == 403:
            get = getattr(head, "get", None)
            value = get(b"www-authenticate") if get is not None else None
            if not value or b"invalid_token" not in value:
                return False
        elif status != 401:
            return False
        self.credential_rejected += 1
        binding.cache.request_refresh(trio.current_time())
        return True

    def failed(self) -> None:
        """A gateway failure on an exchange: reset, timeout, malformed response (a
        refused connect is counted by the pool itself)."""
        self.c5xx += 1
        self.cgw += 1
        self._maybe_eject()

    def _bad_status(self, status: int, head: object) -> None:
        if status == 429 or status == 503:
            get = getattr(head, "get", None)
            value = get(b"retry-after") if get is not None else None
            cap_s = self.backend.retry_after_max_s
            if value is not None and cap_s > 0:
                wait_s = retry_after_s(value, time.time())
                if wait_s is not None and wait_s > 0:
                    self.pause(wait_s if wait_s < cap_s else cap_s)
        if status >= 500:
            self.c5xx += 1
            if status == 502 or status == 503 or status == 504:
                self.cgw += 1
            else:
                self.cgw = 0
            self._maybe_eject()
        elif self.c5xx:
            self.c5xx = self.cgw = 0

    def _maybe_eject(self) -> None:
        o = self.backend.outlier
        if (o.consecutive_5xx and self.c5xx >= o.consecutive_5xx) or (
            o.consecutive_gateway_failure and self.cgw >= o.consecutive_gateway_failure
        ):
            self.c5xx = self.cgw = 0
            now = trio.current_time()
            # The multiplier starts over once the endpoint stayed in service for longer
            # than the longest ejection (Envoy lowers it over quiet intervals likewise).
            if self._last_ejection_end and now - self._last_ejection_end > o.max_ejection_time_s:
                self.outlier_ejections = 0
            n = self.outlier_ejections + 1
            duration = min(o.max_ejection_time_s, o.base_ejection_time_s * n)
            if self.eject(duration):
                self.outlier_ejections = n
                self._last_ejection_end = now + duration

    @property
    def outstanding(self) -> int:
        """Requests holding a connection of this pool now (for balancing)."""
        return self._busy

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            idle=len(self._idle),
            busy=self._busy,
            created=self._created,
            reused=self._reused,
            waits=self._waits,
            dropped_dead=self._dropped_dead,
        )

    def acquire_idle_nowait(self, now: float, check: bool = True) -> UpstreamConn | None:
        """A live idle connection, or None. Never blocks.

        ``check`` peeks at the socket (one non-blocking system call) for a FIN the
        function's side sent while the connection idled. Without it, a connection idle
        for under ``REUSE_CHECK_AFTER_S`` is trusted; the caller must then be ready to
        replay the request if nothing comes back."""
        idle = self._idle
        limit = now - self.idle_timeout_s
        while idle:
            conn = idle.pop()
            since = conn.idle_since
            if since < limit:
                conn.transport.close()
                continue
            if (check or now - since >= REUSE_CHECK_AFTER_S) and not conn.transport.is_reusable():
                self._dropped_dead += 1
                conn.transport.close()
                continue
            self._busy += 1
            self._reused += 1
            return conn
        return None

    async def acquire(self, *, fresh: bool = False) -> UpstreamConn:
        """An idle connection (unless ``fresh``), else a new one while under
        ``max_size``, else wait for a release up to the connect timeout. Raises
        UpstreamConnectError."""
        while True:
            if not fresh:
                conn = self.acquire_idle_nowait(trio.current_time())
                if conn is not None:
                    return conn
            elif self._idle and self._busy + len(self._idle) >= self.max_size:
                # At the cap with idle connections: make room for a fresh one.
                self._idle.pop(0).transport.close()
            if self._busy + len(self._idle) < self.max_size:
                self._busy += 1
                try:
                    return await self._open()
                except BaseException:
                    self._busy -= 1
                    if self._lot:
                        self._lot.unpark()
                    raise
            self._waits += 1
            # A saturated endpoint: wait for a release, at most the connect timeout
            # (the caller answers 503: the function exists but has no capacity for us).
            with trio.move_on_after(self.backend.connect_timeout_s) as waited:
                await self._lot.park()
            if waited.cancelled_caught:
                raise UpstreamConnectError(
                    self.endpoint, "no connection available (pool saturated)", saturated=True
                )

    def release(self, conn: UpstreamConn, reusable: bool, now: float | None = None) -> None:
        self._busy -= 1
        conn.exchanges += 1
        if reusable and not self.closed and not conn.transport.closed:
            conn.idle_since = trio.current_time() if now is None else now
            self._idle.append(conn)
        else:
            conn.transport.close()
        if self._lot:
            self._lot.unpark()

    def expire_idle(self, now: float) -> int:
        """Close idle connections past their idle timeout; returns how many."""
        limit = now - self.idle_timeout_s
        keep = [c for c in self._idle if c.idle_since >= limit]
        n = len(self._idle) - len(keep)
        if n:
            for c in self._idle:
                if c.idle_since < limit:
                    c.transport.close()
            self._idle[:] = keep
        return n

    def close(self) -> None:
        self.closed = True
        for c in self._idle:
            c.transport.close()
        self._idle.clear()
        self._lot.unpark_all()

    async def _open(self) -> UpstreamConn:
        ep = self.endpoint
        try:
            with trio.fail_after(self.backend.connect_timeout_s):
                transport = await self._connect()
        except trio.TooSlowError:
            self._connect_failed()
            raise UpstreamConnectError(ep, "connect timeout", timeout=True) from None
        except UpstreamConnectError:
            self._connect_failed()
            raise
        self._connect_failures = 0
        self._created += 1
        return UpstreamConn(self, transport)

    # -- for retries and hedging (fastgw/upstream/retry.py) ------------------------------

    def idle_for_s(self, now: float) -> float | None:
        """How long since this endpoint's last exchange ended: None while a connection
        is busy, inf when there is no connection at all."""
        if self._busy:
            return None
        idle = self._idle
        if not idle:
            return float("inf")
        return now - idle[-1].idle_since

    def _connect_failed(self) -> None:
        self._connect_failures += 1
        n = self._connect_failures
        self.cgw += 1
        self.eject(min(EJECT_MAX_S, EJECT_BASE_S * 2 ** (n - 1)))

    async def _connect(self) -> PlainTransport:
        ep = self.endpoint
        try:
            infos = await trio.socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise UpstreamConnectError(ep, f"resolve failed: {e}") from None
        last: Exception | None = None
        for family, type_, proto, _, addr in infos:
            tsock = trio.socket.socket(family, type_, proto)
            try:
                await tsock.connect(addr)
            except OSError as e:
                tsock.close()
                last = e
                continue
            sock = socket.socket(family, type_, proto, fileno=tsock.detach())
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls_context is None:
                return PlainTransport(sock)
            tls = TLSTransport(
                sock,
                self.tls_context,
                server_side=False,
                server_hostname=self.backend.server_name or ep.host,
            )
            try:
                await tls.handshake()
            except (ssl.SSLError, OSError) as e:
                tls.close()
                raise UpstreamConnectError(ep, f"TLS handshake failed: {e}") from None
            except BaseException:
                tls.close()
                raise
            return tls
        raise UpstreamConnectError(ep, f"connect failed: {last}")


def retry_after_s(value: bytes, now_unix: float) -> float | None:
    """Seconds to wait from a Retry-After value (RFC 9110 10.2.3: delay-seconds or an
    HTTP-date), or None when it is neither."""
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = parsedate_to_datetime(value.decode("latin-1"))
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return when.timestamp() - now_unix

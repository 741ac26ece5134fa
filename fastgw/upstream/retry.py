"""Retries and hedging: what may be sent again, how often, and when.

Strategy. Safety first, from where the request got to:

- Never reached the function (the connect failed or was refused, a pooled connection
  was found dead before any byte went out): sent again on another endpoint whatever
  its method. fastgw/downstream.py does this without any policy object.
- May have reached it: sent again only when repeating it is harmless, i.e. the method
  is idempotent (RFC 9110 9.2.2), the route is marked ``idempotent``, or the client
  sent an Idempotency-Key (the function then deduplicates); only on the outcomes the
  route lists (502/503/504, ``timeout``, ``reset``); only when the whole request is in
  hand (a body up to ``replay_buffer_bytes`` is read whole first; a larger one is
  streamed and never sent twice); and only while the route's retry budget allows.

A ``Budget`` keeps retries (or hedges) to a share of live traffic: every request
deposits ``percent / 100`` of a token, a retry takes a whole one, and deposits fade
with a ~10 s memory (0.9 per second), so the balance tracks "share of the requests of
the last seconds" (Envoy's retry budget is the same idea over active requests, default
20%: envoyproxy.io, config.cluster.v3.CircuitBreakers.Thresholds.RetryBudget). A
small reserve refilled at ``min_retries_per_s`` lets a quiet route still retry.

Backoff is "full jitter": before retry n (0-based) sleep uniform(0, min(max, base *
2^n)). AWS's "Exponential Backoff And Jitter" (Marc Brooker, 2015) showed that
without jitter, clients that failed together retry together and collide again; full
jitter spreads them over the whole window and had the least total work of the
variants compared.

Hedging: when no first byte came within a delay, the same request goes to another
endpoint and the first answer wins (the other attempt is cancelled and its connection
closed). The delay is fixed or learned: a percentile of the endpoint's recent
first-byte latencies (``EndpointTrack``), within bounds. An endpoint that is likely
cold (idle past the backend's scale-to-zero window, no connection at all, or its last
first byte far over its norm) is hedged earlier. Hedges have their own budget.

Keep-warm (optional, per backend): the gateway's watchdog starts a GET to
``keep_warm_path`` on each endpoint that has been idle for ``keep_warm_interval_s``
(and was not pinged within it), so a scale-to-zero platform keeps an instance.

Everything here runs only for routes that configure retries or hedging (and backends
that ask for keep-warm); the default request path never touches this module.
"""

from __future__ import annotations

import random
from array import array
from typing import TYPE_CHECKING

import trio

from fastgw.errors import ProtocolError

if TYPE_CHECKING:
    from fastgw.config.model import BackendConfig, HedgeConfig, RetryConfig, RouteConfig
    from fastgw.gateway import Gateway
    from fastgw.upstream.backend import Backend
    from fastgw.upstream.pool import Pool

# RFC 9110 9.2.2: methods whose repetition has the effect of one request.
IDEMPOTENT_METHODS = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))

# Deposits fade by this factor per second: a deposit counts for about 10 s (Finagle's
# retry budget keeps deposits for a 10 s TTL by default; a fading balance needs no
# per-request bookkeeping).
_FADE_PER_S = 0.9

# "Far over its norm": a first byte this many times the endpoint's median marks it as
# likely cold (a warm function's first-byte latency rarely varies by 4x; a cold start
# is typically 10-100x).
COLD_FACTOR = 4.0

# First-byte latencies kept per endpoint for the learned delay.
TRACK_SAMPLES = 64


class Budget:
    """A share of live traffic that may be spent on extra attempts. ``deposit`` per
    request (cheap: no clock read unless a second passed), ``try_spend`` per retry."""

    __slots__ = ("denied", "earned", "last", "reserve", "reserve_cap", "reserve_per_s", "share",
                 "spent")  # fmt: skip

    def __init__(self, percent: float, reserve_per_s: float) -> None:
        self.share = percent / 100.0
        self.reserve_per_s = reserve_per_s
        self.reserve_cap = max(1.0, reserve_per_s)
        self.reserve = self.reserve_cap
        self.earned = 0.0
        self.last = 0.0
        self.spent = 0
        self.denied = 0

    def deposit(self, now: float) -> None:
        elapsed = now - self.last
        if elapsed >= 1.0:
            self.earned *= _FADE_PER_S**elapsed
            r = self.reserve + elapsed * self.reserve_per_s
            self.reserve = r if r < self.reserve_cap else self.reserve_cap
            self.last = now
        self.earned += self.share

    def try_spend(self, now: float) -> bool:
        """Take one attempt's worth; False (and counted) when the budget is spent."""
        elapsed = now - self.last
        if elapsed > 0.0:
            r = self.reserve + elapsed * self.reserve_per_s
            self.reserve = r if r < self.reserve_cap else self.reserve_cap
            if elapsed >= 1.0:
                self.earned *= _FADE_PER_S**elapsed
            self.last = now
        if self.earned > 0.999999:  # (0.2 * 10 sums to 1.9999...)
            self.earned -= 1.0
        elif self.reserve >= 1.0:
            self.reserve -= 1.0
        else:
            self.denied += 1
            return False
        self.spent += 1
        return True


class RetryPolicy:
    """A route's ``[routes.retry]``, compiled: which outcomes are retried, how many
    times, the backoff and the budget."""

    __slots__ = ("attempts", "base_s", "budget", "max_s", "on_reset", "on_timeout", "rand",
                 "statuses")  # fmt: skip

    def __init__(self, cfg: RetryConfig, rand: random.Random | None = None) -> None:
        self.attempts = cfg.attempts
        self.statuses = frozenset(int(x) for x in cfg.on if x.isdigit())
        self.on_timeout = "timeout" in cfg.on
        self.on_reset = "reset" in cfg.on
        self.base_s = cfg.backoff_base_s
        self.max_s = cfg.backoff_max_s
        self.budget = Budget(cfg.budget_percent, cfg.min_retries_per_s)
        self.rand = rand or random.Random()

    def backoff_s(self, n: int) -> float:
        """Full jitter before retry ``n`` (0 for the first retry)."""
        top = self.base_s * (1 << n) if n < 30 else self.max_s
        return self.rand.random() * (top if top < self.max_s else self.max_s)


class EndpointTrack:
    """Recent first-byte latencies of one endpoint (a ring of ``TRACK_SAMPLES``), for
    the learned hedge delay and the "far over its norm" cold signal."""

    __slots__ = ("_cache", "_cache_n", "last_s", "n", "ring", "warm_at", "warm_failed",
                 "warm_ok", "warming")  # fmt: skip

    def __init__(self) -> None:
        self.ring = array("d", bytes(8 * TRACK_SAMPLES))
        self.n = 0
        self.last_s = 0.0
        # Keep-warm bookkeeping (maybe_keep_warm).
        self.warm_at = float("-inf")
        self.warming = False
        self.warm_ok = 0
        self.warm_failed = 0
        self._cache: list[float] = []
        self._cache_n = -1

    def observe(self, fb_s: float) -> None:
        self.ring[self.n % TRACK_SAMPLES] = fb_s
        self.n += 1
        self.last_s = fb_s

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the recent samples; None before 8 samples.
        Sorted at most once per 8 new samples (a hedged request reads it each time)."""
        n = self.n
        if n < 8:
            return None
        if n - self._cache_n >= 8 or self._cache_n < 0:
            k = n if n < TRACK_SAMPLES else TRACK_SAMPLES
            self._cache = sorted(self.ring[:k])
            self._cache_n = n
        s = self._cache
        i = int(q * len(s))
        return s[i if i < len(s) else len(s) - 1]

    def far_over_norm(self) -> bool:
        norm = self.quantile(0.5)
        return norm is not None and self.last_s > COLD_FACTOR * norm


def track_of(pool: Pool) -> EndpointTrack:
    t = pool.track
    if t is None:
        t = pool.track = EndpointTrack()
    return t


def likely_cold(pool: Pool, bcfg: BackendConfig, now: float) -> bool:
    """Whether ``pool``'s endpoint is likely cold: no connection at all (the next
    request opens a fresh one), idle longer than the backend's ``cold_after_idle_s``,
    or its last first byte far over its norm."""
    idle_s = pool.idle_for_s(now)
    if idle_s is None:
        return False  # busy now: warm
    if idle_s == float("inf"):
        return True  # no connection: a fresh one, maybe a fresh instance
    window = bcfg.cold_after_idle_s
    if window is not None and idle_s > window:
        return True
    t = pool.track
    return t is not None and t.far_over_norm()


class HedgePolicy:
    """A route's ``[routes.hedge]``, compiled."""

    __slots__ = ("budget", "cold_delay_s", "fixed_s", "hi_s", "lo_s", "max_attempts", "q")

    def __init__(self, cfg: HedgeConfig) -> None:
        self.fixed_s = None if cfg.learned else cfg.delay_s
        self.q = cfg.percentile / 100.0
        self.lo_s = cfg.min_delay_s
        self.hi_s = cfg.max_delay_s
        self.cold_delay_s = cfg.cold_delay_s
        self.max_attempts = cfg.max_attempts
        self.budget = Budget(cfg.budget_percent, 1.0)

    def delay_s(self, pool: Pool, cold: bool) -> float:
        """How long to wait for a first byte from ``pool`` before hedging."""
        d = self.fixed_s
        if d is None:
            learned = track_of(pool).quantile(self.q)
            d = self.hi_s if learned is None else learned
            d = self.lo_s if d < self.lo_s else (self.hi_s if d > self.hi_s else d)
        if cold:
            c = self.cold_delay_s
            return d / 4.0 if c is None else (c if c < d else d)
        return d


# Slots of RoutePolicy.counts (exported by fastgw/metrics.py).
RETRIES = 0
HEDGES = 1
HEDGE_WINS = 2
RETRY_BUDGET_EXHAUSTED = 3
HEDGE_BUDGET_EXHAUSTED = 4


class RoutePolicy:
    """What a route does beyond one plain attempt: its retry and hedge policies,
    whether it is idempotent, its replay buffer, and counters. A route has one only
    when it configures retries, hedging or ``idempotent``, or its backend has
    cold-start settings; otherwise the request path never looks further."""

    __slots__ = ("counts", "hedge", "idempotent", "replay_buffer_bytes", "retry")

    def __init__(self, cfg: RouteConfig, previous: RoutePolicy | None = None) -> None:
        self.retry = RetryPolicy(cfg.retry) if cfg.retry is not None else None
        self.hedge = HedgePolicy(cfg.hedge) if cfg.hedge is not None else None
        self.idempotent = cfg.idempotent
        self.replay_buffer_bytes = cfg.replay_buffer_bytes
        # Counters carry over a reload when the route keeps its name.
        self.counts: list[int] = previous.counts if previous is not None else [0] * 5

    @staticmethod
    def wanted(cfg: RouteConfig, backends: list[BackendConfig]) -> bool:
        """Whether a route needs a policy: ``backends`` are the ones it may reach."""
        return (
            cfg.retry is not None
            or cfg.hedge is not None
            or cfg.idempotent
            or any(b.cold_first_byte_timeout_s is not None for b in backends)
        )


# -- keep-warm ------------------------------------------------------------------------


def maybe_keep_warm(gw: Gateway, backend: Backend, now: float) -> None:
    """Called by the gateway's watchdog for a backend with ``keep_warm_interval_s``:
    start a keep-warm request to each endpoint idle for that long whose last one was
    at least that long ago (and none is in flight; paused endpoints are left alone)."""
    cfg = backend.config
    interval = cfg.keep_warm_interval_s
    if interval is None:
        return
    for pool in backend.pools:
        t = track_of(pool)
        if t.warming or now - t.warm_at < interval:
            continue
        idle_s = pool.idle_for_s(now)
        if idle_s is None or idle_s < interval or pool.paused(now):
            continue
        t.warming = True
        t.warm_at = now
        # In the gateway's own nursery: the request outlives this tick, not the gateway.
        gw._nursery.start_soon(_keep_warm, gw, pool, cfg.keep_warm_path.encode("ascii"))


async def _keep_warm(gw: Gateway, pool: Pool, path: bytes) -> None:
    """One GET to ``path`` on ``pool``'s endpoint, with its upstream credential when it
    has one; the connection goes back to the pool when the exchange was clean."""
    t = track_of(pool)
    try:
        ok = await _warm_exchange(gw, pool, path)
    finally:
        t.warming = False
    if ok:
        t.warm_ok += 1
    else:
        t.warm_failed += 1


async def _warm_exchange(gw: Gateway, pool: Pool, path: bytes) -> bool:
    from fastgw._core.http import BODY_LENGTH, BODY_NONE, parse_response_head
    from fastgw.upstream.health import probe_request
    from fastgw.upstream.pool import UpstreamConnectError

    # The same request a health check sends (with the endpoint's credential), kept alive.
    raw = probe_request(pool, path, b"fastgw-keep-warm", gw.now, close=False)
    if raw is None:
        return False  # no valid credential: nothing useful to send
    conn = pool.acquire_idle_nowait(trio.current_time())
    if conn is None:
        try:
            conn = await pool.acquire(fresh=True)
        except UpstreamConnectError:
            return False
    bcfg = pool.backend
    reusable = False
    try:
        with trio.move_on_after(bcfg.cold_first_byte_timeout_s or bcfg.first_byte_timeout_s):
            ut = conn.transport
            await ut.send_all(raw)
            buf = b""
            rh = None
            while rh is None:
                data = await ut.recv()
                if not data or len(buf) > 65536:
                    return False
                buf += data
                rh = parse_response_head(buf, 0, request_was_head=False)
                if rh is not None and rh.status < 200:
                    buf, rh = buf[rh.head_len :], None
            if rh.body_kind == BODY_LENGTH:
                want = rh.head_len + rh.content_length
                while len(buf) < want:
                    data = await ut.recv()
                    if not data:
                        return False
                    buf += data
                reusable = rh.keep_alive and len(buf) == want
            elif rh.body_kind == BODY_NONE:
                reusable = rh.keep_alive and len(buf) == rh.head_len
            return rh.status < 500
        return False
    except (OSError, ProtocolError):
        return False
    finally:
        pool.release(conn, reusable)

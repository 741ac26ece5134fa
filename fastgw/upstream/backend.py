"""A backend: a group of function endpoints, each with its own pool.

Balancing. ``pick`` chooses among the endpoints that may take traffic: least
outstanding requests with two random choices (the less busy of two endpoints drawn at
random; Envoy's default, within a small factor of the best possible without scanning
every endpoint), round robin, ``weighted`` (smooth weighted round robin, nginx's
algorithm: deterministic, and the spread over any window of sum(weights) picks is
exact) or ``hash`` (weighted rendezvous hashing on a caller's key: each endpoint scores
the key, the highest score wins; when an endpoint leaves only the keys it held move,
about 1/N of them, and an ejected endpoint is skipped by taking the next best score).

Availability. An endpoint is left out while it is unhealthy (active checks, health.py),
ejected (refused connects, consecutive 5xx or gateway failures; never more than
``max_ejection_percent`` of the backend at once), paused (an upstream 429/503 with
Retry-After) or at its in-flight cap. Priorities: traffic goes to the lowest priority
level with an available endpoint. When no endpoint is available, ejected and unhealthy
ones are used anyway (Envoy's panic mode: better a struggling endpoint than none); paused
ones are not: ``pick`` returns None and the caller answers 503 with Retry-After
(``resume_in_s``).

The default shape (one priority level, no caps, no hashing) keeps the fast paths bound
in ``__init__``: one float test per candidate endpoint (``Pool.down``), and the general
path only while some endpoint is unavailable.

Admission (``admit``/``release``, only for backends with caps or hashing: ``gated``):
a request takes a slot on an endpoint (``max_in_flight`` per endpoint and per backend,
``max_in_flight_per_identity`` per caller counting its queued requests too). When the
caps are full it waits in a FIFO queue of at most ``max_queued`` for at most
``queue_timeout_s``. A released slot is handed to the head of the queue directly (the
waiter wakes with its slot already taken), so a wakeup is never lost and never
doubled; a waiter that leaves (timeout, client gone) gives back a slot it was handed.
A pause or an ejection that ends frees capacity without any release: the gateway's
watchdog calls ``state_changed`` on backends with waiters every tick (0.1 s), so a
queued request is served within a tick of the endpoint's return (nothing per request).

Every attempt holds a slot on the endpoint it is sent to. A retry moves the request's
slot (``pick_other`` then ``move``) to an endpoint with room, or stays on its own;
it never queues: a retry is load caused by a failure, and waiting behind fresh
requests for up to ``queue_timeout_s`` would serve the client worse than the original
error at once, which is what it gets when no endpoint has room (its own paused). A
hedge takes a second slot (``hedge_room``/``take_hedge``) for the race and is not
sent when no endpoint has room, the backend is at its cap, or requests are queued;
the losing attempt's slot is given back when it is cancelled. Per-caller counts count
a hedged or retried request once: it is one request of that caller.

A backend outlives config reloads when its configuration is unchanged, so its pools
(warm connections, health and ejection state, the health checker) are kept.
"""

from __future__ import annotations

import collections
import hashlib
import math
import random
from typing import TYPE_CHECKING

import trio

from fastgw._core.metrics import Histogram
from fastgw.config.model import BackendConfig
from fastgw.upstream.pool import Pool, make_client_tls_context

if TYPE_CHECKING:
    from collections.abc import Callable

_MASK64 = (1 << 64) - 1
_TWO64 = float(1 << 64)


class Unavailable(Exception):
    """No endpoint of the backend can take this request now; answer ``status`` with
    ``Retry-After: retry_after_s`` (whole seconds, at least 1)."""

    def __init__(self, status: int, code: str, detail: str, retry_after_s: float) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after_s = max(1, math.ceil(retry_after_s))


class _Waiter:
    __slots__ = ("event", "hash_key", "pool")

    def __init__(self, hash_key: bytes | None) -> None:
        self.event = trio.Event()
        self.hash_key = hash_key
        self.pool: Pool | None = None


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a well-spread 64-bit value from a 64-bit value."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def key_hash(key: bytes) -> int:
    """A stable 64-bit hash of a balancing key (the same in every worker and run)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class Backend:
    __slots__ = (
        "_next",
        "_rand",
        "_seeds",
        "admitted",
        "cap",
        "config",
        "first_byte",
        "gated",
        "hash_header",
        "health_scope",
        "ident_cap",
        "levels",
        "max_queued",
        "name",
        "per_identity",
        "pick",
        "pools",
        "queue",
        "queue_timeouts",
        "rejected",
    )

    def __init__(self, config: BackendConfig, previous: Backend | None = None) -> None:
        self.config = config
        # Time from the request sent to the response head, across its endpoints.
        self.first_byte: Histogram = previous.first_byte if previous else Histogram()
        self.name = config.name
        tls_ctx = None
        if any(ep.scheme == "https" for ep in config.endpoints):
            tls_ctx = make_client_tls_context(config)
        self.pools = [
            Pool(ep, config, tls_ctx if ep.scheme == "https" else None) for ep in config.endpoints
        ]
        for p in self.pools:
            p.group = self
        # Priority levels, lowest (tried first) first.
        by_level: dict[int, list[Pool]] = {}
        for p in self.pools:
            by_level.setdefault(p.endpoint.priority, []).append(p)
        self.levels = [by_level[k] for k in sorted(by_level)]
        # Rendezvous seeds: from the endpoint's URL, so every worker agrees.
        self._seeds = {id(p): key_hash(p.endpoint.url.encode()) for p in self.pools}
        self._next = 0
        self._rand = random.Random()
        self.health_scope: trio.CancelScope | None = None
        # Admission.
        self.gated = config.gated
        self.cap = config.max_in_flight or (1 << 62)
        self.ident_cap = config.max_in_flight_per_identity
        self.max_queued = config.max_queued
        self.admitted = 0
        self.per_identity: dict[bytes, int] = {}
        self.queue: collections.deque[_Waiter] = collections.deque()
        self.queue_timeouts = 0
        self.rejected = 0
        hash_on = config.hash_on
        self.hash_header = (
            hash_on[7:].lower().encode("ascii")
            if config.balance == "hash" and hash_on.startswith("header:")
            else None
        )
        # Bound once: the default shapes get their fast path, the rest the general one.
        simple = len(self.levels) == 1 and not any(p.endpoint.max_in_flight for p in self.pools)
        self.pick: Callable[..., Pool | None]
        if not simple or config.balance in ("weighted", "hash"):
            self.pick = self._general
        elif len(self.pools) == 1:
            self.pick = self._only
        elif config.balance == "round_robin":
            self.pick = self._round_robin
        else:
            self.pick = self._least_outstanding

    # -- picking ----------------------------------------------------------------------

    def pick_other(self, avoid: Pool) -> Pool:
        """An endpoint other than ``avoid`` for a retry (the least busy of the others
        that may take traffic and have a free slot: never one at its in-flight cap), or
        ``avoid`` itself when there is none. A gated caller then moves its slot there
        (``move``); ungated backends have no caps, so every endpoint has room."""
        now = trio.current_time()
        others = [
            p for p in self.pools if p is not avoid and p.admitted < p.cap and not p.paused(now)
        ]
        if not others:
            return avoid
        live = [p for p in others if p.available(now)] or others
        best = min(p.endpoint.priority for p in live)
        return min((p for p in live if p.endpoint.priority == best), key=lambda p: p.outstanding)

    def _only(self, hash_key: bytes | None = None) -> Pool | None:
        p = self.pools[0]
        if p.down and p.paused_until and p.paused(trio.current_time()):
            return None
        return p

    def _round_robin(self, hash_key: bytes | None = None) -> Pool | None:
        pools = self.pools
        n = len(pools)
        for _ in range(n):
            i = self._next
            self._next = i + 1 if i + 1 < n else 0
            p = pools[i]
            if not p.down or p.available(trio.current_time()):
                return p
        return self._general()

    def _least_outstanding(self, hash_key: bytes | None = None) -> Pool | None:
        pools = self.pools
        n = len(pools)
        i = int(self._rand.random() * n)
        j = int(self._rand.random() * (n - 1))
        if j >= i:
            j += 1  # two distinct endpoints
        a, b = pools[i], pools[j]
        if a.down or b.down:
            now = trio.current_time()
            la, lb = a.available(now), b.available(now)
            if not la and not lb:
                return self._general()
            if not la:
                return b
            if not lb:
                return a
        return a if a.outstanding <= b.outstanding else b

    def _general(self, hash_key: bytes | None = None) -> Pool | None:
        """Any shape: the candidates of the first usable priority level, then the
        configured choice among them. None when no endpoint may take the request."""
        cands = self._candidates(trio.current_time())
        if not cands:
            return None
        if len(cands) == 1:
            return cands[0]
        balance = self.config.balance
        if balance == "weighted":
            total = 0
            best = cands[0]
            for p in cands:
                w = p.endpoint.weight
                total += w
                p.swrr += w
                if p.swrr > best.swrr:
                    best = p
            best.swrr -= total
            return best
        if balance == "hash" and hash_key is not None:
            return self._rendezvous(cands, key_hash(hash_key))
        if balance == "round_robin":
            i = self._next % len(cands)
            self._next = i + 1
            return cands[i]
        rand = self._rand.random
        n = len(cands)
        i = int(rand() * n)
        j = int(rand() * (n - 1))
        if j >= i:
            j += 1
        a, b = cands[i], cands[j]
        if self.gated:  # slots taken are the load (a connection may not be open yet)
            return a if a.admitted <= b.admitted else b
        return a if a.outstanding <= b.outstanding else b

    def _rendezvous(self, cands: list[Pool], h: int) -> Pool:
        """Weighted rendezvous hashing: score w / -ln(u), u uniform in (0, 1) from the
        key's and the endpoint's hashes (Schindelhauer and Schomaker's weighted form)."""
        seeds = self._seeds
        best = cands[0]
        best_score = -1.0
        for p in cands:
            u = (_mix64(h ^ seeds[id(p)]) + 0.5) / _TWO64
            score = p.endpoint.weight / -math.log(u)
            if score > best_score:
                best, best_score = p, score
        return best

    def _candidates(self, now: float) -> list[Pool]:
        for level in self.levels:
            live = [p for p in level if (not p.down or p.available(now)) and p.admitted < p.cap]
            if live:
                return live
        # Panic: nothing healthy and in service; use ejected or unhealthy endpoints
        # rather than none (paused ones asked us to wait, and full ones are full).
        for level in self.levels:
            live = [p for p in level if not p.paused(now) and p.admitted < p.cap]
            if live:
                return live
        return []

    def resume_in_s(self) -> float:
        """Seconds until the first paused endpoint resumes (for Retry-After)."""
        now = trio.current_time()
        times = [p.paused_until - now for p in self.pools if p.paused(now)]
        return min(times) if times else 1.0

    def state_changed(self) -> None:
        """An endpoint's health or pause changed: capacity may have appeared."""
        if self.queue:
            self._wake()

    def may_eject(self, pool: Pool, now: float) -> bool:
        """Whether ``pool`` may be ejected: ejected endpoints stay within
        ``max_ejection_percent`` of the backend, except that one always may be (as
        Envoy does)."""
        if pool.ejected_until > now:
            return True  # already out: extending it changes no share
        pct = self.config.outlier.max_ejection_percent
        if pct <= 0:
            return False
        out = sum(1 for p in self.pools if p.ejected_until > now)
        allowed = max(1, len(self.pools) * pct // 100)
        return out < allowed

    # -- admission (gated backends) -----------------------------------------------------

    def _take(self, hash_key: bytes | None) -> Pool | None:
        if self.admitted >= self.cap:
            return None
        p = self._general(hash_key)
        if p is not None:
            p.admitted += 1
            self.admitted += 1
        return p

    async def admit(self, ident: bytes | None, hash_key: bytes | None) -> Pool:
        """A slot on an endpoint, waiting in the queue if the caps are full. ``ident``
        (None: no per-caller cap) is the caller's key. Pair with ``release``. Raises
        Unavailable (the answer to send) when no slot can be had."""
        pool = self.admit_nowait(ident, hash_key)
        if pool is None:
            pool = await self.admit_wait(ident, hash_key)
        return pool

    def admit_nowait(self, ident: bytes | None, hash_key: bytes | None) -> Pool | None:
        """A slot now, or None: the caller must ``admit_wait`` (its place in the queue
        is not taken yet). Raises Unavailable for an answer that waiting cannot change
        (per-caller cap, every endpoint paused, a full queue)."""
        if ident is not None and self.ident_cap:
            if self.per_identity.get(ident, 0) >= self.ident_cap:
                self.rejected += 1
                raise Unavailable(
                    429,
                    "too_many_in_flight",
                    f"at most {self.ident_cap} requests in flight per caller",
                    1.0,
                )
        if not self.queue:
            p = self._take(hash_key)
            if p is not None:
                self._count(ident)
                return p
            if self.admitted < self.cap and self._all_paused():
                # Every endpoint is paused: wait as asked, elsewhere.
                self.rejected += 1
                raise Unavailable(
                    503,
                    "upstream_paused",
                    "the function asked for a pause (Retry-After)",
                    self.resume_in_s(),
                )
        if len(self.queue) >= self.max_queued:
            self.rejected += 1
            raise Unavailable(
                503, "upstream_saturated", "the function is at its concurrency limit", 1.0
            )
        return None

    async def admit_wait(self, ident: bytes | None, hash_key: bytes | None) -> Pool:
        """Wait in the FIFO queue (after ``admit_nowait`` said None, with no checkpoint
        in between) for at most ``queue_timeout_s``. Cancelling the caller leaves the
        queue cleanly. Raises Unavailable (503 queue_timeout)."""
        self._count(ident)
        w = _Waiter(hash_key)
        self.queue.append(w)
        try:
            with trio.move_on_after(self.config.queue_timeout_s):
                await w.event.wait()
        except BaseException:
            self._leave(w, ident)
            raise
        if w.pool is None:
            self._leave(w, ident)
            self.queue_timeouts += 1
            raise Unavailable(
                503,
                "queue_timeout",
                "no capacity at the function became free in time",
                self.config.queue_timeout_s,
            )
        return w.pool

    def release(self, pool: Pool, ident: bytes | None) -> None:
        """Give back a slot from ``admit``; the head of the queue gets it."""
        pool.admitted -= 1
        self.admitted -= 1
        self._uncount(ident)
        if self.queue:
            self._wake()

    def move(self, old: Pool, new: Pool) -> None:
        """A retry's slot moves from ``old`` to ``new`` (picked by ``pick_other``, so it
        has room): the backend's and the caller's counts stay; ``old``'s slot goes to
        the head of the queue."""
        new.admitted += 1
        old.admitted -= 1
        if self.queue:
            self._wake()

    def hedge_room(self, pool: Pool) -> bool:
        """Whether a hedge may take a slot on ``pool`` now: under its cap and the
        backend's, and nobody queued (a hedge is optional extra load: queued requests
        come first)."""
        return pool.admitted < pool.cap and self.admitted < self.cap and not self.queue

    def take_hedge(self, pool: Pool) -> None:
        """A hedge's slot on ``pool`` (after ``hedge_room`` said yes, no checkpoint in
        between). Not counted per caller: a hedged request is one request of its
        caller. Give it back with ``release(pool, None)``."""
        pool.admitted += 1
        self.admitted += 1

    def _all_paused(self) -> bool:
        """Whether every endpoint is paused (then waiting in the queue cannot help)."""
        now = trio.current_time()
        return all(p.paused(now) for p in self.pools)

    def _wake(self) -> None:
        q = self.queue
        while q:
            w = q[0]
            p = self._take(w.hash_key)
            if p is None:
                return
            q.popleft()
            w.pool = p
            w.event.set()

    def _leave(self, w: _Waiter, ident: bytes | None) -> None:
        if w.pool is not None:
            self.release(w.pool, ident)  # handed a slot it will not use: pass it on
            w.pool = None
        else:
            try:
                self.queue.remove(w)
            except ValueError:
                pass
            self._uncount(ident)

    def _count(self, ident: bytes | None) -> None:
        if ident is not None and self.ident_cap:
            d = self.per_identity
            d[ident] = d.get(ident, 0) + 1

    def _uncount(self, ident: bytes | None) -> None:
        if ident is not None and self.ident_cap:
            d = self.per_identity
            n = d.get(ident, 0) - 1
            if n > 0:
                d[ident] = n
            else:
                d.pop(ident, None)

    # -- upkeep -------------------------------------------------------------------------

    def statistics(self, now: float) -> dict[str, object]:
        """A JSON-ready snapshot for the admin side (``now``: the gateway's clock;
        ``*_until`` are on that clock, ``*_for_s`` the seconds left)."""
        endpoints = []
        for p in self.pools:
            ep = p.endpoint
            ejected = p.ejected_until if p.ejected_until > now else 0.0
            paused = p.paused_until if p.paused_until > now else 0.0
            endpoints.append(
                {
                    "url": ep.url,
                    "region": ep.region,
                    "priority": ep.priority,
                    "weight": ep.weight,
                    "healthy": p.healthy,
                    "check": p.check_state,  # the last health check (health.py), or None
                    "ejected_until": ejected or None,
                    "ejected_for_s": round(ejected - now, 3) if ejected else 0.0,
                    "ejections": p.ejections,
                    "paused_until": paused or None,
                    "paused_for_s": round(paused - now, 3) if paused else 0.0,
                    "outstanding": p.outstanding,
                    "in_flight": p.admitted if self.gated else p.outstanding,
                    "max_in_flight": ep.max_in_flight,
                    "idle_connections": len(p._idle),
                }
            )
        return {
            "balance": self.config.balance,
            "in_flight": self.admitted if self.gated else sum(p.outstanding for p in self.pools),
            "max_in_flight": self.config.max_in_flight,
            "queued": len(self.queue),
            "max_queued": self.max_queued,
            "queue_timeouts": self.queue_timeouts,
            "rejected": self.rejected,
            "endpoints": endpoints,
        }

    def expire_idle(self, now: float) -> int:
        return sum(p.expire_idle(now) for p in self.pools)

    def close(self) -> None:
        if self.health_scope is not None:
            self.health_scope.cancel()
        for p in self.pools:
            p.close()

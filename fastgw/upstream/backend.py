"""A backend: a group of function endpoints, each with its own pool.

``pick`` balances by least outstanding requests with two random choices (the less busy
of two endpoints drawn at random; Envoy's default, and within a small factor of the
best possible without scanning every endpoint), or round robin. Health, ejection and
priorities come with the serverless-backends work. A backend outlives config reloads
when its endpoints are unchanged, so its pools (and their warm connections) are kept.
"""

from __future__ import annotations

import random

from fastgw._core.metrics import Histogram
from fastgw.config.model import BackendConfig
from fastgw.upstream.pool import Pool, make_client_tls_context


class Backend:
    __slots__ = ("_next", "_rand", "config", "first_byte", "name", "pick", "pools")

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
        self._next = 0
        self._rand = random.Random()
        # Bound once: one endpoint needs no choice at all.
        if len(self.pools) == 1:
            self.pick = self._only
        elif config.balance == "round_robin":
            self.pick = self._round_robin
        else:
            self.pick = self._least_outstanding

    def pick_other(self, avoid: Pool) -> Pool:
        """An endpoint other than ``avoid`` for a retry (the least busy of the others
        that are not ejected), or ``avoid`` itself when it is the only one."""
        others = [p for p in self.pools if p is not avoid]
        if not others:
            return avoid
        live = [p for p in others if not p.ejected()] or others
        return min(live, key=lambda p: p.outstanding)

    def _only(self) -> Pool:
        return self.pools[0]

    def _round_robin(self) -> Pool:
        pools = self.pools
        for _ in range(len(pools)):
            i = self._next
            self._next = i + 1 if i + 1 < len(pools) else 0
            if not pools[i].ejected_until or not pools[i].ejected():
                return pools[i]
        return pools[self._next]

    def _least_outstanding(self) -> Pool:
        pools = self.pools
        n = len(pools)
        i = int(self._rand.random() * n)
        j = int(self._rand.random() * (n - 1))
        if j >= i:
            j += 1  # two distinct endpoints
        a, b = pools[i], pools[j]
        if a.ejected_until or b.ejected_until:
            # An endpoint that just refused connections sits out its ejection time
            # (unless all do: then traffic goes on, as Envoy's panic threshold does).
            ea, eb = a.ejected(), b.ejected()
            if ea and eb:
                live = [p for p in pools if not p.ejected()]
                if live:
                    return min(live, key=lambda p: p.outstanding)
            elif ea:
                return b
            elif eb:
                return a
        return a if a.outstanding <= b.outstanding else b

    def expire_idle(self, now: float) -> int:
        return sum(p.expire_idle(now) for p in self.pools)

    def close(self) -> None:
        for p in self.pools:
            p.close()

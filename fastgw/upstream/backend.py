"""A backend: a group of function endpoints, each with its own pool.

For now endpoints are taken round robin; the balancing issue replaces ``pick`` with
least-outstanding-requests and health. A backend outlives config reloads when its
endpoints are unchanged, so its pools (and their warm connections) are kept.
"""

from __future__ import annotations

from fastgw._core.metrics import Histogram
from fastgw.config.model import BackendConfig
from fastgw.upstream.pool import Pool, make_client_tls_context


class Backend:
    __slots__ = ("_next", "config", "first_byte", "name", "pools")

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

    def pick(self) -> Pool:
        """The next endpoint's pool, round robin. Raises IndexError with no endpoints."""
        pools = self.pools
        i = self._next
        self._next = i + 1 if i + 1 < len(pools) else 0
        return pools[i % len(pools)]

    def expire_idle(self, now: float) -> int:
        return sum(p.expire_idle(now) for p in self.pools)

    def close(self) -> None:
        for p in self.pools:
            p.close()

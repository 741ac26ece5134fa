"""Every metric fastgw exports, in one place: a collector over plain counters.

Strategy: the request path never calls prometheus-client. It bumps list slots and
observes into core histograms (``fastgw._core.metrics.Histogram``) held by the route and
backend objects; this collector walks them when ``/metrics`` is scraped and builds the
metric families then. Label sets are bounded by the configuration (route, backend,
endpoint, listener names, status classes, error codes from a fixed vocabulary): never
an identity, a token or a raw path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from fastgw._core.metrics import Histogram
from fastgw._version import __version__

if TYPE_CHECKING:
    from fastgw.gateway import Gateway

_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def _histogram(fam: HistogramMetricFamily, labels: list[str], h: Histogram) -> None:
    buckets, total = h.snapshot()
    fam.add_metric(
        labels,
        [("+Inf" if b == float("inf") else repr(b), c) for b, c in buckets],
        sum_value=total,
    )


def _retry_families(routes: Iterable[Any]) -> Iterator[Metric]:
    """Retries and hedges per route (fastgw/upstream/retry.py RoutePolicy.counts)."""
    retries = CounterMetricFamily(
        "fastgw_upstream_retries",
        "Requests sent again to an endpoint after an attempt failed, by route",
        labels=["route"],
    )
    hedges = CounterMetricFamily(
        "fastgw_upstream_hedges",
        "Hedged attempts by route and result: sent, or won (answered first)",
        labels=["route", "result"],
    )
    denied = CounterMetricFamily(
        "fastgw_upstream_budget_exhausted",
        "Retries or hedges not sent because the route's budget was spent",
        labels=["route", "kind"],
    )
    for r in routes:
        resil = r.resil
        if resil is None:
            continue
        c = resil.counts
        retries.add_metric([r.name], c[0])
        hedges.add_metric([r.name, "sent"], c[1])
        hedges.add_metric([r.name, "won"], c[2])
        denied.add_metric([r.name, "retry"], c[3])
        denied.add_metric([r.name, "hedge"], c[4])
    yield retries
    yield hedges
    yield denied


def _keep_warm_family(backends: Iterable[Any]) -> Metric:
    """Keep-warm requests per endpoint (fastgw/upstream/retry.py maybe_keep_warm)."""
    fam = CounterMetricFamily(
        "fastgw_upstream_keep_warm",
        "Keep-warm requests sent to idle endpoints, by result: ok or failed",
        labels=["backend", "endpoint", "result"],
    )
    for b in list(backends):
        if b.config.keep_warm_interval_s is None:
            continue
        for p in b.pools:
            t = p.track
            fam.add_metric([b.name, p.endpoint.url, "ok"], t.warm_ok if t else 0)
            fam.add_metric([b.name, p.endpoint.url, "failed"], t.warm_failed if t else 0)
    return fam


def _endpoint_families(backends: Iterable[Any], now: float) -> Iterator[Metric]:
    """Endpoint state from fastgw/upstream/backend.py: health, ejections, in flight,
    pauses, and each backend's queue."""
    healthy = GaugeMetricFamily(
        "fastgw_endpoint_healthy",
        "1 while the endpoint passes its active health checks (always 1 without checks)",
        labels=["backend", "endpoint"],
    )
    ejections = CounterMetricFamily(
        "fastgw_endpoint_ejections",
        "Times the endpoint was ejected (refused connects, consecutive 5xx or gateway errors)",
        labels=["backend", "endpoint"],
    )
    available = GaugeMetricFamily(
        "fastgw_endpoint_available",
        "1 while the endpoint takes traffic (healthy, not ejected, not paused)",
        labels=["backend", "endpoint"],
    )
    pauses = CounterMetricFamily(
        "fastgw_endpoint_pauses",
        "Times the endpoint was paused by an upstream 429/503 with Retry-After",
        labels=["backend", "endpoint"],
    )
    in_flight = GaugeMetricFamily(
        "fastgw_endpoint_in_flight",
        "Requests in flight to the endpoint (admitted, for backends with caps)",
        labels=["backend", "endpoint"],
    )
    queued = GaugeMetricFamily(
        "fastgw_backend_queued", "Requests waiting for a slot", labels=["backend"]
    )
    queue_timeouts = CounterMetricFamily(
        "fastgw_backend_queue_timeouts",
        "Requests answered 503 after waiting the whole queue timeout",
        labels=["backend"],
    )
    for b in list(backends):
        for p in b.pools:
            lab = [b.name, p.endpoint.url]
            healthy.add_metric(lab, 1 if p.healthy else 0)
            ejections.add_metric(lab, p.ejections)
            available.add_metric(lab, 0 if p.down > now else 1)
            pauses.add_metric(lab, p.pauses)
            in_flight.add_metric(lab, p.admitted if b.gated else p.outstanding)
        queued.add_metric([b.name], len(b.queue))
        queue_timeouts.add_metric([b.name], b.queue_timeouts)
    yield healthy
    yield ejections
    yield available
    yield pauses
    yield in_flight
    yield queued
    yield queue_timeouts


def _credential_families(gw: Gateway) -> Iterator[Metric]:
    """Upstream credentials per backend (fastgw.upstream.binding): refreshes by result
    and whether every one of the backend's credentials is at hand. A cache shared by
    two endpoints of a backend counts once."""
    refreshes = CounterMetricFamily(
        "fastgw_upstream_credential_refreshes",
        "Upstream credential fetches by backend, type and result",
        labels=["backend", "type", "result"],
    )
    available = GaugeMetricFamily(
        "fastgw_upstream_credential_available",
        "1 when every upstream credential of a backend is at hand (else its requests get 503)",
        labels=["backend"],
    )
    rejected = CounterMetricFamily(
        "fastgw_upstream_credential_rejected",
        "Answers refusing the gateway's upstream credential (401, or 403 with "
        'error="invalid_token"), requests and health checks, by backend',
        labels=["backend"],
    )
    per_backend: dict[str, tuple[str, dict[int, Any]]] = {}
    refused: dict[str, int] = {}
    for pool, cb in list(gw.state.credentials.items()):
        kind, caches = per_backend.setdefault(cb.backend_name, (cb.kind, {}))
        caches[id(cb.cache)] = cb.cache
        n: int = pool.credential_rejected  # type: ignore[attr-defined]  # keys are Pools
        refused[cb.backend_name] = refused.get(cb.backend_name, 0) + n
    for name in sorted(per_backend):
        kind, caches = per_backend[name]
        ok = sum(c.refreshes_ok for c in caches.values())
        failed = sum(c.refreshes_failed for c in caches.values())
        refreshes.add_metric([name, kind, "ok"], ok)
        refreshes.add_metric([name, kind, "failed"], failed)
        usable = all(c.current(gw.now) is not None for c in caches.values())
        available.add_metric([name], 1 if usable else 0)
        rejected.add_metric([name], refused[name])
    yield refreshes
    yield available
    yield rejected


class GatewayCollector(Collector):
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self) -> Iterator[Metric]:
        gw = self.gw
        state = gw.state
        info = InfoMetricFamily("fastgw_build", "fastgw build information")
        info.add_metric([], {"version": __version__})
        yield info

        req = CounterMetricFamily(
            "fastgw_requests",
            "Requests answered, by route, backend and status class",
            labels=["route", "backend", "code"],
        )
        dur = HistogramMetricFamily(
            "fastgw_request_duration_seconds",
            "Time from a request head parsed to its response sent, by route",
            labels=["route"],
        )
        for r in state.router.routes:
            for i, cls in enumerate(_CLASSES, start=1):
                n = r.status_counts[i]
                if n:
                    req.add_metric([r.name, r.backend.name if r.backend else "", cls], n)
            _histogram(dur, [r.name], r.duration)
        for i, cls in enumerate(_CLASSES, start=1):
            n = gw.unrouted_counts[i]
            if n:
                req.add_metric(["", "", cls], n)
        yield req
        yield dur
        yield from _retry_families(state.router.routes)
        yield _keep_warm_family(state.backends.values())

        fb = HistogramMetricFamily(
            "fastgw_upstream_first_byte_seconds",
            "Time from a request sent upstream to its response head, by backend",
            labels=["backend"],
        )
        conns = GaugeMetricFamily(
            "fastgw_upstream_connections",
            "Upstream connections by state",
            labels=["backend", "endpoint", "state"],
        )
        created = CounterMetricFamily(
            "fastgw_upstream_connections_created",
            "Upstream connections opened",
            labels=["backend", "endpoint"],
        )
        waits = CounterMetricFamily(
            "fastgw_upstream_pool_waits",
            "Times a request waited for a connection at the pool's cap",
            labels=["backend", "endpoint"],
        )
        dead = CounterMetricFamily(
            "fastgw_upstream_dead_connections",
            "Pooled connections found closed by the upstream when reused",
            labels=["backend", "endpoint"],
        )
        ejections = CounterMetricFamily(
            "fastgw_upstream_ejections",
            "Times an endpoint was taken out of balancing after refusing connections",
            labels=["backend", "endpoint"],
        )
        for b in list(state.backends.values()):
            _histogram(fb, [b.name], b.first_byte)
            for p in b.pools:
                st = p.statistics()
                lab = [b.name, p.endpoint.url]
                ejections.add_metric(lab, p.ejections)
                conns.add_metric([*lab, "idle"], st.idle)
                conns.add_metric([*lab, "busy"], st.busy)
                created.add_metric(lab, st.created)
                waits.add_metric(lab, st.waits)
                dead.add_metric(lab, st.dropped_dead)
        yield fb
        yield conns
        yield created
        yield waits
        yield dead
        yield ejections
        yield from _endpoint_families(state.backends.values(), gw.now)

        down = GaugeMetricFamily(
            "fastgw_downstream_connections", "Open client connections", value=len(gw.connections)
        )
        yield down
        errs = CounterMetricFamily(
            "fastgw_errors", "Errors by code (a fixed vocabulary)", labels=["code"]
        )
        for code, n in sorted(list(gw.errors.items())):  # one C-level copy: see fastgw.admin
            errs.add_metric([code], n)
        yield errs
        auth = CounterMetricFamily(
            "fastgw_auth",
            "Authentication outcomes by issuer (or identity kind) and result",
            labels=["issuer", "result"],
        )
        for (iss, result), n in sorted(list(gw.auth_counts.items())):
            auth.add_metric([iss, result], n)
        yield auth
        pol = CounterMetricFamily(
            "fastgw_policy_decisions",
            "Policy decisions: allow, deny, shadow_allow, shadow_deny",
            labels=["policy", "decision"],
        )
        for (name, decision), n in sorted(list(gw.policy_counts.items())):
            pol.add_metric([name, decision], n)
        yield pol
        lim = CounterMetricFamily(
            "fastgw_rate_limit_decisions",
            "Rate-limit decisions: allowed, limited, shadow_limited",
            labels=["limit", "decision"],
        )
        for name, counts in sorted(list(state.limit_counts.items())):
            for decision, n in zip(("allowed", "limited", "shadow_limited"), counts, strict=True):
                lim.add_metric([name, decision], n)
        yield lim
        if gw.buckets is not None:
            bs = gw.buckets.statistics()
            yield GaugeMetricFamily("fastgw_rate_limit_keys", "Buckets held", value=bs["keys"])
        if state.budget_counts:
            bud = CounterMetricFamily(
                "fastgw_budget_decisions",
                "Budget decisions: allowed, refused, shadow_refused",
                labels=["budget", "decision"],
            )
            for name, counts in sorted(list(state.budget_counts.items())):
                for decision, n in zip(
                    ("allowed", "refused", "shadow_refused"), counts, strict=True
                ):
                    bud.add_metric([name, decision], n)
            yield bud
        if gw.budget_table is not None:
            ts = gw.budget_table.statistics()
            yield GaugeMetricFamily("fastgw_budget_keys", "Budget counters held", value=ts["keys"])
            yield CounterMetricFamily(
                "fastgw_budget_evictions",
                "Budget counters evicted to make room (a current one forgives its spend)",
                value=ts["evictions"],
            )
        shared = gw.redis_limits
        if shared is not None:
            rs = shared.statistics()
            yield GaugeMetricFamily(
                "fastgw_rate_limit_store_up",
                "1 when the Redis holding the rate limits is connected",
                value=rs["redis_up"],
            )
            calls = CounterMetricFamily(
                "fastgw_rate_limit_store_calls",
                "Round trips to the Redis holding the rate limits, by result",
                labels=["result"],
            )
            for result, key in (("ok", "redis_ok"), ("failed", "redis_failed"),
                                ("timeout", "redis_timeouts")):  # fmt: skip
                calls.add_metric([result], rs[key])
            yield calls
            yield CounterMetricFamily(
                "fastgw_rate_limit_store_fallbacks",
                "Rate-limit checks answered by on_failure (Redis down, slow or failing)",
                value=rs["fallbacks"],
            )
        v = state.verifier
        if v is not None:
            vs = v.statistics()
            yield CounterMetricFamily(
                "fastgw_token_cache_hits", "Bearer tokens found verified", value=vs["cache_hits"]
            )
            yield CounterMetricFamily(
                "fastgw_token_cache_misses",
                "Bearer tokens checked by signature",
                value=vs["cache_misses"],
            )
            ready = GaugeMetricFamily(
                "fastgw_issuer_ready", "1 when an issuer's keys are loaded", labels=["issuer"]
            )
            for name in sorted(vs["issuers"]):
                ready.add_metric([name], 1 if v.ready(name) else 0)
            yield ready
        reloads = CounterMetricFamily(
            "fastgw_config_reloads", "Configuration reloads by result", labels=["result"]
        )
        reloads.add_metric(["ok"], gw.reloads_ok)
        reloads.add_metric(["failed"], gw.reloads_failed)
        yield reloads
        yield GaugeMetricFamily(
            "fastgw_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load",
            value=gw.last_reload_ok_unix,
        )
        yield GaugeMetricFamily(
            "fastgw_draining", "1 while the gateway drains", value=1 if gw.draining else 0
        )
        if gw.state.credentials:
            yield from _credential_families(gw)


def make_registry(gw: Gateway) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gw))
    return registry

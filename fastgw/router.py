"""Routes: conditions on host, path, method and headers; first match in config order.

Strategy. Each route is compiled once per config load into plain values checked
cheapest first: the method (a frozenset of interned method bytes), the host (a frozenset
of exact names and a tuple of ``.domain`` suffixes, compared without the port), the path
(a whole-segment prefix, an exact path, a regular expression, or one lookup in a core
map — ``fastgw._core.acl.Map`` — whose value names the backend, so a 100k-entry routing
table costs the same as a 10-entry one), then header conditions (one core lookup each).
The request's host is computed once per request and only when some route needs it.

Actions are compiled too: the path rewrite, the per-route strip set and extra field
lines for both directions (pre-rendered bytes handed to the core serializers), and the
timeouts and body limit with the route's overrides applied.

Counters (requests by status class, a duration histogram) live on the route and carry
over a reload when the route keeps its name.
"""

from __future__ import annotations

import re
from typing import Any

from fastgw._core.http import RequestHead, StripSet
from fastgw._core.metrics import Histogram
from fastgw.config.model import GatewayConfig, RouteConfig
from fastgw.policy import RouteAuth
from fastgw.policy.budgets import route_budgets
from fastgw.policy.limits import route_limits
from fastgw.upstream.backend import Backend
from fastgw.upstream.retry import RoutePolicy

# Fields a client may never set towards a function: Expect is answered by the gateway
# itself (it sends 100 Continue when it is ready for the body).
ALWAYS_STRIP = (b"expect",)

P_PREFIX = 0
P_EXACT = 1
P_REGEX = 2
P_MAP = 3


def _render(fields: tuple[tuple[str, str], ...]) -> bytes | None:
    if not fields:
        return None
    return b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in fields)


class Route:
    __slots__ = (
        "any_host",
        "auth",
        "backend",
        "budgets",
        "config",
        "duration",
        "first_byte_timeout_s",
        "headers",
        "host_suffixes",
        "hosts",
        "json_name",
        "limit_stops",
        "limits",
        "limits_shared",
        "limits_tiered",
        "max_body_bytes",
        "methods",
        "name",
        "path_exact",
        "path_kind",
        "path_map",
        "path_re",
        "prefix",
        "prefix_dir",
        "replace_prefix",
        "req_extra",
        "req_strip",
        "req_strip_spec",
        "resil",
        "resp_extra",
        "resp_strip",
        "rewrite",
        "status_counts",
        "strip",
        "total_timeout_s",
    )

    def __init__(
        self,
        config: RouteConfig,
        backend: Backend | None,
        gw_config: GatewayConfig,
        previous: Route | None = None,
        auth: RouteAuth | None = None,
        limit_counts: dict[str, list[int]] | None = None,
        budget_counts: dict[str, list[int]] | None = None,
    ) -> None:
        self.config = config
        self.auth = auth
        self.limits = route_limits(
            gw_config.rate_limits, config.name, limit_counts if limit_counts is not None else {}
        )
        # How the request path takes from them: decided here, once (downstream.py).
        self.limits_tiered = any(lim.tiered for lim in self.limits)
        self.limits_shared = bool(self.limits) and gw_config.limits_store.type == "redis"
        self.limit_stops = tuple(not lim.shadow for lim in self.limits)
        # Budgets (policy/budgets.py): None on a route without any.
        self.budgets = (
            route_budgets(
                gw_config.budgets, config.name, budget_counts if budget_counts is not None else {}
            )
            if gw_config.budgets
            else None
        )
        self.name = config.name
        self.backend = backend
        # Retries, hedging, cold-start timeouts (upstream/retry.py): None on a route that
        # has none, and the request path then never looks further. A path_map route
        # may reach any backend.
        reach = [backend.config] if backend is not None else list(gw_config.backends.values())
        self.resil: RoutePolicy | None = (
            RoutePolicy(config, previous.resil if previous is not None else None)
            if RoutePolicy.wanted(config, reach)
            else None
        )
        # Counters outlive a reload when the route keeps its name (metrics stay monotonic).
        self.status_counts: list[int] = previous.status_counts if previous else [0] * 6
        self.duration: Histogram = previous.duration if previous else Histogram()

        self.methods = frozenset(m.encode() for m in config.methods) or None
        exact = [h.encode() for h in config.hosts if not h.startswith("*.")]
        self.hosts = frozenset(h.rstrip(b".") for h in exact)
        self.host_suffixes = tuple(
            h[1:].encode().rstrip(b".") for h in config.hosts if h.startswith("*.")
        )
        self.any_host = not config.hosts
        self.headers = tuple(
            (n.encode(), None if v is None else v.encode()) for n, v in config.headers
        )

        self.path_map: Any = None
        self.path_re: re.Pattern[bytes] | None = None
        self.path_exact = b""
        self.prefix = config.path_prefix.encode()
        # "/api" matches "/api", "/api/x" and "/api?q", not "/apix": a prefix of whole
        # segments (HAProxy's path_dir, anchored), or "/" for everything.
        self.prefix_dir = self.prefix.rstrip(b"/")
        if config.path_map is not None:
            self.path_kind = P_MAP
            self.path_map = config.path_map_obj
            if self.path_map is None:  # built from objects: load it here
                from fastgw._core.acl import load_map_file

                self.path_map = load_map_file(config.path_map, config.path_map_type)
        elif config.path is not None:
            self.path_kind = P_EXACT
            self.path_exact = config.path.encode()
        elif config.path_regex is not None:
            self.path_kind = P_REGEX
            self.path_re = re.compile(config.path_regex.encode())
        else:
            self.path_kind = P_PREFIX

        self.strip = config.strip_prefix
        self.replace_prefix = config.replace_prefix.encode() if config.replace_prefix else None
        self.rewrite: tuple[re.Pattern[bytes], bytes] | None = None
        if config.rewrite_regex is not None:
            pat, repl = config.rewrite_regex
            self.rewrite = (re.compile(pat.encode()), repl.encode())

        rq = config.request_headers
        ident = gw_config.identity
        # "move" sends the caller's Authorization as X-Forwarded-Authorization: a copy
        # the client sent itself would reach the function beside it, so it goes too.
        auth_strip: tuple[bytes, ...] = ()
        if ident.authorization == "move":
            auth_strip = (b"authorization", b"x-forwarded-authorization")
        elif ident.authorization == "remove":
            auth_strip = (b"authorization",)
        # The identity namespace is stripped on every route, guarded or not: a client
        # must never be able to pose as an identity the gateway vouches for.
        strip_names = (
            ALWAYS_STRIP + auth_strip + tuple(n.encode() for n in rq.remove)
            + tuple(k.lower().encode() for k, _ in rq.set)
        )  # fmt: skip
        strip_prefixes = (ident.header_prefix.lower().encode(),)
        self.req_strip = StripSet(names=strip_names, prefixes=strip_prefixes)
        # Kept so an upstream credential can add the fields it sets (binding.py).
        self.req_strip_spec = (strip_names, strip_prefixes)
        self.req_extra = _render(rq.set)
        rs = config.response_headers
        resp_names = tuple(n.encode() for n in rs.remove) + tuple(
            k.lower().encode() for k, _ in rs.set
        )
        self.resp_strip = StripSet(names=resp_names) if resp_names else None
        self.resp_extra = _render(rs.set)

        # Overrides only; the backend's values apply otherwise (a path_map route's
        # backend is known per request).
        self.first_byte_timeout_s = config.first_byte_timeout_s
        self.total_timeout_s = config.total_timeout_s
        limit = config.max_body_bytes
        self.max_body_bytes = limit if limit is not None else gw_config.limits.max_body_bytes

    def is_plain_prefix(self) -> bool:
        """Only a path_prefix condition (any host, method and headers)."""
        return (
            self.path_kind == P_PREFIX
            and self.any_host
            and self.methods is None
            and not self.headers
            and self.backend is not None
        )

    def upstream_path(self, path: bytes) -> bytes:
        """The path sent upstream after this route's rewrite (query kept)."""
        if self.strip or self.replace_prefix is not None:
            rest = path[len(self.prefix_dir) :]
            if not rest or rest[0] == 0x3F:  # "?"
                rest = b"/" + rest
            if self.replace_prefix is not None:
                base = self.replace_prefix.rstrip(b"/")
                return (base + rest) if base else rest
            return rest
        if self.rewrite is not None:
            q = path.find(b"?")
            p, query = (path, b"") if q < 0 else (path[:q], path[q:])
            out = self.rewrite[0].sub(self.rewrite[1], p, count=1)
            return (out if out.startswith(b"/") else b"/" + out) + query
        return path


def _headers_hold(conds: tuple[tuple[bytes, bytes | None], ...], head: RequestHead) -> bool:
    for name, want in conds:
        got = head.get(name)
        if got is None or (want is not None and got != want):
            return False
    return True


class _PrefixGroup:
    """A run of consecutive routes with only a ``path_prefix`` condition, found with one
    core map lookup instead of one test per route.

    First match in config order equals longest match once shadowed routes are dropped:
    a route whose prefix extends an earlier route's prefix (at a segment boundary) can
    never match, since every path it would take the earlier one takes first; among the
    rest, for any two nested prefixes the longer comes first. So the index is a ``beg``
    map (longest prefix) over "prefix/" keys, looked up with "path/", which makes the
    match whole-segment ("/api" takes "/api" and "/api/x", not "/apix")."""

    __slots__ = ("map", "routes")

    def __init__(self, routes: list[Route]) -> None:
        from fastgw._core.acl import Map

        kept: list[Route] = []
        for rt in routes:
            d = rt.prefix_dir + b"/"
            if not any(d.startswith(k.prefix_dir + b"/") for k in kept):
                kept.append(rt)
        self.routes = kept
        self.map = Map("beg", [(rt.prefix_dir + b"/", b"") for rt in kept])

    def find(self, path: bytes) -> Route | None:
        q = path.find(b"?")
        i = self.map.lookup_index((path if q < 0 else path[:q]) + b"/")
        return self.routes[i] if i >= 0 else None


# Runs of at least this many prefix-only routes are indexed (below it a scan is faster).
_GROUP_MIN = 4


class Router:
    __slots__ = ("by_value", "needs_host", "plan", "routes")

    def __init__(self, routes: list[Route], backends: dict[str, Backend]) -> None:
        self.routes = routes
        # Map values name backends: looked up by the value's bytes, no decoding.
        self.by_value = {name.encode(): b for name, b in backends.items()}
        self.needs_host = any(not r.any_host for r in routes)
        # The routes in order, with runs of prefix-only routes replaced by an index.
        self.plan: list[Route | _PrefixGroup] = []
        run: list[Route] = []
        for rt in [*routes, None]:
            if rt is not None and rt.is_plain_prefix():
                run.append(rt)
                continue
            if len(run) >= _GROUP_MIN:
                self.plan.append(_PrefixGroup(run))
            else:
                self.plan.extend(run)
            run = []
            if rt is not None:
                self.plan.append(rt)

    def match(self, head: RequestHead) -> tuple[Route, Backend, bytes] | None:
        """The first route whose conditions hold, its backend, and the upstream path."""
        path = head.path
        method = head.method
        host = None
        if self.needs_host:
            h = head.host
            if h is not None:
                # Without the port, lower case; "[v6]:port" keeps its brackets.
                c = h.rfind(b":")
                if c > 0 and h.find(b"]", c) < 0:
                    h = h[:c]
                host = h.lower().rstrip(b".")
        r: Route
        for item in self.plan:
            if type(item) is _PrefixGroup:
                found = item.find(path)
                if found is None:
                    continue
                r = found
                backend = r.backend
            else:
                r = item  # type: ignore[assignment]
                if r.methods is not None and method not in r.methods:
                    continue
                if not r.any_host:
                    if host is None:
                        continue
                    if host not in r.hosts:
                        for s in r.host_suffixes:
                            if host.endswith(s) and len(host) > len(s):
                                break
                        else:
                            continue
                kind = r.path_kind
                backend = r.backend
                if kind == P_PREFIX:
                    d = r.prefix_dir
                    if d:
                        if not path.startswith(d):
                            continue
                        n = len(d)
                        if len(path) != n and path[n] not in b"/?":
                            continue
                else:
                    q = path.find(b"?")
                    p = path if q < 0 else path[:q]
                    if kind == P_EXACT:
                        if p != r.path_exact:
                            continue
                    elif kind == P_REGEX:
                        assert r.path_re is not None
                        if r.path_re.search(p) is None:
                            continue
                    else:
                        value = r.path_map.lookup(p)
                        if value is None:
                            continue
                        backend = self.by_value.get(value)
                        if backend is None:
                            continue
                if r.headers and not _headers_hold(r.headers, head):
                    continue
            assert backend is not None
            if r.strip or r.replace_prefix is not None or r.rewrite is not None:
                return r, backend, r.upstream_path(path)
            return r, backend, path
        return None

"""Routes by path prefix, first match in config order.

This is the data path's interim router; the routing issue replaces it with core map
matching (host, path types, methods, headers). ``match`` returns the route and the path to
send upstream (the prefix stripped when the route says so).
"""

from __future__ import annotations

from fastgw._core.metrics import Histogram
from fastgw.config.model import RouteConfig
from fastgw.upstream.backend import Backend


class Route:
    __slots__ = (
        "backend",
        "config",
        "duration",
        "name",
        "name_bytes",
        "prefix",
        "prefix_dir",
        "status_counts",
        "strip",
    )

    def __init__(
        self, config: RouteConfig, backend: Backend, previous: Route | None = None
    ) -> None:
        # Counters outlive a reload when the route keeps its name (metrics stay monotonic).
        self.status_counts: list[int] = previous.status_counts if previous else [0] * 6
        self.duration: Histogram = previous.duration if previous else Histogram()
        self.config = config
        self.name = config.name
        self.name_bytes = config.name.encode()
        self.backend = backend
        p = config.path_prefix.encode()
        self.prefix = p
        # "/api" matches "/api", "/api/x" and "/api?q", not "/apix": a path prefix is a
        # prefix of whole segments (HAProxy's path_dir semantics), or "/" for everything.
        self.prefix_dir = p.rstrip(b"/")
        self.strip = config.strip_prefix


class Router:
    __slots__ = ("routes",)

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes

    def match(self, path: bytes) -> tuple[Route, bytes] | None:
        for r in self.routes:
            d = r.prefix_dir
            if not d:
                return r, path
            if path.startswith(d):
                n = len(d)
                if len(path) == n or path[n] in b"/?":
                    if r.strip:
                        rest = path[n:]
                        if not rest or rest[0] == 0x3F:  # "?"
                            rest = b"/" + rest
                        return r, rest
                    return r, path
        return None

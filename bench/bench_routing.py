"""What routing adds to a request in process: ``Router.match(head)`` on compiled routes.

Configurations, each against the same parsed request heads:
- ``one-prefix``: a single catch-all route (what the pass-through bench runs);
- ``ten-prefix``: ten ``path_prefix`` routes, the request matching the last one;
- ``mixed``: host, method and header conditions before the matching route;
- ``map-1k`` / ``map-10k`` / ``map-100k``: one ``path_map`` route whose map (``beg``,
  longest prefix) names the backend for each of N path prefixes.

``extra_info = {"op": "route", "message": <config>, "impl": "fastgw"}``. Nothing is
compared against a reference: the figure that matters is the absolute median (the
routing issue asks for under 1 microsecond), read off the same JSON as the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fastgw._core.http import parse_request_head
from fastgw.config.model import BackendConfig, Endpoint, GatewayConfig, ListenerConfig, RouteConfig
from fastgw.router import Route, Router
from fastgw.upstream.backend import Backend

HEAD = parse_request_head(
    b"GET /svc/orders/123?expand=items HTTP/1.1\r\nHost: api.example.com\r\n"
    b"User-Agent: bench\r\nAccept: application/json\r\nX-Tenant: acme\r\n\r\n"
)


def _router(routes: list[RouteConfig], names: tuple[str, ...] = ("fn",)) -> Router:
    ep = Endpoint(url="http://127.0.0.1:9", scheme="http", host="127.0.0.1", port=9, path_prefix="")
    backends = {n: Backend(BackendConfig(name=n, endpoints=(ep,))) for n in names}
    cfg = GatewayConfig(listeners=(ListenerConfig(name="l", host="127.0.0.1", port=0),))
    compiled = [Route(r, backends[r.backend] if r.backend else None, cfg) for r in routes]
    return Router(compiled, backends)


def _map_router(tmp: Path, size: int) -> Router:
    lines = [b"/svc%d/ fn\n" % i for i in range(size - 1)] + [b"/svc/orders fn\n"]
    p = tmp / f"paths-{size}.map"
    p.write_bytes(b"".join(lines))
    return _router([RouteConfig(name="m", backend=None, path_map=str(p), path_map_type="beg")])


CONFIGS: dict[str, Any] = {
    "one-prefix": lambda tmp: _router([RouteConfig(name="all", backend="fn")]),
    "ten-prefix": lambda tmp: _router(
        [RouteConfig(name=f"r{i}", backend="fn", path_prefix=f"/p{i}") for i in range(9)]
        + [RouteConfig(name="svc", backend="fn", path_prefix="/svc")]
    ),
    "mixed": lambda tmp: _router(
        [
            RouteConfig(name="posts", backend="fn", methods=("POST",), path_prefix="/svc"),
            RouteConfig(name="other-host", backend="fn", hosts=("www.example.com",)),
            RouteConfig(name="beta", backend="fn", headers=(("x-beta", None),)),
            RouteConfig(
                name="tenant",
                backend="fn",
                hosts=("*.example.com",),
                headers=(("x-tenant", "acme"),),
                path_prefix="/svc",
                strip_prefix=True,
            ),
        ]
    ),
    "map-1k": lambda tmp: _map_router(tmp, 1_000),
    "map-10k": lambda tmp: _map_router(tmp, 10_000),
    "map-100k": lambda tmp: _map_router(tmp, 100_000),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_route(benchmark: Any, tmp_path: Path, config: str) -> None:
    router = CONFIGS[config](tmp_path)
    got = router.match(HEAD)
    assert got is not None, config
    benchmark.extra_info.update(op="route", message=config, impl="fastgw")
    benchmark.group = f"route:{config}"
    benchmark(router.match, HEAD)

"""The router's prefix index agrees with a plain first-match scan on generated routes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fastgw._core.http import parse_request_head
from fastgw.config.model import (
    BackendConfig,
    Endpoint,
    GatewayConfig,
    ListenerConfig,
    RouteConfig,
)
from fastgw.router import Route, Router
from fastgw.upstream.backend import Backend

EP = Endpoint(url="http://127.0.0.1:9", scheme="http", host="127.0.0.1", port=9, path_prefix="")
BACKENDS = {"fn": Backend(BackendConfig(name="fn", endpoints=(EP,)))}
CFG = GatewayConfig(listeners=(ListenerConfig(name="l", host="127.0.0.1", port=0),))

segment = st.sampled_from(["a", "b", "ab", "api", "v1", "x.y", "-"])
prefix = st.lists(segment, max_size=3).map(lambda s: "/" + "/".join(s))
path = st.tuples(
    st.lists(segment, max_size=4).map(lambda s: "/" + "/".join(s)),
    st.sampled_from(["", "/", "?q=1", "/?a"]),
).map("".join)


def scan(prefixes: list[str], p: str) -> int | None:
    bare = p.split("?", 1)[0]
    for i, pre in enumerate(prefixes):
        d = pre.rstrip("/")
        if not d or bare == d or bare.startswith(d + "/"):
            return i
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(prefix, min_size=1, max_size=12, unique=True), st.lists(path, max_size=8))
def test_index_equals_scan(prefixes: list[str], paths: list[str]) -> None:
    routes = [
        Route(RouteConfig(name=f"r{i}", backend="fn", path_prefix=p), BACKENDS["fn"], CFG)
        for i, p in enumerate(prefixes)
    ]
    router = Router(routes, BACKENDS)
    for p in paths:
        head = parse_request_head(f"GET {p} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        got = router.match(head)
        want = scan(prefixes, p)
        assert (None if got is None else routes.index(got[0])) == want, (prefixes, p)

"""Routes from real config files: conditions, precedence, rewrites and header actions as
the upstream sees them, over real sockets."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from fastgw.config import load_config
from fastgw.errors import ConfigError
from fastgw.gateway import Gateway
from tests.e2e.helpers import Client, Received, Responder, Upstream


def tagged(tag: bytes):  # type: ignore[no-untyped-def]
    async def handler(req: Received, r: Responder) -> None:
        if req.target.startswith(b"/slow"):
            await trio.sleep(30)
        await r.respond(200, tag + b" " + req.target, [(b"x-up-secret", b"s"), (b"x-up", b"1")])

    return handler


async def setup(nursery: trio.Nursery, tmp_path: Path, routes: str) -> tuple[Gateway, int, dict]:
    ups = {}
    for name in ("a", "b", "c"):
        up = Upstream(handler=tagged(name.upper().encode()))
        ups[name] = up
        ups[name + "_port"] = await nursery.start(up.serve)
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        '[[listeners]]\nname = "main"\naddress = "127.0.0.1:0"\n'
        + "".join(
            f'[backends.{n}]\nendpoints = ["http://127.0.0.1:{ups[n + "_port"]}"]\n'
            for n in ("a", "b", "c")
        )
        + routes
    )
    gw = Gateway(load_config(conf))
    port = (await nursery.start(gw.serve))[0][1]
    return gw, port, ups


async def get(
    port: int,
    target: bytes,
    host: bytes = b"gw.test",
    method: bytes = b"GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes | None = None,
):  # type: ignore[no-untyped-def]
    c = await Client.open(port)
    raw = method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
    raw += b"".join(k + b": " + v + b"\r\n" for k, v in headers or [])
    if body is not None:
        raw += b"Content-Length: %d\r\n" % len(body)
    await c.send_raw(raw + b"\r\n" + (body or b""))
    r = await c.read_response(method)
    await c.aclose()
    return r


async def test_first_match_wins_across_condition_kinds(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    _, port, _ = await setup(
        nursery,
        tmp_path,
        """
[[routes]]
name = "admin-posts"
hosts = ["api.example.com"]
methods = ["POST"]
path_prefix = "/admin"
backend = "c"
[[routes]]
name = "tenant"
headers = { "x-tenant" = "acme" }
backend = "b"
[[routes]]
name = "debug"
headers = { "x-debug" = true }
path = "/exact"
backend = "c"
[[routes]]
name = "wild"
hosts = "*.example.com"
path_regex = "^/v[0-9]+/"
backend = "b"
[[routes]]
name = "rest"
backend = "a"
""",
    )
    assert (
        await get(port, b"/admin/x", b"api.example.com:8443", b"POST", body=b"")
    ).body == b"C /admin/x"
    assert (await get(port, b"/admin/x", b"API.Example.COM", b"GET")).body == b"A /admin/x"
    assert (await get(port, b"/x", headers=[(b"X-Tenant", b"acme")])).body == b"B /x"
    assert (await get(port, b"/x", headers=[(b"X-Tenant", b"other")])).body == b"A /x"
    assert (await get(port, b"/exact?q=1", headers=[(b"X-Debug", b"")])).body == b"C /exact?q=1"
    assert (await get(port, b"/exact/no", headers=[(b"X-Debug", b"1")])).body == b"A /exact/no"
    assert (await get(port, b"/v2/items", b"eu.example.com")).body == b"B /v2/items"
    assert (await get(port, b"/v2/items", b"example.com")).body == b"A /v2/items"  # not *.
    assert (await get(port, b"/vx/items", b"eu.example.com")).body == b"A /vx/items"


async def test_path_map_names_the_backend(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "paths.map").write_text(
        "# path prefix -> backend\n/api/orders b\n/api c\n\n/static a\n"
    )
    _, port, _ = await setup(
        nursery,
        tmp_path,
        """
[[routes]]
name = "by-map"
path_map = "paths.map"
path_map_type = "beg"
[[routes]]
name = "fallback"
path = "/health"
backend = "a"
""",
    )
    assert (await get(port, b"/api/orders/7")).body == b"B /api/orders/7"  # longest prefix
    assert (await get(port, b"/api/users?x=1")).body == b"C /api/users?x=1"
    assert (await get(port, b"/health")).body == b"A /health"
    r = await get(port, b"/nothing")
    assert r.status == 404 and r.json()["error"] == "no_route"


async def test_rewrites_and_header_actions(nursery: trio.Nursery, tmp_path: Path) -> None:
    _gw, port, ups = await setup(
        nursery,
        tmp_path,
        r"""
[[routes]]
name = "strip"
path_prefix = "/s"
strip_prefix = true
backend = "a"
[[routes]]
name = "replace"
path_prefix = "/old"
replace_prefix = "/new/v2"
backend = "a"
[[routes]]
name = "regex"
path_regex = "^/users/"
rewrite_regex = ["^/users/([0-9]+)$", "/u?id=\\1"]
backend = "a"
[routes.request_headers]
set = { "X-Env" = "prod", "X-Forwarded-Prefix" = "/users" }
remove = ["Cookie"]
[routes.response_headers]
set = { "Cache-Control" = "no-store" }
remove = ["X-Up-Secret"]
""",
    )
    assert (await get(port, b"/s/a/b?q=1")).body == b"A /a/b?q=1"
    assert (await get(port, b"/s")).body == b"A /"
    assert (await get(port, b"/old/x?y")).body == b"A /new/v2/x?y"
    r = await get(port, b"/users/42", headers=[(b"Cookie", b"a=b"), (b"X-Env", b"spoofed")])
    assert r.body == b"A /u?id=42"
    seen = ups["a"].received[-1]
    assert seen.header(b"cookie") is None
    assert seen.header_all(b"x-env") == [b"prod"]  # set replaces what the client sent
    assert seen.header(b"x-forwarded-prefix") == b"/users"
    assert r.header(b"x-up-secret") is None and r.header(b"x-up") == b"1"
    assert r.header(b"cache-control") == b"no-store"


async def test_per_route_body_limit_and_timeout(
    nursery: trio.Nursery, tmp_path: Path, autojump_clock: MockClock
) -> None:
    _, port, _ = await setup(
        nursery,
        tmp_path,
        """
[[routes]]
name = "small"
path_prefix = "/small"
max_body_bytes = 4
backend = "a"
[[routes]]
name = "slow"
path_prefix = "/slow"
first_byte_timeout_s = 2
backend = "a"
[[routes]]
name = "rest"
backend = "a"
""",
    )
    assert (await get(port, b"/small", method=b"POST", body=b"12345")).status == 413
    assert (await get(port, b"/other", method=b"POST", body=b"12345")).status == 200
    t0 = trio.current_time()
    r = await get(port, b"/slow")
    assert r.status == 504 and 2 <= trio.current_time() - t0 < 3


async def test_map_reload_is_atomic_swap(nursery: trio.Nursery, tmp_path: Path) -> None:
    m = tmp_path / "paths.map"
    m.write_text("/x a\n")
    gw, port, _ = await setup(
        nursery,
        tmp_path,
        """
[[routes]]
name = "by-map"
path_map = "paths.map"
""",
    )
    assert (await get(port, b"/x/1")).body == b"A /x/1"
    m.write_text("/x b\n/y c\n")
    old_router = gw.state.router
    gw.reload(load_config(gw.config.source))
    assert gw.state.router is not old_router  # a new map behind a new router: one swap
    assert (await get(port, b"/x/1")).body == b"B /x/1"
    assert (await get(port, b"/y")).body == b"C /y"


def test_config_errors_for_routes(tmp_path: Path) -> None:
    (tmp_path / "bad.map").write_text("/a nope\n/b a\n/c\n")
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        '[[listeners]]\nname = "m"\naddress = "127.0.0.1:0"\n'
        '[backends.a]\nendpoints = ["http://127.0.0.1:1"]\n'
        '[[routes]]\nname = "r1"\npath_map = "bad.map"\n'
        '[[routes]]\nname = "r2"\nbackend = "a"\npath = "/x"\npath_prefix = "/y"\n'
        '[[routes]]\nname = "r3"\nbackend = "a"\npath_regex = "(["\nmethods = ["get"]\n'
        '[[routes]]\nname = "r4"\nbackend = "a"\nhosts = ["bad host"]\n'
        'request_headers = { set = { "Content-Length" = "1" } }\n'
    )
    with pytest.raises(ConfigError) as e:
        load_config(conf)
    got = {(Path(f).name, k): msg for f, k, msg in e.value.problems}
    assert any(k == ("bad.map", "line 1") and "nope" in m for k, m in got.items())
    assert any(k == ("bad.map", "line 3") for k in got)  # no value: not a backend
    assert ("gateway.toml", "routes[1].path") in got  # one path condition per route
    assert ("gateway.toml", "routes[2].path_regex") in got
    assert ("gateway.toml", "routes[2].methods[0]") in got
    assert ("gateway.toml", "routes[3].hosts[0]") in got
    assert ("gateway.toml", "routes[3].request_headers.set.Content-Length") in got


async def test_prefix_index_keeps_first_match_order(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Runs of prefix-only routes are indexed; the answers must equal a scan in order,
    shadowed routes included (an earlier shorter prefix takes its subtree)."""
    _, port, _ = await setup(
        nursery,
        tmp_path,
        """
[[routes]]
name = "v2"
path_prefix = "/api/v2"
backend = "b"
[[routes]]
name = "api"
path_prefix = "/api"
backend = "a"
[[routes]]
name = "shadowed"
path_prefix = "/api/v3"
backend = "c"
[[routes]]
name = "static"
path_prefix = "/static/"
backend = "c"
[[routes]]
name = "root"
path_prefix = "/"
backend = "b"
""",
    )
    assert (await get(port, b"/api/v2/x")).body == b"B /api/v2/x"
    assert (await get(port, b"/api/v3/x")).body == b"A /api/v3/x"  # "api" comes first
    assert (await get(port, b"/api")).body == b"A /api"
    assert (await get(port, b"/apix")).body == b"B /apix"  # whole segments only
    assert (await get(port, b"/static/a.css?v=1")).body == b"C /static/a.css?v=1"
    assert (await get(port, b"/static")).body == b"C /static"
    assert (await get(port, b"/")).body == b"B /"


async def test_map_reload_through_admin(nursery: trio.Nursery, tmp_path: Path) -> None:
    import dataclasses
    import json

    from fastgw.config.model import AdminConfig

    m = tmp_path / "paths.map"
    m.write_text("/x a\n")
    gw, port, _ = await setup(nursery, tmp_path, '[[routes]]\nname = "m"\npath_map = "paths.map"\n')
    # The admin side comes from config; restart with it on.
    gw2 = Gateway(dataclasses.replace(gw.config, admin=AdminConfig(host="127.0.0.1", port=0)))
    port = (await nursery.start(gw2.serve))[0][1]
    assert gw2.admin_address is not None
    admin = gw2.admin_address[1]

    async def post_reload() -> tuple[int, dict]:
        c = await Client.open(admin)
        await c.send_raw(b"POST /maps/reload HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
        r = await c.read_response(b"POST")
        return r.status, json.loads(r.body)

    assert (await get(port, b"/x")).body == b"A /x"
    m.write_text("/x b\n")
    status, body = await post_reload()
    assert status == 200 and body["reloaded"][0]["entries"] == 1
    assert (await get(port, b"/x")).body == b"B /x"
    # A map naming an unknown backend is refused; the old map keeps serving.
    m.write_text("/x nope\n")
    status, body = await post_reload()
    assert status == 422 and "nope" in json.dumps(body["problems"])
    assert (await get(port, b"/x")).body == b"B /x"

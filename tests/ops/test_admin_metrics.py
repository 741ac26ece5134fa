"""The admin listener and the metrics it exports, over real sockets; the exposition is
checked by promtool (Debian's prometheus package), not by our own parser alone."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from fastgw.config.model import AdminConfig, RouteConfig
from fastgw.gateway import Gateway
from tests.e2e.helpers import Client, Received, Responder, Upstream, make_config


async def http_get(port: int, path: bytes) -> tuple[int, bytes]:
    c = await Client.open(port)
    r = await c.request(b"GET", path)
    await c.aclose()
    return r.status, r.body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def start(nursery: trio.Nursery, handler=None) -> tuple[Gateway, int, int]:
    async def default(req: Received, r: Responder) -> None:
        status = int(req.target.rsplit(b"/", 1)[-1] or b"200")
        await r.respond(status, b"x")

    up = Upstream(handler=handler or default)
    uport = await nursery.start(up.serve)
    routes = [
        RouteConfig(name="api", backend="fn", path_prefix="/api"),
        RouteConfig(name="rest", backend="fn", path_prefix="/other"),
    ]
    cfg = make_config([f"http://127.0.0.1:{uport}"], routes=routes)
    cfg = dataclasses.replace(cfg, admin=AdminConfig(host="127.0.0.1", port=0))
    gw = Gateway(cfg)
    port = (await nursery.start(gw.serve))[0][1]
    assert gw.admin_address is not None
    return gw, port, gw.admin_address[1]


async def test_metrics_after_known_traffic(nursery: trio.Nursery) -> None:
    _gw, port, admin = await start(nursery)
    c = await Client.open(port)
    for path in (b"/api/200", b"/api/200", b"/api/503", b"/nothing"):
        await c.request(b"GET", path)
    status, body = await http_get(admin, b"/metrics")
    assert status == 200
    s = samples(body.decode())
    assert s[("fastgw_requests_total", (("backend", "fn"), ("code", "2xx"), ("route", "api")))] == 2
    assert s[("fastgw_requests_total", (("backend", "fn"), ("code", "5xx"), ("route", "api")))] == 1
    assert s[("fastgw_requests_total", (("backend", ""), ("code", "4xx"), ("route", "")))] == 1
    assert s[("fastgw_request_duration_seconds_count", (("route", "api"),))] == 3
    assert s[("fastgw_upstream_first_byte_seconds_count", (("backend", "fn"),))] == 3
    assert s[("fastgw_errors_total", (("code", "no_route"),))] == 1
    ep = next(k for k in s if k[0] == "fastgw_upstream_connections_created_total")
    assert s[ep] == 1  # one pooled connection served all three
    assert ("fastgw_build_info", (("version", __import__("fastgw").__version__),)) in s
    # Label values are configuration names only: no path, no identity.
    assert b"/api/200" not in body and b"nothing" not in body


# In CI promtool must be there (scripts/test.sh installs it); elsewhere a missing tool
# skips with the command that brings it.
_IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.mark.skipif(
    shutil.which("promtool") is None and not _IN_CI,
    reason="promtool not installed (apt-get install prometheus)",
)
async def test_promtool_accepts_the_exposition(nursery: trio.Nursery) -> None:
    _gw, port, admin = await start(nursery)
    c = await Client.open(port)
    await c.request(b"GET", b"/api/200")
    _, body = await http_get(admin, b"/metrics")
    res = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    # promtool exits 0 when the format is valid; lint findings go to stderr as warnings.
    assert res.returncode == 0, res.stderr.decode() + res.stdout.decode()


async def test_healthz_readyz_config(nursery: trio.Nursery) -> None:
    gw, _port, admin = await start(nursery)
    assert await http_get(admin, b"/healthz") == (200, b"ok\n")
    status, body = await http_get(admin, b"/readyz")
    assert status == 200 and json.loads(body)["ready"] is True
    status, body = await http_get(admin, b"/config")
    cfg = json.loads(body)
    assert status == 200
    assert [r["name"] for r in cfg["routes"]] == ["api", "rest"]
    status, _ = await http_get(admin, b"/nope")
    assert status == 404
    with trio.fail_after(5):
        await gw.drain(0)
    status, body = await http_get(admin, b"/readyz")
    assert status == 503 and "draining" in json.loads(body)["reasons"]

"""The audit log: one JSON line per exchange, sampling, reopen for rotation."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import trio

from fastgw.config.model import AuditConfig, RouteConfig
from fastgw.gateway import Gateway
from tests.e2e.helpers import Client, Upstream, endpoint, make_config


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def start(nursery: trio.Nursery, tmp_path: Path, sample: float = 1.0) -> tuple[Gateway, int]:
    up = Upstream()
    uport = await nursery.start(up.serve)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    cfg = make_config(
        [f"http://127.0.0.1:{uport}"],
        routes=[
            RouteConfig(name="ok", backend="fn", path_prefix="/ok"),
            RouteConfig(name="down", backend="down", path_prefix="/down"),
        ],
    )
    backends = dict(cfg.backends)
    backends["down"] = dataclasses.replace(
        cfg.backends["fn"], name="down", endpoints=(endpoint(f"http://127.0.0.1:{dead_port}"),)
    )
    cfg = dataclasses.replace(
        cfg,
        backends=backends,
        audit=AuditConfig(enabled=True, path=str(tmp_path / "audit.log"), sample_success=sample),
    )
    gw = Gateway(cfg)
    port = (await nursery.start(gw.serve))[0][1]
    return gw, port


async def test_lines_for_allowed_failed_and_unrouted(nursery: trio.Nursery, tmp_path: Path) -> None:
    gw, port = await start(nursery, tmp_path)
    c = await Client.open(port)
    tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r1 = await c.request(b"POST", b"/ok/x", [(b"traceparent", tp)], body=b"hello")
    r2 = await c.request(b"GET", b"/down/y")
    r3 = await c.request(b"GET", b"/nowhere")
    assert gw.audit is not None
    gw.audit.flush()
    lines = read(tmp_path / "audit.log")
    assert [x["status"] for x in lines] == [200, 502, 404]
    ok, failed, unrouted = lines
    assert ok["request_id"] == r1.header(b"x-request-id").decode()
    assert ok["route"] == "ok" and ok["backend"] == "fn" and ok["decision"] == "allow"
    assert ok["client"] == "127.0.0.1"
    assert ok["bytes_in"] == 5 and ok["bytes_out"] == len(r1.body)
    assert ok["trace_id"] == tp.decode().split("-")[1]  # the trace id of the traceparent
    assert 0 < ok["upstream_first_byte_s"] <= ok["duration_s"]
    assert failed["request_id"] == r2.header(b"x-request-id").decode()
    assert failed["decision"] == "error" and failed["reason"] == "upstream_unreachable"
    assert failed["route"] == "down"
    assert unrouted["reason"] == "no_route" and unrouted["route"] is None
    assert r3.status == 404
    # Paths and tokens never appear: the line names routes, not URLs.
    assert all("/ok/x" not in json.dumps(x) for x in lines)


async def test_sampling_never_drops_errors(nursery: trio.Nursery, tmp_path: Path) -> None:
    gw, port = await start(nursery, tmp_path, sample=0.0)
    c = await Client.open(port)
    for _ in range(20):
        assert (await c.request(b"GET", b"/ok/x")).status == 200
    await c.request(b"GET", b"/nowhere")
    assert gw.audit is not None
    gw.audit.flush()
    assert [x["status"] for x in read(tmp_path / "audit.log")] == [404]


async def test_reopen_after_rotation(nursery: trio.Nursery, tmp_path: Path) -> None:
    gw, port = await start(nursery, tmp_path)
    c = await Client.open(port)
    await c.request(b"GET", b"/ok/1")
    assert gw.audit is not None
    gw.audit.flush()
    (tmp_path / "audit.log").rename(tmp_path / "audit.log.1")
    await c.request(b"GET", b"/ok/2")
    gw.audit.reopen()  # what SIGUSR1 does
    gw.audit.flush()
    assert len(read(tmp_path / "audit.log.1")) == 1
    assert len(read(tmp_path / "audit.log")) == 1

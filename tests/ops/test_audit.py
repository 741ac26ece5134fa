"""The audit log: one JSON line per exchange, sampling, reopen for rotation, the caller's
identity, a full ring and a failed write."""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from pathlib import Path

import pytest
import trio

from fastgw import audit
from fastgw.config import load_config
from fastgw.config.model import AuditConfig, RouteConfig
from fastgw.gateway import Gateway
from fastgw.identity import hash_api_key
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


async def test_identity_of_the_caller(nursery: trio.Nursery, tmp_path: Path) -> None:
    up = Upstream()
    uport = await nursery.start(up.serve)
    (tmp_path / "gateway.toml").write_text(
        f"""
[audit]
path = "audit.log"
[api_keys]
header = "X-Api-Key"
[[api_keys.keys]]
name = "batch"
sha256 = "{hash_api_key(b"s3cret-key")}"
attributes = {{ team = "billing" }}
[[policies]]
name = "billing"
routes = ["orders"]
[[policies.rules]]
effect = "allow"
key_attributes = {{ team = "billing" }}
[[listeners]]
name = "main"
address = "127.0.0.1:0"
[backends.fn]
endpoints = ["http://127.0.0.1:{uport}"]
[[routes]]
name = "orders"
path_prefix = "/orders"
backend = "fn"
"""
    )
    gw = Gateway(load_config(tmp_path / "gateway.toml"))
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    assert (await c.request(b"GET", b"/orders/1", [(b"X-Api-Key", b"s3cret-key")])).status == 200
    assert (await c.request(b"GET", b"/orders/2")).status == 401
    assert gw.audit is not None
    gw.audit.flush()
    ok, denied = read(tmp_path / "audit.log")
    who = ("subject", "issuer", "key", "decision")
    assert [ok[k] for k in who] == ["batch", None, "batch", "allow"]
    assert [denied[k] for k in who] == [None, None, None, "deny"]


def test_full_ring_drops_the_oldest_and_counts_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit, "MAX_PENDING", 2)
    log = audit.AuditLog(AuditConfig(enabled=True, path=str(tmp_path / "audit.log")))
    for i in range(3):
        log.ring.add(
            time.perf_counter(), b"r%d" % i, b"10.0.0.1", "ok", "fn", None, 200, "allow", None,
            None, 0.001, None, 0, 2, 0, None,
        )  # fmt: skip
    assert log.flush() == 2
    assert [x["request_id"] for x in read(tmp_path / "audit.log")] == ["r1", "r2"]
    assert (log.written, log.dropped) == (2, 1)
    assert abs(read(tmp_path / "audit.log")[0]["time"] - time.time()) < 60  # wall time


def test_write_failure_counts_the_lines_and_empties_the_ring(tmp_path: Path) -> None:
    log = audit.AuditLog(AuditConfig(enabled=True, path=str(tmp_path / "gone" / "audit.log")))
    log.ring.add(
        0.0, b"r", b"10.0.0.1", None, None, None, 404, "error", "no_route", None, 0.001, None,
        None, None, 0, None,
    )  # fmt: skip
    assert log.flush() == 0
    assert (log.written, log.dropped, len(log.ring)) == (0, 1, 0)
    (tmp_path / "gone").mkdir()  # the next flush reopens the file
    log.ring.add(
        0.0, b"r", b"10.0.0.1", None, None, None, 404, "error", "no_route", None, 0.001, None,
        None, None, 0, None,
    )  # fmt: skip
    assert log.flush() == 1
    assert read(tmp_path / "gone" / "audit.log")[0]["reason"] == "no_route"

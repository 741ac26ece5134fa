"""Hot reload: in-process (Gateway.reload) and over a real process (SIGHUP)."""

from __future__ import annotations

import dataclasses
import re
import signal
from pathlib import Path

import trio

from fastgw.config.model import Limits, ListenerConfig, RouteConfig
from fastgw.gateway import Gateway
from tests.e2e.helpers import Client, FastgwProcess, Received, Responder, Upstream, make_config


async def count_lines(p: FastgwProcess, pattern: str, n: int) -> None:
    """Wait until ``n`` output lines match ``pattern``."""
    while sum(1 for line in p.lines if re.search(pattern, line)) < n:
        if not p._open_streams:
            raise AssertionError(f"fewer than {n} lines matching {pattern!r}:\n{p.output}")
        await p._changed.wait()


def tagged(tag: bytes):  # type: ignore[no-untyped-def]
    async def handler(req: Received, r: Responder) -> None:
        await r.respond(200, tag + b" " + req.target)

    return handler


async def test_reload_swaps_routes_keeps_connections_and_pools(nursery: trio.Nursery) -> None:
    up_a, up_b = Upstream(handler=tagged(b"A")), Upstream(handler=tagged(b"B"))
    pa = await nursery.start(up_a.serve)
    pb = await nursery.start(up_b.serve)
    cfg = make_config(
        [f"http://127.0.0.1:{pa}"], routes=[RouteConfig(name="a", backend="fn", path_prefix="/a")]
    )
    gw = Gateway(cfg)
    port = (await nursery.start(gw.serve))[0][1]
    c = await Client.open(port)
    assert (await c.request(b"GET", b"/a/1")).body == b"A /a/1"
    assert (await c.request(b"GET", b"/b/1")).status == 404
    pool_before = gw.state.backends["fn"]

    # New route to a new backend, same "fn" backend unchanged, one more listener.
    from tests.e2e.helpers import endpoint

    new_backends = dict(cfg.backends)
    new_backends["other"] = dataclasses.replace(
        cfg.backends["fn"], name="other", endpoints=(endpoint(f"http://127.0.0.1:{pb}"),)
    )
    cfg2 = dataclasses.replace(
        cfg,
        backends=new_backends,
        routes=(
            RouteConfig(name="a", backend="fn", path_prefix="/a"),
            RouteConfig(name="b", backend="other", path_prefix="/b"),
        ),
        listeners=(*cfg.listeners, ListenerConfig(name="second", host="127.0.0.1", port=0)),
        limits=Limits(max_body_bytes=10),
    )
    gw.reload(cfg2)
    # The open keep-alive connection now sees the new routes.
    assert (await c.request(b"GET", b"/b/2")).body == b"B /b/2"
    assert (await c.request(b"GET", b"/a/2")).body == b"A /a/2"
    assert gw.state.backends["fn"] is pool_before  # warm pool kept
    assert up_a.connections == 1
    assert gw.state.router.routes[0].status_counts[2] == 2  # counters carried over
    # The new listener serves; the new limit applies.
    second = gw.addresses[1][1]
    c2 = await Client.open(second)
    assert (await c2.request(b"POST", b"/a/x", body=b"x" * 11)).status == 413
    assert gw.reloads_ok == 1

    # Removing the second listener closes it; the first keeps serving.
    gw.reload(cfg)
    assert len(gw.addresses) == 1
    assert (await c.request(b"GET", b"/a/3")).body == b"A /a/3"


async def test_sighup_reload_and_failed_reload_keeps_old_config(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    up = Upstream(handler=tagged(b"U"))
    uport = await nursery.start(up.serve)
    conf = tmp_path / "gateway.toml"

    def write(routes: str) -> None:
        conf.write_text(
            '[admin]\naddress = "127.0.0.1:0"\n'
            '[[listeners]]\nname = "main"\naddress = "127.0.0.1:0"\n'
            f'[backends.fn]\nendpoints = ["http://127.0.0.1:{uport}"]\n' + routes
        )

    write('[[routes]]\nname = "a"\npath_prefix = "/a"\nbackend = "fn"\n')
    p = await FastgwProcess.start(nursery, ["serve", "-c", str(conf)])
    with trio.fail_after(20):
        m = await p.wait_line(r"listening on http://127\.0\.0\.1:(\d+)")
        port = int(m.group(1))
        c = await Client.open(port)
        assert (await c.request(b"GET", b"/a/1")).status == 200
        assert (await c.request(b"GET", b"/b/1")).status == 404

        write(
            '[[routes]]\nname = "a"\npath_prefix = "/a"\nbackend = "fn"\n'
            '[[routes]]\nname = "b"\npath_prefix = "/b"\nbackend = "fn"\n'
        )
        p.proc.send_signal(signal.SIGHUP)
        await count_lines(p, r"fastgw: reloaded", 1)
        # Same keep-alive connection, new route.
        assert (await c.request(b"GET", b"/b/1")).body == b"U /b/1"

        # A broken config: problems printed like `fastgw check`, the old config serves.
        conf.write_text(conf.read_text() + '[[routes]]\nname = "c"\nbackend = "nope"\n')
        p.proc.send_signal(signal.SIGHUP)
        await count_lines(p, r"reload of .* failed", 1)
        assert re.search(r"gateway\.toml: routes\[2\]\.backend: .*nope", p.output)
        assert (await c.request(b"GET", b"/b/2")).body == b"U /b/2"
        assert (await c.request(b"GET", b"/a/2")).status == 200
        assert up.connections == 1

        p.proc.send_signal(signal.SIGTERM)
        assert await p.proc.wait() == 0


async def test_reload_under_load_no_failed_requests(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Steady keep-alive traffic from 20 clients while SIGHUP swaps in a config with a
    new route and a changed limit: every request gets its 200, no connection resets."""
    up = Upstream(handler=tagged(b"U"))
    uport = await nursery.start(up.serve)
    conf = tmp_path / "gateway.toml"

    def write(extra: str, max_body: int) -> None:
        conf.write_text(
            f"[limits]\nmax_body_bytes = {max_body}\n"
            '[[listeners]]\nname = "main"\naddress = "127.0.0.1:0"\n'
            f'[backends.fn]\nendpoints = ["http://127.0.0.1:{uport}"]\n'
            '[[routes]]\nname = "a"\npath_prefix = "/a"\nbackend = "fn"\n' + extra
        )

    write("", 1000)
    p = await FastgwProcess.start(nursery, ["serve", "-c", str(conf)])
    with trio.fail_after(60):
        port = int((await p.wait_line(r"listening on http://127\.0\.0\.1:(\d+)")).group(1))
        failures: list[str] = []
        done = 0
        halfway = trio.Event()

        async def client(i: int) -> None:
            nonlocal done
            c = await Client.open(port)
            for n in range(150):
                try:
                    r = await c.request(b"POST", b"/a/%d" % n, body=b"x" * 10)
                    if r.status != 200:
                        failures.append(f"client {i} request {n}: {r.status}")
                except Exception as e:  # a reset or a closed connection is a failure
                    failures.append(f"client {i} request {n}: {e!r}")
                    return
                done += 1
                if done == 20 * 50:
                    halfway.set()

        async with trio.open_nursery() as clients:
            for i in range(20):
                clients.start_soon(client, i)
            await halfway.wait()
            write('[[routes]]\nname = "b"\npath_prefix = "/b"\nbackend = "fn"\n', 50)
            p.proc.send_signal(signal.SIGHUP)
            await count_lines(p, r"fastgw: reloaded", 1)
        assert failures == []
        assert done == 20 * 150
        # The new config is in force: new route, new limit.
        c = await Client.open(port)
        assert (await c.request(b"GET", b"/b/x")).status == 200
        assert (await c.request(b"POST", b"/a/x", body=b"x" * 60)).status == 413
        p.proc.send_signal(signal.SIGTERM)
        assert await p.proc.wait() == 0

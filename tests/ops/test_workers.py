"""``fastgw serve --workers 2``: both workers serve one port, a killed worker is replaced
within a second while the other keeps serving, and /metrics covers the group."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from fastgw.supervisor import SUPERVISOR_PID_ENV, WORKER_ENV
from tests.e2e.helpers import Client, FastgwProcess, Upstream, worker_of


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        out.update(int(x) for x in text.split())
    return out


async def test_two_workers_share_load_and_survive_a_kill(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    up = Upstream()
    uport = await nursery.start(up.serve)
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        '[admin]\naddress = "127.0.0.1:0"\n'
        '[[listeners]]\nname = "main"\naddress = "127.0.0.1:0"\n'
        f'[backends.fn]\nendpoints = ["http://127.0.0.1:{uport}"]\n'
        '[[routes]]\nname = "all"\npath_prefix = "/"\nbackend = "fn"\n'
    )
    p = await FastgwProcess.start(nursery, ["serve", "-c", str(conf), "--workers", "2"])
    with trio.fail_after(30):
        port = int((await p.wait_line(r"listening on http://127\.0\.0\.1:(\d+)")).group(1))
        admin = int((await p.wait_line(r"admin on http://127\.0\.0\.1:(\d+)")).group(1))

        # The kernel spreads new connections over the workers (SO_REUSEPORT hashes each
        # connection): 400 one-request connections, so the split is a fair coin's, and
        # 20% is 4 standard deviations.
        counts: dict[bytes, int] = {}
        for _ in range(400):
            c = await Client.open(port)
            r = await c.request(b"GET", b"/")
            assert r.status == 200
            w = worker_of(r.header(b"x-request-id") or b"")
            counts[w] = counts.get(w, 0) + 1
            await c.aclose()
        assert len(counts) == 2, counts
        a, b = counts.values()
        assert abs(a - b) <= 0.2 * max(a, b), counts
        # Keep-alive clients for the kill below; each stays with one worker.
        clients = [await Client.open(port) for _ in range(40)]
        for c in clients:
            assert (await c.request(b"GET", b"/")).status == 200

        # Group metrics add up both workers.
        mc = await Client.open(admin)
        text = (await mc.request(b"GET", b"/metrics")).body.decode()
        total = sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == "fastgw_requests_total"
        )
        assert total == 440

        # Kill one worker: its clients lose their connections; the other worker's
        # clients see no failure, and a replacement serves soon (no back-off for a
        # first death: the time is the new interpreter's start, 0.4 s on an idle
        # machine and over 1 s on a loaded 2-core one, so the bound is generous).
        by_client = {}
        for c in clients:
            r = await c.request(b"GET", b"/")
            by_client[c] = worker_of(r.header(b"x-request-id") or b"")
        before = children(p.proc.pid)
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        t0 = trio.current_time()
        failed: dict[bytes, int] = {}
        served: dict[bytes, int] = {}
        for c, prefix in by_client.items():
            try:
                r = await c.request(b"GET", b"/")
                assert r.status == 200
                served[prefix] = served.get(prefix, 0) + 1
            except (EOFError, trio.BrokenResourceError, h11.RemoteProtocolError):
                failed[prefix] = failed.get(prefix, 0) + 1
        # Exactly one worker's clients failed, all of them; the other's all succeeded.
        assert len(failed) == 1 and len(served) == 1, (failed, served)
        assert set(failed) != set(served)
        # Poll for the replacement: another process's start has no event to wait on.
        new_prefix = None
        while new_prefix is None:
            c = await Client.open(port)
            r = await c.request(b"GET", b"/")
            assert r.status == 200
            w = worker_of(r.header(b"x-request-id") or b"")
            if w not in counts:
                new_prefix = w
            await c.aclose()
            await trio.sleep(0.01)
        replaced_in = trio.current_time() - t0
        assert replaced_in < 5.0, replaced_in
        assert len(children(p.proc.pid) - before) == 1
        p.proc.send_signal(signal.SIGTERM)
        assert await p.proc.wait() == 0


async def test_workers_exit_when_the_supervisor_is_killed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    up = Upstream()
    uport = await nursery.start(up.serve)
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        '[[listeners]]\nname = "main"\naddress = "127.0.0.1:0"\n'
        f'[backends.fn]\nendpoints = ["http://127.0.0.1:{uport}"]\n'
        '[[routes]]\nname = "all"\npath_prefix = "/"\nbackend = "fn"\n'
    )
    p = await FastgwProcess.start(nursery, ["serve", "-c", str(conf), "--workers", "2"])
    with trio.fail_after(30):
        await p.wait_line(r"listening on http://127\.0\.0\.1:(\d+)")
        workers = children(p.proc.pid)
        assert len(workers) == 2
        os.kill(p.proc.pid, signal.SIGKILL)
        # Another process's exit has no event to wait on here: poll /proc.
        while any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers):
            await trio.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


async def test_a_worker_whose_supervisor_died_before_it_looked_exits(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The supervisor names itself; a worker re-parented before it first checks (the
    # supervisor was killed right after the worker said it was listening) still sees
    # that its parent is not the supervisor, instead of taking its new parent for it.
    up = Upstream()
    uport = await nursery.start(up.serve)
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        '[[listeners]]\nname = "main"\naddress = "127.0.0.1:0"\n'
        f'[backends.fn]\nendpoints = ["http://127.0.0.1:{uport}"]\n'
        '[[routes]]\nname = "all"\npath_prefix = "/"\nbackend = "fn"\n'
    )
    monkeypatch.setenv(WORKER_ENV, "0")
    monkeypatch.setenv(SUPERVISOR_PID_ENV, "1")  # not its parent (this process)
    p = await FastgwProcess.start(nursery, ["serve", "-c", str(conf)])
    with trio.fail_after(30):
        await p.wait_line(r"listening on http://127\.0\.0\.1:(\d+)")
        await p.wait_line("supervisor gone; draining")
        assert await p.proc.wait() == 0

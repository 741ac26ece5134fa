"""``fastgw serve --workers 2`` with a rate limit: the workers share one bucket per key
(the supervisor's shared table, fastgw/_core/bucket.pyx "Shared tables"), so a caller
gets its burst once, not once per worker."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.helpers import Client, FastgwProcess, Upstream, worker_of


async def test_two_workers_share_one_bucket_per_caller(
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
        '[[rate_limits]]\nname = "per-ip"\nroutes = ["all"]\nkey = "ip"\n'
        "rate_per_s = 1\nburst = 20\n"
    )
    p = await FastgwProcess.start(nursery, ["serve", "-c", str(conf), "--workers", "2"])
    with trio.fail_after(60):
        port = int((await p.wait_line(r"listening on http://127\.0\.0\.1:(\d+)")).group(1))
        admin = int((await p.wait_line(r"admin on http://127\.0\.0\.1:(\d+)")).group(1))
        # 60 one-request connections, one client address: the kernel spreads them over
        # both workers (SO_REUSEPORT); the shared bucket lets exactly 20 through, at 1/s
        # plus whatever refilled while the test ran (at most a few tokens).
        started = trio.current_time()
        served_by: dict[bytes, list[int]] = {}
        statuses = await requests(port, 60, served_by)
        elapsed_s = trio.current_time() - started
        assert len(served_by) == 2, served_by.keys()  # both workers answered
        assert set(statuses) == {200, 429}
        allowed = statuses.count(200)
        assert 20 <= allowed <= 20 + int(elapsed_s) + 1, (allowed, elapsed_s)
        if elapsed_s < 1.0:
            assert allowed == 20 and statuses[:20] == [200] * 20
        # Each worker refused some: neither had a bucket of its own.
        assert all(429 in s for s in served_by.values()), served_by

        # The group's /metrics: one key in the one table (each worker reports it whole).
        mc = await Client.open(admin)
        text = (await mc.request(b"GET", b"/metrics")).body.decode()
        await mc.aclose()
        keys = [
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == "fastgw_rate_limit_keys"
        ]
        assert keys == [1.0], keys

        # A reload (SIGHUP, forwarded to both workers) keeps the shared table: the
        # caller stays limited, and only what refilled since the start gets through.
        p.proc.send_signal(signal.SIGHUP)
        await count_lines(p, r"\[worker \d\] fastgw: reloaded", 2)
        statuses += await requests(port, 20, served_by)
        elapsed_s = trio.current_time() - started
        assert statuses.count(200) <= 20 + int(elapsed_s) + 1, (statuses, elapsed_s)
        # The table is a file already removed: each worker has it open, from the
        # supervisor, so nothing is left behind however the group ends.
        tables = _tables_of(p)
        assert len(tables) == 2 and all(t.endswith("/buckets (deleted)") for t in tables)
        assert len({os.path.dirname(t) for t in tables}) == 1, tables
        assert not os.path.exists(os.path.dirname(tables[0]))
        p.proc.terminate()
        assert await p.proc.wait() == 0


async def requests(port: int, n: int, served_by: dict[bytes, list[int]]) -> list[int]:
    """``n`` GETs, each on a fresh connection; the statuses, also by worker."""
    statuses = []
    for _ in range(n):
        c = await Client.open(port)
        r = await c.request(b"GET", b"/")
        await c.aclose()
        statuses.append(r.status)
        served_by.setdefault(worker_of(r.header(b"x-request-id") or b""), []).append(r.status)
    return statuses


async def count_lines(p: FastgwProcess, pattern: str, n: int) -> None:
    """Wait until ``n`` output lines match ``pattern``."""
    while sum(1 for line in p.lines if re.search(pattern, line)) < n:
        if not p._open_streams:
            raise AssertionError(f"fewer than {n} lines matching {pattern!r}:\n{p.output}")
        await p._changed.wait()


def _tables_of(p: FastgwProcess) -> list[str]:
    """What each worker's shared table descriptor points to."""
    pid = p.proc.pid
    children = set()
    for tid in os.listdir(f"/proc/{pid}/task"):  # trio starts processes from threads
        children.update(Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    out = []
    for child in children:
        for item in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            if item.startswith(b"FASTGW_SHARED_BUCKETS="):
                fd = os.fsdecode(item.split(b"=", 1)[1].split(b":", 1)[1]).rsplit("/", 1)[1]
                out.append(os.readlink(f"/proc/{child}/fd/{fd}"))
    return out

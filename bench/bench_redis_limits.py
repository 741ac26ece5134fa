"""Micro benchmarks of the shared limits in Redis (fastgw/policy/redis_limits.py).

A real ``redis-server`` on 127.0.0.1 (started here, as in the tests: its own port and
directory, no persistence), one ``RedisBuckets`` over one pipelined connection, Redis's
own clock (``TIME``: the production path, not the tests' injected ``now``), keys drawn
at random from 10k identities, limits high enough that nothing is ever refused
(checked), and a call timeout of 1 s so that a noisy neighbour cannot turn a figure into
a fallback (checked: no fallback in any run).

Timing. The calls are async and pytest-benchmark's are not, so a trio loop runs in a
thread of its own and each round is handed to it with ``trio.from_thread.run``. The
round is timed inside the loop (``perf_counter`` around the awaits), and the benchmark's
timer is a clock that advances only by those measured times (``MeasuredClock``): the
thread hop that delivers a round is not in the figures. ``python -m
bench.bench_redis_limits`` measures the same things without pytest or threads.

Groups (see bench/README.md; no floors, so CI does not run them):

- ``redis_take:loopback``: one ``take``, one round trip. ``fastgw`` is
  ``RedisBuckets.take``; ``ping`` is a PING through the same kind of client (the round
  trip with no script: the floor); ``local_core`` is ``BucketTable.take`` in the same
  loop (what a take costs without Redis).
- ``redis_take_many:3_limits``: three limits of one request. ``fastgw`` is one
  ``take_many`` (one round trip, one script run); ``sequential`` is three ``take``s.
- ``redis_take_concurrent:100_callers``: 100 tasks take at once; the time until all
  have their answers, divided by 100 (what pipelining on one connection buys).
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from fastgw._core.bucket import BucketTable
from fastgw.policy._resp import RespClient, open_resp_client
from fastgw.policy.redis_limits import RedisBuckets, open_redis_buckets

RATE = 1e6
BURST = 1e9  # never refused
N_KEYS = 10_000
CONCURRENT = 100


class MeasuredClock:
    """A benchmark timer that advances only by what ``add`` is given, plus 1 ns per
    read (so that it never stands still for anything that polls it)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1e-9
        return self.t

    def add(self, dt: float) -> None:
        self.t += dt


CLOCK = MeasuredClock()


class Measures:
    """The measured operations, each returning its duration in seconds (per take for
    the concurrent one). Run inside the trio loop."""

    def __init__(self, rb: RedisBuckets, ping_client: RespClient, seed: int = 5) -> None:
        self.rb = rb
        self.ping_client = ping_client
        rnd = random.Random(seed)
        self.keys = [b"sub:%032x" % rnd.getrandbits(128) for _ in range(N_KEYS)]
        self.rnd = rnd
        self.local = BucketTable(N_KEYS)
        self.refused = 0

    def key(self) -> bytes:
        return self.keys[self.rnd.randrange(N_KEYS)]

    async def take(self) -> float:
        k = self.key()
        t0 = time.perf_counter()
        w = await self.rb.take(k, 1, RATE, BURST)
        dt = time.perf_counter() - t0
        self.refused += w != 0.0
        return dt

    async def ping(self) -> float:
        t0 = time.perf_counter()
        await self.ping_client.call(b"PING")
        return time.perf_counter() - t0

    async def local_core(self) -> float:
        k = self.key()
        t0 = time.perf_counter()
        w = self.local.take(k, 1, trio.current_time(), RATE, BURST)
        dt = time.perf_counter() - t0
        self.refused += w != 0.0
        return dt

    async def take_many(self) -> float:
        k = self.key()
        takes = [
            (b"route\0" + k, 1, RATE, BURST),
            (b"tier\0" + k, 1, RATE, BURST),
            (b"ip", 1, RATE, BURST),
        ]
        t0 = time.perf_counter()
        ws = await self.rb.take_many(takes, stop=[True, True, True])
        dt = time.perf_counter() - t0
        self.refused += sum(w != 0.0 for w in ws)
        return dt

    async def sequential(self) -> float:
        k = self.key()
        rb = self.rb
        t0 = time.perf_counter()
        w1 = await rb.take(b"route\0" + k, 1, RATE, BURST)
        w2 = await rb.take(b"tier\0" + k, 1, RATE, BURST)
        w3 = await rb.take(b"ip", 1, RATE, BURST)
        dt = time.perf_counter() - t0
        self.refused += (w1 != 0.0) + (w2 != 0.0) + (w3 != 0.0)
        return dt

    async def concurrent(self) -> float:
        keys = [self.key() for _ in range(CONCURRENT)]
        rb = self.rb
        answers: list[float] = []

        async def one(k: bytes) -> None:
            answers.append(await rb.take(k, 1, RATE, BURST))

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for k in keys:
                nursery.start_soon(one, k)
        dt = time.perf_counter() - t0
        self.refused += sum(w != 0.0 for w in answers)
        return dt / CONCURRENT


class Loop:
    """A trio loop in a thread, holding the clients, until ``close``."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the trio loop did not start")
        if self._error is not None:
            raise self._error

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # reported to the constructor or by close()
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        async with (
            open_redis_buckets(self.address, timeout_s=1.0) as rb,
            open_resp_client(self.address, timeout_s=1.0) as ping_client,
        ):
            with trio.fail_after(10):
                await rb.wait_redis()
                await ping_client.wait_connected()
            self.measures = Measures(rb, ping_client)
            self.token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self._ready.set()
            await self._stop.wait()

    def round(self, measure: Callable[[], Awaitable[float]]) -> None:
        """One timed round of ``measure``, added to the benchmark clock."""
        CLOCK.add(trio.from_thread.run(measure, trio_token=self.token))

    def close(self) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        self._thread.join(10)


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    from tests.limits.conftest import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        pytest.skip("redis-server not installed (apt-get install redis-server)")
    with tempfile.TemporaryDirectory() as d:
        server = RedisServer(REDIS_SERVER, Path(d))
        server.start()
        try:
            lp = Loop(server.address)
            try:
                yield lp
                st = lp.measures.rb.statistics()
                assert st["fallbacks"] == 0 and lp.measures.refused == 0, st
            finally:
                lp.close()
        finally:
            server.kill()


def _tag(benchmark: Any, op: str, message: str, impl: str) -> None:
    benchmark.group = f"{op}:{message}"
    benchmark.extra_info.update(op=op, message=message, impl=impl)


def _run(
    benchmark: Any,
    loop: Loop,
    measure: Callable[[], Awaitable[float]],
    pedantic_rounds: Callable[[float], int],
    round_s: float = 1e-3,
) -> None:
    for _ in range(50):  # warm up: the keys' first takes, the script cache, the loop
        loop.round(measure)
    # A round costs its measured time plus the thread hop (about 90 us here), and on a
    # busy machine several times that: ``round_s`` is a generous estimate, so that the
    # run stays near --benchmark-max-time.
    benchmark.pedantic(loop.round, args=(measure,), rounds=pedantic_rounds(round_s))


@pytest.mark.benchmark(timer=CLOCK)
@pytest.mark.parametrize("impl", ("fastgw", "ping", "local_core"))
def test_take(
    benchmark: Any, loop: Loop, impl: str, pedantic_rounds: Callable[[float], int]
) -> None:
    _tag(benchmark, "redis_take", "loopback", impl)
    m = loop.measures
    measure = {"fastgw": m.take, "ping": m.ping, "local_core": m.local_core}[impl]
    _run(benchmark, loop, measure, pedantic_rounds)


@pytest.mark.benchmark(timer=CLOCK)
@pytest.mark.parametrize("impl", ("fastgw", "sequential"))
def test_take_many(
    benchmark: Any, loop: Loop, impl: str, pedantic_rounds: Callable[[float], int]
) -> None:
    _tag(benchmark, "redis_take_many", "3_limits", impl)
    m = loop.measures
    _run(benchmark, loop, m.take_many if impl == "fastgw" else m.sequential, pedantic_rounds)


@pytest.mark.benchmark(timer=CLOCK)
def test_take_concurrent(
    benchmark: Any, loop: Loop, pedantic_rounds: Callable[[float], int]
) -> None:
    _tag(benchmark, "redis_take_concurrent", f"{CONCURRENT}_callers", "fastgw")
    _run(benchmark, loop, loop.measures.concurrent, pedantic_rounds, round_s=10e-3)


# ---------------------------------------------------------------------------------------
# Without pytest: medians straight from the trio loop.


async def _main(address: str, n: int) -> None:
    async with (
        open_redis_buckets(address, timeout_s=1.0) as rb,
        open_resp_client(address, timeout_s=1.0) as ping_client,
    ):
        with trio.fail_after(10):
            await rb.wait_redis()
            await ping_client.wait_connected()
        m = Measures(rb, ping_client)
        for name, fn in (
            ("take (1 limit)", m.take),
            ("PING (same client)", m.ping),
            ("BucketTable.take (no Redis)", m.local_core),
            ("take_many (3 limits)", m.take_many),
            ("3 takes, one after another", m.sequential),
            (f"take, {CONCURRENT} callers at once (per take)", m.concurrent),
        ):
            for _ in range(100):
                await fn()
            runs = n if fn is not m.concurrent else max(10, n // CONCURRENT)
            times = [await fn() for _ in range(runs)]
            print(f"{name:<44} median {statistics.median(times) * 1e6:8.1f} us")
        assert rb.statistics()["fallbacks"] == 0 and m.refused == 0, rb.statistics()


def main() -> None:
    from tests.limits.conftest import RedisServer

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not installed (apt-get install redis-server)")
    with tempfile.TemporaryDirectory() as d:
        server = RedisServer(exe, Path(d))
        server.start()
        try:
            print(server.command("INFO", "server").split(b"\r\n")[1].decode())  # type: ignore[attr-defined]
            trio.run(_main, server.address, 5000)
        finally:
            server.kill()


if __name__ == "__main__":
    main()

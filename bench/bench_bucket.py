"""Micro benchmarks of the token-bucket core (fastgw/_core/bucket.pyx).

``BucketTable.take`` on tables of 1k and 1M keys, each call a hit on an existing key
picked at random, against the Python one would otherwise write (a dict of key -> TAT as
a float, ``DictBuckets`` below: no bound on the keys, no eviction, float math) in the
same run. For 1M keys a third figure is the floor: one random byte read from a bytearray
as large as the table, through the same call machinery. A table larger than the CPU
caches costs at least one cache miss per hit, and on a VM that miss is most of the time.

Each call takes one token for the next key of a random sequence (``map`` over the
sequence, one ``__next__`` per timed call, so the per-call overhead is the same C-level
call for every implementation). The key objects are equal copies, made in the order they
are used, not the objects stored in the table: a gateway builds its key from the request,
so a hit never finds its own object. ``now`` advances 1 us per call; rate and burst are
high enough that nothing is ever limited (checked).

``fastgw_shared`` is the same table shared by processes (``BucketTable(n, path)``, a
file on /dev/shm or the temporary directory): the same lookup plus an uncontended
spinlock on a word of the file, on pages without transparent huge pages.

Groups (see bench/README.md): ``bucket_take:1k_keys``, ``bucket_take:1m_keys`` and
``bucket_take_new_key:1m_keys`` (a key not in a full table, so each call evicts a full
bucket). The 1M benchmarks record the memory of the table and of the dict in
``extra_info``; ``python -m bench.bench_bucket`` prints medians and memory without pytest.

Read the dict's 1M figure as a lower bound: pytest-benchmark times it in rounds of about
100 calls, and the median of such short rounds leaves out a periodic cost of the dict
path (allocator churn from a new float per take, most likely) that rounds of 2000 calls
include: there the dict's median is 2.3-3.1 us, the table's unchanged.
"""

from __future__ import annotations

import gc
import itertools
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from fastgw._core.bucket import BucketTable

RATE = 1000.0
BURST = 1e9  # never limited: a bucket could only run dry after 10**9 takes
T0 = 1000.0
STEP_S = 1e-6
SEQ_LEN = 1 << 18


class DictBuckets:
    """The reference: GCRA in plain Python over a dict of key -> TAT in float seconds."""

    def __init__(self) -> None:
        self.tat: dict[bytes, float] = {}

    def take(self, key: bytes, cost: int, now: float, rate: float, burst: float) -> float:
        interval = 1.0 / rate
        tat = self.tat.get(key, now)
        if tat < now:
            tat = now
        new_tat = tat + cost * interval
        if new_tat - burst * interval <= now:
            self.tat[key] = new_tat
            return 0.0
        return new_tat - burst * interval - now


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@dataclass
class Setup:
    n: int
    keys: list[bytes]
    table: BucketTable
    ref: DictBuckets
    seq: list[bytes]  # fresh copies, in access order
    memory: dict[str, int] = field(default_factory=dict)


def make_setup(n: int, seed: int = 6) -> Setup:
    rng = random.Random(seed)
    # "sub:" + 32 hex digits: 36 bytes, an identity key as the gateway would build one.
    keys = [b"sub:%032x" % rng.getrandbits(128) for _ in range(n)]
    gc.collect()
    r0 = rss_bytes()
    table = BucketTable(n)
    for k in keys:
        table.take(k, 1, T0, RATE, BURST)
    gc.collect()
    r1 = rss_bytes()
    ref = DictBuckets()
    for k in keys:
        ref.take(k, 1, T0, RATE, BURST)
    gc.collect()
    r2 = rss_bytes()
    # The dict also keeps its key objects alive (the table keeps copies in its slots).
    key_objects = sum(k.__sizeof__() for k in keys)
    seq = [bytes(bytearray(keys[rng.randrange(n)])) for _ in range(min(SEQ_LEN, 4 * n))]
    memory = {
        "table_rss_delta_bytes": r1 - r0,
        "table_memory_bytes": table.statistics()["memory_bytes"],
        "dict_rss_delta_bytes": r2 - r1,
        "dict_key_objects_bytes": key_objects,
    }
    return Setup(n, keys, table, ref, seq, memory)


def calls(fn: Callable[..., float], seq: list[bytes]) -> Callable[[], float]:
    """One call of ``fn`` per ``__next__``, for the next key of ``seq`` (cycled)."""
    it: Iterator[float] = map(
        fn,
        itertools.cycle(seq),
        itertools.repeat(1),
        itertools.count(T0 + 1.0, STEP_S),
        itertools.repeat(RATE),
        itertools.repeat(BURST),
    )
    return it.__next__


def random_reads(nbytes: int, count: int, seed: int = 7) -> Callable[[], int]:
    rng = random.Random(seed)
    buf = bytearray(nbytes)
    buf[::4096] = b"\x01" * len(buf[::4096])  # touch every page
    idx = [rng.randrange(nbytes) for _ in range(count)]
    return map(buf.__getitem__, itertools.cycle(idx)).__next__


SIZES = {"1k_keys": 1_000, "1m_keys": 1_000_000}


@pytest.fixture(scope="module", params=list(SIZES), ids=list(SIZES))
def setup(request: pytest.FixtureRequest) -> Iterator[tuple[str, Setup]]:
    name = request.param
    made = make_setup(SIZES[name])
    yield name, made
    del made
    gc.collect()


def _tag(benchmark: Any, op: str, message: str, impl: str) -> None:
    benchmark.group = f"{op}:{message}"
    benchmark.extra_info.update(op=op, message=message, impl=impl)


def shared_table(made: Setup, directory: str) -> BucketTable:
    """``made``'s keys in a shared table whose file is in ``directory``."""
    table = BucketTable(made.n, os.path.join(directory, "buckets"))
    for k in made.keys:
        table.take(k, 1, T0, RATE, BURST)
    return table


def _shm_dir() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@pytest.mark.parametrize("impl", ("fastgw", "fastgw_shared", "dict", "random_read"))
def test_take_hit(benchmark: Any, setup: tuple[str, Setup], impl: str) -> None:
    name, made = setup
    _tag(benchmark, "bucket_take", name, impl)
    if name == "1m_keys":
        benchmark.extra_info.update(made.memory)
    if impl == "fastgw":
        before = made.table.statistics()
        assert made.table.take(made.seq[0], 1, T0 + 1.0, RATE, BURST) == 0.0
        benchmark(calls(made.table.take, made.seq))
        after = made.table.statistics()
        assert after["limited"] == 0 and after["evictions"] == before["evictions"] == 0
        assert after["keys"] == made.n
    elif impl == "fastgw_shared":
        with tempfile.TemporaryDirectory(dir=_shm_dir()) as d:
            table = shared_table(made, d)
            assert table.take(made.seq[0], 1, T0 + 1.0, RATE, BURST) == 0.0
            benchmark(calls(table.take, made.seq))
            stats = table.statistics()
            assert stats["limited"] == stats["evictions"] == 0 and stats["keys"] == made.n
            del table
    elif impl == "dict":
        assert made.ref.take(made.seq[0], 1, T0 + 1.0, RATE, BURST) == 0.0
        benchmark(calls(made.ref.take, made.seq))
        assert len(made.ref.tat) == made.n
    elif impl == "random_read":
        if name != "1m_keys":
            pytest.skip("the floor matters only for a table larger than the caches")
        nbytes = made.table.statistics()["slots"] * 64
        benchmark(random_reads(nbytes, len(made.seq)))
    else:
        raise AssertionError(impl)


def test_take_new_key_evicting(benchmark: Any, setup: tuple[str, Setup]) -> None:
    """A key not in the table, which is full: each call evicts a full bucket (the
    lossless kind) and inserts. Runs after the hits: it replaces the table's keys."""
    name, made = setup
    if name != "1m_keys":
        pytest.skip("one table size is enough")
    _tag(benchmark, "bucket_take_new_key", name, "fastgw")
    fresh = (b"new:%032x" % i for i in itertools.count())
    # An hour later every bucket has refilled, and as time goes on (1 us a call) each
    # new key is full again 1 ms (1000 calls) after its take: full buckets never run out.
    later = itertools.count(T0 + 3600.0, STEP_S)
    table = made.table
    before = table.statistics()

    def take_new() -> float:
        return table.take(next(fresh), 1, next(later), RATE, BURST)

    benchmark(take_new)
    after = table.statistics()
    assert after["keys"] == made.n and after["evictions_lossy"] == before["evictions_lossy"]
    assert after["evictions"] > before["evictions"]


# ---------------------------------------------------------------------------------------
# Without pytest: medians of a few long runs, and the memory for 1M keys.


def _median_ns(
    fn: Callable[[], object], calls_per_round: int, rounds: int, warmup: int = SEQ_LEN
) -> float:
    for _ in itertools.repeat(None, warmup):
        fn()
    per_call = []
    for _ in range(rounds):
        t = time.perf_counter_ns()
        for _ in itertools.repeat(None, calls_per_round):
            fn()
        per_call.append((time.perf_counter_ns() - t) / calls_per_round)
    per_call.sort()
    return per_call[len(per_call) // 2]


def main() -> None:
    for name, n in SIZES.items():
        made = make_setup(n)
        print(f"{name}:")
        d = tempfile.TemporaryDirectory(dir=_shm_dir())
        shared = shared_table(made, d.name)
        for label, fn in (
            ("fastgw BucketTable.take", calls(made.table.take, made.seq)),
            ("fastgw, shared table", calls(shared.take, made.seq)),
            ("dict of floats (Python)", calls(made.ref.take, made.seq)),
        ):
            print(f"  {label:<28} {_median_ns(fn, 2000, 101):8.1f} ns median")
        del shared
        d.cleanup()
        if n >= 1_000_000:
            floor = random_reads(made.table.statistics()["slots"] * 64, len(made.seq))
            print(
                f"  {'one random read (floor)':<28} {_median_ns(floor, 2000, 101):8.1f} ns median"
            )
            m = made.memory
            print(
                f"  memory: table {m['table_memory_bytes'] / 1e6:.1f} MB allocated, "
                f"RSS +{m['table_rss_delta_bytes'] / 1e6:.1f} MB; "
                f"dict RSS +{m['dict_rss_delta_bytes'] / 1e6:.1f} MB "
                f"+ {m['dict_key_objects_bytes'] / 1e6:.1f} MB of key objects"
            )
        del made
        gc.collect()


if __name__ == "__main__":
    main()

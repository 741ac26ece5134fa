"""The token-bucket core (fastgw._core.bucket): exact counts, policy changes, eviction, and
a plain-Python model in integer math that the core must agree with on generated sequences.

Times are integer nanoseconds turned into float seconds (``ns / 10**9``); below about
10**15 ns the float carries every ns, so the core's grid and the model's are the same.
"""

from __future__ import annotations

import importlib.machinery
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastgw._core.bucket as core_bucket
from fastgw._core.bucket import (
    INLINE_KEY_BYTES,
    MAX_KEY_BYTES,
    MAX_RATE_PER_S,
    MAX_TAU_S,
    MIN_RATE_PER_S,
    BucketTable,
)

NS = 10**9
INF = math.inf


def s(ns: int) -> float:
    return ns / NS


def to_ns(t: float) -> int:
    """The core's conversion: llround(t * 1e9), the product rounded as a double first."""
    return int(Decimal(t * 1e9).to_integral_value(rounding=ROUND_HALF_UP))


def interval_ns(rate: float) -> int:
    return math.ceil(Fraction(NS) / Fraction(rate))


def tau_ns(rate: float, burst: float) -> int:
    return math.floor(Fraction(burst) * interval_ns(rate))


def wait_s(now: float, now_ns: int, wait_ns: int) -> float:
    """The core's float for a wait: wait_ns / 1e9 unless ``now + w`` would round to before
    the target; then the smallest step past the target on the float line."""
    target = now_ns + wait_ns
    w = wait_ns / 1e9
    if to_ns(now + w) >= target:
        return w
    t = target / 1e9
    while to_ns(t) < target:
        t = math.nextafter(t, math.inf)
    w = t - now
    while to_ns(now + w) < target:
        w = math.nextafter(w, math.inf)
    return w


# ---------------------------------------------------------------------------------------
# The build


def test_bucket_core_is_compiled() -> None:
    assert core_bucket.__file__ is not None
    assert core_bucket.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


@pytest.mark.parametrize("module", ["bucket", "shm"])
def test_stubs_match_the_compiled_module(tmp_path: Path, module: str) -> None:
    """mypy.stubtest imports the module and compares every name and signature with its
    .pyi. ``follow_imports = silent``: only this module's stub is under test, so a
    type error elsewhere in fastgw does not fail it."""
    pytest.importorskip("mypy")
    allow = tmp_path / "allowlist.txt"
    allow.write_text(
        f"fastgw\\._core\\.{module}\\.__test__\n"
        f"fastgw\\._core\\.{module}\\.(.*\\.)?__reduce_cython__\n"
        f"fastgw\\._core\\.{module}\\.(.*\\.)?__setstate_cython__\n"
        # The __init__ of a cdef class shows as (*args, **kwargs) at runtime:
        + ("fastgw\\._core\\.bucket\\.BucketTable\\.__init__\n" if module == "bucket" else "")
    )
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nfollow_imports = silent\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            f"fastgw._core.{module}",
            "--allowlist",
            str(allow),
            "--mypy-config-file",
            str(config),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------
# Exact counts


def test_rate_10_burst_10() -> None:
    t = BucketTable(16)
    assert [t.take(b"k", 1, 0.0, 10.0, 10.0) for _ in range(10)] == [0.0] * 10
    assert t.take(b"k", 1, 0.0, 10.0, 10.0) == 0.1  # exactly 100 ms, nothing taken
    assert t.take(b"k", 1, 0.0, 10.0, 10.0) == 0.1
    assert t.take(b"k", 1, s(NS // 10 - 1), 10.0, 10.0) > 0.0  # 1 ns early
    assert t.take(b"k", 1, 0.1, 10.0, 10.0) == 0.0
    assert t.take(b"k", 1, 0.1, 10.0, 10.0) == 0.1
    stats = t.statistics()
    assert (stats["allowed"], stats["limited"], stats["keys"]) == (11, 4, 1)


def test_refill_is_capped_at_burst() -> None:
    t = BucketTable(16)
    for _ in range(10):
        t.take(b"k", 1, 0.0, 10.0, 10.0)
    # An hour later the bucket holds 10, not 36000.
    assert t.remaining(b"k", 3600.0, 10.0, 10.0) == 10
    assert [t.take(b"k", 1, 3600.0, 10.0, 10.0) for _ in range(11)][-2:] == [0.0, 0.1]


def test_cost_over_one() -> None:
    t = BucketTable(16)
    assert t.take(b"k", 4, 0.0, 10.0, 10.0) == 0.0
    assert t.take(b"k", 4, 0.0, 10.0, 10.0) == 0.0
    assert t.remaining(b"k", 0.0, 10.0, 10.0) == 2
    # 2 left, 4 asked: wait for 2 more tokens, and the refusal took nothing.
    assert t.take(b"k", 4, 0.0, 10.0, 10.0) == 0.2
    assert t.take(b"k", 2, 0.0, 10.0, 10.0) == 0.0
    assert t.take(b"k", 4, 0.2, 10.0, 10.0) == 0.2
    assert t.take(b"k", 4, 0.4, 10.0, 10.0) == 0.0


def test_cost_over_burst_is_never_allowed() -> None:
    t = BucketTable(16)
    assert t.take(b"k", 11, 0.0, 10.0, 10.0) == INF
    assert t.peek(b"k", 11, 1e6, 10.0, 10.0) == INF
    assert b"k" not in t  # nothing stored for a take that can never pass
    assert t.take(b"k", 10, 0.0, 10.0, 10.0) == 0.0  # the whole burst at once is fine
    assert t.take(b"k", 11, 1e6, 10.0, 10.0) == INF
    assert t.take(b"k", 1, 0.0, 1.0, 0.5) == INF  # a burst under 1 admits nothing
    assert t.take(b"z", 1, 0.0, 1.0, 0.0) == INF
    assert t.statistics()["limited"] == 4


def test_cost_zero_is_allowed_and_stores_nothing_new() -> None:
    t = BucketTable(16)
    assert t.take(b"k", 0, 0.0, 10.0, 10.0) == 0.0
    assert b"k" not in t
    for _ in range(10):
        t.take(b"k", 1, 0.0, 10.0, 10.0)
    assert t.take(b"k", 0, 0.0, 10.0, 10.0) == 0.0


def test_peek_and_remaining_change_nothing() -> None:
    t = BucketTable(16)
    assert t.peek(b"k", 1, 0.0, 10.0, 10.0) == 0.0
    assert t.remaining(b"k", 0.0, 10.0, 10.0) == 10
    assert b"k" not in t
    for _ in range(10):
        t.take(b"k", 1, 0.0, 10.0, 10.0)
    before = t.statistics()
    assert t.peek(b"k", 1, 0.0, 10.0, 10.0) == 0.1
    assert t.peek(b"k", 3, 0.05, 10.0, 10.0) == pytest.approx(0.25)
    assert t.remaining(b"k", 0.35, 10.0, 10.0) == 3
    assert t.statistics() == before


def test_fractional_rate_and_burst() -> None:
    # 3 per second: 333333334 ns per token (rounded up: never in the caller's favour).
    t = BucketTable(16)
    assert t.take(b"k", 2, 0.0, 3.0, 2.5) == 0.0  # burst 2.5 admits 2 at once
    w = t.take(b"k", 1, 0.0, 3.0, 2.5)
    assert to_ns(w) == 3 * 333333334 - math.floor(Fraction(2.5) * 333333334)
    assert t.take(b"k", 1, w, 3.0, 2.5) == 0.0


def test_no_drift_over_a_million_takes() -> None:
    """At 3/s the interval is 333333334 ns: a take exactly on each emission time passes,
    a million times over (77 hours of mock time), and one 1 ns early is refused."""
    t = BucketTable(4)
    iv = 333333334
    take = t.take
    for k in range(1_000_000):
        assert take(b"k", 1, s(k * iv), 3.0, 1.0) == 0.0
    n = 1_000_000
    assert t.peek(b"k", 1, s(n * iv - 1), 3.0, 1.0) > 0.0
    assert t.peek(b"k", 1, s(n * iv), 3.0, 1.0) == 0.0


async def test_on_trios_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    t = BucketTable(16)
    passed = 0
    start = trio.current_time()
    while passed < 25:
        wait = t.take(b"agent-7", 1, trio.current_time(), 10.0, 10.0)
        if wait == 0.0:
            passed += 1
        else:
            await trio.sleep(wait)
    # 10 at once, then one every 0.1 s.
    assert trio.current_time() - start == pytest.approx(1.5)


# ---------------------------------------------------------------------------------------
# Policy changes (config reload): the debt in tokens is kept, capped at the new burst


def drain(t: BucketTable, key: bytes, now: float, rate: float, burst: float) -> None:
    while t.take(key, 1, now, rate, burst) == 0.0:
        pass


def test_lower_rate_keeps_a_drained_bucket_drained() -> None:
    t = BucketTable(16)
    drain(t, b"k", 0.0, 10.0, 10.0)
    # Same burst, a tenth of the rate: still 10 tokens owed, now at 1/s.
    assert t.remaining(b"k", 0.0, 1.0, 10.0) == 0
    assert t.take(b"k", 1, 0.0, 1.0, 10.0) == 1.0
    assert t.take(b"k", 1, 1.0, 1.0, 10.0) == 0.0
    assert t.take(b"k", 1, 1.0, 1.0, 10.0) == 1.0


def test_higher_rate_refills_faster_but_does_not_refill() -> None:
    t = BucketTable(16)
    drain(t, b"k", 0.0, 10.0, 10.0)
    assert t.take(b"k", 1, 0.0, 100.0, 10.0) == 0.01
    assert t.take(b"k", 1, 0.05, 100.0, 10.0) == 0.0
    assert t.remaining(b"k", 0.05, 100.0, 10.0) == 4


def test_burst_change_keeps_the_debt() -> None:
    t = BucketTable(16)
    for _ in range(6):
        t.take(b"k", 1, 0.0, 10.0, 10.0)  # 6 owed, 4 left
    assert t.remaining(b"k", 0.0, 10.0, 20.0) == 14  # more room, same debt
    assert t.remaining(b"k", 0.0, 10.0, 5.0) == 0  # the debt is capped: empty, not less
    assert t.take(b"k", 1, 0.0, 10.0, 5.0) == 0.1
    assert t.take(b"k", 1, 0.1, 10.0, 5.0) == 0.0
    # Back to the old policy: the bucket took under the capped debt.
    assert t.remaining(b"k", 0.1, 10.0, 10.0) == 5


def test_a_reload_never_resets_to_full() -> None:
    t = BucketTable(16)
    drain(t, b"k", 0.0, 10.0, 10.0)
    for rate, burst in [(10.0, 10.0), (1.0, 1.0), (1000.0, 10.0), (10.0, 100.0), (0.5, 3.0)]:
        assert t.remaining(b"k", 0.0, rate, burst) < burst


# ---------------------------------------------------------------------------------------
# Eviction


def test_the_table_stays_within_max_keys() -> None:
    t = BucketTable(100)
    for i in range(10_000):
        assert t.take(b"key-%d" % i, 1, s(i * NS // 1000), 10.0, 10.0) == 0.0
        assert len(t) <= 100
    stats = t.statistics()
    assert stats["keys"] == 100 and stats["evictions"] == 9_900
    assert stats["evictions_lossy"] == 0  # a key 100 ms old has refilled its token


def test_a_full_bucket_goes_before_any_other() -> None:
    rng = random.Random(6)
    for _ in range(30):
        n = rng.randrange(1, 300)
        t = BucketTable(n)
        keys = [b"k%d" % i for i in range(n)]
        full = rng.randrange(n)
        for i, k in enumerate(keys):
            # Every bucket drained at t=0 (full again at t=1) except one, which took 1
            # token at t=-1 s.
            if i == full:
                t.take(k, 1, -1.0, 10.0, 10.0)
            else:
                drain(t, k, 0.0, 10.0, 10.0)
        # Touch the full one last, so it is the most recently used.
        assert t.take(keys[full], 0, 0.5, 10.0, 10.0) == 0.0
        t.take(b"new", 1, 0.5, 10.0, 10.0)
        assert set(t.keys()) == (set(keys) - {keys[full]}) | {b"new"}
        assert t.statistics()["evictions_lossy"] == 0


def test_without_a_full_bucket_the_least_recently_used_goes() -> None:
    rng = random.Random(7)
    for _ in range(30):
        n = rng.randrange(2, 300)
        t = BucketTable(n)
        keys = [b"k%d" % i for i in range(n)]
        for k in keys:
            drain(t, k, 0.0, 1.0, 10.0)  # 10 s to refill
        order = keys[:]
        rng.shuffle(order)
        for j, k in enumerate(order):
            assert t.take(k, 1, s(j + 1), 1.0, 10.0) > 0.0  # refused takes count as use
        t.take(b"new", 1, 5.0, 1.0, 10.0)
        assert set(t.keys()) == (set(keys) - {order[0]}) | {b"new"}
        assert t.statistics()["evictions_lossy"] == 1
        # The lossy eviction forgave that caller's debt: it starts full again.
        assert t.remaining(order[0], 5.0, 1.0, 10.0) == 10


def test_peek_does_not_count_as_use() -> None:
    t = BucketTable(2)
    drain(t, b"a", 0.0, 1.0, 5.0)
    drain(t, b"b", 1.0, 1.0, 5.0)
    t.peek(b"a", 1, 2.0, 1.0, 5.0)
    t.take(b"c", 1, 2.0, 1.0, 5.0)
    assert sorted(t.keys()) == [b"b", b"c"]


def test_long_keys_are_copied_and_freed() -> None:
    t = BucketTable(8)
    base = t.statistics()["memory_bytes"]
    long_keys = [bytes([i]) * (INLINE_KEY_BYTES + 1 + i) for i in range(8)]
    short = [b"s" * INLINE_KEY_BYTES, b""]
    for k in long_keys:
        t.take(k, 1, 0.0, 10.0, 10.0)
    assert t.statistics()["memory_bytes"] == base + sum(map(len, long_keys))
    for k in long_keys:
        assert k in t and bytearray(k) not in t
        assert t.peek(k, 10, 0.0, 10.0, 10.0) == 0.1
    for k in short:
        t.take(k, 1, 10.0, 10.0, 10.0)
    assert set(t.keys()) >= set(short)
    assert t.statistics()["memory_bytes"] < base + sum(map(len, long_keys))


def test_policy_ids_are_recycled() -> None:
    """16-bit policy ids: past 65535 distinct (rate, burst) pairs the unused ones go."""
    t = BucketTable(4)
    drain(t, b"kept", 0.0, 10.0, 10.0)
    for i in range(70_000):
        assert t.peek(b"busy", 1, 0.0, 1.0 + i / 1024, 10.0) == 0.0
    assert t.take(b"busy", 1, 0.0, 2.0, 10.0) == 0.0
    assert t.take(b"kept", 1, 0.0, 10.0, 10.0) == 0.1
    assert t.take(b"kept", 1, 0.1, 10.0, 10.0) == 0.0


# ---------------------------------------------------------------------------------------
# Arguments that are bugs


def test_bad_arguments() -> None:
    t = BucketTable(4)
    with pytest.raises(ValueError):
        BucketTable(0)
    with pytest.raises(ValueError):
        t.take(b"k", -1, 0.0, 10.0, 10.0)
    with pytest.raises(OverflowError):
        t.take(b"k", 2**64, 0.0, 10.0, 10.0)
    for rate in (0.0, -1.0, MIN_RATE_PER_S / 2, MAX_RATE_PER_S * 2, math.nan, math.inf):
        with pytest.raises(ValueError):
            t.take(b"k", 1, 0.0, rate, 10.0)
    for burst in (-1.0, math.nan, math.inf, MAX_TAU_S * 10 + 1):
        with pytest.raises(ValueError):
            t.take(b"k", 1, 0.0, 10.0, burst)
    for now in (math.nan, math.inf, -math.inf, 3e9):
        with pytest.raises(ValueError):
            t.take(b"k", 1, now, 10.0, 10.0)
    with pytest.raises(TypeError):
        t.take("k", 1, 0.0, 10.0, 10.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        t.take(b"k" * (MAX_KEY_BYTES + 1), 1, 0.0, 10.0, 10.0)
    assert t.take(b"k" * MAX_KEY_BYTES, 1, 0.0, 10.0, 10.0) == 0.0
    # The extremes of the bounds work.
    assert t.take(b"slow", 1, 0.0, MIN_RATE_PER_S, 1.0) == 0.0
    assert to_ns(t.take(b"slow", 1, 0.0, MIN_RATE_PER_S, 1.0)) == interval_ns(MIN_RATE_PER_S)
    assert t.take(b"fast", 1, 0.0, MAX_RATE_PER_S, 1.0) == 0.0
    assert t.take(b"fast", 1, 0.0, MAX_RATE_PER_S, 1.0) == 1e-9


# ---------------------------------------------------------------------------------------
# The rounding of rate and burst onto the ns grid, against exact rationals

rates = st.floats(MIN_RATE_PER_S, MAX_RATE_PER_S)
bursts = st.floats(0.0, 1e6)


@given(rates, bursts)
def test_interval_and_tau_are_exact(rate: float, burst: float) -> None:
    iv, tau = interval_ns(rate), tau_ns(rate, burst)
    if tau > 2**60:
        with pytest.raises(ValueError):
            BucketTable(1).take(b"k", 0, 0.0, rate, burst)
        return
    t = BucketTable(1)
    max_cost = tau // iv
    assert t.remaining(b"k", 0.0, rate, burst) == max_cost
    assert t.take(b"k", max_cost + 1, 0.0, rate, burst) == INF
    if max_cost == 0:
        return
    assert t.take(b"k", max_cost, 0.0, rate, burst) == 0.0
    # Now the debt is max_cost * iv; one more token waits (max_cost + 1) * iv - tau.
    wait_ns = (max_cost + 1) * iv - tau
    assert t.take(b"k", 1, 0.0, rate, burst) == wait_s(0.0, 0, wait_ns)


# ---------------------------------------------------------------------------------------
# Properties: the granted total is bounded, exactly, and a wait is honest

POLICIES = [(10.0, 10.0), (3.0, 2.5), (1000.0, 5.0), (0.7, 3.0), (7.0, 1.0), (1e6, 1e3)]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(POLICIES),
    steps=st.lists(st.tuples(st.integers(0, 2 * NS), st.integers(0, 4)), min_size=1, max_size=80),
    start=st.integers(0, 10**13),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    policy: tuple[float, float], steps: list[tuple[int, int]], start: int
) -> None:
    rate, burst = policy
    t = BucketTable(4)
    now = start
    granted: list[tuple[int, int]] = []  # (ns, cost) of every allowed take
    for dt, cost in steps:
        now += dt if dt % 3 else 0  # many takes at the same instant
        nows = s(now)
        assert to_ns(nows) == now
        w = t.take(b"k", cost, nows, rate, burst)
        if w == 0.0:
            granted.append((now, cost))
        elif w != INF:
            target = to_ns(nows + w)
            # The take succeeds at now + w, and on the ns grid not a ns earlier.
            assert t.peek(b"k", cost, nows + w, rate, burst) == 0.0
            assert t.peek(b"k", cost, s(target - 1), rate, burst) > 0.0
        else:
            assert cost > burst
    fr, fb = Fraction(rate), Fraction(burst)
    for i in range(len(granted)):
        total = 0
        for j in range(i, len(granted)):
            total += granted[j][1]
            elapsed_ns = granted[j][0] - granted[i][0]
            assert total * NS <= fb * NS + fr * elapsed_ns


# ---------------------------------------------------------------------------------------
# A plain-Python model, in integer ns, that the core must agree with


@dataclass
class MBucket:
    tat: int
    interval: int
    last_used: int


class Model:
    """GCRA as the module docstring states it, with the eviction rule checked rather than
    predicted: which full bucket goes is the core's choice (any is right), so the model
    checks the core's choice against the rule and then follows it."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.b: dict[bytes, MBucket] = {}
        self.allowed = self.limited = self.evictions = self.lossy = 0
        self.pending: tuple[bytes, MBucket, int] | None = None

    def take(self, key: bytes, cost: int, now: float, rate: float, burst: float) -> float:
        iv, tau = interval_ns(rate), tau_ns(rate, burst)
        now_ns = to_ns(now)
        if cost * iv > tau:
            self.limited += 1
            return INF
        b = self.b.get(key)
        if b is None:
            self.allowed += 1
            if cost > 0:
                self.pending = (key, MBucket(now_ns + cost * iv, iv, now_ns), now_ns)
            return 0.0
        b.last_used = max(b.last_used, now_ns)
        # A new policy applies from this take on: the debt in tokens is kept, rounded
        # up, and capped at the new burst (under one policy the cap never binds).
        debt = b.tat - now_ns
        if debt > 0:
            if b.interval != iv:
                debt = -(-debt * iv // b.interval)
            b.tat = now_ns + min(debt, tau)
        b.interval = iv
        new_tat = max(b.tat, now_ns) + cost * iv
        if new_tat - tau <= now_ns:
            b.tat = new_tat
            self.allowed += 1
            return 0.0
        self.limited += 1
        return wait_s(now, now_ns, new_tat - tau - now_ns)

    def settle(self, core_keys: set[bytes]) -> None:
        """After a take: insert the pending new key, evicting what the core evicted
        (after checking that the rule allowed it)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        key, bucket, now_ns = pending
        if len(self.b) == self.max_keys:
            gone = set(self.b) - core_keys
            assert len(gone) == 1, gone
            victim = gone.pop()
            full = {k for k, b in self.b.items() if b.tat <= now_ns}
            if full:
                assert victim in full
            else:
                oldest = min(b.last_used for b in self.b.values())
                assert self.b[victim].last_used == oldest
                self.lossy += 1
            self.evictions += 1
            del self.b[victim]
        self.b[key] = bucket


def check_against_model(
    max_keys: int,
    ops: list[tuple[bytes, int, int, tuple[float, float]]],
    table: BucketTable | None = None,
) -> dict[str, int]:
    t = BucketTable(max_keys) if table is None else table
    m = Model(max_keys)
    for key, cost, now_ns, (rate, burst) in ops:
        now = s(now_ns)
        got = t.take(key, cost, now, rate, burst)
        want = m.take(key, cost, now, rate, burst)
        assert got == want, (key, cost, now_ns, rate, burst)
        m.settle(set(t.keys()))
        assert set(t.keys()) == set(m.b)
    stats = t.statistics()
    assert stats["keys"] == len(m.b)
    assert (stats["allowed"], stats["limited"]) == (m.allowed, m.limited)
    assert (stats["evictions"], stats["evictions_lossy"]) == (m.evictions, m.lossy)
    return stats


def ops_strategy(n_keys: int) -> st.SearchStrategy[list[tuple[bytes, int, int, tuple]]]:
    keys = [b"k%d" % i for i in range(n_keys)] + [b"L" * (INLINE_KEY_BYTES + 5)]
    step = st.tuples(
        st.sampled_from(keys),
        st.integers(0, 5),
        st.sampled_from([0, 0, 1, 10**6, 10**8, 10**9 // 3, 3 * NS]),
        st.sampled_from(POLICIES[:4]),
    )

    def absolute(steps: list[tuple[bytes, int, int, tuple]]) -> list[tuple]:
        out, now = [], 10**12
        for key, cost, dt, pol in steps:
            now += dt
            out.append((key, cost, now, pol))
        return out

    return st.lists(step, max_size=120).map(absolute)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(max_keys=st.integers(1, 6), ops=ops_strategy(8))
def test_agrees_with_the_model(max_keys: int, ops: list) -> None:
    check_against_model(max_keys, ops)


def test_agrees_with_the_model_on_a_crowded_table() -> None:
    """Hundreds of keys at a load of 0.8: long probe runs, backward shifts on every
    eviction, both kinds of eviction."""
    rng = random.Random(66)
    keys = [b"user-%d" % i for i in range(700)] + [b"x" * 50 + b"%d" % i for i in range(50)]
    ops, now = [], 10**12
    for i in range(6000):
        # Busy spells (every bucket in debt: lossy evictions) and quiet ones.
        busy = (i // 1000) % 2 == 0
        now += rng.choice([0, 10**5]) if busy else rng.choice([10**7, 10**8])
        pol = rng.choice(POLICIES[:4]) if rng.random() < 0.05 else (1.0, 5.0)
        ops.append((rng.choice(keys), rng.randrange(0, 4), now, pol))
    stats = check_against_model(300, ops)
    assert stats["evictions"] > stats["evictions_lossy"] > 0, stats


# ---------------------------------------------------------------------------------------
# Shared tables: one table in a file that several processes map


def test_shared_handles_see_one_table(tmp_path: Path) -> None:
    path = tmp_path / "buckets"
    a = BucketTable(100, path)
    b = BucketTable(100, str(path))
    assert a.path == b.path == str(path) and BucketTable(4).path is None
    assert [a.take(b"k", 1, 0.0, 10.0, 10.0) for _ in range(6)] == [0.0] * 6
    assert [b.take(b"k", 1, 0.0, 10.0, 10.0) for _ in range(4)] == [0.0] * 4
    assert a.take(b"k", 1, 0.0, 10.0, 10.0) == b.take(b"k", 1, 0.0, 10.0, 10.0) == 0.1
    # A policy b has not seen yet, added by a, then used by b: the debt of 10 tokens
    # is kept, at 1/s.
    assert a.take(b"k", 1, 0.0, 1.0, 10.0) == 1.0
    assert b.remaining(b"k", 0.0, 1.0, 10.0) == 0
    assert b.take(b"k", 1, 1.0, 1.0, 10.0) == 0.0
    assert a.take(b"k", 1, 1.0, 1.0, 10.0) == 1.0
    long_key = b"L" * 100
    assert a.take(long_key, 3, 0.0, 10.0, 10.0) == 0.0
    assert b.remaining(long_key, 0.0, 10.0, 10.0) == 7
    assert long_key in b and long_key[:-1] + b"M" not in b
    assert len(a) == len(b) == 2
    assert sorted(map(len, a.keys())) == [1, 16]  # a long key is kept as its digest
    assert a.statistics() == b.statistics()
    assert (a.statistics()["allowed"], a.statistics()["limited"]) == (12, 4)


def test_a_mismatched_file_is_reinitialised(tmp_path: Path) -> None:
    path = tmp_path / "buckets"
    path.write_bytes(b"not a table" * 1000)
    t = BucketTable(100, path)
    assert len(t) == 0
    drain(t, b"k", 0.0, 10.0, 10.0)
    assert len(BucketTable(100, path)) == 1  # same shape: the same table
    del t
    assert len(BucketTable(200, path)) == 0  # another capacity: a new table
    assert len(BucketTable(100, path)) == 0


def test_shared_table_agrees_with_the_model(tmp_path: Path) -> None:
    """The crowded-table sequence, short keys only (a shared table keeps a long key as
    its digest, which keys() lists): eviction and reload rules are the same."""
    rng = random.Random(67)
    keys = [b"user-%d" % i for i in range(700)]
    ops, now = [], 10**12
    for i in range(4000):
        busy = (i // 1000) % 2 == 0
        now += rng.choice([0, 10**5]) if busy else rng.choice([10**7, 10**8])
        pol = rng.choice(POLICIES[:4]) if rng.random() < 0.05 else (1.0, 5.0)
        ops.append((rng.choice(keys), rng.randrange(0, 4), now, pol))
    stats = check_against_model(300, ops, BucketTable(300, tmp_path / "buckets"))
    assert stats["evictions"] > stats["evictions_lossy"] > 0, stats


def _hammer(path: str, seconds: float, rate: float, burst: float, out: Any) -> None:
    """In a child process: take from four keys of the shared table as fast as it can,
    on CLOCK_MONOTONIC, and report every grant's (key index, ns)."""
    import time

    t = BucketTable(64, path)
    grants: list[tuple[int, int]] = []
    end = time.monotonic() + seconds
    i = 0
    while (now := time.monotonic()) < end:
        k = i & 3
        if t.take(b"key-%d" % k, 1, now, rate, burst) == 0.0:
            grants.append((k, to_ns(now)))
        i += 1
    out.put(grants)


def _drain_together(path: str, takes: int, burst: float, start: Any, out: Any) -> None:
    """In a child process: once both children are ready, ``takes`` takes of one key at
    one instant (nothing refills); report how many were granted."""
    t = BucketTable(64, path)
    take = t.take
    start.wait()
    out.put(sum(take(b"one", 1, 0.0, 1e-3, burst) == 0.0 for _ in range(takes)))


def test_processes_sharing_a_table_lose_no_take(tmp_path: Path) -> None:
    """Two processes taking from one key at the same time, together more than its
    burst: exactly ``burst`` tokens are granted, and the shared counters add up. (Without
    the table's lock, concurrent read-modify-writes of the bucket grant more.)"""
    import multiprocessing

    takes, burst = 300_000, 400_000
    path = str(tmp_path / "buckets")
    t = BucketTable(64, path)
    ctx = multiprocessing.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(2)
    procs = [
        ctx.Process(target=_drain_together, args=(path, takes, burst, start, out)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    granted = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(granted) == burst and min(granted) > 0, granted
    stats = t.statistics()
    assert (stats["allowed"], stats["limited"]) == (burst, 2 * takes - burst)
    assert t.remaining(b"one", 0.0, 1e-3, burst) == 0


def test_processes_sharing_a_table_never_get_more_than_burst_plus_rate(
    tmp_path: Path,
) -> None:
    """Two processes hammering one shared table: per key, the grants of both together
    (on the common clock) never exceed burst + rate x elapsed over any window, and come
    close to it (the table is not simply refusing)."""
    import multiprocessing

    rate, burst, seconds = 400, 20, 0.5
    path = str(tmp_path / "buckets")
    BucketTable(64, path)  # initialised once, before the children race to open it
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(path, seconds, rate, burst, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(len(r) > 0 for r in results)  # both processes got grants
    for k in range(4):
        times = sorted(ns for r in results for key, ns in r if key == k)
        # The count within every window [times[i], times[j]] is j - i + 1 grants.
        for i in range(len(times)):
            for j in range(i, len(times)):
                assert (j - i + 1 - burst) * NS <= rate * (times[j] - times[i]), (k, i, j)
        span = times[-1] - times[0]
        assert len(times) >= burst + rate * span / NS * 0.5, (k, len(times), span)


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    """The lock word (the first of the table's region, after the file's header page)
    names its owner. A waiter takes over a lock whose owner is gone, and keeps waiting
    while the owner lives."""
    from fastgw._core.shm import HEADER_BYTES

    path = tmp_path / "buckets"
    t = BucketTable(16, path)
    fd = os.open(path, os.O_RDWR)
    try:
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            os.pwrite(fd, sleeper.pid.to_bytes(4, sys.byteorder), HEADER_BYTES)
            code = (
                "from fastgw._core.bucket import BucketTable\n"
                f"t = BucketTable(16, {str(path)!r})\n"
                "print('opened', flush=True)\n"
                "t.take(b'k', 1, 0.0, 1.0, 1.0)\n"
            )
            with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) as taker:
                try:
                    assert taker.stdout is not None
                    assert taker.stdout.readline() == b"opened\n"
                    with pytest.raises(subprocess.TimeoutExpired):
                        taker.wait(timeout=0.5)  # the owner lives: the taker waits
                    sleeper.kill()
                    sleeper.wait()
                    # The owner died: the lock is taken over.
                    assert taker.wait(timeout=30) == 0
                finally:
                    taker.kill()
        finally:
            sleeper.kill()
            sleeper.wait()
        assert b"k" in t
    finally:
        os.close(fd)

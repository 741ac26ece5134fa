"""Shared rate limits in Redis (fastgw/policy/redis_limits.py) against a real redis-server.

The GCRA in the Lua script must give the core's answers exactly. Redis's own clock
(``TIME``) cannot be driven by a test, so most tests build ``RedisBuckets`` with
``clock=``: the script then gets ``now`` as an argument (rounded to the ns as the core
rounds it) instead of reading ``TIME``, and the answers can be compared with a core
``BucketTable`` fed the same ``now`` float for float. The tests marked "real clock" use
``TIME`` and check what can be checked without controlling it (expiry, bounds).

Failure tests kill (SIGKILL), stop (SIGSTOP) and restart the test's own server; those
wait on real time (a timeout, a reconnect) with short backoffs, never on a fixed sleep.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from fastgw._core.bucket import BucketTable
from fastgw.policy._resp import (
    RedisUnavailable,
    RespError,
    RespProtocolError,
    RespReader,
    encode_command,
    open_resp_client,
    parse_address,
)
from fastgw.policy.redis_limits import RedisBuckets, open_redis_buckets
from tests.limits.conftest import RedisServer

# Reconnect quickly in tests: a restarted server is noticed within ~0.1 s.
FAST: dict[str, Any] = {"backoff_min_s": 0.02, "backoff_max_s": 0.1, "connect_timeout_s": 0.5}
# Injected-time tests wait for Redis for as long as a loaded machine may need: they test
# the math, and a timeout would answer from the local table instead.
PATIENT: dict[str, Any] = {"timeout_s": 5.0}


class Clock:
    """The test's ``now``: a plain float the test sets."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def buckets(server: RedisServer, **kwargs: Any) -> AsyncIterator[RedisBuckets]:
    async with open_redis_buckets(server.address, **{**FAST, **kwargs}) as rb:
        with trio.fail_after(10):
            await rb.wait_redis()
        yield rb


# ---------------------------------------------------------------------------------------
# The RESP2 reader and encoder (no server)

REPLIES = (
    b"+OK\r\n"
    b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
    b":-42\r\n"
    b"$5\r\nhe\r\no\r\n"
    b"$0\r\n\r\n"
    b"$-1\r\n"
    b"*-1\r\n"
    b"*0\r\n"
    b"*3\r\n:1\r\n*2\r\n$1\r\na\r\n$-1\r\n+x\r\n"
)


def parse_all(chunks: Sequence[bytes]) -> list[object]:
    r = RespReader()
    out: list[object] = []
    for c in chunks:
        r.feed(c)
        while True:
            ok, reply = r.next_reply()
            if not ok:
                break
            out.append(str(reply) if isinstance(reply, RespError) else reply)
    return out


def test_reader_whole_byte_by_byte_and_split() -> None:
    expected = [
        b"OK",
        "NOSCRIPT No matching script. Please use EVAL.",
        -42,
        b"he\r\no",
        b"",
        None,
        None,
        [],
        [1, [b"a", None], b"x"],
    ]
    assert parse_all([REPLIES]) == expected
    assert parse_all([REPLIES[i : i + 1] for i in range(len(REPLIES))]) == expected
    rnd = random.Random(7)
    for _ in range(200):
        cuts = sorted(rnd.sample(range(1, len(REPLIES)), rnd.randrange(1, 12)))
        parts = [REPLIES[a:b] for a, b in zip([0, *cuts], [*cuts, len(REPLIES)], strict=True)]
        assert parse_all(parts) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"$2097152\r\n",  # a bulk string over the 1 MiB bound
        b"$3\r\nabcde\r\n",  # no CRLF after the bulk
        b"%1\r\n",  # RESP3 map: never asked for
        b":1_0\r\n",
        b": 1\r\n",
        b"$+3\r\nabc\r\n",
        b"$-2\r\n",
        b"*1\r\n" * 9 + b":1\r\n",  # nested 9 deep
        b"+" + b"x" * 70000,  # a line over 64 KiB, no CRLF yet
    ],
)
def test_reader_refuses(data: bytes) -> None:
    r = RespReader()
    r.feed(data)
    with pytest.raises(RespProtocolError):
        r.next_reply()


def test_reader_bounds_an_incomplete_reply() -> None:
    r = RespReader(max_reply_bytes=1000)
    r.feed(b"*100\r\n")
    for _ in range(100):
        r.feed(b"$20\r\n" + b"x" * 20 + b"\r\n")
        try:
            ok, _ = r.next_reply()
        except RespProtocolError:
            return
        assert not ok
    raise AssertionError("a 2.7 KB reply passed a 1000-byte bound")


def test_encode_and_address() -> None:
    assert encode_command((b"GET", "k", 12)) == b"*3\r\n$3\r\nGET\r\n$1\r\nk\r\n$2\r\n12\r\n"
    assert parse_address("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert parse_address("[::1]:7000") == ("::1", 7000)
    for bad in ("localhost", ":6379", "h:0", "h:x", "h:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)


# ---------------------------------------------------------------------------------------
# The math: the core's answers, exactly

POLICIES = [
    (10.0, 10.0),
    (100.0, 10.0),
    (1000.0, 5.0),
    (1 / 60, 3.0),  # 60000000001 ns a token: 1/60 as a double
    (0.3, 2.5),
    (7.77, 0.5),  # burst under one token: every cost >= 1 is inf
    (3.3, 0.0),
    (1e-6, 1152.0),  # 10**15 ns a token, tau near the core's 2**60 bound
    (1e9, 1e9),  # 1 ns a token
]
COSTS = [0, *[1] * 12, 2, 3, 10, 1000, 2**40]
STEPS = [0.0] * 6 + [1e-9, 1e-6, 1e-3, 1e-3, 0.01, 0.1, 1.0, 60.0, 1e4]


def sequence(seed: int, t0: float, n: int) -> list[tuple[float, bytes, int, float, float]]:
    """(now, key, cost, rate, burst): a few keys, each mostly under one policy and now
    and then switched to another (a reload), ``now`` moving by small and large steps."""
    rnd = random.Random(seed)
    keys = [b"k%d" % i for i in range(3)] + [b"long-" + b"x" * 60]
    policy = {k: rnd.choice(POLICIES) for k in keys}
    now = t0
    out = []
    for _ in range(n):
        now += rnd.choice(STEPS) if rnd.random() < 0.99 else rnd.random() * 1e6
        key = rnd.choice(keys)
        if rnd.random() < 0.08:
            policy[key] = rnd.choice(POLICIES)
        rate, burst = policy[key]
        out.append((now, key, rnd.choice(COSTS), rate, burst))
    return out


@pytest.mark.parametrize(
    "t0",
    [1000.0, 1.7e9, -5e5],  # small; Unix-time sized (floats 238 ns apart); negative
    ids=["t1e3", "unix", "negative"],
)
async def test_take_agrees_with_core(redis_server: RedisServer, t0: float) -> None:
    clock = Clock()
    core = BucketTable(1000)
    async with buckets(redis_server, clock=clock, **PATIENT) as rb:
        seq = sequence(int(t0) & 0xFFFF, t0, 1500)
        limited = 0
        for i, (now, key, cost, rate, burst) in enumerate(seq):
            clock.now = now
            want = core.take(key, cost, now, rate, burst)
            got = await rb.take(key, cost, rate, burst)
            assert got == want, (i, now, key, cost, rate, burst)
            limited += 0.0 < want < math.inf
        assert limited > 50  # the sequences do drain buckets (87-120 of 1500)
        st = rb.statistics()
        assert st["fallbacks"] == 0 and st["redis_failed"] == st["redis_timeouts"] == 0


def core_many(
    core: BucketTable,
    takes: Sequence[tuple[bytes, int, float, float]],
    stop: list[bool],
    now: float,
) -> list[float]:
    """The gateway's loop over a route's limits, on the core."""
    out = []
    for (key, cost, rate, burst), s in zip(takes, stop, strict=True):
        out.append(core.take(key, cost, now, rate, burst))
        if s and out[-1] > 0.0:
            break
    return out


async def test_take_many_agrees_with_core(redis_server: RedisServer) -> None:
    clock = Clock()
    core = BucketTable(1000)
    rnd = random.Random(3)
    seq = sequence(11, 1000.0, 1200)
    async with buckets(redis_server, clock=clock, **PATIENT) as rb:
        calls = 0
        i = 0
        while i < len(seq):
            n = rnd.randrange(1, 5)
            batch = seq[i : i + n]
            i += n
            now = batch[0][0]
            clock.now = now
            takes = [(key, cost, rate, burst) for _, key, cost, rate, burst in batch]
            stop = [rnd.random() < 0.7 for _ in takes]
            want = core_many(core, takes, stop, now)
            got = await rb.take_many(takes, stop=stop)
            assert got == want, (i, takes, stop)
            assert await rb.take_many(takes[:0]) == []
            calls += any(cost <= burst for _, cost, _, burst in takes)
        assert 0 < rb.statistics()["redis_ok"] <= calls


async def test_arguments_are_checked_like_the_core(redis_server: RedisServer) -> None:
    async with buckets(redis_server) as rb:
        for bad in [(b"k", 1, 0.0, 1.0), (b"k", 1, 2e9, 1.0), (b"k", 1, 1.0, math.nan)]:
            with pytest.raises(ValueError):
                await rb.take(*bad)
        with pytest.raises(ValueError):
            await rb.take(b"k", -1, 1.0, 1.0)
        with pytest.raises(ValueError):
            await rb.take(b"k" * 65536, 1, 1.0, 1.0)
        with pytest.raises(ValueError):
            await rb.take(b"k", 1, 1e-6, 2e3)  # 2e18 ns to fill: over 2**60
        with pytest.raises(TypeError):
            await rb.take("k", 1, 1.0, 1.0)  # type: ignore[arg-type]
        with pytest.raises(OverflowError):
            await rb.take(b"k", 2**63, 1.0, 1.0)
        with pytest.raises(ValueError):
            await rb.take_many([(b"k", 1, 1.0, 1.0)], stop=[True, False])
        # Over the burst: inf, answered without a round trip.
        assert await rb.take(b"k", 3, 1.0, 2.5) == math.inf
        assert rb.statistics()["redis_ok"] == 0


# ---------------------------------------------------------------------------------------
# State in Redis, on Redis's clock


async def test_state_expiry_and_prefix_real_clock(redis_server: RedisServer) -> None:
    async with buckets(redis_server, prefix=b"gw1:") as rb:
        # 10/s, burst 10: taking 5 leaves a debt of 0.5 s, the key's time to live.
        assert await rb.take(b"alice", 5, 10.0, 10.0) == 0.0
        value = redis_server.command("GET", "gw1:alice")
        assert isinstance(value, bytes)
        tat, interval, tau = value.split()
        assert (interval, tau) == (b"100000000", b"1000000000")
        t = redis_server.command("TIME")
        assert isinstance(t, list)
        now_ns = int(t[0]) * 10**9 + int(t[1]) * 1000
        assert 0 < int(tat) - now_ns <= 500_000_000
        pttl = redis_server.command("PTTL", "gw1:alice")
        assert isinstance(pttl, int) and 0 < pttl <= 500
        # The rest of the burst, then a refusal whose wait is about one interval.
        assert await rb.take(b"alice", 5, 10.0, 10.0) == 0.0
        wait = await rb.take(b"alice", 1, 10.0, 10.0)
        assert 0.05 < wait <= 0.1
        # A take that leaves the bucket full stores nothing.
        assert await rb.take(b"bob", 0, 10.0, 10.0) == 0.0
        assert redis_server.command("EXISTS", "gw1:bob") == 0
        assert redis_server.command("EXISTS", "fastgw:alice") == 0


async def test_a_stored_bucket_converts_on_a_policy_change(redis_server: RedisServer) -> None:
    clock = Clock(50.0)
    async with buckets(redis_server, clock=clock, **PATIENT) as rb:
        core = BucketTable(10)
        for rate, burst in [(10.0, 10.0), (1.0, 10.0), (1.0, 4.0), (100.0, 20.0)]:
            for _ in range(12):
                want = core.take(b"k", 1, clock.now, rate, burst)
                assert await rb.take(b"k", 1, rate, burst) == want
            clock.now += 0.5
        # Drained at 10/s, then the rate is lowered to 1/s: the 10 tokens owed stay owed
        # (10 s to refill) instead of 1 s of debt under a 10 s tau (9 tokens back).
        clock.now += 100.0
        for _ in range(10):
            core.take(b"j", 1, clock.now, 10.0, 10.0)
            assert await rb.take(b"j", 1, 10.0, 10.0) == 0.0
        want = core.take(b"j", 1, clock.now, 1.0, 10.0)
        assert await rb.take(b"j", 1, 1.0, 10.0) == want == 1.0


# ---------------------------------------------------------------------------------------
# Two gateway instances, one Redis


async def test_two_instances_enforce_one_limit_exactly(redis_server: RedisServer) -> None:
    """100/s, burst 10, one identity, 10 s of simulated time: both instances try at every
    2.5 ms step, concurrently. Accepted = burst + rate x elapsed = 10 + 1000, exactly."""
    clock = Clock(0.0)
    accepted = {"a": 0, "b": 0}
    async with (
        buckets(redis_server, clock=clock, **PATIENT) as a,
        buckets(redis_server, clock=clock, **PATIENT) as b,
    ):

        async def one(name: str, rb: RedisBuckets) -> None:
            if await rb.take(b"user:42", 1, 100.0, 10.0) == 0.0:
                accepted[name] += 1

        for step in range(4001):  # t = 0, 2.5 ms, ..., 10 s
            clock.now = step * 0.0025
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one, "a", a)
                nursery.start_soon(one, "b", b)
        assert a.statistics()["fallbacks"] == b.statistics()["fallbacks"] == 0
    assert accepted["a"] + accepted["b"] == 10 + 1000
    assert accepted["a"] > 100 and accepted["b"] > 100  # both served the caller


@pytest.mark.slow
async def test_two_instances_real_clock(redis_server: RedisServer) -> None:
    """On Redis's clock: two instances, two tasks each, hammering one identity at
    200/s burst 20 for 0.5 s. Never more than burst + rate x elapsed (+1 for the
    clocks); at least 98% of it."""
    rate, burst, run_s = 200.0, 20.0, 0.5
    accepted = 0
    async with (
        buckets(redis_server, timeout_s=2.0) as a,
        buckets(redis_server, timeout_s=2.0) as b,
    ):
        t0 = trio.current_time()
        until = t0 + run_s

        async def hammer(rb: RedisBuckets) -> None:
            nonlocal accepted
            while trio.current_time() < until:
                if await rb.take(b"user:7", 1, rate, burst) == 0.0:
                    accepted += 1

        async with trio.open_nursery() as nursery:
            for rb in (a, b, a, b):
                nursery.start_soon(hammer, rb)
        elapsed = trio.current_time() - t0
        assert a.statistics()["fallbacks"] == b.statistics()["fallbacks"] == 0
    assert accepted <= burst + math.floor(rate * elapsed) + 1
    assert accepted >= 0.98 * (burst + rate * run_s)


async def test_concurrent_callers_share_one_pipelined_connection(
    redis_server: RedisServer,
) -> None:
    clock = Clock()
    async with buckets(redis_server, clock=clock, **PATIENT) as rb:
        answers: list[float] = []

        async def one() -> None:
            answers.append(await rb.take(b"shared", 1, 10.0, 100.0))

        async with trio.open_nursery() as nursery:
            for _ in range(300):
                nursery.start_soon(one)
        assert answers.count(0.0) == 100  # the burst, at one instant
        st = rb.client.statistics()
        assert st["connects"] == 1 and st["pending"] == 0
        assert st["writes"] < 300 // 2, st  # commands of concurrent callers went together


# ---------------------------------------------------------------------------------------
# Failures: the policy answers, and Redis is used again when it returns


def drain(on_failure: str) -> list[float]:
    """What four takes at one instant answer, rate 1/s burst 3, by policy, when the
    answers come from a fresh local table (local), or from no table at all."""
    return {
        "local": [0.0, 0.0, 0.0, 1.0],
        "open": [0.0] * 4,
        "closed": [0.25] * 4,
    }[on_failure]


@pytest.mark.parametrize("on_failure", ["local", "open", "closed"])
async def test_redis_killed_then_restarted(redis_server: RedisServer, on_failure: str) -> None:
    clock = Clock()
    async with buckets(
        redis_server, clock=clock, on_failure=on_failure, closed_wait_s=0.25, **PATIENT
    ) as rb:

        async def four() -> list[float]:
            return [await rb.take(b"id", 1, 1.0, 3.0) for _ in range(4)]

        assert await four() == [0.0, 0.0, 0.0, 1.0]  # from Redis: now drained
        ok = rb.statistics()["redis_ok"]
        redis_server.kill()
        assert await four() == drain(on_failure)
        st = rb.statistics()
        assert st["redis_ok"] == ok and st["fallbacks"] == 4 and st["redis_up"] == 0
        assert rb.client.last_error

        redis_server.restart()  # same port, empty (no persistence)
        with trio.fail_after(10):
            await rb.wait_redis()
        assert await four() == [0.0, 0.0, 0.0, 1.0]  # Redis again, restarted empty
        st = rb.statistics()
        assert st["redis_ok"] == ok + 4 and st["fallbacks"] == 4 and st["redis_up"] == 1
        assert rb.client.statistics()["connects"] == 2


async def test_redis_killed_during_a_call(redis_server: RedisServer) -> None:
    """A call in flight when Redis dies is answered by the policy at once, not after
    its timeout."""
    async with buckets(redis_server, timeout_s=10.0, on_failure="open") as rb:
        assert await rb.take(b"id", 1, 1.0, 1.0) == 0.0
        redis_server.stop()  # the next call hangs in Redis...
        answer: list[float] = []
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                answer.append(await rb.take(b"id", 1, 1.0, 1.0))

            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            assert rb.client.statistics()["pending"] == 1
            redis_server.kill()  # ...until Redis dies
        assert answer == [0.0] and trio.current_time() - t0 < 5.0
        st = rb.statistics()
        assert st["redis_failed"] == 1 and st["redis_timeouts"] == 0 and st["fallbacks"] == 1


async def test_stopped_redis_times_out_then_recovers(redis_server: RedisServer) -> None:
    timeout_s = 0.05
    clock = Clock()
    async with buckets(redis_server, clock=clock, timeout_s=timeout_s, on_failure="closed") as rb:
        assert await rb.take(b"id", 1, 10.0, 10.0) == 0.0
        redis_server.stop()
        t0 = trio.current_time()
        assert await rb.take(b"id", 1, 10.0, 10.0) == 1.0  # closed: closed_wait_s
        waited = trio.current_time() - t0
        assert timeout_s <= waited < timeout_s + 0.25, waited
        st = rb.statistics()
        assert st["redis_timeouts"] == 1 and st["fallbacks"] == 1 and st["redis_up"] == 0
        # Known down: the next answers come without waiting for Redis again.
        t0 = trio.current_time()
        for _ in range(10):
            assert await rb.take(b"id", 1, 10.0, 10.0) == 1.0
        assert trio.current_time() - t0 < timeout_s
        assert rb.statistics()["redis_timeouts"] == 1
        redis_server.cont()
        with trio.fail_after(10):
            await rb.wait_redis()
        assert await rb.take(b"id", 1, 10.0, 10.0) == 0.0
        st = rb.statistics()
        assert st["redis_ok"] == 2 and st["fallbacks"] == 11


async def test_script_flushed_then_eval(redis_server: RedisServer) -> None:
    async with buckets(redis_server) as rb:
        assert await rb.take(b"k", 1, 1.0, 2.0) == 0.0
        assert redis_server.command("SCRIPT", "FLUSH") == b"OK"
        assert await rb.take(b"k", 1, 1.0, 2.0) == 0.0  # NOSCRIPT, then EVAL
        assert await rb.take(b"k", 1, 1.0, 2.0) > 0.0  # EVALSHA again: EVAL cached it
        st = rb.statistics()
        assert st["noscript"] == 1 and st["redis_ok"] == 3 and st["fallbacks"] == 0


async def test_an_error_reply_is_a_failure_not_a_disconnect(redis_server: RedisServer) -> None:
    redis_server.command("HSET", "fastgw:wrongtype", "f", "v")
    async with buckets(redis_server, on_failure="open") as rb:
        assert await rb.take(b"wrongtype", 1, 1.0, 1.0) == 0.0  # WRONGTYPE: the policy
        assert await rb.take(b"wrongtype", 1, 1.0, 1.0) == 0.0
        st = rb.statistics()
        assert st["redis_failed"] == 2 and st["fallbacks"] == 2 and st["redis_up"] == 1
        assert await rb.take(b"fine", 1, 1.0, 1.0) == 0.0
        assert rb.statistics()["redis_ok"] == 1


async def test_auth_and_select(redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory("--requirepass", "s3cret")
    async with buckets(server, password="s3cret", db=2) as rb:
        assert await rb.take(b"k", 1, 1.0, 5.0) == 0.0
    assert server.command("EXISTS", "fastgw:k") == 0  # not in db 0
    assert server.command("EXISTS", "fastgw:k", db=2) == 1
    async with open_redis_buckets(server.address, password="wrong", **FAST) as bad:
        with trio.move_on_after(0.3):
            await bad.wait_redis()
        assert not bad.redis_up
        assert "WRONGPASS" in bad.client.last_error
        assert await bad.take(b"k", 1, 1.0, 5.0) == 0.0  # local
        assert bad.statistics()["fallbacks"] == 1


async def test_an_oversized_reply_drops_the_connection(redis_server: RedisServer) -> None:
    redis_server.command("SET", "big", b"x" * (2 << 20))
    async with open_resp_client(redis_server.address, timeout_s=5.0, **FAST) as client:
        with trio.fail_after(10):
            await client.wait_connected()
        assert await client.call("SET", "small", "v") == b"OK"
        with pytest.raises(RedisUnavailable, match="protocol error"):
            await client.call("GET", "big")
        with trio.fail_after(10):
            await client.wait_connected()
        assert await client.call("GET", "small") == b"v"
        with pytest.raises(RespError, match=r"^ERR"):
            await client.call("NOSUCHCOMMAND")
        assert await client.pipeline([("PING",), ("ECHO", "x")]) == [b"PONG", b"x"]
        assert client.statistics()["connects"] == 2

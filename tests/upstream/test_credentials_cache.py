"""The credential cache's schedule, on trio's autojump MockClock: refresh at ~75 % of the
lifetime, one fetch per audience however many callers, backoff on failure, the old
credential kept until it expires and never handed out after.

The source here is in memory (``ScriptedSource``), so every time is exact; the Google
and AWS tests run the same cache against real local servers."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import trio
from trio.testing import MockClock

from fastgw.upstream.credentials import (
    CredentialCache,
    CredentialError,
    CredentialRegistry,
    RefreshPolicy,
    TokenCredential,
)

NO_JITTER = RefreshPolicy(jitter_fraction=0.0)


class ScriptedSource:
    """Hands out ``t1``, ``t2``... living ``lifetime_s`` each, after ``delay_s``;
    fails while ``failing`` is set."""

    kind = "scripted"
    poll_interval_s: float | None = None

    def __init__(self, lifetime_s: float = 100.0, delay_s: float = 0.0) -> None:
        self.lifetime_s = lifetime_s
        self.delay_s = delay_s
        self.failing = False
        self.calls: list[float] = []
        self.concurrent = 0
        self.max_concurrent = 0
        self.issued = 0

    async def refresh(self, now: float) -> TokenCredential:
        self.calls.append(now)
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            if self.delay_s:
                await trio.sleep(self.delay_s)
            if self.failing:
                raise CredentialError("token endpoint answered 503")
            self.issued += 1
            return TokenCredential(
                obtained_at=now, expires_at=now + self.lifetime_s, token=f"t{self.issued}"
            )
        finally:
            self.concurrent -= 1


async def start(
    nursery: trio.Nursery, source: ScriptedSource, policy: RefreshPolicy = NO_JITTER, seed: int = 1
) -> CredentialCache[TokenCredential]:
    cache = CredentialCache(source, "https://fn.example", policy, rng=random.Random(seed))
    await nursery.start(cache.run)
    return cache


async def test_refresh_at_75_percent_without_jitter(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    src = ScriptedSource(lifetime_s=100.0)
    cache = await start(nursery, src)
    first = await cache.wait_current()
    assert first.token == "t1"
    await trio.sleep(400)
    assert src.calls == [0.0, 75.0, 150.0, 225.0, 300.0, 375.0]
    assert cache.refreshes_ok == 6
    assert cache.refreshes_failed == 0


async def test_refresh_jitter_stays_between_70_and_75_percent(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    src = ScriptedSource(lifetime_s=100.0)
    await start(nursery, src, RefreshPolicy(), seed=7)
    await trio.sleep(10_000)
    gaps = [b - a for a, b in zip(src.calls, src.calls[1:], strict=False)]
    assert len(gaps) > 100
    assert all(70.0 <= g <= 75.0 for g in gaps), (min(gaps), max(gaps))
    # Jitter spreads them out rather than always picking one end.
    assert max(gaps) - min(gaps) > 3.0


async def test_one_fetch_for_many_concurrent_callers(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    src = ScriptedSource(lifetime_s=100.0, delay_s=2.0)
    cache = await start(nursery, src)
    got: list[str] = []

    async def caller() -> None:
        got.append((await cache.wait_current()).token)

    async with trio.open_nursery() as callers:
        for _ in range(500):
            callers.start_soon(caller)
    assert got == ["t1"] * 500
    assert len(src.calls) == 1

    # While the refresh at 75 s is in flight (it takes 2 s), the hot path keeps
    # reading the old credential: no caller waits and none causes a second fetch.
    await trio.sleep_until(76.0)
    assert src.concurrent == 1
    seen = {cache.current(trio.current_time() + i * 0.001) for i in range(1000)}
    assert {c.token for c in seen if c is not None} == {"t1"}
    await trio.sleep_until(78.0)
    cred = cache.current(trio.current_time())
    assert cred is not None and cred.token == "t2"
    assert len(src.calls) == 2
    assert src.max_concurrent == 1


async def test_failed_refresh_keeps_old_credential_until_expiry_then_none(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    src = ScriptedSource(lifetime_s=100.0)
    cache = await start(nursery, src)
    await cache.wait_current()
    src.failing = True
    # Expiry margin: min(5 s, 10 % of 100 s) = 5 s, so usable until 95 s.
    await trio.sleep_until(94.999)
    cred = cache.current(trio.current_time())
    assert cred is not None and cred.token == "t1"
    assert cache.refreshes_failed >= 3
    assert cache.current(95.0) is None
    await trio.sleep_until(95.0)
    assert cache.current(trio.current_time()) is None
    stats = cache.statistics(trio.current_time())
    assert not stats.usable
    assert stats.last_error == "token endpoint answered 503"
    assert stats.consecutive_failures == cache.refreshes_failed
    assert stats.age_s == pytest.approx(95.0)


async def test_backoff_doubles_with_jitter_up_to_the_cap(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    src = ScriptedSource(lifetime_s=1000.0)
    cache = await start(nursery, src, seed=3)
    await cache.wait_current()
    src.failing = True
    # Usable until 995 s (margin 5 s); the first retries happen long before that.
    await trio.sleep_until(750.0 + 200.0)
    failures = src.calls[1:]
    assert failures[0] == 750.0
    gaps = [b - a for a, b in itertools.pairwise(failures)]
    for i, gap in enumerate(gaps):
        cap = min(60.0, 2.0**i)
        assert cap / 2 <= gap <= cap, (i, gap)
    assert gaps[-1] >= 30.0  # reached the cap
    assert cache.statistics(trio.current_time()).consecutive_failures == len(failures)


async def test_retries_land_before_the_old_credential_expires(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    src = ScriptedSource(lifetime_s=100.0)
    cache = await start(nursery, src, seed=5)
    await cache.wait_current()
    src.failing = True
    await trio.sleep_until(95.0)
    failures = src.calls[1:]
    # Each retry waits at most half the time left until 95 s (never under 1 s), so the
    # last ones crowd the end of the credential's life instead of jumping past it.
    for a, b in itertools.pairwise(failures):
        assert b - a <= max(1.0, (95.0 - a) / 2) + 1e-9
    assert failures[-1] > 93.0
    # After expiry, plain backoff again.
    await trio.sleep_until(400.0)
    late = [c for c in src.calls if c > 96.0]
    assert max(b - a for a, b in itertools.pairwise(late)) > 30.0


async def test_recovery_after_failures_resets_backoff(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    src = ScriptedSource(lifetime_s=100.0)
    cache = await start(nursery, src)
    await cache.wait_current()
    src.failing = True
    await trio.sleep_until(85.0)
    src.failing = False
    await trio.sleep_until(95.0)
    cred = cache.current(trio.current_time())
    assert cred is not None and cred.token == "t2"
    stats = cache.statistics(trio.current_time())
    assert stats.consecutive_failures == 0 and stats.last_error is None
    # The next refresh is back on the 75 % schedule of the new credential.
    obtained = cred.obtained_at
    await trio.sleep_until(obtained + 75.0 + 0.5)
    assert src.calls[-1] == pytest.approx(obtained + 75.0)


async def test_cold_start_waits_for_the_first_success(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    src = ScriptedSource(lifetime_s=100.0)
    src.failing = True
    cache = await start(nursery, src)
    assert cache.current(0.0) is None
    with trio.move_on_after(5.0):
        await cache.wait_current()
        pytest.fail("no credential exists yet")

    async def recover() -> None:
        await trio.sleep(10.0)
        src.failing = False

    nursery.start_soon(recover)
    cred = await cache.wait_current()
    assert cred.token == "t1"
    # Callers at the cold start caused no fetches of their own: only the schedule's.
    assert len(src.calls) == cache.refreshes_failed + 1


async def test_a_credential_that_arrives_expired_is_refused(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    src = ScriptedSource(lifetime_s=0.0)
    cache = await start(nursery, src)
    await trio.sleep(0.5)
    assert cache.current(trio.current_time()) is None
    assert cache.refreshes_ok == 0 and cache.refreshes_failed == 1
    assert "expired" in (cache.last_error or "")


async def test_short_lived_credentials_are_never_served_expired(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    """Credentials living 10 s, 10 callers reading the cache at random moments for
    5 minutes: none ever sees an expired one, and the source is asked once per refresh."""
    src = ScriptedSource(lifetime_s=10.0, delay_s=0.2)
    cache = await start(nursery, src, RefreshPolicy(), seed=11)
    await cache.wait_current()
    rng = random.Random(12)
    misses = reads = 0

    async def load() -> None:
        nonlocal misses, reads
        while trio.current_time() < 300.0:
            now = trio.current_time()
            cred = cache.current(now)
            reads += 1
            if cred is None:
                misses += 1
            else:
                assert cred.expires_at > now
            await trio.sleep(rng.uniform(0.001, 0.2))

    async with trio.open_nursery() as n:
        for _ in range(10):
            n.start_soon(load)
    assert reads > 25_000 and misses == 0
    # One fetch per refresh: each refresh lands at 70-75 % of 10 s (7-7.5 s apart).
    assert 300 / 7.5 <= len(src.calls) <= 300 / 7.0 + 2
    assert src.max_concurrent == 1


async def test_timeout_counts_as_a_failure(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    src = ScriptedSource(lifetime_s=100.0, delay_s=30.0)
    cache = await start(nursery, src, RefreshPolicy(fetch_timeout_s=10.0, jitter_fraction=0.0))
    await trio.sleep(10.5)
    assert cache.refreshes_failed == 1
    assert cache.last_error == "no credential within 10 s"


async def test_request_refresh_is_rate_limited(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    src = ScriptedSource(lifetime_s=1000.0)
    cache = await start(nursery, src)
    await cache.wait_current()
    await trio.sleep(20.0)
    assert cache.request_refresh(trio.current_time())
    await trio.sleep(0.1)
    assert len(src.calls) == 2
    assert not cache.request_refresh(trio.current_time())  # within 30 s of the last
    await trio.sleep(29.0)
    assert not cache.request_refresh(trio.current_time())
    await trio.sleep(1.0)
    assert cache.request_refresh(trio.current_time())
    await trio.sleep(0.1)
    assert len(src.calls) == 3


async def test_a_source_bug_does_not_kill_the_cache(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    class Broken(ScriptedSource):
        async def refresh(self, now: float) -> TokenCredential:
            self.calls.append(now)
            raise KeyError("private_key")

    src = Broken()
    cache = await start(nursery, src)
    await trio.sleep(5.0)
    assert cache.refreshes_failed >= 2
    assert cache.last_error == "KeyError: 'private_key'"


async def test_statistics(autojump_clock: MockClock, nursery: trio.Nursery) -> None:
    src = ScriptedSource(lifetime_s=100.0)
    cache = await start(nursery, src)
    await cache.wait_current()
    await trio.sleep(30.0)
    s = cache.statistics(trio.current_time())
    assert (s.kind, s.audience, s.refreshes_ok, s.refreshes_failed) == (
        "scripted",
        "https://fn.example",
        1,
        0,
    )
    assert s.usable
    assert s.age_s == pytest.approx(30.0)
    assert s.expires_in_s == pytest.approx(70.0)
    assert s.next_attempt_in_s == pytest.approx(45.0)


async def test_run_twice_is_a_bug(autojump_clock: MockClock, nursery: trio.Nursery) -> None:
    cache = await start(nursery, ScriptedSource())
    with pytest.raises(RuntimeError):
        await cache.run()


async def test_registry_shares_one_cache_per_key_and_stops_retired_ones(
    autojump_clock: MockClock, nursery: trio.Nursery
) -> None:
    reg = CredentialRegistry()
    a, b = ScriptedSource(), ScriptedSource()
    made: list[str] = []

    def make(src: ScriptedSource, name: str) -> CredentialCache[TokenCredential]:
        made.append(name)
        return CredentialCache(src, name, NO_JITTER)

    ca = reg.get_or_create(("id", "https://a"), lambda: make(a, "a"))
    assert reg.get_or_create(("id", "https://a"), lambda: make(a, "again")) is ca
    await nursery.start(reg.run)
    cb = reg.get_or_create(("id", "https://b"), lambda: make(b, "b"))  # added while running
    assert (await ca.wait_current()).token == "t1"
    assert (await cb.wait_current()).token == "t1"
    assert made == ["a", "b"]

    reg.retain([("id", "https://a")])
    await trio.sleep(500.0)
    assert len(a.calls) > 1
    assert len(b.calls) == 1  # stopped: no refresh after retirement
    assert list(reg.caches()) == [("id", "https://a")]


def test_policy_validation() -> None:
    for bad in (
        {"refresh_at_fraction": 1.0},
        {"refresh_at_fraction": 0.0},
        {"jitter_fraction": 0.8},
        {"jitter_fraction": -0.1},
        {"backoff_initial_s": 0.0},
        {"backoff_max_s": 0.5},
        {"fetch_timeout_s": 0.0},
        {"expiry_margin_s": -1.0},
    ):
        with pytest.raises(ValueError):
            RefreshPolicy(**bad)
    assert RefreshPolicy().refresh_at_fraction == 0.75


def test_credentials_do_not_print_secrets() -> None:
    cred = TokenCredential(obtained_at=0.0, expires_at=math.inf, token="s3cret")
    assert "s3cret" not in repr(cred)

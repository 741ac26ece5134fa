"""Rate-limit buckets shared by many gateway instances through one Redis.

Strategy. The same GCRA as the core's ``BucketTable`` (``fastgw/_core/bucket.pyx``: the
state of a bucket is its theoretical arrival time ``tat`` in integer ns; ``interval =
ceil(1e9 / rate)``, ``tau = floor(burst * interval)``; a take of ``cost`` at ``now`` is
allowed iff ``max(tat, now) + cost * interval - tau <= now``), run atomically inside
Redis by one Lua script per round trip (EVALSHA; EVAL when Redis answers NOSCRIPT, which
also puts the script back in its cache). Python computes ``interval``, ``tau`` and
``cost * interval`` exactly as the core does (integer math on the doubles' exact
values) and sends them as decimal strings; the script only adds, subtracts and compares.

Integers in Lua. Redis runs Lua 5.1, whose numbers are doubles: exact only below 2**53
ns (104 days), while a Unix time in ns is about 2**60. So the script holds each time or
duration as a pair (seconds, ns under 10**9); every value stays under 2**63 ns, so the
seconds stay under 10**10 and both halves are exact, and adding, subtracting and
comparing pairs is exact: the answers are the core's, to the ns. Only the conversion of
a bucket to a new policy (below) multiplies and divides; it uses integers written as
arrays of base-10**7 digits (a product of two digits, under 10**14, is exact in a
double), and runs once per bucket per reload. (Digit arrays on every take cost more
Redis CPU: 20-21 us a take against 14-15 us with pairs, by INFO commandstats on a
2-vCPU VM, where a script that only runs TIME, GET and SET takes 9 us.)

Time. ``now`` is Redis's ``TIME``, read inside the script: every instance measures
against the same clock, so instances whose clocks are skewed still agree. (After a
failover to a replica, ``now`` is the new primary's clock.) The wait returned is
``wait_ns / 1e9`` seconds.

State. One Redis string per bucket, at ``prefix + key`` (the same bytes keys as the
core's table): ``b"<tat_ns> <interval_ns> <tau_ns>"``, the TAT and the policy it was
last taken under, so that a take under another policy (a config reload changed the
rate or burst) converts the bucket exactly as the core does: the debt ``tat - now`` is
kept in tokens (rescaled by ``new_interval / old_interval``, rounded up) and capped at
the new ``tau``, so a reload never refills a bucket. The key expires (PEXPIRE, set with
the SET) when the bucket is full again, ``tat - now`` rounded up to the ms: an idle
bucket vanishes, and a missing key means a full bucket, as in the core. A take that
leaves the bucket full deletes the key. In Redis Cluster, ``take_many``'s keys must
share a hash slot (put a ``{tag}`` in the prefix); not tested here.

Failures. A call waits at most ``timeout_s`` for Redis (default 50 ms: a round trip on a
LAN or loopback is 0.1-0.5 ms, so 50 ms only trips when Redis is stalled or gone, and it
bounds what a stall adds to a request; Envoy's rate-limit filter uses 20 ms for the same
job). When Redis is down, slow, or answers an error, the answer comes from the failure
policy ``on_failure``: ``"local"`` takes from a local core ``BucketTable`` (the same
math, but per instance: N instances let through up to N times the limit), ``"open"``
allows, ``"closed"`` refuses with a wait of ``closed_wait_s``. A dead or stalled
connection is dropped at once and every call goes to the policy without waiting until
the client's background loop has reconnected (with backoff), then calls go to Redis
again. A take that timed out may still have been applied in Redis. State is not moved
between Redis and the local table in either direction.

Test-only clock. ``clock`` (a callable returning seconds, e.g. a variable the test
sets) replaces Redis's ``TIME``: the script gets ``now`` as an argument, rounded to the
ns as the core rounds it, and the waits come back as the core computes them from that
float ``now``, so a test can demand the core's exact answers. In this mode keys get no
expiry (Redis would expire them on its own clock). Production passes no clock.

Errors raised by ``take`` / ``take_many``: ``ValueError``, ``TypeError`` and
``OverflowError`` for arguments the core would refuse (bugs in the caller, as there);
Redis failures are never raised, they are answered by the policy.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

from fastgw._core.bucket import (
    MAX_KEY_BYTES,
    MAX_RATE_PER_S,
    MAX_TAU_S,
    MIN_RATE_PER_S,
    BucketTable,
)
from fastgw.policy._resp import (
    RedisNotConnected,
    RedisTimeout,
    RedisUnavailable,
    RespClient,
    RespError,
)

ON_FAILURE: Final = ("local", "open", "closed")

# The core's bounds, in ns (bucket.pyx: tau <= 2**60, |now| <= 2**61 ns).
_MAX_TAU_NS = 1 << 60
_MAX_NOW_S = 2305843009.213693952
# An injected ``now`` goes to the script shifted by this, so that it is never negative
# (the script's integers have no sign).
_NOW_OFFSET_NS = 1 << 61
_MAX_COST = (1 << 63) - 1
# Distinct (rate, burst) pairs remembered with their interval and tau: a config has a
# few dozen; past this the cache starts over.
_MAX_POLICIES = 4096

# KEYS[i]: the buckets. ARGV[1]: now in ns, or "" for Redis's TIME (and keys that
# expire). Then per key four arguments: cost * interval, interval, tau (ns, decimal) and
# "1" when a refusal of this take ends the batch. Returns one decimal string per take
# evaluated: "0" allowed, else the wait in ns.
LUA_GCRA: Final = b"""
if redis.replicate_commands then redis.replicate_commands() end
-- A time or duration in ns is a pair (h, l) = (h * 10**9 + l), 0 <= l < 10**9.
local G = 1000000000
local function parse(s)
  local n = #s
  if n <= 9 then return 0, tonumber(s) end
  return tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))
end
local function fmt(h, l)
  if h == 0 then return string.format('%d', l) end
  return string.format('%d%09d', h, l)
end
local function add(ah, al, bh, bl)
  local h, l = ah + bh, al + bl
  if l >= G then return h + 1, l - G end
  return h, l
end
local function sub(ah, al, bh, bl)
  local h, l = ah - bh, al - bl
  if l < 0 then return h - 1, l + G end
  return h, l
end
local function lt(ah, al, bh, bl)
  return ah < bh or (ah == bh and al < bl)
end

-- Policy changes only: integers as arrays of base-10**7 digits, least significant
-- first (a product of two digits, under 10**14, is exact in a double).
local B = 10000000
local function trim(a)
  while #a > 1 and a[#a] == 0 do a[#a] = nil end
  return a
end
local function bparse(s)
  local a, i = {}, #s
  while i >= 1 do
    local j = i - 6
    if j < 1 then j = 1 end
    a[#a + 1] = tonumber(string.sub(s, j, i))
    i = j - 1
  end
  return trim(a)
end
local function bfmt(a)
  local t = {string.format('%d', a[#a])}
  for k = #a - 1, 1, -1 do t[#t + 1] = string.format('%07d', a[k]) end
  return table.concat(t)
end
local function bcmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  for k = #a, 1, -1 do
    if a[k] ~= b[k] then return a[k] < b[k] and -1 or 1 end
  end
  return 0
end
local function badd(a, b)
  local r, c = {}, 0
  for k = 1, math.max(#a, #b) do
    local s = (a[k] or 0) + (b[k] or 0) + c
    if s >= B then r[k] = s - B; c = 1 else r[k] = s; c = 0 end
  end
  if c > 0 then r[#r + 1] = c end
  return r
end
local function bmul(a, b)
  local r = {}
  for k = 1, #a + #b do r[k] = 0 end
  for i = 1, #a do
    local c = 0
    for j = 1, #b do
      local s = r[i + j - 1] + a[i] * b[j] + c
      c = math.floor(s / B)
      r[i + j - 1] = s - c * B
    end
    r[i + #b] = c
  end
  return trim(r)
end
-- The debt (dh, dl) > 0 moved from interval old_s to interval new_s (decimal strings):
-- ceil(debt * new / old), or the cap (capped, ch, cl) when that is larger.
local function rescale(dh, dl, new_s, old_s, ch, cl)
  local p = bmul(bparse(fmt(dh, dl)), bparse(new_s))
  local den = bparse(old_s)
  if bcmp(p, bmul(bparse(fmt(ch, cl)), den)) > 0 then return ch, cl end
  local pw = {{1}}
  for b = 2, 62 do pw[b] = badd(pw[b - 1], pw[b - 1]) end
  local q = {0}
  for b = 62, 1, -1 do
    local c = badd(q, pw[b])
    if bcmp(bmul(c, den), p) < 0 then q = c end
  end
  return parse(bfmt(badd(q, {1})))
end

local nh, nl, expire
if ARGV[1] == '' then
  local t = redis.call('TIME')
  nh, nl = tonumber(t[1]), tonumber(t[2]) * 1000
  expire = true
else
  nh, nl = parse(ARGV[1])
  expire = false
end
local out = {}
for i = 1, #KEYS do
  local j = 2 + 4 * (i - 1)
  local ch, cl = parse(ARGV[j])
  local iv_s, tau_s = ARGV[j + 1], ARGV[j + 2]
  local uh, ul = parse(tau_s)
  local key = KEYS[i]
  local h, l, dirty = nh, nl, false
  local v = redis.call('GET', key)
  if v then
    local t, oi, ot = string.match(v, '^(%d+) (%d+) (%d+)$')
    if t then
      h, l = parse(t)
      if lt(nh, nl, h, l) and (oi ~= iv_s or ot ~= tau_s) then
        local dh, dl = sub(h, l, nh, nl)
        if oi ~= iv_s then dh, dl = rescale(dh, dl, iv_s, oi, uh, ul) end
        if lt(uh, ul, dh, dl) then dh, dl = uh, ul end
        h, l = add(nh, nl, dh, dl)
        dirty = true
      end
    end
  end
  local bh, bl = h, l
  if lt(bh, bl, nh, nl) then bh, bl = nh, nl end
  local xh, xl = add(bh, bl, ch, cl)
  local mh, ml = add(nh, nl, uh, ul)
  local refused = lt(mh, ml, xh, xl)
  if refused then
    out[i] = fmt(sub(xh, xl, mh, ml))
  else
    out[i] = '0'
    if ch ~= 0 or cl ~= 0 then h, l = xh, xl; dirty = true end
  end
  if dirty then
    if lt(nh, nl, h, l) then
      local val = fmt(h, l) .. ' ' .. iv_s .. ' ' .. tau_s
      if expire then
        local dh, dl = sub(h, l, nh, nl)
        redis.call('SET', key, val, 'PX', string.format('%d', dh * 1000 + math.ceil(dl / 1000000)))
      else
        redis.call('SET', key, val)
      end
    else
      redis.call('DEL', key)
    end
  end
  if refused and ARGV[j + 3] == '1' then break end
end
return out
"""
LUA_GCRA_SHA1: Final = hashlib.sha1(LUA_GCRA).hexdigest().encode()


class _Policy:
    """A (rate, burst) pair as the core sees it: interval and tau in ns."""

    __slots__ = ("interval", "interval_b", "max_cost", "rate", "tau", "tau_b")

    def __init__(self, rate: float, burst: float) -> None:
        if not (MIN_RATE_PER_S <= rate <= MAX_RATE_PER_S):
            raise ValueError(
                f"rate={rate!r}: a rate is within {MIN_RATE_PER_S}..{MAX_RATE_PER_S} per s"
            )
        if not (math.isfinite(burst) and burst >= 0.0):
            raise ValueError(f"burst={burst!r}: a burst is a finite number >= 0")
        n, d = rate.as_integer_ratio()
        interval = -(-1_000_000_000 * d // n)  # ceil(1e9 / rate), exactly
        n, d = burst.as_integer_ratio()
        tau = n * interval // d  # floor(burst * interval), exactly
        if tau > _MAX_TAU_NS:
            raise ValueError(f"burst={burst!r} at rate={rate!r} takes over {MAX_TAU_S} s to fill")
        self.rate = rate
        self.interval = interval
        self.tau = tau
        self.max_cost = tau // interval
        self.interval_b = b"%d" % interval
        self.tau_b = b"%d" % tau


def _to_ns(s: float) -> int:
    """The core's ``llround(s * 1e9)``: to the nearest ns, halves away from zero."""
    x = s * 1e9
    i = int(x)
    f = x - i
    if f >= 0.5:
        i += 1
    elif f <= -0.5:
        i -= 1
    return i


def _wait_s(now: float, now_ns: int, wait_ns: int) -> float:
    """The core's ``_wait_s``: the float ``w`` such that a take at any ``t >= now + w``
    succeeds (usually ``wait_ns / 1e9``)."""
    target = now_ns + wait_ns
    w = float(wait_ns) / 1e9
    if _to_ns(now + w) >= target:
        return w
    t = float(target) / 1e9
    while _to_ns(t) < target:
        t = math.nextafter(t, math.inf)
    w = t - now
    while _to_ns(now + w) < target:
        w = math.nextafter(w, math.inf)
    return w


Take = tuple[bytes, int, float, float]


class RedisBuckets:
    """GCRA buckets keyed by bytes, kept in Redis and shared by every instance that
    uses the same Redis and prefix. Build it with ``open_redis_buckets``."""

    def __init__(
        self,
        client: RespClient,
        *,
        prefix: bytes = b"fastgw:",
        timeout_s: float = 0.05,
        on_failure: str = "local",
        local: BucketTable | None = None,
        local_max_keys: int = 1_000_000,
        closed_wait_s: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure={on_failure!r}: one of {', '.join(ON_FAILURE)}")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s={timeout_s!r}: a positive number of seconds")
        if not (math.isfinite(closed_wait_s) and closed_wait_s > 0):
            raise ValueError(f"closed_wait_s={closed_wait_s!r}: a positive number of seconds")
        self.client = client
        self.prefix = bytes(prefix)
        self.timeout_s = timeout_s
        self.on_failure = on_failure
        # 1M keys: the gateway's own default (GatewayConfig.max_limit_keys); the table
        # grows by doubling, so an unused fallback costs a few KiB.
        self.local = local if local is not None else BucketTable(local_max_keys)
        # 1 s: the smallest Retry-After a client can be told (whole seconds), and the
        # backoff's order of magnitude: Redis may well be back by then.
        self.closed_wait_s = closed_wait_s
        self.clock = clock
        self._policies: dict[tuple[float, float], _Policy] = {}
        self._n_ok = 0
        self._n_failed = 0
        self._n_timeouts = 0
        self._n_fallbacks = 0
        self._n_noscript = 0

    @property
    def redis_up(self) -> bool:
        """Whether calls go to Redis now (else to the failure policy)."""
        return self.client.connected

    async def wait_redis(self) -> None:
        """Return once Redis is connected (at once when it is)."""
        await self.client.wait_connected()

    def statistics(self) -> dict[str, int]:
        """redis_up (0/1); redis_ok, redis_failed (sent, but the connection failed or
        Redis answered an error), redis_timeouts (no answer in ``timeout_s``): calls,
        one per ``take`` or ``take_many``; fallbacks: calls answered by the failure
        policy (the failed and timed-out ones, and those made while Redis was known to
        be down, which cost no I/O); noscript: EVALSHA answered NOSCRIPT (then EVAL)."""
        return {
            "redis_up": int(self.client.connected),
            "redis_ok": self._n_ok,
            "redis_failed": self._n_failed,
            "redis_timeouts": self._n_timeouts,
            "fallbacks": self._n_fallbacks,
            "noscript": self._n_noscript,
        }

    async def take(self, key: bytes, cost: int, rate: float, burst: float) -> float:
        """Take ``cost`` tokens from ``key``'s bucket (``rate`` tokens/s, ``burst``
        tokens). 0.0 when taken; else the seconds to wait (nothing taken); ``inf`` when
        ``cost > burst`` (never possible; no round trip). Raises only on arguments that
        are bugs (see the module docstring)."""
        return (await self.take_many(((key, cost, rate, burst),)))[0]

    async def take_many(
        self, takes: Sequence[Take], *, stop: Sequence[bool] | None = None
    ) -> list[float]:
        """Several takes ``(key, cost, rate, burst)`` at one ``now``, in order, in one
        round trip, each answered as by ``take``. With ``stop``, a refused take whose
        ``stop`` is true ends the batch: the takes after it are not made, and the list
        ends with its answer (the gateway's loop over a route's limits: an enforced
        limit that refuses ends it, a shadow one does not)."""
        n = len(takes)
        if stop is not None and len(stop) != n:
            raise ValueError(f"stop has {len(stop)} flags for {n} takes")
        if self.clock is not None:
            now = float(self.clock())
            if not (-_MAX_NOW_S <= now <= _MAX_NOW_S):
                raise ValueError(f"now={now!r} is not a time within +-2**61 ns")
            now_ns = _to_ns(now)
            now_arg = b"%d" % (now_ns + _NOW_OFFSET_NS)
        else:
            now = 0.0
            now_ns = 0
            now_arg = b""
        # Check every take, then decide which ones go to Redis: a take that can never
        # pass is answered here (inf), as the core answers it without touching state.
        pols: list[_Policy] = []
        costs: list[int] = []
        sent: list[int] = []
        for i, (key, cost, rate, burst) in enumerate(takes):
            pol = self._policy(rate, burst)
            if type(cost) is not int:
                cost = operator.index(cost)
            if cost > _MAX_COST:
                raise OverflowError(f"cost={cost} does not fit 64 bits")
            if cost < 0:
                raise ValueError("cost must be >= 0")
            if type(key) is not bytes:
                raise TypeError(f"a key is bytes, not {type(key).__name__}")
            if len(key) > MAX_KEY_BYTES:
                raise ValueError(f"key of {len(key)} bytes: at most {MAX_KEY_BYTES}")
            pols.append(pol)
            costs.append(cost)
            if cost <= pol.max_cost:
                sent.append(i)
            elif stop is not None and stop[i]:
                break  # refused here: nothing after it is taken
        answers: list[float] | None = None
        if sent:
            answers = await self._redis(takes, pols, costs, sent, stop, now, now_ns, now_arg)
            if answers is None:
                self._n_fallbacks += 1
                return self._fallback(takes, pols, costs, stop, now)
        out: list[float] = []
        r = 0
        for i in range(n):
            if costs[i] > pols[i].max_cost:
                out.append(math.inf)
            elif answers is not None and r < len(answers):
                out.append(answers[r])
                r += 1
            else:
                break
            if stop is not None and stop[i] and out[-1] > 0.0:
                break
        return out

    def _policy(self, rate: float, burst: float) -> _Policy:
        pol = self._policies.get((rate, burst))
        if pol is None:
            pol = _Policy(float(rate), float(burst))
            if len(self._policies) >= _MAX_POLICIES:
                self._policies.clear()
            self._policies[(rate, burst)] = pol
        return pol

    async def _redis(
        self,
        takes: Sequence[Take],
        pols: list[_Policy],
        costs: list[int],
        sent: list[int],
        stop: Sequence[bool] | None,
        now: float,
        now_ns: int,
        now_arg: bytes,
    ) -> list[float] | None:
        """The answers of the ``sent`` takes from Redis (fewer when a stop ended the
        batch), or None when Redis did not answer (counted)."""
        prefix = self.prefix
        keys = [prefix + takes[i][0] for i in sent]
        argv: list[bytes] = [now_arg]
        for i in sent:
            pol = pols[i]
            argv += (
                b"%d" % (costs[i] * pol.interval),
                pol.interval_b,
                pol.tau_b,
                b"1" if stop is not None and stop[i] else b"0",
            )
        try:
            reply, noscript = await self.client.eval_cached(
                LUA_GCRA, LUA_GCRA_SHA1, (b"%d" % len(keys), *keys, *argv), self.timeout_s
            )
            self._n_noscript += noscript
        except RedisTimeout:
            self._n_timeouts += 1
            return None
        except RedisNotConnected:
            return None  # known to be down: nothing was sent
        except RedisUnavailable:
            self._n_failed += 1
            return None
        if (
            not isinstance(reply, list)
            or not 0 < len(reply) <= len(sent)
            or not all(type(x) is bytes for x in reply)
            # Short only when a refusal of a "stop" take ended the batch.
            or (
                len(reply) < len(sent)
                and (reply[-1] == b"0" or stop is None or not stop[sent[len(reply) - 1]])
            )
        ):
            self._n_failed += 1  # an error reply (OOM, READONLY, ...) or a broken one
            return None
        self._n_ok += 1
        out: list[float] = []
        clock = self.clock is not None
        for x in reply:
            assert isinstance(x, bytes)
            if x == b"0":
                out.append(0.0)
            else:
                wait_ns = int(x)
                out.append(_wait_s(now, now_ns, wait_ns) if clock else float(wait_ns) / 1e9)
        return out

    def _fallback(
        self,
        takes: Sequence[Take],
        pols: list[_Policy],
        costs: list[int],
        stop: Sequence[bool] | None,
        now: float,
    ) -> list[float]:
        """The answers when Redis did not give them, by ``on_failure``."""
        policy = self.on_failure
        if policy == "local" and self.clock is None:
            now = trio.current_time()
        out: list[float] = []
        for i in range(len(costs)):
            if costs[i] > pols[i].max_cost:
                w = math.inf
            elif policy == "local":
                key, _, rate, burst = takes[i]
                w = self.local.take(key, costs[i], now, rate, burst)
            elif policy == "open":
                w = 0.0
            else:
                w = self.closed_wait_s
            out.append(w)
            if stop is not None and stop[i] and w > 0.0:
                break
        return out


async def _load_script(call: Callable[..., Any]) -> None:
    sha = await call(b"SCRIPT", b"LOAD", LUA_GCRA)
    if sha != LUA_GCRA_SHA1:
        raise RespError(f"ERR SCRIPT LOAD gave {sha!r}, expected {LUA_GCRA_SHA1!r}")


def redis_buckets(
    address: str,
    *,
    password: str | None = None,
    username: str | None = None,
    db: int = 0,
    connect_timeout_s: float = 1.0,
    backoff_min_s: float = 0.1,
    backoff_max_s: float = 5.0,
    **kwargs: Any,
) -> RedisBuckets:
    """``RedisBuckets`` (keyword arguments as ``open_redis_buckets``) whose client is
    not running yet: the caller runs ``buckets.client.run`` in its own nursery (the
    gateway does, so that a reload can put the new object in place at once, without
    awaiting). Until the client has connected, takes are answered by ``on_failure``.
    Raises ValueError on bad arguments."""
    client = RespClient(
        address,
        password=password,
        username=username,
        db=db,
        timeout_s=kwargs.get("timeout_s", 0.05),
        connect_timeout_s=connect_timeout_s,
        backoff_min_s=backoff_min_s,
        backoff_max_s=backoff_max_s,
        on_connect=_load_script,
    )
    return RedisBuckets(client, **kwargs)


@asynccontextmanager
async def open_redis_buckets(
    address: str,
    *,
    prefix: bytes = b"fastgw:",
    timeout_s: float = 0.05,
    on_failure: str = "local",
    password: str | None = None,
    username: str | None = None,
    db: int = 0,
    connect_timeout_s: float = 1.0,
    backoff_min_s: float = 0.1,
    backoff_max_s: float = 5.0,
    local: BucketTable | None = None,
    local_max_keys: int = 1_000_000,
    closed_wait_s: float = 1.0,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[RedisBuckets]:
    """``RedisBuckets`` over one pipelined connection to ``address`` (``host:port`` or
    ``unix:/path``), kept up in the background (reconnects with backoff between
    ``backoff_min_s`` and ``backoff_max_s``; each connection runs AUTH, SELECT and
    SCRIPT LOAD before use). Does not wait for Redis: until it is connected, takes are
    answered by ``on_failure`` (see ``RedisBuckets.wait_redis``). Raises ValueError on
    bad arguments."""
    buckets = redis_buckets(
        address,
        password=password,
        username=username,
        db=db,
        connect_timeout_s=connect_timeout_s,
        backoff_min_s=backoff_min_s,
        backoff_max_s=backoff_max_s,
        prefix=prefix,
        timeout_s=timeout_s,
        on_failure=on_failure,
        local=local,
        local_max_keys=local_max_keys,
        closed_wait_s=closed_wait_s,
        clock=clock,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(buckets.client.run)
        try:
            yield buckets
        finally:
            nursery.cancel_scope.cancel()

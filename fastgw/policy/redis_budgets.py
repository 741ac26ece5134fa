"""Budgets shared by many gateway instances through one Redis.

Strategy. One Redis string per key per window, at ``prefix + b"budget:" + key + b"@" +
window id`` (the window id, the window's end in Unix seconds, is part of the name, so a
new window is a new key and never depends on when Redis expires the old one). A Lua
script spends from all of a request's budgets at once, atomically: it reads every
counter, and when an enforced budget has less left than the cost it spends nothing and
answers which one refused; otherwise it spends (INCRBY) from every budget that has room
and sets EXPIREAT to the window's end plus a minute of slack for clocks that disagree
(the expiry only frees memory: the window id in the name is what starts a new window).
Runs as EVALSHA over the shared pipelined connection of ``fastgw.policy._resp`` (the
rate limits' connection when ``[limits_store]`` is Redis), with EVAL when Redis answers
NOSCRIPT, which also caches the script.

Failures. A call waits at most ``timeout_s``; when Redis is down, slow or answers an
error, ``on_failure`` decides, as for the rate limits: ``"local"`` spends from the
gateway's local ``BudgetTable`` (per instance: N instances may let through up to N
times the budget while Redis is away), ``"open"`` lets the request through,
``"closed"`` refuses it (429 with ``Retry-After: 1``).

Errors raised: none for Redis failures (answered by the policy).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from fastgw.policy._resp import (
    RedisNotConnected,
    RedisTimeout,
    RedisUnavailable,
    RespClient,
)

if TYPE_CHECKING:
    from fastgw._core.budget import BudgetTable
    from fastgw.policy.budgets import Refusal

ON_FAILURE: Final = ("local", "open", "closed")
# Seconds a spent window's key outlives the window's end: a minute covers any clock
# skew an NTP-synchronised fleet has; the key's name, not its expiry, ends the window.
EXPIRY_SLACK_S: Final = 60

# KEYS[i]: the counters. ARGV[1]: the cost; then per key: limit, expire-at (Unix s),
# "1" for a shadow budget. Returns per key what is left after the spend, or -1 for a
# budget with too little left (then nothing was spent unless all refusals are shadow).
LUA_SPEND: Final = b"""
local cost = tonumber(ARGV[1])
local out, stop = {}, false
for i = 1, #KEYS do
  local limit = tonumber(ARGV[2 + 3 * (i - 1)])
  local spent = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if spent + cost > limit then
    out[i] = -1
    if ARGV[4 + 3 * (i - 1)] ~= '1' then stop = true end
  else
    out[i] = limit - spent - cost
  end
end
if stop then return out end
for i = 1, #KEYS do
  if out[i] >= 0 then
    redis.call('INCRBY', KEYS[i], cost)
    redis.call('EXPIREAT', KEYS[i], ARGV[3 + 3 * (i - 1)])
  end
end
return out
"""
LUA_SPEND_SHA1: Final = hashlib.sha1(LUA_SPEND).hexdigest().encode()

# (key, window id, limit, shadow)
Spend = tuple[bytes, int, int, bool]


class RedisBudgets:
    """Budget counters in Redis, over a running ``RespClient`` (the gateway lends the
    rate limits' one)."""

    def __init__(
        self,
        client: RespClient,
        *,
        prefix: bytes = b"fastgw:",
        timeout_s: float = 0.05,
        on_failure: str = "local",
        local: BudgetTable | None = None,
    ) -> None:
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure={on_failure!r}: one of {', '.join(ON_FAILURE)}")
        if on_failure == "local" and local is None:
            raise ValueError('on_failure="local" needs a local BudgetTable')
        self.client = client
        self.prefix = bytes(prefix) + b"budget:"
        self.timeout_s = timeout_s
        self.on_failure = on_failure
        self.local = local
        self.n_ok = 0
        self.n_failed = 0
        self.n_fallbacks = 0

    def statistics(self) -> dict[str, int]:
        """redis_ok, redis_failed (no answer, or an error reply), fallbacks (calls
        answered by the failure policy)."""
        return {"redis_ok": self.n_ok, "redis_failed": self.n_failed,
                "fallbacks": self.n_fallbacks}  # fmt: skip

    async def spend_many(self, spends: Sequence[Spend], cost: int) -> list[int] | None:
        """Spend ``cost`` from each budget at once: per budget what is left after the
        spend, or -1 where too little was left; an enforced -1 means nothing was spent
        anywhere. None when Redis did not answer and ``on_failure`` is "closed"."""
        keys: list[bytes] = []
        argv: list[bytes] = [b"%d" % cost]
        for key, window, limit, shadow in spends:
            keys.append(self.prefix + key + b"@%d" % window)
            argv += (b"%d" % limit, b"%d" % (window + EXPIRY_SLACK_S), b"1" if shadow else b"0")
        try:
            reply, _ = await self.client.eval_cached(
                LUA_SPEND, LUA_SPEND_SHA1, (b"%d" % len(keys), *keys, *argv), self.timeout_s
            )
        except (RedisTimeout, RedisNotConnected, RedisUnavailable):
            reply = None
        if (
            isinstance(reply, list)
            and len(reply) == len(spends)
            and all(type(x) is int for x in reply)
        ):
            self.n_ok += 1
            return reply  # type: ignore[return-value]
        self.n_failed += reply is not None
        self.n_fallbacks += 1
        return self._fallback(spends, cost)

    def _fallback(self, spends: Sequence[Spend], cost: int) -> list[int] | None:
        if self.on_failure == "open":
            return [max(0, limit - cost) for _, _, limit, _ in spends]
        if self.on_failure == "closed":
            return None
        table = self.local
        assert table is not None
        out: list[int] = []
        done: list[tuple[bytes, int]] = []
        for key, window, limit, shadow in spends:
            left = table.spend(key, cost, window, limit)
            out.append(left)
            if left >= 0:
                done.append((key, window))
            elif not shadow:
                for k, w in done:
                    table.refund(k, cost, w)
                return out + [-1] * (len(spends) - len(out))  # the rest: not spent
        return out

    def closed_refusal(self) -> Refusal:
        from fastgw.policy.budgets import Refusal

        return Refusal(
            429,
            "budget_unavailable",
            "the budget store is unavailable; try again shortly",
            b"Retry-After: 1\r\n",
            "budget store unavailable",
        )

"""Budgets: so many requests (or cost units) per caller per calendar window.

A rate limit smooths bursts; it does not stop an AI agent in a loop from spending a
month's allowance in an hour. A budget counts what a key (the same keys as the rate
limits': identity, ip, route, header:<name>, claim:<name>) spent in the current hour,
day or month of a configured time zone, and refuses the request that would go over:
429 with ``Retry-After`` = the seconds until the window ends.

Windows. A window's id is its end in Unix seconds, computed with ``zoneinfo`` from the
wall clock: an hour is 3600 s from a local whole hour; a day runs from local midnight
to the next (23 or 25 hours across a DST change); a month from the 1st at midnight to
the next 1st. Each ``RouteBudget`` caches its current window's start and end, so the
request path compares the clock with two floats and computes a window only when the
clock leaves the cached one. The wall clock is ``Gateway.wall_clock`` (``time.time``;
tests inject theirs).

Counters. In the gateway's core ``BudgetTable`` (fastgw/_core/budget.pyx): one counter
per key per budget, holding the window it counts for, so a new window starts from zero
without a sweep. The table belongs to the gateway, not to a config: a reload keeps
every counter (a lowered limit leaves a caller at zero until the next window), and with
``gateway.state_dir`` the table is a file that survives restarts and that the workers
of ``--workers N`` share. The key includes the window kind (a budget changed from
"day" to "month" starts over rather than carrying a day's count into a month). With
``store = "redis"`` the counters live in Redis instead (fastgw.policy.redis_budgets);
a route with any Redis budget spends all of its budgets there, in one round trip.

A request on a route with several budgets spends from each; if an enforced one refuses,
what the others took is given back, so a refused request spends nothing. Shadow
budgets spend and count but never refuse, and send no fields.

Response fields. On success the IETF ``RateLimit-Policy`` and ``RateLimit`` fields
(draft-ietf-httpapi-ratelimit-headers), one item per enforced budget, named by the
budget: ``RateLimit-Policy: "daily";q=1000;w=86400`` (the limit and the window's
length in seconds, 82800 or 90000 on a DST day) and ``RateLimit: "daily";r=41;t=3600``
(left, and seconds until the window ends). The rate limits already answer 429 with the
same two fields, so a client reads both kinds of limit the same way and with one
parser, and the policy name says which one it is; ad-hoc ``X-Budget-*`` fields would
be a second vocabulary for the same facts.

Cost. 1 per request, or with ``cost_header`` the request's own declared cost: an
integer 1..``max_cost`` in that field (absent: 1). A malformed or larger value is
refused with 400: a cap that silently clamped would let a caller under-declare. One
cost per request: on a route with several budgets, the first one's ``cost_header`` and
``max_cost`` apply to all of them.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from math import ceil
from typing import TYPE_CHECKING, Any, Final
from zoneinfo import ZoneInfo

from fastgw.config.model import BudgetConfig, RateLimitConfig
from fastgw.policy.limits import RouteLimit

if TYPE_CHECKING:
    from fastgw._core.budget import BudgetTable
    from fastgw.policy.redis_budgets import RedisBudgets

WINDOWS: Final = ("hour", "day", "month")
_PER: Final = {"hour": "an hour", "day": "a day", "month": "a month"}


def window_bounds(now_s: float, window: str, tz: ZoneInfo) -> tuple[int, int]:
    """(start, end) in Unix seconds of the ``window`` ("hour", "day" or "month") of
    zone ``tz`` that holds the instant ``now_s``. Raises ValueError for another kind."""
    local = datetime.fromtimestamp(now_s, tz)
    if window == "hour":
        # Absolute 3600 s from the local whole hour: across a fall-back change the
        # repeated hour is its own window (fold tells the two apart).
        start = int(local.replace(minute=0, second=0, microsecond=0).timestamp())
        return start, start + 3600
    if window == "day":
        first = datetime(local.year, local.month, local.day, tzinfo=tz)
        nxt = (first.replace(tzinfo=None) + timedelta(days=1)).replace(tzinfo=tz)
    elif window == "month":
        first = datetime(local.year, local.month, 1, tzinfo=tz)
        y, m = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        nxt = datetime(y, m, 1, tzinfo=tz)
    else:
        raise ValueError(f"window {window!r}: one of {', '.join(WINDOWS)}")
    # A midnight that does not exist (a DST jump at 00:00) reads as the instant of the
    # jump (fold=0 takes the offset before it): the day starts when the clocks say so.
    return int(first.timestamp()), int(nxt.timestamp())


class Refusal:
    """A request a budget refuses: the answer's status, error code, detail and fields."""

    __slots__ = ("code", "detail", "extra", "reason", "status")

    def __init__(self, status: int, code: str, detail: str, extra: bytes, reason: str) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra
        self.reason = reason


class RouteBudget:
    """One budget as it applies on one route, with its current window cached."""

    __slots__ = (
        "counts", "end_s", "field_prefix", "fields_head", "keyer", "last_t", "limit", "name",
        "policy_field", "shadow", "start_s", "t_suffix", "tz", "tz_name", "window", "window_id",
    )  # fmt: skip

    def __init__(self, cfg: BudgetConfig, counts: list[int]) -> None:
        self.name = cfg.name
        self.limit = cfg.requests
        self.window = cfg.window
        self.tz_name = cfg.time_zone
        self.tz = ZoneInfo(cfg.time_zone)
        self.shadow = cfg.mode == "shadow"
        # allowed, refused, shadow_refused: shared by the routes, kept over reloads.
        self.counts = counts
        # The rate limits' key maker (identity, ip, route, header, claim; cached per
        # identity object), under a prefix that names the budget and its window kind.
        self.keyer = RouteLimit(RateLimitConfig(f"{cfg.name}/{cfg.window}", 1.0, 1.0, cfg.key))
        self.start_s = 0.0
        self.end_s = -1.0
        self.window_id = 0
        self.policy_field = b""
        self.field_prefix = b'RateLimit: "%s";r=' % cfg.name.encode()
        # Both fields up to the remaining count, made per window; and ";t=<s>\r\n",
        # made when the second changes.
        self.fields_head = b""
        self.last_t = -1
        self.t_suffix = b""

    def advance(self, now_s: float) -> None:
        """Move the cached window to the one holding ``now_s``."""
        start, end = window_bounds(now_s, self.window, self.tz)
        self.start_s = float(start)
        self.end_s = float(end)
        self.window_id = end
        self.policy_field = b'RateLimit-Policy: "%s";q=%d;w=%d\r\n' % (
            self.name.encode(),
            self.limit,
            end - start,
        )
        self.fields_head = self.policy_field + self.field_prefix

    def reset_s(self, now_s: float) -> int:
        """Whole seconds until the window ends, rounded up (so at least 1, since
        ``now_s`` is inside the window)."""
        return math.ceil(self.end_s - now_s)

    def refusal(self, now_s: float) -> Refusal:
        t = self.reset_s(now_s)
        until = datetime.fromtimestamp(self.end_s, self.tz).isoformat()
        return Refusal(
            429,
            "budget_exhausted",
            f"the budget {self.name} ({self.limit} per {self.window}, time zone "
            f"{self.tz_name}) is spent until {until}",
            b'Retry-After: %d\r\n%sRateLimit: "%s";r=0;t=%d\r\n'
            % (t, self.policy_field, self.name.encode(), t),
            f"budget {self.name}",
        )

    def fields(self, left: int, now_s: float) -> bytes:
        return (
            self.policy_field
            + self.field_prefix
            + b"%d;t=%d\r\n" % (left, math.ceil(self.end_s - now_s))
        )


class RouteBudgets:
    """The budgets of one route and how a request spends from them."""

    __slots__ = ("cost_header", "items", "max_cost", "shared", "single")

    def __init__(self, items: tuple[RouteBudget, ...], cost: tuple[bytes, int] | None,
                 shared: bool) -> None:  # fmt: skip
        self.items = items
        self.single = items[0] if len(items) == 1 else None
        # (lower-cased field name, cap) of the route's first budget that declares one:
        # one cost per request, spent from every budget of the route.
        self.cost_header = cost[0] if cost is not None else b""
        self.max_cost = cost[1] if cost is not None else 1
        self.shared = shared

    def cost(self, head: Any) -> int | Refusal:
        if not self.cost_header:
            return 1
        raw = head.get(self.cost_header)
        if raw is None:
            return 1
        if raw.isdigit() and len(raw) <= 19:
            n = int(raw)
            if 1 <= n <= self.max_cost:
                return n
        name = self.cost_header.decode()
        return Refusal(
            400,
            "invalid_cost",
            f"{name} must be a whole number from 1 to {self.max_cost}",
            b"",
            f"cost field {name}",
        )

    def spend(self, table: BudgetTable, now_s: float, identity: Any, peer_ip: bytes,
              head: Any) -> bytes | Refusal:  # fmt: skip
        """Spend from the local table: the success fields, or the refusal."""
        if self.cost_header:
            cost = self.cost(head)
            if type(cost) is not int:
                return cost  # type: ignore[return-value]
        else:
            cost = 1
        b = self.single
        if b is not None:
            # The common case, without the bookkeeping for refunds.
            if not b.start_s <= now_s < b.end_s:
                b.advance(now_s)
            left = table.spend(b.keyer.key(identity, peer_ip, head), cost, b.window_id, b.limit)
            if left < 0:
                if not b.shadow:
                    b.counts[1] += 1
                    return b.refusal(now_s)
                b.counts[2] += 1
                return b""
            b.counts[0] += 1
            if b.shadow:
                return b""
            t = ceil(b.end_s - now_s)
            if t != b.last_t:
                b.last_t = t
                b.t_suffix = b";t=%d\r\n" % t
            return b.fields_head + b"%d" % left + b.t_suffix
        out = b""
        spent: list[tuple[bytes, int]] | None = None
        for b in self.items:
            if not b.start_s <= now_s < b.end_s:
                b.advance(now_s)
            key = b.keyer.key(identity, peer_ip, head)
            left = table.spend(key, cost, b.window_id, b.limit)
            if left < 0:
                if b.shadow:
                    b.counts[2] += 1
                    continue
                b.counts[1] += 1
                if spent is not None:
                    for k, w in spent:
                        table.refund(k, cost, w)
                return b.refusal(now_s)
            b.counts[0] += 1
            if len(self.items) > 1:
                if spent is None:
                    spent = []
                spent.append((key, b.window_id))
            if not b.shadow:
                out += b.fields(left, now_s)
        return out

    async def spend_shared(self, store: RedisBudgets, now_s: float, identity: Any,
                           peer_ip: bytes, head: Any) -> bytes | Refusal:  # fmt: skip
        """Spend from Redis, in one round trip for every budget of the route."""
        cost = self.cost(head)
        if type(cost) is not int:
            return cost  # type: ignore[return-value]
        items = self.items
        for b in items:
            if not b.start_s <= now_s < b.end_s:
                b.advance(now_s)
        spends = [
            (b.keyer.key(identity, peer_ip, head), b.window_id, b.limit, b.shadow) for b in items
        ]
        answers = await store.spend_many(spends, cost)
        if answers is None:
            return store.closed_refusal()
        out = b""
        for b, left in zip(items, answers, strict=True):
            if left < 0:
                if b.shadow:
                    b.counts[2] += 1
                    continue
                b.counts[1] += 1
                return b.refusal(now_s)
        for b, left in zip(items, answers, strict=True):
            if left >= 0:
                b.counts[0] += 1
                if not b.shadow:
                    out += b.fields(left, now_s)
        return out


def route_budgets(
    budgets: tuple[BudgetConfig, ...], route: str, counts: dict[str, list[int]]
) -> RouteBudgets | None:
    """The budgets on ``route`` (None when there are none); ``counts`` maps a budget's
    name to its counters (created here when missing) so routes and reloads share them.
    Raises ValueError (zoneinfo.ZoneInfoNotFoundError) for a zone the loader let by."""
    mine = [x for x in budgets if not x.routes or route in x.routes]
    if not mine:
        return None
    items = tuple(RouteBudget(x, counts.setdefault(x.name, [0, 0, 0])) for x in mine)
    cost = next(((x.cost_header.lower().encode(), x.max_cost) for x in mine if x.cost_header), None)
    return RouteBudgets(items, cost, any(x.store == "redis" for x in mine))

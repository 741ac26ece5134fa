"""Rate limits: one token bucket per key per limit, in the core's bucket table.

The core measures (``BucketTable.take`` answers 0 or "this many seconds until the
tokens are there", in constant time, with ``now`` passed in); this module decides: it
picks the key from the request (the verified identity, the client address, a header, a
claim), and over the limit answers 429 with ``Retry-After`` and the IETF ``RateLimit``
and ``RateLimit-Policy`` fields (draft-ietf-httpapi-ratelimit-headers), or in shadow
mode only counts. The table belongs to the gateway, not to a config: a reload keeps
every bucket, and a limit whose rate changed applies the new rate to the same bucket
without refilling it (the core converts its state).

Tiers. A limit with tiers takes its rate and burst from the caller's tier: the value of
one claim (a token claim or an API key's attribute), looked up in a map when one is
given, names it; a caller without a known tier gets the tier ``default``, or is refused
(403) when there is none. The tier is resolved once per identity object and cached on
the limit (a cached token yields the same object, as for the ACL's decisions), so a
repeat caller pays one dict hit. The bucket's key does not include the tier: a caller
whose tier changes keeps its bucket, converted to the new rate by the core (or the
Redis script) without a refill.

Store. Buckets live in the gateway's core table, or in Redis when ``[limits_store]``
says so (``fastgw.policy.redis_limits``): the request path then makes one round trip
per request for all of a route's limits (``take_many``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fastgw.config.model import RateLimitConfig
from fastgw.policy.acl import claim_value

if TYPE_CHECKING:
    from fastgw.identity import Identity

# Identities whose key and tier a limit remembers: past this the cache starts over (the
# ACL's bound: a cached token is one entry, and the verifier's token cache holds 10k).
_MAX_TIER_CACHE = 10_000
_MISS: Any = object()


def _policy_field(name: str, rate: float, burst: float) -> bytes:
    window = max(1, math.ceil(burst / rate))
    return f'"{name}";q={math.floor(burst)};w={window}'.encode()


class Tier:
    """One tier of a limit: its rate, burst and RateLimit-Policy field."""

    __slots__ = ("burst", "name", "policy_field", "rate")

    def __init__(self, limit: str, name: str, rate: float, burst: float) -> None:
        self.name = name
        self.rate = rate
        self.burst = burst
        self.policy_field = _policy_field(limit, rate, burst)


class RouteLimit:
    __slots__ = (
        "_kept", "_keys", "_tier_kept", "_tiers_by_id", "arg", "burst", "by_identity", "counts",
        "default_tier", "kind", "name", "policy_field", "prefix", "rate", "shadow",
        "tier_claim", "tier_map", "tiered", "tiers",
    )  # fmt: skip

    def __init__(self, cfg: RateLimitConfig, counts: list[int] | None = None) -> None:
        self.name = cfg.name
        # allowed, limited, shadow_limited: shared by every route the limit applies to,
        # and carried over a reload (metrics stay monotonic).
        self.counts = counts if counts is not None else [0, 0, 0]
        self.prefix = cfg.name.encode() + b"\0"
        self.rate = cfg.rate_per_s
        self.burst = cfg.burst
        self.shadow = cfg.mode == "shadow"
        kind, _, arg = cfg.key.partition(":")
        self.kind = kind
        self.arg = arg.lower().encode() if kind == "header" else arg.encode()
        self.tiered = cfg.tier is not None
        self.tiers = {t.name: Tier(cfg.name, t.name, t.rate_per_s, t.burst) for t in cfg.tiers}
        self.default_tier = self.tiers.get("default")
        self.tier_claim = cfg.tier.partition(":")[2] if cfg.tier is not None else ""
        self.tier_map = cfg.tier_map_obj
        self._tiers_by_id: dict[int, Tier | None] = {}
        self._tier_kept: list[Identity | None] = []
        # Keys that depend on the identity alone (identity, claim:<name>), by its id.
        self.by_identity = kind in ("identity", "claim")
        self._keys: dict[int, bytes] = {}
        self._kept: list[Identity] = []
        if self.tiered:
            # rate/burst are the default tier's (0 without one): only tier_for's answer
            # is ever taken with.
            self.policy_field = (
                self.default_tier.policy_field if self.default_tier is not None else b""
            )
        else:
            self.policy_field = _policy_field(cfg.name, cfg.rate_per_s, cfg.burst)

    def tier_for(self, identity: Identity | None) -> Tier | None:
        """The caller's tier (``default`` when it has no known one), None when it has
        none and there is no default (refuse: 403). Cached per identity object (by id,
        the object kept alive with its entry)."""
        hit = self._tiers_by_id.get(id(identity), _MISS)
        if hit is _MISS:
            hit = self._resolve_tier(identity)
            if len(self._tiers_by_id) >= _MAX_TIER_CACHE:
                self._tiers_by_id.clear()
                self._tier_kept.clear()
            self._tiers_by_id[id(identity)] = hit
            self._tier_kept.append(identity)
        return hit

    def _resolve_tier(self, identity: Identity | None) -> Tier | None:
        value = claim_value(identity.claims, self.tier_claim) if identity is not None else None
        tier = None
        if isinstance(value, str | int) and not isinstance(value, bool):
            name: str | None = str(value)
            if self.tier_map is not None:
                found = self.tier_map.lookup(str(value).encode())
                name = found.decode() if found is not None else None
            if name is not None:
                tier = self.tiers.get(name)
        return tier if tier is not None else self.default_tier

    def key(self, identity: Identity | None, peer_ip: bytes, head: Any) -> bytes:
        if self.by_identity and identity is not None:
            # A repeat caller's key is one dict hit (by the identity object's id; the
            # object is kept alive with its entry, so the id is not reused meanwhile).
            k = self._keys.get(id(identity))
            if k is not None:
                return k
            if identity.kind != "anonymous":
                return self._identity_key(identity)
        kind = self.kind
        if kind == "identity":
            return self.prefix + b"ip:" + peer_ip  # no identity: the address stands in
        if kind == "ip":
            return self.prefix + peer_ip
        if kind == "route":
            return self.prefix
        if kind == "header":
            return self.prefix + (head.get(self.arg) or b"-")
        value = identity.claims.get(self.arg.decode()) if identity is not None else None
        return self.prefix + (b"-" if value is None else str(value).encode())

    def _identity_key(self, identity: Identity) -> bytes:
        if self.kind == "identity":
            k = self.prefix + (
                f"{identity.kind}:{identity.issuer or ''}:{identity.subject}".encode()
            )
        else:
            value = identity.claims.get(self.arg.decode())
            k = self.prefix + (b"-" if value is None else str(value).encode())
        if len(self._keys) >= _MAX_TIER_CACHE:
            self._keys.clear()
            self._kept.clear()
        self._keys[id(identity)] = k
        self._kept.append(identity)
        return k

    def answer_fields(self, wait_s: float, identity: Identity | None = None) -> bytes:
        """Retry-After and the RateLimit fields of a 429 (the caller's tier's quota)."""
        t = max(1, math.ceil(wait_s))
        policy = self.policy_field
        if self.tiered:
            tier = self.tier_for(identity)
            if tier is not None:
                policy = tier.policy_field
        return b'Retry-After: %d\r\nRateLimit-Policy: %s\r\nRateLimit: "%s";r=0;t=%d\r\n' % (
            t,
            policy,
            self.name.encode(),
            t,
        )


def route_limits(
    limits: tuple[RateLimitConfig, ...], route: str, counts: dict[str, list[int]]
) -> tuple[RouteLimit, ...]:
    """The limits on ``route``; ``counts`` maps a limit's name to its counters (created
    here when missing) so routes and reloads share them."""
    return tuple(
        RouteLimit(x, counts.setdefault(x.name, [0, 0, 0]))
        for x in limits
        if not x.routes or route in x.routes
    )

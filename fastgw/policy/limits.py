"""Rate limits: one token bucket per key per limit, in the core's bucket table.

The core measures (``BucketTable.take`` answers 0 or "this many seconds until the
tokens are there", in constant time, with ``now`` passed in); this module decides: it
picks the key from the request (the verified identity, the client address, a header, a
claim), and over the limit answers 429 with ``Retry-After`` and the IETF ``RateLimit``
and ``RateLimit-Policy`` fields (draft-ietf-httpapi-ratelimit-headers), or in shadow
mode only counts. The table belongs to the gateway, not to a config: a reload keeps
every bucket, and a limit whose rate changed applies the new rate to the same bucket
without refilling it (the core converts its state).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fastgw.config.model import RateLimitConfig

if TYPE_CHECKING:
    from fastgw.identity import Identity


class RouteLimit:
    __slots__ = (
        "arg", "burst", "counts", "kind", "name", "policy_field", "prefix", "rate", "shadow",
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
        window = max(1, math.ceil(cfg.burst / cfg.rate_per_s))
        self.policy_field = f'"{cfg.name}";q={math.floor(cfg.burst)};w={window}'.encode()

    def key(self, identity: Identity | None, peer_ip: bytes, head: Any) -> bytes:
        kind = self.kind
        if kind == "identity":
            if identity is None or identity.kind == "anonymous":
                return self.prefix + b"ip:" + peer_ip  # no identity: the address stands in
            return self.prefix + (
                f"{identity.kind}:{identity.issuer or ''}:{identity.subject}".encode()
            )
        if kind == "ip":
            return self.prefix + peer_ip
        if kind == "route":
            return self.prefix
        if kind == "header":
            return self.prefix + (head.get(self.arg) or b"-")
        value = identity.claims.get(self.arg.decode()) if identity is not None else None
        return self.prefix + (b"-" if value is None else str(value).encode())

    def answer_fields(self, wait_s: float) -> bytes:
        t = max(1, math.ceil(wait_s))
        return b'Retry-After: %d\r\nRateLimit-Policy: %s\r\nRateLimit: "%s";r=0;t=%d\r\n' % (
            t,
            self.policy_field,
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

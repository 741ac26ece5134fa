"""The gateway's own cost per request, without the kernel: the downstream exchange loop
driven with in-memory transports (no sockets, no waits), so what is measured is the
Python and core work fastgw adds to each proxied request.

    python -m bench.path [N]                  # microseconds per request
    valgrind --tool=callgrind python -m bench.path 20000   # instructions: subtract a run
                                                           # with N=1, divide by N

Instruction counts are the stable figure on a shared machine: compare before/after a
hot-path change with them (``--audit`` adds the audit log to the config, ``--apikey`` an
API key on every request (the identity is established), ``--limit`` that and a
per-identity rate limit taken on every request, ``--tiered`` the same limit with tiers,
``--budget`` a per-identity day budget spent on every request, with its response fields).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import trio

from fastgw.config.model import (
    AuditConfig,
    BackendConfig,
    BudgetConfig,
    Endpoint,
    GatewayConfig,
    LimitTier,
    ListenerConfig,
    RateLimitConfig,
    RouteConfig,
)
from fastgw.downstream import Downstream
from fastgw.gateway import Gateway
from fastgw.identity import ApiKey, ApiKeys, hash_api_key
from fastgw.upstream.pool import UpstreamConn

REQ = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
API_KEY = b"bench-key-0123456789abcdef0123456789abcdef"
REQ_KEY = REQ[:-2] + b"X-Api-Key: " + API_KEY + b"\r\n\r\n"
RESP = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 04:11:28 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
)


class _Client:
    closed = False
    tls = False
    peer_cert = None

    def __init__(self, n: int, req: bytes = REQ) -> None:
        self.n = n
        self.req = req

    def recv_nowait(self, n: int = 65536) -> bytes:
        if self.n <= 0:
            return b""
        self.n -= 1
        return self.req

    async def recv_after_wait(self, n: int = 65536) -> bytes:
        return self.recv_nowait()

    async def recv(self, n: int = 65536) -> bytes:
        return self.recv_nowait()

    def send_nowait(self, data: bytes) -> int:
        return len(data)

    async def send_all(self, data: bytes) -> None:
        pass

    def is_reusable(self) -> bool:
        return True

    def close(self) -> None:
        pass


class _Upstream(_Client):
    def recv_nowait(self, n: int = 65536) -> bytes:
        return RESP


def config(
    audit: bool,
    limit: bool = False,
    apikey: bool = False,
    tiered: bool = False,
    budget: bool = False,
) -> GatewayConfig:
    ep = Endpoint(url="http://127.0.0.1:9", scheme="http", host="127.0.0.1", port=9, path_prefix="")
    cfg = GatewayConfig(
        listeners=(ListenerConfig(name="l", host="127.0.0.1", port=0),),
        backends={"fn": BackendConfig(name="fn", endpoints=(ep,))},
        routes=(RouteConfig(name="all", backend="fn"),),
    )
    if audit:
        cfg = dataclasses.replace(cfg, audit=AuditConfig(enabled=True, path="/dev/null"))
    if apikey or limit or tiered or budget:
        keys = ApiKeys([ApiKey("bench", hash_api_key(API_KEY), {"plan": "pro"})])
        ident = dataclasses.replace(cfg.identity, api_keys=keys)
        cfg = dataclasses.replace(cfg, identity=ident)
    if limit:
        lim = RateLimitConfig(name="per-caller", rate_per_s=1e7, burst=1e7, key="identity")
        cfg = dataclasses.replace(cfg, rate_limits=(lim,))
    if tiered:
        pro = LimitTier("pro", 1e7, 1e7)
        lim = RateLimitConfig(
            name="per-caller", rate_per_s=0.0, burst=0.0, tier="claim:plan", tiers=(pro,)
        )
        cfg = dataclasses.replace(cfg, rate_limits=(lim,))
    if budget:
        bud = BudgetConfig(name="daily", requests=10**15, window="day", key="identity")
        cfg = dataclasses.replace(cfg, budgets=(bud,))
    return cfg


async def run(
    n: int,
    audit: bool,
    limit: bool = False,
    apikey: bool = False,
    tiered: bool = False,
    budget: bool = False,
) -> float:
    gw = Gateway(config(audit, limit, apikey, tiered, budget))
    gw.now = trio.current_time()
    gw.clock = trio.lowlevel.current_clock()
    gw.limit_now = gw.clock.current_time  # as serve() binds it for a private table
    pool = gw.state.backends["fn"].pools[0]
    conn = UpstreamConn(pool, _Upstream(0))  # type: ignore[arg-type]
    conn.idle_since = gw.now
    conn.exchanges = 1
    pool._idle.append(conn)
    req = REQ_KEY if apikey or limit or tiered or budget else REQ
    d = Downstream(gw, _Client(n, req), b"127.0.0.1", b"http")  # type: ignore[arg-type]
    with trio.CancelScope() as scope:
        d.scope = scope
        t0 = time.perf_counter()
        await d.run()
        return (time.perf_counter() - t0) / max(n, 1)
    return float("nan")  # cancelled: no figure


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 200_000
    per = trio.run(
        run,
        n,
        "--audit" in sys.argv,
        "--limit" in sys.argv,
        "--apikey" in sys.argv,
        "--tiered" in sys.argv,
        "--budget" in sys.argv,
    )
    print(f"{per * 1e6:.2f} us per request ({n} requests, no I/O)")


if __name__ == "__main__":
    main()

"""Active health checks: one trio task per backend, checking each endpoint in turn.

Strategy: every ``interval_s`` each endpoint gets ``GET <path>`` on a connection of its
own, opened through the pool's transport code (so TLS is verified exactly as for
requests, with the backend's CA, SNI and client certificate) but never taken from or
returned to the pool: a check neither consumes a warm connection nor counts as a
connect failure for ejection. The answer's status decides (``expected_statuses``, any
2xx by default); a refused connect, a timeout or a malformed answer is a failure. The
pool turns results into state (``Pool.check_result``: down after ``unhealthy_threshold``
failures in a row, up after ``healthy_threshold`` successes). Endpoints start healthy, so
a gateway serves at once after a start or a reload; the first failures take it out.

The checker lives as long as its Backend: the gateway starts it in the backend's
``health_scope``, and a reload that keeps the backend keeps the checker and its state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from fastgw._core.http import parse_response_head
from fastgw.errors import ProtocolError
from fastgw.upstream.pool import UpstreamConnectError

if TYPE_CHECKING:
    from fastgw.config.model import HealthCheckConfig
    from fastgw.upstream.backend import Backend
    from fastgw.upstream.pool import Pool

# A check answer's head must fit in this (the body is not read).
_MAX_HEAD_BYTES = 16384


async def run_health_checks(backend: Backend) -> None:
    """Check ``backend``'s endpoints forever (cancel the caller's scope to stop).
    Endpoints are checked concurrently so one slow endpoint does not delay the rest."""
    hc = backend.config.health_check
    if hc is None:
        return
    async with trio.open_nursery() as nursery:
        for pool in backend.pools:
            nursery.start_soon(_check_loop, pool, hc)


async def _check_loop(pool: Pool, hc: HealthCheckConfig) -> None:
    while not pool.closed:
        ok = await check_once(pool, hc)
        pool.check_result(ok, hc.healthy_threshold, hc.unhealthy_threshold)
        await trio.sleep(hc.interval_s)


async def check_once(pool: Pool, hc: HealthCheckConfig) -> bool:
    """One check of ``pool``'s endpoint; True when the answer's status is expected."""
    ep = pool.endpoint
    target = ep.path_prefix + hc.path if hc.path != "/" else (ep.path_prefix or "/")
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {ep.authority}\r\nUser-Agent: fastgw-health\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    with trio.move_on_after(hc.timeout_s):
        try:
            transport = await pool._connect()
        except (UpstreamConnectError, OSError):
            return False
        try:
            await transport.send_all(request)
            buf = b""
            while True:
                data = await transport.recv()
                if not data:
                    return False
                buf += data
                rh = parse_response_head(buf, 0)
                if rh is not None:
                    if rh.status < 200:  # interim (1xx): wait for the final answer
                        buf = buf[rh.head_len :]
                        continue
                    status = rh.status
                    if hc.expected_statuses:
                        return status in hc.expected_statuses
                    return 200 <= status < 300
                if len(buf) > _MAX_HEAD_BYTES:
                    return False
        except (OSError, ProtocolError):
            return False
        finally:
            transport.close()
    return False  # timed out
